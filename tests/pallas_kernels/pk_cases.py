"""Shared case tables, input makers and tolerances of the kernel tests (TPU and GPU kernels use the same sweep),
and the compiled-mode switch.

Compiled mode: with ``KVJAX_TEST_COMPILED=1`` the tests marked ``compiled`` run each kernel *compiled* on the
platform it is written for (``interpret=False``) against its reference and skip the kernels of other platforms;
without it they run every kernel in Pallas interpret mode (CPU). ``scripts/accelerator_check.sh`` runs
``pytest -m compiled`` this way on a GPU or TPU machine.
"""
from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

COMPILED = os.environ.get("KVJAX_TEST_COMPILED", "0") == "1"
_PLATFORM = {"gpu": ("gpu", "cuda", "rocm"), "tpu": ("tpu",)}


def kernel_interpret(target: str) -> bool:
    """The ``interpret`` flag for a kernel written for ``target`` ("gpu" | "tpu"): True normally; in compiled mode
    False on a ``target`` device, and the test is skipped on any other platform."""
    if not COMPILED:
        return True
    here = jax.default_backend()
    if here not in _PLATFORM[target]:
        pytest.skip(f"KVJAX_TEST_COMPILED=1: the {target} kernel runs compiled only on {target} (this is {here})")
    return False


# ------------------------------------------------------------------------------------------------ scoring

SCORE_KERNEL_CASES = [
    # B, Hkv, G, D, d, T, q dtype, lengths, block_tokens, TPU method
    (2, 3, 3, 64, 4, 300, jnp.bfloat16, [300, 17], 128, "gather"),       # smollm2-like, T not a block multiple
    (2, 2, 4, 128, 2, 256, jnp.float32, [256, 130], 128, "gather"),      # block multiple, 4-bit codes
    (2, 2, 1, 64, 4, 384, jnp.float32, [0, 384], 256, "gather"),         # MHA, empty row, partial last block
    (1, 1, 8, 128, 4, 200, jnp.bfloat16, [150], 512, "gather"),          # G=8, block > T
    (2, 1, 3, 64, 4, 640, jnp.float32, [130, 640], 128, "gather"),       # blocks past the length are skipped
    (2, 3, 3, 64, 4, 300, jnp.bfloat16, [300, 17], 128, "onehot"),
    (1, 2, 4, 64, 2, 200, jnp.float32, [199], 128, "onehot"),
]


def assert_scores(got, want, mode):
    """Same -inf pattern; serve: float32 rounding; eval: bf16 probabilities within one bf16 ulp, mostly equal."""
    got = np.asarray(jnp.asarray(got, jnp.float32), np.float64)
    want = np.asarray(want, np.float64)
    assert got.shape == want.shape
    np.testing.assert_array_equal(np.isneginf(got), np.isneginf(want))
    fin = np.isfinite(want)
    assert np.isfinite(got[fin]).all()
    if not fin.any():
        return
    g, w = got[fin], want[fin]
    if mode == "serve":
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5 * np.abs(w).max())
    else:
        np.testing.assert_allclose(g, w, rtol=2 ** -7, atol=0)
        assert np.mean(g == w) > 0.9


# ---------------------------------------------------------------------------------------------- attention

ATTN_KERNEL_CASES = [
    # B, Hkv, G, D, S, dtype, q dtype, masking, block
    (2, 3, 3, 64, 300, jnp.bfloat16, None, "lengths_b", 128),          # smollm2-like, S not a block multiple
    (2, 2, 4, 128, 256, jnp.float32, None, "lengths_bh", 128),         # block multiple, empty head
    (2, 2, 1, 64, 700, jnp.float32, None, "bool_mask", 256),           # MHA, ragged per-head mask
    (1, 1, 8, 128, 130, jnp.float32, None, "lengths_and_shared_mask", 512),  # G=8, block > S
    (1, 2, 4, 64, 200, jnp.bfloat16, jnp.float32, "additive_mask", 128),    # f32 queries, bf16 K/V
    (2, 2, 3, 64, 640, jnp.float32, None, "lengths_b", 128),           # blocks past the length are skipped
]

MASKINGS = ["none", "lengths_b", "lengths_bh", "bool_mask", "additive_mask", "lengths_and_shared_mask"]


def attention_inputs(rng, B, Hkv, G, D, S, dtype, qdtype=None):
    q = jnp.asarray(rng.standard_normal((B, Hkv * G, D)), qdtype or dtype)
    k = jnp.asarray(rng.standard_normal((B, Hkv, S, D)), dtype)
    v = jnp.asarray(rng.standard_normal((B, Hkv, S, D)), dtype)
    return q, k, v


def masking(rng, kind, B, Hkv, S):
    """Keyword arguments ``lengths`` / ``mask`` of one validity pattern of :data:`MASKINGS`."""
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


def attention_tol(dtype):
    # bf16 V: p is rounded to bf16 before p.v (2**-9 relative per term), the output to bf16 (q's dtype).
    return dict(rtol=2e-2, atol=2e-2) if dtype == jnp.bfloat16 else dict(rtol=2e-5, atol=2e-5)
