"""Summaries of an evaluation run: per (model, benchmark, method, budget) tables in markdown and CSV, and PNG plots
of task score and fidelity against budget.

Each row aggregates the finished records (one per sample) of a group:

* ``score``: mean task score ×100 (Text2JSON IoU, MultiNeedle share of needles found, LongProc F1 — the
  per-sample primary score, see :func:`eval.stats.primary_score`) with a percentile-bootstrap 95% interval over
  samples (:func:`eval.stats.bootstrap_ci`); samples whose score is None (the authors' "bad samples") are left out;
* fidelity to full attention (eval/fidelity.py): mean KL(full ‖ method) per token, top-1 agreement, the median
  first divergence (samples that never diverge count as later than any step; "–" when the median one never
  diverged) and the mean attention recall;
* ``device B/tok`` and ``host B/tok``: bytes of the policy state per prompt token (``memory_report``);
* ``s/sample``: seconds per sample (shared prefill + the method's build and free-run decode);
* ``errors``: records that failed (listed, never averaged).
"""
from __future__ import annotations

import csv
import math
import os
import pathlib
from typing import Any, Mapping, Sequence

import numpy as np

from . import compare
from .grid import budget_sort_key
from .stats import bootstrap_ci, first_divergence, mean as stat_mean, primary_score

COLUMNS = ("model", "benchmark", "method", "budget", "n", "score", "score_lo", "score_hi", "kl_mean",
           "top1_agreement", "first_divergence_median", "recall_mean", "device_bytes_per_token",
           "host_bytes_per_token", "seconds_per_sample", "prompt_tokens", "generated_tokens", "errors")


def summarize(records: Sequence[Mapping[str, Any]], n_boot: int = 2000, seed: int = 0) -> list[dict]:
    """One row per (model, benchmark, method, budget) with the columns of :data:`COLUMNS` (scores ×100)."""
    groups: dict[tuple, list[Mapping[str, Any]]] = {}
    for r in records:
        groups.setdefault((r.get("model"), r.get("benchmark"), r.get("method"), r.get("budget")), []).append(r)
    rows = []
    for (model, bench, method, budget), recs in groups.items():
        ok = [r for r in recs if not r.get("error")]
        scores = [primary_score(r.get("score")) for r in ok]
        scores = [100.0 * s for s in scores if s is not None]
        mean, lo, hi = bootstrap_ci(scores, n_boot=n_boot, seed=seed)
        fid = [r.get("fidelity") or {} for r in ok]
        firsts = [d for d in (first_divergence(f, never=math.inf) for f in fid) if d is not None]
        first_median = float(np.median(firsts)) if firsts else math.inf
        rows.append({
            "model": model, "benchmark": bench, "method": method, "budget": budget,
            "budget_fraction": stat_mean(r.get("budget_fraction") for r in ok),
            "n": len(ok), "score": mean, "score_lo": lo, "score_hi": hi,
            "kl_mean": stat_mean(f.get("kl_mean") for f in fid),
            "top1_agreement": stat_mean(f.get("top1_agreement") for f in fid),
            # None (shown "–") also when the median sample never diverged
            "first_divergence_median": first_median if math.isfinite(first_median) else None,
            "recall_mean": stat_mean(f.get("recall_mean") for f in fid),
            "device_bytes_per_token": stat_mean(r.get("device_bytes_per_prompt_token") for r in ok),
            "host_bytes_per_token": stat_mean(r.get("host_bytes_per_prompt_token") for r in ok),
            "seconds_per_sample": stat_mean(r.get("seconds") for r in ok),
            "prompt_tokens": stat_mean(r.get("prompt_tokens") for r in ok),
            "generated_tokens": stat_mean(r.get("n_generated") for r in ok),
            "errors": len(recs) - len(ok),
        })
    rows.sort(key=lambda r: (str(r["model"]), str(r["benchmark"])) + budget_sort_key(r))
    return rows


def _fmt(v: Any, digits: int = 3) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    if isinstance(v, float):
        if v != 0 and (abs(v) >= 1e5 or abs(v) < 1e-3):
            return f"{v:.2e}"
        return f"{v:.{digits}g}" if abs(v) < 10 else f"{v:.1f}"
    return str(v)


def to_markdown(rows: Sequence[Mapping[str, Any]]) -> str:
    """Markdown table(s), one per (model, benchmark)."""
    head = ("method", "budget", "n", "score (95% CI)", "KL", "top-1 agr", "1st div", "recall", "device B/tok",
            "host B/tok", "s/sample", "errors")
    out = []
    key = None
    for r in rows:
        if (r["model"], r["benchmark"]) != key:
            key = (r["model"], r["benchmark"])
            toks = _fmt(r.get("prompt_tokens"))
            out += ["", f"### {r['model']} · {r['benchmark']} (≈{toks} prompt tokens)", "",
                    "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        score = (f"{_fmt(r['score'])} ({_fmt(r['score_lo'])}–{_fmt(r['score_hi'])})"
                 if r["score"] is not None and not math.isnan(r["score"]) else "–")
        cells = [r["method"], str(r["budget"]), str(r["n"]), score, _fmt(r["kl_mean"]), _fmt(r["top1_agreement"]),
                 _fmt(r["first_divergence_median"]), _fmt(r["recall_mean"]), _fmt(r["device_bytes_per_token"]),
                 _fmt(r["host_bytes_per_token"]), _fmt(r["seconds_per_sample"]), str(r["errors"])]
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out).lstrip("\n") + "\n"


def paper_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """The layout of the paper's main table: one row per (model, method, budget) in the order of
    :func:`summarize`, one column per benchmark (sorted by name, as :func:`summarize` orders them), each cell the mean primary score ×100
    over the finished samples ("–": no finished sample)."""
    benches = list(dict.fromkeys(str(r["benchmark"]) for r in rows))
    cells: dict[tuple, dict[str, Any]] = {}
    for r in sorted(rows, key=lambda r: (str(r["model"]),) + budget_sort_key(r)):
        cells.setdefault((r["model"], r["method"], r["budget"]), {})[str(r["benchmark"])] = r["score"]
    head = ["model", "method", "budget"] + benches
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for (model, method, budget), by_bench in cells.items():
        vals = []
        for b in benches:
            v = by_bench.get(b)
            vals.append("–" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.1f}")
        out.append("| " + " | ".join([str(model), str(method), str(budget)] + vals) + " |")
    return "\n".join(out) + "\n"


def write_csv(rows: Sequence[Mapping[str, Any]], path: str | os.PathLike) -> pathlib.Path:
    path = pathlib.Path(path)
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=list(COLUMNS) + ["budget_fraction"], extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in w.fieldnames})
    return path


def _safe(s: Any) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in str(s))


def plot(rows: Sequence[Mapping[str, Any]], out_dir: str | os.PathLike) -> list[pathlib.Path]:
    """PNG plots per (model, benchmark): task score vs budget and fidelity (top-1 agreement, attention recall)
    vs budget, one line per method; full attention as a dashed horizontal line. The x axis is the budget as a
    fraction of the prompt (token-count budgets are divided by the mean prompt length). Returns the files."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    files = []
    by_mb: dict[tuple, list[Mapping[str, Any]]] = {}
    for r in rows:
        by_mb.setdefault((r["model"], r["benchmark"]), []).append(r)
    for (model, bench), rs in by_mb.items():
        full = [r for r in rs if r["method"] == "full"]
        methods = sorted({r["method"] for r in rs if r["method"] != "full"})
        panels = [("score", "task score (×100)"), ("top1_agreement", "top-1 agreement with full"),
                  ("recall_mean", "attention recall")]
        for name, metrics_ in (("score", panels[:1]), ("fidelity", panels[1:])):
            fig, axes = plt.subplots(1, len(metrics_), figsize=(5.5 * len(metrics_), 4), squeeze=False)
            for ax, (col, label) in zip(axes[0], metrics_):
                for m in methods:
                    pts = sorted((r["budget_fraction"], r[col], r) for r in rs
                                 if r["method"] == m and r.get("budget_fraction") and r.get(col) is not None)
                    if not pts:
                        continue
                    xs, ys = [p[0] for p in pts], [p[1] for p in pts]
                    if col == "score":  # with the bootstrap 95% interval
                        err = [[max(y - p[2]["score_lo"], 0.0) for y, p in zip(ys, pts)],
                               [max(p[2]["score_hi"] - y, 0.0) for y, p in zip(ys, pts)]]
                        ax.errorbar(xs, ys, yerr=err, fmt="o-", capsize=4, label=m)
                    else:
                        ax.plot(xs, ys, "o-", label=m)
                for r in full:
                    if r.get(col) is not None and not (isinstance(r[col], float) and math.isnan(r[col])):
                        ax.axhline(r[col], ls="--", color="k", lw=1, label="full")
                ax.set_xscale("log", base=2)
                ax.set_xlabel("budget (fraction of the prompt)")
                ax.set_ylabel(label)
                ax.grid(alpha=0.3)
                if ax.get_legend_handles_labels()[0]:
                    ax.legend(fontsize=8)
            fig.suptitle(f"{model} · {bench}")
            fig.tight_layout()
            path = out_dir / f"{_safe(model)}__{_safe(bench)}__{name}.png"
            fig.savefig(path, dpi=110)
            plt.close(fig)
            files.append(path)
    return files


def render(records: Sequence[Mapping[str, Any]]) -> tuple[str, list[dict], list[dict]]:
    """(markdown, summary rows, paired rows) of ``records``: the tables of :func:`to_markdown`, followed by the
    paired comparison (:mod:`eval.compare`) when two methods share a budget. Writes nothing."""
    rows = summarize(records)
    md = to_markdown(rows) if rows else "(no finished records)\n"
    pairs = compare.paired(records)
    if pairs:  # two methods at the same budget: which stays closer to full, sample by sample
        md += "\n" + compare.to_markdown(pairs)
    return md, rows, pairs


NOTES = ("\nscore: mean task score ×100 with a bootstrap 95% interval over samples; KL: mean KL(full ‖ method) per "
         "decode step (nats), teacher-forced on full's greedy output; top-1 agr: share of those steps where the "
         "method's greedy token equals full's; 1st div: median index of the first differing generated token (– when "
         "the median sample never diverged); recall: share of exact attention mass over the prompt on the tokens the "
         "method attends (mean over query heads, layers, KV heads and measured steps); B/tok: policy-state bytes per "
         "prompt token; s/sample: shared prefill + the method's build and decode.\n")


def sources_line(records: Sequence[Mapping[str, Any]]) -> str:
    """"sources: <benchmark>: <where its data came from>; …" over the records' ``data_source`` (eval.data.describe:
    generated + seed, local path, kvjax cache, hub repo@revision); a benchmark read from several sources lists
    them all. Empty when no record carries one."""
    from .data import describe

    seen: dict[str, list[str]] = {}
    for r in records:
        if r.get("data_source") is None:
            continue
        d = describe(r["data_source"])
        lst = seen.setdefault(str(r.get("benchmark")), [])
        if d not in lst:
            lst.append(d)
    if not seen:
        return ""
    return "sources: " + "; ".join(f"{b}: {' + '.join(v)}" for b, v in sorted(seen.items()))


def write_summary(records: Sequence[Mapping[str, Any]], out_dir: str | os.PathLike, plots: bool = True
                  ) -> tuple[str, list[dict]]:
    """summary.md, summary.csv, paper_table.md (:func:`paper_table`, every run: it costs nothing), paired.csv
    (:mod:`eval.compare`, when two methods share a budget) and plots/ for ``records`` under ``out_dir``; returns
    (markdown, rows)."""
    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    md, rows, pairs = render(records)
    if pairs:
        with open(out_dir / "paired.csv", "w", newline="", encoding="utf-8") as f:
            w = csv.DictWriter(f, fieldnames=list(pairs[0]))
            w.writeheader()
            w.writerows(pairs)
    sources = sources_line(records)
    if sources:
        md += "\n" + sources + "\n"
    (out_dir / "summary.md").write_text(md + NOTES, encoding="utf-8")
    write_csv(rows, out_dir / "summary.csv")
    if rows:
        (out_dir / "paper_table.md").write_text(
            "Task score ×100 (Text2JSON IoU, MultiNeedle needles found, LongProc F1), mean over the finished "
            "samples; rows: model × method (budget), columns: benchmarks.\n\n" + paper_table(rows), encoding="utf-8")
    if plots and rows:
        plot(rows, out_dir / "plots")
    return md, rows


__all__ = ["COLUMNS", "NOTES", "paper_table", "plot", "render", "sources_line", "summarize", "to_markdown", "write_csv", "write_summary"]
