"""The ``kvjax`` command: generate, eval, data, bench, convert.

    kvjax generate --model smollm2-135m --prompt "What is the capital of Germany?"
    kvjax generate --method yakv --budget 0.03125 --prompt-file long.txt
    kvjax eval                      # default run: smollm2-135m, full/yakv/shadowkv on the offline default suite
    kvjax data list                 # where benchmark data is found; `kvjax data download` fetches it from the hub
    kvjax bench generate|decode|memory|score
    kvjax convert --model smollm2-135m --out ckpt/   # orbax checkpoint, loadable with --model ckpt/
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import traceback

from .options import (UsageError, budget_knob, check_policy_options, method_names, parse_budget, parse_mesh,
                      parse_value)

#: every mistake in the arguments is one line on stderr, ``kvjax: error: <message>``, and this exit status
USAGE_EXIT = 2


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2-135m",
                   help="registry name (smollm2-135m), HF checkpoint dir, .gguf file or kvjax orbax dir "
                        "(default: %(default)s)")
    p.add_argument("--dtype", default=None, choices=["bfloat16", "float32"],
                   help="parameter/activation dtype (default: float32 on CPU, bfloat16 elsewhere)")
    p.add_argument("--mesh", default=None, metavar="DATAxMODEL",
                   help="shard over a ('data', 'model') mesh, e.g. 2x4 (default: one device)")


def _add_method_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--method", default="full",
                   help="KV-cache policy: full, yakv, yakv-serving, shadowkv, arkvale, quest, infinigen, lrqk "
                        "(default: %(default)s)")
    p.add_argument("--budget", default=None,
                   help="the method's budget: a fraction of the prompt in (0, 1] (1/64, 0.015625) or a token count "
                        ">= 1 (2048); sets the method's own knob (sparse_budget for yakv/shadowkv, budget for "
                        "arkvale/quest/infinigen, num_active for lrqk; full attention takes none); default: the "
                        "method's paper default. Prompts shorter than the method's min_seqlen_to_prune (512 tokens by "
                        "default), or whose budget covers the whole prompt, are decoded with exact attention "
                        "(a warning says so)")
    p.add_argument("--policy-opt", action="append", default=[], metavar="KEY=VALUE",
                   help="override any policy config field, e.g. --policy-opt local_budget=128 (repeatable)")


def parse_policy_opts(opts, arg: str = "--policy-opt") -> dict:
    """``["KEY=VALUE", ...]`` -> ``{KEY: value}`` (values as :func:`kvjax.options.parse_value`)."""
    kw = {}
    for o in opts:
        k, sep, v = o.partition("=")
        if not sep or not k.strip():
            raise UsageError(f"{arg} {o!r}: expected KEY=VALUE, e.g. {arg} local_budget=128")
        kw[k.strip()] = parse_value(v)
    return kw


def build_policy(method: str, budget: str | None = None, opts=()):
    """The policy ``--method``, ``--budget`` and ``--policy-opt`` ask for, configured and validated (its frozen
    config's checks run here, before any model is loaded). The budget sets the method's own knob
    (:func:`kvjax.options.budget_knob`). Raises :class:`UsageError` naming the argument."""
    from .policies import make_policy

    try:
        knob = budget_knob(method)
    except UsageError:
        raise UsageError(f"--method {method!r} is unknown; allowed: {', '.join(method_names())}") from None
    kw = parse_policy_opts(opts)
    check_policy_options(method, kw)
    if budget is not None:
        value = parse_budget(budget)
        if knob is None:
            raise UsageError(f"--budget {budget}: --method {method} keeps the whole prompt and takes no budget; drop "
                             f"--budget, or choose a method with one: "
                             f"{', '.join(m for m in method_names() if budget_knob(m) is not None)}")
        if knob in kw:
            raise UsageError(f"--budget {budget} and --policy-opt {knob}={kw[knob]!r} both set {method}'s {knob}; "
                             f"give one of them")
        kw[knob] = value
    try:
        return make_policy(method, **kw)
    except (TypeError, ValueError) as e:  # the config's own checks (__post_init__)
        given = " ".join([f"--budget {budget}"] * (budget is not None) + [f"--policy-opt {o}" for o in opts])
        raise UsageError(f"--method {method}{' with ' + given if given else ''}: {e}") from None


def default_dtype():
    import jax

    return "float32" if jax.default_backend() == "cpu" else "bfloat16"


def make_mesh_arg(spec: str | None):
    """The ``("data", "model")`` mesh ``--mesh DATAxMODEL`` asks for over this process's devices (None without
    it); checked against the device count before any model is loaded."""
    if not spec:
        return None
    import jax

    from .compat import make_mesh

    return make_mesh(*parse_mesh(spec, len(jax.devices())))


def check_model_arg(name: str, arg: str = "--model") -> None:
    """Fail fast (before loading anything) on a model that cannot be found: unknown name, missing path, a
    directory that is no checkpoint. Raises :class:`UsageError`."""
    from models.registry import resolve_source
    from models.weights import WeightError

    try:
        resolve_source(name)
    except (FileNotFoundError, WeightError) as e:
        raise UsageError(f"{arg} {name!r}: {e}") from None


def load(args):
    """The model of ``--model`` / ``--dtype`` / ``--mesh``; the arguments are checked before any weight is read,
    and a checkpoint that cannot be read (models.weights.WeightError) is reported as a usage error."""
    from models import load_model
    from models.weights import WeightError

    mesh = make_mesh_arg(args.mesh)
    check_model_arg(args.model)  # last: every other argument is checked before a model is looked up
    try:
        return load_model(args.model, dtype=args.dtype or default_dtype(), mesh=mesh)
    except WeightError as e:
        raise UsageError(f"--model {args.model!r}: {e}") from None


def read_text_file(path: str, arg: str) -> str:
    """The UTF-8 text of the file an argument names. Raises :class:`UsageError` for a missing or unreadable file
    and for bytes that are not UTF-8."""
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except UnicodeDecodeError as e:
        raise UsageError(f"{arg} {path!r}: not UTF-8 text (byte {e.start}: {e.reason}); save it as UTF-8") from None
    except OSError as e:
        raise UsageError(f"{arg} {path!r}: cannot read it ({e.strerror or e})") from None


def _checked(flag: str, value, build):
    """``build()`` with a config's ValueError turned into a :class:`UsageError` naming ``flag``."""
    try:
        return build()
    except ValueError as e:
        raise UsageError(f"{flag} {value}: {e}") from None


# ----------------------------------------------------------------------------- commands
def cmd_generate(args) -> int:
    from . import Engine, GenerationConfig, SamplingConfig

    # every argument is checked before the model loads
    if args.prompt is None and args.prompt_file is None:
        raise UsageError("give --prompt TEXT or --prompt-file PATH")
    if args.prompt is not None and args.prompt_file is not None:
        raise UsageError("give one of --prompt TEXT and --prompt-file PATH, not both")
    prompt = read_text_file(args.prompt_file, "--prompt-file") if args.prompt_file else args.prompt
    _checked("--temperature", args.temperature, lambda: SamplingConfig(temperature=args.temperature))
    _checked("--top-k", args.top_k, lambda: SamplingConfig(top_k=args.top_k))
    _checked("--top-p", args.top_p, lambda: SamplingConfig(top_p=args.top_p))
    sampling = SamplingConfig(args.temperature, args.top_k, args.top_p)
    gen = _checked("--max-new-tokens", args.max_new_tokens,
                   lambda: GenerationConfig(args.max_new_tokens, sampling, tuple(args.stop), None, args.seed))
    policy = build_policy(args.method, args.budget, args.policy_opt)
    lm = load(args)
    if lm.tokenizer is None:
        raise UsageError(f"--model {args.model!r} has no tokenizer (no tokenizer.json / GGUF vocabulary); "
                         f"kvjax generate needs one")
    eng = Engine(lm, policy=policy)
    try:
        ids = eng.encode(prompt, chat=not args.no_chat)
    except ValueError as e:  # no chat template, or one that fails or runs past its bounds
        raise UsageError(f"--model {args.model!r}: {e}") from None

    def stream(i, delta):
        sys.stdout.write(delta)
        sys.stdout.flush()

    try:
        res = eng.generate([ids], gen, on_text=stream)[0]
    except ValueError as e:  # the prompt does not fit the model or the policy
        raise UsageError(str(e)) from None
    sys.stdout.write("\n")
    if args.verbose:
        rep = eng.memory_report()
        n = max(len(res.ids), 1)
        print(f"[{len(ids)} prompt tokens, {len(res.ids)} generated, stop={res.stop_reason}; prefill "
              f"{res.prefill_s:.2f} s, decode {1000 * res.decode_s / n:.1f} ms/token; cache bytes "
              f"{json.dumps(rep['by_kind'])}]", file=sys.stderr)
    return 0


def cmd_convert(args) -> int:
    from models.weights import save_orbax

    out = os.path.abspath(args.out)
    if os.path.exists(out) and not os.path.isdir(out):
        raise UsageError(f"--out {args.out!r} is a file; give a directory (new, empty, or an earlier checkpoint)")
    if os.path.isdir(out) and os.listdir(out) and not os.path.exists(os.path.join(out, "kvjax_config.json")):
        raise UsageError(f"--out {args.out!r} is a non-empty directory that is no kvjax checkpoint; give a new or "
                         f"empty directory (an earlier checkpoint is overwritten)")
    make_mesh_arg(args.mesh)
    check_model_arg(args.model)
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as e:
        raise UsageError(f"--out {args.out!r}: cannot create it ({e.strerror or e})") from None
    lm = load(args)
    src = args.model if not os.path.exists(args.model) else os.path.abspath(args.model)
    save_orbax(out, lm.model.params(), lm.config, {"tokenizer_source": src})
    print(f"saved {lm.config.name or args.model} ({lm.config.num_params() / 1e6:.1f} M parameters, "
          f"{args.dtype or default_dtype()}) to {out}; load it with --model {args.out}")
    return 0


def _positive_ints(s: str, arg: str, what: str) -> list[int]:
    try:
        vals = [int(x) for x in s.split(",") if x.strip()]
    except ValueError:
        vals = []
    if not vals or min(vals) < 1:
        raise UsageError(f"{arg} {s!r}: expected a comma list of integers >= 1 {what}, e.g. 1024,4096")
    return vals


def check_bench_args(args) -> None:
    """Checks of ``kvjax bench`` arguments before anything is built: lengths and step counts, the model or shape,
    and every method (with its bracketed overrides) configured once."""
    from models import PRESETS

    from .options import parse_methods
    from .policies import make_policy

    _positive_ints(args.lengths, "--lengths", "tokens")
    if args.bench == "generate":
        _at_least_one("--decode-steps", args.decode_steps)
        check_model_arg(args.model)
    elif args.bench == "decode":
        _at_least_one("--steps", args.steps)
        if args.shape not in PRESETS:
            raise UsageError(f"--shape {args.shape!r} is unknown; allowed: {', '.join(sorted(PRESETS))}")
        try:
            specs = parse_methods(args.methods)
        except ValueError as e:
            raise UsageError(f"--methods {args.methods!r}: {e}") from None
        if not specs:
            raise UsageError(f"--methods {args.methods!r} names no method; allowed: {', '.join(method_names())}")
        for label, m, opts in specs:
            if m.lower() not in method_names():
                raise UsageError(f"--methods: {m!r} is unknown; allowed: {', '.join(method_names())}")
            check_policy_options(m, opts, f"--methods {label!r}: option ")
            try:
                make_policy(m, **opts)
            except (TypeError, ValueError) as e:
                raise UsageError(f"--methods {label!r}: {e}") from None


def _at_least_one(flag: str, n: int) -> None:
    if n < 1:
        raise UsageError(f"{flag} {n}: allowed: an integer >= 1 steps")


def cmd_bench(args) -> int:
    from . import bench

    check_bench_args(args)
    return bench.main(args)


#: entry-point group through which other packages (the ``eval`` harness) add subcommands: each entry point is a
#: function ``add_command(subparsers)`` that adds its parser and sets ``fn``. The library never imports them by name.
COMMAND_GROUP = "kvjax.commands"


def common_flags() -> argparse.ArgumentParser:
    """Flags every subcommand has (added as an argparse parent)."""
    c = argparse.ArgumentParser(add_help=False)
    c.add_argument("-v", "--verbose", action="store_true",
                   help="show the traceback of an error (generate: also timings and cache bytes on stderr)")
    return c


class Subcommands:
    """What an ``add_command(sub)`` entry point receives: ``sub.add_parser(name, **kw)`` as argparse's, with the
    flags every kvjax subcommand shares (``-v/--verbose``) already on the new parser."""

    def __init__(self, action, parents: list[argparse.ArgumentParser]):
        self._action = action
        self._parents = parents

    def add_parser(self, name: str, **kw) -> argparse.ArgumentParser:
        kw["parents"] = [*self._parents, *kw.get("parents", ())]
        return self._action.add_parser(name, **kw)


def _add_plugin_commands(sub: Subcommands) -> None:
    from importlib.metadata import entry_points

    for ep in sorted(entry_points(group=COMMAND_GROUP), key=lambda e: e.name):
        try:
            ep.load()(sub)
        except Exception as e:  # noqa: BLE001 - a broken plugin must not break the other commands
            msg = f"kvjax {ep.name} is unavailable ({ep.value}: {type(e).__name__}: {e})"
            p = sub.add_parser(ep.name, help=msg)

            def unavailable(args, msg=msg):
                raise UsageError(msg)

            p.set_defaults(fn=unavailable)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kvjax", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = Subcommands(p.add_subparsers(dest="command"), [common_flags()])

    g = sub.add_parser("generate", help="generate text with a KV-cache policy (streams to stdout)")
    _add_model_args(g)
    _add_method_args(g)
    g.add_argument("--prompt", help="prompt text")
    g.add_argument("--prompt-file", help="read the prompt from a UTF-8 file")
    g.add_argument("--no-chat", action="store_true", help="do not apply the model's chat template")
    g.add_argument("--max-new-tokens", type=int, default=256, help="default: %(default)s")
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    g.add_argument("--top-k", type=int, default=0, help="0 = off (default)")
    g.add_argument("--top-p", type=float, default=1.0, help="1 = off (default)")
    g.add_argument("--seed", type=int, default=0, help="PRNG seed for sampling (default: %(default)s)")
    g.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    g.set_defaults(fn=cmd_generate)

    c = sub.add_parser("convert", help="save a model as an orbax checkpoint")
    _add_model_args(c)
    c.add_argument("--out", required=True, help="output directory (new, empty, or an earlier checkpoint)")
    c.set_defaults(fn=cmd_convert)

    b = sub.add_parser("bench", help="benchmarks (results go to BENCHMARKS.md)")
    from . import bench

    bench.add_args(b)
    b.set_defaults(fn=cmd_bench)

    _add_plugin_commands(sub)
    return p


def run_command(args: argparse.Namespace) -> int:
    """``args.fn(args)`` with a :class:`UsageError` reported as one line on stderr, ``kvjax: error: <message>``,
    and exit status :data:`USAGE_EXIT` (with ``-v`` after its traceback). Shared by ``kvjax`` and the harness's
    own entry (``python -m eval.cli``)."""
    try:
        return args.fn(args)
    except UsageError as e:
        if args.verbose:
            traceback.print_exc()
        print(f"kvjax: error: {e}", file=sys.stderr)
        return USAGE_EXIT


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return USAGE_EXIT
    return run_command(args)


if __name__ == "__main__":
    sys.exit(main())
