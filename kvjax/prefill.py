"""Layer-by-layer exact prefill that builds, and offloads, each layer's policy state (DESIGN.md "the data's way").

For every decoder layer ``l`` (one ``lax.scan`` over the layer-stacked weights):

1. the layer runs over the whole prompt in chunks of ``chunk`` tokens — RMSNorm, q/k/v, RoPE, exact block-causal
   attention over the layer's keys so far, output projection and MLP — so no ``[T, ffn]`` activation ever exists,
   and the chunk's post-RoPE keys/values (and queries, for policies that ask for them) are written into one
   layer-sized buffer ``[B, Hkv, Tb, D]``;
2. every policy's ``build`` turns that layer's dense K/V into the layer's state, and the host part of the state moves
   to ``pinned_host`` at once (:func:`place_host_fields`); the scan stacks the per-layer states into ``[L, ...]``;
3. the next layer reads the updated hidden states ``[B, Tb, d]`` (carried in place).

So the dense K/V of all layers never exists on the device: what stays is the weights, the hidden states (or, with
:func:`prefill_hidden`'s ``hidden_on_host``, only one chunk of them: the rest lives in host memory, passed in and
donated), one layer's dense K/V and the policies' device state. ``full``'s state is its dense cache, so its peak does not change.

Why one scan and not a jitted per-layer function called ``L`` times: the scan compiles one layer body once, runs as
one dispatch, and its outputs are written layer by layer into the stacked state (a dynamic-update-slice per layer;
into host memory for host fields, which XLA turns into a DMA on TPU), so there is no host round trip per layer and
no concatenation of per-layer states afterwards. A per-layer call would need the stacked state donated back into
every call to avoid that copy, and L dispatches; it brings nothing the scan lacks (CPU prefill speed and compiled
memory are in BENCHMARKS.md).

Several policies can be built from the same prefill (``policies`` is a tuple): the layer's K/V are computed once and
handed to each ``build`` (the evaluation harness builds every method of a sample from one exact prefill).

Prefill attention per platform (``lax.platform_dependent``): CPU — the block-causal online-softmax loop below;
GPU — ``jax.nn.dot_product_attention`` with the cuDNN implementation; TPU — the Pallas flash attention kernel of
``jax.experimental.pallas.ops.tpu``. On the accelerators the layer's queries of all chunks are computed first and
attention runs once over the whole layer (the kernels want the whole sequence), then the output projection and MLP
run chunk by chunk; on CPU the three stages are interleaved per chunk.
"""
from __future__ import annotations

import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from models.config import ModelConfig
from models.transformer import Params, embed_tokens, layer_finish, layer_qkv, logits_from_hidden, rms_norm, rope_tables

from . import cache as cache_mod
from .offload import place_on_host


# ----------------------------------------------------------------------------- attention
def block_causal_attention(q, kc, vc, q_pos, lengths, start):
    """Exact attention of one query chunk against a layer's key buffer, visiting only the key blocks at or before
    the chunk (block-causal online softmax: the work is the causal half, not the whole buffer).

    q ``[B, C, H, D]``, kc/vc ``[B, Hkv, S, D]`` (S a multiple of C), q_pos int32 ``[B, C]`` absolute positions,
    ``lengths`` int32 ``[B]`` (keys at or beyond are padding), ``start`` the chunk's first position (traced, a
    multiple of C). Softmax in float32, scale 1/sqrt(D). Returns ``[B, C, H, D]`` in q's dtype.
    """
    B, C, H, D = q.shape
    Hkv = kc.shape[1]
    G = H // Hkv
    qg = q.reshape(B, C, Hkv, G, D).transpose(0, 2, 3, 1, 4).astype(jnp.float32) * (1.0 / float(np.sqrt(D)))

    def body(j, carry):
        m, l, acc = carry
        kb = jax.lax.dynamic_slice_in_dim(kc, j * C, C, axis=2).astype(jnp.float32)
        vb = jax.lax.dynamic_slice_in_dim(vc, j * C, C, axis=2).astype(jnp.float32)
        s = jnp.einsum("bhgqd,bhkd->bhgqk", qg, kb)
        kpos = j * C + jnp.arange(C)
        mask = (kpos[None, None, :] <= q_pos[:, :, None]) & (kpos[None, None, :] < lengths[:, None, None])
        s = jnp.where(mask[:, None, None], s, -jnp.inf)
        m_new = jnp.maximum(m, jnp.max(s, axis=-1))
        m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
        p = jnp.exp(s - m_safe[..., None])
        corr = jnp.exp(jnp.where(jnp.isfinite(m), m, m_safe) - m_safe)
        l = l * corr + jnp.sum(p, axis=-1)
        acc = acc * corr[..., None] + jnp.einsum("bhgqk,bhkd->bhgqd", p, vb)
        return m_new, l, acc

    init = (jnp.full((B, Hkv, G, C), -jnp.inf, jnp.float32), jnp.zeros((B, Hkv, G, C), jnp.float32),
            jnp.zeros((B, Hkv, G, C, D), jnp.float32))
    _, l, acc = jax.lax.fori_loop(0, start // C + 1, body, init)
    o = acc / jnp.maximum(l, 1e-30)[..., None]
    return o.transpose(0, 3, 1, 2, 4).reshape(B, C, H, D).astype(q.dtype)


def _layer_attention_gpu(q, k, v, lengths):
    """Causal GQA attention of a whole layer with cuDNN (``jax.nn.dot_product_attention``). q ``[B, T, H, D]``,
    k/v ``[B, Hkv, T, D]`` -> ``[B, T, H, D]``."""
    kt, vt = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
    return jax.nn.dot_product_attention(q, kt, vt, is_causal=True, key_value_seq_lengths=lengths,
                                        implementation="cudnn")


def _layer_attention_tpu(q, k, v, lengths):
    """Causal attention of a whole layer with the Pallas TPU flash-attention kernel (queries and keys of one
    sequence share a segment id; padding rows get their own). q ``[B, T, H, D]``, k/v ``[B, Hkv, T, D]``.
    The kernel wants as many K/V heads as query heads, so GQA K/V are repeated over the group (a transient of
    G x one layer's K/V)."""
    from jax.experimental.pallas.ops.tpu import flash_attention as fa

    B, T, H, D = q.shape
    G = H // k.shape[1]
    kh = jnp.repeat(k, G, axis=1) if G > 1 else k
    vh = jnp.repeat(v, G, axis=1) if G > 1 else v
    seg = (jnp.arange(T)[None, :] >= lengths[:, None]).astype(jnp.int32)
    ids = fa.SegmentIds(q=seg, kv=seg)
    blk = min(128, T)
    sizes = fa.BlockSizes(block_q=blk, block_k_major=blk, block_k=blk, block_b=1)
    o = fa.flash_attention(q.transpose(0, 2, 1, 3), kh, vh, segment_ids=ids, causal=True, sm_scale=D ** -0.5,
                           block_sizes=sizes)
    return o.transpose(0, 2, 1, 3).astype(q.dtype)


# ----------------------------------------------------------------------------- one layer over the prompt
def _live_chunks(lengths, chunk: int):
    """Number of prompt chunks holding a real token of some sequence (traced int32): chunks wholly in the bucket's
    right padding are skipped, so their K/V rows stay zero and their hidden states are the embeddings (every
    reader masks rows at or beyond ``lengths``)."""
    return (jnp.max(lengths) + chunk - 1) // chunk


def _read(x, start, chunk, on_host):
    xc = jax.lax.dynamic_slice_in_dim(x, start, chunk, axis=1)
    return jax.device_put(xc, jax.memory.Space.Device) if on_host else xc


def _write(x, xc, start, on_host):
    if on_host:
        xc = jax.device_put(xc, jax.memory.Space.Host)
    return jax.lax.dynamic_update_slice_in_dim(x, xc.astype(x.dtype), start, axis=1)


def _layer_interleaved(params, cfg, lp, layer, x, lengths, chunk, keep_q, on_host):
    """One layer over the prompt, chunk by chunk (qkv -> attention -> MLP per chunk): the CPU path. Returns
    (hidden ``[B, Tb, d]``, k, v ``[B, Hkv, Tb, D]``, q ``[B, H, Tb, D]`` or None)."""
    B, Tb, _ = x.shape
    dt = params["embed"].dtype
    kb = jnp.zeros((B, cfg.num_kv_heads, Tb, cfg.head_dim), dt)
    vb = jnp.zeros_like(kb)
    qb = jnp.zeros((B, cfg.num_heads, Tb, cfg.head_dim), dt) if keep_q else None

    def body(c, carry):
        x, kb, vb, qb = carry
        start = c * chunk
        xc = _read(x, start, chunk, on_host)
        cs, sn = rope_tables(cfg, start + jnp.arange(chunk, dtype=jnp.int32))  # [chunk, D]: no [Tb, D] tables
        hn = rms_norm(xc, lp["attn_norm"], cfg.rms_norm_eps)
        q, _, k, v = layer_qkv(lp, cfg, xc, cs, sn, hn)
        kb = jax.lax.dynamic_update_slice_in_dim(kb, k.transpose(0, 2, 1, 3), start, axis=2)
        vb = jax.lax.dynamic_update_slice_in_dim(vb, v.transpose(0, 2, 1, 3), start, axis=2)
        if keep_q:
            qb = jax.lax.dynamic_update_slice_in_dim(qb, q.transpose(0, 2, 1, 3), start, axis=2)
        pos = jnp.broadcast_to(start + jnp.arange(chunk, dtype=jnp.int32), (B, chunk))
        att = block_causal_attention(q, kb, vb, pos, lengths, start)
        out = layer_finish(lp, cfg, xc, att, layer=layer, params=params)
        return _write(x, out, start, on_host), kb, vb, qb

    return jax.lax.fori_loop(0, _live_chunks(lengths, chunk), body, (x, kb, vb, qb))


def _layer_whole(attention, params, cfg, lp, layer, x, lengths, chunk, keep_q, on_host):
    """One layer with attention over the whole layer at once (the accelerator kernels): qkv chunk by chunk, one
    ``attention(q [B,Tb,H,D], k, v, lengths)`` call, then output projection + MLP chunk by chunk."""
    B, Tb, _ = x.shape
    dt = params["embed"].dtype
    kb = jnp.zeros((B, cfg.num_kv_heads, Tb, cfg.head_dim), dt)
    vb = jnp.zeros_like(kb)
    qa = jnp.zeros((B, Tb, cfg.num_heads, cfg.head_dim), dt)

    def qkv(c, carry):
        qa, kb, vb = carry
        start = c * chunk
        xc = _read(x, start, chunk, on_host)
        cs, sn = rope_tables(cfg, start + jnp.arange(chunk, dtype=jnp.int32))  # [chunk, D]: no [Tb, D] tables
        q, _, k, v = layer_qkv(lp, cfg, xc, cs, sn, rms_norm(xc, lp["attn_norm"], cfg.rms_norm_eps))
        return (jax.lax.dynamic_update_slice_in_dim(qa, q, start, axis=1),
                jax.lax.dynamic_update_slice_in_dim(kb, k.transpose(0, 2, 1, 3), start, axis=2),
                jax.lax.dynamic_update_slice_in_dim(vb, v.transpose(0, 2, 1, 3), start, axis=2))

    n = _live_chunks(lengths, chunk)
    qa, kb, vb = jax.lax.fori_loop(0, n, qkv, (qa, kb, vb))
    att = attention(qa, kb, vb, lengths)

    def finish(c, x):
        start = c * chunk
        xc = _read(x, start, chunk, on_host)
        ac = jax.lax.dynamic_slice_in_dim(att, start, chunk, axis=1)
        return _write(x, layer_finish(lp, cfg, xc, ac, layer=layer, params=params), start, on_host)

    x = jax.lax.fori_loop(0, n, finish, x)
    return x, kb, vb, (qa.transpose(0, 2, 1, 3) if keep_q else None)


_layer_whole_gpu = functools.partial(_layer_whole, _layer_attention_gpu)
_layer_whole_tpu = functools.partial(_layer_whole, _layer_attention_tpu)


def layer_forward(params, cfg, lp, layer, x, lengths, chunk: int, keep_q: bool, on_host: bool,
                  platform_kernels: bool = True):
    """One decoder layer over the whole (right-padded) prompt: hidden ``[B, Tb, d]`` -> (hidden, post-RoPE k, v
    ``[B, Hkv, Tb, D]``, post-RoPE q ``[B, H, Tb, D]`` if ``keep_q``). Attention is chosen per lowering platform
    (module docstring); ``platform_kernels=False`` uses the CPU path everywhere."""
    def run(impl):
        return lambda x: impl(params, cfg, lp, layer, x, lengths, chunk, keep_q, on_host)

    if not platform_kernels:
        return run(_layer_interleaved)(x)
    gpu = _layer_whole_gpu if cudnn_usable(x.dtype, cfg.head_dim) else _layer_interleaved
    tpu = _layer_whole_tpu if x.shape[1] % 128 == 0 else _layer_interleaved  # the kernel's key blocks are 128 wide
    return jax.lax.platform_dependent(x, cpu=run(_layer_interleaved), cuda=run(gpu), tpu=run(tpu))


def cudnn_usable(dtype, head_dim: int) -> bool:
    """Whether the cuDNN flash attention can be traced here: a CUDA jaxlib plugin with cuDNN is installed (its
    version is checked at trace time, so a CPU-only install cannot emit it) and the dtype / head dim are ones it
    supports (bfloat16 / float16, head_dim <= 128). Otherwise GPU prefill uses the chunked jnp path."""
    if jnp.dtype(dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)) or head_dim > 128:
        return False
    try:
        from jax._src.cudnn import fused_attention_stablehlo as fas

        fas.check_cudnn_version()
    except Exception:  # noqa: BLE001 - no CUDA plugin / cuDNN
        return False
    return True


# ----------------------------------------------------------------------------- build + placement
def place_host_fields(policy, state):
    """Move the policy's ``host_fields`` of a (per-layer or stacked) state to host memory inside jit, so their avals
    say ``<host>`` (``out_shardings`` with a host memory kind alone keep a device aval: :func:`place_on_host`)."""
    return state.replace(**{f: jax.tree.map(place_on_host, getattr(state, f)) for f in policy.host_fields
                            if getattr(state, f) is not None})


def build_layer(policy, cfg: ModelConfig, k, v, q, lengths, max_new: int, extra):
    """One layer's policy state from its dense prefill K/V (``policy.build``), host fields placed in host memory."""
    st = policy.build(cfg, k, v, lengths, max_new, extra=extra, q=q)
    return place_host_fields(policy, st)


def build_from_kv(policy, cfg: ModelConfig, k, v, q, lengths, max_new: int, extra):
    """The layer-stacked state of ``policy`` from given dense K/V ``[L, B, Hkv, Tb, D]`` (q ``[L, B, H, Tb, D]`` or
    None): :func:`build_layer` one layer at a time (``lax.map``), as the prefill does. For benchmarks and tests that
    start from a synthetic cache instead of a prefill."""
    return jax.lax.map(lambda a: build_layer(policy, cfg, a[0], a[1], a[2], lengths, max_new, a[3]), (k, v, q, extra))


class DenseCapture:
    """A pseudo-policy whose state is the layer's dense prefill result: post-RoPE keys ``k`` (and with ``values`` /
    ``queries`` the values / queries) as a :class:`kvjax.cache.KVCache` ``[L, B, Hkv|H, Tb, D]`` on the device.

    Built alongside real policies it gives the exact prompt keys the attention-recall probe needs; on its own it is
    a calibration prefill (InfiniGen's skewing matrices). It implements only what :func:`prefill` calls."""

    host_fields: tuple[str, ...] = ()

    def __init__(self, values: bool = False, queries: bool = False):
        self.values, self.needs_queries = values, queries

    def __hash__(self):
        return hash((DenseCapture, self.values, self.needs_queries))

    def __eq__(self, other):
        return isinstance(other, DenseCapture) and (other.values, other.needs_queries) == (self.values,
                                                                                          self.needs_queries)

    def build(self, cfg, k, v, lengths, max_new, extra=None, q=None):
        return cache_mod.KVCache(k, v if self.values else None, q if self.needs_queries else None)


# ----------------------------------------------------------------------------- the prefill
def prefill(params: Params, cfg: ModelConfig, policies: Sequence[Any], tokens: jax.Array, lengths: jax.Array,
            extras: Sequence[Any], *, max_new: int, chunk: int, platform_kernels: bool = True):
    """Exact causal prefill of a right-padded batch, building every policy's layer-stacked state layer by layer.

    tokens int32 ``[B, Tb]`` (``Tb`` a multiple of ``chunk``), lengths int32 ``[B]``; ``extras[i]`` is policy i's
    ``prepare`` output (leading ``[L]`` on every leaf) or None; ``max_new`` the generated-token slots each state
    holds. Returns (float32 logits ``[B, V]`` of each sequence's last prompt token, tuple of states).
    """
    return prefill_hidden(params, cfg, policies, embed_tokens(params, tokens), lengths, extras, max_new=max_new,
                          chunk=chunk, platform_kernels=platform_kernels)


def prefill_hidden(params: Params, cfg: ModelConfig, policies: Sequence[Any], x: jax.Array, lengths: jax.Array,
                   extras: Sequence[Any], *, max_new: int, chunk: int, hidden_on_host: bool = False,
                   platform_kernels: bool = True):
    """:func:`prefill` from the embedded prompt ``x [B, Tb, d]``. With ``hidden_on_host`` the hidden states between
    layers stay in host memory (pass ``x`` in ``pinned_host`` and donate it): each chunk is moved to the device,
    run through the layer, and written back (slices and dynamic-update-slices of a host buffer: DMAs on TPU), so
    only one chunk of them is on the device at a time."""
    B, Tb = x.shape[:2]
    if Tb % chunk:
        raise ValueError(f"prompt bucket of {Tb} tokens is not a multiple of the prefill chunk ({chunk} tokens)")
    keep_q = any(p.needs_queries for p in policies)
    layer_params = {k[len("layers."):]: v for k, v in params.items() if k.startswith("layers.")}
    if hidden_on_host:
        x = jax.device_put(x, jax.memory.Space.Host)

    def body(x, xs):
        lp, layer, ext = xs
        x, k, v, q = layer_forward(params, cfg, lp, layer, x, lengths, chunk, keep_q, hidden_on_host,
                                   platform_kernels)
        states = tuple(build_layer(p, cfg, k, v, q if p.needs_queries else None, lengths, max_new, e)
                       for p, e in zip(policies, ext))
        return x, states

    x, states = jax.lax.scan(body, x, (layer_params, jnp.arange(cfg.num_layers), tuple(extras)))
    idx = jnp.clip(lengths - 1, 0, Tb - 1)
    if hidden_on_host:  # one row per sequence: slices of a host buffer (DMAs), no host gather
        z = jnp.zeros((), jnp.int32)
        last = jnp.concatenate([jax.device_put(jax.lax.dynamic_slice(x, (jnp.int32(b), idx[b], z), (1, 1, x.shape[2])),
                                               jax.memory.Space.Device)[:, 0] for b in range(B)], axis=0)
    else:
        last = jnp.take_along_axis(x, idx[:, None, None], axis=1, mode="promise_in_bounds")[:, 0]
    return logits_from_hidden(params, cfg, last), states


__all__ = ["DenseCapture", "block_causal_attention", "build_from_kv", "build_layer", "layer_forward",
           "place_host_fields", "prefill", "prefill_hidden"]
