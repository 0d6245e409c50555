"""Statistics over evaluation records: the per-sample primary score, the first divergence from full attention, means
that skip missing values, and the percentile-bootstrap interval of a mean (used by ``eval.summary`` and
``eval.compare``)."""
from __future__ import annotations

import math
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

PRIMARY_KEYS = ("score", "found", "f1")


def primary_score(score: Mapping[str, Any] | None) -> float | None:
    """The per-sample scalar a benchmark's ``score`` dict stands for, in [0, 1]: "score" (Text2JSON), "found"
    (MultiNeedle), "f1" (LongProc), else the first numeric value; None when absent or None."""
    if not score:
        return None
    for k in PRIMARY_KEYS:
        if k in score:
            v = score[k]
            return None if v is None else float(v)
    for v in score.values():
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            return float(v)
    return None


def first_divergence(fidelity: Mapping[str, Any], never: float | None = None) -> float | None:
    """Index of the first generated token where a method's greedy token differs from full attention's, from a
    record's ``fidelity`` dict (eval/fidelity.py); a sequence that never diverged counts as ``never``
    (default ``n_steps + 1``, one past its last step). None when nothing was measured (no teacher-forced steps, or
    full attention's own reference record)."""
    if not fidelity.get("n_steps") or fidelity.get("reference"):
        return None
    d = fidelity.get("first_divergence")
    if d is not None:
        return float(d)
    return float(fidelity["n_steps"] + 1 if never is None else never)


def mean(xs: Iterable[float | None]) -> float | None:
    """Mean of the values that are neither None nor NaN; None when there are none."""
    v = [float(x) for x in xs if x is not None and not (isinstance(x, float) and math.isnan(x))]
    return float(np.mean(v)) if v else None


def bootstrap_ci(values: Sequence[float], n_boot: int = 2000, level: float = 0.95, seed: int = 0
                 ) -> tuple[float, float, float]:
    """(mean, low, high): percentile bootstrap interval of the mean of ``values`` (resampling samples with
    replacement ``n_boot`` times, fixed ``seed``). One value gives a zero-width interval; none gives NaNs."""
    if not 0 < level < 1:
        raise ValueError(f"level={level}, allowed: (0, 1)")
    if n_boot < 1:
        raise ValueError(f"n_boot={n_boot}, allowed: int >= 1 resamples")
    x = np.asarray([v for v in values if v is not None], np.float64)
    if x.size == 0:
        return math.nan, math.nan, math.nan
    m = float(x.mean())
    if x.size == 1:
        return m, m, m
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, x.size, size=(n_boot, x.size))].mean(axis=1)
    a = (1 - level) / 2
    lo, hi = np.quantile(means, [a, 1 - a])
    return m, float(min(lo, m)), float(max(hi, m))


__all__ = ["PRIMARY_KEYS", "bootstrap_ci", "first_divergence", "mean", "primary_score"]
