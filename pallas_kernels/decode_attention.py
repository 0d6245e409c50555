"""One-query (decode) attention over gathered K/V rows: a Pallas TPU kernel and its pure-jnp reference.

Every kvjax policy ends a decode step with this: the new token's queries (all heads, GQA) attend over the rows
the policy gathered for each KV head (sinks, selected tokens, local window, generated tokens).

Shapes: ``q [B, H, D]`` (post-RoPE; head ``h`` uses KV head ``h // G``, ``G = H / Hkv``), ``k, v [B, Hkv, S, D]``.
Validity, any combination of:

* ``lengths`` int ``[B]`` or ``[B, Hkv]``: row ``s`` is valid iff ``s < length`` (clipped to ``[0, S]``);
* ``mask`` ``[B, Hkv, S]`` or ``[B, 1, S]``: boolean (True = valid) or additive float (0 / -inf, or any bias
  added to the scaled logits). Policies with ragged per-head valid sets use this.

Layer-stacked caches: with ``layer`` (an int32 scalar, traced) ``k, v`` are ``[L, B, Hkv, S, D]`` and layer
``layer`` is attended. The kernels read that layer in place; passing ``k[layer]`` instead would make XLA copy the
layer's whole K and V into a fresh buffer for the custom call first (a dynamic slice is not fused into a kernel
operand), which for full attention at long contexts triples the bytes moved.

Numerics (the FlashAttention convention): logits ``q . k`` run in K's dtype with float32 accumulation (q is cast
to K's dtype), times ``scale`` (default ``1/sqrt(D)``), softmax in float32, the probabilities are cast to V's dtype
for the ``p . v`` product with float32 accumulation. The reference normalises before that cast, the kernel after
(online softmax), so with bf16 V they differ by bf16 rounding of ``p`` (~0.4 % per term); with float32 K/V they
agree to float32 rounding. A query with no valid row returns zeros. Output ``[B, H, D]`` in q's dtype.

Kernel layout: grid ``(B, Hkv, nS)``; a step holds the ``G`` queries of one KV head (``[G, D]``, both full dims)
and ``TS`` rows of K and V (``TS`` a multiple of 128, so the ``[1, TS]`` mask block is lane-dense and K/V blocks
respect the 8/16-row sublane tiles). Online softmax with running max/sum kept lane-replicated in VMEM
``[G, 128]`` and a float32 ``[G, D]`` accumulator. Rows past ``S`` in the last block are masked and their V rows
zeroed (out-of-bounds block contents are undefined); blocks wholly past ``lengths`` are neither fetched (index map
clamped to the last live block) nor computed. ``B`` and ``Hkv`` are parallel grid axes (megacore).
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.stacked import per_layer, stacked_args

__all__ = ["decode_attention_ref", "decode_attention_kernel", "check_attention_inputs", "check_layered",
           "check_segments", "concat_segments", "layer_view"]

_LANES = 128
_NEG = -1e30   # finite running-max start: exp(m_old - m_new) stays finite while every row so far is masked


def check_attention_inputs(q, k, v, lengths=None, mask=None) -> tuple[int, int, int, int, int]:
    """Validate shapes/dtypes; returns ``(B, H, D, Hkv, S)``. Raises ValueError naming the argument."""
    if q.ndim != 3:
        raise ValueError(f"q.shape={tuple(q.shape)}: expected [B, H, D]")
    B, H, D = q.shape
    if k.ndim != 4 or k.shape[0] != B or k.shape[3] != D:
        raise ValueError(f"k.shape={tuple(k.shape)}: expected [B, Hkv, S, D] with B={B}, D={D}")
    if tuple(v.shape) != tuple(k.shape):
        raise ValueError(f"v.shape={tuple(v.shape)}: expected the shape of k, {tuple(k.shape)}")
    Hkv, S = k.shape[1], k.shape[2]
    if Hkv < 1 or H % Hkv:
        raise ValueError(f"k.shape[1]={Hkv} KV heads: must divide the {H} query heads of q")
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise ValueError(f"{name}.dtype={x.dtype}: expected a floating dtype")
    if lengths is not None:
        if tuple(lengths.shape) not in ((B,), (B, Hkv)):
            raise ValueError(f"lengths.shape={tuple(lengths.shape)}: expected [B]={(B,)} or [B, Hkv]={(B, Hkv)}")
        if not jnp.issubdtype(lengths.dtype, jnp.integer):
            raise ValueError(f"lengths.dtype={lengths.dtype}: expected an integer dtype (valid rows)")
    if mask is not None:
        if mask.ndim != 3 or mask.shape[0] != B or mask.shape[1] not in (1, Hkv) or mask.shape[2] != S:
            raise ValueError(f"mask.shape={tuple(mask.shape)}: expected [B, Hkv, S]={(B, Hkv, S)} or [B, 1, S]")
        if mask.dtype != jnp.bool_ and not jnp.issubdtype(mask.dtype, jnp.floating):
            raise ValueError(f"mask.dtype={mask.dtype}: expected bool (True = valid) or an additive float bias")
    return B, H, D, Hkv, S


def check_segments(q, segments) -> None:
    """Validate row segments ``[(k, v, mask), ...]`` for attention of ``q`` over their union (same batch, KV heads,
    head dim and K/V dtypes in every segment; ``mask`` as in :func:`check_attention_inputs` or None)."""
    if not segments:
        raise ValueError("segments=[]: expected at least one (k, v, mask) segment")
    for i, seg in enumerate(segments):
        if len(seg) != 3:
            raise ValueError(f"segments[{i}] has {len(seg)} items: expected (k, v, mask) with mask None allowed")
        k, v, mask = seg
        try:
            check_attention_inputs(q, k, v, None, mask)
        except ValueError as e:
            raise ValueError(f"segments[{i}]: {e}") from None
        k0, v0 = segments[0][0], segments[0][1]
        if k.shape[1] != k0.shape[1] or k.dtype != k0.dtype or v.dtype != v0.dtype:
            raise ValueError(f"segments[{i}]: k {k.dtype}{tuple(k.shape)}, v {v.dtype}: expected the KV heads and "
                             f"dtypes of segments[0] (k {k0.dtype}{tuple(k0.shape)}, v {v0.dtype})")


def concat_segments(segments):
    """``(k, v, mask)`` of the segments concatenated along rows (``S = sum S_i``); the mask is bool when every
    segment's is bool or None (None = all valid), else an additive float32 bias; ``[B, Hkv, S]`` when any segment
    has per-head masks, else ``[B, 1, S]``."""
    k = jnp.concatenate([s[0] for s in segments], axis=2)
    v = jnp.concatenate([s[1] for s in segments], axis=2)
    masks = [s[2] for s in segments]
    if all(m is None for m in masks):
        return k, v, None
    B, Hkv = k.shape[:2]
    heads = Hkv if any(m is not None and m.shape[1] == Hkv for m in masks) else 1
    as_bool = all(m is None or m.dtype == jnp.bool_ for m in masks)
    parts = []
    for (kk, _, m) in segments:
        if m is None:
            m = jnp.ones((B, 1, kk.shape[2]), jnp.bool_)
        parts.append(jnp.broadcast_to(m if as_bool else _bias(m), (B, heads, kk.shape[2])))
    return k, v, jnp.concatenate(parts, axis=2)


def layer_view(x, layer):
    """``x[layer]`` of a layer-stacked array (the reference's way), ``x`` itself when ``layer`` is None."""
    return x if layer is None else lax.dynamic_index_in_dim(x, jnp.asarray(layer, jnp.int32), 0, keepdims=False)


def check_layered(q, k, v, lengths=None, mask=None, layer=None) -> tuple[int, int, int, int, int]:
    """:func:`check_attention_inputs` for ``k, v`` ``[B, Hkv, S, D]``, or ``[L, B, Hkv, S, D]`` with ``layer``."""
    if layer is not None:
        if k.ndim != 5 or tuple(v.shape) != tuple(k.shape):
            raise ValueError(f"k.shape={tuple(k.shape)}, v.shape={tuple(v.shape)}: expected equal [L, B, Hkv, S, D] "
                             "shapes with layer= given")
        k, v = per_layer(layer, k=k, v=v)
    return check_attention_inputs(q, k, v, lengths, mask)


def _lengths_2d(lengths, B: int, Hkv: int, S: int):
    """int32 ``[B, Hkv]`` clipped to ``[0, S]`` (``S`` everywhere when ``lengths`` is None)."""
    if lengths is None:
        return jnp.full((B, Hkv), S, jnp.int32)
    lengths = jnp.clip(lengths.astype(jnp.int32), 0, S)
    return jnp.broadcast_to(lengths[:, None] if lengths.ndim == 1 else lengths, (B, Hkv))


def _bias(mask):
    """float32 additive bias from a bool or float mask (same shape)."""
    if mask.dtype == jnp.bool_:
        return jnp.where(mask, 0.0, -jnp.inf).astype(jnp.float32)
    return mask.astype(jnp.float32)


def decode_attention_ref(q, k, v, lengths=None, mask=None, *, scale: float | None = None, layer=None):
    """One-query GQA attention, pure jnp. See the module docstring for shapes, masks, ``layer`` and numerics."""
    check_layered(q, k, v, lengths, mask, layer)
    k, v = layer_view(k, layer), layer_view(v, layer)
    B, H, D, Hkv, S = check_attention_inputs(q, k, v, lengths, mask)
    G = H // Hkv
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    qg = q.reshape(B, Hkv, G, D).astype(k.dtype)
    s = jnp.einsum("bhgd,bhsd->bhgs", qg, k, preferred_element_type=jnp.float32) * scale
    lens = _lengths_2d(lengths, B, Hkv, S)
    valid = jnp.arange(S, dtype=jnp.int32)[None, None, :] < lens[:, :, None]          # [B, Hkv, S]
    if mask is not None:
        s = s + _bias(mask)[:, :, None, :]
    s = jnp.where(valid[:, :, None, :], s, -jnp.inf)
    m = jnp.max(s, axis=-1, keepdims=True)
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    e = jnp.exp(s - m)
    z = jnp.sum(e, axis=-1, keepdims=True)
    p = e / jnp.where(z > 0, z, 1.0)
    o = jnp.einsum("bhgs,bhsd->bhgd", p.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return o.reshape(B, H, D).astype(q.dtype)


def _attn_kernel(len_ref, lay_ref, q_ref, k_ref, v_ref, *rest, Hkv: int, TS: int, S: int, scale: float, has_bias: bool):
    if has_bias:
        bias_ref, o_ref, m_ref, l_ref, acc_ref = rest
    else:
        bias_ref = None
        o_ref, m_ref, l_ref, acc_ref = rest
    b = pl.program_id(0)
    h = pl.program_id(1)
    s = pl.program_id(2)
    length = len_ref[b * Hkv + h]
    start = s * TS

    @pl.when(s == 0)
    def _():
        m_ref[...] = jnp.full(m_ref.shape, _NEG, jnp.float32)
        l_ref[...] = jnp.zeros(l_ref.shape, jnp.float32)
        acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

    @pl.when(start < length)
    def _():
        kb = k_ref[...]                                                       # [TS, D]
        qb = q_ref[...].astype(kb.dtype)                                      # [G, D]
        logits = lax.dot_general(qb, kb, (((1,), (1,)), ((), ())),
                                 preferred_element_type=jnp.float32) * scale  # [G, TS]
        pos = start + lax.broadcasted_iota(jnp.int32, (1, TS), 1)
        if bias_ref is not None:
            logits = logits + bias_ref[...]                                   # [1, TS]
        logits = jnp.where(pos < length, logits, -jnp.inf)
        m_old = m_ref[...]                                                    # [G, 128] lane-replicated
        m_new = jnp.maximum(m_old, jnp.max(logits, axis=1, keepdims=True))
        alpha = jnp.exp(m_old - m_new)
        p = jnp.exp(logits - m_new[:, :1])                                    # [G, TS]
        l_ref[...] = alpha * l_ref[...] + jnp.sum(p, axis=1, keepdims=True)
        m_ref[...] = m_new
        vb = v_ref[...]
        if S % TS:  # rows past S in the last block hold undefined data: keep 0 * NaN out of the sum
            rows = start + lax.broadcasted_iota(jnp.int32, (TS, 1), 0)
            vb = jnp.where(rows < S, vb, jnp.zeros_like(vb))
        pv = jnp.dot(p.astype(vb.dtype), vb, preferred_element_type=jnp.float32)  # [G, D]
        acc_ref[...] = acc_ref[...] * alpha[:, :1] + pv

    @pl.when(s == pl.num_programs(2) - 1)
    def _():
        l = l_ref[:, :1]
        o_ref[...] = jnp.where(l > 0, acc_ref[...] / jnp.where(l > 0, l, 1.0), 0.0).astype(o_ref.dtype)


def decode_attention_kernel(q, k, v, lengths=None, mask=None, *, scale: float | None = None, layer=None,
                            block_size: int = 512, interpret: bool = False):
    """One-query GQA attention with the Pallas TPU kernel; same contract as :func:`decode_attention_ref`.

    Args (beyond the reference's):
      block_size: K/V rows per grid step, a multiple of 128 (clipped to ``S`` rounded up to 128).
      interpret: run with Pallas' interpreter (CPU tests); ``False`` needs a TPU to run.

    The layer (``layer``, else 0 of the reshaped ``[1, ...]`` arrays) is scalar-prefetched and picked by the K/V
    index maps, so a layer-stacked cache is read in place.
    """
    B, H, D, Hkv, S = check_layered(q, k, v, lengths, mask, layer)
    k, v, lay = stacked_args(layer, k, v)
    if block_size < _LANES or block_size % _LANES:
        raise ValueError(f"block_size={block_size}: expected a positive multiple of 128 rows")
    G = H // Hkv
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    TS = min(block_size, pl.cdiv(S, _LANES) * _LANES)
    nS = pl.cdiv(S, TS)
    lens = _lengths_2d(lengths, B, Hkv, S).reshape(B * Hkv)

    def blk(b, h, s, lens_ref):
        return jnp.minimum(s, jnp.maximum(pl.cdiv(lens_ref[b * Hkv + h], TS) - 1, 0))

    in_specs = [
        pl.BlockSpec((None, None, G, D), lambda b, h, s, L, Y: (b, h, 0, 0)),
        pl.BlockSpec((None, None, None, TS, D), lambda b, h, s, L, Y: (Y[0], b, h, blk(b, h, s, L), 0)),
        pl.BlockSpec((None, None, None, TS, D), lambda b, h, s, L, Y: (Y[0], b, h, blk(b, h, s, L), 0)),
    ]
    args = [lens, lay, q.reshape(B, Hkv, G, D), k, v]
    if mask is not None:
        bias = _bias(mask)[:, :, None, :]                                     # [B, 1|Hkv, 1, S]
        per_head = bias.shape[1] == Hkv and Hkv > 1
        in_specs.append(pl.BlockSpec(
            (None, None, 1, TS), lambda b, h, s, L, Y: (b, h if per_head else 0, 0, blk(b, h, s, L))))
        args.append(bias)
    kernel = functools.partial(_attn_kernel, Hkv=Hkv, TS=TS, S=S, scale=scale, has_bias=mask is not None)
    out = pl.pallas_call(
        kernel,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=2, grid=(B, Hkv, nS), in_specs=in_specs,
            out_specs=pl.BlockSpec((None, None, G, D), lambda b, h, s, L, Y: (b, h, 0, 0)),
            scratch_shapes=[pltpu.VMEM((G, _LANES), jnp.float32), pltpu.VMEM((G, _LANES), jnp.float32),
                            pltpu.VMEM((G, D), jnp.float32)]),
        out_shape=jax.ShapeDtypeStruct((B, Hkv, G, D), q.dtype),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary")),
        interpret=interpret,
    )(*args)
    return out.reshape(B, H, D)
