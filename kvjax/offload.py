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
  (YAKV ``chunk_size=1``); its cost is the host CPU gather plus one bulk copy. The policies' default today.
- ``"chunk_slices"`` — for chunked selection: a ``lax.map`` over the ``B·Hkv·K`` selected chunks of a
  ``dynamic_slice`` of the host store (``chunk`` consecutive tokens) followed by ``device_put``, i.e. one DMA per
  chunk with no host compute. Descriptor-bound for tiny chunks (256-byte rows); good for chunks of a few KB.
  The loop is sequential; under a mesh the partitioner sees scalar-indexed slices of a sharded buffer, which is
  correct but not shard-local (use ``shard_map`` around the policy for a production multi-chip run).
- ``"device"`` — the store already lives on the device (the paper's eval-path *simulation* of offloading, or a
  test): a plain ``take_along_axis`` gather.
- ``"dma"`` — the Pallas TPU kernel :func:`pallas_kernels.fetch_dma.fetch_rows_dma`: the selected run starts are
  scalar-prefetched and each run of ``chunk`` rows is DMA'd from the host store (``pl.HOST``; ``pl.ANY`` for a
  device store) straight into the output in HBM, several DMAs in flight; no host compute and no XLA gather. The
  kernel exists for TPU only: lowered for any other platform (``lax.platform_dependent``) ``"dma"`` is
  ``"host_gather"`` for a host store and ``"device"`` for a device store, so a config stays portable. Inside
  ``jit`` over an auto-sharded mesh the ``pallas_call`` is not partitioned (wrap the policy in ``shard_map`` for a
  multi-chip run, as for ``"chunk_slices"``).
- ``"auto"`` — the platform's default, resolved per lowering platform: ``"dma"`` on TPU, ``"host_gather"`` on GPU
  and CPU (see below); ``"device"`` for a device-resident store on every platform.

What XLA:GPU gets from each backend (the ``lower(lowering_platforms=("cuda",))`` text, checked on CPU; jax lowers
memory moves for GPU and TPU with the same rule, so the StableHLO is the TPU one):

- ``"host_gather"``: the indices and the layer go to ``pinned_host`` (``annotate_device_placement``), the layer
  slice and the gather are one ``call @compute_on`` with ``_xla_compute_type = "host"``, and the gathered
  ``[B, Hkv, K*chunk, *row]`` block gets one ``annotate_device_placement`` to ``device``. XLA:GPU runs the host
  offloading passes (openxla/xla#10185; jax's ``memories_test`` runs ``compute_on`` on GPU), so this is a CPU
  gather plus one bulk host-to-device copy per layer and step, the transfer ShadowKV makes with torch.
- ``"chunk_slices"``: a ``stablehlo.while`` over the ``B*Hkv*K`` selected chunks, each iteration a
  ``dynamic_slice`` of the host store fed to ``annotate_device_placement`` (``device``), i.e. one small
  host-to-device copy per chunk from inside a device loop. XLA:GPU's while loop returns to the host for its
  predicate every iteration, so the loop costs microseconds per chunk (tens of thousands of chunks per step for
  token-level selection): the slowest option on GPU except for a handful of large chunks.
- ``"device"``: an XLA gather in HBM, no transfer (not an offload).
- ``"dma"``: no GPU kernel; lowers as ``"host_gather"``.

The GPU default is therefore ``"host_gather"`` (``"auto"``). A Triton kernel can be handed a ``pinned_host``
operand (it lowers), which would allow a zero-copy gather over PCIe (ShadowKV's ``gather_copy.cu``), but what
XLA:GPU does with a custom call on a host-memory operand is unverified; not used.

XLA:CPU: ``device_put`` memory transitions lower to no-ops (jax_notes §0.7), so on CPU every backend is a gather in
the same memory; ``"dma"`` and ``"auto"`` run ``"host_gather"``. The DMA kernel itself runs on CPU only in Pallas
interpret mode with a *device* store (``pl.ANY``): ``pl.HOST`` operands cannot be interpreted (jax_notes §1.2), so
its host path is only lowered for TPU here. The TPU lowering (``.lower(lowering_platforms=("tpu",))``) shows the
moves as ``annotate_device_placement`` and ``_xla_compute_type``, and the DMA kernel as a ``tpu_custom_call``
whose store argument keeps ``mhlo.memory_kind = "pinned_host"``.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from .compat import on_host

BACKENDS = ("host_gather", "chunk_slices", "device", "dma", "auto")


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


def _device_gather(store, layer, idx, chunk: int):
    row = store.shape[4:]
    lay = jax.lax.dynamic_index_in_dim(store, layer, 0, keepdims=False)
    tok = _token_indices(idx, chunk)
    tok = tok.reshape(tok.shape + (1,) * len(row))
    return jnp.take_along_axis(lay, tok, axis=2, mode="promise_in_bounds")


def _host_gather(store, layer, idx, chunk: int):
    tok_h = _to_host(_token_indices(idx, chunk))
    layer_h = _to_host(layer)

    def gather(st, lay_i, ix):
        lay = jax.lax.dynamic_index_in_dim(st, lay_i, 0, keepdims=False)  # [B, H, T, *row]
        one = lambda s, i: s.at[i].get(mode="promise_in_bounds")  # noqa: E731  [T, *row], [K] -> [K, *row]
        return jax.vmap(jax.vmap(one))(lay, ix)

    return _to_device(on_host(gather)(store, layer_h, tok_h))


def _chunk_slices(store, layer, idx, chunk: int):
    """One dynamic-slice -> device_put (a DMA on TPU) per selected chunk."""
    B, H = store.shape[1:3]
    row = store.shape[4:]
    K = idx.shape[2]
    flat = idx.reshape(-1)
    z = jnp.zeros((), jnp.int32)

    def one_chunk(i):
        b, h = i // (H * K), (i // K) % H
        sl = jax.lax.dynamic_slice(store, (layer, b, h, flat[i], *([z] * len(row))), (1, 1, 1, chunk, *row))
        return _to_device(sl)[0, 0, 0]

    rows = jax.lax.map(one_chunk, jnp.arange(B * H * K, dtype=jnp.int32))  # [B*H*K, chunk, *row]
    return rows.reshape(B, H, K * chunk, *row)


def _dma(store, layer, idx, chunk: int, tpu_only_dma: bool):
    """The DMA kernel on TPU; elsewhere host_gather (host store) / the device gather (device store). With
    ``tpu_only_dma`` a device store takes the device gather on TPU too ("auto")."""
    from pallas_kernels.fetch_dma import fetch_rows_dma

    host = is_host(store)
    other = _host_gather if host else _device_gather
    if tpu_only_dma and not host:
        return other(store, layer, idx, chunk)
    return jax.lax.platform_dependent(
        store, layer, idx,
        tpu=lambda s, l, i: fetch_rows_dma(s, l, i, host=host, chunk=chunk),
        default=lambda s, l, i: other(s, l, i, chunk))


def fetch_rows(store: jax.Array, layer: jax.Array, idx: jax.Array, backend: str = "host_gather",
               chunk: int = 1) -> jax.Array:
    """Gather selected token rows of one layer of an offloaded store and bring them to the device.

    store ``[L, B, Hkv, T, *row]`` (pinned_host, or device for ``backend="device"``); layer: traced int32 scalar;
    idx int32 ``[B, Hkv, K]``: token indices in ``[0, T)`` (``chunk == 1``) or chunk start tokens in
    ``[0, T - chunk]`` (``chunk > 1``; each selects ``chunk`` consecutive tokens). Out-of-range indices are clipped.
    ``backend``: one of :data:`BACKENDS` (module docstring). Returns device rows ``[B, Hkv, K*chunk, *row]`` in the
    store's dtype, in the order of ``idx``.

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
        return _device_gather(store, layer, idx, chunk)
    if backend == "host_gather":
        return _host_gather(store, layer, idx, chunk)
    if backend == "chunk_slices":
        return _chunk_slices(store, layer, idx, chunk)
    return _dma(store, layer, idx, chunk, tpu_only_dma=backend == "auto")


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
