"""Paired method comparison (eval/compare.py) on hand-made records."""
import csv

import numpy as np
import pytest

from eval import compare, summary


def rec(method, sample, budget="1/32", kl=0.1, agr=0.9, first=None, steps=10, recall=0.8, score=0.5, error=None):
    return {"key": f"m|b|{sample}|{method}|{budget}", "model": "m", "benchmark": "b", "sample_id": sample,
            "method": method, "budget": budget, "budget_fraction": 1 / 32 if budget == "1/32" else 1 / 8,
            "score": {"score": score},
            "fidelity": {"n_steps": steps, "kl_mean": kl, "top1_agreement": agr, "first_divergence": first,
                         "recall_mean": recall},
            "error": error}


def test_paired_differences_shares_and_pairing_on_common_samples():
    recs = [rec("full", s, budget="-", kl=0.0) for s in "abcd"]
    # yakv better than shadowkv on KL in every common sample by 0.01, 0.02, 0.03; sample "d" only for yakv
    recs += [rec("yakv", s, kl=k, first=f, recall=0.9) for s, k, f in [("a", 0.01, None), ("b", 0.02, 3),
                                                                         ("c", 0.03, 5), ("d", 9.0, 1)]]
    recs += [rec("shadowkv", s, kl=k, first=f, recall=0.9) for s, k, f in [("a", 0.02, 4), ("b", 0.04, 3),
                                                                             ("c", 0.06, 2)]]
    recs.append(rec("shadowkv", "d", kl=0.0, error="boom"))  # failed: not paired, so "d" is not common
    rows = {r["metric"]: r for r in compare.paired(recs, n_boot=500)}
    assert {r["a"] for r in rows.values()} == {"shadowkv"} and {r["b"] for r in rows.values()} == {"yakv"}
    kl = rows["kl"]
    assert kl["n"] == 3
    assert kl["mean_diff"] == pytest.approx(np.mean([0.01, 0.02, 0.03]))  # shadowkv - yakv
    assert kl["a_better"] == 0.0 and kl["lo"] > 0  # shadowkv never has the lower KL; interval excludes 0
    # first divergence: never (None) counts as steps + 1 = 11; shadowkv - yakv = 4-11, 3-3, 2-5
    fd = rows["first_div"]
    assert fd["mean_diff"] == pytest.approx(np.mean([-7, 0, -3]))
    assert fd["a_better"] == 0.0 and fd["ties"] == pytest.approx(1 / 3)
    assert rows["recall"]["ties"] == 1.0 and rows["recall"]["mean_diff"] == 0.0


def test_budgets_are_compared_separately_and_full_is_never_paired():
    recs = [rec("yakv", "a", budget=b, kl=0.1) for b in ("1/32", "1/8")]
    recs += [rec("shadowkv", "a", budget="1/32", kl=0.3), rec("full", "a", budget="-")]
    rows = compare.paired(recs)
    assert {r["budget"] for r in rows} == {"1/32"}  # 1/8 has one method only
    assert all("full" not in (r["a"], r["b"]) for r in rows)
    md = compare.to_markdown(rows)
    assert "shadowkv − yakv" in md and "| 1/32 | 1 |" in md


def test_write_summary_adds_paired_section_and_csv(tmp_path):
    recs = [rec("yakv", s, kl=0.01) for s in "ab"] + [rec("shadowkv", s, kl=0.05) for s in "ab"]
    md, _ = summary.write_summary(recs, tmp_path, plots=False)
    assert "paired over samples" in md and "paired over samples" in (tmp_path / "summary.md").read_text()
    with open(tmp_path / "paired.csv") as f:
        got = {r["metric"]: r for r in csv.DictReader(f)}
    assert float(got["kl"]["mean_diff"]) == pytest.approx(0.04)
    # one method: no paired section
    md1, _ = summary.write_summary(recs[:2], tmp_path / "one", plots=False)
    assert "paired" not in md1 and not (tmp_path / "one" / "paired.csv").exists()
