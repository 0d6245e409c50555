"""Backend dispatch: setting resolution, CPU paths, and per-platform lowering of the auto path."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import dispatch
from pallas_kernels.decode_attention import decode_attention_kernel, decode_attention_ref
from pallas_kernels.score import score_landmarks_kernel, score_landmarks_ref
from pk_oracle import make_score_inputs


@pytest.fixture(autouse=True)
def _clean_setting(monkeypatch):
    monkeypatch.delenv(dispatch.ENV_VAR, raising=False)
    dispatch.set_use_kernels(None)
    yield
    dispatch.set_use_kernels(None)


def test_setting_resolution(monkeypatch):
    assert dispatch.get_use_kernels() == "auto"
    monkeypatch.setenv(dispatch.ENV_VAR, "0")
    assert dispatch.get_use_kernels() == "reference"
    dispatch.set_use_kernels(True)                         # explicit setting beats the environment
    assert dispatch.get_use_kernels() == "kernel"
    with dispatch.kernels_override("interpret"):
        assert dispatch.resolve_backend() == "interpret"
    assert dispatch.get_use_kernels() == "kernel"
    assert dispatch.resolve_backend(False) == "reference"  # argument beats the setting
    assert dispatch.resolve_backend("auto", interpret=True) == "interpret"
    with pytest.raises(ValueError, match="use_kernels='fast'"):
        dispatch.resolve_backend("fast")
    monkeypatch.setenv(dispatch.ENV_VAR, "sometimes")
    dispatch.set_use_kernels(None)
    with pytest.raises(ValueError, match="KVJAX_KERNELS"):
        dispatch.get_use_kernels()


def _attn_inputs():
    rng = np.random.default_rng(0)
    B, Hkv, G, D, S = 2, 2, 3, 64, 150
    q = jnp.asarray(rng.standard_normal((B, Hkv * G, D)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((B, Hkv, S, D)), jnp.float32)
    v = jnp.asarray(rng.standard_normal((B, Hkv, S, D)), jnp.float32)
    valid = jnp.asarray(rng.random((B, 1, S)) < 0.8)
    return q, k, v, valid


def test_cpu_auto_runs_the_reference_and_forcing_runs_the_kernel():
    q, k, v, valid = _attn_inputs()
    lengths = jnp.asarray([150, 70], jnp.int32)
    ref = decode_attention_ref(q, k, v, lengths=lengths, mask=valid)
    auto = jax.jit(functools.partial(dispatch.decode_attention, use_kernels="auto"))(q, k, v, valid, lengths=lengths)
    np.testing.assert_array_equal(np.asarray(auto), np.asarray(ref))      # same program on CPU: bitwise equal
    kern = decode_attention_kernel(q, k, v, lengths=lengths, mask=valid, interpret=True)
    for how in (dict(use_kernels=True), dict(interpret=True)):
        forced = dispatch.decode_attention(q, k, v, valid, lengths=lengths, **how)
        np.testing.assert_array_equal(np.asarray(forced), np.asarray(kern))
    np.testing.assert_allclose(np.asarray(kern), np.asarray(ref), rtol=2e-5, atol=2e-5)


def test_score_dispatch_paths_agree():
    rng = np.random.default_rng(1)
    args = make_score_inputs(rng, 1, 2, 2, 64, 4, 200, lengths=[180])
    ref = score_landmarks_ref(*args, mode="serve")
    auto = jax.jit(functools.partial(dispatch.score_landmarks, mode="serve"))(*args)
    np.testing.assert_array_equal(np.asarray(auto), np.asarray(ref))
    with dispatch.kernels_override("interpret"):
        forced = dispatch.score_landmarks(*args, mode="serve", block_tokens=128)
    kern = score_landmarks_kernel(*args, mode="serve", block_tokens=128, interpret=True)
    np.testing.assert_array_equal(np.asarray(forced), np.asarray(kern))
    fin = np.isfinite(np.asarray(ref))
    np.testing.assert_allclose(np.asarray(forced)[fin], np.asarray(ref)[fin], rtol=1e-5, atol=1e-5)
    assert (np.isneginf(np.asarray(forced)) == ~fin).all()


def _lowered(fn, args, platform):
    """Lowered text of a fresh trace (a new wrapper each call, so the dispatch setting is read again)."""
    return jax.jit(lambda *a: fn(*a)).trace(*args).lower(lowering_platforms=(platform,)).as_text()


TRITON = "__gpu$xla.gpu.triton"


def _paper_args():
    S = jax.ShapeDtypeStruct
    B, Hkv, G, D, T = 1, 8, 4, 128, 131072
    score_args = (S((B, Hkv * G, D), jnp.bfloat16), S((B, Hkv, T, D // 4), jnp.uint8), S((B, Hkv, T), jnp.float32),
                  S((256, 4), jnp.float32), S((B,), jnp.int32))
    attn_args = (S((B, Hkv * G, D), jnp.bfloat16), S((B, Hkv, 4096, D), jnp.bfloat16),
                 S((B, Hkv, 4096, D), jnp.bfloat16), S((B, Hkv, 4096), jnp.bool_))
    seg_args = (attn_args[0], [(S((B, Hkv, n, D), jnp.bfloat16), S((B, Hkv, n, D), jnp.bfloat16), m)
                               for n, m in ((128, S((B, 1, 128), jnp.bool_)), (4096, None), (64, S((B, Hkv, 64),
                                                                                                  jnp.bool_)))])
    return [(functools.partial(dispatch.score_landmarks, mode=m), score_args) for m in ("eval", "serve")] + [
        (dispatch.decode_attention, attn_args), (dispatch.decode_attention_segments, seg_args)]


@pytest.mark.parametrize("case", range(4), ids=["score_eval", "score_serve", "attention", "segments"])
def test_auto_lowers_each_platforms_kernel(case):
    """auto: the Mosaic kernel for TPU, the Triton kernel for CUDA (one call per segment), the reference on CPU."""
    fn, args = _paper_args()[case]
    tpu = _lowered(fn, args, "tpu")
    assert "tpu_custom_call" in tpu and TRITON not in tpu
    cuda = _lowered(fn, args, "cuda")
    assert cuda.count(TRITON) == (3 if case == 3 else 1) and "tpu_custom_call" not in cuda
    cpu = _lowered(fn, args, "cpu")
    assert "tpu_custom_call" not in cpu and TRITON not in cpu and "custom_call" not in cpu


def test_gpu_kernels_switch_and_forced_modes(monkeypatch):
    fn, args = _paper_args()[2]
    monkeypatch.setitem(dispatch.GPU_KERNELS, "decode_attention", False)   # auto -> reference on CUDA
    assert TRITON not in _lowered(fn, args, "cuda")
    assert TRITON in _lowered(functools.partial(fn, use_kernels=True), args, "cuda")   # forced: kernel anyway
    text = _lowered(functools.partial(fn, use_kernels=False), args, "tpu")   # reference everywhere
    assert "tpu_custom_call" not in text


def test_kvjax_attention_call_convention():
    """kvjax.attention calls dispatch.decode_attention(q, k, v, valid, use_kernels=...) with valid [B, 1|Hkv, S]."""
    q, k, v, valid = _attn_inputs()
    for uk in ("auto", False):
        out = dispatch.decode_attention(q, k, v, valid, use_kernels=uk)
        np.testing.assert_allclose(np.asarray(out), np.asarray(decode_attention_ref(q, k, v, mask=valid)),
                                   rtol=1e-6, atol=1e-6)


def _stacked_inputs():
    rng = np.random.default_rng(4)
    L, B, Hkv, G, D, S = 3, 2, 2, 2, 64, 150
    q = jnp.asarray(rng.standard_normal((B, Hkv * G, D)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((L, B, Hkv, S, D)), jnp.float32)
    v = jnp.asarray(rng.standard_normal((L, B, Hkv, S, D)), jnp.float32)
    return q, k, v, jnp.asarray(rng.random((B, 1, S)) < 0.7), jnp.asarray([150, 33], jnp.int32)


@pytest.mark.parametrize("uk", ["reference", "interpret", "interpret_gpu"])
def test_layer_stacked_cache(uk):
    """layer=: every backend attends layer `layer` of a [L, B, Hkv, S, D] cache (clipped into [0, L))."""
    q, k, v, valid, lengths = _stacked_inputs()
    fn = jax.jit(lambda q, k, v, m, n, l: dispatch.decode_attention(q, k, v, m, lengths=n, layer=l, use_kernels=uk))
    for layer, want_layer in ((1, 1), (2, 2), (7, 2)):
        want = decode_attention_ref(q, k[want_layer], v[want_layer], lengths=lengths, mask=valid)
        got = fn(q, k, v, valid, lengths, jnp.int32(layer))
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=2e-5, atol=2e-5)
    with pytest.raises(ValueError, match="layer= given"):
        dispatch.decode_attention(q, k[0], v[0], valid, layer=0)


def test_layer_stacked_cache_is_not_copied_for_the_kernels():
    """Lowered for TPU and CUDA with layer=: the kernel takes the whole stacked cache (no dynamic slice of it)."""
    S = jax.ShapeDtypeStruct
    cache = S((32, 1, 8, 131072, 128), jnp.bfloat16)
    args = (S((1, 32, 128), jnp.bfloat16), cache, cache, S((1, 1, 131072), jnp.bool_), S((), jnp.int32))
    fn = lambda q, k, v, m, l: dispatch.decode_attention(q, k, v, m, layer=l)  # noqa: E731
    for platform, kernel in (("tpu", "tpu_custom_call"), ("cuda", TRITON)):
        text = _lowered(fn, args, platform)
        assert kernel in text and "dynamic_slice" not in text
    assert "dynamic_slice" in _lowered(lambda q, k, v, m, l: fn(q, k[l], v[l], m, None), args, "cuda")


@pytest.mark.parametrize("uk", ["reference", "interpret", "interpret_gpu"])
def test_score_layer_stacked(uk):
    """layer=: every backend scores layer `layer` of [L, ...] codes/scales, equal to scoring the sliced layer."""
    rng = np.random.default_rng(5)
    layers = [make_score_inputs(rng, 1, 2, 2, 64, 4, 200, lengths=[180]) for _ in range(3)]
    q, _, _, grid, lengths = layers[0]
    codes = jnp.stack([a[1] for a in layers])
    scales = jnp.stack([a[2] for a in layers])
    fn = jax.jit(lambda c, s, l: dispatch.score_landmarks(q, c, s, grid, lengths, mode="serve", layer=l,
                                                          use_kernels=uk, block_tokens=128))
    for layer in (0, 2):
        want = score_landmarks_ref(q, codes[layer], scales[layer], grid, lengths, mode="serve")
        got = np.asarray(fn(codes, scales, jnp.int32(layer)))
        fin = np.isfinite(np.asarray(want))
        np.testing.assert_allclose(got[fin], np.asarray(want)[fin], rtol=1e-5, atol=1e-5)
        assert (np.isneginf(got) == ~fin).all()
    with pytest.raises(ValueError, match="layer= given"):
        dispatch.score_landmarks(q, codes[0], scales[0], grid, lengths, layer=0)


def test_score_layer_stacked_is_not_copied_for_the_kernels():
    S = jax.ShapeDtypeStruct
    args = (S((1, 32, 128), jnp.bfloat16), S((32, 1, 8, 131072, 32), jnp.uint8), S((32, 1, 8, 131072), jnp.float32),
            S((256, 4), jnp.float32), S((1,), jnp.int32), S((), jnp.int32))
    fn = lambda q, c, s, g, n, l: dispatch.score_landmarks(q, c, s, g, n, mode="serve", layer=l)  # noqa: E731
    for platform, kernel in (("tpu", "tpu_custom_call"), ("cuda", TRITON)):
        text = _lowered(fn, args, platform)
        assert kernel in text and "dynamic_slice" not in text
