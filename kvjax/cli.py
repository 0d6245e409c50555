"""The ``kvjax`` command: generate, eval, bench, convert.

    kvjax generate --model smollm2-135m --prompt "What is the capital of Germany?"
    kvjax generate --method yakv --budget 0.03125 --prompt-file long.txt
    kvjax eval                      # default run: smollm2-135m, synthetic Text2JSON + MultiNeedle, full/yakv/shadowkv
    kvjax bench generate|decode|score
    kvjax convert --model smollm2-135m --out ckpt/   # orbax checkpoint, loadable with --model ckpt/
"""
from __future__ import annotations

import argparse
import json
import os
import sys

from .options import parse_value


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
                   help="sparse budget: a fraction of the prompt (e.g. 0.03125) or a token count (e.g. 2048); "
                        "default: the method's paper default")
    p.add_argument("--policy-opt", action="append", default=[], metavar="KEY=VALUE",
                   help="override any policy config field, e.g. --policy-opt local_budget=128 (repeatable)")


def parse_budget(s: str | None):
    if s is None:
        return None
    try:
        return int(s)
    except ValueError:
        pass
    try:
        v = float(s)
    except ValueError:
        raise SystemExit(f"--budget {s!r}: expected a fraction in [0, 1] or an integer token count") from None
    if not 0.0 <= v <= 1.0:
        raise SystemExit(f"--budget {v}: a fractional budget must be in [0, 1]")
    return v


def build_policy(method: str, budget=None, opts=()):
    from .policies import make_policy

    kw = {}
    for o in opts:
        if "=" not in o:
            raise SystemExit(f"--policy-opt {o!r}: expected KEY=VALUE")
        k, v = o.split("=", 1)
        kw[k.strip()] = parse_value(v)
    if budget is not None:
        kw["sparse_budget"] = budget
    try:
        return make_policy(method, **kw)
    except TypeError as e:
        raise SystemExit(f"--method {method}: {e}") from None


def default_dtype():
    import jax

    return "float32" if jax.default_backend() == "cpu" else "bfloat16"


def make_mesh_arg(spec: str | None):
    if not spec:
        return None
    from .compat import make_mesh

    try:
        d, m = (int(x) for x in spec.lower().split("x"))
    except ValueError:
        raise SystemExit(f"--mesh {spec!r}: expected DATAxMODEL, e.g. 2x4") from None
    return make_mesh(d, m)


def load(args):
    from models import load_model

    return load_model(args.model, dtype=args.dtype or default_dtype(), mesh=make_mesh_arg(args.mesh))


# ----------------------------------------------------------------------------- commands
def cmd_generate(args) -> int:
    from . import Engine, GenerationConfig, SamplingConfig

    if args.prompt is None and args.prompt_file is None:
        raise SystemExit("give --prompt TEXT or --prompt-file PATH")
    if args.prompt_file:
        with open(args.prompt_file, encoding="utf-8") as f:
            prompt = f.read()
    else:
        prompt = args.prompt
    try:
        sampling = SamplingConfig(args.temperature, args.top_k, args.top_p)
        gen = GenerationConfig(args.max_new_tokens, sampling, tuple(args.stop), None, args.seed)
    except ValueError as e:
        raise SystemExit(str(e)) from None
    lm = load(args)
    eng = Engine(lm, policy=build_policy(args.method, parse_budget(args.budget), args.policy_opt))
    ids = eng.encode(prompt, chat=not args.no_chat)

    def stream(i, delta):
        sys.stdout.write(delta)
        sys.stdout.flush()

    try:
        res = eng.generate([ids], gen, on_text=stream)[0]
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
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

    lm = load(args)
    src = args.model if not os.path.exists(args.model) else os.path.abspath(args.model)
    save_orbax(args.out, lm.model.params(), lm.config, {"tokenizer_source": src})
    print(f"saved {lm.config.name or args.model} ({lm.config.num_params() / 1e6:.1f} M parameters, "
          f"{args.dtype or default_dtype()}) to {os.path.abspath(args.out)}; load it with --model {args.out}")
    return 0


def cmd_bench(args) -> int:
    from . import bench

    return bench.main(args)


#: entry-point group through which other packages (the ``eval`` harness) add subcommands: each entry point is a
#: function ``add_command(subparsers)`` that adds its parser and sets ``fn``. The library never imports them by name.
COMMAND_GROUP = "kvjax.commands"


def _add_plugin_commands(sub) -> None:
    from importlib.metadata import entry_points

    for ep in sorted(entry_points(group=COMMAND_GROUP), key=lambda e: e.name):
        try:
            ep.load()(sub)
        except Exception as e:  # noqa: BLE001 - a broken plugin must not break the other commands
            msg = f"kvjax {ep.name} is unavailable ({ep.value}: {type(e).__name__}: {e})"
            p = sub.add_parser(ep.name, help=msg)

            def unavailable(args, msg=msg):
                raise SystemExit(f"kvjax: error: {msg}")

            p.set_defaults(fn=unavailable)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kvjax", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command")

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
    g.add_argument("-v", "--verbose", action="store_true", help="print timings and cache bytes to stderr")
    g.set_defaults(fn=cmd_generate)

    c = sub.add_parser("convert", help="save a model as an orbax checkpoint")
    _add_model_args(c)
    c.add_argument("--out", required=True, help="output directory")
    c.set_defaults(fn=cmd_convert)

    b = sub.add_parser("bench", help="benchmarks (results go to BENCHMARKS.md)")
    from . import bench

    bench.add_args(b)
    b.set_defaults(fn=cmd_bench)

    _add_plugin_commands(sub)
    return p


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "fn", None):
        parser.print_help()
        return 2
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
