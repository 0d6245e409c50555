"""Packaged EDEN grids, both sets ("paper": the authors', "kvjax": our seeded CLVQ ones): presence, loading errors,
quality against the spec's numbers, and our grids' MSE against the paper's."""
import functools

import numpy as np
import pytest

from kvjax.quant import available_grids, generate_eden_grid, load_grid

# spec §4.4: MSE per dimension of the authors' (paper) grids on N(0,1) samples
PAPER_MSE = {(2, 16): 0.1075, (2, 64): 0.02963, (2, 256): 0.00774, (4, 16): 0.3437, (4, 256): 0.09655}
REQUIRED = sorted(PAPER_MSE)


@functools.lru_cache(maxsize=None)
def _samples(d, samples, seed):
    return np.random.default_rng(seed).standard_normal((samples, d))


def gaussian_mse_per_dim(grid, samples=400_000, seed=2024):
    """Independent oracle: brute-force nearest point (float64 squared distances) on N(0, I_d) samples."""
    grid = np.asarray(grid, np.float64)
    x = _samples(grid.shape[1], samples, seed)
    total = 0.0
    for start in range(0, samples, 50_000):
        xb = x[start:start + 50_000]
        dist = (xb ** 2).sum(-1)[:, None] - 2 * xb @ grid.T + (grid ** 2).sum(-1)[None, :]
        total += float(np.maximum(dist.min(axis=1), 0).sum())
    return total / (samples * grid.shape[1])


@functools.lru_cache(maxsize=None)
def grid_mse(d, n, source):
    return gaussian_mse_per_dim(load_grid(d, n, source))


@pytest.mark.parametrize("source", ["paper", "kvjax"])
def test_required_grids_are_packaged(source):
    avail = set(available_grids(source))
    for d, n in REQUIRED:
        assert (d, n) in avail
        g = load_grid(d, n, source)
        assert g.shape == (n, d) and g.dtype == np.float32 and np.isfinite(g).all()
        assert len(np.unique(g, axis=0)) == n  # no collapsed points


def test_grid_sets_differ_and_paper_is_the_default():
    for d, n in REQUIRED:
        assert not np.array_equal(load_grid(d, n, "paper"), load_grid(d, n, "kvjax"))
        np.testing.assert_array_equal(load_grid(d, n), load_grid(d, n, "paper"))


def test_missing_grid_error_lists_available():
    with pytest.raises(FileNotFoundError) as exc:
        load_grid(3, 999)
    msg = str(exc.value)
    assert "d=3, n=999" in msg and "EDEN4-256" in msg and "EDEN2-256" in msg and "'paper'" in msg
    with pytest.raises(ValueError, match="source="):
        available_grids("authors")


@pytest.mark.parametrize("source", ["paper", "kvjax"])
@pytest.mark.parametrize("d,n", REQUIRED)
def test_grid_mse_within_one_percent_of_spec_numbers(d, n, source):
    mse = grid_mse(d, n, source)
    assert abs(mse / PAPER_MSE[(d, n)] - 1) < 0.01, (d, n, source, mse, PAPER_MSE[(d, n)])


@pytest.mark.parametrize("d,n", REQUIRED)
def test_our_grids_mse_within_one_percent_of_the_paper_grids(d, n):
    # same samples for both grids, so sampling noise mostly cancels in the ratio
    ours, paper = grid_mse(d, n, "kvjax"), grid_mse(d, n, "paper")
    assert 0.99 * paper <= ours <= 1.01 * paper, (d, n, ours, paper)


def test_generation_is_seeded_and_converges():
    a = generate_eden_grid(2, 16, seed=3, steps=30, samples=20_000)
    b = generate_eden_grid(2, 16, seed=3, steps=30, samples=20_000)
    c = generate_eden_grid(2, 16, seed=4, steps=30, samples=20_000)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    assert a.shape == (16, 2) and a.dtype == np.float32
    # even a tiny run lands close to the paper's EDEN2-16 quality, far below a random codebook
    assert gaussian_mse_per_dim(a, samples=100_000) < 1.05 * PAPER_MSE[(2, 16)]
    rand = np.random.default_rng(0).standard_normal((16, 2))
    assert gaussian_mse_per_dim(rand, samples=100_000) > 1.2 * PAPER_MSE[(2, 16)]


def test_generation_argument_errors():
    with pytest.raises(ValueError, match="n"):
        generate_eden_grid(2, 1)
    with pytest.raises(ValueError, match="samples"):
        generate_eden_grid(2, 256, samples=100)
