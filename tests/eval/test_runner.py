"""The evaluation harness: CLI parsing (eval/cli.py), budgets and method grid (eval/grid.py), presets, the toy
benchmark, the result store (eval/store.py), the run loop (eval/runner.py) and its summaries (eval/summary.py)."""
import argparse
import json
import math
import pathlib

import numpy as np
import pytest

from eval import cli as eval_cli, grid, presets, runner, stats, store, suite, summary
from eval.benchmarks import get_benchmark
from eval.benchmarks.toy import ToyRetrieval
from models.tokenizer import ByteTokenizer

TINY = str(pathlib.Path(__file__).resolve().parents[1] / "fixtures" / "hf" / "tiny_llama")


def _args(*argv):
    p = argparse.ArgumentParser()
    eval_cli.add_args(p)
    return p.parse_args(list(argv))


def _toy_cfg(out, *extra):
    return eval_cli.config_from_args(_args("--preset", "toy", "--models", TINY, "--out", str(out), "--no-progress",
                                           "--no-plots", "--bench-opt", "toy_retrieval.n_samples=3",
                                           "--bench-opt", "toy_retrieval.max_new_tokens=5", *extra))


# ------------------------------------------------------------------------------------------------ parsing
def test_parse_budget_forms():
    assert grid.parse_budget("1/64") == ("1/64", 1 / 64)
    assert grid.parse_budget("0.03125") == ("1/32", 0.03125)
    assert grid.parse_budget("2048") == ("2048", 2048)
    assert grid.parse_budget("0.3") == ("0.3", 0.3)
    assert grid.parse_budget("default") == ("default", None)
    for bad in ("1.5", "-3", "abc", "1/0"):
        with pytest.raises(ValueError, match="budget"):
            grid.parse_budget(bad)


def test_method_specs_paper_defaults_and_grid():
    specs = grid.method_specs(["full", "yakv", "shadowkv"], [("default", None)], {})
    got = {(s.method, s.budget): s for s in specs}
    assert set(got) == {("full", "-"), ("yakv", "1/32"), ("shadowkv", "1/64")}
    assert got[("yakv", "1/32")].policy.config.sparse_budget == pytest.approx(1 / 32)
    assert got[("shadowkv", "1/64")].policy.config.sparse_budget == pytest.approx(1 / 64)
    specs = grid.method_specs(["full", "yakv"], [grid.parse_budget(b) for b in ("1/64", "1/8", "256")],
                              {"yakv": {"local_budget": 16}})
    yk = [s for s in specs if s.method == "yakv"]
    assert [s.budget for s in yk] == ["1/64", "1/8", "256"]
    assert [s.policy.config.sparse_budget for s in yk] == [1 / 64, 1 / 8, 256]
    assert all(s.policy.config.local_budget == 16 for s in yk)
    assert sum(s.method == "full" for s in specs) == 1


def test_method_variants_carry_their_own_options_and_label():
    specs = grid.method_specs(["full", "yakv", "yakv[store_format=none;local_budget=32]"],
                              [grid.parse_budget("1/16")],
                              {"yakv": {"local_budget": 16}, "yakv[store_format=none;local_budget=32]": {"chunk_size": 1}})
    got = {s.method: s.policy.config for s in specs}
    assert set(got) == {"full", "yakv", "yakv[store_format=none;local_budget=32]"}
    plain, variant = got["yakv"], got["yakv[store_format=none;local_budget=32]"]
    assert (plain.store_format, plain.local_budget, plain.sparse_budget) == ("higgs_qdq", 16, 1 / 16)
    # base-name options apply to the variant too, inline ones win; the budget knob is set as for the base
    assert (variant.store_format, variant.local_budget, variant.sparse_budget) == ("none", 32, 1 / 16)
    with pytest.raises(ValueError, match="full attention"):
        grid.method_specs(["full[store_format=none]"], [("default", None)], {})


def test_default_cli_is_the_default_preset():
    from kvjax import cli

    args = cli.build_parser().parse_args(["eval"])
    cfg = eval_cli.config_from_args(args)
    assert cfg.models == ["smollm2-135m"]
    assert cfg.methods == ["full", "yakv", "shadowkv"]
    assert list(cfg.benchmarks) == list(suite.default_benchmarks())  # the default suite (eval/suite.py)
    assert cfg.benchmarks["text2json_synth"]["answer_format"] == "lines"
    assert cfg.out == pathlib.Path("runs/default")
    cfg = eval_cli.config_from_args(cli.build_parser().parse_args(
        ["eval", "--methods", "full,yakv", "--budgets", "1/64,1/32", "--bench-opt", "multineedle.context_length=4000",
         "--benchmarks", "multineedle", "--max-samples", "2", "--out", "x"]))
    assert cfg.methods == ["full", "yakv"] and cfg.budgets == [("1/64", 1 / 64), ("1/32", 1 / 32)]
    assert cfg.benchmarks == {"multineedle": {**presets.PRESETS["default"]["benchmarks"]["multineedle"],
                                              "context_length": 4000}}
    with pytest.raises(ValueError, match="bench-opt"):
        eval_cli.config_from_args(_args("--bench-opt", "nocolon"))


def test_larger_preset_is_the_run_asked_for():
    """20 Text2JSON samples at 4k-7k tokens + MultiNeedle at ~8k, budgets 1/64 to 1/8, yakv vs shadowkv."""
    cfg = eval_cli.config_from_args(_args("--preset", "larger"))
    assert cfg.methods == ["full", "yakv", "shadowkv"]
    assert [f for _, f in cfg.budgets] == [1 / 64, 1 / 32, 1 / 16, 1 / 8]
    t2j = cfg.benchmarks["text2json_synth"]
    assert t2j["n_samples"] == 20 and list(t2j["target_tokens"]) == [4000, 7000]
    assert 7000 <= cfg.benchmarks["multineedle"]["context_length"] <= 8192
    assert cfg.out == pathlib.Path("runs/larger")


def test_toy_benchmark_scores_substring():
    samples, _ = ToyRetrieval().build(n_samples=2, n_pairs=5, seed=1)
    s = samples[0]
    assert s.gold in s.user_text and f"is {s.gold}." in s.user_text
    bench = get_benchmark("toy_retrieval")
    assert bench.score(s, f"It is {s.gold}.") == {"score": 1.0}
    assert bench.score(s, "no idea") == {"score": 0.0}
    assert ToyRetrieval().build(n_samples=2, n_pairs=5, seed=1)[0] == samples  # deterministic


def test_byte_tokenizer_round_trip():
    tok = ByteTokenizer(512, (2,))
    text = "Facts: key-3 is 42 — ok"
    assert tok.decode(tok.encode(text)) == text
    assert min(tok.encode(text)) >= 3 and tok.stop_ids() == (2,)
    with pytest.raises(ValueError, match="vocab_size"):
        ByteTokenizer(200)


# ------------------------------------------------------------------------------------------------ store
def test_result_store_drops_cut_lines_and_keeps_first(tmp_path):
    p = tmp_path / "results.jsonl"
    a = {"key": "a", "v": 1}
    b = {"key": "b", "v": 2}
    p.write_text(json.dumps(a) + "\n" + json.dumps({"key": "a", "v": 99}) + "\n" + json.dumps(b)[:10])
    st = store.ResultStore(p)
    assert st.get("a")["v"] == 1 and "b" not in st and st.dropped == 1
    assert st.add({"key": "b", "v": 3}) and not st.add({"key": "b", "v": 4})
    st.close()
    lines = [json.loads(x) for x in p.read_text().splitlines()]
    assert [r["key"] for r in lines] == ["a", "a", "b"]
    st2 = store.ResultStore(p)
    assert st2.get("b")["v"] == 3 and st2.get("a")["v"] == 1
    st2.replace({"key": "c", "error": "boom"})
    st2.replace({"key": "c", "v": 5})  # a later success replaces an error on load
    st2.close()
    assert store.ResultStore(p).get("c") == {"key": "c", "v": 5}
    assert {r["key"]: r for r in store.load_records(p)}["c"] == {"key": "c", "v": 5}


def test_merge_parts_first_wins(tmp_path):
    (tmp_path / "parts").mkdir()
    p0, p1 = tmp_path / "parts" / "a.jsonl", tmp_path / "parts" / "b.jsonl"
    p0.write_text(json.dumps({"key": "x", "v": 0}) + "\n" + json.dumps({"key": "e", "error": "bad"}) + "\n")
    p1.write_text(json.dumps({"key": "x", "v": 1}) + "\n" + json.dumps({"key": "y", "v": 2}) + "\n"
                  + json.dumps({"key": "e", "v": 3}) + "\n")
    assert store.merge_parts(tmp_path, [p0, p1]) == 3
    recs = {r["key"]: r for r in store.load_records(tmp_path / "results.jsonl")}
    assert recs == {"x": {"key": "x", "v": 0}, "y": {"key": "y", "v": 2}, "e": {"key": "e", "v": 3}}


# ------------------------------------------------------------------------------------------------ summary
def test_bootstrap_ci_contains_mean_and_shrinks():
    rng = np.random.default_rng(0)
    small = rng.random(10)
    large = rng.random(1000)
    m1, lo1, hi1 = stats.bootstrap_ci(small, seed=1)
    m2, lo2, hi2 = stats.bootstrap_ci(large, seed=1)
    assert m1 == pytest.approx(small.mean()) and m2 == pytest.approx(large.mean())
    assert lo1 <= m1 <= hi1 and lo2 <= m2 <= hi2
    assert (hi2 - lo2) < 0.5 * (hi1 - lo1)
    # normal-theory width of the mean of U(0,1): 2*1.96*sqrt(1/12/n); the bootstrap agrees within 20%
    assert (hi2 - lo2) == pytest.approx(2 * 1.96 * math.sqrt(1 / 12 / 1000), rel=0.2)
    assert stats.bootstrap_ci([0.7]) == (0.7, 0.7, 0.7)
    assert all(math.isnan(x) for x in stats.bootstrap_ci([]))


def test_summarize_groups_and_scales(tmp_path):
    def rec(method, budget, sid, score, kl=None, agree=None, err=None):
        r = {"key": f"m|b|{sid}|{method}|{budget}", "model": "m", "benchmark": "b", "sample_id": sid,
             "method": method, "budget": budget, "budget_fraction": 1.0 if method == "full" else 1 / 32,
             "score": {"found": score}, "fidelity": {"n_steps": 4, "kl_mean": kl, "top1_agreement": agree,
                                                    "first_divergence": 2 if agree and agree < 1 else None},
             "device_bytes_per_prompt_token": 10.0, "seconds": 2.0, "prompt_tokens": 100, "n_generated": 5}
        if err:
            r = {"key": r["key"], "model": "m", "benchmark": "b", "method": method, "budget": budget, "error": err}
        return r

    recs = [rec("full", "-", "s0", 1.0, 0.0, 1.0), rec("full", "-", "s1", 0.5, 0.0, 1.0),
            rec("yakv", "1/32", "s0", 0.5, 0.2, 0.5), rec("yakv", "1/32", "s1", 0.0, 0.4, 0.75),
            rec("yakv", "1/32", "s2", None, err="boom")]
    rows = summary.summarize(recs)
    by = {r["method"]: r for r in rows}
    assert by["full"]["score"] == pytest.approx(75.0) and by["full"]["n"] == 2
    assert by["yakv"]["score"] == pytest.approx(25.0) and by["yakv"]["errors"] == 1
    assert by["yakv"]["kl_mean"] == pytest.approx(0.3) and by["yakv"]["top1_agreement"] == pytest.approx(0.625)
    assert by["yakv"]["first_divergence_median"] == 2
    md, _ = summary.write_summary(recs, tmp_path)
    assert "| yakv | 1/32 | 2 |" in md
    assert (tmp_path / "summary.csv").read_text().count("\n") == 3
    assert sorted(p.name for p in (tmp_path / "plots").iterdir()) == ["m__b__fidelity.png", "m__b__score.png"]


def test_first_divergence_column_for_sequences_that_never_diverged():
    def rec(sid, method, first, steps=8):
        return {"key": f"m|b|{sid}|{method}|1/32", "model": "m", "benchmark": "b", "sample_id": sid, "method": method,
                "budget": "1/32", "budget_fraction": 1 / 32, "score": {"found": 1.0},
                "fidelity": {"n_steps": steps, "first_divergence": first, "kl_mean": 0.0, "top1_agreement": 1.0}}

    never = [rec("s0", "a", None), rec("s1", "a", None, steps=20)]  # no sample diverged
    mixed = [rec("s0", "b", 3), rec("s1", "b", None), rec("s2", "b", 5)]  # 3, 5, never -> median 5
    most_never = [rec("s0", "c", 2), rec("s1", "c", None), rec("s2", "c", None)]  # 2, never, never -> never
    rows = {r["method"]: r for r in summary.summarize(never + mixed + most_never)}
    assert rows["a"]["first_divergence_median"] is None and rows["c"]["first_divergence_median"] is None
    assert rows["b"]["first_divergence_median"] == 5
    md = summary.to_markdown(list(rows.values()))
    cells = {line.split(" | ")[0].strip("| "): line.split(" | ")[6] for line in md.splitlines()
             if line.startswith("| a ") or line.startswith("| b ") or line.startswith("| c ")}
    assert cells == {"a": "–", "b": "5", "c": "–"}  # never n_steps + 1 (9 or 21)


# ------------------------------------------------------------------------------------------------ runs
class Stop(Exception):
    pass


def test_resume_after_interruption(tmp_path):
    out = tmp_path / "run"
    cfg = _toy_cfg(out, "--methods", "full,yakv")
    seen = []

    def interrupt(rec):  # stop after sample 0 (full, yakv) and sample 1's full
        seen.append(rec["key"])
        if len(seen) == 3:
            raise Stop

    with pytest.raises(Stop):
        runner.run(cfg, on_record=interrupt)
    first = {r["key"]: r for r in store.load_records(out / "results.jsonl")}
    assert list(first) == seen  # every finished record was flushed before the interruption
    res = runner.run(cfg)
    recs = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]
    keys = [r["key"] for r in recs]
    assert len(keys) == len(set(keys)) == 3 * 2  # 3 samples x (full, yakv), each once
    assert res["computed"] == 6 - 3
    for k, r in first.items():  # finished records were not recomputed
        again = next(x for x in recs if x["key"] == k)
        assert again["finished_at"] == r["finished_at"] and again["seconds"] == r["seconds"]
    # the resumed yakv records of the interrupted sample used full's cached tokens as their reference
    for r in recs:
        assert not r.get("error"), r.get("error")
        assert r["fidelity"]["n_steps"] == len(next(x for x in recs if x["sample_id"] == r["sample_id"]
                                                    and x["method"] == "full")["full_tokens"]) - 1
    assert runner.run(cfg)["computed"] == 0
    assert (out / "summary.md").exists() and (out / "summary.csv").exists()


def test_resumed_reference_gives_identical_fidelity(tmp_path):
    """A method computed after a restart (reference logits rebuilt from full's cached tokens) gets the same
    fidelity as in an uninterrupted run."""
    a, b = tmp_path / "a", tmp_path / "b"
    runner.run(_toy_cfg(a, "--methods", "full,yakv", "--bench-opt", "toy_retrieval.n_samples=1"))
    runner.run(_toy_cfg(b, "--methods", "full", "--bench-opt", "toy_retrieval.n_samples=1"))
    runner.run(_toy_cfg(b, "--methods", "full,yakv", "--bench-opt", "toy_retrieval.n_samples=1"))
    ra = {r["key"]: r for r in store.load_records(a / "results.jsonl")}
    rb = {r["key"]: r for r in store.load_records(b / "results.jsonl")}
    assert set(ra) == set(rb)
    for k in ra:
        assert ra[k]["prediction"] == rb[k]["prediction"]
        fa, fb = ra[k]["fidelity"], rb[k]["fidelity"]
        assert fa["top1_agreement"] == fb["top1_agreement"]
        assert fa["kl_mean"] == pytest.approx(fb["kl_mean"], rel=1e-5, abs=1e-9)


def test_errors_are_recorded_not_fatal(tmp_path):
    # a landmark sub-vector of 3 values cannot divide the tiny model's power-of-two Hadamard group: an error record
    # for that method, the rest runs
    out = tmp_path / "err"
    args = ("--methods", "full,yakv", "--bench-opt", "toy_retrieval.n_samples=1", "--policy-opt", "yakv.landmark_d=3")
    res = runner.run(_toy_cfg(out, *args))
    recs = {r["method"]: r for r in store.load_records(out / "results.jsonl")}
    assert "landmark_d=3" in recs["yakv"]["error"]
    assert not recs["full"].get("error")
    assert res["computed"] == 2
    assert runner.run(_toy_cfg(out, *args))["computed"] == 0


@pytest.mark.slow
def test_smollm2_small_run(tmp_path):
    out = tmp_path / "s"
    cfg = eval_cli.config_from_args(_args(
        "--out", str(out), "--no-progress", "--benchmarks", "text2json_synth", "--max-samples", "1",
        "--bench-opt", "text2json_synth.target_tokens=600", "--bench-opt", "text2json_synth.n_entities=3",
        "--bench-opt", "text2json_synth.max_new_tokens=24", "--methods", "full,yakv,shadowkv",
        "--policy-opt", "shadowkv.outlier_budget=64"))
    res = runner.run(cfg)
    recs = store.load_records(out / "results.jsonl")
    assert {r["method"] for r in recs} == {"full", "yakv", "shadowkv"}
    assert all(not r.get("error") for r in recs), [r.get("error") for r in recs]
    assert all(r["device_bytes_per_prompt_token"] > 0 for r in recs)
    assert "| yakv | 1/32 |" in res["summary_md"]


def test_samples_without_room_for_generation_are_skipped_not_cut():
    tok = ByteTokenizer(512, (2,))
    cfg = _toy_cfg("unused")
    opts = {"n_samples": 3, "n_pairs": 12, "max_new_tokens": 8}
    built, _ = runner.build_samples("toy_retrieval", opts, tok, 10_000, cfg)
    lengths = [len(tok.encode(tok.apply_chat_template(s.user_text))) for s, _ in built]
    ctx = sorted(lengths)[1] + 8  # room for the two shortest prompts plus 8 new tokens
    kept, rep = runner.build_samples("toy_retrieval", opts, tok, ctx, cfg)
    assert len(kept) == 2 and all(len(tok.encode(tok.apply_chat_template(s.user_text))) + mn <= ctx
                                  for s, mn in kept)
    assert len(rep["too_long"]) == 1
    assert [s.user_text for s, _ in kept] == [s.user_text for s, _ in built if s.id not in rep["too_long"]]


def test_equal_memory_budgets_hold_the_allowance(tmp_path):
    out = tmp_path / "eq"
    res = runner.run(_toy_cfg(out, "--methods", "full,yakv", "--equal-memory", "600",
                              "--bench-opt", "toy_retrieval.n_samples=1",
                              "--policy-opt", "yakv.min_seqlen_to_prune=0"))  # the toy prompt is ~260 tokens
    recs = {r["method"]: r for r in res["records"]}
    yk = recs["yakv"]
    assert not yk.get("error"), yk.get("error")
    assert yk["budget"] == "eq600B/tok"
    assert 0 < yk["budget_value"] < 1 and yk["config"]["sparse_budget"] == pytest.approx(yk["budget_value"])
    assert yk["device_bytes_per_prompt_token"] <= 600
    assert recs["full"]["device_bytes_per_prompt_token"] > 600  # the allowance is binding
