"""Landmark scoring, GPU (Triton) kernel: interpret mode (or compiled, KVJAX_TEST_COMPILED=1 on a GPU) vs the
reference over the TPU kernel's sweep, vs the float64 oracle, and the CUDA lowering from CPU."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.score import score_landmarks_ref
from pallas_kernels.score_gpu import score_landmarks_gpu
from pk_cases import SCORE_KERNEL_CASES, assert_scores, kernel_interpret
from pk_oracle import make_score_inputs, score_oracle

TRITON = "__gpu$xla.gpu.triton"
# the TPU sweep without its TPU-only method column (the GPU kernel has one formulation)
CASES = [c[:-1] for i, c in enumerate(SCORE_KERNEL_CASES) if c[:-1] not in [e[:-1] for e in SCORE_KERNEL_CASES[:i]]]


@functools.lru_cache(maxsize=None)
def _jit_ref(**kw):
    return jax.jit(functools.partial(score_landmarks_ref, **kw))


@pytest.mark.compiled
@pytest.mark.parametrize("mode", ["eval", "serve"])
@pytest.mark.parametrize("case", CASES, ids=[f"B{c[0]}Hkv{c[1]}G{c[2]}D{c[3]}d{c[4]}T{c[5]}tb{c[8]}" for c in CASES])
def test_kernel_matches_reference(case, mode):
    B, Hkv, G, D, d, T, qdt, lengths, block = case
    rng = np.random.default_rng(hash((case[:6], block, mode, "gpu")) % 2**32)
    args = make_score_inputs(rng, B, Hkv, G, D, d, T, qdtype=qdt, lengths=lengths)
    got = score_landmarks_gpu(*args, mode=mode, block_tokens=block, interpret=kernel_interpret("gpu"))
    want = _jit_ref(mode=mode)(*args)
    assert got.dtype == want.dtype and got.shape == want.shape
    assert_scores(got, np.asarray(jnp.asarray(want, jnp.float32)), mode)


@pytest.mark.compiled
@pytest.mark.parametrize("mode", ["eval", "serve"])
def test_kernel_matches_oracle_small_blocks(mode):
    """Many 16-token blocks, a 64-point grid, one row shorter than a block, one empty row: vs the float64 oracle."""
    rng = np.random.default_rng(11)
    args = make_score_inputs(rng, 3, 2, 3, 64, 2, 130, n=64, lengths=[129, 9, 0])
    got = score_landmarks_gpu(*args, mode=mode, block_tokens=16, interpret=kernel_interpret("gpu"))
    assert_scores(got, score_oracle(*args, mode), mode)
    assert np.isneginf(np.asarray(got[2], np.float32)).all()


def test_input_validation():
    rng = np.random.default_rng(7)
    args = make_score_inputs(rng, 1, 2, 2, 64, 4, 40)
    for bad in (100, 8):
        with pytest.raises(ValueError, match=f"block_tokens={bad}"):
            score_landmarks_gpu(*args, block_tokens=bad, interpret=True)
    with pytest.raises(ValueError, match="mode"):
        score_landmarks_gpu(*args, mode="softmax", interpret=True)


LOWER_SHAPES = {
    "paper": (1, 8, 4, 128, 131072),     # Llama-3.1-8B: 8 KV heads, G=4, D=128, 131072 landmarks
    "smollm2": (2, 3, 3, 64, 8000),      # SmolLM2-135M: 3 KV heads, G=3, D=64, T not a power of two
}


@pytest.mark.parametrize("d", [4, 2])
@pytest.mark.parametrize("mode", ["eval", "serve"])
@pytest.mark.parametrize("shape", ["paper", "smollm2"])
def test_kernel_lowers_for_cuda(shape, mode, d):
    """The Triton lowering runs on CPU (jaxpr -> Triton IR) and emits one Triton custom call with the kernel."""
    B, Hkv, G, D, T = LOWER_SHAPES[shape]
    S = jax.ShapeDtypeStruct
    args = (S((B, Hkv * G, D), jnp.bfloat16), S((B, Hkv, T, D // d), jnp.uint8), S((B, Hkv, T), jnp.float32),
            S((256, d), jnp.float32), S((B,), jnp.int32))
    fn = functools.partial(score_landmarks_gpu, mode=mode, interpret=False)
    text = jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    assert text.count(TRITON) == 1 and "kvjax_score_landmarks" in text
    assert "tpu_custom_call" not in text
