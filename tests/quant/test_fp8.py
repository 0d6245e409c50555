"""FP8 e4m3 store: saturation instead of NaN, exact round trip, round-to-nearest against an enumerated table."""
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from kvjax.quant import fp8_decode, fp8_decode_bits, fp8_encode, fp8_encode_bits, fp8_overflow_count


def all_finite_e4m3():
    """Every finite float8_e4m3fn value, from the 256 bit patterns (independent of the code under test)."""
    v = np.arange(256, dtype=np.uint8).view(ml_dtypes.float8_e4m3fn).astype(np.float32)
    return np.unique(v[np.isfinite(v)])


def test_table_max_is_448():
    assert all_finite_e4m3().max() == 448.0


def test_saturates_instead_of_nan():
    x = jnp.array([1e6, -1e6, 480.0, -480.0, 500.0, 449.0, np.inf, -np.inf], jnp.float32)
    q = fp8_encode(x)
    assert q.dtype == jnp.float8_e4m3fn
    out = np.asarray(fp8_decode(q, jnp.float32))
    np.testing.assert_array_equal(out, [448, -448, 448, -448, 448, 448, 448, -448])
    assert not np.isnan(out).any()
    # the same under jit and from bf16 / fp16 inputs
    out_j = np.asarray(jax.jit(lambda a: fp8_decode(fp8_encode(a), jnp.float32))(x))
    np.testing.assert_array_equal(out_j, out)
    for dt in (jnp.bfloat16, jnp.float16):
        xx = jnp.array([1e4, -1e4, 448.0], dt)
        np.testing.assert_array_equal(np.asarray(fp8_decode(fp8_encode(xx), jnp.float32)), [448, -448, 448])


def test_plain_cast_overflow_is_nan_as_documented():
    # what fp8_encode protects against: a plain cast of a large value gives NaN (ml_dtypes, like torch)
    plain = jnp.array([1e6, 480.0], jnp.float32).astype(jnp.float8_e4m3fn).astype(jnp.float32)
    assert np.isnan(np.asarray(plain)).all()


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
def test_representable_values_round_trip_exactly(dtype):
    table = all_finite_e4m3()
    x = jnp.asarray(table, dtype)
    back = np.asarray(fp8_decode(fp8_encode(x), jnp.float32))
    np.testing.assert_array_equal(back, table)
    assert fp8_decode(fp8_encode(x)).dtype == jnp.bfloat16


def test_in_range_values_round_to_nearest_representable():
    table = all_finite_e4m3().astype(np.float64)
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.uniform(-448, 448, 5000), rng.standard_normal(5000) * 0.05]).astype(np.float32)
    got = np.asarray(fp8_decode(fp8_encode(x), jnp.float32)).astype(np.float64)
    dist = np.abs(x[:, None].astype(np.float64) - table[None, :])
    best = dist.min(axis=1)
    np.testing.assert_allclose(np.abs(got - x), best, rtol=0, atol=1e-12)


def test_nan_input_stays_nan_and_decode_checks_dtype():
    assert np.isnan(np.asarray(fp8_decode(fp8_encode(jnp.array([np.nan])), jnp.float32))).all()
    with pytest.raises(ValueError, match="float8_e4m3fn"):
        fp8_decode(jnp.zeros(3, jnp.float32))


def test_overflow_count():
    x = jnp.array([1.0, 448.0, 448.5, -1e6, np.inf, np.nan, -447.0])
    assert int(fp8_overflow_count(x)) == 3


def test_bit_pattern_store_round_trips_like_the_fp8_array():
    x = jnp.asarray(np.random.default_rng(5).standard_normal((3, 257)) * 300, jnp.float32)
    bits = fp8_encode_bits(x)
    assert bits.dtype == jnp.uint8 and bits.shape == x.shape
    # same bytes as the float8 array, and the same decoded values (ml_dtypes view as the independent reference)
    want = np.asarray(fp8_encode(x)).view(np.uint8)
    np.testing.assert_array_equal(np.asarray(bits), want)
    np.testing.assert_array_equal(np.asarray(fp8_decode_bits(bits, jnp.float32)),
                                  want.view(ml_dtypes.float8_e4m3fn).astype(np.float32))
    with pytest.raises(ValueError, match="uint8"):
        fp8_decode_bits(x)
