"""EDEN vector-quantization grids for HIGGS: the paper's grids, our seeded ones (CLVQ), and their loading.

A grid ``EDEN{d}-{n}`` is a codebook of ``n`` points in ``R^d`` that approximates the MSE-optimal vector
quantizer of the standard Gaussian ``N(0, I_d)`` (HIGGS, algorithms.md §4.4). Two sets are packaged, chosen by
``source`` (:data:`GRID_SOURCES`):

* ``"paper"`` (the default): the authors' own grids (``shadowkv_models/quantization/higgs_grids/*.pt`` of
  yandex-research/context-intensive-kv-offloading, Apache-2.0, see ``NOTICE``), converted to ``.npy`` with their
  values and point order unchanged, so codes computed against them are the authors' codes. The authors trained
  them with an *unseeded* stochastic Lloyd / competitive-learning VQ (CLVQ) run of 600 steps x 1e7 samples, so
  they cannot be regenerated bit for bit. Every grid of theirs with ``n <= 256`` (uint8 indices) is shipped:
  EDEN2-16, 2-64, 2-256, 4-16, 4-256, 8-16, 8-128, 8-256, 16-256.
* ``"kvjax"``: our own grids, produced by :func:`generate_eden_grid` with a fixed seed and a much smaller budget
  (default 150 steps x 200k samples per step); ``scripts/make_grids.py`` regenerates them. Same quantization
  quality as the paper's (MSE per dimension within 1%, ``tests/quant/test_grids.py``) but different points, so
  the codes, and the selections built on them, differ from the authors'. EDEN2-16, 2-64, 2-256, 4-16, 4-256.

Files: ``kvjax/quant/grids/{source}/EDEN{d}-{n}.npy``, float32, row-major ``[n, d]``.
"""
from __future__ import annotations

import importlib.resources
import math
import re
from collections.abc import Callable, Iterable

import numpy as np

__all__ = [
    "GRID_DIR_PACKAGE",
    "GRID_SOURCES",
    "DEFAULT_GRID_SOURCE",
    "available_grids",
    "check_source",
    "generate_eden_grid",
    "grid_filename",
    "load_grid",
    "nearest_grid_index_np",
    "quantization_mse",
]

GRID_DIR_PACKAGE = "kvjax.quant"  # package that holds the ``grids/`` data folder
_GRID_SUBDIR = "grids"
#: grid sets: "paper" = the authors' EDEN grids, "kvjax" = our seeded CLVQ grids (folders of ``grids/``)
GRID_SOURCES = ("paper", "kvjax")
DEFAULT_GRID_SOURCE = "paper"
_NAME_RE = re.compile(r"^EDEN(\d+)-(\d+)\.npy$")


def grid_filename(d: int, n: int) -> str:
    """File name of grid EDEN{d}-{n}, e.g. ``grid_filename(4, 256) == "EDEN4-256.npy"``."""
    return f"EDEN{int(d)}-{int(n)}.npy"


def check_source(source: str, *, name: str = "source") -> str:
    """Validate a grid set name (one of :data:`GRID_SOURCES`); returns it, raises ``ValueError`` naming ``name``."""
    if source not in GRID_SOURCES:
        raise ValueError(f"{name}={source!r} must be one of {GRID_SOURCES} (\"paper\": the authors' EDEN grids, "
                         f"\"kvjax\": kvjax's seeded CLVQ grids)")
    return source


def _grid_dir(source: str):
    return importlib.resources.files(GRID_DIR_PACKAGE).joinpath(_GRID_SUBDIR, check_source(source))


def available_grids(source: str = DEFAULT_GRID_SOURCE) -> list[tuple[int, int]]:
    """The ``(d, n)`` pairs of the grids packaged in set ``source`` ("paper" or "kvjax"), sorted."""
    found = []
    root = _grid_dir(source)
    if not root.is_dir():
        return []
    for entry in root.iterdir():
        m = _NAME_RE.match(entry.name)
        if m:
            found.append((int(m.group(1)), int(m.group(2))))
    return sorted(found)


def load_grid(d: int, n: int, source: str = DEFAULT_GRID_SOURCE) -> np.ndarray:
    """Load the packaged EDEN grid with ``n`` points in dimension ``d`` from set ``source``.

    ``source``: ``"paper"`` (default; the authors' grids, so HIGGS codes equal the authors') or ``"kvjax"`` (our
    seeded CLVQ grids), see the module docstring. Returns a float32 numpy array of shape ``[n, d]``. Raises
    ``ValueError`` for an unknown ``source`` or a file of the wrong shape, and ``FileNotFoundError`` listing the
    ``(d, n)`` pairs of that set when it has no such grid.
    """
    d, n = int(d), int(n)
    ref = _grid_dir(source).joinpath(grid_filename(d, n))
    if not ref.is_file():
        avail = ", ".join(f"EDEN{a}-{b} (d={a}, n={b})" for a, b in available_grids(source)) or "none"
        hint = f" Generate more with scripts/make_grids.py --grids {d}-{n}." if source == "kvjax" else ""
        raise FileNotFoundError(
            f"no packaged EDEN grid for d={d}, n={n} in grid set {source!r} (file {grid_filename(d, n)} in "
            f"kvjax/quant/grids/{source}); available grids: {avail}.{hint}"
        )
    with ref.open("rb") as fh:
        grid = np.load(fh, allow_pickle=False)
    if grid.shape != (n, d):
        raise ValueError(f"grid file {source}/{grid_filename(d, n)} has shape {grid.shape}, expected [n, d] = "
                         f"[{n}, {d}]")
    return np.ascontiguousarray(grid, dtype=np.float32)


def nearest_grid_index_np(x: np.ndarray, grid: np.ndarray, *, block: int = 65536) -> np.ndarray:
    """Index of the nearest grid point (Euclidean) for each row of ``x``, in numpy.

    ``x``: ``[M, d]``, ``grid``: ``[n, d]``. Returns int64 ``[M]`` with
    ``argmax_j (2 <x, g_j> - ||g_j||^2)`` (first index wins ties). Rows are processed in blocks of ``block``
    so memory stays at ``block * n`` floats.
    """
    x = np.asarray(x)
    grid = np.asarray(grid, dtype=x.dtype if x.dtype in (np.float32, np.float64) else np.float64)
    gsq = np.sum(grid * grid, axis=1)
    out = np.empty(x.shape[0], dtype=np.int64)
    for start in range(0, x.shape[0], block):
        xb = x[start:start + block]
        score = 2.0 * (xb @ grid.T) - gsq
        out[start:start + block] = np.argmax(score, axis=1)
    return out


def quantization_mse(grid: np.ndarray, *, samples: int = 400_000, seed: int = 0) -> float:
    """Mean squared error per dimension of nearest-point quantization of ``N(0, I_d)`` with ``grid`` [n, d].

    Uses ``samples`` float64 Gaussian vectors drawn with ``numpy.random.default_rng(seed)``.
    """
    grid = np.asarray(grid, dtype=np.float64)
    d = grid.shape[1]
    x = np.random.default_rng(seed).standard_normal((samples, d))
    idx = nearest_grid_index_np(x, grid)
    return float(np.mean((x - grid[idx]) ** 2))


def generate_eden_grid(
    d: int,
    n: int,
    *,
    seed: int = 0,
    steps: int = 150,
    samples: int = 200_000,
    gamma0: float = 2.0,
    restarts: int = 1,
    progress: Callable[[Iterable[int]], Iterable[int]] | None = None,
) -> np.ndarray:
    """Train an EDEN grid: ``n`` points approximating the MSE-optimal quantizer of ``N(0, I_d)``.

    Seeded competitive-learning VQ (stochastic Lloyd), the authors' algorithm (algorithms.md §4.4) with a
    fixed seed and a smaller budget:

    * ``A = 4 n^(1/d)``, ``B = pi^2 n^(-2/d)``; the grid starts as ``n`` i.i.d. ``N(0, I_d)`` points.
    * each step draws ``samples`` fresh Gaussian vectors, assigns each to its nearest grid point, computes the
      centre of mass ``com_j`` of every cell (an empty cell keeps its point), and moves
      ``grid += gamma_t (com - grid)`` with ``gamma_t = gamma0 A / (A + gamma0 B t)``.
    * the result is the centres of mass of the last step (as in the authors' code), float32 ``[n, d]``.

    ``restarts > 1`` (our addition) runs that many independent chains and keeps the one with the lowest MSE on a
    separate seeded Gaussian sample of ``samples`` vectors. Small codebooks (n <= 64) have local optima — e.g. for
    EDEN2-16 some seeds settle on a ring layout ~1.5% worse than the paper's — and a few restarts avoid them.
    Chain 0 is exactly the ``restarts=1`` run, so restarts never make the selection-set MSE worse.

    All randomness comes from ``numpy.random.default_rng`` (chain 0: ``seed``; chain r: ``[seed, r]``), so the
    output is reproducible on one platform. ``progress`` optionally wraps each chain's step iterator (e.g.
    ``tqdm.tqdm``).
    """
    d, n, steps, samples, restarts = int(d), int(n), int(steps), int(samples), int(restarts)
    if d < 1:
        raise ValueError(f"d (grid dimension) must be >= 1, got {d}")
    if n < 2:
        raise ValueError(f"n (number of grid points) must be >= 2, got {n}")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if samples < n:
        raise ValueError(f"samples per step must be >= n={n} so every cell can be filled, got {samples}")
    if restarts < 1:
        raise ValueError(f"restarts must be >= 1, got {restarts}")
    chains = [
        _clvq_chain(np.random.default_rng(seed if r == 0 else [seed, r]), d, n, steps, samples, gamma0, progress)
        for r in range(restarts)
    ]
    if restarts == 1:
        return chains[0]
    held_out = np.random.default_rng([seed, 2**31 - 1]).standard_normal((samples, d))
    errs = [np.mean((held_out - g.astype(np.float64)[nearest_grid_index_np(held_out, g)]) ** 2) for g in chains]
    return chains[int(np.argmin(errs))]


def _clvq_chain(rng, d, n, steps, samples, gamma0, progress) -> np.ndarray:
    """One CLVQ run (see :func:`generate_eden_grid`); returns the last step's centres of mass, float32 [n, d]."""
    A = 4.0 * n ** (1.0 / d)
    B = math.pi ** 2 * n ** (-2.0 / d)
    grid = rng.standard_normal((n, d))
    com = grid.copy()
    it: Iterable[int] = range(steps)
    if progress is not None:
        it = progress(it)
    for t in it:
        x = rng.standard_normal((samples, d))
        idx = nearest_grid_index_np(x, grid)
        counts = np.bincount(idx, minlength=n).astype(np.float64)
        sums = np.zeros((n, d))
        for k in range(d):
            sums[:, k] = np.bincount(idx, weights=x[:, k], minlength=n)
        com = np.where(counts[:, None] > 0, sums / np.maximum(counts, 1.0)[:, None], grid)
        gamma = gamma0 * A / (A + gamma0 * B * t)
        grid = grid + gamma * (com - grid)
    return com.astype(np.float32)
