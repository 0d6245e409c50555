"""``kvjax bench``: speed and memory measurements (never run in tests; results are recorded in BENCHMARKS.md).

- ``generate``: prefill tokens/s and decode ms/token of a real model at several prompt lengths, side by
  side with Hugging Face transformers (torch CPU, float32) when it is importable.
- ``decode``: one decode step of full / yakv / shadowkv (and any other method) at long contexts on a
  model-shaped network with random weights and a random prefilled cache (no prefill is timed), with
  device bytes, host bytes and bytes fetched per step.
- ``score``: the landmark-scoring path against copy bandwidth (pallas_kernels.bench).
"""
from __future__ import annotations

import argparse
import datetime
import json
import platform
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


def bench_generate(model: str, dtype: str, lengths: list[int], steps: int, hf: bool) -> list[dict]:
    import jax
    import jax.numpy as jnp
    from tqdm import tqdm

    from models import load_model

    from .engine import Engine

    lm = load_model(model, dtype=dtype)
    cfg = lm.config
    eng = Engine(lm)
    rng = np.random.default_rng(0)
    rows = []
    for T in tqdm(lengths, desc="kvjax", unit="len"):
        ids = rng.integers(100, cfg.vocab_size - 100, size=T).tolist()
        toks, lens, Tb = eng.prepare([ids], steps + 1)

        def pre():
            lg, kv = eng.prefill(toks, lens)
            jax.block_until_ready(lg)
            return kv

        t_pre = _time(pre)
        kv = pre()
        state = eng.build(kv, lens, 64)
        del kv
        step = eng.step_fn(state)
        key = jax.random.key(0)
        tok = eng._put(np.array([5], np.int32))
        a = (jnp.float32(0), jnp.int32(0), jnp.float32(1))
        nxt, _, state = step(eng.params, state, tok, eng._put(lens), key, *a)
        jax.block_until_ready(nxt)
        t = time.perf_counter()
        for i in range(steps):
            nxt, _, state = step(eng.params, state, nxt, eng._put(lens + 1 + i), key, *a)
        jax.block_until_ready(nxt)
        dec = (time.perf_counter() - t) / steps
        rows.append({"impl": f"kvjax {dtype}", "prompt_tokens": T, "prefill_tok_s": T / t_pre,
                     "decode_ms_token": 1000 * dec})
        del state
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
    model = (Qwen3ForCausalLM(Qwen3Config(**kw)) if cfg.family == "qwen3" else LlamaForCausalLM(LlamaConfig(**kw)))
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
    import jax
    import jax.numpy as jnp
    from flax import nnx
    from tqdm import tqdm

    from models import PRESETS, LoadedModel, Transformer

    from .cache import KVCache
    from .engine import Engine
    from .policies import make_policy

    cfg = PRESETS[shape].replace(max_position_embeddings=max(lengths) + 1024)
    lm = LoadedModel(cfg, Transformer(cfg, dtype=jnp.dtype(dtype), rngs=nnx.Rngs(0)), None)
    rows = []
    for T in lengths:
        shape_kv = (cfg.num_layers, 1, cfg.num_kv_heads, T, cfg.head_dim)
        kk, kv_ = jax.random.split(jax.random.key(T))
        kv = KVCache(jax.random.normal(kk, shape_kv, jnp.float32).astype(dtype),
                     jax.random.normal(kv_, shape_kv, jnp.float32).astype(dtype))
        lens = np.array([T], np.int32)
        for label, m, opts in tqdm(parse_methods(",".join(methods)), desc=f"{T} tokens", unit="method"):
            try:
                eng = Engine(lm, policy=make_policy(m, **opts))
            except ValueError as e:
                print(f"skip {m}: {e}")
                continue
            state = eng.build(kv, lens, 64)
            rep = eng.policy.memory_report(state, lens)
            fetched = eng.policy.bytes_fetched_per_step(state)
            step = eng.step_fn(state)
            a = (jnp.float32(0), jnp.int32(0), jnp.float32(1))
            key = jax.random.key(0)
            tok = eng._put(np.array([7], np.int32))
            nxt, _, state = step(eng.params, state, tok, eng._put(lens), key, *a)
            jax.block_until_ready(nxt)
            t = time.perf_counter()
            for i in range(steps):
                nxt, _, state = step(eng.params, state, nxt, eng._put(lens + 1 + i), key, *a)
            jax.block_until_ready(nxt)
            ms = 1000 * (time.perf_counter() - t) / steps
            rows.append({"method": label, "prompt_tokens": T, "ms_per_step": ms,
                         "device_MB": rep["by_kind"].get("device", 0) / 2**20,
                         "host_MB": sum(v for k, v in rep["by_kind"].items() if k != "device") / 2**20,
                         "device_B_per_prompt_token": rep["per_prompt_token_variable"].get("device", 0.0),
                         "fetched_MB_per_step": fetched / 2**20})
            del state
        del kv
    return rows


def main(args) -> int:
    import jax

    if args.bench == "generate":
        rows = bench_generate(args.model, args.dtype, [int(x) for x in args.lengths.split(",")], args.decode_steps,
                              not args.no_hf)
        print(f"\nkvjax bench generate — {args.model}, {machine()}")
        print(_table(rows, ["impl", "prompt_tokens", "prefill_tok_s", "decode_ms_token"]))
    elif args.bench == "decode":
        if args.dtype is None:
            args.dtype = "float32" if jax.default_backend() == "cpu" else "bfloat16"
        rows = bench_decode(args.shape, args.methods.split(","), [int(x) for x in args.lengths.split(",")],
                            args.dtype, args.steps)
        print(f"\nkvjax bench decode — {args.shape}-shaped random model, {args.dtype}, {machine()}")
        print(_table(rows, ["method", "prompt_tokens", "ms_per_step", "device_MB", "host_MB",
                            "device_B_per_prompt_token", "fetched_MB_per_step"]))
    else:
        from pallas_kernels import bench as kb

        rows = kb.bench_score(lengths=tuple(int(x) for x in args.lengths.split(",")), shape=args.shape)
        print(f"\nkvjax bench score — {args.shape} shape, {machine()}")
        print(kb.format_table(rows))
    if getattr(args, "json", None):
        with open(args.json, "w") as f:
            json.dump({"machine": machine(), "rows": rows}, f, indent=1, default=float)
    del jax
    return 0
