"""The offloaded decode step with the GPU (Triton) kernels in interpret mode gives the reference's tokens, and
kvjax.attention.attend_segments equals attend_rows over the concatenation."""
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from kvjax import Engine, GenerationConfig, make_policy
from kvjax.attention import attend_rows, attend_segments
from models import LoadedModel, ModelConfig, Transformer
from pallas_kernels import dispatch


@pytest.mark.slow
def test_yakv_tokens_with_gpu_kernels_equal_reference():
    cfg = ModelConfig(family="llama", vocab_size=97, hidden_size=128, intermediate_size=128, num_layers=2,
                      num_heads=4, num_kv_heads=2, head_dim=64, max_position_embeddings=1024)
    lm = LoadedModel(cfg, Transformer(cfg, dtype=jnp.float32, rngs=nnx.Rngs(3)), None)
    ids = np.random.default_rng(0).integers(0, 97, size=(2, 300)).tolist()
    ids[1] = ids[1][:211]
    gen = GenerationConfig(max_new_tokens=6, stop_ids=())
    pol = make_policy("yakv", local_budget=16, sparse_budget=1 / 8)
    with dispatch.kernels_override("reference"):
        ref = [g.ids for g in Engine(lm, policy=pol).generate(ids, gen)]
    calls = []
    orig = {name: getattr(dispatch, name) for name in ("score_landmarks", "decode_attention")}

    def spy(name):
        def wrapped(*a, **kw):
            calls.append((name, dispatch.resolve_backend(kw.get("use_kernels"), kw.get("interpret", False))))
            return orig[name](*a, **kw)
        return wrapped

    try:
        for name in orig:
            setattr(dispatch, name, spy(name))
        with dispatch.kernels_override("interpret_gpu"):
            out = [g.ids for g in Engine(lm, policy=pol).generate(ids, gen)]
    finally:
        for name, fn in orig.items():
            setattr(dispatch, name, fn)
    assert {n for n, b in calls if b == "interpret_gpu"} == set(orig)     # both GPU kernels really ran
    assert out == ref


def test_attend_segments_equals_attend_rows():
    rng = np.random.default_rng(0)
    B, Hkv, G, D = 2, 2, 2, 32
    q = jnp.asarray(rng.standard_normal((B, Hkv * G, D)), jnp.float32)
    sizes = (24, 70, 9)
    ks = [jnp.asarray(rng.standard_normal((B, Hkv, n, D)), jnp.float32) for n in sizes]
    vs = [jnp.asarray(rng.standard_normal((B, Hkv, n, D)), jnp.float32) for n in sizes]
    valid = [jnp.asarray(rng.random((B, 1, sizes[0])) < 0.5), None, jnp.asarray(rng.random((B, Hkv, sizes[2])) < 0.5)]
    full = [m if m is not None else jnp.ones((B, 1, n), bool) for m, n in zip(valid, sizes)]
    want = attend_rows(q, jnp.concatenate(ks, 2), jnp.concatenate(vs, 2),
                       jnp.concatenate([jnp.broadcast_to(m, (B, Hkv, m.shape[2])) for m in full], 2))
    for uk in ("auto", "interpret_gpu"):
        with dispatch.kernels_override(uk):
            got = attend_segments(q, list(zip(ks, vs, valid)))
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=2e-5, atol=2e-5, err_msg=uk)
