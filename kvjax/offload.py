"""Moving selected KV rows between host memory (``pinned_host``) and the device inside the jitted decode step.

The offloaded stores of a policy are layer-stacked ``[L, B, Hkv, T, *row]`` arrays placed in pinned host memory by
the engine (:func:`kvjax.cache.state_shardings`). Inside ``jit`` such a leaf has a ``<host>`` aval, and any op that
mixes host and device operands is rejected ("memory_space of all inputs passed to <op> must be the same"), so every
move here is explicit (``jax.device_put(x, jax.memory.Space.X)``).

What XLA does with each path on TPU (``host_offloader.cc``, jax_notes §4): only a (dynamic-)slice of a host buffer that
feeds a move-to-device is a DMA, and a dynamic-update-slice into a host buffer is a host write; every other op on a
host buffer (gather, scatter, convert, arithmetic) becomes *host compute* on the TPU-VM CPU.

- ``"host_gather"`` — the selected-token gather runs as host compute (``compute_on("device_host")``, via
  :func:`kvjax.compat.on_host`), with the indices moved to host first and ``mode="promise_in_bounds"`` (indices are
  clipped on the device beforehand; the default ``"fill"`` mode adds device-space constants and fails, jax_notes V4).
  The gathered ``[B, Hkv, K, *row]`` block then crosses PCIe in one ``device_put``. Works at token granularity
  (YAKV ``chunk_size=1``); its cost is the host CPU gather plus one bulk copy. This is the default.
- ``"chunk_slices"`` — for chunked selection: a ``lax.map`` over the ``B·Hkv·K`` selected chunks of a
  ``dynamic_slice`` of the host store (``chunk`` consecutive tokens) followed by ``device_put``, i.e. one DMA per
  chunk with no host compute. Descriptor-bound for tiny chunks (256-byte rows); good for chunks of a few KB.
  The loop is sequential; under a mesh the partitioner sees scalar-indexed slices of a sharded buffer, which is
  correct but not shard-local (use ``shard_map`` around the policy for a production multi-chip run).
- ``"device"`` — the store already lives on the device (the paper's eval-path *simulation* of offloading, or a
  test): a plain ``take_along_axis`` gather.

On CPU the ``device_put`` memory transitions lower to no-ops (jax_notes §0.7); the TPU lowering
(``.lower(lowering_platforms=("tpu",))``) shows them as ``annotate_device_placement`` and ``_xla_compute_type``.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from .compat import on_host

BACKENDS = ("host_gather", "chunk_slices", "device")


def _to_device(x):
    return jax.device_put(x, jax.memory.Space.Device)


def _to_host(x):
    return jax.device_put(x, jax.memory.Space.Host)


def is_host(x) -> bool:
    """Whether an array / tracer lives in host memory by its aval (``float32<host>[...]``)."""
    try:
        return jax.typeof(x).memory_space == jax.memory.Space.Host
    except AttributeError:  # pragma: no cover - older avals
        return False


def place_on_host(x):
    """Inside jit: move ``x`` to host memory so its aval (and the output array) is ``<host>``.

    Use it on every host-resident leaf a jitted function returns: ``out_shardings`` with
    ``memory_kind="pinned_host"`` alone gives arrays whose sharding says pinned_host but whose aval says device,
    and a later jit then treats them as device operands (checked with JAX 0.10.2 on CPU).
    """
    return _to_host(x)


def _token_indices(idx: jax.Array, chunk: int) -> jax.Array:
    """Chunk starts ``[B, Hkv, K]`` -> token indices ``[B, Hkv, K*chunk]`` (start, start+1, ..., start+chunk-1)."""
    if chunk == 1:
        return idx
    B, H, K = idx.shape
    return (idx[..., None] + jnp.arange(chunk, dtype=idx.dtype)).reshape(B, H, K * chunk)


def fetch_rows(store: jax.Array, layer: jax.Array, idx: jax.Array, backend: str = "host_gather",
               chunk: int = 1) -> jax.Array:
    """Gather selected token rows of one layer of an offloaded store and bring them to the device.

    store ``[L, B, Hkv, T, *row]`` (pinned_host, or device for ``backend="device"``); layer: traced int32 scalar;
    idx int32 ``[B, Hkv, K]``: token indices in ``[0, T)`` (``chunk == 1``) or chunk start tokens in
    ``[0, T - chunk]`` (``chunk > 1``; each selects ``chunk`` consecutive tokens). Out-of-range indices are clipped.
    Returns device rows ``[B, Hkv, K*chunk, *row]`` in the store's dtype, in the order of ``idx``.

    XLA:CPU note (jax 0.10.2, measured): a gather from a bfloat16 or float8 operand converts the *whole* operand to
    float32 first (a 30-layer x 16k-token store: 135 ms (bf16) / 78 ms (fp8) per step vs 2 ms for float32 or
    uint8/uint16). Stores that are fetched on CPU should hold float32 or integer bit patterns (the FP8 store holds
    uint8, :func:`kvjax.quant.fp8_encode_bits`); the engine's CPU default dtype is float32.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} is not one of {BACKENDS}")
    if chunk < 1:
        raise ValueError(f"chunk={chunk} must be >= 1 tokens")
    L, B, H, T = store.shape[:4]
    row = store.shape[4:]
    if idx.shape[:2] != (B, H):
        raise ValueError(f"idx shape {idx.shape} must be [B={B}, Hkv={H}, K]")
    if chunk > T:
        raise ValueError(f"chunk={chunk} tokens exceeds the store length T={T} tokens")
    if backend == "host_gather" and not is_host(store):
        raise ValueError(
            f"fetch_rows(backend='host_gather') needs a store whose aval is in host memory, got "
            f"{jax.typeof(store)}. Arrays returned by jit with out_shardings memory_kind='pinned_host' keep a "
            "device aval (JAX 0.10): device_put them to jax.memory.Space.Host inside the producing jit "
            "(see place_on_host), or use backend='device' for a device-resident store")
    idx = jnp.clip(idx.astype(jnp.int32), 0, T - chunk)
    layer = jnp.asarray(layer, jnp.int32)

    if backend == "device":
        lay = jax.lax.dynamic_index_in_dim(store, layer, 0, keepdims=False)
        tok = _token_indices(idx, chunk)
        tok = tok.reshape(tok.shape + (1,) * len(row))
        return jnp.take_along_axis(lay, tok, axis=2, mode="promise_in_bounds")

    if backend == "host_gather":
        tok_h = _to_host(_token_indices(idx, chunk))
        layer_h = _to_host(layer)

        def gather(st, lay_i, ix):
            lay = jax.lax.dynamic_index_in_dim(st, lay_i, 0, keepdims=False)  # [B, H, T, *row]
            one = lambda s, i: s.at[i].get(mode="promise_in_bounds")  # noqa: E731  [T, *row], [K] -> [K, *row]
            return jax.vmap(jax.vmap(one))(lay, ix)

        rows = on_host(gather)(store, layer_h, tok_h)
        return _to_device(rows)

    # chunk_slices: one dynamic-slice -> device_put (a DMA on TPU) per selected chunk
    K = idx.shape[2]
    flat = idx.reshape(-1)
    z = jnp.zeros((), jnp.int32)

    def one_chunk(i):
        b, h = i // (H * K), (i // K) % H
        sl = jax.lax.dynamic_slice(store, (layer, b, h, flat[i], *([z] * len(row))), (1, 1, 1, chunk, *row))
        return _to_device(sl)[0, 0, 0]

    rows = jax.lax.map(one_chunk, jnp.arange(B * H * K, dtype=jnp.int32))  # [B*H*K, chunk, *row]
    return rows.reshape(B, H, K * chunk, *row)


def write_rows(store: jax.Array, layer: jax.Array, rows: jax.Array, pos: jax.Array, on_device: bool = False
               ) -> jax.Array:
    """Write one new token's rows per sequence into a layer-stacked store with dynamic-update-slices.

    store ``[L, B, Hkv, T, *row]``; rows ``[B, Hkv, *row]`` (device); pos int32 ``[B]``: the token slot of each
    sequence. For a host store (``on_device=False``) the rows are moved to host first and written with B
    dynamic-update-slices (the host-write pattern XLA supports; scatters into host memory crash, jax_notes §7).
    Returns the updated store (in place when the store is a donated/carried buffer).
    """
    B = store.shape[1]
    row = store.shape[4:]
    rows = rows.astype(store.dtype)[:, :, None]  # [B, H, 1, *row]
    if not on_device:
        rows = _to_host(rows)
    layer = jnp.asarray(layer, jnp.int32)
    z = jnp.zeros((), jnp.int32)
    for b in range(B):
        start = (layer, jnp.int32(b), z, jnp.asarray(pos[b], jnp.int32), *([z] * len(row)))
        store = jax.lax.dynamic_update_slice(store, rows[b][None, None], start)
    return store
