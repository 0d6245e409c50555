"""Selected KV rows DMA'd from a host-resident store into device memory: a Pallas TPU kernel.

The fetch of :func:`kvjax.offload.fetch_rows` as explicit DMAs instead of an XLA gather. On TPU, XLA runs a gather
from a ``pinned_host`` buffer as *host compute* (a CPU gather on the TPU VM, then one bulk copy); this kernel
instead copies each selected run of rows straight from host memory into the output in HBM with the TPU's DMA
engines, and the host CPU does nothing.

Shapes: ``store [L, B, Hkv, T, *row]`` (any trailing row dims, any dtype), ``layer`` an int32 scalar, ``idx``
int32 ``[B, Hkv, K]`` — the first token of each selected run of ``chunk`` consecutive tokens (clipped to
``[0, T - chunk]``). Output ``[B, Hkv, K * chunk, *row]`` in HBM, rows in the order of ``idx`` (equal to
``fetch_rows(..., backend="host_gather")``).

Kernel: ``idx`` (flattened) and ``layer`` are scalar-prefetched into SMEM; the store stays where it is
(``memory_space=pl.HOST`` for a host store, ``pl.ANY`` for a device one) and so does the output
(``pl.ANY``: HBM; nothing is staged through VMEM). Grid ``(B, Hkv)``, both parallel (megacore); a program issues
its ``K`` copies ``store[layer, b, h, idx : idx + chunk] -> out[b, h, k*chunk : (k+1)*chunk]`` and keeps up to
``depth`` of them in flight on a ring of DMA semaphores: copy ``k + depth`` starts as soon as copy ``k`` has
landed (``depth = 2`` is plain double buffering; more hides the PCIe latency of small rows).

Interpret mode: Pallas cannot interpret ``pl.HOST`` operands (jax_notes §1.2 P5), so ``interpret=True`` needs a
device store (``host=False``, ``pl.ANY``); the DMA/semaphore logic then runs on CPU. A host store is only
*lowered* here (``lower(lowering_platforms=("tpu",))`` emits a ``tpu_custom_call`` whose store operand keeps its
``pinned_host`` placement); executing it needs a TPU.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

__all__ = ["fetch_rows_dma"]


def _dma_kernel(idx_ref, layer_ref, store_ref, out_ref, sems, *, K: int, chunk: int, depth: int):
    b = pl.program_id(0)
    h = pl.program_id(1)
    base = (b * pl.num_programs(1) + h) * K
    layer = layer_ref[0]

    def copy(k):
        src = store_ref.at[layer, b, h, pl.ds(idx_ref[base + k], chunk)]
        dst = out_ref.at[b, h, pl.ds(k * chunk, chunk)]
        return pltpu.make_async_copy(src, dst, sems.at[k % depth])

    for k in range(min(depth, K)):
        copy(k).start()

    def step(k, carry):
        copy(k).wait()

        @pl.when(k + depth < K)
        def _():
            copy(k + depth).start()
        return carry

    lax.fori_loop(0, K, step, 0)


def fetch_rows_dma(store, layer, idx, *, host: bool, chunk: int = 1, depth: int = 8, interpret: bool = False):
    """Rows ``store[layer, b, h, idx[b, h, k] + j]`` (``j < chunk``) DMA'd into a device array
    ``[B, Hkv, K * chunk, *row]``; see the module docstring.

    Args:
      store: ``[L, B, Hkv, T, *row]``; in host memory when ``host`` (its aval says ``<host>``), else on the device.
      layer: int32 scalar (traced).
      idx: int ``[B, Hkv, K]`` run starts; clipped to ``[0, T - chunk]``.
      host: whether ``store`` lives in host memory (``pl.HOST``) or on the device (``pl.ANY``).
      chunk: rows per run (one DMA each).
      depth: DMAs in flight per program (>= 1; 2 = double buffering).
      interpret: Pallas interpreter (CPU tests); needs ``host=False``.
    """
    if store.ndim < 4:
        raise ValueError(f"store.shape={tuple(store.shape)}: expected [L, B, Hkv, T, *row]")
    L, B, H, T = store.shape[:4]
    row = tuple(store.shape[4:])
    if idx.ndim != 3 or tuple(idx.shape[:2]) != (B, H):
        raise ValueError(f"idx.shape={tuple(idx.shape)}: expected [B={B}, Hkv={H}, K]")
    if not 1 <= chunk <= T:
        raise ValueError(f"chunk={chunk}: expected 1..T={T} rows per run")
    if depth < 1:
        raise ValueError(f"depth={depth}: expected >= 1 DMAs in flight")
    if interpret and host:
        raise ValueError("fetch_rows_dma(interpret=True) needs a device store (host=False): Pallas cannot "
                         "interpret pl.HOST operands; host stores can only be lowered for TPU")
    K = idx.shape[2]
    if K == 0:
        return jnp.zeros((B, H, 0) + row, store.dtype)
    flat = jnp.clip(idx.astype(jnp.int32), 0, T - chunk).reshape(B * H * K)
    layer = jnp.clip(jnp.asarray(layer, jnp.int32), 0, L - 1).reshape(1)
    kernel = functools.partial(_dma_kernel, K=K, chunk=chunk, depth=min(depth, K))
    return pl.pallas_call(
        kernel,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=2, grid=(B, H),
            in_specs=[pl.BlockSpec(memory_space=pl.HOST if host else pl.ANY)],
            out_specs=pl.BlockSpec(memory_space=pl.ANY),
            scratch_shapes=[pltpu.SemaphoreType.DMA((min(depth, K),))]),
        out_shape=jax.ShapeDtypeStruct((B, H, K * chunk) + row, store.dtype),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel")),
        interpret=interpret, name="kvjax_fetch_rows_dma",
    )(flat, layer, store)
