"""Decode attention: reference vs a float64 numpy oracle, Pallas kernel (interpret mode) vs reference, TPU lowering."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.decode_attention import decode_attention_kernel, decode_attention_ref
from pk_oracle import attention_oracle


def _inputs(rng, B, Hkv, G, D, S, dtype, qdtype=None):
    q = jnp.asarray(rng.standard_normal((B, Hkv * G, D)), qdtype or dtype)
    k = jnp.asarray(rng.standard_normal((B, Hkv, S, D)), dtype)
    v = jnp.asarray(rng.standard_normal((B, Hkv, S, D)), dtype)
    return q, k, v


def _tol(dtype):
    # bf16 V: p is rounded to bf16 before p.v (2**-9 relative per term), the output to bf16 (q's dtype).
    return dict(rtol=2e-2, atol=2e-2) if dtype == jnp.bfloat16 else dict(rtol=2e-5, atol=2e-5)


@functools.lru_cache(maxsize=None)
def _jit_ref(**kw):
    return jax.jit(functools.partial(decode_attention_ref, **kw))


MASKINGS = ["none", "lengths_b", "lengths_bh", "bool_mask", "additive_mask", "lengths_and_shared_mask"]


def _masking(rng, kind, B, Hkv, S):
    if kind == "none":
        return {}
    if kind == "lengths_b":
        return dict(lengths=jnp.asarray(rng.integers(1, S + 1, (B,)), jnp.int32))
    if kind == "lengths_bh":
        L = rng.integers(0, S + 1, (B, Hkv))
        L[0, 0] = 0                                                    # a head with nothing valid -> zeros
        return dict(lengths=jnp.asarray(L, jnp.int32))
    if kind == "bool_mask":
        m = rng.random((B, Hkv, S)) < 0.6
        m[:, :, 0] = True
        return dict(mask=jnp.asarray(m))
    if kind == "additive_mask":
        bias = rng.standard_normal((B, Hkv, S)).astype(np.float32)
        bias[rng.random((B, Hkv, S)) < 0.3] = -np.inf
        bias[:, :, 0] = 0.0
        return dict(mask=jnp.asarray(bias))
    if kind == "lengths_and_shared_mask":
        m = rng.random((B, 1, S)) < 0.7
        return dict(lengths=jnp.asarray(rng.integers(1, S + 1, (B,)), jnp.int32), mask=jnp.asarray(m))
    raise AssertionError(kind)


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


KERNEL_CASES = [
    # B, Hkv, G, D, S, dtype, q dtype, masking, block
    (2, 3, 3, 64, 300, jnp.bfloat16, None, "lengths_b", 128),          # smollm2-like, S not a block multiple
    (2, 2, 4, 128, 256, jnp.float32, None, "lengths_bh", 128),         # block multiple, empty head
    (2, 2, 1, 64, 700, jnp.float32, None, "bool_mask", 256),           # MHA, ragged per-head mask
    (1, 1, 8, 128, 130, jnp.float32, None, "lengths_and_shared_mask", 512),  # G=8, block > S
    (1, 2, 4, 64, 200, jnp.bfloat16, jnp.float32, "additive_mask", 128),    # f32 queries, bf16 K/V
    (2, 2, 3, 64, 640, jnp.float32, None, "lengths_b", 128),           # blocks past the length are skipped
]


@pytest.mark.parametrize("case", KERNEL_CASES)
def test_kernel_interpret_matches_reference(case):
    B, Hkv, G, D, S, dtype, qdtype, kind, block = case
    rng = np.random.default_rng(hash(case[:5] + (kind, block)) % 2**32)
    q, k, v = _inputs(rng, B, Hkv, G, D, S, dtype, qdtype)
    kw = _masking(rng, kind, B, Hkv, S)
    got = decode_attention_kernel(q, k, v, block_size=block, interpret=True, **kw)
    want = _jit_ref()(q, k, v, **kw)
    assert got.shape == want.shape and got.dtype == want.dtype == q.dtype
    np.testing.assert_allclose(np.asarray(got, np.float64), np.asarray(want, np.float64), **_tol(dtype))
    # and against the float64 oracle, independently of the reference
    np.testing.assert_allclose(np.asarray(got, np.float64), attention_oracle(q, k, v, **kw), **_tol(dtype))


@pytest.mark.parametrize("with_mask", [False, True])
@pytest.mark.parametrize("shape", [(1, 8, 4, 128, 8192), (2, 3, 3, 64, 5000)])   # paper, smollm2
def test_kernel_lowers_for_tpu(shape, with_mask):
    B, Hkv, G, D, S = shape
    T = jax.ShapeDtypeStruct
    args = [T((B, Hkv * G, D), jnp.bfloat16), T((B, Hkv, S, D), jnp.bfloat16), T((B, Hkv, S, D), jnp.bfloat16),
            T((B,), jnp.int32)]
    if with_mask:
        args.append(T((B, Hkv, S), jnp.bool_))
    text = jax.jit(functools.partial(decode_attention_kernel, interpret=False)).trace(*args).lower(
        lowering_platforms=("tpu",)).as_text()
    assert "tpu_custom_call" in text
