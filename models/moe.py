"""Feed-forward blocks: the dense SwiGLU MLP and Qwen3-MoE's sparse mixture-of-experts block.

**Routing** (transformers' ``Qwen3MoeTopKRouter``): router logits ``h @ W_r`` (``[N, E]``), softmax in float32,
the ``k = num_experts_per_tok`` largest probabilities and their experts, renormalised to sum 1 when
``norm_topk_prob``, cast to the activation dtype. The block's output is ``sum_j p_j * expert_{e_j}(h)`` with
each expert a SwiGLU of width ``moe_intermediate_size``.

**Layout.** Expert weights are stacked over the sparse layers only: ``moe.router [Lm, d, E]``,
``moe.w_gate``/``moe.w_up [Lm, E, d, f]``, ``moe.w_down [Lm, E, f, d]``; the dense layers of a model that mixes
both keep their MLP in ``dense.w_* [Ld, ...]``. Neither is a ``layers.*`` parameter, so the layer scan does not
slice them: :func:`feed_forward` indexes its own stack from the traced layer index with a static per-layer table
and, when a model has both kinds, picks the branch with ``lax.cond`` inside the single layer scan. One scan
keeps layer order, the per-layer attention callback and the KV-cache policies exactly as for dense models;
stacking every MLP kind over every layer would hold unused weights (a 30B model's experts for dense layers).

**Two expert paths**, chosen statically from the token count N of the call (prefill calls it on chunks,
decode with one token per sequence, so it never needs the whole prompt):

- *gathered* (N*k <= E, decode): the weights of the N*k selected (token, expert) pairs are gathered straight
  from the stacked ``[Lm, E, d, f]`` arrays, so one token reads k experts, never all of them;
- *grouped* (prefill): the N*k pairs are sorted by expert and multiplied with ``jax.lax.ragged_dot`` (one
  grouped matmul per projection over the layer's experts), then unsorted and weighted. TPU and GPU lower
  ``ragged_dot`` to a grouped matmul; XLA's CPU fallback expands it densely over the experts (exact, but it
  computes every expert for every row).

**Expert parallelism.** On a mesh the expert axis ``E`` of the weights is split over ``"model"``
(:func:`models.transformer.param_partition_specs`). The block then runs under ``shard_map`` manual over
``"model"`` only (``"data"`` stays automatic): every device routes the (replicated) tokens, computes the pairs
whose expert it holds and zeroes the others, and one ``psum`` of the ``[N, d]`` output combines them, so only
activations cross devices, never weights. The mesh is the one the expert weights are sharded on.
"""
from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from .config import ModelConfig

Params = dict[str, Any]
EXPERT_PARAMS = ("moe.w_gate", "moe.w_up", "moe.w_down")


def swiglu(g: jax.Array, u: jax.Array, dtype) -> jax.Array:
    """SwiGLU activation ``silu(g) * u`` in float32, result in ``dtype``."""
    return (jax.nn.silu(g.astype(jnp.float32)) * u.astype(jnp.float32)).astype(dtype)


def linear(x: jax.Array, w: jax.Array) -> jax.Array:
    """``x @ w`` for x ``[..., d]``, w ``[d, f]``: float32 accumulation, result in x's dtype."""
    return jnp.einsum("...d,df->...f", x, w, preferred_element_type=jnp.float32).astype(x.dtype)


def dense_mlp(h: jax.Array, w_gate: jax.Array, w_up: jax.Array, w_down: jax.Array) -> jax.Array:
    """Dense SwiGLU MLP: h ``[..., d]`` with w_gate/w_up ``[d, f]``, w_down ``[f, d]`` -> ``[..., d]`` (h's dtype)."""
    return linear(swiglu(linear(h, w_gate), linear(h, w_up), h.dtype), w_down)


def route(h: jax.Array, w_router: jax.Array, cfg: ModelConfig) -> tuple[jax.Array, jax.Array]:
    """Top-k routing of tokens h ``[N, d]`` with router ``[d, E]``: (weights ``[N, k]`` in h's dtype, experts int32
    ``[N, k]``), as transformers' ``Qwen3MoeTopKRouter``."""
    logits = jnp.einsum("nd,de->ne", h, w_router, preferred_element_type=jnp.float32)
    probs = jax.nn.softmax(logits, axis=-1)
    top_p, top_e = jax.lax.top_k(probs, cfg.num_experts_per_tok)
    if cfg.norm_topk_prob:
        top_p = top_p / jnp.sum(top_p, axis=-1, keepdims=True)
    return top_p.astype(h.dtype), top_e.astype(jnp.int32)


def uses_gather(num_tokens: int, cfg: ModelConfig) -> bool:
    """Whether a call on ``num_tokens`` tokens gathers the selected experts' weights (reading no more expert
    matrices than the layer has) rather than running the grouped matmul over the layer's experts."""
    return num_tokens * cfg.num_experts_per_tok <= cfg.num_experts


def _experts_gathered(w_gate, w_up, w_down, slot, h, experts, weights, first):
    """Expert outputs by gathering the selected experts' weights. w_* ``[Lm, El, ...]`` hold experts
    ``first .. first+El-1``; h ``[N, d]``, experts/weights ``[N, k]``. Returns float32 ``[N, d]`` (pairs of
    other experts contribute 0)."""
    El = w_gate.shape[1]
    local = experts - first
    mine = (local >= 0) & (local < El)
    idx = jnp.clip(local, 0, El - 1)
    g = jnp.einsum("nd,nkdf->nkf", h, w_gate[slot, idx], preferred_element_type=jnp.float32)
    u = jnp.einsum("nd,nkdf->nkf", h, w_up[slot, idx], preferred_element_type=jnp.float32)
    y = jnp.einsum("nkf,nkfd->nkd", swiglu(g, u, h.dtype), w_down[slot, idx], preferred_element_type=jnp.float32)
    y = jnp.where(mine[..., None], y, 0.0)
    return jnp.einsum("nkd,nk->nd", y, weights.astype(jnp.float32))


def _experts_grouped(w_gate, w_up, w_down, slot, h, experts, weights, first):
    """Expert outputs by one grouped matmul per projection (``ragged_dot``) over the (token, expert) pairs sorted
    by expert; same arguments and result as :func:`_experts_gathered`."""
    El = w_gate.shape[1]
    N, k = experts.shape
    local = (experts - first).reshape(N * k)
    mine = (local >= 0) & (local < El)
    group = jnp.where(mine, local, El)  # other devices' pairs sort last, outside every group
    order = jnp.argsort(group, stable=True)
    sizes = jnp.sum(group[None, :] == jnp.arange(El, dtype=group.dtype)[:, None], axis=1).astype(jnp.int32)
    rows = h[order // k]
    wg, wu, wd = (jax.lax.dynamic_index_in_dim(w, slot, keepdims=False) for w in (w_gate, w_up, w_down))
    g = jax.lax.ragged_dot(rows, wg, sizes, preferred_element_type=jnp.float32)
    u = jax.lax.ragged_dot(rows, wu, sizes, preferred_element_type=jnp.float32)
    y = jax.lax.ragged_dot(swiglu(g, u, h.dtype), wd, sizes, preferred_element_type=jnp.float32)
    y = jnp.where(mine[order][:, None], y, 0.0)  # rows outside the groups: zero, whatever the backend leaves
    y = y[jnp.argsort(order)].reshape(N, k, -1)
    return jnp.einsum("nkd,nk->nd", y, weights.astype(jnp.float32))


def expert_mesh(w: jax.Array):
    """The mesh the expert weights ``w`` are split on over ``"model"`` (None: one device or no expert split)."""
    mesh = jax.typeof(w).sharding.mesh
    if "model" not in mesh.axis_names or mesh.shape["model"] == 1:
        return None
    return mesh


def moe_block(params: Params, cfg: ModelConfig, slot: jax.Array, h: jax.Array) -> jax.Array:
    """Sparse MoE feed-forward of sparse layer ``slot`` (index into the ``moe.*`` stacks): h ``[B, T, d]``
    (post-attention-norm hidden states) -> ``[B, T, d]`` in h's dtype."""
    B, T, d = h.shape
    x = h.reshape(B * T, d)
    slot = jnp.asarray(slot, jnp.int32)
    weights, experts = route(x, jax.lax.dynamic_index_in_dim(params["moe.router"], slot, keepdims=False), cfg)
    fn = _experts_gathered if uses_gather(B * T, cfg) else _experts_grouped
    ws = [params[n] for n in EXPERT_PARAMS]
    mesh = expert_mesh(ws[0])
    if mesh is None:
        y = fn(*ws, slot, x, experts, weights, 0)
    else:
        def per_device(w_gate, w_up, w_down, slot, x, experts, weights):
            first = jax.lax.axis_index("model") * w_gate.shape[1]
            return jax.lax.psum(fn(w_gate, w_up, w_down, slot, x, experts, weights, first), "model")

        y = jax.shard_map(per_device, mesh=mesh, in_specs=(P(None, "model"),) * 3 + (P(),) * 4, out_specs=P(),
                          axis_names={"model"})(*ws, slot, x, experts, weights)
    return y.astype(h.dtype).reshape(B, T, d)


@functools.lru_cache(maxsize=None)
def _slot_tables(cfg: ModelConfig) -> tuple[np.ndarray, np.ndarray]:
    """Per layer: whether it is sparse, and its index in its own stack (``moe.*`` or ``dense.*``)."""
    moe = {l: j for j, l in enumerate(cfg.moe_layers)}
    dense = {l: j for j, l in enumerate(cfg.dense_layers)}
    is_moe = np.array([l in moe for l in range(cfg.num_layers)])
    slot = np.array([moe[l] if l in moe else dense[l] for l in range(cfg.num_layers)], np.int32)
    return is_moe, slot


def feed_forward(params: Params, cfg: ModelConfig, lp: Params, layer: jax.Array, h: jax.Array) -> jax.Array:
    """The feed-forward of decoder layer ``layer`` (traced int32) on its normalised input h ``[B, T, d]``.

    Dense families: SwiGLU with the layer's ``lp`` slice. All layers sparse: :func:`moe_block` of stack slot
    ``layer``. Mixed: ``lax.cond`` between the MoE block and the dense MLP of the ``dense.*`` stack."""
    if not cfg.moe_layers:
        return dense_mlp(h, lp["w_gate"], lp["w_up"], lp["w_down"])
    if not cfg.dense_layers:
        return moe_block(params, cfg, layer, h)
    is_moe, slot = (jnp.asarray(t)[layer] for t in _slot_tables(cfg))

    def dense(h):
        w = [jax.lax.dynamic_index_in_dim(params[f"dense.{n}"], slot, keepdims=False)
             for n in ("w_gate", "w_up", "w_down")]
        return dense_mlp(h, *w)

    return jax.lax.cond(is_moe, lambda h: moe_block(params, cfg, slot, h), dense, h)
