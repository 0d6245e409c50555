"""`kvjax eval --distributed`: two local CPU processes (jax.distributed on 127.0.0.1) split the samples, write part
files and process 0 merges them into the same records one process produces."""
import os
import pathlib
import socket
import subprocess
import sys

import pytest

import argparse

from eval import cli as eval_cli, runner, store

REPO = pathlib.Path(__file__).resolve().parents[2]
TINY = str(REPO / "tests" / "fixtures" / "hf" / "tiny_llama")
COMMON = ["--preset", "toy", "--models", TINY, "--methods", "full,yakv", "--bench-opt", "toy_retrieval.n_samples=3",
          "--bench-opt", "toy_retrieval.max_new_tokens=5", "--no-progress", "--no-plots"]
VOLATILE = {"seconds", "prefill_s", "build_s", "decode_s", "fidelity_s", "finished_at", "process"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stable(rec: dict) -> dict:
    return {k: v for k, v in rec.items() if k not in VOLATILE and k != "fidelity"}


@pytest.mark.slow
def test_two_processes_merge_to_the_single_process_records(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    p = argparse.ArgumentParser()
    eval_cli.add_args(p)
    single = runner.run(eval_cli.config_from_args(p.parse_args(COMMON + ["--out", str(one)])))
    assert single["computed"] == 6

    port = _free_port()
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=1",
           "PYTHONPATH": str(REPO)}
    procs = [subprocess.Popen(
        [sys.executable, "-m", "eval.cli", *COMMON, "--out", str(two), "--distributed",
         "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2", "--process-id", str(i),
         "--merge-timeout", "300"], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for i in range(2)]
    outs = []
    for pr in procs:
        try:
            outs.append(pr.communicate(timeout=600)[0])
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            pytest.fail("distributed run timed out")
    for pr, out in zip(procs, outs):
        assert pr.returncode == 0, out[-3000:]

    a = {r["key"]: r for r in store.load_records(one / "results.jsonl")}
    b = {r["key"]: r for r in store.load_records(two / "results.jsonl")}
    assert set(a) == set(b) and len(b) == 6
    lines = (two / "results.jsonl").read_text().splitlines()
    assert len(lines) == 6  # merged once, no duplicates
    for k in a:
        assert _stable(a[k]) == _stable(b[k]), k
        fa, fb = a[k]["fidelity"], b[k]["fidelity"]
        assert fa["top1_agreement"] == fb["top1_agreement"] and fa["first_divergence"] == fb["first_divergence"]
        assert fa["kl_mean"] == pytest.approx(fb["kl_mean"], rel=1e-5, abs=1e-9)
    # samples i::2 went to process i
    order = sorted({r["sample_id"] for r in b.values()})
    for r in b.values():
        assert r["process"] == order.index(r["sample_id"]) % 2
    assert not list((two / "parts").glob("*")), "merged parts and done markers are removed"
    assert (two / "summary.md").exists() and (two / "summary.csv").exists()
