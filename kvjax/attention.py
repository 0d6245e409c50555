"""One-query attention over gathered rows (the decode attention every policy ends with).

The Pallas kernel and the backend switch live in :mod:`pallas_kernels.dispatch` ("auto": compiled kernel
on TPU, jnp reference elsewhere; "interpret": the kernel in Pallas interpret mode, for tests; "reference";
env ``KVJAX_KERNELS`` or ``pallas_kernels.dispatch.set_use_kernels`` / ``kernels_override``). Policies call
:func:`attend_rows`, so the whole offloaded step switches backend in one place.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def attend_rows(q: jax.Array, k: jax.Array, v: jax.Array, valid: jax.Array) -> jax.Array:
    """Exact softmax attention of one query per sequence over gathered rows.

    q ``[B, H, D]`` (post-RoPE), k/v ``[B, Hkv, S, D]``, valid bool ``[B, Hkv, S]`` (or ``[B, 1, S]``).
    Scale 1/sqrt(D), softmax in float32. Returns ``[B, H, D]`` in q's dtype.
    """
    from pallas_kernels import dispatch

    return dispatch.decode_attention(q, k, v, valid)


def attend_rows_ref(q, k, v, valid):
    """Pure-jnp reference of :func:`attend_rows` (independent of the kernels package)."""
    B, H, D = q.shape
    Hkv = k.shape[1]
    qg = q.reshape(B, Hkv, H // Hkv, D)
    s = jnp.einsum("bhgd,bhsd->bhgs", qg, k, preferred_element_type=jnp.float32) * (1.0 / float(np.sqrt(D)))
    s = jnp.where(valid[:, :, None, :], s, -jnp.inf)
    p = jax.nn.softmax(s, axis=-1)
    o = jnp.einsum("bhgs,bhsd->bhgd", p.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return o.reshape(B, H, D).astype(q.dtype)
