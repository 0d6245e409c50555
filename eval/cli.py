"""``kvjax eval``'s command line: flags, their parsing into a :class:`eval.runner.RunConfig`, and the command.

Registered with the ``kvjax`` command through the ``kvjax.commands`` entry point (``eval = "eval.cli:add_command"``);
``python -m eval.cli [flags]`` takes the same flags.
"""
from __future__ import annotations

import argparse
import copy
import pathlib
import sys
import time
from typing import Any, Sequence

from kvjax.cli import check_model_arg, common_flags, run_command
from kvjax.options import (UsageError, check_policy_options, method_names, parse_mesh, parse_methods,
                           parse_value)

from . import data, runner, suite
from .benchmarks import available as available_benchmarks
from .data import DataNotFoundError
from .grid import method_specs, parse_budget
from .presets import PRESETS
from .runner import RunConfig


def add_command(sub) -> None:
    """Add the ``eval`` subcommand to the ``kvjax`` CLI's subparsers."""
    e = sub.add_parser("eval", help="run the paper's benchmarks over models x methods x budgets (resumable)")
    add_args(e)
    e.set_defaults(fn=main)


def _dotted_opts(opts: Sequence[str], what: str) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for o in opts:
        if "=" not in o or "." not in o.split("=", 1)[0]:
            raise UsageError(f"--{what}-opt {o!r}: expected NAME.KEY=VALUE, e.g. "
                             f"{'multineedle.context_length=4000' if what == 'bench' else 'yakv.local_budget=128'}")
        lhs, v = o.split("=", 1)
        name, key = lhs.split(".", 1)
        out.setdefault(name.strip(), {})[key.strip()] = parse_value(v, lists=True)
    return out


def add_args(p: argparse.ArgumentParser) -> None:
    """Flags of ``kvjax eval`` (every one optional: no flags = the default CPU run, preset "default")."""
    p.add_argument("--preset", default="default", choices=sorted(PRESETS),
                   help="starting point for models/methods/budgets/benchmarks (default: %(default)s: smollm2-135m, "
                        "full/yakv/shadowkv on kvjax's default suite, which runs offline: synthetic Text2JSON, "
                        "MultiNeedle 2.5k (NeedleBench essays when found, else a generated haystack), LongProc "
                        "(2 pages, when found) and RULER-style tasks at 1.5k tokens; see `kvjax data list`; "
                        "larger: 20 Text2JSON at 4k-7k + 10 MultiNeedle at 7.6k tokens, budgets 1/64..1/8, ~80 min "
                        "on CPU; paper: the authors' grid (eval/paper.py: MultiNeedle 128k, Text2JSON, LongProc "
                        "html_to_tsv_8k; full, yakv 1/32, shadowkv 1/64 and 0.15625, arkvale, infinigen on Llama, "
                        "lrqk at the paper's budgets), needs the checkpoints (--models DIR ...) and the data; toy: "
                        "tokenizer-free smoke test)")
    p.add_argument("--models", default=None, nargs="+", metavar="MODEL",
                   help="registry names, HF dirs, .gguf files or orbax dirs (space- or comma-separated)")
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
                   help="comma list of registered benchmarks: text2json, text2json_synth, multineedle, "
                        "multineedle_synth, longproc, ruler_niah_multikey, ruler_niah_multivalue, ruler_vt, ruler_cwe, "
                        "ruler_fwe, toy_retrieval (default: the preset's; the default preset's suite is chosen by "
                        "what data is found); options from the preset when it has the benchmark")
    p.add_argument("--bench-opt", action="append", default=[], metavar="BENCH.KEY=VALUE",
                   help="benchmark option, e.g. multineedle.context_length=4000, text2json_synth.answer_prefix=table, "
                        "multineedle.max_new_tokens=64 (repeatable)")
    p.add_argument("--policy-opt", action="append", default=[], metavar="METHOD.KEY=VALUE",
                   help="policy config override, e.g. shadowkv.outlier_budget=0 (repeatable)")
    p.add_argument("--max-samples", type=int, default=None, help="at most N samples per benchmark")
    p.add_argument("--max-new-tokens", type=int, default=None, help="cap on generated tokens for every benchmark")
    p.add_argument("--seed", type=int, default=0, help="seed of the synthetic benchmarks (default: %(default)s)")
    p.add_argument("--out", default=None,
                   help="output directory (default: runs/<preset>); one run at a time holds it (a lock naming the "
                        "holder's PID and host); a finished run's folder that is not writable is summarised "
                        "without writing")
    p.add_argument("--wait", action="store_true",
                   help="when another run holds --out, wait for it to finish instead of refusing")
    p.add_argument("--recall-every", type=int, default=None,
                   help="measure attention recall every N teacher-forced steps (0 = never; preset default)")
    p.add_argument("--no-fidelity", action="store_true", help="skip teacher forcing (task scores only)")
    p.add_argument("--retry-errors", action="store_true", help="recompute records that failed before")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--no-plots", action="store_true", help="no PNG plots")
    p.add_argument("--data-dir", default=None,
                   help="benchmark data root holding needlebench/, longproc/, text2json.jsonl (default: $KVJAX_DATA, "
                        "else kvjax's cache, else the Hugging Face hub for benchmarks that need it; see "
                        "`kvjax data list`)")
    p.add_argument("--dry-run", action="store_true",
                   help="print the grid (models x benchmarks x methods x budgets), sample counts, prompt lengths after "
                        "the chat template and each configuration's device / host memory, then stop: reads only "
                        "the models' configs and tokenizers (a checkpoint dir with config.json and a tokenizer is "
                        "enough) and the benchmark data; loads no weights, runs nothing, writes nothing")
    p.add_argument("--device-gib", type=float, default=None, metavar="G",
                   help="with --dry-run: flag the configurations whose device memory (weights + peak) exceeds G GiB "
                        "(e.g. 80 for an A100-80G / H100, 16 for a TPU v5e chip); default: flag nothing")
    p.add_argument("--dry-run-memory", default="compiled", choices=["compiled", "state"],
                   help="with --dry-run: 'compiled' = XLA's memory analysis of the compiled prefill and decode step "
                        "(compile only, once per model x method x budget x benchmark at its longest prompt; about "
                        "5-20 s each on a CPU at 128k tokens), 'state' = weights + the policy state's bytes from "
                        "jax.eval_shape (fast; no activations or temporaries: a lower bound). Default: %(default)s")
    p.add_argument("--distributed", action="store_true", help="several processes split the samples (jax.distributed)")
    p.add_argument("--coordinator", default=None, help="host:port of process 0 (or $KVJAX_COORDINATOR)")
    p.add_argument("--num-processes", type=int, default=None, help="(or $KVJAX_NUM_PROCESSES)")
    p.add_argument("--process-id", type=int, default=None, help="(or $KVJAX_PROCESS_ID)")
    p.add_argument("--merge-timeout", type=float, default=3600.0,
                   help="seconds process 0 waits for the others' done markers (default: %(default)s)")


def _csv(s: str | None, flag: str, example: str) -> list[str] | None:
    """A comma list flag: None when not given (the preset's), else its items; naming nothing is an error."""
    if s is None:
        return None
    items = [x.strip() for x in s.split(",") if x.strip()]
    if not items:
        raise UsageError(f"{flag} {s!r} names nothing; give a comma list, e.g. {flag} {example}, or leave {flag} out "
                         f"for the preset's")
    return items


def _check_methods(methods: Sequence[str], budgets, policy_opts: dict, method_budgets: dict | None = None) -> None:
    """Every method is known, every --policy-opt names one of them and a field of its config, and each (method,
    budget) config passes its own checks (eval.grid.method_specs builds them all), so a mistake fails here, before
    any model loads."""
    try:
        parsed = parse_methods(",".join(methods))
    except ValueError as e:
        raise UsageError(f"--methods: {e}") from None
    known = method_names()
    for label, m, inline in parsed:
        if m.lower() not in known:
            raise UsageError(f"--methods: {m!r} is unknown; allowed: {', '.join(known)}")
        check_policy_options(m, inline, f"--methods {label!r}: option ")
    base = {label: m for label, m, _ in parsed} | {m: m for _, m, _ in parsed} | {"full": "full"}
    for name, kv in policy_opts.items():
        if name not in base:
            raise UsageError(f"--policy-opt for {name!r}, which is not among the methods {sorted(base)}")
        check_policy_options(base[name], kv, f"--policy-opt {name}.")
    for label, m, inline in parsed:
        try:
            method_specs([label], budgets, policy_opts, method_budgets)
        except (TypeError, ValueError) as e:
            flag = "--policy-opt" if policy_opts.get(m) or policy_opts.get(label) or inline else "--budgets"
            raise UsageError(f"{flag}: {e}") from None


def config_from_args(args: argparse.Namespace) -> RunConfig:
    """The run the flags ask for, every argument checked before anything is loaded (unknown model, method or
    benchmark, a budget or policy option a config rejects, a mesh larger than the devices, ...): a mistake raises
    :class:`kvjax.options.UsageError` naming the flag, the value and what is allowed."""
    preset = PRESETS[args.preset]
    benches = _csv(args.benchmarks, "--benchmarks", "text2json_synth,multineedle")
    for b in benches or ():
        if b not in available_benchmarks():
            raise UsageError(f"--benchmarks: {b!r} is unknown; allowed: {', '.join(available_benchmarks())}")
    if args.device_gib is not None and not args.dry_run:
        raise UsageError(f"--device-gib={args.device_gib:g} is only read by --dry-run; add --dry-run, or leave "
                         f"--device-gib out")
    if args.device_gib is not None and not args.device_gib > 0:
        raise UsageError(f"--device-gib={args.device_gib:g}, allowed: > 0 GiB of device memory")
    try:
        data.named_root(args.data_dir)  # --data-dir / $KVJAX_DATA must name an existing folder
        if not benches:  # the default preset runs kvjax's default suite: real data where found, else generated
            benches = list(suite.default_benchmarks(args.data_dir) if args.preset == "default"
                           else preset["benchmarks"])
    except DataNotFoundError as e:
        raise UsageError(str(e)) from None
    bench_cfg = {b: copy.deepcopy(preset["benchmarks"].get(b, {})) for b in benches}
    for name, kv in _dotted_opts(args.bench_opt, "bench").items():
        if name not in bench_cfg:
            raise UsageError(f"--bench-opt for {name!r}, which is not among the benchmarks {sorted(bench_cfg)}")
        bench_cfg[name].update(kv)
    if not args.dry_run:  # a dry run reports missing data instead
        _check_data(bench_cfg, args.data_dir)
    given = _csv(args.budgets, "--budgets", "1/64,1/32")
    budgets = [parse_budget(b) for b in (given or preset["budgets"])]
    # a preset's per-method budgets, unless --budgets / --equal-memory set every method's
    method_budgets = {} if given or args.equal_memory is not None else {
        m: [parse_budget(b) for b in bs] for m, bs in preset.get("method_budgets", {}).items()}
    if args.max_samples is not None and args.max_samples < 1:
        raise UsageError(f"--max-samples={args.max_samples}, allowed: int >= 1")
    if args.max_new_tokens is not None and args.max_new_tokens < 1:
        raise UsageError(f"--max-new-tokens={args.max_new_tokens}, allowed: int >= 1 tokens")
    if args.equal_memory is not None and not args.equal_memory > 0:
        raise UsageError(f"--equal-memory={args.equal_memory}, allowed: > 0 bytes per prompt token")
    recall_every = args.recall_every if args.recall_every is not None else preset.get("recall_every", 1)
    if recall_every < 0:
        raise UsageError(f"--recall-every={recall_every}, allowed: int >= 0 steps")
    if not args.merge_timeout >= 0:
        raise UsageError(f"--merge-timeout={args.merge_timeout}, allowed: >= 0 seconds")
    if args.num_processes is not None and args.num_processes < 1:
        raise UsageError(f"--num-processes={args.num_processes}, allowed: int >= 1")
    if args.process_id is not None and not 0 <= args.process_id < (args.num_processes or args.process_id + 1):
        raise UsageError(f"--process-id={args.process_id} with --num-processes={args.num_processes}: allowed "
                         f"0 <= id < num_processes")
    methods = _csv(args.methods, "--methods", "full,yakv,shadowkv") or list(preset["methods"])
    policy_opts = _dotted_opts(args.policy_opt, "policy")
    _check_methods(methods, budgets, policy_opts, method_budgets)
    if args.mesh:
        # under --distributed the devices are known only after jax.distributed.initialize: syntax only
        parse_mesh(args.mesh, None if args.distributed else _local_device_count())
    models = (_csv(",".join(args.models), "--models", "smollm2-135m") if args.models is not None
              else list(preset["models"]))
    for m in models:  # last: every other argument is checked before a model is looked up
        check_model_arg(m, "--models")
    return RunConfig(
        out=pathlib.Path(args.out or f"runs/{args.preset}"),
        models=models, methods=methods,
        budgets=budgets, benchmarks=bench_cfg, policy_opts=policy_opts,
        dtype=args.dtype or preset.get("dtype"), mesh=args.mesh, equal_memory=args.equal_memory, max_samples=args.max_samples,
        max_new_tokens=args.max_new_tokens, seed=args.seed, recall_every=recall_every,
        fidelity=not args.no_fidelity, retry_errors=args.retry_errors, progress=not args.no_progress,
        plots=not args.no_plots, distributed=args.distributed, coordinator=args.coordinator,
        num_processes=args.num_processes, process_id=args.process_id, merge_timeout=args.merge_timeout,
        data_dir=args.data_dir, wait=args.wait, method_budgets=method_budgets,
        method_families={m: list(f) for m, f in preset.get("method_families", {}).items()})


def _check_data(bench_cfg: dict, data_dir) -> None:
    """Before any model loads: a benchmark that reads data (no ``path`` / ``hub_name`` option) must find it, or be
    able to download it (a hub dataset, nothing named by --data-dir / $KVJAX_DATA, not offline); otherwise
    eval.data's error as a usage error."""
    import os

    from .benchmarks import dataset_of

    for name, opts in bench_cfg.items():
        ds = dataset_of(name)
        if ds is None or opts.get("path") or opts.get("hub_name") or data.find(ds, data_dir) is not None:
            continue
        named = data_dir is not None or bool(os.environ.get(data.DATA_ENV))
        if named or data.dataset(ds).hub is None or data.offline():
            try:
                data.locate(ds, data_dir, download_missing=False)
            except DataNotFoundError as e:
                raise UsageError(f"--benchmarks {name!r}: {e}") from None


def _local_device_count() -> int:
    import jax

    return len(jax.local_devices())


def main(args: argparse.Namespace) -> int:
    if args.dry_run:
        from . import dryrun

        if (args.dtype or PRESETS[args.preset].get("dtype") or "bfloat16") == "bfloat16":
            from kvjax.memory import native_bf16_analysis

            native_bf16_analysis()  # before the backend starts: bf16 buffers analysed as bf16
        print(dryrun.render(dryrun.plan(config_from_args(args), device_gib=args.device_gib,
                                        memory=args.dry_run_memory)))
        return 0
    cfg = config_from_args(args)
    t0 = time.perf_counter()
    res = runner.run(cfg)
    wall = time.perf_counter() - t0
    if res.get("read_only"):
        print(res["summary_md"])
        print(f"{cfg.out} is not writable ({res['read_only']}): the table above is the summary of its "
              f"{len(res['records'])} finished record(s); nothing was computed or written", file=sys.stderr)
    elif "summary_md" in res:
        print(res["summary_md"])
        print(f"wall time {wall:.0f} s ({wall / 60:.1f} min); computed {res['computed']} record(s); "
              f"results in {cfg.out}/results.jsonl, summary in {cfg.out}/summary.md")
    else:
        print(f"process {res['process']} of {res['processes']}: computed {res['computed']} record(s) in {wall:.0f} s")
    return 1 if res.get("missing") else 0


def cli(argv: Sequence[str] | None = None) -> int:
    """``python -m eval.cli [flags]``: the same flags and errors as ``kvjax eval``."""
    p = argparse.ArgumentParser(prog="python -m eval.cli", description=runner.__doc__, parents=[common_flags()],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_args(p)
    p.set_defaults(fn=main)
    return run_command(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(cli())
