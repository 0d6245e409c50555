"""The offloaded decode step with the Pallas kernels switched on (interpret mode) gives the reference's tokens."""
import jax.numpy as jnp
import numpy as np
from flax import nnx

from kvjax import Engine, GenerationConfig, make_policy
from models import LoadedModel, ModelConfig, Transformer
from pallas_kernels import dispatch


def test_yakv_tokens_with_kernels_equal_reference():
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
    orig_score, orig_attn = dispatch.score_landmarks, dispatch.decode_attention

    def spy(fn, name):
        def wrapped(*a, **kw):
            calls.append((name, dispatch.resolve_backend(kw.get("use_kernels"), kw.get("interpret", False))))
            return fn(*a, **kw)
        return wrapped

    dispatch.score_landmarks = spy(orig_score, "score")
    dispatch.decode_attention = spy(orig_attn, "attention")
    try:
        with dispatch.kernels_override("interpret"):
            out = [g.ids for g in Engine(lm, policy=pol).generate(ids, gen)]
    finally:
        dispatch.score_landmarks, dispatch.decode_attention = orig_score, orig_attn
    assert {"score", "attention"} <= {n for n, b in calls if b == "interpret"}  # both kernels really ran
    assert out == ref
