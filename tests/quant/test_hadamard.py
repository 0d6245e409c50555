"""Walsh–Hadamard transform: against an independent dense Sylvester oracle (Kronecker recursion)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kvjax.quant import hadamard_matrix, hadamard_transform

GROUPS = [2 ** k for k in range(1, 11)]  # 2 .. 1024


def sylvester(g):
    """Oracle: H_1 = [1], H_2k = [[H, H], [H, -H]] (float64)."""
    h = np.ones((1, 1))
    while h.shape[0] < g:
        h = np.block([[h, h], [h, -h]])
    return h


@pytest.mark.parametrize("g", GROUPS)
def test_dense_matrix_is_sylvester_and_squares_to_g_identity(g):
    h = hadamard_matrix(g)
    assert h.dtype == np.float32 and h.shape == (g, g)
    np.testing.assert_array_equal(h, sylvester(g))
    np.testing.assert_array_equal(h.astype(np.float64) @ h, g * np.eye(g))


def test_dense_matrix_matches_scipy():
    scipy_linalg = pytest.importorskip("scipy.linalg")
    for g in (2, 16, 256):
        np.testing.assert_array_equal(hadamard_matrix(g), scipy_linalg.hadamard(g))


@pytest.mark.parametrize("g", GROUPS)
def test_fast_transform_equals_dense_product_per_group(g):
    rng = np.random.default_rng(g)
    # small integers: every partial sum is exact in float32, so the comparison can be exact
    x = rng.integers(-8, 9, size=(3, 2, 3 * g)).astype(np.float32)
    y = np.asarray(hadamard_transform(jnp.asarray(x), g))
    h = sylvester(g)
    ref = np.einsum("ij,...kj->...ki", h, x.astype(np.float64).reshape(3, 2, 3, g)).reshape(x.shape)
    np.testing.assert_array_equal(y, ref)


@pytest.mark.parametrize("g", GROUPS)
def test_applying_twice_gives_g_identity(g):
    eye = jnp.eye(g, dtype=jnp.float32)
    h = hadamard_transform(eye, g)  # rows of H (H is symmetric)
    hh = hadamard_transform(h, g)
    np.testing.assert_array_equal(np.asarray(hh), g * np.eye(g))
    inv = hadamard_transform(h, g, scale=1.0 / g)
    np.testing.assert_array_equal(np.asarray(inv), np.eye(g))


def test_default_group_is_whole_axis_and_jit_and_dtype():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((5, 64)).astype(np.float32)
    y = jax.jit(hadamard_transform)(x)
    np.testing.assert_allclose(np.asarray(y), x @ sylvester(64).T, rtol=1e-5, atol=1e-4)
    yb = hadamard_transform(jnp.asarray(x, jnp.bfloat16), 16)
    assert yb.dtype == jnp.bfloat16
    yi = hadamard_transform(jnp.arange(8, dtype=jnp.int32))
    assert yi.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(yi), sylvester(8) @ np.arange(8))


@pytest.mark.parametrize("bad", [3, 0, -4, 12, 2.5])
def test_non_power_of_two_group_rejected(bad):
    with pytest.raises(ValueError, match="power of two"):
        hadamard_transform(jnp.zeros((2, 48)), bad)
    with pytest.raises(ValueError, match="power of two"):
        hadamard_matrix(bad)


def test_group_must_divide_axis():
    with pytest.raises(ValueError, match="divide the last axis"):
        hadamard_transform(jnp.zeros((2, 48)), 32)
    with pytest.raises(ValueError, match="power of two"):
        hadamard_transform(jnp.zeros((2, 48)))  # whole axis of 48 is not a power of two
