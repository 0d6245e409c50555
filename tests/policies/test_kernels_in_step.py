"""The offloaded decode step with the Pallas kernels switched on (interpret mode: the TPU kernels, and the GPU
Triton kernels) gives the reference's tokens."""
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from kvjax import Engine, GenerationConfig, make_policy
from models import LoadedModel, ModelConfig, Transformer
from pallas_kernels import dispatch


@pytest.mark.parametrize("mode", ["interpret", pytest.param("interpret_gpu", marks=pytest.mark.slow)])
def test_yakv_tokens_with_kernels_equal_reference(mode):
    cfg = ModelConfig(family="llama", vocab_size=97, hidden_size=128, intermediate_size=128, num_layers=2,
                      num_heads=4, num_kv_heads=2, head_dim=64, max_position_embeddings=1024)
    lm = LoadedModel(cfg, Transformer(cfg, dtype=jnp.float32, rngs=nnx.Rngs(3)), None)
    ids = np.random.default_rng(0).integers(0, 97, size=(2, 300)).tolist()
    ids[1] = ids[1][:211]
    gen = GenerationConfig(max_new_tokens=6, stop_ids=())
    pol = make_policy("yakv", local_budget=16, sparse_budget=1 / 8, min_seqlen_to_prune=0)
    with dispatch.kernels_override("reference"):
        ref = [g.ids for g in Engine(lm, policy=pol).generate(ids, gen)]
    calls = []
    orig = {name: getattr(dispatch, name) for name in ("score_landmarks", "decode_attention_segments")}

    def spy(name):
        def wrapped(*a, **kw):
            calls.append((name, dispatch.resolve_backend(kw.get("use_kernels"), kw.get("interpret", False))))
            return orig[name](*a, **kw)
        return wrapped

    try:
        for name in orig:
            setattr(dispatch, name, spy(name))
        with dispatch.kernels_override(mode):
            out = [g.ids for g in Engine(lm, policy=pol).generate(ids, gen)]
    finally:
        for name, fn in orig.items():
            setattr(dispatch, name, fn)
    assert {n for n, b in calls if b == mode} == set(orig)  # both kernels really ran
    assert out == ref
