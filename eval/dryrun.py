"""``kvjax eval --dry-run``: the whole grid of a run and the memory each configuration needs, before any weight is
loaded or anything runs.

Per model it reads only the config and the tokenizer (:func:`models.registry.inspect_model`: a HF checkpoint dir
with ``config.json`` and ``tokenizer.json`` is enough), builds every benchmark's samples exactly as the run would
(:func:`eval.runner.build_samples`: chat template, length limits, skipped samples) and reports the sample counts
and the prompt-length distribution (tokens after the chat template, answer prefix included). A benchmark whose
data is missing is reported with eval.data's message, and its configurations are estimated at the longest prompt
the run would accept.

Memory, per (model, method, budget, benchmark), at the benchmark's longest prompt and its ``max_new_tokens``:

* ``"compiled"``: :func:`kvjax.memory.stage_memory`, XLA's memory analysis of the compiled prefill and of one
  decode step on abstract inputs (compile only). Device = weights + the larger of the two stages' peaks; host =
  the host-memory buffers (the offloaded store). One estimate per distinct (model, method, budget, prompt bucket,
  generation bucket), shared by the benchmarks that fall in the same buckets.
* ``"state"``: :func:`kvjax.memory.state_memory`, weights + the policy state's bytes per memory kind from
  ``jax.eval_shape`` (traced only). No activations or temporaries: a lower bound of the device peak.

The estimate is for batch 1 in the run's dtype (bfloat16 unless ``--dtype``: a dry run on a CPU plans an
accelerator run). With ``device_gib`` a configuration whose device bytes exceed it is flagged.
"""
from __future__ import annotations

import dataclasses
import statistics
from typing import Any

import numpy as np

from kvjax.options import UsageError

from .data import DataNotFoundError, describe
from .grid import MethodSpec, families_of, runs_on
from .runner import RunConfig, build_samples, grid_specs
from .store import log

MEMORY_MODES = ("compiled", "state")
GIB = 2 ** 30


@dataclasses.dataclass
class BenchPlan:
    """One benchmark for one model: kept samples, skipped ones (over a length limit), prompt lengths in tokens
    (after the chat template), the generation cap, where the data comes from, or why there are no samples."""

    name: str
    n_samples: int = 0
    n_skipped: int = 0
    lengths: list[int] = dataclasses.field(default_factory=list)
    max_new: int | None = None
    max_prompt: int | None = None
    source: str = ""
    missing: str | None = None


@dataclasses.dataclass
class ConfigPlan:
    """One (method, budget, benchmark) of a model: the prompt length it was estimated at (``at_limit``: the
    longest prompt the run accepts, the data being missing), device / host / weights bytes, whether it fits."""

    method: str
    budget: str
    benchmark: str
    prompt_tokens: int
    max_new: int
    device_bytes: int | None = None
    host_bytes: int | None = None
    weights_bytes: int | None = None
    at_limit: bool = False
    fits: bool | None = None
    error: str | None = None


@dataclasses.dataclass
class ModelPlan:
    name: str
    kind: str
    path: str
    family: str
    n_params: int
    context: int
    tokenizer: str
    benches: list[BenchPlan]
    configs: list[ConfigPlan]
    not_run: list[tuple[str, list[str]]]
    n_specs: int


@dataclasses.dataclass
class Plan:
    dtype: str
    memory: str
    device_gib: float | None
    specs: list[str]
    models: list[ModelPlan]

    @property
    def flagged(self) -> list[tuple[str, ConfigPlan]]:
        return [(m.name, c) for m in self.models for c in m.configs if c.fits is False]

    @property
    def n_records(self) -> int:
        """Records the run would write: samples x the configurations that run on each model."""
        return sum(b.n_samples * m.n_specs for m in self.models for b in m.benches)


def _bench_plan(name: str, opts: dict, tok, ctx: int, cfg: RunConfig) -> tuple[BenchPlan, list]:
    from models.tokenizer import ChatTemplateError

    from . import data
    from .benchmarks import dataset_of

    bp = BenchPlan(name)
    cap = opts.get("max_new_tokens", cfg.max_new_tokens)
    if cfg.max_new_tokens is not None and cap is not None:
        cap = min(cap, cfg.max_new_tokens)
    bp.max_new = cap
    limit = ctx - (cap or 1)
    bp.max_prompt = min(opts["max_prompt_tokens"], limit) if opts.get("max_prompt_tokens") else limit
    ds = dataset_of(name)
    try:
        if ds is not None and not (opts.get("path") or opts.get("hub_name")) and data.find(ds, cfg.data_dir) is None:
            data.locate(ds, cfg.data_dir, download_missing=False)  # raises eval.data's error: a dry run never downloads
        built, rep = build_samples(name, opts, tok, ctx, cfg)
    except DataNotFoundError as e:
        bp.missing = f"data missing: {e}"
        return bp, []
    except (ChatTemplateError, TypeError, ValueError, FileNotFoundError, RuntimeError) as e:
        bp.missing = f"cannot build: {type(e).__name__}: {e}"
        return bp, []
    bp.n_samples = len(built)
    bp.n_skipped = len(rep["too_long"])
    bp.source = describe(rep["source"])
    for s, mn in built:
        n = rep["prompt_tokens"][s.id] + (len(tok.encode(s.answer_prefix)) if s.answer_prefix else 0)
        bp.lengths.append(int(n))
    if built:
        bp.max_new = max(mn for _, mn in built)
    return bp, built


def _estimate(mcfg, spec: MethodSpec, T: int, max_new: int, dtype: str, memory: str, cache: dict) -> tuple:
    """(device bytes incl. weights, host bytes, weights bytes), cached per (method, budget, buckets)."""
    from kvjax.engine import generation_bucket
    from kvjax.memory import stage_memory, state_memory
    from kvjax.policies.base import bucket_size

    key = (spec.method, spec.budget, bucket_size(T, 128), generation_bucket(max_new))
    if key not in cache:
        if memory == "compiled":
            res = stage_memory(mcfg, spec.policy, T, 1, dtype, max_new)
            w = res["decode"].weights_bytes
            cache[key] = (w + max(r.peak_device_bytes for r in res.values()), max(r.host_bytes for r in res.values()),
                          w)
        else:
            res = state_memory(mcfg, spec.policy, T, 1, dtype, max_new)
            cache[key] = (res["weights_bytes"] + res["device_bytes"], res["host_bytes"], res["weights_bytes"])
    return cache[key]


def plan(cfg: RunConfig, device_gib: float | None = None, memory: str = "compiled") -> Plan:
    """The dry run of ``cfg`` (see the module docstring). Raises :class:`UsageError` for a model whose config or
    tokenizer cannot be read."""
    from kvjax.engine import generation_bucket
    from models.registry import inspect_model
    from models.tokenizer import ByteTokenizer
    from models.weights import WeightError

    if memory not in MEMORY_MODES:
        raise UsageError(f"--dry-run-memory {memory!r}; allowed: {', '.join(MEMORY_MODES)}")
    dtype = cfg.dtype or "bfloat16"
    specs = grid_specs(cfg)
    out = Plan(dtype, memory, device_gib, [_label(s) for s in specs], [])
    for model in cfg.models:
        try:
            meta = inspect_model(model)
        except (FileNotFoundError, WeightError, ValueError) as e:
            raise UsageError(f"--models {model!r}: {e}") from None
        mcfg = meta.config
        tok = meta.tokenizer or ByteTokenizer(mcfg.vocab_size, mcfg.eos_token_ids)
        ctx = mcfg.max_position_embeddings
        mine = [sp for sp in specs if runs_on(sp.method, mcfg.family, cfg.method_families)]
        not_run = [(sp.method, families_of(sp.method, cfg.method_families)) for sp in specs if sp not in mine]
        benches, configs, cache = [], [], {}
        for name, opts in cfg.benchmarks.items():
            bp, built = _bench_plan(name, opts, tok, ctx, cfg)
            benches.append(bp)
            log(f"dry run {model}: {name}: " + (bp.missing or f"{bp.n_samples} samples"))
            at_limit = not bp.lengths
            T = max(bp.lengths) if bp.lengths else bp.max_prompt
            max_new = bp.max_new or 1
            for sp in mine:
                c = ConfigPlan(sp.method, sp.budget, name, T, max_new, at_limit=at_limit)
                configs.append(c)
                if sp.policy is None:
                    c.error = "equal-memory budget: planned per sample at run time"
                    continue
                try:
                    sp.policy.validate(mcfg, np.array([T], np.int32), generation_bucket(max_new))
                except ValueError as e:
                    c.error = f"cannot run: {e}"
                    continue
                log(f"dry run {model}: {memory} memory of {sp.method} {sp.budget} at {T} prompt tokens, "
                    f"{max_new} new")
                c.device_bytes, c.host_bytes, c.weights_bytes = _estimate(mcfg, sp, T, max_new, dtype, memory,
                                                                          cache)
                if device_gib is not None:
                    c.fits = c.device_bytes <= device_gib * GIB
        tname = "the checkpoint's" if meta.tokenizer is not None else "none (byte stand-in: lengths are UTF-8 bytes)"
        out.models.append(ModelPlan(model, meta.kind, meta.path, mcfg.family, mcfg.num_params(), ctx, tname,
                                    benches, configs, not_run, len(mine)))
    return out


def _label(sp: MethodSpec) -> str:
    return sp.method if sp.budget == "-" else f"{sp.method} {sp.budget}"


def _gib(b: int | None) -> str:
    return "–" if b is None else f"{b / GIB:.2f}"


def _table(head: list[str], rows: list[list[Any]]) -> list[str]:
    return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)] + [
        "| " + " | ".join(str(c) for c in r) + " |" for r in rows]


def render(p: Plan) -> str:
    """The dry run as text: the grid line, how memory was estimated, then per model its benchmarks (samples,
    skipped, prompt tokens min / median / max, data) and its configurations (device / host GiB, fits)."""
    n_bench = len({b.name for m in p.models for b in m.benches})
    n_cfg = sum(len(m.configs) for m in p.models)
    how = {"compiled": "XLA's memory analysis of the compiled prefill and one decode step (kvjax.memory.stage_memory, "
                       "compile only, nothing allocated); device = weights + the larger stage peak, host = the "
                       "host-memory buffers",
           "state": "weights + the policy state's bytes from jax.eval_shape (kvjax.memory.state_memory, traced "
                    "only); no activations or temporaries, so device is a lower bound"}[p.memory]
    lines = [f"kvjax eval --dry-run: {len(p.models)} model(s) x {n_bench} benchmark(s) x {len(p.specs)} method/budget "
             f"configuration(s) ({', '.join(p.specs)}) = {n_cfg} configurations; {p.n_records} records "
             f"(samples x configurations); dtype {p.dtype}, batch 1",
             f"memory estimate: {p.memory}: {how}; once per model x method x budget x benchmark, at the "
             f"benchmark's longest prompt (padded to the next power of two, as the engine does) and its max new "
             f"tokens; benchmarks in the same buckets share one estimate",
             (f"device budget: {p.device_gib:g} GiB per device; configurations above it are flagged"
              if p.device_gib is not None else
              "device budget: none given (--device-gib G flags configurations above G GiB, e.g. 80 for an "
              "A100-80G / H100, 16 for a TPU v5e chip)")]
    for m in p.models:
        lines += ["", f"## {m.name} ({m.kind}: {m.path}; {m.family}, {m.n_params / 1e9:.2f} B parameters, context "
                      f"{m.context} tokens; tokenizer: {m.tokenizer})", ""]
        rows = []
        for b in m.benches:
            if b.missing:
                rows.append([b.name, "–", "–", "–", b.max_new, b.missing])
                continue
            ls = sorted(b.lengths)
            dist = f"{ls[0]} / {statistics.median(ls):g} / {ls[-1]}" if ls else "–"
            rows.append([b.name, b.n_samples, b.n_skipped, dist, b.max_new, b.source])
        lines += _table(["benchmark", "samples", "skipped", "prompt tokens min / median / max", "max new tokens",
                         "data"], rows)
        lines.append("")
        fit_head = f"fits {p.device_gib:g} GiB" if p.device_gib is not None else "fits"
        rows = []
        for c in m.configs:
            T = f"{c.prompt_tokens} (limit: no data)" if c.at_limit else str(c.prompt_tokens)
            fit = {True: "yes", False: "**NO**", None: "–"}[c.fits]
            rows.append([c.method, c.budget, c.benchmark, T, c.max_new, _gib(c.device_bytes), _gib(c.host_bytes),
                         _gib(c.weights_bytes), c.error or fit])
        lines += _table(["method", "budget", "benchmark", "prompt tokens", "max new", "device GiB", "host GiB",
                         "of which weights GiB", fit_head], rows)
        for method, fams in m.not_run:
            lines.append(f"not run on this model: {method} (runs on {', '.join(fams)} models only)")
    flagged = p.flagged
    if p.device_gib is not None:
        lines += ["", f"flagged: {len(flagged)} configuration(s) need more than {p.device_gib:g} GiB of device memory"
                  + (":" if flagged else "")]
        lines += [f"- {name}: {c.method} {c.budget} on {c.benchmark} ({c.prompt_tokens} prompt tokens): "
                  f"{_gib(c.device_bytes)} GiB" for name, c in flagged]
    return "\n".join(lines) + "\n"


__all__ = ["BenchPlan", "ConfigPlan", "MEMORY_MODES", "ModelPlan", "Plan", "plan", "render"]
