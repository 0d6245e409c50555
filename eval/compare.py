"""Paired comparison of two methods at equal budget: which one stays closer to full attention, sample by sample.

The summary table averages each method over its own samples; this pairs them. For every (model, benchmark, budget)
where two non-``full`` methods both finished the same samples, and for each metric, it reports over those samples:

* ``mean_diff``: mean of ``metric(A) - metric(B)`` with a percentile-bootstrap 95% interval
  (:func:`eval.stats.bootstrap_ci`, resampling samples);
* ``a_better``: the share of samples where A is strictly better (lower KL; higher agreement, recall, task score;
  a later first divergence), ``ties`` the share of equal values.

Metrics: ``kl`` (mean KL(full ‖ method) per step), ``agreement`` (top-1), ``first_div`` (index of the first differing
greedy token; never = steps + 1), ``recall`` (attention recall), ``score`` (task score ×100).
"""
from __future__ import annotations

import itertools
from typing import Any, Mapping, Sequence

import numpy as np

from .grid import budget_sort_key
from .stats import bootstrap_ci, first_divergence, primary_score

#: metric -> (extractor of a record, +1 if higher is better / -1 if lower is better)
METRICS = {
    "kl": (lambda r: (r.get("fidelity") or {}).get("kl_mean"), -1),
    "agreement": (lambda r: (r.get("fidelity") or {}).get("top1_agreement"), +1),
    "first_div": (lambda r: first_divergence(r.get("fidelity") or {}), +1),
    "recall": (lambda r: (r.get("fidelity") or {}).get("recall_mean"), +1),
    "score": (lambda r: None if primary_score(r.get("score")) is None else 100.0 * primary_score(r.get("score")), +1),
}


def paired(records: Sequence[Mapping[str, Any]], n_boot: int = 2000, seed: int = 0) -> list[dict]:
    """One row per (model, benchmark, budget, method A, method B, metric) with A < B alphabetically; see module doc.

    Only error-free records of methods other than ``full`` are paired, on ``sample_id``; groups with no common
    sample are skipped. Keys: model, benchmark, budget, a, b, metric, n, mean_diff, lo, hi, a_better, ties.
    """
    groups: dict[tuple, dict[str, dict[str, Mapping[str, Any]]]] = {}
    for r in records:
        if r.get("error") or r.get("method") == "full":
            continue
        key = (r.get("model"), r.get("benchmark"), r.get("budget"))
        groups.setdefault(key, {}).setdefault(r.get("method"), {})[r.get("sample_id")] = r
    rows = []
    for (model, bench, budget), by_method in groups.items():
        for a, b in itertools.combinations(sorted(by_method), 2):
            common = sorted(set(by_method[a]) & set(by_method[b]))
            for name, (get, sign) in METRICS.items():
                pairs = [(get(by_method[a][s]), get(by_method[b][s])) for s in common]
                pairs = [(x, y) for x, y in pairs if x is not None and y is not None]
                if not pairs:
                    continue
                d = np.array([x - y for x, y in pairs], np.float64)
                mean, lo, hi = bootstrap_ci(d.tolist(), n_boot=n_boot, seed=seed)
                rows.append({"model": model, "benchmark": bench, "budget": budget, "a": a, "b": b, "metric": name,
                             "n": len(pairs), "mean_diff": mean, "lo": lo, "hi": hi,
                             "a_better": float(np.mean(sign * d > 0)), "ties": float(np.mean(d == 0)),
                             "budget_fraction": by_method[a][common[0]].get("budget_fraction")})
    rows.sort(key=lambda r: (str(r["model"]), str(r["benchmark"]), r["a"], r["b"],
                             budget_sort_key({"method": r["a"], "budget": r["budget"],
                                              "budget_fraction": r["budget_fraction"]}),
                             list(METRICS).index(r["metric"])))
    return rows


def to_markdown(rows: Sequence[Mapping[str, Any]]) -> str:
    """A table per (model, benchmark, A vs B): one line per budget, metrics as columns "mean diff [lo, hi] (A better
    in x%)"."""
    if not rows:
        return ""
    out = []
    key = lambda r: (r["model"], r["benchmark"], r["a"], r["b"])  # noqa: E731
    for (model, bench, a, b), grp in itertools.groupby(rows, key=key):
        grp = list(grp)
        metrics = [m for m in METRICS if any(r["metric"] == m for r in grp)]
        out.append(f"#### {model} · {bench}: {a} − {b}, paired over samples (A = {a})\n")
        out.append("| budget | n | " + " | ".join(metrics) + " |")
        out.append("|---|---|" + "---|" * len(metrics))
        for budget, brow in itertools.groupby(grp, key=lambda r: r["budget"]):
            cells = {r["metric"]: r for r in brow}
            n = max(r["n"] for r in cells.values())
            line = [str(budget), str(n)]
            for m in metrics:
                r = cells.get(m)
                line.append("–" if r is None else
                            f"{r['mean_diff']:+.3g} [{r['lo']:+.3g}, {r['hi']:+.3g}] ({100 * r['a_better']:.0f}%)")
            out.append("| " + " | ".join(line) + " |")
        out.append("")
    out.append("mean diff = mean over samples of metric(A) − metric(B) with a bootstrap 95% interval; (x%) = share of "
               "samples where A is strictly better (lower KL, higher agreement / first divergence / recall / score).\n")
    return "\n".join(out)


__all__ = ["METRICS", "paired", "to_markdown"]
