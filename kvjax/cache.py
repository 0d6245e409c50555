"""Cache pytrees, their memory placement (device / pinned_host) and sharding, and the memory report.

Every policy state is a registered dataclass whose array leaves are **layer-stacked** ``[L, B, ...]``;
leaves with a KV-head axis are laid out ``[L, B, Hkv, ...]``. On a ``("data", "model")`` mesh the batch
axis is split over ``data`` and the KV-head axis over ``model``. Leaves named in a policy's
``host_fields`` live in host memory (``memory_kind="pinned_host"``); everything else on the device.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Iterable

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from jax.sharding import NamedSharding, PartitionSpec as P, SingleDeviceSharding

from .compat import DEVICE_MEMORY_KIND, HOST_MEMORY_KIND


#: logical axis names of state leaves and the mesh axis each is split over (None: replicated)
MESH_AXES = {"layers": None, "batch": "data", "kv_heads": "model", "heads": "model"}

#: the usual layout of a per-KV-head leaf ``[L, B, Hkv, T, ...]`` (trailing axes replicated)
KV_AXES = ("layers", "batch", "kv_heads")
#: a per-sequence leaf ``[L, B, ...]``
SEQ_AXES = ("layers", "batch")


def leaf(*axes, by_rank: dict[int, tuple] | None = None, default=dataclasses.MISSING):
    """A state dataclass field whose leaves have the logical leading ``axes`` (names of :data:`MESH_AXES`; the
    remaining axes are replicated). ``by_rank`` gives other layouts of the same field told apart by the leaf's rank
    (e.g. YAKV's landmark codes are ``[L, B, Hkv, N, D/d]`` per head or ``[L, B, N, C/d]`` per token).
    The shardings of every state are derived from these declarations (:func:`state_shardings`)."""
    return struct.field(pytree_node=True, default=default,
                        metadata={"axes": tuple(axes), "by_rank": dict(by_rank or {})})


@struct.dataclass
class KVCache:
    """Dense per-layer K/V (post-RoPE), layer-stacked: k, v ``[L, B, Hkv, S, D]`` in the model dtype.

    The whole state of the ``full`` policy (with ``S = Tb + max_new``) and of the prefill's dense capture
    (:class:`kvjax.prefill.DenseCapture`; ``q``: post-RoPE prompt queries ``[L, B, H, Tb, D]``, when kept).
    """

    k: jax.Array = leaf(*KV_AXES)
    v: jax.Array | None = leaf(*KV_AXES, default=None)
    q: jax.Array | None = leaf("layers", "batch", "heads", default=None)


def field_axes(state: Any, name: str, ndim: int) -> tuple:
    """The declared logical leading axes of field ``name`` of a state dataclass, for a leaf of rank ``ndim``."""
    fld = next(f for f in dataclasses.fields(state) if f.name == name)
    if "axes" not in fld.metadata:
        raise TypeError(f"{type(state).__name__}.{name} declares no axes: define it with kvjax.cache.leaf(...)")
    return fld.metadata["by_rank"].get(ndim, fld.metadata["axes"])


def leaf_spec(axes: tuple, ndim: int) -> P:
    """PartitionSpec of a leaf of rank ``ndim`` with leading logical ``axes`` (trailing axes replicated)."""
    spec = [MESH_AXES[a] if a is not None else None for a in axes[:ndim]]
    return P(*(spec + [None] * (ndim - len(spec))))


def state_shardings(state: Any, mesh, mcfg=None, policy=None, host_kind: str = HOST_MEMORY_KIND) -> Any:
    """Sharding pytree for a policy state dataclass (same structure) from its fields' declared axes
    (:func:`leaf`), with the policy's ``host_fields`` in ``host_kind`` memory and the rest on the device.

    ``mesh=None`` places everything on the first device. Leaves are arrays or ShapeDtypeStructs.
    """
    host_fields = set(policy.host_fields) if policy is not None else set()
    out = {}
    for f in dataclasses.fields(state):
        val = getattr(state, f.name)
        kind = host_kind if f.name in host_fields else DEVICE_MEMORY_KIND

        def one(x, kind=kind, name=f.name):
            if mesh is None:
                return SingleDeviceSharding(jax.devices()[0], memory_kind=kind)
            return NamedSharding(mesh, leaf_spec(field_axes(state, name, x.ndim), x.ndim), memory_kind=kind)

        out[f.name] = jax.tree.map(one, val)
    return state.replace(**out)


def check_divisible(mesh, batch: int, num_kv_heads: int) -> None:
    """Clear error when the batch or the KV heads do not split evenly over the mesh."""
    if mesh is None:
        return
    d, m = mesh.shape["data"], mesh.shape["model"]
    if batch % d:
        raise ValueError(f"batch size {batch} is not divisible by the mesh's data axis ({d} devices)")
    if num_kv_heads % m:
        raise ValueError(f"num_kv_heads={num_kv_heads} is not divisible by the mesh's model axis ({m} devices)")


def _kind(x) -> str:
    try:
        return x.sharding.memory_kind or DEVICE_MEMORY_KIND
    except AttributeError:
        return DEVICE_MEMORY_KIND


def memory_report(state: Any, prompt_tokens: int | np.ndarray, batch: int | None = None,
                  fixed_fields: Iterable[str] = (), extra: dict | None = None) -> dict:
    """Bytes of a policy state per memory kind and per component, per sequence and per prompt token.

    ``prompt_tokens``: total prompt tokens of the batch (or the per-sequence lengths). ``fixed_fields``
    are buffers whose size does not grow with the prompt (generated-token slots, scratch); they are
    reported but excluded from ``*_per_prompt_token_variable``.
    Returns ``{"components": {name: {"kind", "bytes"}}, "by_kind": {kind: bytes}, "per_sequence": {...},
    "per_prompt_token": {...}, "per_prompt_token_variable": {...}}``.
    """
    fixed = set(fixed_fields)
    comps, by_kind, var_by_kind = {}, {}, {}
    for f in dataclasses.fields(state):
        leaves = jax.tree.leaves(getattr(state, f.name))
        if not leaves:
            continue
        nbytes = int(sum(int(np.prod(x.shape)) * jnp.dtype(x.dtype).itemsize for x in leaves))
        kind = _kind(leaves[0])
        comps[f.name] = {"kind": kind, "bytes": nbytes, "fixed": f.name in fixed}
        by_kind[kind] = by_kind.get(kind, 0) + nbytes
        if f.name not in fixed:
            var_by_kind[kind] = var_by_kind.get(kind, 0) + nbytes
    for name, (kind, nbytes) in (extra or {}).items():
        comps[name] = {"kind": kind, "bytes": int(nbytes), "fixed": True, "transient": True}
        by_kind[kind] = by_kind.get(kind, 0) + int(nbytes)
    lengths = np.atleast_1d(np.asarray(prompt_tokens))
    total_tokens = int(lengths.sum())
    nseq = batch if batch is not None else len(lengths)
    return {
        "components": comps,
        "by_kind": by_kind,
        "per_sequence": {k: v / max(nseq, 1) for k, v in by_kind.items()},
        "per_prompt_token": {k: v / max(total_tokens, 1) for k, v in by_kind.items()},
        "per_prompt_token_variable": {k: v / max(total_tokens, 1) for k, v in var_by_kind.items()},
    }


def write_token(buf: jax.Array, layer: jax.Array, rows: jax.Array, pos: jax.Array) -> jax.Array:
    """Write the new token's rows into a layer-stacked device buffer, in place inside the decode scan.

    buf ``[L, B, Hkv, S, D]``, rows ``[B, Hkv, D]`` go to ``buf[layer, b, :, pos[b]]``. A scatter of B rows:
    use only on device buffers (scatters into host memory crash XLA, jax_notes §7; host stores are
    written with a dynamic-update-slice instead).
    """
    B = rows.shape[0]
    return buf.at[layer, jnp.arange(B), :, pos].set(rows.astype(buf.dtype), mode="promise_in_bounds")
