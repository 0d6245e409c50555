"""Top-k / top-p filtering against a numpy oracle."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kvjax.sampling import filter_logits, sample


def oracle(logits, t, k, p):
    l = logits / t
    out = np.full_like(l, -np.inf)
    for b in range(l.shape[0]):
        order = np.argsort(-l[b], kind="stable")
        keep = order[: (k if k > 0 else len(order))]
        probs = np.exp(l[b, keep] - l[b, keep].max())
        probs /= probs.sum()
        cum = np.cumsum(probs) - probs
        keep = keep[cum < p]
        out[b, keep] = l[b, keep]
    return out


@pytest.mark.parametrize("t,k,p", [(1.0, 0, 1.0), (0.7, 5, 1.0), (1.0, 0, 0.6), (1.3, 10, 0.8), (1.0, 1, 1.0)])
def test_filter_matches_oracle(t, k, p):
    logits = np.random.default_rng(0).normal(size=(3, 50)).astype(np.float32) * 3
    got = np.asarray(filter_logits(jnp.asarray(logits), jnp.float32(t), jnp.int32(k), jnp.float32(p)))
    want = oracle(logits, t, k, p)
    assert np.array_equal(np.isfinite(got), np.isfinite(want))
    np.testing.assert_allclose(got[np.isfinite(got)], want[np.isfinite(want)], rtol=1e-6)


def test_samples_stay_in_the_nucleus_and_greedy_at_zero_temperature():
    logits = jnp.asarray(np.random.default_rng(1).normal(size=(4, 30)).astype(np.float32) * 2)
    allowed = np.isfinite(np.asarray(filter_logits(logits, jnp.float32(1.0), jnp.int32(4), jnp.float32(0.9))))
    draw = jax.jit(sample)
    for i in range(50):
        s = np.asarray(draw(logits, jax.random.key(i), jnp.float32(1.0), jnp.int32(4), jnp.float32(0.9)))
        assert all(allowed[b, s[b]] for b in range(4))
    g = draw(logits, jax.random.key(0), jnp.float32(0.0), jnp.int32(0), jnp.float32(1.0))
    assert np.array_equal(np.asarray(g), np.asarray(logits).argmax(-1))
