"""YAKV landmark scoring against HIGGS-quantized keys: a Pallas TPU kernel and its pure-jnp reference.

Inputs (fixed by the rest of kvjax; HIGGS with one Hadamard group per KV head, so ``G_had = D``):

* ``q``       ``[B, H, D]`` bf16/f32, post-RoPE queries; query head ``h`` uses KV head ``h // (H // Hkv)``.
* ``codes``   uint8 ``[B, Hkv, T, J]``, ``J = D / d``: one byte = one grid index of a ``d``-sub-vector
  (EDEN4-256: ``d = 4``, 2 bits/value; EDEN2-256: ``d = 2``, 4 bits/value).
* ``scales``  float32 ``[B, Hkv, T]``: ``s = ||k||_2`` of that head's key.
* ``grid``    float32 ``[n, d]`` with ``n <= 256``: the EDEN codebook, passed as an array.
* ``lengths`` int32 ``[B]``: landmark ``t`` of row ``b`` is valid iff ``t < lengths[b]``.

The dequantized landmark is ``l = (1/D) H_D (s * concat_j grid[code_j])`` (``H_D`` the unnormalised
Sylvester Hadamard, ``H H = D I``, symmetric). Hence ``q . l = (s / D) (H_D q) . y_hat``: rotating the query
once turns every ``d``-sub-vector into a table lookup. We build a **query-side lookup table**

    LUT[b, kv, p, j, c] = coef * sum_k (H_D q_p)[j*d + k] * grid[c, k]          (float32, [B, Hkv, P, J, 256])

and score ``raw[p, t] = s_t * sum_j LUT[p, j, codes[t, j]]``. ``P`` is the number of query vectors per KV head.

Two scoring rules (algorithms.md §3.1 / §3.2):

* ``mode="eval"`` (paper accuracy path): ``P = G``, ``coef = 1/(D sqrt(D))``; per query head a softmax over all
  valid landmarks in float32, cast to bf16, then the max over the GQA group. Output bf16 ``[B, Hkv, T]``.
  Differences from the authors' code, on purpose: their landmarks are dequantized to bf16 and their logits come out
  of a bf16 matmul (bf16-rounded); we keep the logits in float32.
* ``mode="serve"`` (mini-sglang inference path): ``P = 1``, the query is the float32 mean of the group's queries,
  ``coef = 1/D``; score ``= q_bar . l`` with no scale and no softmax. Output float32 ``[B, Hkv, T]`` (their path
  stores it as bf16; cast it if you want their ties). The mean is taken in float32, theirs in bf16.

Invalid landmarks (``t >= lengths[b]``) get ``-inf`` in both modes, so any top-k ranks them last.

Layer-stacked landmarks: with ``layer`` (an int32 scalar, traced) ``codes`` is ``[L, B, Hkv, T, J]`` and ``scales``
``[L, B, Hkv, T]``, and that layer is scored; the kernels read it in place (``codes[layer]`` passed to a kernel
would first be copied whole by XLA, tripling the bytes the scorer moves).

Design: query-side LUT, not in-kernel dequantization
----------------------------------------------------
Per token and KV head, dequantize-then-dot needs ``D`` grid lookups (``J`` sub-vectors of ``d`` values) and then
``P * D`` multiply-adds on the MXU; the LUT needs ``P * J = P * D / d`` lookups and no matmul. For the shapes we
serve (``G <= d`` for Llama/Qwen3/SmolLM2 with EDEN4: paper G=4, smollm2 G=3; serving mode ``P = 1``) the LUT does
no more lookups and removes the matmul (Qwen3-30B-A3B's G = 8 in eval mode is the exception: twice the lookups,
still no matmul). The tables cost ``B Hkv P J 256`` floats, built once per call (1 MiB for
the paper's shape in eval mode, 256 KiB in serve mode).

On TPU (reasoning; no TPU was available to measure): the MXU cannot help with an opaque 256-entry codebook — a
one-hot matmul costs 256 compares + 256 MACs per lookup, about 16x the VPU work of the gather below and ~50x the
HBM time of reading the codes. A one-query matmul against dequantized landmarks is also MXU-weight-load bound
(~1 cycle per token per KV head at D = 128). The kernel therefore puts tokens on lanes and does the lookups as
in-register lane gathers (``jnp.take_along_axis`` -> ``tpu.dynamic_gather``) of two 128-entry half tables,
selected by the code's top bit: per 128 tokens, ``P`` x 2 gathers of ``[J, 128]`` plus a sublane sum.
``method="onehot"`` is a fallback built only from compares and NT matmuls, in case a Mosaic version rejects the
gather or the ``[128, J] -> [J, 128]`` transpose; both lower for TPU from CPU (tests), neither was compiled
by libtpu here.

TPU tiling: one grid step holds all KV heads of ``TB`` tokens (``TB`` a multiple of 128) so the
``[Hkv, TB]`` scale/output blocks satisfy the (8, 128) rule (a block of one KV head would put a size-1 dim in the
second-minor slot, which Pallas rejects); codes ``[Hkv, TB, J]`` have ``J`` = the full minor dim and ``TB`` a
multiple of the 32-row uint8 tile. Tokens past ``T`` in the last block are masked; blocks wholly past a row's
length are not fetched again (index map clamped) and not computed. The eval mode runs two phases over the tokens
in one ``pallas_call`` (grid ``(B, 2, nT)``): phase 0 keeps a lane-wise online max/sum-exp per query head in VMEM
(no cross-lane reduction per block), phase 1 folds the 128 lanes into the softmax normaliser once and writes
``max_g bf16(exp(s - m) / l)``. It reads the codes twice (2 x 36 B per token per KV head at the paper's shape)
instead of writing and re-reading float32 logits (G x 4 B, twice).

HBM layout caveat: XLA stores ``u8[..., T, 32]`` with its minor dim padded to 128 lanes on TPU, so each code row
costs 128 B of HBM traffic instead of 32. A producer that stores ``[B, Hkv, J, T]`` would remove that padding and
the in-kernel transpose; the format here is fixed by the rest of the project.

CPU reference: what was measured (this machine: 2 AMD EPYC vCPUs, XLA CPU, jax 0.10.2, paper shape Hkv=8, D=128,
d=4, T=32768, B=1; one Hkv*T*J = 8.4 M lookups per query vector; other jobs shared the cores, so +-2x noise)

==============================================  =============  ==============
formulation                                      P=1 (serve)     P=4 (eval)
==============================================  =============  ==============
one-hot(256) einsum                              ~5000 ms          -
nibble one-hot (16x16) einsum                    ~5000 ms          -
dequant grid[codes] then einsum with H q        ~100-112 ms     ~120-144 ms
float32 LUT gather + jnp.sum over J               23-30 ms       120-230 ms
float32 LUT gather, J unrolled adds                4.2-4.5 ms     17-23 ms
complex64 LUT (two tables per gather) + sum       1.0-2.0 ms      3.5-5.1 ms
==============================================  =============  ==============

Pallas interpret mode on the same CPU (paper shape, T=4096, best of 5; interpret timings only rank the two
kernel bodies, they say nothing absolute about TPU): serve ``gather`` 7.9 ms vs ``onehot`` 160 ms, eval 50 ms vs
236 ms — the ~16-20x op-count gap estimated above for TPU; the reference ("lut") took 0.4 / 1.2 ms.

The float32 gather + ``jnp.sum`` is slow because XLA CPU sends float32 reductions to a separate YNNPACK fusion,
which materialises the gathered ``[.., T, J]`` array; a complex64 reduction stays in one loop fusion with the
gather, and complex64 packs two query tables into one 8-byte gather. XLA also splits reductions longer than 32
into reduce-window + reduce (breaking the fusion: d=2 codes, J=64, went from 2.5 ms to 62 ms), so the reference
sums ``J`` in chunks of 32. ``method="lut"`` (default) is that formulation; ``"lut_f32"`` and ``"dequant"`` are
kept for the benchmark. These are XLA CPU fusion heuristics of jax 0.10.2, not guarantees; pallas_kernels.bench
re-measures them. Also tried for the eval mode (``P = G`` tables), without a gain beyond the noise: one pass per
table (complex with a zero imaginary part, which XLA turns into a fused float32 gather), a variadic reduce of all
tables in one fusion, and an optimisation barrier between the reduce and the real/imag split.

Where this leaves the CPU path (pallas_kernels.bench, best of 10, 2 shared vCPUs under load): the serving rule
reaches 2-6 GB/s of landmark bytes, i.e. 6-16 % of an in-place copy at 32K-131K landmarks (target 25 %), and
costs 0.01-0.23 of full attention per cached token (target <= 0.25); the eval rule is 4-22x slower than the
serving rule (G/2 table passes plus three softmax passes, and more exposed to the load). The remaining cost is one
scalar table load per (token, sub-vector), about 1 cycle each; XLA CPU emits no SIMD in-register lookups.
"""
from __future__ import annotations

import functools
import math
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.stacked import per_layer, stacked_args

__all__ = [
    "MODES",
    "REF_METHODS",
    "KERNEL_METHODS",
    "query_tables",
    "score_landmarks_ref",
    "score_landmarks_kernel",
    "check_score_inputs",
]

Mode = Literal["eval", "serve"]
MODES = ("eval", "serve")
REF_METHODS = ("lut", "lut_f32", "dequant")
KERNEL_METHODS = ("gather", "onehot")

_TABLE = 256          # LUT entries per sub-vector (uint8 codes), padded from n
_LANES = 128
_NEG = -1e30          # finite "minus infinity" for running maxima (keeps exp(m_old - m_new) finite)
_REDUCE_CHUNK = 32    # XLA CPU keeps gather+reduce fused for reductions of <= 32 elements
_HI = lax.Precision.HIGHEST


def _hadamard(n: int) -> np.ndarray:
    """Unnormalised Sylvester Hadamard matrix ``H_n`` (n a power of two), float32 ``[n, n]``."""
    h = np.ones((1, 1), np.float32)
    while h.shape[0] < n:
        h = np.block([[h, h], [h, -h]])
    return h


def check_score_inputs(q, codes, scales, grid, lengths, mode: str = "eval", layer=None) -> tuple[int, ...]:
    """Validate shapes/dtypes of the scoring inputs; returns ``(B, H, D, Hkv, T, J, n, d)``. With ``layer``,
    ``codes``/``scales`` carry a leading layer axis.

    Raises ValueError naming the argument, its value and what is allowed.
    """
    if layer is not None:
        if codes.ndim != 5 or codes.shape[:1] != scales.shape[:1]:
            raise ValueError(f"codes.shape={tuple(codes.shape)}, scales.shape={tuple(scales.shape)}: expected "
                             "[L, B, Hkv, T, D/d] and [L, B, Hkv, T] with layer= given")
        codes, scales = per_layer(layer, codes=codes, scales=scales)
    if mode not in MODES:
        raise ValueError(f"mode={mode!r}: expected one of {MODES}")
    if q.ndim != 3:
        raise ValueError(f"q.shape={tuple(q.shape)}: expected [B, H, D] (3 dims)")
    if q.dtype not in (jnp.bfloat16, jnp.float32, jnp.float16):
        raise ValueError(f"q.dtype={q.dtype}: expected bfloat16, float16 or float32")
    B, H, D = q.shape
    if D < 2 or D & (D - 1):
        raise ValueError(f"head dim D={D} (q.shape[-1]): expected a power of two >= 2 (one Hadamard group per head)")
    if codes.ndim != 4 or codes.dtype != jnp.uint8:
        raise ValueError(f"codes: shape {tuple(codes.shape)} dtype {codes.dtype}: expected uint8 [B, Hkv, T, D/d]")
    Bc, Hkv, T, J = codes.shape
    if Bc != B:
        raise ValueError(f"codes.shape[0]={Bc}: expected the batch size of q, {B}")
    if Hkv < 1 or H % Hkv:
        raise ValueError(f"codes.shape[1]={Hkv} KV heads: must divide the {H} query heads of q")
    if grid.ndim != 2:
        raise ValueError(f"grid.shape={tuple(grid.shape)}: expected [n, d]")
    n, d = grid.shape
    if not 1 <= n <= _TABLE:
        raise ValueError(f"grid has n={n} points: expected 1..256 (indices are uint8)")
    if d * J != D:
        raise ValueError(f"codes.shape[-1]={J} sub-vectors of grid dim d={d} cover {d * J} values: expected D={D}")
    if tuple(scales.shape) != (B, Hkv, T):
        raise ValueError(f"scales.shape={tuple(scales.shape)}: expected [B, Hkv, T] = {(B, Hkv, T)}")
    if tuple(lengths.shape) != (B,):
        raise ValueError(f"lengths.shape={tuple(lengths.shape)}: expected [B] = {(B,)}")
    if not jnp.issubdtype(lengths.dtype, jnp.integer):
        raise ValueError(f"lengths.dtype={lengths.dtype}: expected an integer dtype (number of valid landmarks)")
    return B, H, D, Hkv, T, J, n, d


def query_tables(q, grid, num_kv_heads: int, mode: Mode = "eval") -> jax.Array:
    """Query-side lookup tables ``LUT[b, kv, p, j, c]``, float32 ``[B, Hkv, P, J, 256]``.

    ``LUT[.., p, j, c] = coef * (H_D q_p)[j*d:(j+1)*d] . grid[c]`` with ``q_p`` the group's query heads
    (``mode="eval"``: ``P = G``, ``coef = D**-1.5``) or their float32 mean (``mode="serve"``: ``P = 1``,
    ``coef = 1/D``). Entries ``c >= n`` are zero. ``s_t * sum_j LUT[.., p, j, codes[t, j]]`` is then the score of
    landmark ``t`` (before masking / softmax).
    """
    B, H, D = q.shape
    n, d = grid.shape
    G = H // num_kv_heads
    J = D // d
    qf = q.astype(jnp.float32).reshape(B, num_kv_heads, G, D)
    if mode == "serve":
        qf = jnp.mean(qf, axis=2, keepdims=True)
        coef = 1.0 / D
    else:
        coef = 1.0 / (D * math.sqrt(D))
    P = qf.shape[2]
    qh = jnp.einsum("bhpd,de->bhpe", qf, jnp.asarray(_hadamard(D)), precision=_HI)
    lut = jnp.einsum("bhpjk,ck->bhpjc", qh.reshape(B, num_kv_heads, P, J, d), grid.astype(jnp.float32),
                     precision=_HI) * jnp.float32(coef)
    if n < _TABLE:
        lut = jnp.pad(lut, ((0, 0),) * 4 + ((0, _TABLE - n),))
    return lut


def _valid_mask(lengths, T: int):
    """bool ``[B, 1, T]``: landmark ``t`` of row ``b`` is valid iff ``t < lengths[b]``."""
    return jnp.arange(T, dtype=jnp.int32)[None, None, :] < lengths.astype(jnp.int32)[:, None, None]


def _finish(raw, lengths, mode: Mode):
    """Masking and the scoring rule on raw scores ``[B, Hkv, P, T]`` (float32) -> ``[B, Hkv, T]``."""
    T = raw.shape[-1]
    valid = _valid_mask(lengths, T)                                      # [B, 1, T]
    if mode == "serve":
        return jnp.where(valid, raw[:, :, 0], -jnp.inf)
    x = jnp.where(valid[:, :, None, :], raw, -jnp.inf)                   # [B, Hkv, G, T]
    m = jnp.max(x, axis=-1, keepdims=True)
    m = jnp.where(jnp.isfinite(m), m, 0.0)                               # rows with no valid landmark
    e = jnp.exp(x - m)
    z = jnp.sum(e, axis=-1, keepdims=True)
    p = (e / jnp.where(z > 0, z, 1.0)).astype(jnp.bfloat16)              # softmax in f32, cast to bf16
    out = jnp.max(p, axis=2)                                             # max over the GQA group
    return jnp.where(valid, out, -jnp.inf).astype(jnp.bfloat16)


def _raw_lut_c64(codes, lut):
    """``raw[b, kv, p, t] = sum_j lut[b, kv, p, j, codes[b, kv, t, j]]`` via complex64 gathers (two tables each)."""
    B, Hkv, T, J = codes.shape
    P = lut.shape[2]
    if P % 2:
        lut = jnp.concatenate([lut, jnp.zeros_like(lut[:, :, :1])], axis=2)
    pairs = lax.complex(lut[:, :, 0::2], lut[:, :, 1::2])                # [B, Hkv, P2, J, 256]
    pairs = jnp.moveaxis(pairs, 2, 0).reshape(pairs.shape[2], -1)        # [P2, B*Hkv*J*256]
    base = (jnp.arange(B * Hkv, dtype=jnp.int32).reshape(B, Hkv, 1, 1) * J
            + jnp.arange(J, dtype=jnp.int32)) * _TABLE
    idx = base + codes.astype(jnp.int32)                                 # [B, Hkv, T, J]
    outs = []
    for i in range(pairs.shape[0]):
        parts = [jnp.sum(pairs[i].at[idx[..., s:s + _REDUCE_CHUNK]].get(mode="promise_in_bounds"), axis=-1)
                 for s in range(0, J, _REDUCE_CHUNK)]
        acc = functools.reduce(jnp.add, parts)                           # [B, Hkv, T] complex64
        outs += [jnp.real(acc), jnp.imag(acc)]
    return jnp.stack(outs[:P], axis=2)                                   # [B, Hkv, P, T]


def _raw_lut_f32(codes, lut):
    """Same as :func:`_raw_lut_c64` with float32 scalar gathers and one ``jnp.sum`` (slow on XLA CPU; benchmark)."""
    B, Hkv, T, J = codes.shape
    P = lut.shape[2]
    flat = jnp.moveaxis(lut, 2, 0).reshape(P, -1)
    base = (jnp.arange(B * Hkv, dtype=jnp.int32).reshape(B, Hkv, 1, 1) * J
            + jnp.arange(J, dtype=jnp.int32)) * _TABLE
    idx = base + codes.astype(jnp.int32)
    return jnp.stack([jnp.sum(flat[p].at[idx].get(mode="promise_in_bounds"), axis=-1) for p in range(P)], axis=2)


def _raw_dequant(q, codes, grid, num_kv_heads: int, mode: Mode):
    """Dequantize-then-dot: ``y_hat = grid[codes]`` then ``(H_D q) . y_hat`` (the landmark is never rotated back)."""
    B, H, D = q.shape
    _, Hkv, T, J = codes.shape
    G = H // num_kv_heads
    qf = q.astype(jnp.float32).reshape(B, Hkv, G, D)
    if mode == "serve":
        qf = jnp.mean(qf, axis=2, keepdims=True)
        coef = 1.0 / D
    else:
        coef = 1.0 / (D * math.sqrt(D))
    qh = jnp.einsum("bhpd,de->bhpe", qf, jnp.asarray(_hadamard(D)), precision=_HI) * jnp.float32(coef)
    y = jnp.take(grid.astype(jnp.float32), codes.astype(jnp.int32), axis=0, mode="clip").reshape(B, Hkv, T, D)
    return jnp.einsum("bhtd,bhpd->bhpt", y, qh, precision=_HI)


def score_landmarks_ref(q, codes, scales, grid, lengths, *, mode: Mode = "eval", method: str = "lut", layer=None):
    """Landmark scores, pure jnp (the path that runs on CPU and GPU).

    Args:
      q: ``[B, H, D]`` bf16/f32 post-RoPE queries.
      codes: uint8 ``[B, Hkv, T, D/d]`` HIGGS grid indices (one Hadamard group per KV head).
      scales: float32 ``[B, Hkv, T]`` per-landmark norms.
      grid: float32 ``[n, d]`` codebook, ``n <= 256``.
      lengths: int ``[B]`` valid landmarks per row (values outside ``[0, T]`` are clipped).
      mode: ``"eval"`` (per-head softmax, bf16, max over the group) or ``"serve"`` (group-mean query dot).
      method: ``"lut"`` (complex64 query tables, default and fastest on XLA CPU), ``"lut_f32"`` or ``"dequant"``.
      layer: int scalar; ``codes``/``scales`` are then layer-stacked (module docstring).

    Returns:
      ``[B, Hkv, T]``: bf16 in eval mode, float32 in serve mode; ``-inf`` where ``t >= lengths[b]``.
    """
    check_score_inputs(q, codes, scales, grid, lengths, mode, layer)
    if layer is not None:
        layer = jnp.asarray(layer, jnp.int32)
        codes = lax.dynamic_index_in_dim(codes, layer, 0, keepdims=False)
        scales = lax.dynamic_index_in_dim(scales, layer, 0, keepdims=False)
    _, H, D, Hkv, T, J, n, d = check_score_inputs(q, codes, scales, grid, lengths, mode)
    if method not in REF_METHODS:
        raise ValueError(f"method={method!r}: expected one of {REF_METHODS}")
    lengths = jnp.clip(lengths.astype(jnp.int32), 0, T)
    if method == "dequant":
        raw = _raw_dequant(q, codes, grid, Hkv, mode)
    else:
        lut = query_tables(q, grid, Hkv, mode)
        raw = _raw_lut_c64(codes, lut) if method == "lut" else _raw_lut_f32(codes, lut)
    raw = raw * scales.astype(jnp.float32)[:, :, None, :]
    return _finish(raw, lengths, mode)


# ------------------------------------------------------------------------------------------------------- kernel


def _lookup_gather(codes_ref, lut_ref, h, k: int, P: int):
    """Per-query-vector table sums for the 128 tokens of chunk ``k`` of KV head ``h``: P arrays ``[1, 128]``.

    Tokens on lanes: ``[128, J]`` codes -> int32 -> ``[J, 128]``; each table row ``j`` is split in two 128-lane
    halves and gathered in-register (``take_along_axis`` on the lane axis), the code's top bit picks the half.
    """
    c = codes_ref[h, pl.ds(k * _LANES, _LANES), :].astype(jnp.int32).T          # [J, 128]
    lo = c & (_LANES - 1)
    hi = c >= _LANES
    out = []
    for p in range(P):
        a = jnp.take_along_axis(lut_ref[h, p, :, :_LANES], lo, axis=1, mode="promise_in_bounds")
        b = jnp.take_along_axis(lut_ref[h, p, :, _LANES:], lo, axis=1, mode="promise_in_bounds")
        out.append(jnp.sum(jnp.where(hi, b, a), axis=0, keepdims=True))        # [1, 128]
    return out


def _lookup_onehot(codes_ref, lut_ref, h, k: int, P: int):
    """Fallback of :func:`_lookup_gather` from compares and NT matmuls only; ``lut_ref`` is ``[Hkv, J, P, 256]``."""
    c = codes_ref[h, pl.ds(k * _LANES, _LANES), :].astype(jnp.int32)            # [128, J]
    J = c.shape[1]
    iota = lax.broadcasted_iota(jnp.int32, (_LANES, _TABLE), 1)
    acc = jnp.zeros((P, _LANES), jnp.float32)
    for j in range(J):
        onehot = (c[:, j:j + 1] == iota).astype(jnp.float32)                     # [128, 256]
        acc = acc + lax.dot_general(lut_ref[h, j], onehot, (((1,), (1,)), ((), ())), precision=_HI,
                                    preferred_element_type=jnp.float32)          # [P, 128]
    return [acc[p:p + 1] for p in range(P)]


def _score_kernel(len_ref, lay_ref, codes_ref, scales_ref, lut_ref, out_ref, *scratch, Hkv: int, P: int, TB: int,
                  mode: str, method: str):
    """One grid step: all KV heads, ``TB`` tokens. Grid ``(B, phases, nT)``; see the module docstring."""
    b = pl.program_id(0)
    phase = pl.program_id(1)
    t = pl.program_id(2)
    length = len_ref[b]
    start = t * TB
    live = start < length
    nchunk = TB // _LANES
    lookup = _lookup_gather if method == "gather" else _lookup_onehot

    def chunk_raw(h, k):
        sums = lookup(codes_ref, lut_ref, h, k, P)
        s = scales_ref[pl.ds(h, 1), pl.ds(k * _LANES, _LANES)]                  # [1, 128]
        pos = start + k * _LANES + lax.broadcasted_iota(jnp.int32, (1, _LANES), 1)
        valid = pos < length
        return [jnp.where(valid, s * v, -jnp.inf) for v in sums], valid

    def fill_neg_inf():
        out_ref[...] = jnp.full(out_ref.shape, -jnp.inf, out_ref.dtype)

    if mode == "serve":
        @pl.when(live)
        def _():
            def head(h, carry):
                for k in range(nchunk):
                    raw, _ = chunk_raw(h, k)
                    out_ref[pl.ds(h, 1), pl.ds(k * _LANES, _LANES)] = raw[0].astype(out_ref.dtype)
                return carry
            lax.fori_loop(0, Hkv, head, 0)

        pl.when(jnp.logical_not(live))(fill_neg_inf)
        return

    m_ref, l_ref, mfin_ref, lfin_ref = scratch                                   # each [Hkv*P, 128] f32

    @pl.when(jnp.logical_and(phase == 0, t == 0))
    def _():
        m_ref[...] = jnp.full(m_ref.shape, _NEG, jnp.float32)
        l_ref[...] = jnp.zeros(l_ref.shape, jnp.float32)

    @pl.when(jnp.logical_and(phase == 0, live))
    def _():
        def head(h, carry):
            for k in range(nchunk):
                raw, _ = chunk_raw(h, k)
                for p in range(P):
                    row = pl.ds(h * P + p, 1)
                    m_old = m_ref[row, :]
                    m_new = jnp.maximum(m_old, raw[p])
                    l_ref[row, :] = l_ref[row, :] * jnp.exp(m_old - m_new) + jnp.exp(raw[p] - m_new)
                    m_ref[row, :] = m_new
            return carry
        lax.fori_loop(0, Hkv, head, 0)

    @pl.when(jnp.logical_and(phase == 1, t == 0))
    def _():
        m = m_ref[...]
        mx = jnp.max(m, axis=1, keepdims=True)                                   # [Hkv*P, 1]
        tot = jnp.sum(l_ref[...] * jnp.exp(m - mx), axis=1, keepdims=True)
        mfin_ref[...] = jnp.broadcast_to(mx, mfin_ref.shape)
        lfin_ref[...] = jnp.broadcast_to(tot, lfin_ref.shape)

    @pl.when(jnp.logical_and(phase == 1, live))
    def _():
        def head(h, carry):
            for k in range(nchunk):
                raw, valid = chunk_raw(h, k)
                best = None
                for p in range(P):
                    row = pl.ds(h * P + p, 1)
                    prob = jnp.exp(raw[p] - mfin_ref[row, :]) / lfin_ref[row, :]
                    best = prob if best is None else jnp.maximum(best, prob)     # max commutes with bf16 rounding
                out_ref[pl.ds(h, 1), pl.ds(k * _LANES, _LANES)] = jnp.where(
                    valid, best, -jnp.inf).astype(out_ref.dtype)
            return carry
        lax.fori_loop(0, Hkv, head, 0)

    pl.when(jnp.logical_and(phase == 1, jnp.logical_not(live)))(fill_neg_inf)


def _token_block(T: int, block_tokens: int) -> int:
    if block_tokens < _LANES or block_tokens % _LANES:
        raise ValueError(f"block_tokens={block_tokens}: expected a positive multiple of 128 tokens")
    return min(block_tokens, pl.cdiv(T, _LANES) * _LANES)


def score_landmarks_kernel(q, codes, scales, grid, lengths, *, mode: Mode = "eval", block_tokens: int = 512,
                           method: str = "gather", layer=None, interpret: bool = False):
    """Landmark scores with the Pallas TPU kernel; same contract as :func:`score_landmarks_ref`.

    Args (beyond the reference's):
      block_tokens: tokens per grid step (a multiple of 128; clipped to ``T`` rounded up to 128).
      method: ``"gather"`` (in-register lane gathers, the TPU design) or ``"onehot"`` (compare + NT matmul
        fallback).
      layer: layer-stacked ``codes``/``scales``; the layer is scalar-prefetched and picked by the index maps.
      interpret: run the kernel body with Pallas' interpreter (CPU tests). ``False`` needs a TPU to run; it
        lowers for TPU from any host with ``jax.jit(f).trace(...).lower(lowering_platforms=("tpu",))``.
    """
    B, H, D, Hkv, T, J, n, d = check_score_inputs(q, codes, scales, grid, lengths, mode, layer)
    codes, scales, lay = stacked_args(layer, codes, scales)
    if method not in KERNEL_METHODS:
        raise ValueError(f"method={method!r}: expected one of {KERNEL_METHODS}")
    TB = _token_block(T, block_tokens)
    nT = pl.cdiv(T, TB)
    lengths = jnp.clip(lengths.astype(jnp.int32), 0, T)
    lut = query_tables(q, grid, Hkv, mode)                                       # [B, Hkv, P, J, 256]
    P = lut.shape[2]
    if method == "onehot":
        lut = jnp.swapaxes(lut, 2, 3)                                            # [B, Hkv, J, P, 256]
    lut_block = (None,) + lut.shape[1:]
    nphase = 2 if mode == "eval" else 1

    def blk(t, lens, b):
        # Blocks wholly past the row's length reuse the last live block (no new DMA); the kernel skips them.
        return jnp.minimum(t, jnp.maximum(pl.cdiv(lens[b], TB) - 1, 0))

    in_specs = [
        pl.BlockSpec((None, None, Hkv, TB, J), lambda b, ph, t, lens, y: (y[0], b, 0, blk(t, lens, b), 0)),
        pl.BlockSpec((None, None, Hkv, TB), lambda b, ph, t, lens, y: (y[0], b, 0, blk(t, lens, b))),
        pl.BlockSpec(lut_block, lambda b, ph, t, lens, y: (b,) + (0,) * (len(lut_block) - 1)),
    ]
    if mode == "eval":
        # Phase 0 parks the output window on block 0 without writing it; phase 1 writes every block.
        out_spec = pl.BlockSpec((None, Hkv, TB), lambda b, ph, t, lens, y: (b, 0, t * ph))
        out_dtype = jnp.bfloat16
        scratch = [pltpu.VMEM((Hkv * P, _LANES), jnp.float32) for _ in range(4)]
    else:
        out_spec = pl.BlockSpec((None, Hkv, TB), lambda b, ph, t, lens, y: (b, 0, t))
        out_dtype = jnp.float32
        scratch = []
    # Double-buffered VMEM: codes (minor dim padded to 128 lanes), scales + output, the tables; plus scratch.
    vmem = 2 * (Hkv * TB * max(J, _LANES) + 2 * Hkv * TB * 4 + lut.size // B * 4) + 4 * Hkv * P * _LANES * 4
    # Raise the scoped-VMEM limit only when the default (16 MiB on v5e) could be too small; stay under v7x's 64 MiB.
    vmem_limit = None if vmem < (12 << 20) else int(min(2 * vmem, 60 << 20))
    kernel = functools.partial(_score_kernel, Hkv=Hkv, P=P, TB=TB, mode=mode, method=method)
    return pl.pallas_call(
        kernel,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=2, grid=(B, nphase, nT), in_specs=in_specs, out_specs=out_spec,
            scratch_shapes=scratch),
        out_shape=jax.ShapeDtypeStruct((B, Hkv, T), out_dtype),
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "arbitrary", "arbitrary"), vmem_limit_bytes=vmem_limit),
        interpret=interpret,
    )(lengths, lay, codes, scales.astype(jnp.float32), lut)
