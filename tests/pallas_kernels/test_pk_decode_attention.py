"""Decode attention: reference vs a float64 numpy oracle, TPU kernel (interpret mode) vs reference, TPU and GPU
kernels lowered for their platforms and on layer-stacked caches."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.decode_attention import decode_attention_kernel, decode_attention_ref
from pallas_kernels.decode_attention_gpu import decode_attention_gpu
from pk_cases import ATTN_KERNEL_CASES, MASKINGS, attention_inputs as _inputs, attention_tol as _tol, kernel_interpret
from pk_cases import masking as _masking
from pk_oracle import attention_oracle


@functools.lru_cache(maxsize=None)
def _jit_ref(**kw):
    return jax.jit(functools.partial(decode_attention_ref, **kw))


@pytest.mark.parametrize("kind", MASKINGS)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_reference_matches_oracle(kind, dtype):
    rng = np.random.default_rng(hash((kind, str(dtype))) % 2**32)
    B, Hkv, G, D, S = 2, 2, 3, 64, 50
    q, k, v = _inputs(rng, B, Hkv, G, D, S, dtype)
    kw = _masking(rng, kind, B, Hkv, S)
    got = _jit_ref()(q, k, v, **kw)
    assert got.shape == (B, Hkv * G, D) and got.dtype == dtype
    want = attention_oracle(q, k, v, **kw)
    np.testing.assert_allclose(np.asarray(got, np.float64), want, **_tol(dtype))


def test_reference_empty_rows_are_zero_and_scale_is_used():
    rng = np.random.default_rng(1)
    q, k, v = _inputs(rng, 1, 2, 2, 64, 20, jnp.float32)
    out = _jit_ref()(q, k, v, lengths=jnp.asarray([[0, 20]], jnp.int32))
    assert np.all(np.asarray(out)[0, :2] == 0)                         # KV head 0 -> query heads 0, 1
    got = _jit_ref(scale=0.5)(q, k, v)
    np.testing.assert_allclose(np.asarray(got), attention_oracle(q, k, v, scale=0.5), rtol=2e-5, atol=2e-5)


def test_input_validation():
    rng = np.random.default_rng(2)
    q, k, v = _inputs(rng, 1, 2, 2, 64, 20, jnp.float32)
    with pytest.raises(ValueError, match="KV heads"):
        decode_attention_ref(q[:, :3], k, v)
    with pytest.raises(ValueError, match="v.shape"):
        decode_attention_ref(q, k, v[:, :, :5])
    with pytest.raises(ValueError, match="lengths"):
        decode_attention_ref(q, k, v, lengths=jnp.zeros((3,), jnp.int32))
    with pytest.raises(ValueError, match="mask"):
        decode_attention_ref(q, k, v, mask=jnp.ones((1, 2, 19), bool))
    with pytest.raises(ValueError, match="mask.dtype"):
        decode_attention_ref(q, k, v, mask=jnp.ones((1, 2, 20), jnp.int32))
    with pytest.raises(ValueError, match="block_size"):
        decode_attention_kernel(q, k, v, block_size=64, interpret=True)


@pytest.mark.compiled
@pytest.mark.parametrize("case", ATTN_KERNEL_CASES)
def test_kernel_interpret_matches_reference(case):
    B, Hkv, G, D, S, dtype, qdtype, kind, block = case
    rng = np.random.default_rng(hash(case[:5] + (kind, block)) % 2**32)
    q, k, v = _inputs(rng, B, Hkv, G, D, S, dtype, qdtype)
    kw = _masking(rng, kind, B, Hkv, S)
    got = decode_attention_kernel(q, k, v, block_size=block, interpret=kernel_interpret("tpu"), **kw)
    want = _jit_ref()(q, k, v, **kw)
    assert got.shape == want.shape and got.dtype == want.dtype == q.dtype
    np.testing.assert_allclose(np.asarray(got, np.float64), np.asarray(want, np.float64), **_tol(dtype))
    # and against the float64 oracle, independently of the reference
    np.testing.assert_allclose(np.asarray(got, np.float64), attention_oracle(q, k, v, **kw), **_tol(dtype))


# each kernel with the platform it lowers for and the custom call it lowers to
KERNELS = {"tpu": (decode_attention_kernel, "tpu", "tpu_custom_call"),
           "gpu": (decode_attention_gpu, "cuda", "__gpu$xla.gpu.triton")}


@pytest.mark.parametrize("kernel", list(KERNELS))
@pytest.mark.parametrize("with_mask", [False, True])
@pytest.mark.parametrize("shape", [(1, 8, 4, 128, 131072), (2, 3, 3, 64, 5000)])   # paper at 128k, smollm2
def test_kernel_lowers(shape, with_mask, kernel):
    fn, platform, call = KERNELS[kernel]
    B, Hkv, G, D, S = shape
    T = jax.ShapeDtypeStruct
    args = [T((B, Hkv * G, D), jnp.bfloat16), T((B, Hkv, S, D), jnp.bfloat16), T((B, Hkv, S, D), jnp.bfloat16),
            T((B,), jnp.int32)]
    if with_mask:
        args.append(T((B, Hkv, S), jnp.bool_))
    text = jax.jit(functools.partial(fn, interpret=False)).trace(*args).lower(
        lowering_platforms=(platform,)).as_text()
    assert text.count(call) == 1


@pytest.mark.compiled
@pytest.mark.parametrize("kernel", list(KERNELS))
def test_kernel_layer_stacked_cache_matches_oracle(kernel):
    fn, target = KERNELS[kernel][0], kernel
    rng = np.random.default_rng(9)
    L, B, Hkv, G, D, S = 3, 2, 2, 4, 64, 200
    q, k0, v0 = _inputs(rng, B, Hkv, G, D, S, jnp.bfloat16)
    k = jnp.stack([k0 * (i + 1) for i in range(L)])
    v = jnp.stack([v0 - i for i in range(L)])
    lengths = jnp.asarray([200, 77], jnp.int32)
    got = fn(q, k, v, lengths, layer=jnp.int32(2), interpret=kernel_interpret(target))
    want = attention_oracle(q, k[2], v[2], lengths=lengths)
    np.testing.assert_allclose(np.asarray(got, np.float64), want, **_tol(jnp.bfloat16))
