"""kvjax.attention.attend_segments equals attend_rows over the concatenation (the decode step with the GPU kernels
in interpret mode is tests/policies/test_kernels_in_step.py)."""
import jax.numpy as jnp
import numpy as np

from kvjax.attention import attend_rows, attend_segments
from pallas_kernels import dispatch


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
