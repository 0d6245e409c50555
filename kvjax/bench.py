"""``kvjax bench``: speed and memory measurements (never run in tests; results are recorded in BENCHMARKS.md).

- ``generate``: prefill tokens/s and decode ms/token of a real model at several prompt lengths, side by
  side with Hugging Face transformers (torch CPU, float32) when it is importable.
- ``decode``: one decode step of full / yakv / shadowkv (and any other method) at long contexts on a
  model-shaped network with random weights and a random prefilled cache (no prefill is timed), with
  device bytes, host bytes and bytes fetched per step.
- ``score``: the landmark-scoring path against copy bandwidth (pallas_kernels.bench).
- ``memory``: compile-only device / host memory of prefill and decode for any model shape (:mod:`kvjax.memory`):
  nothing is allocated, so the paper's model shapes at 128k tokens run on a CPU. For bfloat16 the XLA:CPU pass
  that upcasts bf16 arithmetic to float32 is disabled (:func:`kvjax.memory.native_bf16_analysis`), so buffers have
  the sizes a TPU/GPU program gives them.
"""
from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import time

import numpy as np

from .options import parse_methods


def add_args(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="bench", required=True)
    g = sub.add_parser("generate", help="prefill tok/s and decode ms/token vs HF transformers")
    g.add_argument("--model", default="smollm2-135m")
    g.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    g.add_argument("--lengths", default="1024,4096,8000", help="prompt lengths in tokens (default: %(default)s)")
    g.add_argument("--decode-steps", type=int, default=32)
    g.add_argument("--no-hf", action="store_true", help="skip the transformers comparison")
    g.add_argument("--json", help="also write the rows to this JSON file")
    d = sub.add_parser("decode", help="decode step of several methods at long contexts (random weights/cache)")
    d.add_argument("--shape", default="smollm2-135m", help="config preset whose shape to use")
    d.add_argument("--methods", default="full,yakv,yakv-serving,shadowkv",
                   help="comma list of methods/presets (default: %(default)s; yakv = the paper's accuracy path "
                        "§3.1, yakv-serving = its inference path §3.2); a method may carry config overrides in "
                        "brackets for ablations, e.g. 'yakv-serving[sparse_budget=16;fetch_backend=device]'")
    d.add_argument("--lengths", default="8192,32768,65536")
    d.add_argument("--dtype", default=None, choices=["float32", "bfloat16"],
                   help="model/cache dtype (default: float32 on CPU, where XLA runs bf16 dots ~8x slower and "
                        "converts whole bf16/fp8 operands before a gather; bfloat16 elsewhere)")
    d.add_argument("--steps", type=int, default=10)
    d.add_argument("--json", help="also write the rows to this JSON file")
    m = sub.add_parser("memory", help="compile-only peak device / host memory of prefill and decode per method")
    m.add_argument("--shape", default="llama-3.1-8b-instruct",
                   help="config preset whose shape to use (models.PRESETS; default: %(default)s)")
    m.add_argument("--lengths", default="32768,131072", help="prompt lengths in tokens (default: %(default)s)")
    m.add_argument("--batch", default="1", help="comma list of batch sizes (default: %(default)s)")
    m.add_argument("--methods", default="full,yakv,yakv-serving,shadowkv",
                   help="comma list of methods/presets, NAME[KEY=VALUE;...] for variants (default: %(default)s)")
    m.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"], help="default: %(default)s")
    m.add_argument("--max-new-tokens", type=int, default=64, help="generated-token slots (default: %(default)s)")
    m.add_argument("--offload-hidden", action="store_true",
                   help="prefill keeps the hidden states between layers in host memory (Engine(offload_hidden=True))")
    m.add_argument("--fit-gib", type=float, default=None, metavar="G",
                   help="also print, per method and length, the largest batch whose peak (both stages, weights "
                        "included) fits G GiB per device")
    m.add_argument("--json", help="also write {'rows': [...]} to this JSON file")
    s = sub.add_parser("score", help="landmark scoring bandwidth vs a plain copy (pallas_kernels.bench)")
    s.add_argument("--lengths", default="8192,16384,32768,65536,131072")
    s.add_argument("--shape", default="smollm2", choices=["smollm2", "paper"])
    s.add_argument("--json", help="also write the rows to this JSON file")


def machine() -> str:
    import jax

    return f"{platform.machine()} {jax.default_backend()} x{len(jax.devices())}, jax {jax.__version__}, {datetime.date.today()}"


def _table(rows: list[dict], cols: list[str]) -> str:
    out = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        cells = []
        for c in cols:
            v = r.get(c, "")
            cells.append(f"{v:.4g}" if isinstance(v, float) else str(v))
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


# ----------------------------------------------------------------------------- generate
def _time(fn, reps=1):
    fn()  # warm-up / compile
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t) / reps


def copy_bandwidth(nbytes: int, repeats: int = 5) -> float:
    """Bytes per second of an in-place elementwise pass over ``nbytes`` bytes (``x + 1`` on a donated uint8 buffer,
    best of ``repeats``): the memory-bandwidth yardstick of ``bench generate`` and ``bench score``."""
    from pallas_kernels.bench import _copy_timed

    best, _ = _copy_timed(int(nbytes), repeats)
    return nbytes / best


def bench_generate(model: str, dtype: str, lengths: list[int], steps: int, hf: bool) -> list[dict]:
    """Prefill tok/s and decode ms/token (mean and best step) of full attention on a real model, and the decode
    step's memory-bandwidth bound: the bytes one step must read (every weight, and the whole KV cache bucket)
    divided by the copy bandwidth measured in the same run (:func:`copy_bandwidth`)."""
    import jax
    from tqdm import tqdm

    from models import load_model

    from .engine import Engine, generation_bucket
    from .memory import tree_bytes

    lm = load_model(model, dtype=dtype)
    cfg = lm.config
    eng = Engine(lm)
    weight_bytes = tree_bytes(eng.params)
    rng = np.random.default_rng(0)
    rows = []
    for T in tqdm(lengths, desc="kvjax", unit="len"):
        ids = rng.integers(100, cfg.vocab_size - 100, size=T).tolist()
        toks, lens, Tb = eng.prepare([ids], steps + 1)
        gb = generation_bucket(steps + 1)

        def pre():
            lg, states = eng.prefill(toks, lens, gb)
            jax.block_until_ready(lg)
            return states[0]

        t_pre = _time(pre)
        from .engine import Session

        sess = Session(eng, pre(), lens, None)
        cache_bytes = eng.policy.memory_report(sess.state, lens)["by_kind"].get("device", 0)
        tok = np.array([5], np.int32)
        jax.block_until_ready(sess.step(tok).tokens)  # compile
        times = []
        for _ in range(steps):
            t = time.perf_counter()
            tok = np.asarray(sess.step(tok).tokens)
            times.append(time.perf_counter() - t)
        bw = copy_bandwidth(weight_bytes)
        bound = (weight_bytes + cache_bytes) / bw
        rows.append({"impl": f"kvjax {dtype}", "prompt_tokens": T, "prefill_tok_s": T / t_pre,
                     "decode_ms_token": 1000 * float(np.mean(times)), "decode_ms_min": 1000 * min(times),
                     "read_MB_per_step": (weight_bytes + cache_bytes) / 2**20, "copy_GBps": bw / 1e9,
                     "bound_ms": 1000 * bound, "min_over_bound": min(times) / bound})
        del sess
    if hf:
        rows += bench_generate_hf(cfg, lengths, steps)
    return rows


def bench_generate_hf(cfg, lengths, steps) -> list[dict]:
    try:
        import torch
        from transformers import LlamaConfig, LlamaForCausalLM, Qwen3Config, Qwen3ForCausalLM
    except ImportError:
        print("transformers/torch not importable: skipping the HF comparison "
              "(pip install torch==2.13.0 transformers)")
        return []
    from tqdm import tqdm

    kw = dict(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
              num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
              num_key_value_heads=cfg.num_kv_heads, head_dim=cfg.head_dim, rope_theta=cfg.rope_theta,
              rms_norm_eps=cfg.rms_norm_eps, tie_word_embeddings=cfg.tie_word_embeddings,
              max_position_embeddings=cfg.max_position_embeddings)
    if cfg.family == "qwen3_moe":
        from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

        model = Qwen3MoeForCausalLM(Qwen3MoeConfig(
            **kw, num_experts=cfg.num_experts, num_experts_per_tok=cfg.num_experts_per_tok,
            moe_intermediate_size=cfg.moe_intermediate_size, norm_topk_prob=cfg.norm_topk_prob,
            decoder_sparse_step=cfg.decoder_sparse_step, mlp_only_layers=list(cfg.mlp_only_layers)))
    elif cfg.family == "qwen3":
        model = Qwen3ForCausalLM(Qwen3Config(**kw))
    else:
        model = LlamaForCausalLM(LlamaConfig(**kw))
    model = model.float().eval()
    rows = []
    rng = np.random.default_rng(0)
    with torch.inference_mode():
        for T in tqdm(lengths, desc="transformers", unit="len"):
            ids = torch.tensor(rng.integers(100, cfg.vocab_size - 100, size=(1, T)))
            t = time.perf_counter()
            out = model(ids, use_cache=True, logits_to_keep=1)
            t_pre = time.perf_counter() - t
            past = out.past_key_values
            nxt = out.logits[:, -1:].argmax(-1)
            t = time.perf_counter()
            for _ in range(steps):
                out = model(nxt, past_key_values=past, use_cache=True)
                past = out.past_key_values
                nxt = out.logits[:, -1:].argmax(-1)
            dec = (time.perf_counter() - t) / steps
            rows.append({"impl": "transformers f32", "prompt_tokens": T, "prefill_tok_s": T / t_pre,
                         "decode_ms_token": 1000 * dec})
    return rows


# ----------------------------------------------------------------------------- decode
def bench_decode(shape: str, methods: list[str], lengths: list[int], dtype: str, steps: int) -> list[dict]:
    """One decode step of each method at long contexts on a model-shaped network with random weights and a random
    dense cache turned into each policy's state (:meth:`kvjax.Engine.build`; no prefill is timed), with device
    bytes, host bytes and bytes fetched per step."""
    import jax
    import jax.numpy as jnp
    from flax import nnx
    from tqdm import tqdm

    from models import PRESETS, LoadedModel, Transformer

    from .cache import KVCache
    from .engine import Engine, Session, generation_bucket
    from .policies import make_policy

    cfg = PRESETS[shape].replace(max_position_embeddings=max(lengths) + 1024)
    lm = LoadedModel(cfg, Transformer(cfg, dtype=jnp.dtype(dtype), rngs=nnx.Rngs(0)), None)
    base = Engine(lm)
    rows = []
    for T in lengths:
        shape_kv = (cfg.num_layers, 1, cfg.num_kv_heads, T, cfg.head_dim)
        kk, kv_ = jax.random.split(jax.random.key(T))
        k = jax.random.normal(kk, shape_kv, jnp.float32).astype(dtype)
        v = jax.random.normal(kv_, shape_kv, jnp.float32).astype(dtype)
        lens = np.array([T], np.int32)
        for label, m, opts in tqdm(parse_methods(",".join(methods)), desc=f"{T} tokens", unit="method"):
            try:
                eng = base.with_policy(make_policy(m, **opts))
                state = eng.build(KVCache(k, v), lens, generation_bucket(steps + 1))
            except ValueError as e:
                print(f"skip {label}: {e}")
                continue
            rep = eng.policy.memory_report(state, lens)
            fetched = eng.policy.bytes_fetched_per_step(state)
            sess = Session(eng, state, lens, None)
            tok = np.array([7], np.int32)
            jax.block_until_ready(sess.step(tok).tokens)  # compile
            t = time.perf_counter()
            for _ in range(steps):
                out = sess.step(tok)
            jax.block_until_ready(out.logits)
            ms = 1000 * (time.perf_counter() - t) / steps
            rows.append({"method": label, "prompt_tokens": T, "ms_per_step": ms,
                         "device_MB": rep["by_kind"].get("device", 0) / 2**20,
                         "host_MB": sum(v for k, v in rep["by_kind"].items() if k != "device") / 2**20,
                         "device_B_per_prompt_token": rep["per_prompt_token_variable"].get("device", 0.0),
                         "fetched_MB_per_step": fetched / 2**20})
            del sess, state
        del k, v
    return rows


def bench_memory(shape: str, methods: list[str], lengths: list[int], batches: list[int], dtype: str,
                 max_new: int = 64, offload_hidden: bool = False) -> list[dict]:
    """Rows ``{method, prompt_tokens, batch, stage, peak_device_bytes, weights_bytes, host_bytes}`` for every
    (method, length, batch) and stage ("prefill", "decode"), from XLA's compiled memory analysis
    (:func:`kvjax.memory.stage_memory`). ``peak_device_bytes`` excludes the weights."""
    from tqdm import tqdm

    from models import PRESETS

    from .memory import stage_memory
    from .policies import make_policy

    cfg = PRESETS[shape]
    rows = []
    specs = parse_methods(",".join(methods))
    todo = [(sp, T, B) for sp in specs for T in lengths for B in batches]
    for (label, m, opts), T, B in tqdm(todo, desc="compiling", unit="config"):
        res = stage_memory(cfg, make_policy(m, **opts), T, B, dtype, max_new, offload_hidden=offload_hidden)
        for stage, pm in res.items():
            rows.append({"method": label, "prompt_tokens": T, "batch": B, "stage": stage,
                         "peak_device_bytes": pm.peak_device_bytes, "weights_bytes": pm.weights_bytes,
                         "host_bytes": pm.host_bytes})
    return rows


def largest_batch(shape: str, method: str, T: int, dtype: str, fit_bytes: int, max_new: int = 64,
                  offload_hidden: bool = False, limit: int = 4096) -> tuple[int, int]:
    """The largest batch whose peak over both stages plus the weights fits ``fit_bytes`` (per device), and that
    peak: a doubling search then bisection over compiled memory analyses. (0, bytes at batch 1) if none fits."""
    from models import PRESETS

    from .memory import stage_memory
    from .options import parse_methods as _pm
    from .policies import make_policy

    (_, m, opts), = _pm(method)
    pol = make_policy(m, **opts)
    cache: dict[int, int] = {}

    def need(b: int) -> int:
        if b not in cache:
            res = stage_memory(PRESETS[shape], pol, T, b, dtype, max_new, offload_hidden=offload_hidden)
            cache[b] = max(r.peak_device_bytes for r in res.values()) + res["decode"].weights_bytes
        return cache[b]

    if need(1) > fit_bytes:
        return 0, need(1)
    lo, hi = 1, 2
    while hi <= limit and need(hi) <= fit_bytes:
        lo, hi = hi, hi * 2
    if hi > limit:
        return lo, need(lo)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if need(mid) <= fit_bytes else (lo, mid)
    return lo, need(lo)


def main(args) -> int:
    import jax

    if args.bench == "generate":
        rows = bench_generate(args.model, args.dtype, [int(x) for x in args.lengths.split(",")], args.decode_steps,
                              not args.no_hf)
        print(f"\nkvjax bench generate — {args.model}, {machine()}")
        print(_table(rows, ["impl", "prompt_tokens", "prefill_tok_s", "decode_ms_token", "decode_ms_min",
                            "read_MB_per_step", "copy_GBps", "bound_ms", "min_over_bound"]))
    elif args.bench == "decode":
        if args.dtype is None:
            args.dtype = "float32" if jax.default_backend() == "cpu" else "bfloat16"
        rows = bench_decode(args.shape, args.methods.split(","), [int(x) for x in args.lengths.split(",")],
                            args.dtype, args.steps)
        print(f"\nkvjax bench decode — {args.shape}-shaped random model, {args.dtype}, {machine()}")
        print(_table(rows, ["method", "prompt_tokens", "ms_per_step", "device_MB", "host_MB",
                            "device_B_per_prompt_token", "fetched_MB_per_step"]))
    elif args.bench == "memory":
        from .memory import native_bf16_analysis

        if args.dtype == "bfloat16" and not native_bf16_analysis():
            print("note: XLA:CPU's bf16->f32 upcast pass could not be disabled (the backend already started): bf16 "
                  "numbers include float32 copies accelerators do not make", file=sys.stderr)
        lengths = [int(x) for x in args.lengths.split(",")]
        batches = [int(x) for x in args.batch.split(",")]
        rows = bench_memory(args.shape, args.methods.split(","), lengths, batches, args.dtype, args.max_new_tokens,
                            args.offload_hidden)
        print(f"\nkvjax bench memory — {args.shape} shape, {args.dtype}, compile-only, {machine()}")
        gib = [{**r, "peak_device_GiB": r["peak_device_bytes"] / 2**30, "host_GiB": r["host_bytes"] / 2**30,
                "weights_GiB": r["weights_bytes"] / 2**30} for r in rows]
        print(_table(gib, ["method", "prompt_tokens", "batch", "stage", "peak_device_GiB", "host_GiB",
                           "weights_GiB"]))
        if args.fit_gib:
            fit = []
            for label, _, _ in parse_methods(args.methods):
                for T in lengths:
                    b, need = largest_batch(args.shape, label, T, args.dtype, int(args.fit_gib * 2**30),
                                            args.max_new_tokens, args.offload_hidden)
                    fit.append({"method": label, "prompt_tokens": T, "largest_batch": b if b else "does not fit",
                                "GiB_at_that_batch": need / 2**30})
            print(f"\nlargest batch in {args.fit_gib} GiB per device (weights included):")
            print(_table(fit, ["method", "prompt_tokens", "largest_batch", "GiB_at_that_batch"]))
            rows = {"rows": rows, "fit": fit}
    else:
        from pallas_kernels import bench as kb

        rows = kb.bench_score(lengths=tuple(int(x) for x in args.lengths.split(",")), shape=args.shape)
        print(f"\nkvjax bench score — {args.shape} shape, {machine()}")
        print(kb.format_table(rows))
    if getattr(args, "json", None):
        payload = rows if isinstance(rows, dict) else {"rows": rows}
        with open(args.json, "w") as f:
            json.dump({"machine": machine(), **payload}, f, indent=1, default=float)
    del jax
    return 0
