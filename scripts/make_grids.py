#!/usr/bin/env python
"""Regenerate kvjax's own EDEN grids (grid set "kvjax": kvjax/quant/grids/kvjax/EDEN{d}-{n}.npy) with seeded CLVQ.

The default grid set, "paper" (kvjax/quant/grids/paper/), holds the authors' grids and is not generated here.

Usage:
    python scripts/make_grids.py                       # default set, seed 0, 150 steps x 200k samples,
                                                      # 4 restarts for n <= 64
    python scripts/make_grids.py --grids 4-256 2-256 --steps 300 --samples 400000 --seed 1
    python scripts/make_grids.py --compare             # also print the packaged paper grids' MSE

Each grid is float32 [n, d]. The printed MSE is per dimension on N(0, 1) samples (numpy seed 0).
"""
from __future__ import annotations

import argparse
import pathlib
import sys
import time

import numpy as np
from tqdm import tqdm

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from kvjax.quant.grids import (  # noqa: E402
    available_grids,
    generate_eden_grid,
    grid_filename,
    load_grid,
    quantization_mse,
)

DEFAULT_GRIDS = ["4-256", "2-256", "2-16", "4-16", "2-64"]


def _parse_grid(spec: str) -> tuple[int, int]:
    try:
        d, n = (int(v) for v in spec.split("-"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"grid spec must look like D-N (e.g. 4-256), got {spec!r}") from None
    return d, n


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--grids", nargs="+", default=DEFAULT_GRIDS, type=str, help="grids as D-N (default: %(default)s)")
    ap.add_argument("--seed", type=int, default=0, help="numpy seed (default: %(default)s)")
    ap.add_argument("--steps", type=int, default=150, help="CLVQ steps (default: %(default)s; authors: 600)")
    ap.add_argument("--samples", type=int, default=200_000,
                    help="Gaussian samples per step (default: %(default)s; authors: 10,000,000)")
    ap.add_argument("--restarts", type=int, default=None,
                    help="independent chains per grid, best kept (default: 4 when n <= 64, else 1)")
    ap.add_argument("--out", type=pathlib.Path, default=ROOT / "kvjax" / "quant" / "grids" / "kvjax",
                    help="output folder (default: %(default)s)")
    ap.add_argument("--compare", action="store_true",
                    help="print the MSE of the packaged paper grid (grid set \"paper\") alongside")
    args = ap.parse_args(argv)

    args.out.mkdir(parents=True, exist_ok=True)
    for spec in args.grids:
        d, n = _parse_grid(spec)
        t0 = time.time()
        grid = generate_eden_grid(
            d, n, seed=args.seed, steps=args.steps, samples=args.samples,
            restarts=args.restarts if args.restarts is not None else (4 if n <= 64 else 1),
            progress=lambda it: tqdm(it, desc=f"EDEN{d}-{n}", leave=False),
        )
        path = args.out / grid_filename(d, n)
        np.save(path, grid.astype(np.float32))
        line = f"EDEN{d}-{n}: MSE/dim {quantization_mse(grid):.6f}"
        if args.compare and (d, n) in available_grids("paper"):
            pm = quantization_mse(load_grid(d, n, "paper"))
            line += f" (paper grid {pm:.6f}, ratio {quantization_mse(grid) / pm:.4f})"
        print(f"{line}  [{time.time() - t0:.0f} s] -> {path}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
