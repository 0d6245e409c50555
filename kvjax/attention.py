"""One-query attention over gathered rows (the decode attention every policy ends with).

The Pallas kernels and the backend switch live in :mod:`pallas_kernels.dispatch` ("auto": the compiled kernel on
TPU and GPU, the jnp reference on CPU; "interpret" / "interpret_gpu": the TPU / GPU kernel in Pallas interpret
mode, for tests; "reference"; env ``KVJAX_KERNELS`` or ``pallas_kernels.dispatch.set_use_kernels`` /
``kernels_override``). Policies call :func:`attend_rows` or :func:`attend_segments`, so the whole offloaded step
switches backend in one place.
"""
from __future__ import annotations

from typing import Sequence

import jax


def attend_rows(q: jax.Array, k: jax.Array, v: jax.Array, valid: jax.Array, layer: jax.Array | None = None
                ) -> jax.Array:
    """Exact softmax attention of one query per sequence over gathered rows.

    q ``[B, H, D]`` (post-RoPE), k/v ``[B, Hkv, S, D]``, valid bool ``[B, Hkv, S]`` (or ``[B, 1, S]``).
    With ``layer`` (int scalar) k/v are a layer-stacked cache ``[L, B, Hkv, S, D]`` and that layer is attended,
    read in place by the kernels (``k[layer]`` would be copied by XLA before a kernel call). Scale 1/sqrt(D),
    softmax in float32. Returns ``[B, H, D]`` in q's dtype.
    """
    from pallas_kernels import dispatch

    return dispatch.decode_attention(q, k, v, valid, layer=layer)


def attend_segments(q: jax.Array, segments: Sequence[tuple[jax.Array, jax.Array, jax.Array | None]]) -> jax.Array:
    """:func:`attend_rows` over the union of several row segments, without concatenating them first.

    ``segments``: ``[(k, v, valid), ...]`` — e.g. a policy's exact window, the rows fetched this step and the
    generated slots — each ``k, v [B, Hkv, S_i, D]`` (same KV heads and dtypes) with ``valid`` bool
    ``[B, Hkv, S_i]`` / ``[B, 1, S_i]`` or None (all valid). Equals ``attend_rows(q, concat(k), concat(v),
    concat(valid))``; on GPU each segment is read in place by the Triton kernel and the partial softmaxes are merged,
    elsewhere the segments are concatenated (the jnp reference / the TPU kernel).
    """
    from pallas_kernels import dispatch

    return dispatch.decode_attention_segments(q, segments)
