"""LongProc HTML-to-TSV (shared/specs/benchmarks.md §4): the authors' `html_to_tsv_8k` split by default.

Records (JSON array in `<data_dir>/longproc/html_to_tsv/html_to_tsv_<split>.json`) carry task_id, website_id,
html_path (relative to html_to_tsv/), task_topic, task_description, tsv_header, filtering_instruction and gt.
The prompt is `USER_PROMPT` of prompts.yaml filled with `str.format` (html_str = the page read as text, universal
newlines, like the authors' `open(...).read()`); it is the whole user turn; `max_out_len = 9216`.
Scoring: eval.metrics.html_to_tsv_metrics (row-level F1 after the authors' TSV extraction and normalisation).
"""
from __future__ import annotations

import json
import pathlib
from typing import Any, Mapping, Sequence

import yaml

from eval import metrics

from .base import MalformedLog, Sample, register, require_path, resolve_data_dir

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
                  n_samples: int | None = None) -> tuple[list[Sample], list[str]]:
    """LongProc HTML-to-TSV samples of `split` (one of SPLITS) in file order.

    A record is skipped (and counted) when it is not an object, lacks one of the string fields, names an HTML file
    that does not exist or is not UTF-8, or has a task_id seen before. Returns (samples, malformed messages).
    """
    if split not in SPLITS:
        raise ValueError(f"split={split!r}, allowed: {SPLITS}")
    root = require_path(resolve_data_dir(data_dir) / "longproc" / "html_to_tsv", "LongProc html_to_tsv folder")
    data_path = require_path(root / f"{split}.json", f"LongProc split {split}")
    template = load_prompt_template(root)
    log = MalformedLog(str(data_path))
    try:
        with open(data_path, encoding="utf-8") as f:
            records = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{str(data_path)!r} is not valid JSON: {e}") from e
    if not isinstance(records, list):
        raise ValueError(f"{str(data_path)!r} must hold a JSON array of records, got {type(records).__name__}")

    samples, seen = [], set()
    for idx, rec in enumerate(records):
        if n_samples is not None and len(samples) >= n_samples:
            break
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
        meta.update(split=split, filtered=bool(rec["filtering_instruction"]))
        samples.append(Sample(id=rec["task_id"], benchmark="longproc", user_text=build_longproc_prompt(
            template, rec, html_str), gold=rec["gt"], meta=meta, max_new_tokens=MAX_NEW_TOKENS))
    log.warn()
    return samples, log.messages


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


register(_LongProc())
