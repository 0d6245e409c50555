"""Token sampling: greedy, temperature, top-k, top-p (nucleus), with an explicit PRNG key.

All knobs are traced scalars, so changing them never recompiles the decode step.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """``temperature=0`` is greedy (argmax, the paper's setting). ``top_k=0`` and ``top_p=1`` disable them."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self):
        if not (self.temperature >= 0.0) or self.temperature != self.temperature:
            raise ValueError(f"temperature={self.temperature} must be >= 0 (0 means greedy)")
        if int(self.top_k) != self.top_k or self.top_k < 0:
            raise ValueError(f"top_k={self.top_k} must be an integer >= 0 (0 disables top-k)")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p={self.top_p} must be in (0, 1] (1 disables nucleus sampling)")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def filter_logits(logits: jax.Array, temperature, top_k, top_p) -> jax.Array:
    """Temperature-scaled float32 logits ``[B, V]`` with tokens outside top-k / top-p set to -inf."""
    l = logits.astype(jnp.float32) / jnp.maximum(temperature, 1e-6)
    V = l.shape[-1]
    srt = -jnp.sort(-l, axis=-1)  # descending
    k = jnp.where(top_k > 0, jnp.minimum(top_k, V), V)
    kth = jnp.take_along_axis(srt, jnp.broadcast_to(k - 1, l.shape[:-1])[..., None].astype(jnp.int32), axis=-1)
    l = jnp.where(l < kth, -jnp.inf, l)
    srt = jnp.where(jnp.arange(V) < k, srt, -jnp.inf)
    p = jax.nn.softmax(srt, axis=-1)
    before = jnp.cumsum(p, axis=-1) - p  # mass strictly above each sorted token
    keep = before < top_p
    thr = jnp.min(jnp.where(keep, srt, jnp.inf), axis=-1, keepdims=True)
    return jnp.where(l < thr, -jnp.inf, l)


def sample(logits: jax.Array, key: jax.Array, temperature, top_k, top_p) -> jax.Array:
    """Next token ids int32 ``[B]`` from logits ``[B, V]``; greedy when ``temperature == 0``."""
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)

    def draw():
        return jax.random.categorical(key, filter_logits(logits, temperature, top_k, top_p), axis=-1).astype(jnp.int32)

    return jax.lax.cond(temperature > 0, draw, lambda: greedy)
