"""DMA fetch of selected rows (Pallas TPU kernel): interpret mode vs host_gather and a numpy oracle, and the TPU
lowering of a host-resident store.

Interpret mode needs the store on the device (``pl.ANY``): Pallas cannot interpret ``pl.HOST`` operands, so the
host-memory path is only lowered here; with KVJAX_TEST_COMPILED=1 on a TPU the compiled test reads a real
pinned_host store.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import SingleDeviceSharding

from kvjax import offload
from pallas_kernels.fetch_dma import fetch_rows_dma
from pk_cases import kernel_interpret

L, B, H, T = 3, 2, 3, 40


def _oracle(base, layer, idx, chunk):
    """Numpy: rows base[layer, b, h, idx[b, h, k] + j] for j < chunk, flattened over (k, j)."""
    out = np.zeros((B, H, idx.shape[2] * chunk) + base.shape[4:], base.dtype)
    for b in range(B):
        for h in range(H):
            out[b, h] = base[layer, b, h, [int(s) + j for s in idx[b, h] for j in range(chunk)]]
    return out


def _host(x):
    return jax.device_put(x, SingleDeviceSharding(jax.devices()[0], memory_kind="pinned_host"))


CASES = [
    # row shape, dtype, chunk, K, depth
    ((16,), np.float32, 1, 7, 2),         # token rows, double buffering, K not a multiple of depth
    ((2, 8), np.float32, 1, 5, 8),        # a [2, D] row (K and V together), depth > K
    ((16,), np.uint8, 4, 3, 1),           # byte codes in runs of 4 rows, one DMA in flight
    ((8,), jnp.bfloat16, 8, 4, 3),        # bf16 pages of 8 rows
]


@pytest.mark.compiled
@pytest.mark.parametrize("row,dtype,chunk,K,depth", CASES)
def test_kernel_matches_host_gather_and_oracle(row, dtype, chunk, K, depth):
    rng = np.random.default_rng(K * 10 + chunk)
    base = (rng.standard_normal((L, B, H, T) + row) * 50).astype(dtype)
    idx = rng.integers(0, T - chunk + 1, (B, H, K)).astype(np.int32)
    idx[0, 0, :2] = [T - chunk, 0]                                       # both ends of the store
    want = _oracle(base, 2, idx, chunk)
    interpret = kernel_interpret("tpu")
    store = jnp.asarray(base) if interpret else _host(base)   # interpret mode: a device store (pl.ANY)
    fn = jax.jit(lambda s, l, i: fetch_rows_dma(s, l, i, host=not interpret, chunk=chunk, depth=depth,
                                                interpret=interpret))
    got = fn(store, jnp.int32(2), jnp.asarray(idx))
    assert got.shape == want.shape and got.dtype == base.dtype
    np.testing.assert_array_equal(np.asarray(got), want)
    gathered = jax.jit(lambda s, l, i: offload.fetch_rows(s, l, i, "host_gather", chunk))(
        _host(base), jnp.int32(2), jnp.asarray(idx))
    np.testing.assert_array_equal(np.asarray(got), np.asarray(gathered))


def test_kernel_clips_indices_and_layer():
    base = np.arange(L * B * H * T * 4, dtype=np.float32).reshape(L, B, H, T, 4)
    idx = np.full((B, H, 2), T + 5, np.int32)
    idx[..., 0] = -3
    got = np.asarray(fetch_rows_dma(jnp.asarray(base), jnp.int32(L + 2), jnp.asarray(idx), host=False, chunk=2,
                                    interpret=True))
    np.testing.assert_array_equal(got[:, :, :2], base[L - 1, :, :, 0:2])
    np.testing.assert_array_equal(got[:, :, 2:], base[L - 1, :, :, T - 2:T])


def test_argument_errors():
    store = jnp.zeros((L, B, H, T, 4))
    idx = jnp.zeros((B, H, 2), jnp.int32)
    with pytest.raises(ValueError, match="pl.HOST"):
        fetch_rows_dma(store, 0, idx, host=True, interpret=True)
    with pytest.raises(ValueError, match="idx.shape"):
        fetch_rows_dma(store, 0, jnp.zeros((B, H + 1, 2), jnp.int32), host=False, interpret=True)
    with pytest.raises(ValueError, match="chunk=41"):
        fetch_rows_dma(store, 0, idx, host=False, chunk=T + 1, interpret=True)
    with pytest.raises(ValueError, match="depth=0"):
        fetch_rows_dma(store, 0, idx, host=False, depth=0, interpret=True)
    assert fetch_rows_dma(store, 0, jnp.zeros((B, H, 0), jnp.int32), host=False).shape == (B, H, 0, 4)


@pytest.mark.parametrize("host", [True, False])
def test_kernel_lowers_for_tpu_with_the_store_in_place(host):
    """Llama-3.1-8B-sized layer-stacked store (32 layers x 128k tokens x 128 bf16), 4096 rows per KV head: one
    Mosaic call; the store argument stays in pinned_host and no host compute or XLA gather is emitted."""
    S = jax.ShapeDtypeStruct
    sharding = SingleDeviceSharding(jax.devices()[0], memory_kind="pinned_host" if host else "device")
    store = S((32, 1, 8, 131072, 128), jnp.bfloat16, sharding=sharding)
    fn = jax.jit(lambda s, l, i: fetch_rows_dma(s, l, i, host=host))
    text = fn.trace(store, S((), jnp.int32), S((1, 8, 4096), jnp.int32)).lower(
        lowering_platforms=("tpu",)).as_text()
    assert text.count('kernel_name = "kvjax_fetch_rows_dma"') == 1
    main = next(line for line in text.splitlines() if "func.func public @main" in line)
    assert ('mhlo.memory_kind = "pinned_host"' in main.split("->")[0]) == host
    assert "_xla_compute_type" not in text and "stablehlo.gather" not in text
