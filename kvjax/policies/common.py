"""Helpers every policy shares: budget -> tokens, config checks, row gathers, the generated-token slots, attention
over gathered rows, dense-layer fallbacks. One implementation of each, so the policies differ only in what they are.
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from ..attention import attend_rows
from ..cache import KV_AXES, leaf, write_token
from ..offload import fetch_rows


# ----------------------------------------------------------------------------- budgets
def is_fraction(b) -> bool:
    """A budget given as a fraction of the prompt (float) rather than a token count (int)."""
    return isinstance(b, (float, np.floating))


def budget_tokens(budget: float | int, T, *, multiple: int = 1, rounding: str = "floor"):
    """Tokens of a budget for prompts of ``T`` tokens (int or numpy int array), a multiple of ``multiple``.

    A fraction ``f`` (float in [0, 1]) gives ``floor(f·T)`` — Python's ``int(f*T)`` in float64, the paper's eval
    rule (algorithms.md §2.1) — or with ``rounding="ceil"`` ``ceil(f·T)`` in float32 (the inference path's rule for
    YAKV's sinks and local window, §3.2). A token count is taken as is, capped at ``T`` (a budget larger than the
    prompt keeps the whole prompt). Both are then rounded down to a multiple of ``multiple``.
    """
    T_arr = np.asarray(T, np.int64)
    if is_fraction(budget):
        if rounding == "ceil":
            tok = np.ceil(np.float32(budget) * T_arr.astype(np.float32)).astype(np.int64)
        else:
            tok = np.floor(np.float64(budget) * T_arr.astype(np.float64)).astype(np.int64)
    else:
        tok = np.minimum(np.int64(int(budget)), T_arr)
    tok = (tok // multiple) * multiple
    return int(tok) if np.ndim(tok) == 0 else tok


def budget_table(budget: float | int, Tb: int, *, multiple: int = 1, rounding: str = "floor") -> np.ndarray:
    """int32 ``[Tb + 1]``: :func:`budget_tokens` for every prompt length ``0..Tb`` (exact host arithmetic; index it
    with the traced lengths inside jit)."""
    return budget_tokens(budget, np.arange(Tb + 1), multiple=multiple, rounding=rounding).astype(np.int32)


def length_table(fn: Callable[[int], int], Tb: int) -> jax.Array:
    """int32 table ``[Tb + 1]`` of ``fn(n)`` for every prompt length n (exact Python integer arithmetic on the host;
    indexed by the traced lengths inside jit)."""
    return jnp.asarray(np.array([fn(n) for n in range(Tb + 1)], np.int32))


# ----------------------------------------------------------------------------- config checks
def check_budget(name: str, b: Any, allow_int: bool = True) -> None:
    """Raise unless ``b`` is a float fraction of the prompt in [0, 1] or (``allow_int``) an int token count >= 0."""
    if isinstance(b, bool) or not isinstance(b, (int, float, np.integer, np.floating)):
        raise TypeError(f"{name}={b!r} must be a float fraction of the prompt in [0, 1] or an int token count")
    if is_fraction(b):
        if not 0.0 <= float(b) <= 1.0:
            raise ValueError(f"{name}={b} as a fraction of the prompt must be in [0, 1]")
    elif not allow_int:
        raise TypeError(f"{name}={b!r} must be a float fraction in [0, 1]")
    elif b < 0:
        raise ValueError(f"{name}={b} tokens must be >= 0")


def check_int(name: str, x: Any, lo: int, unit: str) -> None:
    """Raise unless ``x`` is an integer >= ``lo`` (``unit`` names what it counts)."""
    if isinstance(x, bool) or not isinstance(x, (int, np.integer)) or x < lo:
        raise ValueError(f"{name}={x!r} must be an integer >= {lo} {unit}")


def check_common(mcfg, lengths, max_new: int, dense_layers: int = 0) -> None:
    """Checks shared by the policies: generated slots >= 1, prompts non-empty, dense layers <= L."""
    lengths = np.asarray(lengths).reshape(-1)
    if max_new < 1:
        raise ValueError(f"max_new={max_new} generated-token slots must be >= 1")
    if (lengths < 1).any():
        raise ValueError(f"prompt lengths {lengths.tolist()} must all be >= 1 token")
    if dense_layers > mcfg.num_layers:
        raise ValueError(f"dense_layers={dense_layers} exceeds the model's {mcfg.num_layers} layers")


def top_k(scores: jax.Array, k: int):
    """``lax.top_k`` over the last axis, computed in float32.

    Scores rounded to bf16 (the paper's selection precision) are exactly representable in float32, so the
    result -- values, order and the lower-index-first tie-breaking -- is the same, but XLA:CPU's bf16
    top-k is much slower than its float32 one (BENCHMARKS.md).
    """
    vals, idx = jax.lax.top_k(scores.astype(jnp.float32), k)
    return vals.astype(scores.dtype), idx


# ----------------------------------------------------------------------------- rows
def take_rows(x: jax.Array, idx: jax.Array) -> jax.Array:
    """The one row gather of device arrays: x ``[B, H, T, *row]``, idx int ``[B, H, K]`` (in range) ->
    ``[B, H, K, *row]``. (Rows in host memory are fetched with :func:`kvjax.offload.fetch_rows`.)"""
    idx = idx.reshape(idx.shape + (1,) * (x.ndim - 3))
    return jnp.take_along_axis(x, idx, axis=2, mode="promise_in_bounds")


def pack_kv(k: jax.Array, v: jax.Array) -> jax.Array:
    """k, v ``[..., T, D]`` -> ``[..., T, 2, D]`` (one host row per token holds its key and value: one fetch)."""
    return jnp.stack([k, v], axis=-2)


def fetch_prompt(store: jax.Array, layer, backend: str) -> jax.Array:
    """Every prompt row of one layer, on the device: store ``[L, B, Hkv, Tb, *row]`` -> ``[B, Hkv, Tb, *row]``
    (dense layers). ``chunk_slices`` moves one ``Tb``-token slice per (sequence, KV head)."""
    B, H, Tb = store.shape[1:4]
    if backend == "chunk_slices":
        return fetch_rows(store, layer, jnp.zeros((B, H, 1), jnp.int32), backend="chunk_slices", chunk=Tb)
    idx = jnp.broadcast_to(jnp.arange(Tb, dtype=jnp.int32), (B, H, Tb))
    return fetch_rows(store, layer, idx, backend=backend)


def bcast_heads(m: jax.Array, H: int) -> jax.Array:
    """``[B, S]`` -> ``[B, H, S]``."""
    return jnp.broadcast_to(m[:, None, :], (m.shape[0], H, m.shape[-1]))


#: tokens per block of the blockwise build work (quantizers): bounds its temporaries to one block of one layer
BUILD_BLOCK_TOKENS = 8192


def map_token_blocks(fn: Callable, n: int, block: int = BUILD_BLOCK_TOKENS):
    """Run ``fn(start, size)`` over ``ceil(n / block)`` blocks of ``size = min(block, n)`` consecutive token slots and
    write each block's results into preallocated outputs (a ``fori_loop`` of dynamic-update-slices), so a layer's
    build temporaries (float32 copies, Hadamard stages, code indices) are one block big instead of one layer big.

    ``fn`` returns a tuple of arrays (or None) whose axis 2 has ``size`` slots; ``start`` is traced. The last block may
    run past ``n`` (``fn`` must clip its reads); those slots are cut off. Returns the tuple with ``n`` slots."""
    size = max(1, min(block, n))
    nblk = -(-n // size)
    if nblk == 1:
        return fn(jnp.int32(0), size)
    shapes = jax.eval_shape(lambda: fn(jnp.int32(0), size))
    outs = tuple(None if o is None else jnp.zeros(o.shape[:2] + (nblk * size,) + o.shape[3:], o.dtype)
                 for o in shapes)

    def body(i, outs):
        res = fn(i * size, size)
        return tuple(None if o is None else jax.lax.dynamic_update_slice_in_dim(o, r.astype(o.dtype), i * size, axis=2)
                     for o, r in zip(outs, res))

    outs = jax.lax.fori_loop(0, nblk, body, outs)
    return tuple(None if o is None else (o[:, :, :n] if nblk * size != n else o) for o in outs)


# ----------------------------------------------------------------------------- generated tokens
@struct.dataclass
class GenSlots:
    """Exact post-RoPE K/V of the generated tokens, on the device: k, v ``[L, B, Hkv, M, D]``; the token at
    position ``p`` of a prompt of ``T`` tokens sits in slot ``p - T``. Every policy keeps these and always attends
    them (generated tokens are never offloaded or scored)."""

    k: jax.Array = leaf(*KV_AXES)
    v: jax.Array = leaf(*KV_AXES)

    @staticmethod
    def zeros(B: int, Hkv: int, M: int, D: int, dtype) -> "GenSlots":
        """One layer's empty slots ``[B, Hkv, M, D]`` (the prefill stacks them over layers)."""
        z = jnp.zeros((B, Hkv, M, D), dtype)
        return GenSlots(z, z)

    @property
    def size(self) -> int:
        return self.k.shape[3]

    def append(self, layer, k: jax.Array, v: jax.Array, pos: jax.Array, lengths: jax.Array) -> "GenSlots":
        """Write the new token's k, v ``[B, Hkv, D]`` at slot ``pos - lengths`` of layer ``layer`` (in place in the
        decode scan; a slot beyond the bucket is clipped to the last one)."""
        slot = jnp.clip(pos - lengths, 0, self.size - 1)
        return GenSlots(write_token(self.k, layer, k, slot), write_token(self.v, layer, v, slot))

    def valid(self, pos: jax.Array, lengths: jax.Array) -> jax.Array:
        """bool ``[B, M]``: slots written so far, the current token included."""
        return jnp.arange(self.size)[None, :] <= (pos - lengths)[:, None]


# ----------------------------------------------------------------------------- attention helpers
def attend_per_query_head(q, own_k, own_v, own_valid, shared_k, shared_v, shared_valid):
    """Exact attention where each query head has its own selected rows plus rows shared by all heads.

    q ``[B, H, D]``; own_k/v ``[B, Hkv, G, K, D]`` with own_valid ``[B, Hkv, G, K]`` (per query head h = kv·G + g);
    shared_k/v ``[B, Hkv, S, D]`` with shared_valid ``[B, Hkv, S]``. The shared rows are broadcast to every head of
    their group and the whole thing runs as one-query attention with G = 1 (:func:`kvjax.attention.attend_rows`).
    """
    B, Hkv, G, K, D = own_k.shape

    def cat(own, shared):
        sh = jnp.broadcast_to(shared[:, :, None], (B, Hkv, G) + shared.shape[2:])
        return jnp.concatenate([own, sh.astype(own.dtype)], axis=3).reshape(
            (B, Hkv * G, K + shared.shape[2]) + own.shape[4:])

    return attend_rows(q, cat(own_k, shared_k), cat(own_v, shared_v), cat(own_valid, shared_valid))


def dense_attend(q, store, layer, backend, lengths, gen: GenSlots, gen_ok):
    """Full attention of one layer: every prompt token (fetched from the store ``[L, B, Hkv, Tb, 2, D]``) and every
    generated token (``gen`` slots of this layer, ``gen_ok`` ``[B, M]``)."""
    rows = fetch_prompt(store, layer, backend)  # [B, Hkv, Tb, 2, D]
    B, Hkv, Tb = rows.shape[:3]
    gk, gv = gen.k[layer], gen.v[layer]
    p_ok = bcast_heads(jnp.arange(Tb)[None, :] < lengths[:, None], Hkv)
    keys = jnp.concatenate([rows[..., 0, :].astype(gk.dtype), gk], axis=2)
    vals = jnp.concatenate([rows[..., 1, :].astype(gv.dtype), gv], axis=2)
    return attend_rows(q, keys, vals, jnp.concatenate([p_ok, bcast_heads(gen_ok, Hkv)], axis=2))


def layer_cond(n_dense: int, layer, dense_fn, sparse_fn):
    """``dense_fn()`` for layers below ``n_dense``, else ``sparse_fn()`` (a ``lax.cond`` on the traced layer;
    both return pytrees of the same shapes). With ``n_dense == 0`` the sparse path is traced alone."""
    if n_dense <= 0:
        return sparse_fn()
    return jax.lax.cond(layer < n_dense, dense_fn, sparse_fn)


__all__ = ["GenSlots", "attend_per_query_head", "bcast_heads", "budget_table", "budget_tokens", "check_budget",
           "check_common", "check_int", "dense_attend", "fetch_prompt", "is_fraction", "layer_cond", "length_table", "map_token_blocks",
           "pack_kv", "take_rows", "top_k"]
