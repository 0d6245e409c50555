"""scripts/accelerator_check.sh: argument errors, its --dry-run end to end on CPU, and a failing kernel test making
it exit non-zero."""
import json
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "accelerator_check.sh"


def _run(*args, env=None, timeout=900):
    env = {**os.environ, "PYTHON": sys.executable, "PYTHONPATH": str(ROOT), **(env or {})}
    env.pop("KVJAX_TEST_COMPILED", None)
    return subprocess.run(["bash", str(SCRIPT), *map(str, args)], capture_output=True, text=True, env=env,
                          timeout=timeout, cwd=ROOT)


def test_argument_errors(tmp_path):
    r = _run()
    assert r.returncode == 2 and "usage:" in r.stderr
    r = _run(tmp_path, "--dry-run", "--steps", "kernels,bogus")
    assert r.returncode == 2 and "--steps: unknown step 'bogus'" in r.stderr and "Traceback" not in r.stderr
    r = _run(tmp_path, "--fast")
    assert r.returncode == 2 and "unknown option --fast" in r.stderr


@pytest.mark.slow
def test_dry_run_passes_and_reports(tmp_path):
    out = tmp_path / "check"
    r = _run(out, "--dry-run")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    rep = json.loads((out / "check.json").read_text())
    assert rep["platform"] == "cpu" and rep["dry_run"] and not rep["failed"]
    steps = {s["step"]: s for s in rep["steps"]}
    assert {"kernels", "score", "decode_2560"} <= set(steps) and all(steps[k]["rc"] == "0" for k in steps)
    assert rep["kernels"]["counts"]["passed"] >= 4 and rep["kernels"]["counts"]["FAILED"] == 0
    assert {r["method"] for r in rep["decode"]} == {"full", "yakv", "yakv-serving", "shadowkv",
                                                   "full (KVJAX_KERNELS=reference)"}
    assert steps["decode_2560_full_reference"]["rc"] == "0"
    assert {(r["mode"], r["landmarks"]) for r in rep["score"]} == {("serve", 1024), ("eval", 1024)}
    summary = (out / "summary.md").read_text()
    assert "## Decode step" in summary and "**PASSED**" in summary
    assert json.loads((out / "decode_2560.json").read_text())["rows"]
    mem = json.loads((out / "memory.json").read_text())["rows"]  # the decode length, not bench memory's default
    assert steps["memory"]["rc"] == "0" and {r["prompt_tokens"] for r in mem} == {2560}


@pytest.mark.slow
def test_a_failing_kernel_test_fails_the_check(tmp_path):
    """A `compiled` kernel test that fails (a kernel differing from its reference; named to match the dry run's -k
    selection, added through PYTEST_ADDOPTS) makes the script exit 1 and the summary name it (--steps kernels)."""
    bad = tmp_path / "test_small_blocks_broken.py"
    bad.write_text("import pytest\n\n\n@pytest.mark.compiled\ndef test_small_blocks_serve_kernel_differs():\n"
                   "    assert 1.0 == 1.5\n")
    out = tmp_path / "check"
    r = _run(out, "--dry-run", "--steps", "kernels", env={"PYTEST_ADDOPTS": str(bad)})
    assert r.returncode == 1, r.stdout[-3000:]
    rep = json.loads((out / "check.json").read_text())
    assert rep["failed"] and rep["kernels"]["counts"]["FAILED"] == 1
    assert "test_small_blocks_serve_kernel_differs" in (out / "summary.md").read_text()
