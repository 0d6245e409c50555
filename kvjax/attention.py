"""One-query attention over gathered rows (the decode attention every policy ends with).

The Pallas kernel and its dispatch live in :mod:`pallas_kernels`; this module is the entry point the
policies call, so the backend can be switched in one place (``KVJAX_KERNELS=1`` or
:func:`set_use_kernels`).
"""
from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np

_USE_KERNELS = os.environ.get("KVJAX_KERNELS", "auto")


def set_use_kernels(value: str | bool) -> None:
    """"auto" (TPU/GPU kernels, CPU reference), True/"interpret" (force kernels; interpret mode on CPU), False."""
    global _USE_KERNELS
    _USE_KERNELS = value


def use_kernels():
    return _USE_KERNELS


def attend_rows(q: jax.Array, k: jax.Array, v: jax.Array, valid: jax.Array) -> jax.Array:
    """Exact softmax attention of one query per sequence over gathered rows.

    q ``[B, H, D]`` (post-RoPE), k/v ``[B, Hkv, S, D]``, valid bool ``[B, Hkv, S]`` (or ``[B, 1, S]``).
    Scale 1/sqrt(D), softmax in float32. Returns ``[B, H, D]`` in q's dtype.
    """
    try:
        from pallas_kernels import dispatch
    except ImportError:  # kernels package not importable: pure-jnp path
        dispatch = None
    if dispatch is not None and hasattr(dispatch, "decode_attention"):
        return dispatch.decode_attention(q, k, v, valid, use_kernels=_USE_KERNELS)
    return attend_rows_ref(q, k, v, valid)


def attend_rows_ref(q, k, v, valid):
    """Pure-jnp reference of :func:`attend_rows`."""
    B, H, D = q.shape
    Hkv = k.shape[1]
    qg = q.reshape(B, Hkv, H // Hkv, D)
    s = jnp.einsum("bhgd,bhsd->bhgs", qg, k, preferred_element_type=jnp.float32) * (1.0 / float(np.sqrt(D)))
    s = jnp.where(valid[:, :, None, :], s, -jnp.inf)
    p = jax.nn.softmax(s, axis=-1)
    o = jnp.einsum("bhgs,bhsd->bhgd", p.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return o.reshape(B, H, D).astype(q.dtype)
