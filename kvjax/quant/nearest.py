"""Nearest EDEN grid point of many ``d``-sub-vectors: brute force and an exact cell-candidate search.

Both compute ``argmax_j (2 <y, g_j> - ||g_j||^2)`` over the ``n`` grid points (first index wins ties) with the same
float32 expression, so they return the same indices.

* **Brute force** scores all ``n`` points per sub-vector (``n * d`` multiply-adds; ~210-260 ns per sub-vector at
  n = 256 on the 2-core CPU dev machine). It is the reference and the fallback.
* **Cell candidates** (the default when the grid is a concrete array with ``d`` in {1, 2, 4} and ``n >= 16``): the
  box ``[-R, R]^d`` is cut into ``N^d`` equal cells; for each cell a table lists, in increasing index order, every
  grid point that can be the nearest to *some* point of the cell — a point ``p`` is kept when its minimum squared
  distance to the cell is at most the smallest maximum squared distance of any grid point to the cell (computed in
  float64 with a small relative margin). The list is therefore complete, and scoring only those ``K`` candidates
  with the brute-force expression gives the brute-force index. A sub-vector outside the box has no cell: any block
  of sub-vectors containing one is scored by brute force instead (``lax.cond`` per block; HIGGS-normalised
  sub-vectors are ~N(0, 1) per coordinate, so with ``R`` = 6 (d <= 2) / 5 (d = 4) this is rare). Measured on the
  dev machine for 2M Gaussian sub-vectors: EDEN2-256 17 ns vs 214 ns (brute force) per sub-vector, EDEN4-256 90 vs 260 ns; it is what makes building the
  YAKV store (a 4-bit HIGGS code per pair of key/value values) take seconds instead of minutes.

The candidate tables are computed once per grid and cached in the process (numpy: 0.7 s for EDEN2-256, a 65536 x 4
uint8 table; 2.5 s for EDEN4-256, 1048576 x 19 = 20 MB).
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["CellTable", "cell_table", "nearest_brute", "nearest_cells", "nearest_grid_index"]

#: Sub-vectors scored per block (scratch ``block * n`` floats for brute force; the out-of-box fallback unit).
SEARCH_BLOCK = 16384
#: (half-width R of the box, cells per axis N) per grid dimension d; tables are N^d x K uint8.
_LATTICE = {1: (6.0, 1024), 2: (6.0, 256), 4: (5.0, 32)}
_MIN_POINTS = 16


class CellTable(NamedTuple):
    """Candidate lists of the cell search: ``cand`` uint8/int32 ``[N^d, K]`` (sorted, padded with the first)."""

    cand: np.ndarray
    radius: float
    cells: int


def _score(y, pts, gsq):
    """``2 <y, g> - ||g||^2`` with a fixed summation order: ``y [..., d]``, ``pts [..., d]`` broadcastable."""
    acc = y[..., 0] * pts[..., 0]
    for k in range(1, y.shape[-1]):
        acc = acc + y[..., k] * pts[..., k]
    return 2.0 * acc - gsq


def _brute_block(yb, grid, gsq):
    s = _score(yb[:, None, :], grid[None, :, :], gsq[None, :])  # [B, n]
    # first maximum: a max-reduce then the first equal position vectorises better on XLA:CPU than argmax's
    # variadic reduce (~2x measured); same index for finite scores (NaN input rows get index 0)
    return jnp.argmax(s == jnp.max(s, axis=-1, keepdims=True), axis=-1).astype(jnp.int32)


def _cells_np(grid: np.ndarray, radius: float, cells: int) -> np.ndarray:
    """Complete candidate lists (see module doc), int32 ``[cells^d, K]`` in increasing order."""
    g = np.asarray(grid, np.float64)
    n, d = g.shape
    h = 2.0 * radius / cells
    lo = -radius + h * np.arange(cells)
    mins, maxs = [], []
    for k in range(d):  # per axis: squared distance range of each point to each cell slab, [cells, n]
        a = lo[:, None] - g[None, :, k]
        b = a + h
        mins.append(np.where((a <= 0) & (b >= 0), 0.0, np.minimum(a * a, b * b)))
        maxs.append(np.maximum(a * a, b * b))
    # iterate the leading axes, vectorise the last two (or the only one)
    tail = min(d, 2)
    lead_shape = (cells,) * (d - tail)
    rows = []
    for lead in np.ndindex(*lead_shape) if lead_shape else [()]:
        mn = np.zeros((1,) * tail + (n,))
        mx = np.zeros((1,) * tail + (n,))
        for k, i in enumerate(lead):
            mn = mn + mins[k][i]
            mx = mx + maxs[k][i]
        for j in range(tail):
            shape = [1] * tail + [n]
            shape[j] = cells
            mn = mn + mins[d - tail + j].reshape(shape)
            mx = mx + maxs[d - tail + j].reshape(shape)
        thr = mx.min(axis=-1, keepdims=True)
        rows.append((mn <= thr * (1 + 1e-6) + 1e-9).reshape(-1, n))
    keep = np.concatenate(rows, axis=0)  # [cells^d, n], row-major over axes 0..d-1
    counts = keep.sum(axis=1)
    rows, cols = np.nonzero(keep)  # row-major: each row's kept indices in increasing order
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    out = np.repeat(cols[starts].astype(np.int32)[:, None], int(counts.max()), axis=1)  # padded with the first
    out[rows, np.arange(rows.size) - starts[rows]] = cols
    return out


@functools.lru_cache(maxsize=16)
def _cached_table(grid_bytes: bytes, shape: tuple, radius: float, cells: int) -> CellTable:
    grid = np.frombuffer(grid_bytes, np.float32).reshape(shape)
    cand = _cells_np(grid, radius, cells)
    cand = cand.astype(np.uint8) if shape[0] <= 256 else cand
    cand.setflags(write=False)
    # numpy, not a jax array: a jax array made while some jit is tracing could be a tracer and leak from the cache
    return CellTable(cand, radius, cells)


def cell_table(grid) -> CellTable | None:
    """The cell-candidate table of a concrete grid ``[n, d]``, or None when the cell search does not apply
    (traced grid, ``d`` not in {1, 2, 4}, fewer than 16 points, or points outside the box)."""
    if isinstance(grid, jax.core.Tracer):
        return None
    g = np.asarray(grid, np.float32)
    if g.ndim != 2 or g.shape[1] not in _LATTICE or g.shape[0] < _MIN_POINTS:
        return None
    radius, cells = _LATTICE[g.shape[1]]
    if not np.all(np.isfinite(g)) or np.abs(g).max() >= radius:
        return None
    return _cached_table(g.tobytes(), g.shape, radius, cells)


def _cell_block(yb, grid, gsq, table: CellTable):
    d = yb.shape[-1]
    h = 2.0 * table.radius / table.cells
    ij = jnp.clip(jnp.floor((yb + table.radius) / h).astype(jnp.int32), 0, table.cells - 1)
    cell = ij[:, 0]
    for k in range(1, d):
        cell = cell * table.cells + ij[:, k]
    cand = jnp.take(table.cand, cell, axis=0).astype(jnp.int32)  # [B, K]
    s = _score(yb[:, None, :], jnp.take(grid, cand, axis=0), jnp.take(gsq, cand))
    best = jnp.argmax(s, axis=-1)
    return jnp.take_along_axis(cand, best[:, None], axis=-1)[:, 0]


def _blocks(y, block: int):
    m = y.shape[0]
    nblk = max(1, -(-m // block))
    pad = nblk * block - m
    return jnp.pad(y, ((0, pad), (0, 0))).reshape(nblk, block, y.shape[1]), m


@functools.partial(jax.jit, static_argnums=2)
def nearest_brute(y, grid, block: int = SEARCH_BLOCK):
    """Brute-force nearest grid index: ``y [M, d]`` float32, ``grid [n, d]`` -> int32 ``[M]``."""
    gsq = jnp.sum(grid * grid, axis=-1)
    if y.shape[0] <= block:
        return _brute_block(y, grid, gsq)
    yp, m = _blocks(y, block)
    return jax.lax.map(lambda yb: _brute_block(yb, grid, gsq), yp).reshape(-1)[:m]


@functools.partial(jax.jit, static_argnames=("radius", "cells", "block"))
def _nearest_cells(y, grid, cand, *, radius: float, cells: int, block: int):
    table = CellTable(cand, radius, cells)
    gsq = jnp.sum(grid * grid, axis=-1)
    yp, m = _blocks(y, min(block, max(1, y.shape[0])))

    def one(yb):
        inside = jnp.all(jnp.abs(yb) < radius)  # NaN rows fail this too -> brute force, as the reference
        return jax.lax.cond(inside, lambda b: _cell_block(b, grid, gsq, table),
                            lambda b: _brute_block(b, grid, gsq), yb)

    return jax.lax.map(one, yp).reshape(-1)[:m]


def nearest_cells(y, grid, table: CellTable, block: int = SEARCH_BLOCK):
    """Cell-candidate nearest grid index (same result as :func:`nearest_brute`): ``y [M, d]`` -> int32 ``[M]``."""
    return _nearest_cells(y, grid, table.cand, radius=float(table.radius), cells=int(table.cells), block=int(block))


def nearest_grid_index(y, grid, *, block: int = SEARCH_BLOCK):
    """Nearest grid point of each sub-vector: ``y [M, d]``, ``grid [n, d]`` -> int32 ``[M]``.

    ``argmax_j (2 <y, g_j> - ||g_j||^2)`` in float32, first index wins ties; the cell search when
    :func:`cell_table` applies to ``grid``, brute force otherwise (identical results). Memory-bounded: ``block``
    sub-vectors at a time.
    """
    table = cell_table(grid)
    y = jnp.asarray(y, jnp.float32)
    g = jnp.asarray(grid, jnp.float32)
    if table is None:
        return nearest_brute(y, g, int(block))
    return nearest_cells(y, g, table, int(block))
