"""Landmark-scoring speed against memory bandwidth and against full attention, on whatever machine runs it.

For each landmark count ``T`` (one landmark per prompt token, YAKV's chunk size 1) :func:`bench_score` measures:

* ``score_ms``: one scoring call through :func:`pallas_kernels.dispatch.score_landmarks` (the path that runs
  here: the jitted reference on CPU, the Pallas kernel on TPU and GPU), best of ``repeats`` after a warm-up call
  (``score_ms_median`` too). Every time in a row is a best-of-``repeats``: on a shared machine the best call is
  the one least disturbed by other processes, and all ratios use the same statistic. On an accelerator the
  inputs are stacked over ``layers`` independent layers (default 8) scored one after the other in one jitted
  ``lax.map`` — the decode step's access pattern — and every time is per layer, so that the bytes read exceed the
  GPU's L2 (50 MB on an H200; one layer at 128K landmarks of the paper shape is 38 MB);
* ``score_GBps``: landmark bytes read (uint8 codes + float32 scales) per second;
* ``copy_GBps``: the same number of bytes streamed by a plain jitted elementwise copy (``x + 1`` on a uint8
  buffer of that size, donated so it runs in place and no fresh output pages are faulted in), same run; the
  targets use it. ``copy_alloc_GBps`` is a plain ``jnp.copy`` into a fresh output, which on XLA CPU also pays
  for allocating and faulting in the output pages (several times slower above the L3 size);
* ``stream_GBps = 2 * copy_GBps`` (the in-place copy reads and writes every byte) is the measured HBM
  bandwidth, and ``hbm_frac = score_GBps / stream_GBps`` the fraction of it the scorer reaches on the bytes it
  must read;
* ``attn_ns_per_token``: full one-query attention (all heads, bf16 K and V of ``T`` tokens, through
  :func:`pallas_kernels.dispatch.decode_attention`) divided by ``T``; ``score_ns_per_landmark`` likewise.

Targets (reported, never asserted): ``bw_frac = score_GBps / copy_GBps >= 0.25`` from 32K landmarks up, and
``cost_ratio = score_ns_per_landmark / attn_ns_per_token <= 0.25``; on GPU/TPU also ``hbm_frac >= 0.5`` at 128K
landmarks.

Rows: ``dispatch[<setting>]`` is the dispatched path; on GPU/TPU ``dispatch[reference]`` times the jnp reference
on the same device, and on GPU ``gpu[tb=..,w=..]`` rows time :func:`pallas_kernels.score_gpu.score_landmarks_gpu`
with other block sizes / warp counts at the largest ``T`` (a small tuning sweep); ``ref:<method>`` rows are the
reference formulations asked for with ``ref_methods``.

Shapes: ``"smollm2"`` (Hkv=3, G=3, D=64, SmolLM2-135M) and ``"paper"`` (Hkv=8, G=4, D=128, Llama-3.1-8B).
Codes are EDEN4-256 (``d=4``, 2 bits/value) unless ``d`` says otherwise; values are random (speed does not depend
on them).

Optimisation record for the CPU reference (details and numbers in :mod:`pallas_kernels.score`): one-hot einsums
(~5 s at 32K, paper shape) < dequantize-then-einsum (~100 ms) < float32 table gather + sum (~25 ms) < float32
gather with unrolled adds (~4.3 ms) < complex64 gather of two tables, fused with the sum (~1-2 ms, kept).
"""
from __future__ import annotations

import statistics
import time

import jax
import jax.numpy as jnp

from pallas_kernels import dispatch
from pallas_kernels.score_gpu import score_landmarks_gpu

__all__ = ["SHAPES", "bench_score", "format_table"]

SHAPES = {
    "smollm2": dict(kv_heads=3, group=3, head_dim=64),
    "paper": dict(kv_heads=8, group=4, head_dim=128),
}
_TARGET_BW = 0.25
_TARGET_COST = 0.25
_TARGET_MIN_T = 32768
_TARGET_HBM = 0.5
_TARGET_HBM_T = 131072
_ACCEL_LAYERS = 8
_GPU_SWEEP = ((128, 4), (256, 8), (512, 8), (1024, 8))   # (block_tokens, num_warps) besides the default (256, 4)


def _timed(fn, args, repeats: int) -> tuple[float, float]:
    """(best, median) seconds of ``repeats`` calls after a compile + warm-up call."""
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return min(times), statistics.median(times)


def _copy_timed(nbytes: int, repeats: int, in_place: bool = True) -> tuple[float, float]:
    """Best/median seconds of an elementwise pass over ``nbytes`` bytes: ``x + 1`` donated (in place), or a
    plain ``jnp.copy`` into a freshly allocated output (``in_place=False``: includes XLA's allocation and the
    page faults of new output pages)."""
    if not in_place:
        buf = jnp.zeros((nbytes,), jnp.uint8)
        return _timed(jax.jit(jnp.copy), (buf,), repeats)
    step = jax.jit(lambda x: x + jnp.uint8(1), donate_argnums=0)
    buf = jnp.zeros((nbytes,), jnp.uint8)
    buf = jax.block_until_ready(step(buf))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        buf = jax.block_until_ready(step(buf))
        times.append(time.perf_counter() - t0)
    del buf
    return min(times), statistics.median(times)


def _layered(fn, layers: int):
    """``fn(q, codes, scales, grid, lengths)`` of one layer -> jitted, over ``[layers, ...]`` codes and scales
    (``lax.map``: one layer after the other); plain ``jit(fn)`` for one layer."""
    if layers == 1:
        return jax.jit(fn)
    return jax.jit(lambda q, c, s, g, n: jax.lax.map(lambda cs: fn(q, cs[0], cs[1], g, n), (c, s)))


def bench_score(lengths=(8192, 16384, 32768, 65536, 131072), *, shape: str = "smollm2", batch: int = 1,
                modes=("serve", "eval"), d: int = 4, repeats: int = 10, ref_methods=(), attention: bool = True,
                layers: int | None = None, seed: int = 0) -> list[dict]:
    """Measure landmark scoring on this machine; one row per (landmark count, mode, method).

    Args:
      lengths: landmark counts ``T`` to measure.
      shape: "smollm2" or "paper" (see :data:`SHAPES`).
      batch: sequences per call (all with ``T`` valid landmarks).
      modes: scoring rules to time, "serve" (group-mean dot) and/or "eval" (per-head softmax, max over group).
      d: grid dimension of the codes (4: 2 bits/value, 2: 4 bits/value), ``n = 256``.
      repeats: timed calls per measurement (best reported; scoring also reports the median).
      ref_methods: extra reference formulations to time besides the dispatched path, e.g.
        ``("lut_f32", "dequant")`` (see :data:`pallas_kernels.score.REF_METHODS`).
      attention: also time full one-query attention (skip it to save time/memory).
      layers: independent layers scored per timed call (times are per layer); default 1 on CPU, 8 elsewhere.
      seed: PRNG seed of the random inputs.

    Returns:
      list of dicts with keys ``shape, mode, method, platform, landmarks, batch, layers, kv_heads, group,
      head_dim, d, MB_read, score_ms, score_ms_median, score_GBps, copy_ms, copy_GBps, copy_alloc_GBps,
      stream_GBps, bw_frac, hbm_frac, attn_ms, attn_ns_per_token, score_ns_per_landmark, cost_ratio,
      bw_target_met, cost_target_met, hbm_target_met`` (per layer; targets ``None`` where they do not apply or
      were not measured).
    """
    if shape not in SHAPES:
        raise ValueError(f"shape={shape!r}: expected one of {sorted(SHAPES)}")
    if d not in (1, 2, 4, 8, 16):
        raise ValueError(f"d={d}: expected a power of two dividing the head dim (2 or 4 for EDEN-256 grids)")
    cfg = SHAPES[shape]
    Hkv, G, D = cfg["kv_heads"], cfg["group"], cfg["head_dim"]
    J = D // d
    platform = jax.default_backend()
    accel = platform != "cpu"
    layers = (_ACCEL_LAYERS if accel else 1) if layers is None else int(layers)
    if layers < 1:
        raise ValueError(f"layers={layers}: expected >= 1 layers per timed call")
    backend = dispatch.resolve_backend()
    rows = []
    key = jax.random.key(seed)
    for T in lengths:
        T = int(T)
        if T < 1:
            raise ValueError(f"lengths contains {T}: landmark counts must be >= 1")
        k1, k2, k3, k4, k5, key = jax.random.split(key, 6)
        lead = (layers,) if layers > 1 else ()
        codes = jax.jit(lambda k: jax.random.randint(k, lead + (batch, Hkv, T, J), 0, 256, jnp.int32).astype(
            jnp.uint8))(k1)
        scales = jax.random.uniform(k2, lead + (batch, Hkv, T), jnp.float32, 0.5, 2.0)
        grid = jax.random.normal(k3, (256, d), jnp.float32)
        q = jax.random.normal(k4, (batch, Hkv * G, D), jnp.bfloat16)
        lens = jnp.full((batch,), T, jnp.int32)
        nbytes = (codes.size + scales.size * 4) // layers                 # per layer

        copy_s, _ = _copy_timed(nbytes * layers, repeats)
        copy_alloc_s, _ = _copy_timed(nbytes * layers, repeats, in_place=False)
        copy_s, copy_alloc_s = copy_s / layers, copy_alloc_s / layers
        attn_s = None
        if attention:
            kk, kv = jax.random.split(k5)
            kc = jax.random.normal(kk, (batch, Hkv, T, D), jnp.bfloat16)
            vc = jax.random.normal(kv, (batch, Hkv, T, D), jnp.bfloat16)
            attn_s, _ = _timed(jax.jit(dispatch.decode_attention), (q, kc, vc), repeats)
            del kc, vc

        for mode in modes:
            variants = [(f"dispatch[{backend}]", lambda *a, _m=mode: dispatch.score_landmarks(*a, mode=_m))]
            if accel:
                variants.append(("dispatch[reference]", lambda *a, _m=mode: dispatch.score_landmarks(
                    *a, mode=_m, use_kernels=False)))
            if platform == "gpu" and T == max(int(x) for x in lengths):
                for tb, w in _GPU_SWEEP:
                    variants.append((f"gpu[tb={tb},w={w}]", lambda *a, _m=mode, _tb=tb, _w=w: score_landmarks_gpu(
                        *a, mode=_m, block_tokens=_tb, num_warps=_w)))
            for rm in ref_methods:
                variants.append((f"ref:{rm}", lambda *a, _m=mode, _r=rm: dispatch.score_landmarks(
                    *a, mode=_m, use_kernels=False, ref_method=_r)))
            for name, fn in variants:
                s, s_med = _timed(_layered(fn, layers), (q, codes, scales, grid, lens), repeats)
                s, s_med = s / layers, s_med / layers
                per_lm = s / (batch * T) * 1e9
                row = dict(
                    shape=shape, mode=mode, method=name, platform=platform, landmarks=T, batch=batch, layers=layers,
                    kv_heads=Hkv, group=G, head_dim=D, d=d, MB_read=nbytes / 1e6,
                    score_ms=s * 1e3, score_ms_median=s_med * 1e3, score_GBps=nbytes / s / 1e9,
                    copy_ms=copy_s * 1e3, copy_GBps=nbytes / copy_s / 1e9,
                    copy_alloc_GBps=nbytes / copy_alloc_s / 1e9,
                    stream_GBps=2 * nbytes / copy_s / 1e9,
                    bw_frac=copy_s / s,
                    hbm_frac=copy_s / (2 * s),
                    attn_ms=None if attn_s is None else attn_s * 1e3,
                    attn_ns_per_token=None if attn_s is None else attn_s / (batch * T) * 1e9,
                    score_ns_per_landmark=per_lm,
                    cost_ratio=None if attn_s is None else s / attn_s,
                )
                row["bw_target_met"] = (row["bw_frac"] >= _TARGET_BW) if T >= _TARGET_MIN_T else None
                row["cost_target_met"] = None if attn_s is None else row["cost_ratio"] <= _TARGET_COST
                row["hbm_target_met"] = (row["hbm_frac"] >= _TARGET_HBM) if accel and T >= _TARGET_HBM_T else None
                rows.append(row)
        del codes, scales
    return rows


_COLUMNS = [
    ("landmarks", "T"), ("mode", "mode"), ("method", "method"), ("MB_read", "MB"), ("score_ms", "score ms"),
    ("score_GBps", "score GB/s"), ("copy_GBps", "copy GB/s"), ("copy_alloc_GBps", "alloc-copy GB/s"),
    ("bw_frac", "score/copy"), ("stream_GBps", "HBM GB/s"), ("hbm_frac", "score/HBM"),
    ("attn_ms", "attn ms"), ("score_ns_per_landmark", "ns/landmark"), ("attn_ns_per_token", "attn ns/token"),
    ("cost_ratio", "cost ratio"), ("bw_target_met", ">=25% copy"), ("cost_target_met", "<=1/4 attn"),
    ("hbm_target_met", ">=50% HBM"),
]


def _cell(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
    return str(v)


def format_table(rows: list[dict]) -> str:
    """Markdown table of :func:`bench_score` rows (shape/platform in a heading line)."""
    if not rows:
        return "(no rows)"
    head = {(r["shape"], r["platform"], r["kv_heads"], r["group"], r["head_dim"], r["d"], r["batch"], r["layers"])
            for r in rows}
    lines = [f"shape={s} platform={p} Hkv={h} G={g} D={dd} d={d} batch={b} layers={n} (times per layer)"
             for s, p, h, g, dd, d, b, n in sorted(head)]
    lines.append("| " + " | ".join(t for _, t in _COLUMNS) + " |")
    lines.append("|" + "---|" * len(_COLUMNS))
    for r in rows:
        lines.append("| " + " | ".join(_cell(r.get(k)) for k, _ in _COLUMNS) + " |")
    lines.append(f"targets: score/copy >= {_TARGET_BW} at T >= {_TARGET_MIN_T}; cost ratio "
                 f"(score ns/landmark over attention ns/token) <= {_TARGET_COST}; on GPU/TPU score/HBM >= "
                 f"{_TARGET_HBM} at T >= {_TARGET_HBM_T}")
    return "\n".join(lines)


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="smollm2", choices=sorted(SHAPES))
    ap.add_argument("--lengths", default="8192,16384,32768,65536,131072")
    ap.add_argument("--ref-methods", default="", help="comma list of extra reference formulations")
    a = ap.parse_args()
    print(format_table(bench_score(tuple(int(x) for x in a.lengths.split(",")), shape=a.shape,
                                   ref_methods=tuple(m for m in a.ref_methods.split(",") if m))))
