"""Every user mistake at the `kvjax` command line is one clean line: `kvjax: error: ...` on stderr, exit status 2, no
traceback (unless -v), the message naming the argument; mistakes in the arguments are caught before any model loads.

Each case runs `python -m kvjax.cli` in a subprocess. Where the model is not the mistake, `--model` names a path that
does not exist: the model is looked up only after every other argument is checked, so the expected message winning
over "unknown model" shows the mistake was caught before a model would have been loaded (no timing involved)."""
import os
import pathlib
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[2]
NOPE = "/nonexistent/model-dir"


def kvjax(*argv, cwd=None):
    env = {**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu"}
    return subprocess.run([sys.executable, "-m", "kvjax.cli", *argv], cwd=cwd or REPO, env=env, capture_output=True,
                          text=True, timeout=300)


def assert_usage_error(r, *needles):
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    assert "Traceback" not in r.stderr, r.stderr[-2000:]
    lines = [x for x in r.stderr.splitlines() if x.startswith("kvjax: error: ")]
    assert len(lines) == 1, r.stderr
    for n in needles:
        assert n in lines[0], (n, lines[0])
    if not any(NOPE in n for n in needles):  # the mistake, not the (missing) model, was reported
        assert NOPE not in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def latin1_file(tmp_path_factory):
    p = tmp_path_factory.mktemp("prompt") / "latin1.txt"
    p.write_bytes("Grüße aus Köln".encode("latin-1"))
    return str(p)


GENERATE = [
    # (argv after "generate", words the one error line must contain)
    (["--method", "nosuch"], ["--method", "'nosuch'", "allowed:", "yakv", "arkvale"]),
    (["--method", "yakv", "--budget", "-1"], ["--budget", "'-1'", ">= 1", "(0, 1]"]),
    (["--method", "yakv", "--budget", "0"], ["--budget", "'0'", ">= 1", "--policy-opt sparse_budget=0"]),
    (["--method", "yakv", "--budget", "1.5"], ["--budget", "'1.5'", "(0, 1]"]),
    (["--method", "yakv", "--budget", "half"], ["--budget", "'half'", "1/64"]),
    (["--method", "full", "--budget", "0.5"], ["--budget 0.5", "full", "takes no budget", "arkvale"]),
    (["--method", "yakv", "--policy-opt", "local_budget=-5"], ["--policy-opt local_budget=-5", "local_budget=-5",
                                                               ">= 0"]),
    (["--method", "arkvale", "--policy-opt", "sparse_budget=8"], ["--policy-opt sparse_budget", "arkvale",
                                                                  "allowed:", "budget"]),
    (["--method", "yakv", "--budget", "1/8", "--policy-opt", "sparse_budget=0.5"], ["--budget 1/8",
                                                                                    "sparse_budget", "one of"]),
    (["--policy-opt", "nokeyvalue"], ["--policy-opt 'nokeyvalue'", "KEY=VALUE"]),
    (["--mesh", "3x5"], ["--mesh '3x5'", "15 devices", "available"]),
    (["--mesh", "two"], ["--mesh 'two'", "DATAxMODEL"]),
    (["--top-p", "2"], ["--top-p 2.0", "(0, 1]"]),
    (["--max-new-tokens", "0"], ["--max-new-tokens 0", ">= 1"]),
]


@pytest.mark.parametrize("argv,needles", GENERATE, ids=[" ".join(a) for a, _ in GENERATE])
def test_generate_argument_errors_come_before_the_model(argv, needles):
    assert_usage_error(kvjax("generate", "--model", NOPE, "--prompt", "hi", *argv), *needles)


def test_generate_prompt_file_errors(tmp_path, latin1_file):
    assert_usage_error(kvjax("generate", "--model", NOPE, "--prompt-file", str(tmp_path / "missing.txt")),
                       "--prompt-file", "missing.txt", "No such file")
    assert_usage_error(kvjax("generate", "--model", NOPE, "--prompt-file", latin1_file),
                       "--prompt-file", "latin1.txt", "not UTF-8")
    assert_usage_error(kvjax("generate", "--model", NOPE), "--prompt", "--prompt-file")


def test_unknown_model_lists_the_known_names():
    line = assert_usage_error(kvjax("generate", "--model", "no-such-model", "--prompt", "hi"),
                              "--model 'no-such-model'", "smollm2-135m")
    assert "llama-3.1-8b-instruct" in line


def test_verbose_shows_the_traceback():
    r = kvjax("generate", "--model", NOPE, "--prompt", "hi", "--method", "nosuch", "-v")
    assert r.returncode == 2 and "Traceback" in r.stderr and "kvjax: error: --method 'nosuch'" in r.stderr


def test_convert_and_bench_argument_errors(tmp_path):
    f = tmp_path / "a_file"
    f.write_text("x")
    assert_usage_error(kvjax("convert", "--model", NOPE, "--out", str(f)), "--out", "is a file")
    full = tmp_path / "full"
    full.mkdir()
    (full / "keep.txt").write_text("data")
    assert_usage_error(kvjax("convert", "--model", NOPE, "--out", str(full)), "--out", "non-empty")
    assert_usage_error(kvjax("convert", "--model", NOPE, "--out", str(tmp_path / "new")), f"--model '{NOPE}'")
    assert not (tmp_path / "new").exists() or not any((tmp_path / "new").iterdir())
    assert_usage_error(kvjax("bench", "decode", "--methods", "full,nosuch"), "--methods", "'nosuch'", "allowed:")
    assert_usage_error(kvjax("bench", "decode", "--methods", "yakv[local_budget=-5]"), "--methods",
                       "local_budget=-5")
    assert_usage_error(kvjax("bench", "decode", "--lengths", "1024,0"), "--lengths", ">= 1")
    assert_usage_error(kvjax("bench", "decode", "--shape", "nosuch"), "--shape 'nosuch'", "smollm2-135m")
    assert_usage_error(kvjax("bench", "generate", "--model", "nosuch"), "--model 'nosuch'")


EVAL = [
    (["--methods", ""], ["--methods ''", "names nothing"]),
    (["--models", ""], ["--models ''", "names nothing"]),
    (["--benchmarks", " , "], ["--benchmarks", "names nothing"]),
    (["--methods", "full,nosuch"], ["--methods", "'nosuch'", "allowed:", "shadowkv"]),
    (["--benchmarks", "nosuch"], ["--benchmarks", "'nosuch'", "allowed:", "multineedle"]),
    (["--budgets", "-1"], ["--budgets '-1'", ">= 1"]),
    (["--budgets", "1/64,0"], ["--budgets '0'", ">= 1"]),
    (["--policy-opt", "yakv.local_budget=-5"], ["--policy-opt", "local_budget=-5", ">= 0"]),
    (["--policy-opt", "yakv.nosuch=1"], ["--policy-opt yakv.nosuch", "allowed:", "local_budget"]),
    (["--policy-opt", "quest.budget=0.1"], ["--policy-opt", "'quest'", "not among the methods"]),
    (["--bench-opt", "toy_retrieval.n_pairs=3"], ["--bench-opt", "'toy_retrieval'", "not among the benchmarks"]),
    (["--mesh", "3x5"], ["--mesh '3x5'", "15 devices"]),
    (["--max-samples", "0"], ["--max-samples=0", ">= 1"]),
]


@pytest.mark.parametrize("argv,needles", EVAL, ids=[" ".join(a) or "empty" for a, _ in EVAL])
def test_eval_argument_errors_come_before_the_model(argv, needles, tmp_path):
    out = tmp_path / "run"
    assert_usage_error(kvjax("eval", "--models", NOPE, "--out", str(out), *argv), *needles)
    assert not out.exists()  # nothing was written either


def test_eval_unknown_model_and_its_own_entry(tmp_path):
    assert_usage_error(kvjax("eval", "--models", "smollm2-135m,nosuch", "--out", str(tmp_path / "r")),
                       "--models 'nosuch'", "smollm2-135m")
    env = {**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu"}
    r = subprocess.run([sys.executable, "-m", "eval.cli", "--models", NOPE, "--methods", "nosuch"], cwd=REPO,
                       env=env, capture_output=True, text=True, timeout=300)
    assert_usage_error(r, "--methods", "'nosuch'")
