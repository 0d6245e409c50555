"""LongProc HTML-to-TSV (shared/specs/benchmarks.md §4): the authors' `html_to_tsv_8k` split by default.

Two forms of the data are read, under `<data_root>/longproc/`:

* the LongProc GitHub files (what the authors' harness reads): a JSON array in
  `html_to_tsv/html_to_tsv_<split>.json` whose records carry task_id, website_id, html_path (relative to
  html_to_tsv/), task_topic, task_description, tsv_header, filtering_instruction and gt. The prompt is
  `USER_PROMPT` of prompts.yaml filled with `str.format` (html_str = the page read as text, universal newlines,
  like the authors' `open(...).read()`);
* the Hugging Face dump `PrincetonPLI/LongProc` (what `kvjax data download` fetches): rows of
  `html_to_tsv_<split>/*.parquet` (or `html_to_tsv_<split>.jsonl`) with id, input_prompt (the prompt already
  filled in by LongProc's own loader), reference_output (the TSV ground truth) and metadata (a JSON string).

The prompt is the whole user turn; `max_out_len = 9216`. The files form wins when both are present.
Scoring: eval.metrics.html_to_tsv_metrics (row-level F1 after the authors' TSV extraction and normalisation).
"""
from __future__ import annotations

import dataclasses
import itertools
import json
import pathlib
from typing import Any, Iterator, Mapping, Sequence

import yaml

from eval import metrics

from eval.data import locate

from .base import FileCheck, MalformedLog, Sample, register, require_path

MAX_NEW_TOKENS = 9216
SPLITS = ("html_to_tsv_0.5k", "html_to_tsv_2k", "html_to_tsv_8k")
_FIELDS = ("task_id", "website_id", "html_path", "task_topic", "task_description", "tsv_header",
           "filtering_instruction", "gt")


def load_prompt_template(root: pathlib.Path) -> str:
    """USER_PROMPT from `<root>/prompts.yaml` (a str.format template with html_str, task_topic, task_description,
    filtering_instruction and tsv_header)."""
    path = require_path(root / "prompts.yaml", "LongProc prompt file (prompts.yaml)")
    with open(path, encoding="utf-8") as f:
        doc = yaml.safe_load(f)
    if not isinstance(doc, Mapping) or not isinstance(doc.get("USER_PROMPT"), str):
        raise ValueError(f"{str(path)!r} has no string USER_PROMPT")
    return doc["USER_PROMPT"]


def build_longproc_prompt(template: str, record: Mapping[str, str], html_str: str) -> str:
    """Fill the template exactly as the authors do (`template.format(**fields)`); the `{{…}}` in the template
    becomes a literal `{…}`, and braces inside the substituted values are left alone."""
    return template.format(html_str=html_str, task_topic=record["task_topic"],
                           task_description=record["task_description"],
                           filtering_instruction=record["filtering_instruction"], tsv_header=record["tsv_header"])


def load_longproc(split: str = "html_to_tsv_8k", *, data_dir: str | pathlib.Path | None = None,
                  n_samples: int | None = None, task_ids: Sequence[str] | None = None
                  ) -> tuple[list[Sample], list[str]]:
    """LongProc HTML-to-TSV samples of `split` (one of SPLITS) in file order.

    data_dir: the data root holding longproc/; None = found by `eval.data.locate` ($KVJAX_DATA, kvjax's cache,
      the hub). task_ids: keep only these ids (in file order; a hub row matches by its id or its metadata's
      task_id), e.g. the few that fit a small model's context; raises ValueError naming the ids not found.
    A record is skipped (and counted) when it is not an object, lacks one of the string fields, names an HTML file
    that does not exist or is not UTF-8, or has a task_id seen before. Returns (samples, malformed messages).
    """
    if split not in SPLITS:
        raise ValueError(f"split={split!r}, allowed: {SPLITS}")
    if task_ids is not None and (isinstance(task_ids, str) or not all(isinstance(t, str) for t in task_ids)):
        raise ValueError(f"task_ids={task_ids!r}, allowed: a list of task id strings")
    folder = locate("longproc", data_dir).path
    if (folder / "html_to_tsv" / f"{split}.json").exists():
        samples, messages = _load_files(folder / "html_to_tsv", split, n_samples, task_ids)
    else:
        samples, messages = _load_hub(folder, split, n_samples, task_ids)
    if task_ids is not None:
        missing = sorted(set(task_ids) - {s.id for s in samples} - {s.meta.get("task_id") for s in samples})
        if missing:
            raise ValueError(f"task_ids {missing} are not in LongProc {split} (or were malformed)")
    return samples, messages


def _wanted(ids: Sequence[str], task_ids: Sequence[str] | None) -> bool:
    return task_ids is None or any(i in task_ids for i in ids)


def _load_files(root: pathlib.Path, split: str, n_samples: int | None, task_ids: Sequence[str] | None
                ) -> tuple[list[Sample], list[str]]:
    data_path = require_path(root / f"{split}.json", f"LongProc split {split}")
    template = load_prompt_template(root)
    log = MalformedLog(str(data_path))
    samples = list(itertools.islice(_file_records(root, data_path, split, template, log, task_ids), n_samples))
    log.warn()
    return samples, log.messages


def _file_records(root: pathlib.Path, data_path: pathlib.Path, split: str, template: str, log: MalformedLog,
                  task_ids: Sequence[str] | None = None) -> Iterator[Sample]:
    try:
        with open(data_path, encoding="utf-8") as f:
            records = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{str(data_path)!r} is not valid JSON: {e}") from e
    if not isinstance(records, list):
        raise ValueError(f"{str(data_path)!r} must hold a JSON array of records, got {type(records).__name__}")
    seen = set()
    for idx, rec in enumerate(records):
        where = f"record {idx}"
        if not isinstance(rec, Mapping):
            log.skip(where, f"is {type(rec).__name__}, expected an object")
            continue
        missing = [k for k in _FIELDS if not isinstance(rec.get(k), str)]
        if missing:
            log.skip(where, f"field(s) {missing} missing or not strings")
            continue
        if rec["task_id"] in seen:
            log.skip(where, f"duplicate task_id {rec['task_id']!r}")
            continue
        if not _wanted([rec["task_id"]], task_ids):
            continue
        html_path = root / rec["html_path"]
        try:
            with open(html_path, encoding="utf-8") as f:  # text mode: universal newlines, as the authors read it
                html_str = f.read()
        except FileNotFoundError:
            log.skip(where, f"HTML file {str(html_path)!r} not found")
            continue
        except UnicodeDecodeError as e:
            log.skip(where, f"HTML file {str(html_path)!r} is not UTF-8 ({e.reason})")
            continue
        seen.add(rec["task_id"])
        meta = {k: rec[k] for k in ("task_id", "website_id", "html_path", "task_topic", "tsv_header")}
        meta.update(split=split, filtered=bool(rec["filtering_instruction"]), form="files")
        yield Sample(id=rec["task_id"], benchmark="longproc", user_text=build_longproc_prompt(template, rec, html_str),
                     gold=rec["gt"], meta=meta, max_new_tokens=MAX_NEW_TOKENS)


@dataclasses.dataclass(frozen=True)
class _BadLine:
    why: str


def _hub_rows(folder: pathlib.Path, split: str) -> tuple[list[pathlib.Path], Iterator[tuple[str, Any]]]:
    """(files, (where, row) pairs) of the Hugging Face dump of `split`: parquet shards, else a JSON Lines file."""
    shards = sorted((folder / split).glob("*.parquet"))
    if shards:
        import pyarrow.parquet as pq

        def rows():
            for path in shards:
                for i, row in enumerate(pq.read_table(path).to_pylist()):
                    yield f"{path.name} row {i}", row
        return shards, rows()
    path = folder / f"{split}.jsonl"
    if not path.exists():
        raise FileNotFoundError(f"LongProc split {split} not found in {str(folder)!r}: neither "
                                f"html_to_tsv/{split}.json, {split}/*.parquet nor {split}.jsonl")

    def lines():
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, start=1):
                try:
                    yield f"{path.name} line {lineno}", json.loads(line)
                except json.JSONDecodeError as e:
                    yield f"{path.name} line {lineno}", _BadLine(f"invalid JSON ({e.msg})")
    return [path], lines()


def _hub_records(folder: pathlib.Path, split: str, log: MalformedLog) -> Iterator[Sample]:
    _, rows = _hub_rows(folder, split)
    seen = set()
    for where, row in rows:
        if isinstance(row, _BadLine):
            log.skip(where, row.why)
            continue
        if not isinstance(row, Mapping):
            log.skip(where, f"is {type(row).__name__}, expected an object")
            continue
        missing = [k for k in ("id", "input_prompt", "reference_output") if not isinstance(row.get(k), str)
                   or not row.get(k)]
        if missing:
            log.skip(where, f"field(s) {missing} missing, empty or not strings")
            continue
        try:
            extra = json.loads(row["metadata"]) if isinstance(row.get("metadata"), str) else row.get("metadata")
        except json.JSONDecodeError as e:
            log.skip(where, f"field 'metadata' is not JSON ({e.msg})")
            continue
        if row["id"] in seen:
            log.skip(where, f"duplicate id {row['id']!r}")
            continue
        seen.add(row["id"])
        meta = {k: v for k, v in (extra or {}).items() if isinstance(v, (str, int, float, bool)) and k != "gt"}
        meta.setdefault("task_id", row["id"])
        meta.update(split=split, form="hub")
        yield Sample(id=row["id"], benchmark="longproc", user_text=row["input_prompt"], gold=row["reference_output"],
                     meta=meta, max_new_tokens=MAX_NEW_TOKENS)


def _load_hub(folder: pathlib.Path, split: str, n_samples: int | None, task_ids: Sequence[str] | None
              ) -> tuple[list[Sample], list[str]]:
    log = MalformedLog(f"{folder / split}")
    samples = list(itertools.islice((s for s in _hub_records(folder, split, log)
                                     if _wanted([s.id, s.meta["task_id"]], task_ids)), n_samples))
    log.warn()
    return samples, log.messages


def check_files(folder: str | pathlib.Path) -> list[FileCheck]:
    """`kvjax data check` for a LongProc folder: records and malformed records of every split present, in the
    files form and in the hub form."""
    folder = pathlib.Path(folder)
    out = []
    for split in SPLITS:
        data_path = folder / "html_to_tsv" / f"{split}.json"
        if data_path.exists():
            log = MalformedLog(str(data_path))
            n = sum(1 for _ in _file_records(folder / "html_to_tsv", data_path, split,
                                              load_prompt_template(folder / "html_to_tsv"), log))
            out.append(FileCheck(str(data_path), n, log.messages))
        if list((folder / split).glob("*.parquet")) or (folder / f"{split}.jsonl").exists():
            log = MalformedLog(str(folder / split))
            n = sum(1 for _ in _hub_records(folder, split, log))
            out.append(FileCheck(str(folder / split), n, log.messages))
    return out


def score_longproc(sample: Sample, prediction: str) -> dict[str, Any]:
    """{"f1", "precision", "recall", "extraction_rate"} in [0, 1] for one prediction."""
    return metrics.html_to_tsv_metrics(sample.answer_prefix + (prediction if isinstance(prediction, str) else ""),
                                       sample.gold)


class _LongProc:
    name = "longproc"

    def build(self, **params):
        return load_longproc(**params)

    def score(self, sample, prediction):
        return score_longproc(sample, prediction)

    def aggregate(self, samples: Sequence[Sample], scores):
        return metrics.longproc_aggregate(scores)


register(_LongProc(), data="longproc")
