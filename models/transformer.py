"""The decoder shared by the Llama, Qwen3 and Qwen3-MoE families, as a Flax NNX module plus pure functions.

Weights are **layer-stacked** (every per-layer parameter has a leading ``[L]`` axis) so that a forward
pass is one ``lax.scan`` over layers: one layer is compiled, and the KV-cache policies receive one
layer's state per scan step. Mixture-of-experts weights are stacked over the sparse layers only and the
feed-forward picks its block per layer inside the same scan (:mod:`models.moe`). The NNX module owns the
parameters (init, checkpointing); the hot path runs pure functions over ``params = model.params()`` (a
plain dict of arrays), as DESIGN.md asks: split once, jit pure functions, pass the cache functionally.

Attention is delegated to a callback ``attend(state_l, q, k_pre, k, v) -> (out, state_l)`` so the
model does not know which KV-cache policy runs (``q``/``k`` are post-RoPE, ``k_pre`` is the key after
Qwen3's k-norm and before RoPE).
"""
from __future__ import annotations

import functools
import weakref
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from .config import ModelConfig, rope_inv_freq
from .moe import feed_forward, linear as _mm

Params = dict[str, Any]

# Parameter names and shapes (HF [out, in] weights are stored transposed, as [in, out]).
LAYER_PARAMS = ("attn_norm", "wq", "wk", "wv", "wo", "mlp_norm", "w_gate", "w_up", "w_down", "q_norm", "k_norm")
# Stacks that are not over every layer: the sparse layers' experts and router, and a mixed model's dense MLPs.
MOE_PARAMS = ("moe.router", "moe.w_gate", "moe.w_up", "moe.w_down")
DENSE_STACK_PARAMS = ("dense.w_gate", "dense.w_up", "dense.w_down")


def param_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Shapes of every parameter. ``layers.<name>`` have a leading ``[L]``; with mixture-of-experts layers the
    MLP weights move to ``moe.*`` (leading ``[Lm]``, the sparse layers; experts ``[Lm, E, ...]``) and, if some
    layers are dense, ``dense.*`` (leading ``[Ld]``), in layer order (:func:`stack_layers`)."""
    L, d, f, hd = cfg.num_layers, cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    shapes = {
        "embed": (cfg.vocab_size, d),
        "final_norm": (d,),
        "layers.attn_norm": (L, d),
        "layers.wq": (L, d, cfg.num_heads * hd),
        "layers.wk": (L, d, cfg.num_kv_heads * hd),
        "layers.wv": (L, d, cfg.num_kv_heads * hd),
        "layers.wo": (L, cfg.num_heads * hd, d),
        "layers.mlp_norm": (L, d),
    }
    moe, dense = cfg.moe_layers, cfg.dense_layers
    if not moe:
        shapes.update({"layers.w_gate": (L, d, f), "layers.w_up": (L, d, f), "layers.w_down": (L, f, d)})
    else:
        Lm, E, fe = len(moe), cfg.num_experts, cfg.moe_intermediate_size
        shapes.update({"moe.router": (Lm, d, E), "moe.w_gate": (Lm, E, d, fe), "moe.w_up": (Lm, E, d, fe),
                       "moe.w_down": (Lm, E, fe, d)})
        if dense:
            Ld = len(dense)
            shapes.update({"dense.w_gate": (Ld, d, f), "dense.w_up": (Ld, d, f), "dense.w_down": (Ld, f, d)})
    if cfg.qk_norm:
        shapes["layers.q_norm"] = (L, hd)
        shapes["layers.k_norm"] = (L, hd)
    if not cfg.tie_word_embeddings:
        shapes["lm_head"] = (d, cfg.vocab_size)
    return shapes


def stack_layers(cfg: ModelConfig, name: str) -> tuple[int, ...]:
    """Decoder layer of each entry of a stacked parameter's leading axis (``()`` for an unstacked one)."""
    if name.startswith("layers."):
        return tuple(range(cfg.num_layers))
    if name.startswith("moe."):
        return cfg.moe_layers
    if name.startswith("dense."):
        return cfg.dense_layers
    return ()


def param_partition_specs(cfg: ModelConfig) -> dict[str, tuple]:
    """PartitionSpec tuples on a ``("data", "model")`` mesh: heads / MLP width split over ``model``, and the expert
    axis of the expert weights (expert parallelism; the router is replicated)."""
    specs = {
        "embed": (None, None),
        "final_norm": (None,),
        "layers.attn_norm": (None, None),
        "layers.wq": (None, None, "model"),
        "layers.wk": (None, None, "model"),
        "layers.wv": (None, None, "model"),
        "layers.wo": (None, "model", None),
        "layers.mlp_norm": (None, None),
        "layers.w_gate": (None, None, "model"),
        "layers.w_up": (None, None, "model"),
        "layers.w_down": (None, "model", None),
        "layers.q_norm": (None, None),
        "layers.k_norm": (None, None),
        "moe.router": (None, None, None),
        "moe.w_gate": (None, "model", None, None),
        "moe.w_up": (None, "model", None, None),
        "moe.w_down": (None, "model", None, None),
        "dense.w_gate": (None, None, "model"),
        "dense.w_up": (None, None, "model"),
        "dense.w_down": (None, "model", None),
        "lm_head": (None, None),
    }
    return {k: specs[k] for k in param_shapes(cfg)}


def check_mesh(cfg: ModelConfig, mesh) -> None:
    """Clear error when a parameter axis split over the mesh's ``"model"`` axis does not divide evenly."""
    if mesh is None:
        return
    m = mesh.shape["model"]
    if cfg.moe_layers and cfg.num_experts % m:
        raise ValueError(f"num_experts={cfg.num_experts} is not divisible by the mesh's model axis ({m} devices): "
                         f"expert parallelism gives every device the same number of experts")
    shapes = param_shapes(cfg)
    for name, spec in param_partition_specs(cfg).items():
        for axis, s in enumerate(spec):
            if s == "model" and shapes[name][axis] % m:
                raise ValueError(f"parameter {name} {shapes[name]}: axis {axis} ({shapes[name][axis]}) is not "
                                 f"divisible by the mesh's model axis ({m} devices)")


class Transformer(nnx.Module):
    """Llama 3 / Qwen3 / Qwen3-MoE decoder with layer-stacked parameters (``nnx.Param`` leaves).

    ``model.params()`` returns the flat ``{name: array}`` dict the pure functions use.
    """

    def __init__(self, cfg: ModelConfig, *, dtype=jnp.bfloat16, rngs: nnx.Rngs | None = None,
                 params: Params | None = None):
        """Random init (``rngs``; norms at 1, N(0, fan_in^-1/2) weights) unless ``params`` are given."""
        self.cfg = cfg
        self.dtype = jnp.dtype(dtype)
        if params is not None:
            self.weights = nnx.Dict({})
            self.set_params(params)
            return
        rngs = rngs or nnx.Rngs(0)
        vals = {}
        for name, shape in param_shapes(cfg).items():
            if name.endswith("norm"):
                vals[name] = jnp.ones(shape, self.dtype)
            else:
                fan_in = shape[-2] if len(shape) >= 2 else 1
                std = 0.02 if name in ("embed", "lm_head") else fan_in ** -0.5
                vals[name] = (std * jax.random.normal(rngs.params(), shape, jnp.float32)).astype(self.dtype)
        self.weights = nnx.Dict({k.replace(".", "__"): nnx.Param(v) for k, v in vals.items()})

    def params(self) -> Params:
        """Flat dict ``{name: jax.Array}`` of all parameters (the input of the pure functions)."""
        return {k.replace("__", "."): v[...] for k, v in self.weights.items()}

    def set_params(self, params: Params) -> None:
        shapes = param_shapes(self.cfg)
        missing = set(shapes) - set(params) - {k.replace("__", ".") for k in self.weights.keys()}
        if missing:
            raise KeyError(f"parameters missing: {sorted(missing)}")
        for name, value in params.items():
            if name not in shapes:
                raise KeyError(f"unknown parameter {name!r}")
            if tuple(value.shape) != shapes[name]:
                raise ValueError(f"parameter {name}: shape {tuple(value.shape)} != expected {shapes[name]}")
            self.weights[name.replace(".", "__")] = nnx.Param(value)

    def __call__(self, tokens: jax.Array) -> jax.Array:
        """Full causal forward: int32 ``[B, T]`` -> float32 logits ``[B, T, V]``."""
        return forward_logits_pure(self.params(), self.cfg, tokens)


# ----------------------------------------------------------------------------- building blocks
def rms_norm(x: jax.Array, w: jax.Array, eps: float) -> jax.Array:
    """RMSNorm in float32, result in x's dtype: ``x / sqrt(mean(x^2) + eps) * w``."""
    xf = x.astype(jnp.float32)
    y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return (y * w.astype(jnp.float32)).astype(x.dtype)


def rope_tables(cfg: ModelConfig, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
    """cos, sin float32 ``[..., head_dim]`` at integer positions (rotate-half layout, frequencies duplicated)."""
    inv = jnp.asarray(rope_inv_freq(cfg), jnp.float32)
    ang = positions.astype(jnp.float32)[..., None] * inv
    ang = jnp.concatenate([ang, ang], axis=-1)
    return jnp.cos(ang), jnp.sin(ang)


def _rotate(xf: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """``x·cos + rot(x)·sin`` in float32 with ``rot(x) = [-x2, x1]`` (rotate-half); cos/sin broadcast to x."""
    h = xf.shape[-1] // 2
    rot = jnp.concatenate([-xf[..., h:], xf[..., :h]], axis=-1)
    return xf * cos + rot * sin


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """RoPE, rotate-half (GPT-NeoX) convention. x ``[..., heads, D]``; cos/sin ``[..., D]`` broadcast over heads."""
    return _rotate(x.astype(jnp.float32), cos[..., None, :], sin[..., None, :]).astype(x.dtype)


def rope(cfg: ModelConfig, x: jax.Array, positions: jax.Array, *, inverse: bool = False, dtype=None) -> jax.Array:
    """RoPE of rows ``x [..., D]`` at integer ``positions`` (broadcastable to ``x.shape[:-1]``), float32 tables and
    arithmetic, result in ``dtype`` (default x's). ``inverse`` rotates by ``-p`` (post-RoPE -> pre-RoPE). The one
    rotation every policy uses to re-apply or undo RoPE on cached keys (same numbers as :func:`apply_rope`)."""
    cos, sin = rope_tables(cfg, positions)
    out = _rotate(x.astype(jnp.float32), cos, -sin if inverse else sin)
    return out.astype(dtype or x.dtype)


def layer_qkv(lp: Params, cfg: ModelConfig, x: jax.Array, cos: jax.Array, sin: jax.Array, h: jax.Array | None = None):
    """Pre-attention part of one layer. x ``[B, T, d]`` -> q (post-RoPE) ``[B,T,H,D]``, k_pre, k, v ``[B,T,Hkv,D]``.

    ``h`` (optional) is the already-normalised input ``rms_norm(x, attn_norm)``."""
    B, T, _ = x.shape
    if h is None:
        h = rms_norm(x, lp["attn_norm"], cfg.rms_norm_eps)
    q = _mm(h, lp["wq"]).reshape(B, T, cfg.num_heads, cfg.head_dim)
    k = _mm(h, lp["wk"]).reshape(B, T, cfg.num_kv_heads, cfg.head_dim)
    v = _mm(h, lp["wv"]).reshape(B, T, cfg.num_kv_heads, cfg.head_dim)
    if cfg.qk_norm:
        q = rms_norm(q, lp["q_norm"], cfg.rms_norm_eps)
        k = rms_norm(k, lp["k_norm"], cfg.rms_norm_eps)
    return apply_rope(q, cos, sin), k, apply_rope(k, cos, sin), v


def layer_finish(lp: Params, cfg: ModelConfig, x: jax.Array, attn: jax.Array, *, layer: jax.Array,
                 params: Params) -> jax.Array:
    """Output projection, residual, feed-forward (SwiGLU MLP or the MoE block), residual.
    attn ``[B, T, H, D]`` -> x ``[B, T, d]``, for any token count T (prefill chunks, T = 1 in decode).

    ``lp`` is this layer's slice of every ``layers.*`` parameter; ``layer`` (traced int32) and ``params`` (the whole
    parameter dict) let the feed-forward index the stacks that are not over every layer (``moe.*``, ``dense.*``)."""
    B, T = attn.shape[:2]
    x = x + _mm(attn.reshape(B, T, -1).astype(x.dtype), lp["wo"])
    h = rms_norm(x, lp["mlp_norm"], cfg.rms_norm_eps)
    return x + feed_forward(params, cfg, lp, layer, h)


AttendFn = Callable[[Any, jax.Array, jax.Array, jax.Array, jax.Array], tuple[jax.Array, Any]]


def run_layers(params: Params, cfg: ModelConfig, x: jax.Array, positions: jax.Array, state: Any,
               attend: AttendFn) -> tuple[jax.Array, Any]:
    """All decoder layers as one ``lax.scan``; ``state`` is layer-stacked (leading ``[L]`` on every leaf).

    x ``[B, T, d]``, positions int32 ``[B, T]``. Returns the final hidden states (before the final norm)
    and the updated layer-stacked state.
    """
    cos, sin = rope_tables(cfg, positions)
    layer_params = {k[len("layers."):]: v for k, v in params.items() if k.startswith("layers.")}

    def body(h, xs):
        lp, layer, st = xs
        q, k_pre, k, v = layer_qkv(lp, cfg, h, cos, sin)
        out, st = attend(st, q, k_pre, k, v)
        return layer_finish(lp, cfg, h, out, layer=layer, params=params), st

    return jax.lax.scan(body, x, (layer_params, jnp.arange(cfg.num_layers), state))


CarryAttendFn = Callable[..., tuple[jax.Array, Any]]


def run_layers_carry(params: Params, cfg: ModelConfig, x: jax.Array, positions: jax.Array, state: Any,
                     attend: CarryAttendFn) -> tuple[jax.Array, Any]:
    """Like :func:`run_layers`, but the whole layer-stacked ``state`` is carried through the scan and
    ``attend(state, layer, q, k_pre, k, v, h) -> (out, state)`` reads/writes layer ``layer`` of it in place
    (``h`` is the layer's normalised input ``[B, T, d]``, used by InfiniGen-style speculation).

    This is the decode path: a policy writes only the new token's rows (a small dynamic-update-slice of
    the carried buffer, done in place by XLA) instead of re-emitting every layer's whole cache as scan
    outputs, and read-only leaves (the host store) pass through without a copy.
    """
    cos, sin = rope_tables(cfg, positions)

    def qkv(lp, h):
        hn = rms_norm(h, lp["attn_norm"], cfg.rms_norm_eps)
        return (hn, *layer_qkv(lp, cfg, h, cos, sin, hn))

    per_layer = params.get(PER_LAYER)
    if per_layer is not None:  # one switch branch per layer reads that layer's own buffers (see per_layer_params)
        qkv_branches = [functools.partial(qkv, lp) for lp in per_layer]
        finish_branches = [functools.partial(lambda lp, l, h, out: layer_finish(lp, cfg, h, out, layer=l,
                                                                                params=params), lp, l)
                           for l, lp in enumerate(per_layer)]

        def body(carry, layer):
            h, st = carry
            hn, q, k_pre, k, v = jax.lax.switch(layer, qkv_branches, h)
            out, st = attend(st, layer, q, k_pre, k, v, hn)
            return (jax.lax.switch(layer, finish_branches, h, out), st), None

        (x, state), _ = jax.lax.scan(body, (x, state), jnp.arange(cfg.num_layers))
        return x, state

    layer_params = {k[len("layers."):]: v for k, v in params.items() if k.startswith("layers.")}

    def body(carry, xs):
        h, st = carry
        lp, layer = xs
        hn, q, k_pre, k, v = qkv(lp, h)
        out, st = attend(st, layer, q, k_pre, k, v, hn)
        return (layer_finish(lp, cfg, h, out, layer=layer, params=params), st), None

    (x, state), _ = jax.lax.scan(body, (x, state), (layer_params, jnp.arange(cfg.num_layers)))
    return x, state


#: key of ``params`` holding the per-layer weight buffers (:func:`per_layer_params`) that the decode path reads
PER_LAYER = "per_layer"
_PER_LAYER_CACHE: dict[int, tuple[Any, list]] = {}


def per_layer_params(params: Params, cfg: ModelConfig) -> Params:
    """``params`` with its stacked ``layers.*`` replaced by ``params[PER_LAYER]``: a list of ``L`` dicts
    ``{name: [..]}`` holding each layer's slice of every ``layers.*`` weight as its own buffer (made once per set of
    weights and shared by every caller), for the decode path (:func:`run_layers_carry`).

    Why: on the CPU backend a ``lax.scan`` over layer-stacked weights copies each layer's slice before every
    matmul (XLA's CPU dot reads whole buffers), so a decode step, which reads every weight once, moves the
    weights several times. With separate buffers, :func:`run_layers_carry` picks the layer's branch with
    ``lax.switch`` inside the same scan (the policy's attention is still compiled once) and the matmuls read the
    weights in place. The cost is a second copy of the layer weights in host memory. Models with
    mixture-of-experts layers keep the stacked path (their expert stacks are indexed per layer anyway)."""
    if cfg.moe_layers:
        return params
    anchor = params["layers.wq"]
    hit = _PER_LAYER_CACHE.get(id(anchor))
    if hit is None or hit[0]() is not anchor:
        names = [k for k in params if k.startswith("layers.")]
        lists = [{k[len("layers."):]: params[k][l] for k in names} for l in range(cfg.num_layers)]
        _PER_LAYER_CACHE[id(anchor)] = hit = (weakref.ref(anchor), lists)
        weakref.finalize(anchor, _PER_LAYER_CACHE.pop, id(anchor), None)
    # the stacked ``layers.*`` are left out: the decode path reads only the per-layer buffers
    return {**{k: v for k, v in params.items() if not k.startswith("layers.")}, PER_LAYER: hit[1]}


def embed_tokens(params: Params, tokens: jax.Array) -> jax.Array:
    """Token embedding lookup: int32 ``[B, T]`` -> ``[B, T, d]`` in the parameter dtype."""
    return jnp.take(params["embed"], tokens, axis=0)


def logits_from_hidden(params: Params, cfg: ModelConfig, x: jax.Array) -> jax.Array:
    """Final RMSNorm and LM head (tied to the embedding when configured): ``[..., d]`` -> float32 ``[..., V]``."""
    h = rms_norm(x, params["final_norm"], cfg.rms_norm_eps)
    if cfg.tie_word_embeddings:
        return jnp.einsum("...d,vd->...v", h, params["embed"], preferred_element_type=jnp.float32)
    return jnp.einsum("...d,dv->...v", h, params["lm_head"], preferred_element_type=jnp.float32)


def causal_attention(q: jax.Array, k: jax.Array, v: jax.Array, q_pos: jax.Array, k_pos: jax.Array,
                     k_valid: jax.Array | None = None) -> jax.Array:
    """Exact GQA attention, softmax in float32, scale 1/sqrt(D).

    q ``[B, Tq, H, D]``, k/v ``[B, Tk, Hkv, D]``, q_pos ``[B, Tq]``, k_pos ``[B, Tk]``; key j is visible to
    query i when ``k_pos[j] <= q_pos[i]`` (and ``k_valid[b, j]`` if given). Returns ``[B, Tq, H, D]``.
    """
    B, Tq, H, D = q.shape
    Hkv = k.shape[2]
    qg = q.reshape(B, Tq, Hkv, H // Hkv, D)
    s = jnp.einsum("bqhgd,bkhd->bhgqk", qg, k, preferred_element_type=jnp.float32) * (1.0 / float(np.sqrt(D)))
    mask = k_pos[:, None, :] <= q_pos[:, :, None]
    if k_valid is not None:
        mask = mask & k_valid[:, None, :]
    s = jnp.where(mask[:, None, None], s, -jnp.inf)
    p = jax.nn.softmax(s, axis=-1)
    o = jnp.einsum("bhgqk,bkhd->bqhgd", p.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return o.reshape(B, Tq, H, D).astype(q.dtype)


def forward_logits_pure(params: Params, cfg: ModelConfig, tokens: jax.Array) -> jax.Array:
    """Full causal forward without a cache: int32 ``[B, T]`` -> float32 logits ``[B, T, V]``."""
    B, T = tokens.shape
    pos = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))

    def attend(st, q, k_pre, k, v):
        return causal_attention(q, k, v, pos, pos), st

    x, _ = run_layers(params, cfg, embed_tokens(params, tokens), pos, jnp.zeros((cfg.num_layers,)), attend)
    return logits_from_hidden(params, cfg, x)
