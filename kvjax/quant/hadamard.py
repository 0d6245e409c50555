"""Walsh–Hadamard transform (unnormalised, Sylvester order) over groups of the last axis.

``H_G[i, j] = (-1)^popcount(i & j)`` for a power of two ``G``; ``H_G`` is symmetric and ``H_G @ H_G = G * I``.
This is the transform HIGGS applies before quantizing (algorithms.md §4.1): plain deterministic ``H_G``,
no random signs, no permutation — the same order as ``scipy.linalg.hadamard``.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["check_group", "hadamard_matrix", "hadamard_transform"]


def _is_pow2(g: int) -> bool:
    return g >= 1 and (g & (g - 1)) == 0


def check_group(group: int, axis_len: int | None = None, *, name: str = "group") -> int:
    """Validate a Hadamard group size: a power of two >= 1 that divides ``axis_len`` (when given).

    Returns ``group`` as an int; raises ``ValueError`` naming the argument and the allowed values otherwise.
    """
    try:
        g = int(group)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a power-of-two integer, got {group!r}") from None
    if g != group or not _is_pow2(g):
        raise ValueError(f"{name} must be a power of two (1, 2, 4, ..., 1024, ...) values, got {group!r}")
    if axis_len is not None and axis_len % g != 0:
        raise ValueError(
            f"{name}={g} values must divide the last axis, which has {axis_len} values "
            f"(the transform is applied per contiguous group of {g})"
        )
    return g


def hadamard_matrix(group: int) -> np.ndarray:
    """Dense unnormalised Sylvester Hadamard matrix ``H_G`` (numpy float32 ``[G, G]``, entries ±1)."""
    g = check_group(group)
    i = np.arange(g, dtype=np.uint64)
    bits = np.bitwise_and(i[:, None], i[None, :])
    # popcount parity of i & j
    parity = np.zeros_like(bits)
    while np.any(bits):
        parity ^= bits & np.uint64(1)
        bits >>= np.uint64(1)
    return np.where(parity == 1, -1.0, 1.0).astype(np.float32)


def hadamard_transform(x, group: int | None = None, *, scale: float | None = None):
    """Apply ``H_G`` to every contiguous group of ``G`` values along the last axis of ``x``.

    Args:
      x: array ``[..., C]``; floating dtypes are kept, integers are computed in float32.
      group: ``G``, a power of two dividing ``C``; ``None`` means ``G = C`` (one group).
      scale: optional factor multiplied into the result (e.g. ``1/G`` for the inverse, ``G**-0.5`` for the
        orthonormal transform).

    Returns:
      ``y`` of the same shape, with ``y[..., k*G:(k+1)*G] = H_G @ x[..., k*G:(k+1)*G]`` (times ``scale``).
      Computed by ``log2(G)`` butterfly stages (reshapes, adds and subtracts), so cost is ``C log2 G``.
      Applying it twice gives ``G * x``.
    """
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        x = x.astype(jnp.float32)
    if x.ndim == 0:
        raise ValueError("x must have at least one axis (the transformed last axis), got a scalar")
    c = x.shape[-1]
    g = check_group(c if group is None else group, c)
    y = _butterflies(x, g)
    if scale is not None:
        y = y * jnp.asarray(scale, dtype=y.dtype)
    return y


@functools.partial(jax.jit, static_argnums=1)
def _butterflies(x, g: int):
    """log2(g) radix-2 stages on contiguous groups of g along the last axis (jitted: one compile per shape)."""
    c = x.shape[-1]
    lead = x.shape[:-1]
    y = x.reshape(lead + (c // g, g))
    h = 1
    while h < g:
        # stage on bit log2(h) of the in-group index: pairs (i, i + h) inside blocks of 2h
        y = y.reshape(lead + (c // g, g // (2 * h), 2, h))
        a = y[..., 0, :]
        b = y[..., 1, :]
        y = jnp.stack([a + b, a - b], axis=-2)
        h *= 2
    return y.reshape(x.shape)
