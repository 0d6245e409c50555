"""One-query attention over gathered rows (the decode attention every policy ends with).

The Pallas kernel and the backend switch live in :mod:`pallas_kernels.dispatch` ("auto": compiled kernel
on TPU, jnp reference elsewhere; "interpret": the kernel in Pallas interpret mode, for tests; "reference";
env ``KVJAX_KERNELS`` or ``pallas_kernels.dispatch.set_use_kernels`` / ``kernels_override``). Policies call
:func:`attend_rows`, so the whole offloaded step switches backend in one place.
"""
from __future__ import annotations

import jax


def attend_rows(q: jax.Array, k: jax.Array, v: jax.Array, valid: jax.Array) -> jax.Array:
    """Exact softmax attention of one query per sequence over gathered rows.

    q ``[B, H, D]`` (post-RoPE), k/v ``[B, Hkv, S, D]``, valid bool ``[B, Hkv, S]`` (or ``[B, 1, S]``).
    Scale 1/sqrt(D), softmax in float32. Returns ``[B, H, D]`` in q's dtype.
    """
    from pallas_kernels import dispatch

    return dispatch.decode_attention(q, k, v, valid)

