"""YAKV landmark scoring on GPU: a Pallas kernel for the Triton backend, same contract as
:func:`pallas_kernels.score.score_landmarks_ref`.

Inputs, the query-side lookup tables and both scoring rules are those of :mod:`pallas_kernels.score`:
``q [B, H, D]``, uint8 ``codes [B, Hkv, T, J]``, float32 ``scales [B, Hkv, T]``, float32 ``grid [n, d]``, int
``lengths [B]``; ``raw[p, t] = s_t * sum_j LUT[p, j, codes[t, j]]`` with ``LUT = query_tables(q, grid, Hkv, mode)``
(``P = G`` query vectors per KV head in ``mode="eval"``, ``P = 1`` in ``"serve"``).

Kernel layout: grid ``(B, Hkv, nT)``, one program per ``TB`` tokens of one KV head (``TB`` a power of two, as
Triton requires of every block value). A program loads its ``[TB, J]`` codes (contiguous bytes; rows past ``T``
masked) and, per query vector ``p``, gathers ``[TB, J]`` table entries straight from the ``[P, J*256]`` float32
table of its head in global memory (``lut_ref[p, j*256 + code]``, a pointer gather that the L1/L2 caches serve:
the table is 32 KiB per head in serve mode, ``G`` times that in eval mode), sums over ``J`` and multiplies by the
scales. Programs whose block lies wholly past the row's length do no lookups and write ``-inf``.

* ``mode="serve"``: the program writes the float32 score ``[TB]`` (``-inf`` invalid); the output is final.
* ``mode="eval"``: the program writes the float32 logits ``[P, TB]`` and, per ``p``, the block's maximum and
  ``sum exp(logit - max)``. A jnp epilogue (one fused elementwise pass for XLA) combines the ``nT`` block
  statistics into each query head's softmax normaliser and writes ``max_p bf16(exp(logit - m) / l)``. The codes
  are read once; the logits cost ``P * 4`` bytes per token written and read once more (the TPU kernel instead
  reads the codes twice).

Numerics: as the reference, except that the softmax normaliser is accumulated per block (float32 rounding of the
sum differs; a bf16 probability can land one bf16 ulp away at a rounding boundary).

Lowering: ``pl.pallas_call`` with ``plgpu.CompilerParams`` lowers on any host to the
``__gpu$xla.gpu.triton`` custom call (the Triton module travels as bytecode and is compiled to PTX by XLA:GPU on
the device). ``interpret=True`` runs the same kernel body with Pallas' generic interpreter (CPU tests).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.score import Mode, check_score_inputs, query_tables
from pallas_kernels.stacked import stacked_args

__all__ = ["score_landmarks_gpu", "gpu_block"]

_TABLE = 256


def gpu_block(size: int, limit: int, name: str) -> int:
    """A Triton block length: ``size`` (a power of two >= 16) clipped to ``limit`` rounded up to a power of two."""
    if size < 16 or size & (size - 1):
        raise ValueError(f"{name}={size}: expected a power of two >= 16")
    return min(size, max(16, 1 << max(int(limit) - 1, 0).bit_length()))


def _score_kernel(len_ref, lay_ref, codes_ref, scales_ref, lut_ref, *out_refs, P: int, TB: int, T: int, J: int,
                  mode: str):
    """One program: ``TB`` tokens of one KV head. ``out_refs``: serve ``(out [T],)``; eval ``(raw [P, T],
    m [P, nT], l [P, nT])``."""
    t = pl.program_id(2)
    length = len_ref[...]
    layer = lay_ref[...]
    start = t * TB
    pos = start + jnp.arange(TB, dtype=jnp.int32)
    in_rows = pos < T
    valid = pos < length

    def lookups():
        c = plgpu.load(codes_ref.at[layer, pl.ds(start, TB), :], mask=in_rows[:, None], other=0).astype(jnp.int32)
        off = c + (jnp.arange(J, dtype=jnp.int32) * _TABLE)[None, :]                        # [TB, J]
        s = plgpu.load(scales_ref.at[layer, pl.ds(start, TB)], mask=in_rows, other=0.0)
        return [jnp.where(valid, jnp.sum(lut_ref[p, off], axis=1) * s, -jnp.inf) for p in range(P)]

    if mode == "serve":
        (out_ref,) = out_refs

        @pl.when(start < length)
        def _():
            plgpu.store(out_ref.at[pl.ds(start, TB)], lookups()[0], mask=in_rows)

        @pl.when(start >= length)
        def _():
            plgpu.store(out_ref.at[pl.ds(start, TB)], jnp.full((TB,), -jnp.inf, jnp.float32), mask=in_rows)
        return

    raw_ref, m_ref, l_ref = out_refs

    @pl.when(start < length)
    def _():
        for p, raw in enumerate(lookups()):
            p = jnp.int32(p)        # a traced index: the interpreter's store rule rejects a Python int here
            plgpu.store(raw_ref.at[p, pl.ds(start, TB)], raw, mask=in_rows)
            m = jnp.max(raw)                                          # finite: the block holds a valid token
            m_ref[p, t] = m
            l_ref[p, t] = jnp.sum(jnp.exp(raw - m))

    @pl.when(start >= length)
    def _():
        neg = jnp.full((TB,), -jnp.inf, jnp.float32)
        for p in map(jnp.int32, range(P)):
            plgpu.store(raw_ref.at[p, pl.ds(start, TB)], neg, mask=in_rows)
            # -inf and 0 as reductions of a block: the Triton lowering of jax 0.10.2 rejects a constant scalar store
            m_ref[p, t] = jnp.max(neg)
            l_ref[p, t] = jnp.sum(jnp.exp(neg))


def _eval_epilogue(raw, m, l, lengths):
    """Softmax per query head from block statistics, bf16, max over the group: ``[B, Hkv, P, T]`` -> ``[B, Hkv, T]``."""
    T = raw.shape[-1]
    mx = jnp.max(m, axis=-1, keepdims=True)                           # [B, Hkv, P, 1]
    mx = jnp.where(jnp.isfinite(mx), mx, 0.0)                         # rows with no valid landmark
    z = jnp.sum(l * jnp.exp(m - mx), axis=-1, keepdims=True)
    prob = (jnp.exp(raw - mx) / jnp.where(z > 0, z, 1.0)).astype(jnp.bfloat16)
    valid = jnp.arange(T, dtype=jnp.int32)[None, None, :] < lengths[:, None, None]
    return jnp.where(valid, jnp.max(prob, axis=2), -jnp.inf).astype(jnp.bfloat16)


def score_landmarks_gpu(q, codes, scales, grid, lengths, *, mode: Mode = "eval", layer=None, block_tokens: int = 256,
                        num_warps: int = 4, num_stages: int = 2, interpret: bool = False):
    """Landmark scores with the Pallas Triton kernel; same contract as :func:`pallas_kernels.score.score_landmarks_ref`.

    Args (beyond the reference's; ``layer``: layer-stacked ``codes``/``scales``, read in place):
      block_tokens: tokens per program, a power of two >= 16 (clipped to ``T`` rounded up to a power of two).
      num_warps, num_stages: Triton launch parameters (threads per program / 32, software-pipelining depth).
      interpret: run the kernel body with Pallas' interpreter (CPU tests); ``False`` needs a GPU to run and
        lowers for ``cuda`` from any host.

    Returns ``[B, Hkv, T]``: bf16 in eval mode, float32 in serve mode; ``-inf`` where ``t >= lengths[b]``.
    """
    B, H, D, Hkv, T, J, n, d = check_score_inputs(q, codes, scales, grid, lengths, mode, layer)
    codes, scales, lay = stacked_args(layer, codes, scales)
    Lc = codes.shape[0]
    TB = gpu_block(block_tokens, T, "block_tokens")
    nT = pl.cdiv(T, TB)
    lengths = jnp.clip(lengths.astype(jnp.int32), 0, T)
    lut = query_tables(q, grid, Hkv, mode)                            # [B, Hkv, P, J, 256]
    P = lut.shape[2]
    lut = lut.reshape(B, Hkv, P, J * _TABLE)
    in_specs = [
        pl.BlockSpec((None,), lambda b, h, t: (b,)),
        pl.BlockSpec((None,), lambda b, h, t: (0,)),
        pl.BlockSpec((Lc, None, None, T, J), lambda b, h, t: (0, b, h, 0, 0)),   # every layer: indexed in place
        pl.BlockSpec((Lc, None, None, T), lambda b, h, t: (0, b, h, 0)),
        pl.BlockSpec((None, None, P, J * _TABLE), lambda b, h, t: (b, h, 0, 0)),
    ]
    if mode == "serve":
        out_specs = [pl.BlockSpec((None, None, T), lambda b, h, t: (b, h, 0))]
        out_shape = [jax.ShapeDtypeStruct((B, Hkv, T), jnp.float32)]
    else:
        out_specs = [pl.BlockSpec((None, None, P, T), lambda b, h, t: (b, h, 0, 0)),
                     pl.BlockSpec((None, None, P, nT), lambda b, h, t: (b, h, 0, 0)),
                     pl.BlockSpec((None, None, P, nT), lambda b, h, t: (b, h, 0, 0))]
        out_shape = [jax.ShapeDtypeStruct((B, Hkv, P, T), jnp.float32),
                     jax.ShapeDtypeStruct((B, Hkv, P, nT), jnp.float32),
                     jax.ShapeDtypeStruct((B, Hkv, P, nT), jnp.float32)]
    kernel = functools.partial(_score_kernel, P=P, TB=TB, T=T, J=J, mode=mode)
    outs = pl.pallas_call(
        kernel, grid=(B, Hkv, nT), in_specs=in_specs, out_specs=out_specs, out_shape=out_shape,
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret, name="kvjax_score_landmarks",
    )(lengths, lay, codes, scales.astype(jnp.float32), lut)
    if mode == "serve":
        return outs[0]
    return _eval_epilogue(*outs, lengths)
