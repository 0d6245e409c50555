"""The run loop of ``kvjax eval``: the grid models × methods × benchmarks × budgets, resumable, optionally multi-host.

What a run does, per model and sample (batch size 1, as the authors' harness):

1. The sample's user text goes through the model's chat template (one user message, generation prompt), then the
   sample's answer prefix is appended; the ids are prefilled **once**, exactly (shared by every method).
2. ``full`` decodes greedily (stop on EOS / end-of-turn ids, at most ``max_new_tokens`` tokens); its record caches
   its sampled tokens, so a resumed run rebuilds the reference logits instead of regenerating.
3. Every other (method, budget) decodes greedily on the same prefill, teacher-forced on full's tokens for the
   fidelity metrics and free-running for the task score (eval/fidelity.py).
4. One JSON record per (model, benchmark, sample, method, budget) is appended to ``<out>/results.jsonl`` and
   flushed (fsync) as soon as it is finished. Re-running with the same ``--out`` skips finished keys, so a killed
   run loses at most the record in flight; unreadable (half-written) lines are dropped on load. One run at a time
   holds ``<out>`` (``eval.lock``, :class:`eval.store.OutputLock`): a second one refuses naming the holder's PID and
   host, or waits (``--wait``); the lock of a killed run is taken over. A folder that cannot be written shows the
   summary of its finished records and computes nothing.
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

import dataclasses
import errno
import json
import os
import pathlib
import sys
import time
import traceback
from typing import Any, Callable, Mapping

from eval.benchmarks import Sample, dataset_of, get_benchmark
from eval.data import describe as describe_source
from kvjax.options import UsageError, parse_mesh

from . import summary as summary_mod
from .grid import MethodSpec, budget_fraction, equal_memory_specs, method_specs, runs_on
from .presets import RUNNER_KEYS, TABLE_PREFIX
from .store import (OutputLock, ResultStore, check_manifest, done_marker, load_records, lock_path, log, merge_parts,
                    part_path, record_key)


@dataclasses.dataclass
class RunConfig:
    """Everything a run needs (built from the command line by :func:`eval.cli.config_from_args`)."""

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
    wait: bool = False
    method_budgets: dict[str, list[tuple[str, float | int | None]]] = dataclasses.field(default_factory=dict)
    method_families: dict[str, list[str]] = dataclasses.field(default_factory=dict)


def _table_prefix(sample: Sample) -> str:
    keys = sample.meta.get("keys")
    if not keys or len(keys) != 2:
        raise ValueError(f"answer_prefix='{TABLE_PREFIX}' needs a Text2JSON sample with meta['keys'] (two attribute "
                         f"names); sample {sample.id!r} has {keys!r}")
    return f"| name | {keys[0]} | {keys[1]} |\n|---|---|---|\n|"


def build_samples(bench: str, opts: Mapping[str, Any], tok, ctx: int, cfg: RunConfig) -> tuple[list, dict]:
    """Samples of one benchmark for one model: [(sample, max_new_tokens)], and the load report as a dict
    (summary, too_long ids, malformed count, data source, prompt_tokens: {id: tokens after the chat template,
    answer prefix not included})."""
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
    samples, report = load(bench, count_tokens=count, max_prompt_tokens=max_prompt, max_samples=cfg.max_samples,
                           **params)
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
                 "source": report.source, "prompt_tokens": report.prompt_tokens}


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


def _init_distributed(cfg: RunConfig, locks: list[OutputLock]) -> tuple[int, int]:
    """``jax.distributed.initialize`` from the flags / environment; takes this process's part lock (before the
    start barrier when the ids are known from the flags, else right after) and, on process 0, the folder's lock
    (appended to ``locks``). Returns (process index, process count)."""
    import jax

    out = pathlib.Path(cfg.out)
    coord = cfg.coordinator or os.environ.get("KVJAX_COORDINATOR")
    nproc = cfg.num_processes or (int(os.environ["KVJAX_NUM_PROCESSES"]) if os.environ.get("KVJAX_NUM_PROCESSES")
                                  else None)
    pid = cfg.process_id if cfg.process_id is not None else (
        int(os.environ["KVJAX_PROCESS_ID"]) if os.environ.get("KVJAX_PROCESS_ID") else None)
    if nproc is not None and (pid is None or not 0 <= pid < nproc):
        raise UsageError(f"--process-id={pid!r} with --num-processes={nproc}: allowed 0 <= id < num_processes")

    def lock_part(i: int, n: int) -> None:
        locks.append(_acquire(OutputLock(lock_path(out, (i, n)), f"--out {out} (process {i} of {n})", cfg.wait)))

    if pid is not None and nproc is not None:
        lock_part(pid, nproc)
        done_marker(out, pid, nproc).unlink(missing_ok=True)  # my stale marker, before the start barrier
    kw = {}
    if coord:
        kw["coordinator_address"] = coord
    if nproc is not None:
        kw["num_processes"] = nproc
    if pid is not None:
        kw["process_id"] = pid
    jax.distributed.initialize(**kw)
    pid, nproc = jax.process_index(), jax.process_count()
    if not locks:
        lock_part(pid, nproc)
    if pid == 0:  # process 0 merges into results.jsonl and writes the summary: it holds the folder too
        locks.append(_acquire(OutputLock(lock_path(out), f"--out {out}", cfg.wait)))
    return pid, nproc


def _acquire(lock: OutputLock) -> OutputLock:
    try:
        return lock.acquire()
    except OSError as e:
        raise UsageError(f"{lock.what}: cannot write there ({e.strerror or e}); give a writable --out") from None


def manifest(cfg: RunConfig) -> dict:
    """What determines the records' content beyond their keys (benchmark options, generation caps, policy options,
    dtype, seed): stored as run_config.json so a resume with other settings is flagged."""
    return {"benchmarks": cfg.benchmarks, "policy_opts": cfg.policy_opts, "dtype": cfg.dtype,
            "max_new_tokens": cfg.max_new_tokens, "max_samples": cfg.max_samples, "seed": cfg.seed,
            "equal_memory": cfg.equal_memory, "fidelity": cfg.fidelity, "recall_every": cfg.recall_every}


def run(cfg: RunConfig, on_record: Callable[[dict], None] | None = None) -> dict[str, Any]:
    """Run (or resume) the grid. ``on_record(record)`` is called after each record is written (tests use it to
    interrupt a run). Returns {"records": [...] (this process's store), "summary_md", "rows", "wall_s",
    "process", "processes", "computed": number of records computed now}.

    The output folder is locked for the whole run (:class:`eval.store.OutputLock`; per process part under
    ``--distributed``): a second run on it raises :class:`eval.store.OutputLocked` naming the holder, or waits with
    ``cfg.wait``. A folder that cannot be written is not an error when it holds finished records: their summary is
    returned (``"read_only"``: the reason), nothing is computed or written."""
    t_start = time.perf_counter()
    out = pathlib.Path(cfg.out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UsageError(f"--out {out}: cannot create it ({e.strerror or e})") from None
    locks: list[OutputLock] = []
    try:
        if cfg.distributed:
            pid, nproc = _init_distributed(cfg, locks)
        else:
            pid, nproc = 0, 1
            try:
                locks.append(OutputLock(lock_path(out), f"--out {out}", cfg.wait).acquire())
            except OSError as e:
                if e.errno not in (errno.EACCES, errno.EPERM, errno.EROFS):
                    raise
                return _read_only_summary(out, e, t_start)
        return _run_locked(cfg, out, pid, nproc, on_record, t_start)
    finally:
        for lock in reversed(locks):
            lock.release()


def _read_only_summary(out: pathlib.Path, err: OSError, t_start: float) -> dict[str, Any]:
    recs = load_records(out / "results.jsonl")
    if not recs:
        raise UsageError(f"--out {out}: not writable ({err.strerror or err}) and it holds no finished records; give "
                         f"a writable --out")
    md, rows, _ = summary_mod.render(recs)
    return {"process": 0, "processes": 1, "computed": 0, "records": recs, "summary_md": md, "rows": rows,
            "read_only": err.strerror or str(err), "wall_s": time.perf_counter() - t_start}


def grid_specs(cfg: RunConfig) -> list[MethodSpec]:
    """The (method, budget) cells of a run, full attention first (added as the reference when fidelity is on);
    under ``--equal-memory`` the other methods' cells carry no policy yet (planned per sample)."""
    specs = method_specs(cfg.methods, cfg.budgets, cfg.policy_opts, cfg.method_budgets)
    if cfg.equal_memory is not None:
        variants = [m for m in cfg.methods if "[" in m]
        if variants:
            raise UsageError(f"--equal-memory plans each method's own config; variants {variants} are not supported "
                             f"there (use --policy-opt METHOD.KEY=VALUE)")
        specs = [s for s in specs if s.method == "full"] + [
            MethodSpec(m, f"eq{cfg.equal_memory:g}B/tok", None, None) for m in cfg.methods if m != "full"]
    need_ref = cfg.fidelity or any(s.method == "full" for s in specs)
    if need_ref and not any(s.method == "full" for s in specs):
        from kvjax.policies import make_policy

        specs = [MethodSpec("full", "-", None, make_policy("full", **cfg.policy_opts.get("full", {})))] + specs
    specs.sort(key=lambda sp: sp.method != "full")  # full first: it is the reference of the others
    return specs


def _run_locked(cfg: RunConfig, out: pathlib.Path, pid: int, nproc: int, on_record, t_start: float
                ) -> dict[str, Any]:
    """The run of :func:`run` once this process holds its lock."""
    try:
        if cfg.distributed:
            (out / "parts").mkdir(exist_ok=True)
            reads = [out / "results.jsonl"] + sorted(p for p in (out / "parts").glob("results.part-*.jsonl")
                                                     if p != part_path(out, pid, nproc))
            store = ResultStore(part_path(out, pid, nproc), read_paths=reads)
            log(f"process {pid} of {nproc}")
        else:
            store = ResultStore(out / "results.jsonl")
    except OSError as e:
        raise UsageError(f"--out {out}: cannot write its results ({e.strerror or e}); give a writable --out") from None
    if store.records:
        log(f"resuming: {len(store.records)} finished record(s) in {out}")
    check_manifest(out, manifest(cfg), write=pid == 0)  # one writer in a distributed run

    import jax

    mesh = None
    if cfg.mesh or cfg.distributed:
        from kvjax.compat import make_mesh

        devices = jax.local_devices()
        mesh = make_mesh(*parse_mesh(cfg.mesh or "1x1", len(devices)), devices=devices)
    dtype = cfg.dtype or ("float32" if jax.default_backend() == "cpu" else "bfloat16")
    specs = grid_specs(cfg)
    counter = [0]
    status = "failed"
    try:
        _run_models(cfg, store, specs, mesh, dtype, pid, nproc, on_record, counter)
        status = "ok"
    finally:
        store.close()
        if cfg.distributed:  # always leave a marker, so process 0 never waits for a process that died
            done_marker(out, pid, nproc).write_text(json.dumps(
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
            missing = [i for i in range(nproc) if not done_marker(out, i, nproc).exists()]
            if not missing or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        failed = []
        for i in range(nproc):
            try:
                if json.loads(done_marker(out, i, nproc).read_text()).get("status") != "ok":
                    failed.append(i)
            except (OSError, json.JSONDecodeError):
                pass
        parts = sorted((out / "parts").glob("results.part-*.jsonl"))  # older runs' parts (other n) included
        n = merge_parts(out, parts)
        if missing or failed:
            log(f"processes {missing} did not finish within --merge-timeout={cfg.merge_timeout:g} s, processes "
                 f"{failed} failed; merged what exists ({n} records); the parts stay in {out / 'parts'} and a "
                 f"re-run resumes them")
            result["missing"] = missing + failed
        else:
            for p in parts:
                p.unlink(missing_ok=True)
            for i in range(nproc):
                done_marker(out, i, nproc).unlink(missing_ok=True)
        result["records"] = load_records(out / "results.jsonl")
    md, rows = summary_mod.write_summary(load_records(out / "results.jsonl"), out, plots=cfg.plots)
    result.update(summary_md=md, rows=rows, wall_s=time.perf_counter() - t_start)
    return result


def _run_models(cfg: RunConfig, store: ResultStore, all_specs: list, mesh, dtype: str, pid: int, nproc: int,
                on_record, counter: list) -> None:
    """The grid loop of :func:`run` over this process's samples of every model (the methods that run on its family,
    :func:`eval.grid.runs_on`); counter[0] counts new records."""
    from tqdm import tqdm

    import numpy as np

    from kvjax.engine import Engine, generation_bucket
    from kvjax.policies import make_policy
    from models import load_model
    from models.tokenizer import ByteTokenizer, ChatTemplateError

    from . import fidelity as fid

    for model in cfg.models:
        try:
            lm = load_model(model, dtype=dtype, mesh=mesh)
            tok = lm.tokenizer or ByteTokenizer(lm.config.vocab_size, lm.config.eos_token_ids)
        except ValueError as e:  # models.weights.WeightError (a checkpoint that cannot be read), or no usable tokenizer
            raise UsageError(f"--models {model!r}: {e}") from None
        stop_ids = tuple(tok.stop_ids())
        specs = [sp for sp in all_specs if runs_on(sp.method, lm.config.family, cfg.method_families)]
        base = Engine(lm, policy="full", mesh=mesh)
        full_policy = make_policy("full")

        units, sources = [], {}
        for bench, opts in cfg.benchmarks.items():
            try:
                built, rep = build_samples(bench, opts, tok, lm.config.max_position_embeddings, cfg)
            except ChatTemplateError as e:
                raise UsageError(f"--models {model!r}: {e}") from None
            except (TypeError, ValueError, FileNotFoundError) as e:  # options or data the benchmark cannot take
                raise UsageError(f"--benchmarks {bench!r} with options {opts}: {e}") from None
            log(f"{model}: {rep['summary']}; data: {describe_source(rep['source'])}")
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
                sample_specs = equal_memory_specs(todo, lm.config, len(ids), max_new, cfg.equal_memory,
                                                  cfg.policy_opts, dtype, emit)

            # a configuration this model cannot run is that method's error record; the others share the prefill
            runnable = []
            for sp in sample_specs:
                try:
                    if sp.policy is not None:
                        sp.policy.validate(lm.config, np.array([len(ids)], np.int32), generation_bucket(max_new))
                    runnable.append(sp)
                except ValueError as e:
                    emit({"method": sp.method, "budget": sp.budget, "budget_value": sp.budget_value,
                          "error": f"{type(e).__name__}: {e}"})
            sample_specs = runnable
            full_key = record_key(model, bench, sample.id, "full", "-")
            pols = [sp.policy for sp in sample_specs if sp.policy is not None]
            if cfg.fidelity and not any(sp.method == "full" for sp in sample_specs):
                pols.append(full_policy)  # to teacher-force full's stored reference tokens
            try:
                pre = fid.prefill(base, ids, max_new, pols, recall=cfg.recall_every > 0)
            except Exception as e:  # a prompt the model cannot take: one error record per pending key
                msg = f"{type(e).__name__}: {e}"
                log(f"{sample.id}: prefill failed: {msg}")
                for sp in sample_specs:
                    emit({"method": sp.method, "budget": sp.budget, "error": msg})
                continue

            reference = None
            for sp in sample_specs:
                if sp.policy is None:
                    continue
                bar.set_postfix_str(f"{sample.id} {sp.method} {sp.budget}", refresh=True)
                try:
                    sess = pre.session(sp.policy)
                    if sp.method == "full":
                        run_ = fid.run_method(sess, pre, max_new, stop_ids, keep_logits=True)
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
                            reference = (toks, fid.teacher_force(pre.session(full_policy), toks))
                        run_ = fid.run_method(sess, pre, max_new, stop_ids,
                                              reference=reference if cfg.fidelity else None,
                                              recall_every=cfg.recall_every)
                        fidelity = run_.fidelity
                    text = tok.decode(run_.ids, skip_special_tokens=True)
                    rec = {"method": sp.method, "budget": sp.budget, "budget_value": sp.budget_value,
                           "budget_fraction": budget_fraction(sp, len(ids)), "config": _config_dict(sp.policy),
                           "prediction": text, "n_generated": len(run_.ids), "stop_reason": run_.stop_reason,
                           "score": bobj.score(sample, text), "fidelity": fidelity,
                           **_memory_fields(run_.memory),
                           "seconds": pre.prefill_s + run_.build_s + run_.decode_s, "prefill_s": pre.prefill_s,
                           "build_s": run_.build_s, "decode_s": run_.decode_s, "fidelity_s": run_.fidelity_s,
                           "exact_fallback": run_.exact}
                    if sp.method == "full":
                        rec["full_tokens"] = list(map(int, run_.sampled))
                except KeyboardInterrupt:
                    raise
                except Exception as e:
                    msg = f"{type(e).__name__}: {e}"
                    log(f"{sample.id} {sp.method} {sp.budget} failed: {msg}\n{traceback.format_exc(limit=3)}")
                    rec = {"method": sp.method, "budget": sp.budget, "budget_value": sp.budget_value, "error": msg}
                emit(rec)  # outside the try: a failing on_record callback interrupts the run
            del pre
        bar.close()
