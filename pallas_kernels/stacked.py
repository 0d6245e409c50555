"""Layer-stacked kernel inputs: the shared handling of ``layer=`` (attend / score one layer of ``[L, ...]`` arrays
in place, without XLA copying ``x[layer]`` into a fresh buffer before the kernel call)."""
from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["per_layer", "stacked_args"]


def per_layer(layer, **arrays) -> list:
    """Shape structs of one layer of each named array (``[L, *s] -> [*s]``); ValueError naming an array without a
    layer axis or a non-scalar ``layer``."""
    if jnp.ndim(layer) != 0:
        raise ValueError(f"layer has shape {jnp.shape(layer)}: expected an int scalar")
    out = []
    for name, x in arrays.items():
        if x.ndim < 2:
            raise ValueError(f"{name}.shape={tuple(x.shape)}: expected a leading layer axis [L, ...] with layer= "
                             "given")
        out.append(jax.ShapeDtypeStruct(x.shape[1:], x.dtype))
    return out


def stacked_args(layer, *arrays) -> tuple:
    """``(*arrays as [L, ...], layer int32 [1])`` for a kernel: without ``layer`` each array gets ``L = 1`` (a free
    reshape) and layer 0; a given layer is clipped to ``[0, L)``."""
    if layer is None:
        return (*(x[None] for x in arrays), jnp.zeros((1,), jnp.int32))
    return (*arrays, jnp.clip(jnp.asarray(layer, jnp.int32), 0, arrays[0].shape[0] - 1).reshape(1))
