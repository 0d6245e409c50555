"""``kvjax eval``: the evaluation grid models × methods × benchmarks × budgets, resumable, optionally multi-host.

What a run does, per model and sample (batch size 1, as the authors' harness):

1. The sample's user text goes through the model's chat template (one user message, generation prompt), then the
   sample's answer prefix is appended; the ids are prefilled **once**, exactly (shared by every method).
2. ``full`` decodes greedily (stop on EOS / end-of-turn ids, at most ``max_new_tokens`` tokens); its record caches
   its sampled tokens, so a resumed run rebuilds the reference logits instead of regenerating.
3. Every other (method, budget) decodes greedily on the same prefill, teacher-forced on full's tokens for the
   fidelity metrics and free-running for the task score (eval/fidelity.py).
4. One JSON record per (model, benchmark, sample, method, budget) is appended to ``<out>/results.jsonl`` and
   flushed (fsync) as soon as it is finished. Re-running with the same ``--out`` skips finished keys, so a killed
   run loses at most the record in flight; unreadable (half-written) lines are dropped on load.
5. ``summary.md``, ``summary.csv`` and ``plots/`` are written from all records (eval/summary.py) and the table is
   printed with the wall time.

Record fields: key, model, benchmark, sample_id, data_source (where the benchmark's data came from:
eval.data.resolve_source), method, budget (label), budget_value, budget_fraction, config
(the policy's config), prompt_tokens, max_new_tokens, prediction (decoded text, answer prefix not included),
n_generated, stop_reason, score (the benchmark's per-sample dict), fidelity (eval/fidelity.py; full: exact by
definition), device/host bytes per prompt token (the policy state's bytes, padding to the prompt bucket and the
generated-token slots included, divided by the prompt's tokens) and the whole memory report, seconds (shared prefill
+ build + free-run decode; the decode steps shared with teacher forcing carry the instrumentation: logits transfer
and recall), prefill_s, build_s, decode_s, fidelity_s (teacher-forced steps after the divergence), and for full
``full_tokens``. Generation follows the engine's convention: at most ``max_new_tokens`` tokens counting the one
from the prefill logits (the authors' harness allows ``max_out_len + 1``). A failed (sample,
method) gets a record with ``error`` (not retried unless ``--retry-errors``).

``--distributed``: ``jax.distributed.initialize`` (coordinator / process count / id from the flags, else
$KVJAX_COORDINATOR, $KVJAX_NUM_PROCESSES, $KVJAX_PROCESS_ID, else JAX's own cluster detection). Process i runs
the samples ``i::n`` of every model on its local devices and appends to ``<out>/parts/results.part-i-of-n.jsonl``;
each writes ``<out>/parts/done-i-of-n.json`` when finished; process 0 polls for all markers (``--merge-timeout``),
merges the parts into ``results.jsonl`` (first record of a key wins) and writes the summary. ``--out`` must be on
a file system every host sees.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import fractions
import json
import os
import pathlib
import random
import sys
import time
import traceback
from typing import Any, Callable, Mapping, Sequence

from eval.benchmarks import Sample, dataset_of, get_benchmark, register
from eval.data import DataNotFoundError, describe as describe_source
from eval import suite
from eval import summary as summary_mod
from kvjax.options import parse_methods, parse_value as _parse_value

# ------------------------------------------------------------------------------------------------------------ presets
#: The paper's default budgets where they differ from a policy class's own default: YAKV's eval config (1/32) and
#: ShadowKV's "default 1.5625%" the paper compares against (the class default is 2048 tokens).
PAPER_BUDGETS = {"yakv": 1 / 32, "shadowkv": 1 / 64}

#: Options a benchmark entry may carry that the runner consumes (not passed to the benchmark's build).
RUNNER_KEYS = ("max_new_tokens", "answer_prefix", "max_prompt_tokens")

TABLE_PREFIX = "table"  # answer_prefix value: "| name | k1 | k2 |\n|---|---|---|\n|" from the sample's own keys

PRESETS: dict[str, dict[str, Any]] = {
    # smollm2-135m in float32 on CPU. The benchmarks are kvjax's default suite (eval/suite.py: real NeedleBench /
    # LongProc where found without downloading, else generated; synthetic Text2JSON; RULER-style tasks); the
    # options of every benchmark it may run are here, the set is chosen per run by suite.default_benchmarks.
    # Text2JSON in the line format (the 135M model cannot write JSON) with a markdown-table header as answer prefix,
    # medical domain only (the domain where the 135M model recovers names and attributes; its movie titles come
    # back quoted and score 0), and MultiNeedle (3 needles) inside the model's 8k context, cut with the model's
    # own tokenizer. Generation is capped to fit the time; recall is measured every 4th step.
    "default": {
        "models": ["smollm2-135m"],
        "methods": ["full", "yakv", "shadowkv"],
        "budgets": ["default"],
        "benchmarks": suite.OPTIONS,
        "recall_every": 4,
    },
    # The larger CPU run of BENCHMARKS.md (~80 min on 2 cores): 20 synthetic Text2JSON samples at 4k-7k tokens (all
    # four domains, line format, no answer prefix) + 10 MultiNeedle at 7.6k tokens (3 needles), full / yakv /
    # shadowkv at four equal budgets. At these lengths smollm2-135m's own Text2JSON score is 0 even with full
    # attention, so the comparison there rests on the fidelity metrics (and on MultiNeedle's task score).
    "larger": {
        "models": ["smollm2-135m"],
        "methods": ["full", "yakv", "shadowkv"],
        "budgets": ["1/64", "1/32", "1/16", "1/8"],
        "benchmarks": {
            "text2json_synth": {"n_samples": 20, "target_tokens": [4000, 7000], "n_entities": 5,
                                "answer_format": "lines", "domains": ["products", "medical", "organisations", "movies"],
                                "answer_prefix": None, "max_new_tokens": 96},
            "multineedle": {"n_samples": 10, "context_length": 7600, "length_buffer": 200, "needle_count": 3,
                            "max_new_tokens": 40},
        },
        "recall_every": 4,
    },
    # The authors' settings (needs a 128k-context model checkpoint, --models /path/to/checkpoint, and the data).
    "paper": {
        "models": ["smollm2-135m"],
        "methods": ["full", "yakv", "shadowkv"],
        "budgets": ["default"],
        "benchmarks": {"text2json": {}, "multineedle": {"context_length": 128_000}, "longproc": {}},
        "recall_every": 1,
    },
    # A tokenizer-free smoke test (works with any model, e.g. the tiny HF fixtures).
    "toy": {
        "models": ["smollm2-135m"],
        "methods": ["full", "yakv"],
        "budgets": ["default"],
        "benchmarks": {"toy_retrieval": {"n_samples": 4, "n_pairs": 12, "max_new_tokens": 8}},
        "recall_every": 1,
    },
}


# ------------------------------------------------------------------------------------------ a tokenizer-free benchmark
class ToyRetrieval:
    """A tiny synthetic key-value retrieval benchmark that needs no data files and no tokenizer.

    user_text: "Facts: key-17 is 4021. key-3 is 911. … Question: what is key-3? Answer:"; gold: the value
    string; score {"score": 1.0 if the gold value occurs in the prediction else 0.0}. Deterministic in
    (n_samples, n_pairs, seed)."""

    name = "toy_retrieval"

    def build(self, n_samples: int = 4, n_pairs: int = 12, seed: int = 0, max_new_tokens: int = 8):
        if not isinstance(n_samples, int) or n_samples < 1:
            raise ValueError(f"n_samples={n_samples!r}, allowed: int >= 1")
        if not isinstance(n_pairs, int) or not 1 <= n_pairs <= 500:
            raise ValueError(f"n_pairs={n_pairs!r}, allowed: int in [1, 500]")
        out = []
        for i in range(n_samples):
            rng = random.Random(f"toy_retrieval:{seed}:{i}")
            keys = rng.sample(range(1, 1000), n_pairs)
            vals = [str(rng.randint(100, 9999)) for _ in keys]
            j = rng.randrange(n_pairs)
            facts = " ".join(f"key-{k} is {v}." for k, v in zip(keys, vals))
            text = f"Facts: {facts}\nQuestion: what is key-{keys[j]}? Answer:"
            out.append(Sample(id=f"toy_retrieval-{seed}-{i}", benchmark=self.name, user_text=text, gold=vals[j],
                              max_new_tokens=max_new_tokens, meta={"n_pairs": n_pairs, "seed": seed}))
        return out, []

    def score(self, sample: Sample, prediction: str) -> dict[str, Any]:
        text = sample.answer_prefix + (prediction if isinstance(prediction, str) else "")
        return {"score": float(sample.gold in text)}

    def aggregate(self, samples, scores):
        vals = [s["score"] for s in scores]
        return {"average_score": 100.0 * sum(vals) / len(vals) if vals else float("nan")}


register(ToyRetrieval())


class ByteTokenizer:
    """Stand-in tokenizer for checkpoints without one (e.g. the tiny test fixtures): UTF-8 bytes shifted by
    ``offset`` (ids below it are the model's special ids), a plain-text chat template, the model's EOS ids as
    stop ids. Needs ``vocab_size >= 256 + offset``."""

    def __init__(self, vocab_size: int, eos_ids: Sequence[int] = (), offset: int = 3):
        if vocab_size < 256 + offset:
            raise ValueError(f"vocab_size={vocab_size}: a byte tokenizer needs >= {256 + offset} ids; this model has "
                             f"no tokenizer, so use a checkpoint with tokenizer.json")
        self.offset = offset
        self.eos_ids = tuple(int(i) for i in eos_ids)

    def encode(self, text: str, add_bos: bool | None = None) -> list[int]:
        return [b + self.offset for b in text.encode("utf-8")]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        return bytes(i - self.offset for i in ids if self.offset <= i < 256 + self.offset).decode("utf-8", "replace")

    def apply_chat_template(self, text: str, add_generation_prompt: bool = True) -> str:
        return f"User: {text}\nAssistant:" if add_generation_prompt else f"User: {text}\n"

    def stop_ids(self) -> tuple[int, ...]:
        return self.eos_ids


# ---------------------------------------------------------------------------------------------------- parsing helpers
def parse_value(v: str) -> Any:
    """CLI value: int, float, a/b fraction, true/false, none, comma list, else the string."""
    return _parse_value(v, lists=True)


def parse_budget(s: str) -> tuple[str, float | int | None]:
    """``"default"`` | fraction ``"1/64"`` / ``"0.03125"`` (of the prompt, in [0, 1]) | token count ``"2048"``
    -> (label, value). Raises ValueError naming the value and the allowed forms."""
    s = s.strip()
    if s.lower() == "default":
        return "default", None
    try:
        if "/" in s:
            f = fractions.Fraction(s)
            val: float | int = float(f)
        elif "." in s or "e" in s.lower():
            val = float(s)
        else:
            val = int(s)
    except (ValueError, ZeroDivisionError):
        raise ValueError(f"budget {s!r}: allowed 'default', a fraction of the prompt in [0, 1] (1/64, 0.03125) "
                         f"or a token count (2048)") from None
    if isinstance(val, float) and not 0.0 <= val <= 1.0:
        raise ValueError(f"budget {s!r} = {val}: a fraction must be in [0, 1]")
    if isinstance(val, int) and val < 0:
        raise ValueError(f"budget {s!r}: a token count must be >= 0 tokens")
    return budget_label(val), val


def budget_label(val: float | int) -> str:
    """"1/64" for fractions with an integer reciprocal, the int for token counts, else %.6g."""
    if isinstance(val, int):
        return str(val)
    if val > 0:
        inv = 1.0 / val
        if abs(inv - round(inv)) < 1e-9:
            return f"1/{round(inv)}"
    return f"{val:.6g}"


def _dotted_opts(opts: Sequence[str], what: str) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for o in opts:
        if "=" not in o or "." not in o.split("=", 1)[0]:
            raise ValueError(f"--{what}-opt {o!r}: expected NAME.KEY=VALUE, e.g. "
                             f"{'multineedle.context_length=4000' if what == 'bench' else 'yakv.local_budget=128'}")
        lhs, v = o.split("=", 1)
        name, key = lhs.split(".", 1)
        out.setdefault(name.strip(), {})[key.strip()] = parse_value(v)
    return out


# ------------------------------------------------------------------------------------------------------ run config
@dataclasses.dataclass
class RunConfig:
    """Everything a run needs (built from the CLI by :func:`config_from_args`)."""

    out: pathlib.Path
    models: list[str]
    methods: list[str]
    budgets: list[tuple[str, float | int | None]]
    benchmarks: dict[str, dict[str, Any]]
    policy_opts: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
    dtype: str | None = None
    mesh: str | None = None
    equal_memory: float | None = None
    max_samples: int | None = None
    max_new_tokens: int | None = None
    seed: int = 0
    recall_every: int = 1
    fidelity: bool = True
    retry_errors: bool = False
    progress: bool = True
    plots: bool = True
    distributed: bool = False
    coordinator: str | None = None
    num_processes: int | None = None
    process_id: int | None = None
    merge_timeout: float = 3600.0
    data_dir: str | None = None


def record_key(model: str, benchmark: str, sample_id: str, method: str, budget: str) -> str:
    return f"{model}|{benchmark}|{sample_id}|{method}|{budget}"


# ------------------------------------------------------------------------------------------------------ result store
_keep = summary_mod.keep_record


class ResultStore:
    """Append-only JSONL of records keyed by ``record["key"]``.

    Existing records are read from ``read_paths`` and ``path`` (first occurrence of a key wins); unreadable lines
    of ``path`` (a write cut by a kill) are dropped by rewriting it atomically. ``add`` appends one line, flushes
    and fsyncs, and refuses a key already present."""

    def __init__(self, path: str | os.PathLike, read_paths: Sequence[str | os.PathLike] = ()):
        self.path = pathlib.Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.records: dict[str, dict] = {}
        self.dropped = 0
        for p in list(read_paths) + [self.path]:
            self._load(pathlib.Path(p), repair=pathlib.Path(p) == self.path)
        self._f = open(self.path, "a", encoding="utf-8")

    def _load(self, p: pathlib.Path, repair: bool) -> None:
        if not p.exists():
            return
        good, bad = [], 0
        with open(p, encoding="utf-8", errors="replace") as f:
            for line in f:
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    bad += 1
                    continue
                if not isinstance(rec, dict) or not isinstance(rec.get("key"), str):
                    bad += 1
                    continue
                good.append(line if line.endswith("\n") else line + "\n")
                _keep(self.records, rec)
        if bad and repair:
            tmp = p.with_suffix(p.suffix + ".tmp")
            with open(tmp, "w", encoding="utf-8") as f:
                f.writelines(good)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, p)
            self.dropped += bad
            print(f"[eval] {p}: dropped {bad} unreadable line(s) (a write cut short)", file=sys.stderr)
        elif repair and p.stat().st_size:
            with open(p, "rb") as f:
                f.seek(-1, os.SEEK_END)
                last = f.read(1)
            if last != b"\n":  # a complete last record without its newline: finish the line before appending
                with open(p, "a", encoding="utf-8") as f:
                    f.write("\n")

    def __contains__(self, key: str) -> bool:
        return key in self.records

    def get(self, key: str) -> dict | None:
        return self.records.get(key)

    def add(self, rec: dict) -> bool:
        if rec["key"] in self.records:
            return False
        self._f.write(json.dumps(rec, ensure_ascii=False) + "\n")
        self._f.flush()
        os.fsync(self._f.fileno())
        self.records[rec["key"]] = rec
        return True

    def replace(self, rec: dict) -> None:
        """Append a newer record of a key whose stored record is an error (``--retry-errors``); on load a record
        without ``error`` takes precedence over an error record of the same key."""
        self._f.write(json.dumps(rec, ensure_ascii=False) + "\n")
        self._f.flush()
        os.fsync(self._f.fileno())
        self.records[rec["key"]] = rec

    def close(self) -> None:
        self._f.close()


def merge_parts(out: pathlib.Path, part_paths: Sequence[pathlib.Path]) -> int:
    """Merge part files into ``out/results.jsonl`` (existing records first; first record of a key wins); written
    atomically. Returns the number of records."""
    main = out / "results.jsonl"
    seen: dict[str, dict] = {}
    for p in [main, *part_paths]:
        for rec in summary_mod.load_records(p):  # per file the same rule, so merging files keeps it
            _keep(seen, rec)
    tmp = main.with_suffix(".jsonl.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for rec in seen.values():
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, main)
    return len(seen)


# ------------------------------------------------------------------------------------------------------ methods
def _knob(method: str) -> str:
    from kvjax.policies import POLICIES, PRESETS as POLICY_PRESETS

    base = POLICY_PRESETS.get(method, (method, {}))[0]
    cls = POLICIES.get(base)
    if cls is None:
        raise ValueError(f"method {method!r} is unknown; available: {sorted(set(POLICIES) | set(POLICY_PRESETS))}")
    knob = getattr(cls, "budget_knob", None)
    if knob is None:
        try:
            from kvjax.budgets import KNOBS
        except ImportError:
            KNOBS = {}
        knob = KNOBS.get(base, "sparse_budget")
    return knob


@dataclasses.dataclass
class MethodSpec:
    method: str
    budget: str
    budget_value: float | int | None
    policy: Any


def method_specs(methods: Sequence[str], budgets: Sequence[tuple[str, Any]],
                 policy_opts: Mapping[str, Mapping[str, Any]]) -> list[MethodSpec]:
    """(method, budget) grid: full once ("-"), every other method at every budget. ``"default"`` = the paper's
    budget (:data:`PAPER_BUDGETS`) or the policy's own default; the budget sets the method's budget knob."""
    from kvjax.policies import make_policy

    specs = []
    for name, m, inline in parse_methods(",".join(methods)):
        # "yakv[store_format=none]" is a variant of yakv with its own label; --policy-opt for the base name
        # applies to every variant, for the full label to that variant only, inline options last
        opts = {**policy_opts.get(m, {}), **(policy_opts.get(name, {}) if name != m else {}), **inline}
        if m == "full":
            if inline:
                raise ValueError(f"method {name!r}: full attention is the reference and takes no variant options")
            specs.append(MethodSpec("full", "-", None, make_policy("full", **opts)))
            continue
        knob = _knob(m)
        for label, val in budgets:
            if val is None:  # default
                val = PAPER_BUDGETS.get(m)
                if val is None:
                    val = getattr(make_policy(m, **opts).config, knob)
                label = budget_label(val)
            try:
                pol = make_policy(m, **{**opts, knob: val})
            except (TypeError, ValueError) as e:
                raise ValueError(f"method {name!r} with {knob}={val!r} and options {opts}: {e}") from None
            specs.append(MethodSpec(name, label, val, pol))
    seen, out = set(), []
    for s in specs:
        if (s.method, s.budget) not in seen:
            seen.add((s.method, s.budget))
            out.append(s)
    return out


# ------------------------------------------------------------------------------------------------------ samples
def _table_prefix(sample: Sample) -> str:
    keys = sample.meta.get("keys")
    if not keys or len(keys) != 2:
        raise ValueError(f"answer_prefix='{TABLE_PREFIX}' needs a Text2JSON sample with meta['keys'] (two attribute "
                         f"names); sample {sample.id!r} has {keys!r}")
    return f"| name | {keys[0]} | {keys[1]} |\n|---|---|---|\n|"


def build_samples(bench: str, opts: Mapping[str, Any], tok, ctx: int, cfg: RunConfig) -> tuple[list, dict]:
    """Samples of one benchmark for one model: [(sample, max_new_tokens)], and the load report as a dict."""
    from eval.benchmarks import load

    params = {k: v for k, v in opts.items() if k not in RUNNER_KEYS}
    if cfg.max_samples is not None and "n_samples" not in params:
        params["n_samples"] = cfg.max_samples
    if dataset_of(bench) is None:  # a generated benchmark: --seed
        params.setdefault("seed", cfg.seed)
    if bench == "multineedle" and "tokenizer" not in params:
        params["tokenizer"] = getattr(tok, "tok", tok)  # the model's tokenizers.Tokenizer
    if cfg.data_dir:  # load() resolves it for benchmarks that read data (eval.data.locate)
        params.setdefault("data_dir", cfg.data_dir)
    if isinstance(params.get("domains"), str):
        params["domains"] = [params["domains"]]
    cap = opts.get("max_new_tokens", cfg.max_new_tokens)
    if cfg.max_new_tokens is not None:
        cap = min(cap, cfg.max_new_tokens) if cap is not None else cfg.max_new_tokens
    max_prompt = opts.get("max_prompt_tokens")

    def count(text: str) -> int:
        return len(tok.encode(tok.apply_chat_template(text)))

    # the prompt must leave room for the generated tokens inside the model's context
    limit = ctx - (cap or 1)
    max_prompt = min(max_prompt, limit) if max_prompt else limit
    samples, report = load(bench, count_tokens=count, max_prompt_tokens=max_prompt, **params)
    prefix = opts.get("answer_prefix")
    out, no_room = [], []
    for s in samples:
        if prefix is not None:
            s = dataclasses.replace(s, answer_prefix=_table_prefix(s) if prefix == TABLE_PREFIX else str(prefix))
        mn = s.max_new_tokens if cap is None else min(cap, s.max_new_tokens)
        if report.prompt_tokens.get(s.id, 0) + len(tok.encode(s.answer_prefix)) + mn > ctx:
            no_room.append(s.id)  # prompt + max_new_tokens would exceed the model's context: skipped, not cut
            continue
        out.append((s, int(mn)))
    if cfg.max_samples is not None:
        out = out[:cfg.max_samples]
    text = report.summary()
    if no_room:
        text += f"; skipped {len(no_room)} whose prompt + max_new_tokens exceeds the {ctx}-token context"
    return out, {"summary": text, "too_long": report.too_long + no_room, "malformed": report.n_malformed,
                 "source": report.source}


# ------------------------------------------------------------------------------------------------------ the run
def _memory_fields(rep: Mapping[str, Any]) -> dict[str, Any]:
    ppt = rep.get("per_prompt_token", {})
    dev = ppt.get("device", 0.0)
    host = sum(v for k, v in ppt.items() if k != "device")
    return {"device_bytes_per_prompt_token": float(dev), "host_bytes_per_prompt_token": float(host),
            "memory": {"by_kind": rep.get("by_kind"), "per_prompt_token": ppt,
                       "per_prompt_token_variable": rep.get("per_prompt_token_variable"),
                       "components": rep.get("components")}}


def _config_dict(policy) -> dict:
    try:
        return json.loads(json.dumps(dataclasses.asdict(policy.config), default=str))
    except TypeError:
        return {"repr": repr(policy.config)}


def _budget_fraction(spec: MethodSpec, prompt_tokens: int) -> float | None:
    v = spec.budget_value
    if spec.method == "full":
        return 1.0
    if v is None:
        return None
    if isinstance(v, int):
        return v / max(prompt_tokens, 1)
    return float(v)


def _init_distributed(cfg: RunConfig) -> tuple[int, int]:
    import jax

    coord = cfg.coordinator or os.environ.get("KVJAX_COORDINATOR")
    nproc = cfg.num_processes or (int(os.environ["KVJAX_NUM_PROCESSES"]) if os.environ.get("KVJAX_NUM_PROCESSES")
                                  else None)
    pid = cfg.process_id if cfg.process_id is not None else (
        int(os.environ["KVJAX_PROCESS_ID"]) if os.environ.get("KVJAX_PROCESS_ID") else None)
    if nproc is not None and (pid is None or not 0 <= pid < nproc):
        raise ValueError(f"--process-id={pid!r} with --num-processes={nproc}: allowed 0 <= id < num_processes")
    if pid is not None and nproc is not None:  # drop my stale marker before the start barrier of initialize
        _done_marker(cfg.out, pid, nproc).unlink(missing_ok=True)
    kw = {}
    if coord:
        kw["coordinator_address"] = coord
    if nproc is not None:
        kw["num_processes"] = nproc
    if pid is not None:
        kw["process_id"] = pid
    jax.distributed.initialize(**kw)
    return jax.process_index(), jax.process_count()


def _manifest(cfg: RunConfig) -> dict:
    """What determines the records' content beyond their keys (benchmark options, generation caps, policy options,
    dtype, seed): stored as run_config.json so a resume with other settings is flagged."""
    return json.loads(json.dumps({"benchmarks": cfg.benchmarks, "policy_opts": cfg.policy_opts, "dtype": cfg.dtype,
                                  "max_new_tokens": cfg.max_new_tokens, "max_samples": cfg.max_samples,
                                  "seed": cfg.seed, "equal_memory": cfg.equal_memory, "fidelity": cfg.fidelity,
                                  "recall_every": cfg.recall_every}, default=str))


def _check_manifest(out: pathlib.Path, cfg: RunConfig, write: bool = True) -> None:
    path = out / "run_config.json"
    cur = _manifest(cfg)
    if path.exists():
        try:
            old = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            old = None
        if old is not None and old != cur:
            diff = sorted(k for k in set(old) | set(cur) if old.get(k) != cur.get(k))
            _log(f"warning: {path} was written with other settings ({', '.join(diff)}); finished records keep "
                 f"their old settings (keys are model|benchmark|sample|method|budget). Use a new --out to redo them.")
        return
    if not write:
        return
    tmp = path.with_suffix(f".json.tmp{os.getpid()}")
    tmp.write_text(json.dumps(cur, indent=1))
    os.replace(tmp, path)


def _done_marker(out: pathlib.Path, pid: int, n: int) -> pathlib.Path:
    return pathlib.Path(out) / "parts" / f"done-{pid}-of-{n}.json"


def _part_path(out: pathlib.Path, pid: int, n: int) -> pathlib.Path:
    return pathlib.Path(out) / "parts" / f"results.part-{pid}-of-{n}.jsonl"


def _log(msg: str) -> None:
    print(f"[eval] {msg}", file=sys.stderr, flush=True)


def run(cfg: RunConfig, on_record: Callable[[dict], None] | None = None) -> dict[str, Any]:
    """Run (or resume) the grid. ``on_record(record)`` is called after each record is written (tests use it to
    interrupt a run). Returns {"records": [...] (this process's store), "summary_md", "rows", "wall_s",
    "process", "processes", "computed": number of records computed now}."""
    t_start = time.perf_counter()
    out = pathlib.Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    pid, nproc = 0, 1
    if cfg.distributed:
        pid, nproc = _init_distributed(cfg)
        (out / "parts").mkdir(exist_ok=True)
        reads = [out / "results.jsonl"] + sorted(p for p in (out / "parts").glob("results.part-*.jsonl")
                                                 if p != _part_path(out, pid, nproc))
        store = ResultStore(_part_path(out, pid, nproc), read_paths=reads)
        _log(f"process {pid} of {nproc}")
    else:
        store = ResultStore(out / "results.jsonl")
    if store.records:
        _log(f"resuming: {len(store.records)} finished record(s) in {out}")
    _check_manifest(out, cfg, write=pid == 0)  # one writer in a distributed run

    import jax

    mesh = None
    if cfg.mesh or cfg.distributed:
        from kvjax.compat import make_mesh

        d, m = (int(x) for x in (cfg.mesh or "1x1").lower().split("x"))
        mesh = make_mesh(d, m, devices=jax.local_devices())
    dtype = cfg.dtype or ("float32" if jax.default_backend() == "cpu" else "bfloat16")
    specs = method_specs(cfg.methods, cfg.budgets, cfg.policy_opts)
    if cfg.equal_memory is not None:
        variants = [m for m in cfg.methods if "[" in m]
        if variants:
            raise ValueError(f"--equal-memory plans each method's own config; variants {variants} are not supported "
                             f"there (use --policy-opt METHOD.KEY=VALUE)")
        specs = [s for s in specs if s.method == "full"] + [
            MethodSpec(m, f"eq{cfg.equal_memory:g}B/tok", None, None) for m in cfg.methods if m != "full"]
    need_ref = cfg.fidelity or any(s.method == "full" for s in specs)
    if need_ref and not any(s.method == "full" for s in specs):
        from kvjax.policies import make_policy

        specs = [MethodSpec("full", "-", None, make_policy("full", **cfg.policy_opts.get("full", {})))] + specs
    specs.sort(key=lambda sp: sp.method != "full")  # full first: it is the reference of the others
    counter = [0]
    status = "failed"
    try:
        _run_models(cfg, store, specs, mesh, dtype, pid, nproc, on_record, counter)
        status = "ok"
    finally:
        store.close()
        if cfg.distributed:  # always leave a marker, so process 0 never waits for a process that died
            _done_marker(out, pid, nproc).write_text(json.dumps(
                {"process": pid, "status": status, "records": len(store.records), "computed": counter[0]}))
    computed = counter[0]

    result: dict[str, Any] = {"process": pid, "processes": nproc, "computed": computed,
                              "records": list(store.records.values())}
    if cfg.distributed:
        if pid != 0:
            result["wall_s"] = time.perf_counter() - t_start
            return result
        deadline = time.monotonic() + cfg.merge_timeout
        while True:
            missing = [i for i in range(nproc) if not _done_marker(out, i, nproc).exists()]
            if not missing or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        failed = []
        for i in range(nproc):
            try:
                if json.loads(_done_marker(out, i, nproc).read_text()).get("status") != "ok":
                    failed.append(i)
            except (OSError, json.JSONDecodeError):
                pass
        parts = sorted((out / "parts").glob("results.part-*.jsonl"))  # older runs' parts (other n) included
        n = merge_parts(out, parts)
        if missing or failed:
            _log(f"processes {missing} did not finish within --merge-timeout={cfg.merge_timeout:g} s, processes "
                 f"{failed} failed; merged what exists ({n} records); the parts stay in {out / 'parts'} and a "
                 f"re-run resumes them")
            result["missing"] = missing + failed
        else:
            for p in parts:
                p.unlink(missing_ok=True)
            for i in range(nproc):
                _done_marker(out, i, nproc).unlink(missing_ok=True)
        result["records"] = summary_mod.load_records(out / "results.jsonl")
    md, rows = summary_mod.write_summary(summary_mod.load_records(out / "results.jsonl"), out, plots=cfg.plots)
    result.update(summary_md=md, rows=rows, wall_s=time.perf_counter() - t_start)
    return result


def _run_models(cfg: RunConfig, store: ResultStore, specs: list, mesh, dtype: str, pid: int, nproc: int,
                on_record, counter: list) -> None:
    """The grid loop of :func:`run` over this process's samples of every model; counter[0] counts new records."""
    from tqdm import tqdm

    from kvjax.engine import Engine
    from models import load_model

    from . import fidelity as fid

    for model in cfg.models:
        lm = load_model(model, dtype=dtype, mesh=mesh)
        tok = lm.tokenizer or ByteTokenizer(lm.config.vocab_size, lm.config.eos_token_ids)
        stop_ids = tuple(tok.stop_ids()) if hasattr(tok, "stop_ids") else tuple(lm.config.eos_token_ids)
        base = Engine(lm, policy="full", mesh=mesh)
        engines = {}

        def engine_for(policy):  # one engine (shared prefill cache) and one jitted decoder per policy
            if policy not in engines:
                eng = base.with_policy(policy)
                engines[policy] = (eng, fid.Decoder(eng))
            return engines[policy]

        units, sources = [], {}
        for bench, opts in cfg.benchmarks.items():
            built, rep = build_samples(bench, opts, tok, lm.config.max_position_embeddings, cfg)
            _log(f"{model}: {rep['summary']}; data: {describe_source(rep['source'])}")
            units += [(bench, s, mn) for s, mn in built]
            sources[bench] = rep["source"]
        mine = units[pid::nproc]

        def pending_specs(bench, s):
            todo = []
            for sp in specs:
                k = record_key(model, bench, s.id, sp.method, sp.budget)
                r = store.get(k)
                if r is None or (cfg.retry_errors and r.get("error")):
                    todo.append(sp)
            return todo

        total = sum(len(pending_specs(b, s)) for b, s, _ in mine)
        bar = tqdm(total=total, desc=f"{model}", unit="run", disable=not cfg.progress, file=sys.stderr,
                   dynamic_ncols=True)
        for bench, sample, max_new in mine:
            todo = pending_specs(bench, sample)
            if not todo:
                continue
            bobj = get_benchmark(sample.benchmark)
            ids = tok.encode(tok.apply_chat_template(sample.user_text) + sample.answer_prefix)
            common = {"model": model, "benchmark": bench, "sample_id": sample.id, "prompt_tokens": len(ids),
                      "max_new_tokens": max_new, "dtype": dtype, "process": pid, "data_source": sources[bench]}

            def emit(rec: dict) -> None:
                rec = {"key": record_key(model, bench, sample.id, rec["method"], rec["budget"]), **common, **rec,
                       "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S")}
                if rec["key"] in store:
                    store.replace(rec)
                else:
                    store.add(rec)
                counter[0] += 1
                bar.update(1)
                if on_record is not None:
                    on_record(rec)

            # equal-memory budgets depend on the prompt length: resolve them for this sample
            sample_specs = todo
            if cfg.equal_memory is not None:
                sample_specs = _equal_memory_specs(todo, lm.config, len(ids), max_new, cfg, dtype, emit)

            needs_q = [sp for sp in sample_specs if sp.policy is not None and getattr(sp.policy, "needs_queries", False)]
            try:
                pre_engine = engine_for(needs_q[0].policy)[0] if needs_q else base
                pre = fid.prefill(pre_engine, ids, max_new)
            except Exception as e:  # a prompt the model cannot take: one error record per pending key
                msg = f"{type(e).__name__}: {e}"
                _log(f"{sample.id}: prefill failed: {msg}")
                for sp in sample_specs:
                    emit({"method": sp.method, "budget": sp.budget, "error": msg})
                continue

            reference = None
            full_key = record_key(model, bench, sample.id, "full", "-")
            for sp in sample_specs:
                if sp.policy is None:
                    continue
                bar.set_postfix_str(f"{sample.id} {sp.method} {sp.budget}", refresh=True)
                try:
                    eng, dec = engine_for(sp.policy)
                    if sp.method == "full":
                        run_ = fid.run_method(eng, pre, max_new, stop_ids, keep_logits=True, decoder=dec)
                        reference = (run_.sampled, run_.logits)
                        fidelity = {"reference": True, "n_steps": len(run_.sampled) - 1, "kl_mean": 0.0,
                                    "kl_max": 0.0, "top1_agreement": 1.0, "first_divergence": None,
                                    "recall_mean": 1.0, "recall_per_layer": None, "recall_layer_head": None,
                                    "recall_steps": 0}
                    else:
                        if cfg.fidelity and reference is None:
                            full_rec = store.get(full_key)
                            if full_rec is None or full_rec.get("error") or not full_rec.get("full_tokens"):
                                raise RuntimeError("full attention's reference for this sample failed or is missing")
                            toks = full_rec["full_tokens"]
                            feng, _ = engine_for(next(s.policy for s in specs if s.method == "full"))
                            reference = (toks, fid.teacher_force(feng, pre, toks, max_new))
                        run_ = fid.run_method(eng, pre, max_new, stop_ids,
                                              reference=reference if cfg.fidelity else None,
                                              recall_every=cfg.recall_every, decoder=dec)
                        fidelity = run_.fidelity
                    text = tok.decode(run_.ids, skip_special_tokens=True)
                    rec = {"method": sp.method, "budget": sp.budget, "budget_value": sp.budget_value,
                           "budget_fraction": _budget_fraction(sp, len(ids)), "config": _config_dict(sp.policy),
                           "prediction": text, "n_generated": len(run_.ids), "stop_reason": run_.stop_reason,
                           "score": bobj.score(sample, text), "fidelity": fidelity,
                           **_memory_fields(run_.memory),
                           "seconds": pre.prefill_s + run_.build_s + run_.decode_s, "prefill_s": pre.prefill_s,
                           "build_s": run_.build_s, "decode_s": run_.decode_s, "fidelity_s": run_.fidelity_s}
                    if sp.method == "full":
                        rec["full_tokens"] = list(map(int, run_.sampled))
                except KeyboardInterrupt:
                    raise
                except Exception as e:
                    msg = f"{type(e).__name__}: {e}"
                    _log(f"{sample.id} {sp.method} {sp.budget} failed: {msg}\n{traceback.format_exc(limit=3)}")
                    rec = {"method": sp.method, "budget": sp.budget, "budget_value": sp.budget_value, "error": msg}
                emit(rec)  # outside the try: a failing on_record callback interrupts the run
            del pre
        bar.close()


def _equal_memory_specs(todo: Sequence[MethodSpec], mcfg, prompt_len: int, max_new: int, cfg: RunConfig,
                        dtype: str, emit) -> list[MethodSpec]:
    """Configured policies with equal device bytes per prompt token (kvjax.budgets) for this prompt length;
    methods that cannot meet the allowance get an error record."""
    import jax.numpy as jnp
    from kvjax import budgets as budgets_mod
    from kvjax.policies import make_policy

    out = []
    for sp in todo:
        if sp.method == "full":
            out.append(sp)
            continue
        try:
            knob = _knob(sp.method)
            pol = make_policy(sp.method, **cfg.policy_opts.get(sp.method, {}))
            plan = budgets_mod.equal_memory_budgets(mcfg, [pol], prompt_len, bytes_per_token=cfg.equal_memory,
                                                    max_new=max_new, dtype=jnp.dtype(dtype),
                                                    knobs={pol.name: knob})
            chosen = plan.policies[pol.name]
            val = plan.knobs[pol.name][1]
            out.append(MethodSpec(sp.method, sp.budget, val, chosen))
        except Exception as e:
            emit({"method": sp.method, "budget": sp.budget, "error": f"equal-memory budget: {type(e).__name__}: {e}"})
    return out


# ------------------------------------------------------------------------------------------------------ CLI
def add_args(p: argparse.ArgumentParser) -> None:
    """Flags of ``kvjax eval`` (every one optional: no flags = the default CPU run, preset "default")."""
    p.add_argument("--preset", default="default", choices=sorted(PRESETS),
                   help="starting point for models/methods/budgets/benchmarks (default: %(default)s: smollm2-135m, "
                        "full/yakv/shadowkv on kvjax's default suite, which runs offline: synthetic Text2JSON, "
                        "MultiNeedle 2.5k (NeedleBench essays when found, else a generated haystack), LongProc "
                        "(2 pages, when found) and RULER-style tasks at 2k tokens; see `kvjax data list`; "
                        "larger: 20 Text2JSON at 4k-7k + 10 MultiNeedle at 7.6k tokens, budgets 1/64..1/8, ~80 min "
                        "on CPU; paper: the authors' benchmarks, needs a 128k-context checkpoint; toy: tokenizer-free "
                        "smoke test)")
    p.add_argument("--models", default=None, help="comma list: registry names, HF dirs, .gguf files or orbax dirs")
    p.add_argument("--dtype", default=None, choices=["bfloat16", "float32"],
                   help="default: float32 on CPU, bfloat16 elsewhere")
    p.add_argument("--mesh", default=None, metavar="DATAxMODEL", help="shard each model over local devices")
    p.add_argument("--methods", default=None,
                   help="comma list, e.g. full,yakv,shadowkv (full is the reference); a variant carries config "
                        "overrides in brackets and is reported under that label, e.g. 'yakv[store_format=none]'")
    p.add_argument("--budgets", default=None,
                   help="comma list: 'default' (paper: yakv 1/32, shadowkv 1/64), fractions of the prompt "
                        "(1/64, 0.03125) or token counts (2048); sets each method's budget knob")
    p.add_argument("--equal-memory", type=float, default=None, metavar="BYTES_PER_TOKEN",
                   help="instead of --budgets: give every method the same device bytes per prompt token "
                        "(kvjax.budgets), resolved per sample")
    p.add_argument("--benchmarks", default=None,
                   help="comma list of registered benchmarks (text2json, text2json_synth, multineedle, longproc, "
                        "toy_retrieval); options from the preset when it has the benchmark")
    p.add_argument("--bench-opt", action="append", default=[], metavar="BENCH.KEY=VALUE",
                   help="benchmark option, e.g. multineedle.context_length=4000, text2json_synth.answer_prefix=table, "
                        "multineedle.max_new_tokens=64 (repeatable)")
    p.add_argument("--policy-opt", action="append", default=[], metavar="METHOD.KEY=VALUE",
                   help="policy config override, e.g. shadowkv.outlier_budget=0 (repeatable)")
    p.add_argument("--max-samples", type=int, default=None, help="at most N samples per benchmark")
    p.add_argument("--max-new-tokens", type=int, default=None, help="cap on generated tokens for every benchmark")
    p.add_argument("--seed", type=int, default=0, help="seed of the synthetic benchmarks (default: %(default)s)")
    p.add_argument("--out", default=None, help="output directory (default: runs/<preset>)")
    p.add_argument("--recall-every", type=int, default=None,
                   help="measure attention recall every N teacher-forced steps (0 = never; preset default)")
    p.add_argument("--no-fidelity", action="store_true", help="skip teacher forcing (task scores only)")
    p.add_argument("--retry-errors", action="store_true", help="recompute records that failed before")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--no-plots", action="store_true", help="no PNG plots")
    p.add_argument("--data-dir", default=None,
                   help="benchmark data root holding needlebench/, longproc/, text2json.jsonl (default: $KVJAX_DATA, "
                        "else kvjax's cache; see `kvjax data list`)")
    p.add_argument("--distributed", action="store_true", help="several processes split the samples (jax.distributed)")
    p.add_argument("--coordinator", default=None, help="host:port of process 0 (or $KVJAX_COORDINATOR)")
    p.add_argument("--num-processes", type=int, default=None, help="(or $KVJAX_NUM_PROCESSES)")
    p.add_argument("--process-id", type=int, default=None, help="(or $KVJAX_PROCESS_ID)")
    p.add_argument("--merge-timeout", type=float, default=3600.0,
                   help="seconds process 0 waits for the others' done markers (default: %(default)s)")


def _csv(s: str | None) -> list[str] | None:
    return [x.strip() for x in s.split(",") if x.strip()] if s else None


def config_from_args(args: argparse.Namespace) -> RunConfig:
    preset_name = getattr(args, "preset", "default") or "default"
    preset = PRESETS[preset_name]
    benches = _csv(args.benchmarks)
    if not benches:  # the default preset runs kvjax's default suite: real data where found, else generated
        benches = list(suite.default_benchmarks(args.data_dir) if preset_name == "default" else preset["benchmarks"])
    bench_cfg = {b: copy.deepcopy(preset["benchmarks"].get(b, {})) for b in benches}
    for name, kv in _dotted_opts(args.bench_opt, "bench").items():
        if name not in bench_cfg:
            raise ValueError(f"--bench-opt for {name!r}, which is not among the benchmarks {sorted(bench_cfg)}")
        bench_cfg[name].update(kv)
    budgets = [parse_budget(b) for b in (_csv(args.budgets) or preset["budgets"])]
    if args.max_samples is not None and args.max_samples < 1:
        raise ValueError(f"--max-samples={args.max_samples}, allowed: int >= 1")
    if args.max_new_tokens is not None and args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens={args.max_new_tokens}, allowed: int >= 1 tokens")
    if args.equal_memory is not None and not args.equal_memory > 0:
        raise ValueError(f"--equal-memory={args.equal_memory}, allowed: > 0 bytes per prompt token")
    recall_every = args.recall_every if args.recall_every is not None else preset.get("recall_every", 1)
    if recall_every < 0:
        raise ValueError(f"--recall-every={recall_every}, allowed: int >= 0 steps")
    return RunConfig(
        out=pathlib.Path(args.out or f"runs/{getattr(args, 'preset', 'default') or 'default'}"),
        models=_csv(args.models) or list(preset["models"]),
        methods=_csv(args.methods) or list(preset["methods"]),
        budgets=budgets, benchmarks=bench_cfg, policy_opts=_dotted_opts(args.policy_opt, "policy"),
        dtype=args.dtype, mesh=args.mesh, equal_memory=args.equal_memory, max_samples=args.max_samples,
        max_new_tokens=args.max_new_tokens, seed=args.seed, recall_every=recall_every,
        fidelity=not args.no_fidelity, retry_errors=args.retry_errors, progress=not args.no_progress,
        plots=not args.no_plots, distributed=args.distributed, coordinator=args.coordinator,
        num_processes=args.num_processes, process_id=args.process_id, merge_timeout=args.merge_timeout,
        data_dir=args.data_dir)


def main(args: argparse.Namespace) -> int:
    try:
        cfg = config_from_args(args)
    except (ValueError, DataNotFoundError) as e:  # DataNotFoundError: --data-dir / $KVJAX_DATA names no folder
        raise SystemExit(f"kvjax eval: {e}") from None
    t0 = time.perf_counter()
    res = run(cfg)
    wall = time.perf_counter() - t0
    if "summary_md" in res:
        print(res["summary_md"])
        print(f"wall time {wall:.0f} s ({wall / 60:.1f} min); computed {res['computed']} record(s); "
              f"results in {cfg.out}/results.jsonl, summary in {cfg.out}/summary.md")
    else:
        print(f"process {res['process']} of {res['processes']}: computed {res['computed']} record(s) in {wall:.0f} s")
    return 1 if res.get("missing") else 0


def cli(argv: Sequence[str] | None = None) -> int:
    """``python -m eval.runner [flags]`` (same flags as ``kvjax eval``)."""
    p = argparse.ArgumentParser(prog="python -m eval.runner", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_args(p)
    return main(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(cli())
