"""The default suite (eval/suite.py): generated benchmarks with no data, real ones where found; and the first run
of a fresh machine: `kvjax eval` with no data, no network and an empty HOME."""
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys

import pytest

from eval import suite
from eval.benchmarks import count_simple_tokens, dataset_of, load

ROOT = pathlib.Path(__file__).resolve().parents[2]
RULER = {"ruler_niah_multikey", "ruler_niah_multivalue", "ruler_vt", "ruler_cwe", "ruler_fwe"}
RUNNER_KEYS = ("max_new_tokens", "answer_prefix", "max_prompt_tokens")


@pytest.fixture
def nothing(tmp_path, monkeypatch):
    monkeypatch.delenv("KVJAX_DATA", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def test_with_no_data_everything_is_generated(nothing):
    benches = suite.default_benchmarks()
    assert set(benches) == {"text2json_synth", "multineedle_synth"} | RULER
    assert all(dataset_of(b) is None for b in benches)
    src = suite.default_sources()
    assert src["multineedle"].startswith("not run") and "kvjax data download" in src["longproc"]
    for name, opts in benches.items():  # every option set builds, offline
        params = {k: v for k, v in opts.items() if k not in RUNNER_KEYS}
        samples, report = load(name, count_tokens=count_simple_tokens, **{**params, "n_samples": 1})
        assert len(samples) == 1 and report.source == {"kind": "generated", "seed": 0}


def test_real_data_replaces_the_generated_multineedle_and_adds_longproc(shared_dir, monkeypatch):
    data = shared_dir / "data"
    if not (data / "needlebench" / "needles.jsonl").exists() or not (data / "longproc").is_dir():
        pytest.skip("real data absent")
    monkeypatch.delenv("KVJAX_DATA", raising=False)
    benches = suite.default_benchmarks(data)
    assert set(benches) == {"text2json_synth", "multineedle", "longproc"} | RULER
    assert suite.default_sources(data)["multineedle"] == f"{data / 'needlebench'} (--data-dir)"
    opts = {k: v for k, v in benches["longproc"].items() if k not in RUNNER_KEYS}
    samples, report = load("longproc", data_dir=data, **opts)
    assert sorted(s.id for s in samples) == sorted(opts["task_ids"])  # in file order
    assert report.source["kind"] == "local" and report.source["via"] == "--data-dir"


def test_longproc_without_the_default_pages_is_left_out(nothing, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    split = tmp_path / "root" / "longproc" / "html_to_tsv_0.5k"
    split.mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist([{"id": "other", "input_prompt": "p", "reference_output": "h\nx",
                                          "metadata": "{}"}]), split / "test-00000-of-00001.parquet")
    assert "longproc" not in suite.default_benchmarks(tmp_path / "root")
    assert "lacks the pages" in suite.default_sources(tmp_path / "root")["longproc"]
    row = {"input_prompt": "p", "reference_output": "h\nx"}
    pq.write_table(pa.Table.from_pylist([{**row, "id": i, "metadata": json.dumps({"task_id": i})}
                                         for i in suite.LONGPROC["longproc"]["task_ids"]]),
                   split / "test-00000-of-00001.parquet")
    assert "longproc" in suite.default_benchmarks(tmp_path / "root")


def test_eval_with_a_missing_data_dir_stops_before_the_model_loads(tmp_path, capsys):
    from kvjax import cli

    assert cli.main(["eval", "--data-dir", str(tmp_path / "nope"), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert re.fullmatch(r"kvjax: error: --data-dir .*nope.* is not a folder; allowed: .*", err), err
    assert not (tmp_path / "out").exists()


def _copy_package(dst: pathlib.Path) -> None:
    for pkg in ("kvjax", "models", "pallas_kernels", "eval"):
        shutil.copytree(ROOT / pkg, dst / pkg, ignore=shutil.ignore_patterns("__pycache__"))


@pytest.mark.slow
def test_first_run_on_a_fresh_machine_needs_no_data_and_no_network(tmp_path):
    """`python -m kvjax.cli eval --max-samples 1` (short) from a copy of the package, KVJAX_DATA unset, HF_HUB_OFFLINE=1,
    an empty HOME: one record per (benchmark, default method), none failed, every one saying it was generated."""
    pkg = tmp_path / "pkg"
    _copy_package(pkg)
    work = tmp_path / "work"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("KVJAX_DATA", "XDG_CACHE_HOME", "PYTHONPATH")}
    env.update(PYTHONPATH=str(pkg), HF_HUB_OFFLINE="1", HOME=str(tmp_path / "home"))
    # what is checked is where the data came from and that every default method ran: 4 new tokens, no fidelity
    # measurement, every prompt at ~900 tokens (above min_seqlen_to_prune; one prompt bucket, one compile per stage)
    short = [a for b in sorted({"text2json_synth", "multineedle_synth"} | RULER)
             for a in ("--bench-opt", f"{b}.target_tokens=900")]
    p = subprocess.run([sys.executable, "-m", "kvjax.cli", "eval", "--max-samples", "1", "--max-new-tokens", "4",
                        "--no-fidelity", *short, "--no-progress", "--no-plots"],
                       cwd=work, env=env, capture_output=True, text=True, timeout=3000)
    assert p.returncode == 0, p.stderr[-3000:]
    out = work / "runs" / "default"
    recs = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    expected = {"text2json_synth", "multineedle_synth"} | RULER
    assert {r["benchmark"] for r in recs} == expected
    got = {(r["benchmark"], r["method"], r["budget"]) for r in recs}
    assert got == {(b, m, bud) for b in expected for m, bud in (("full", "-"), ("yakv", "1/32"),
                                                                  ("shadowkv", "1/64"))}
    assert not [r for r in recs if r.get("error")], [r["error"] for r in recs if r.get("error")]
    assert all(r["data_source"] == {"kind": "generated", "seed": 0} for r in recs)
    md = (out / "summary.md").read_text()
    assert "sources: " in md and "multineedle_synth: generated (seed 0)" in md and "| yakv | 1/32 |" in p.stdout
    assert not (tmp_path / "home" / ".cache" / "kvjax").exists()  # nothing was downloaded
    assert str(ROOT) not in p.stdout + p.stderr  # the copy ran, not the checkout
