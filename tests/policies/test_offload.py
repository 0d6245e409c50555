"""kvjax.offload: fetching selected rows from a pinned_host store inside jit, on one device and on a mesh."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P, SingleDeviceSharding

from kvjax import compat, offload

L, B, H, T, D, K = 3, 2, 4, 32, 8, 5


def _shardings(mesh):
    if mesh is None:
        dev = jax.devices()[0]
        return (SingleDeviceSharding(dev, memory_kind="pinned_host"), SingleDeviceSharding(dev),
                SingleDeviceSharding(dev))
    return (NamedSharding(mesh, P(None, "data", "model"), memory_kind="pinned_host"),
            NamedSharding(mesh, P(None, "data", "model")), NamedSharding(mesh, P("data", "model")))


def _oracle(base, layer, idx, chunk):
    """Numpy: rows base[layer, b, h, idx[b,h,k] + j] for j < chunk, flattened over (k, j)."""
    out = np.zeros((B, H, idx.shape[2] * chunk) + base.shape[4:], base.dtype)
    for b in range(B):
        for h in range(H):
            toks = [int(s) + j for s in idx[b, h] for j in range(chunk)]
            out[b, h] = base[layer, b, h, toks]
    return out


@pytest.mark.parametrize("use_mesh", [False, True])
@pytest.mark.parametrize("backend", offload.BACKENDS)
@pytest.mark.parametrize("chunk", [1, 4])
def test_fetch_rows_matches_numpy(use_mesh, backend, chunk):
    mesh = compat.make_mesh(2, 4) if use_mesh else None
    host_s, dev_s, idx_s = _shardings(mesh)
    rng = np.random.RandomState(chunk)
    base = rng.randn(L, B, H, T, D, 2).astype(np.float32)  # a 2-d row, to check trailing dims
    store = jax.device_put(base, host_s if backend != "device" else dev_s)
    idx_np = rng.randint(0, T - chunk + 1, (B, H, K)).astype(np.int32)
    idx = jax.device_put(idx_np, idx_s)
    fn = jax.jit(lambda s, l, i: offload.fetch_rows(s, l, i, backend, chunk))
    out = fn(store, jnp.int32(2), idx)
    assert out.sharding.memory_kind == "device"
    np.testing.assert_array_equal(np.asarray(out), _oracle(base, 2, idx_np, chunk))
    if backend != "device":
        assert store.sharding.memory_kind == "pinned_host"


def test_fetch_rows_clips_out_of_range():
    host_s, _, _ = _shardings(None)
    base = np.arange(L * B * H * T * D, dtype=np.float32).reshape(L, B, H, T, D)
    idx = np.full((B, H, 2), T + 10, np.int32)
    idx[..., 0] = -3
    out = jax.jit(lambda s, i: offload.fetch_rows(s, jnp.int32(0), i))(jax.device_put(base, host_s), idx)
    np.testing.assert_array_equal(np.asarray(out[..., 0, :]), base[0, :, :, 0])
    np.testing.assert_array_equal(np.asarray(out[..., 1, :]), base[0, :, :, T - 1])


@pytest.mark.parametrize("use_mesh", [False, True])
def test_write_rows_host_dus(use_mesh):
    mesh = compat.make_mesh(2, 4) if use_mesh else None
    host_s, _, _ = _shardings(mesh)
    base = np.random.RandomState(0).randn(L, B, H, T, D).astype(np.float32)
    rows = np.random.RandomState(1).randn(B, H, D).astype(np.float32)
    pos = np.array([3, 30], np.int32)
    fn = jax.jit(lambda s, l, r, p: offload.write_rows(s, l, r, p), donate_argnums=0, out_shardings=host_s)
    new = fn(jax.device_put(base, host_s), jnp.int32(1), rows, pos)
    exp = base.copy()
    exp[1, 0, :, 3] = rows[0]
    exp[1, 1, :, 30] = rows[1]
    assert new.sharding.memory_kind == "pinned_host"
    np.testing.assert_array_equal(np.asarray(new), exp)


def _count(txt, s):
    return txt.count(s)


def test_tpu_lowering_has_host_annotations():
    """Lowered for TPU from CPU: the host gather is host compute and the move to device is annotated; the chunk
    path is a slice -> device_put (a DMA) with no host compute."""
    host_s, _, _ = _shardings(None)
    store = jax.device_put(np.zeros((L, B, H, T, D), np.float32), host_s)
    idx = jnp.zeros((B, H, K), jnp.int32)
    low = lambda be, c: jax.jit(lambda s, l, i: offload.fetch_rows(s, l, i, be, c)).trace(  # noqa: E731
        store, jnp.int32(0), idx).lower(lowering_platforms=("tpu",)).as_text()
    g = low("host_gather", 1)
    assert _count(g, "annotate_device_placement") >= 1 and _count(g, "_xla_compute_type") >= 1
    c = low("chunk_slices", 4)
    assert _count(c, "annotate_device_placement") >= 1 and _count(c, "_xla_compute_type") == 0


def _ops(txt):
    """What a lowered fetch does: memory moves, host-compute ops, gathers, slices, kernels, loops."""
    return tuple(txt.count(w) for w in ("annotate_device_placement", '_xla_compute_type = "host"', "stablehlo.gather",
                                        "stablehlo.dynamic_slice", "custom_call @tpu_custom_call", "stablehlo.while"))


@pytest.mark.parametrize("chunk", [1, 4])
def test_dma_and_auto_lower_per_platform(chunk):
    """TPU: "dma" and "auto" are the DMA kernel (the store argument stays pinned_host, no host compute). CUDA and
    CPU have no DMA kernel: "dma"/"auto" lower exactly like "host_gather" (host compute + a move to device on CUDA).
    A device store under "auto" is the device gather on every platform."""
    host_s, dev_s, _ = _shardings(None)
    idx = jnp.zeros((B, H, K), jnp.int32)

    def low(be, platform, sharding=host_s):
        store = jax.device_put(np.zeros((L, B, H, T, D), np.float32), sharding)
        return jax.jit(lambda s, l, i: offload.fetch_rows(s, l, i, be, chunk)).trace(
            store, jnp.int32(0), idx).lower(lowering_platforms=(platform,)).as_text()

    for be in ("dma", "auto"):
        t = low(be, "tpu")
        assert t.count('kernel_name = "kvjax_fetch_rows_dma"') == 1 and "_xla_compute_type" not in t
        assert 'mhlo.memory_kind = "pinned_host"' in next(x for x in t.splitlines() if "@main" in x)
        for platform in ("cuda", "cpu"):
            assert _ops(low(be, platform)) == _ops(low("host_gather", platform))
    assert "_xla_compute_type" in low("auto", "cuda") and "annotate_device_placement" in low("auto", "cuda")
    assert "tpu_custom_call" in low("dma", "tpu", dev_s)                 # device store: HBM -> HBM DMAs
    for platform in ("tpu", "cuda"):
        assert _ops(low("auto", platform, dev_s)) == _ops(low("device", platform, dev_s))


def test_fetch_rows_bad_args():
    store = jnp.zeros((L, B, H, T, D))
    with pytest.raises(ValueError, match="backend"):
        offload.fetch_rows(store, 0, jnp.zeros((B, H, 1), jnp.int32), backend="nvme")
    with pytest.raises(ValueError, match="idx shape"):
        offload.fetch_rows(store, 0, jnp.zeros((B, H + 1, 1), jnp.int32), backend="device")
    with pytest.raises(ValueError, match="chunk"):
        offload.fetch_rows(store, 0, jnp.zeros((B, H, 1), jnp.int32), backend="device", chunk=T + 1)


def test_host_gather_needs_host_aval():
    """jit out_shardings alone give a pinned_host sharding with a device aval; place_on_host fixes the aval, and
    fetch_rows refuses a store whose aval is not in host memory (a clear error, not a silent device gather)."""
    host_s, _, _ = _shardings(None)
    x = np.ones((L, B, H, T, D), np.float32)
    only_sharding = jax.jit(lambda a: a * 2, out_shardings=host_s)(x)
    placed = jax.jit(lambda a: offload.place_on_host(a * 2), out_shardings=host_s)(x)
    assert only_sharding.sharding.memory_kind == "pinned_host" == placed.sharding.memory_kind
    assert offload.is_host(placed)
    idx = jnp.zeros((B, H, 2), jnp.int32)
    np.testing.assert_array_equal(jax.jit(lambda s: offload.fetch_rows(s, 1, idx))(placed), np.full((B, H, 2, D), 2))
    if not offload.is_host(only_sharding):
        with pytest.raises(ValueError, match="host memory"):
            jax.jit(lambda s: offload.fetch_rows(s, 1, idx))(only_sharding)
