"""``full``: exact attention over every prompt and generated token (the reference every policy is tested against)."""
from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from ..attention import attend_rows
from ..cache import KVCache, write_token
from .base import Policy, PolicyConfig


@dataclasses.dataclass(frozen=True)
class FullConfig(PolicyConfig):
    """Full attention has no hyper-parameters."""


class FullPolicy(Policy):
    """Dense device KV cache ``[B, Hkv, Tb + max_new, D]`` per layer; decode appends and attends to all."""

    name = "full"
    config_class = FullConfig
    budget_knob = None
    prunes = False

    def build(self, mcfg, k, v, lengths, max_new, extra=None, q=None):
        pad = [(0, 0), (0, 0), (0, max_new), (0, 0)]
        return KVCache(jnp.pad(k, pad), jnp.pad(v, pad))

    def decode(self, mcfg, st, layer, q, k_pre, k, v, pos, h=None):
        kc = write_token(st.k, layer, k, pos)
        vc = write_token(st.v, layer, v, pos)
        S = kc.shape[3]
        valid = (jnp.arange(S)[None, :] <= pos[:, None])[:, None, :]
        return attend_rows(q, kc, vc, valid, layer=layer), KVCache(kc, vc)  # read in place: no copy of the layer

    def attended_mask(self, mcfg, st, layer, q, pos):
        S = st.k.shape[3]
        m = jnp.arange(S)[None, :] < pos[:, None]
        return jnp.broadcast_to(m[:, None, :], (q.shape[0], mcfg.num_kv_heads, S))
