"""The paper's EDEN grids (grid set "paper", the default): the packaged files are the authors' (spec §4.4 hashes and
first rows), and kvjax's HIGGS codes and dequantized values with them equal a numpy oracle of the authors' quantizer
(spec §4.2) that reads the grid files itself."""
import hashlib
import pathlib

import jax.numpy as jnp
import numpy as np
import pytest

from kvjax.quant import HiggsConfig, available_grids, higgs_decode, higgs_encode, load_grid
from test_higgs import sylvester  # dense numpy Sylvester Hadamard (the oracles' own)

PAPER_DIR = pathlib.Path(__file__).resolve().parents[2] / "kvjax" / "quant" / "grids" / "paper"

# spec §4.4: SHA-256 (first 16 hex) of the raw little-endian float32 [n, d] bytes of the authors' .pt grids
SPEC_SHA256 = {
    (4, 256): "1bed54c53916175b", (2, 256): "3ef50bd3d6b9e312", (2, 16): "df6cae4951820d4a",
    (2, 64): "1c6cb55b2f86215c", (4, 16): "393f414585121cdc", (8, 16): "7a221c9a78c86f3c",
    (8, 128): "2f97006a792e17c4", (8, 256): "80cd18c0a1009581", (16, 256): "0f659b15e481b02f",
}
SPEC_FIRST_ROW = {(4, 256): [-0.19728003, -1.5669343, 2.0193849, 0.2564396], (2, 256): [-2.5014677, 0.17954709]}


def grid_file(d, n):
    """The oracle's own read of a packaged paper grid (not through kvjax.quant)."""
    return np.load(PAPER_DIR / f"EDEN{d}-{n}.npy", allow_pickle=False)


def test_packaged_paper_grids_are_the_authors():
    assert sorted(p.name for p in PAPER_DIR.glob("*.npy")) == sorted(f"EDEN{d}-{n}.npy" for d, n in SPEC_SHA256)
    for (d, n), sha in SPEC_SHA256.items():
        g = grid_file(d, n)
        assert g.shape == (n, d) and g.dtype == np.float32
        assert hashlib.sha256(np.ascontiguousarray(g, "<f4").tobytes()).hexdigest()[:16] == sha, (d, n)
    for (d, n), row in SPEC_FIRST_ROW.items():
        np.testing.assert_array_equal(grid_file(d, n)[0], np.float32(row))


def test_paper_is_the_default_grid_set():
    assert sorted(available_grids()) == sorted(SPEC_SHA256)
    for d, n in SPEC_SHA256:
        np.testing.assert_array_equal(load_grid(d, n), grid_file(d, n))
        np.testing.assert_array_equal(load_grid(d, n, "paper"), grid_file(d, n))
    assert not np.array_equal(load_grid(4, 256, "kvjax"), grid_file(4, 256))


def test_packaged_paper_grids_equal_the_shared_copies(shared_dir):
    folder = shared_dir / "data" / "higgs_grids"
    if not folder.is_dir():
        pytest.skip(f"{folder} not present")
    for d, n in SPEC_SHA256:
        np.testing.assert_array_equal(grid_file(d, n), np.load(folder / f"EDEN{d}-{n}.npy"))


def test_unknown_grid_set_is_a_clear_error():
    with pytest.raises(ValueError, match=r"source='eden'.*'paper', 'kvjax'"):
        load_grid(4, 256, "eden")
    with pytest.raises(FileNotFoundError, match="grid set 'kvjax'.*EDEN4-256"):
        load_grid(8, 256, "kvjax")  # the paper set has it, ours does not


# ------------------------------------------------------------------------------------ the authors' quantizer
def spec_quantize(x, grid, G, d):
    """algorithms.md §4.2, steps 1-3, in float64: per row and group of G values, s = ||x_g||, y = H_G x_g / s, each
    d-sub-vector -> argmax_j (2 <y_sub, g_j> - ||g_j||^2). Returns (indices [N, C/d], s [N, C/G], the gap between the
    best and second-best score of each sub-vector [N, C/d], the second-best index [N, C/d])."""
    grid = np.asarray(grid, np.float64)
    N, C = x.shape
    xg = np.asarray(x, np.float32).astype(np.float64).reshape(N, C // G, G)
    s = np.linalg.norm(xg, axis=-1)
    y = xg @ sylvester(G) / np.where(s > 0, s, 1.0)[..., None]
    score = 2.0 * y.reshape(-1, d) @ grid.T - (grid ** 2).sum(1)
    order = np.argsort(-score, axis=1, kind="stable")
    best, second = order[:, 0], order[:, 1]
    rows = np.arange(score.shape[0])
    gap = score[rows, best] - score[rows, second]
    return best.reshape(N, -1), s, gap.reshape(N, -1), second.reshape(N, -1)


def spec_dequantize(idx, s, grid, G, *, fp16: bool):
    """§4.2 step 4: x_hat = (1/G) H_G (s * grid[idx]) per group. ``fp16``: the authors' eval path, which casts
    s * grid[idx] to float16 and returns the transform in float16."""
    grid = np.asarray(grid, np.float64)
    N = idx.shape[0]
    z = grid[idx].reshape(N, -1, G) * s[..., None]
    if fp16:
        z = z.astype(np.float16).astype(np.float64)
    out = z @ sylvester(G) / G
    if fp16:
        out = out.astype(np.float16).astype(np.float64)
    return out.reshape(N, -1), z


# the paper's two HIGGS uses: landmarks EDEN4-256 with one 128-value head per group; store EDEN2-256 with G = C
@pytest.mark.parametrize("d,G,C,rows", [(4, 128, 256, 64), (2, 1024, 1024, 32)])
def test_codes_and_values_equal_the_spec_oracle(d, G, C, rows):
    grid = grid_file(d, 256)
    rng = np.random.default_rng(15 + d)
    # heavy tails and very different row scales, like real keys; one all-zero row (decodes to exactly 0)
    x = (rng.standard_t(4, size=(rows, C)) * rng.uniform(0.01, 30, size=(rows, 1))).astype(np.float32)
    x[3] = 0.0
    cfg = HiggsConfig(d, 256, G)
    codes = higgs_encode(jnp.asarray(x), load_grid(d, 256), cfg)
    got = np.asarray(codes.codes).astype(np.int64)  # n = 256: one uint8 index per sub-vector
    want, s, gap, second = spec_quantize(x, grid, G, d)
    assert got.shape == want.shape == (rows, C // d)

    # every index equals the oracle's, except where the best two scores tie to float32 rounding (the score is
    # ~10 in magnitude, so 2e-5 is a few float32 ulps): there it is one of the two
    tie = (gap < 2e-5) & (np.arange(rows) != 3)[:, None]
    assert tie.mean() < 1e-3, tie.sum()
    np.testing.assert_array_equal(got[~tie], want[~tie])
    assert np.all((got[tie] == want[tie]) | (got[tie] == second[tie]))
    np.testing.assert_allclose(np.asarray(codes.scales), s, rtol=1e-6)

    xhat = np.asarray(higgs_decode(codes, load_grid(d, 256), cfg, jnp.float32), np.float64)
    ref, _ = spec_dequantize(got, s, grid, G, fp16=False)
    scale = np.abs(ref).max()
    np.testing.assert_allclose(xhat, ref, rtol=1e-5, atol=1e-6 * scale)
    assert np.all(xhat[3] == 0)
    # the authors' float16 intermediate moves each value by at most its rounding: (1/G) sum_j |z_j| 2^-11 for the
    # cast of z = s * grid[idx], plus 2^-11 |x_hat| for the float16 result
    ref16, z16 = spec_dequantize(got, s, grid, G, fp16=True)
    bound = (np.abs(z16).sum(-1, keepdims=True) / G * 2.0 ** -11 * np.ones((1, 1, G))).reshape(rows, -1)
    bound += 2.0 ** -11 * np.abs(ref16) + 1e-6 * scale
    assert np.all(np.abs(xhat - ref16) <= bound)
    assert not np.allclose(xhat, ref16, rtol=1e-6, atol=0)  # the two paths do differ (by those roundings)
