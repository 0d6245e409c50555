"""One-query (decode) GQA attention on GPU: a split-K Pallas kernel for the Triton backend, and attention over
several row segments without concatenating them first.

Contract (shapes, masks, numerics, empty rows -> zeros) as :mod:`pallas_kernels.decode_attention`:
``q [B, H, D]``, ``k, v [B, Hkv, S, D]``, optional ``lengths`` int ``[B]`` / ``[B, Hkv]`` and ``mask``
``[B, 1|Hkv, S]`` (bool, True = valid, or an additive float bias). Logits ``q . k`` in K's dtype with float32
accumulation (float32 inputs use IEEE float32 products on the tensor cores, not TF32), softmax in float32,
``p`` cast to V's dtype for ``p . v`` with float32 accumulation, normalised at the end (online softmax, as the TPU
kernel).

Kernel layout (flash-decoding): grid ``(B, Hkv, nsplit)``; a program takes the ``G`` queries of one KV head (loaded
into ``Gq = max(16, next power of two)`` rows, the smallest tensor-core tile; the extra rows are zeros and are
never stored) and the rows ``[split * R, min((split + 1) * R, length))`` of K and V, which it streams in blocks of
``BK`` rows (a loop whose trip count is computed from ``lengths``: rows past a head's length are neither read nor
computed). Each program writes an unnormalised partial ``acc [G, D]`` with its running max ``m [G]`` and sum
``l [G]``; a jnp epilogue merges the splits (``sum_s exp(m_s - M) acc_s / sum_s exp(m_s - M) l_s``). ``nsplit`` is
chosen so that about ``target_programs`` programs run and each covers at least ``min_split_rows`` rows.

Segments: :func:`decode_attention_segments_gpu` runs the kernel once per segment (each ``(k, v, mask)`` read where
it lies) and merges all partials together, which equals attention over the concatenation of the segments along
``S`` (a policy's exact window, its fetched rows and its generated slots) without writing that concatenation to
HBM. :func:`pallas_kernels.decode_attention.concat_segments` is the reference's way.

Lowering: ``pl.pallas_call`` with ``plgpu.CompilerParams`` lowers on any host to the ``__gpu$xla.gpu.triton``
custom call; ``interpret=True`` runs the same body with Pallas' generic interpreter (CPU tests).
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.decode_attention import _bias, _lengths_2d, check_layered, check_segments
from pallas_kernels.stacked import stacked_args
from pallas_kernels.score_gpu import gpu_block

__all__ = ["decode_attention_gpu", "decode_attention_segments_gpu", "attention_partials_gpu", "merge_partials"]

_NEG = -1e30   # finite running-max start: exp(m_old - m_new) stays finite while every row so far is masked
_MIN_DOT_ROWS = 16


def _attn_kernel(len_ref, lay_ref, q_ref, k_ref, v_ref, *rest, G: int, Gq: int, S: int, BK: int, R: int, scale: float,
                 has_bias: bool):
    if has_bias:
        bias_ref, o_ref, m_ref, l_ref = rest
    else:
        bias_ref = None
        o_ref, m_ref, l_ref = rest
    split = pl.program_id(2)
    lo = split * R
    hi = jnp.minimum(lo + R, len_ref[...])
    layer = lay_ref[...]
    qrow = jnp.arange(Gq, dtype=jnp.int32) < G
    D = q_ref.shape[-1]
    q = plgpu.load(q_ref.at[pl.ds(0, Gq), :], mask=qrow[:, None], other=0).astype(k_ref.dtype)   # [Gq, D]

    def block(i, carry):
        acc, m, l = carry
        start = lo + i * BK
        pos = start + jnp.arange(BK, dtype=jnp.int32)
        in_rows = pos < S
        kb = plgpu.load(k_ref.at[layer, pl.ds(start, BK), :], mask=in_rows[:, None], other=0)    # [BK, D]
        vb = plgpu.load(v_ref.at[layer, pl.ds(start, BK), :], mask=in_rows[:, None], other=0)
        s = lax.dot_general(q, kb, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32) * scale
        if bias_ref is not None:
            s = s + plgpu.load(bias_ref.at[pl.ds(start, BK)], mask=in_rows, other=0.0)[None, :]
        s = jnp.where((pos < hi)[None, :], s, -jnp.inf)                                            # [Gq, BK]
        m_new = jnp.maximum(m, jnp.max(s, axis=1))
        alpha = jnp.exp(m - m_new)
        p = jnp.exp(s - m_new[:, None])
        l = alpha * l + jnp.sum(p, axis=1)
        pv = lax.dot_general(p.astype(vb.dtype), vb, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32)
        return acc * alpha[:, None] + pv, m_new, l

    init = (jnp.zeros((Gq, D), jnp.float32), jnp.full((Gq,), _NEG, jnp.float32), jnp.zeros((Gq,), jnp.float32))
    acc, m, l = lax.fori_loop(0, jnp.maximum(pl.cdiv(hi - lo, BK), 0), block, init)
    plgpu.store(o_ref.at[pl.ds(0, Gq), :], acc, mask=qrow[:, None])
    plgpu.store(m_ref.at[pl.ds(0, Gq)], m, mask=qrow)
    plgpu.store(l_ref.at[pl.ds(0, Gq)], l, mask=qrow)


def _num_splits(B: int, Hkv: int, S: int, BK: int, target_programs: int, min_split_rows: int) -> tuple[int, int]:
    """``(nsplit, R)``: splits per KV head and rows per split (a multiple of ``BK``)."""
    want = max(1, min(pl.cdiv(S, max(min_split_rows, BK)), pl.cdiv(target_programs, B * Hkv)))
    R = BK * pl.cdiv(pl.cdiv(S, BK), want)
    return pl.cdiv(S, R), R


def attention_partials_gpu(q, k, v, lengths=None, mask=None, *, scale: float | None = None, layer=None,
                           block_k: int = 64, target_programs: int = 512, min_split_rows: int = 256,
                           num_warps: int = 4, num_stages: int = 2, interpret: bool = False):
    """Split-K partials of one-query GQA attention: ``(acc [B, Hkv, n, G, D], m [B, Hkv, n, G], l [B, Hkv, n, G])``,
    float32, ``n`` splits; ``acc`` is unnormalised (``softmax = acc / l`` within a split). :func:`merge_partials`
    finishes. Args as :func:`decode_attention_gpu`."""
    B, H, D, Hkv, S = check_layered(q, k, v, lengths, mask, layer)
    k, v, lay = stacked_args(layer, k, v)
    Lk = k.shape[0]
    if D < _MIN_DOT_ROWS or D & (D - 1):
        raise ValueError(f"head dim D={D}: the Triton kernel needs a power of two >= 16")
    G = H // Hkv
    Gq = max(_MIN_DOT_ROWS, 1 << (G - 1).bit_length())
    BK = gpu_block(block_k, S, "block_k")
    nsplit, R = _num_splits(B, Hkv, S, BK, target_programs, min_split_rows)
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    in_specs = [
        pl.BlockSpec((None, None), lambda b, h, s: (b, h)),
        pl.BlockSpec((None,), lambda b, h, s: (0,)),
        pl.BlockSpec((None, None, G, D), lambda b, h, s: (b, h, 0, 0)),
        pl.BlockSpec((Lk, None, None, S, D), lambda b, h, s: (0, b, h, 0, 0)),   # every layer: indexed in place
        pl.BlockSpec((Lk, None, None, S, D), lambda b, h, s: (0, b, h, 0, 0)),
    ]
    args = [_lengths_2d(lengths, B, Hkv, S), lay, q.reshape(B, Hkv, G, D), k, v]
    if mask is not None:
        bias = _bias(mask)                                                    # [B, 1|Hkv, S]
        per_head = bias.shape[1] == Hkv and Hkv > 1
        in_specs.append(pl.BlockSpec((None, None, S), lambda b, h, s: (b, h if per_head else 0, 0)))
        args.append(bias)
    kernel = functools.partial(_attn_kernel, G=G, Gq=Gq, S=S, BK=BK, R=R, scale=scale, has_bias=mask is not None)
    return pl.pallas_call(
        kernel, grid=(B, Hkv, nsplit), in_specs=in_specs,
        out_specs=[pl.BlockSpec((None, None, None, G, D), lambda b, h, s: (b, h, s, 0, 0)),
                   pl.BlockSpec((None, None, None, G), lambda b, h, s: (b, h, s, 0)),
                   pl.BlockSpec((None, None, None, G), lambda b, h, s: (b, h, s, 0))],
        out_shape=[jax.ShapeDtypeStruct((B, Hkv, nsplit, G, D), jnp.float32),
                   jax.ShapeDtypeStruct((B, Hkv, nsplit, G), jnp.float32),
                   jax.ShapeDtypeStruct((B, Hkv, nsplit, G), jnp.float32)],
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret, name="kvjax_decode_attention",
    )(*args)


def merge_partials(parts, dtype) -> jax.Array:
    """Merge split-K partials (a list of :func:`attention_partials_gpu` results over the same queries) into the
    attention output ``[B, H, D]`` in ``dtype``; zeros where no row of any part was valid."""
    acc = jnp.concatenate([p[0] for p in parts], axis=2)                      # [B, Hkv, n, G, D]
    m = jnp.concatenate([p[1] for p in parts], axis=2)                        # [B, Hkv, n, G]
    l = jnp.concatenate([p[2] for p in parts], axis=2)
    mx = jnp.max(m, axis=2, keepdims=True)
    w = jnp.exp(m - mx)                                                       # splits with no valid row: l = 0
    z = jnp.sum(w * l, axis=2)                                                # [B, Hkv, G]
    o = jnp.sum(w[..., None] * acc, axis=2)                                   # [B, Hkv, G, D]
    o = jnp.where(z[..., None] > 0, o / jnp.where(z > 0, z, 1.0)[..., None], 0.0)
    B, Hkv, G, D = o.shape
    return o.reshape(B, Hkv * G, D).astype(dtype)


def decode_attention_gpu(q, k, v, lengths=None, mask=None, *, scale: float | None = None, layer=None,
                         block_k: int = 64, target_programs: int = 512, min_split_rows: int = 256,
                         num_warps: int = 4, num_stages: int = 2, interpret: bool = False):
    """One-query GQA attention with the Pallas Triton kernel; same contract as
    :func:`pallas_kernels.decode_attention.decode_attention_ref` (``layer``: ``k, v`` are layer-stacked
    ``[L, B, Hkv, S, D]`` and that layer is read in place).

    Args (beyond the reference's):
      block_k: K/V rows per loop step, a power of two >= 16 (clipped to ``S`` rounded up to a power of two).
      target_programs: about how many programs to launch (splits per KV head = this / ``B * Hkv``).
      min_split_rows: at least this many rows per split (fewer, larger splits for short ``S``).
      num_warps, num_stages: Triton launch parameters.
      interpret: Pallas interpreter (CPU tests); ``False`` needs a GPU to run and lowers for ``cuda`` anywhere.
    """
    kw = dict(scale=scale, block_k=block_k, target_programs=target_programs, min_split_rows=min_split_rows,
              num_warps=num_warps, num_stages=num_stages, interpret=interpret)
    return merge_partials([attention_partials_gpu(q, k, v, lengths, mask, layer=layer, **kw)], q.dtype)


def decode_attention_segments_gpu(q, segments, *, scale: float | None = None, block_k: int = 64,
                                  target_programs: int = 512, min_split_rows: int = 256, num_warps: int = 4,
                                  num_stages: int = 2, interpret: bool = False):
    """Attention of ``q [B, H, D]`` over the union of ``segments`` (a sequence of ``(k, v, mask)``, ``k, v
    [B, Hkv, S_i, D]``, ``mask`` ``[B, 1|Hkv, S_i]`` bool / additive float or None): one kernel call per segment,
    partials merged once. Equals :func:`decode_attention_gpu` over the concatenated segments."""
    check_segments(q, segments)
    kw = dict(scale=scale, block_k=block_k, target_programs=target_programs, min_split_rows=min_split_rows,
              num_warps=num_warps, num_stages=num_stages, interpret=interpret)
    return merge_partials([attention_partials_gpu(q, k, v, None, mask, **kw) for k, v, mask in segments], q.dtype)
