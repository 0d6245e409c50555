"""The exact cell-candidate nearest-point search against brute force and a float64 numpy oracle."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kvjax.quant import load_grid
from kvjax.quant import nearest as N


def _hard_points(d, radius, rng, m=20000):
    """Gaussian rows, heavy tails, rows exactly on cell edges, and rows halfway between two grid points."""
    y = rng.standard_normal((m, d)).astype(np.float32)
    y[: m // 10] = rng.standard_t(3, size=(m // 10, d)).astype(np.float32)  # some beyond the box
    _, cells = N._LATTICE[d]
    h = 2 * radius / cells
    edges = (-radius + h * rng.integers(0, cells + 1, size=(m // 10, d))).astype(np.float32)
    y[m // 10: m // 5] = np.clip(edges, -radius, radius)  # on edges, including exactly +-R
    return y


@pytest.mark.parametrize("d,n", [(2, 256), (4, 256), (2, 64), (4, 16), (2, 16)])
def test_cells_equal_brute_force_exactly(d, n):
    grid = load_grid(d, n)
    table = N.cell_table(grid)
    assert table is not None
    rng = np.random.default_rng(d * 100 + n)
    y = _hard_points(d, table.radius, rng)
    # midpoints of pairs of grid points are exact ties between them: first index must win in both searches
    a, b = rng.integers(0, n, size=(2, 500))
    y[-500:] = 0.5 * (grid[a] + grid[b])
    brute = np.asarray(N.nearest_brute(jnp.asarray(y), jnp.asarray(grid), 1024))
    cells = np.asarray(N.nearest_cells(jnp.asarray(y), jnp.asarray(grid), table, block=1024))
    np.testing.assert_array_equal(cells, brute)
    # and both are the float64 nearest point up to float32 near-ties
    dist = ((y[:, None, :].astype(np.float64) - grid[None].astype(np.float64)) ** 2).sum(-1)
    gap = dist[np.arange(len(y)), cells] - dist.min(-1)
    assert np.all(gap < 1e-5), gap.max()


@pytest.mark.parametrize("d,n", [(2, 256), (4, 256)])
def test_every_cell_list_contains_the_nearest_point_of_its_cell(d, n):
    """The property the search relies on, checked directly: for random points inside random cells, the float64
    nearest grid point is in that cell's candidate list."""
    grid = load_grid(d, n).astype(np.float64)
    table = N.cell_table(grid.astype(np.float32))
    cand = np.asarray(table.cand)
    h = 2 * table.radius / table.cells
    rng = np.random.default_rng(7)
    # cells near the grid (where lists are short and boundaries dense) and anywhere in the box
    ij = np.concatenate([rng.integers(table.cells // 2 - 8, table.cells // 2 + 8, size=(3000, d)),
                         rng.integers(0, table.cells, size=(3000, d))])
    pts = -table.radius + h * (ij + rng.uniform(0, 1, size=ij.shape))
    cell = np.ravel_multi_index(tuple(ij.T), (table.cells,) * d)
    nearest = ((pts[:, None, :] - grid[None]) ** 2).sum(-1).argmin(-1)
    assert np.all((cand[cell] == nearest[:, None]).any(-1))
    # lists are sorted (first index wins ties) and short compared with n
    increasing = np.diff(cand.astype(np.int32), axis=1) > 0
    padding = cand[:, 1:] == cand[:, :1]
    assert np.all(increasing | padding)
    assert cand.shape[1] < n // 8


def test_traced_grid_and_small_grids_use_brute_force_with_the_same_result():
    grid = load_grid(2, 256)
    y = jnp.asarray(np.random.default_rng(1).standard_normal((5000, 2)), jnp.float32)
    concrete = np.asarray(N.nearest_grid_index(y, grid))
    traced = np.asarray(jax.jit(lambda a, g: N.nearest_grid_index(a, g))(y, jnp.asarray(grid)))
    np.testing.assert_array_equal(traced, concrete)
    assert N.cell_table(np.array([[0.0, 1.0], [1.0, 0.0]], np.float32)) is None  # 2 points: brute force
    assert N.cell_table(np.full((16, 2), 9.0, np.float32)) is None  # points outside the box
    assert N.cell_table(np.zeros((16, 3), np.float32)) is None  # d = 3: no table


def test_outlier_blocks_fall_back_to_brute_force():
    grid = load_grid(2, 256)
    table = N.cell_table(grid)
    y = np.random.default_rng(2).standard_normal((4096, 2)).astype(np.float32)
    y[5] = [40.0, -3.0]  # far outside the box: a clipped cell lookup would be wrong here
    y[3000] = [np.float32(table.radius), 0.0]  # on the box edge: also handled by brute force
    got = np.asarray(N.nearest_cells(jnp.asarray(y), jnp.asarray(grid), table, block=512))
    want = ((y[:, None, :].astype(np.float64) - grid[None]) ** 2).sum(-1).argmin(-1)
    np.testing.assert_array_equal(got[[5, 3000]], want[[5, 3000]])
