"""Decode attention, GPU (Triton) split-K kernel and row segments: interpret mode (or compiled,
KVJAX_TEST_COMPILED=1 on a GPU) vs the reference over the TPU kernel's sweep and vs the float64 oracle (its CUDA
lowering and layer-stacked caches: test_pk_decode_attention.py)."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import dispatch
from pallas_kernels.decode_attention import concat_segments, decode_attention_ref
from pallas_kernels.decode_attention_gpu import (
    attention_partials_gpu,
    decode_attention_gpu,
    decode_attention_segments_gpu,
)
from pk_cases import ATTN_KERNEL_CASES, attention_inputs, attention_tol, kernel_interpret, masking
from pk_oracle import attention_oracle

# splits: one per head / the default choice / many small ones (min_split_rows below the block)
SPLITS = {"one": dict(target_programs=1), "auto": {}, "many": dict(target_programs=4096, min_split_rows=16)}


@functools.lru_cache(maxsize=None)
def _jit_ref(**kw):
    return jax.jit(functools.partial(decode_attention_ref, **kw))


# the TPU sweep with the default split choice, and two of its cases with one split / many small splits
SPLIT_CASES = [(c, "auto") for c in ATTN_KERNEL_CASES] + [(ATTN_KERNEL_CASES[i], s) for i in (1, 5)
                                                           for s in ("one", "many")]


@pytest.mark.compiled
@pytest.mark.parametrize("case,splits", SPLIT_CASES, ids=[f"B{c[0]}Hkv{c[1]}G{c[2]}D{c[3]}S{c[4]}-{c[7]}-{s}"
                                                          for c, s in SPLIT_CASES])
def test_kernel_matches_reference_and_oracle(case, splits):
    B, Hkv, G, D, S, dtype, qdtype, kind, block = case
    rng = np.random.default_rng(hash(case[:5] + (kind, block, splits)) % 2**32)
    q, k, v = attention_inputs(rng, B, Hkv, G, D, S, dtype, qdtype)
    kw = masking(rng, kind, B, Hkv, S)
    got = decode_attention_gpu(q, k, v, block_k=block // 4, interpret=kernel_interpret("gpu"), **SPLITS[splits],
                               **kw)
    want = _jit_ref()(q, k, v, **kw)
    assert got.shape == want.shape and got.dtype == want.dtype == q.dtype
    np.testing.assert_allclose(np.asarray(got, np.float64), np.asarray(want, np.float64), **attention_tol(dtype))
    np.testing.assert_allclose(np.asarray(got, np.float64), attention_oracle(q, k, v, **kw), **attention_tol(dtype))


def test_splits_cover_rows_once_and_skip_past_length():
    """Many splits: every split past a head's length has l = 0 (nothing read), the others sum to the softmax mass."""
    rng = np.random.default_rng(3)
    q, k, v = attention_inputs(rng, 1, 2, 2, 64, 300, jnp.float32)
    lengths = jnp.asarray([[300, 40]], jnp.int32)
    acc, m, l = attention_partials_gpu(q, k, v, lengths, None, block_k=16, target_programs=64, min_split_rows=16,
                                       interpret=True)
    n = l.shape[2]
    R = -(-300 // n // 16) * 16                                       # rows per split (a multiple of block_k)
    first = np.arange(n) * R
    np.testing.assert_array_equal(np.asarray(l[0, 1, :, 0]) > 0, first < 40)
    # recombined mass: sum_s exp(m_s - M) l_s equals sum_t exp(s_t - M) over the valid rows (float64 oracle)
    qf, kf = np.asarray(q, np.float64).reshape(1, 2, 2, 64), np.asarray(k, np.float64)
    logits = np.einsum("gd,td->gt", qf[0, 1], kf[0, 1, :40]) / 8.0
    M = logits.max(axis=1)
    mass = (np.exp(np.asarray(m[0, 1], np.float64) - M[None, :]) * np.asarray(l[0, 1], np.float64)).sum(0)
    np.testing.assert_allclose(mass, np.exp(logits - M[:, None]).sum(1), rtol=1e-5)


def test_empty_rows_are_zero_and_scale_is_used():
    rng = np.random.default_rng(1)
    q, k, v = attention_inputs(rng, 1, 2, 2, 64, 20, jnp.float32)
    out = decode_attention_gpu(q, k, v, lengths=jnp.asarray([[0, 20]], jnp.int32), interpret=True)
    assert np.all(np.asarray(out)[0, :2] == 0)                         # KV head 0 -> query heads 0, 1
    got = decode_attention_gpu(q, k, v, scale=0.5, interpret=True)
    np.testing.assert_allclose(np.asarray(got), attention_oracle(q, k, v, scale=0.5), rtol=2e-5, atol=2e-5)


def _segments(rng, B, Hkv, D, dtype):
    """Window (shared bool mask), fetched rows (no mask), generated slots (additive bias, -inf = not yet written)."""
    segs = []
    for n, kind in ((96, "shared"), (300, None), (40, "bias")):
        k = jnp.asarray(rng.standard_normal((B, Hkv, n, D)), dtype)
        v = jnp.asarray(rng.standard_normal((B, Hkv, n, D)), dtype)
        if kind == "shared":
            m = jnp.asarray(rng.random((B, 1, n)) < 0.7)
        elif kind == "bias":
            b = rng.standard_normal((B, Hkv, n)).astype(np.float32)
            b[rng.random((B, Hkv, n)) < 0.5] = -np.inf
            m = jnp.asarray(b)
        else:
            m = None
        segs.append((k, v, m))
    return segs


def _oracle_over_union(q, segs):
    """float64 oracle over the segments concatenated in numpy (independent of concat_segments)."""
    B, Hkv = segs[0][0].shape[:2]
    k = np.concatenate([np.asarray(s[0], np.float32) for s in segs], axis=2)
    v = np.concatenate([np.asarray(s[1], np.float32) for s in segs], axis=2)
    bias = []
    for kk, _, m in segs:
        n = kk.shape[2]
        if m is None:
            bias.append(np.zeros((B, Hkv, n)))
        elif m.dtype == jnp.bool_:
            bias.append(np.where(np.broadcast_to(np.asarray(m), (B, Hkv, n)), 0.0, -np.inf))
        else:
            bias.append(np.broadcast_to(np.asarray(m, np.float64), (B, Hkv, n)))
    dt = segs[0][0].dtype
    return attention_oracle(q, jnp.asarray(k, dt), jnp.asarray(v, dt), mask=np.concatenate(bias, axis=2))


@pytest.mark.compiled
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_segments_equal_attention_over_the_union(dtype):
    rng = np.random.default_rng(5)
    B, Hkv, G, D = 2, 2, 3, 64
    q = jnp.asarray(rng.standard_normal((B, Hkv * G, D)), dtype)
    segs = _segments(rng, B, Hkv, D, dtype)
    got = decode_attention_segments_gpu(q, segs, block_k=32, interpret=kernel_interpret("gpu"))
    want = _oracle_over_union(q, segs)
    np.testing.assert_allclose(np.asarray(got, np.float64), want, **attention_tol(dtype))
    k, v, mask = concat_segments(segs)
    ref = _jit_ref()(q, k, v, mask=mask)
    np.testing.assert_allclose(np.asarray(got, np.float64), np.asarray(ref, np.float64), **attention_tol(dtype))


def test_segments_dispatch_paths_agree():
    """dispatch.decode_attention_segments: reference (concatenation), TPU kernel (interpret), GPU kernel
    (interpret_gpu) give the oracle's attention."""
    rng = np.random.default_rng(6)
    q = jnp.asarray(rng.standard_normal((1, 4, 64)), jnp.float32)
    segs = _segments(rng, 1, 2, 64, jnp.float32)
    want = _oracle_over_union(q, segs)
    for uk in ("reference", "auto", "interpret", "interpret_gpu"):
        got = dispatch.decode_attention_segments(q, segs, use_kernels=uk)
        np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=2e-5, atol=2e-5, err_msg=uk)


def test_input_validation():
    rng = np.random.default_rng(2)
    q, k, v = attention_inputs(rng, 1, 2, 2, 48, 20, jnp.float32)
    with pytest.raises(ValueError, match="head dim D=48"):
        decode_attention_gpu(q, k, v, interpret=True)
    q, k, v = attention_inputs(rng, 1, 2, 2, 64, 20, jnp.float32)
    with pytest.raises(ValueError, match="block_k=100"):
        decode_attention_gpu(q, k, v, block_k=100, interpret=True)
    with pytest.raises(ValueError, match="segments=\\[\\]"):
        decode_attention_segments_gpu(q, [], interpret=True)
    with pytest.raises(ValueError, match=r"segments\[1\]"):
        dispatch.decode_attention_segments(q, [(k, v, None), (k.astype(jnp.bfloat16), v, None)])
    with pytest.raises(ValueError, match=r"segments\[0\]: mask.shape"):
        dispatch.decode_attention_segments(q, [(k, v, jnp.ones((1, 2, 19), bool))])
