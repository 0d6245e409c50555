"""Safe output folders: one `kvjax eval` at a time holds --out (a second refuses naming the holder, or waits with
--wait), a lock left by a killed run is taken over, a killed run resumes to the same records, and a folder that
cannot be written still shows its finished run's summary."""
import json
import os
import pathlib
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time

import pytest

from eval import store, summary

REPO = pathlib.Path(__file__).resolve().parents[2]
TINY = str(REPO / "tests" / "fixtures" / "hf" / "tiny_llama")
TOY = ["--preset", "toy", "--models", TINY, "--methods", "full,yakv", "--bench-opt", "toy_retrieval.n_samples=2",
       "--bench-opt", "toy_retrieval.max_new_tokens=4", "--no-progress", "--no-plots"]
ENV = {**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu",
       "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
VOLATILE = {"seconds", "prefill_s", "build_s", "decode_s", "fidelity_s", "finished_at", "process", "fidelity"}


def eval_proc(out, *extra, **kw):
    return subprocess.Popen([sys.executable, "-m", "kvjax.cli", "eval", *TOY, "--out", str(out), *extra], cwd=REPO,
                            env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def finish(p, timeout=600):
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        p.kill()
        pytest.fail("eval subprocess timed out")
    return p.returncode, out, err


def lines_of(path):
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def test_a_second_run_is_refused_naming_the_holder(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    with store.OutputLock(store.lock_path(out), f"--out {out}"):
        rc, _, err = finish(eval_proc(out))
    assert rc == 2 and "Traceback" not in err, err[-2000:]
    line = [x for x in err.splitlines() if x.startswith("kvjax: error: ")]
    assert len(line) == 1 and f"PID {os.getpid()} on host {socket.gethostname()}" in line[0], err
    assert "--wait" in line[0] and str(out) in line[0]
    assert not (out / "results.jsonl").exists()  # refused before touching the records
    assert store.lock_path(out).read_text() == ""  # released cleanly: no holder recorded


def test_a_lock_left_by_a_killed_holder_is_taken_over(tmp_path):
    lock = tmp_path / "eval.lock"
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys, time
        from eval import store
        held = store.OutputLock({str(lock)!r}, "--out x").acquire()
        print("held", flush=True)
        time.sleep(600)""")], cwd=REPO, env=ENV, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(store.OutputLocked, match=f"PID {holder.pid} on host"):
        store.OutputLock(lock, "--out x").acquire()
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    lk = store.OutputLock(lock, "--out x").acquire()  # the kernel dropped the flock; the record is stale
    assert lk.stale["pid"] == holder.pid and json.loads(lock.read_text())["pid"] == os.getpid()
    lk.release()


@pytest.mark.slow
def test_two_concurrent_evals_store_each_record_once(tmp_path):
    out = tmp_path / "run"
    a, b = eval_proc(out, "--wait"), eval_proc(out, "--wait")
    (ra, oa, ea), (rb, ob, eb) = finish(a), finish(b)
    assert ra == rb == 0, (ea[-2000:], eb[-2000:])
    keys = [r["key"] for r in lines_of(out / "results.jsonl")]
    assert len(keys) == len(set(keys)) == 2 * 2  # 2 samples x (full, yakv), each stored once
    computed = sorted(int(o.split("computed ")[1].split(" record")[0]) for o in (oa, ob))
    assert computed == [0, 4]  # one run computed everything, the one that waited found it finished
    assert "waiting for it to finish" in ea + eb


@pytest.mark.slow
def test_sigkill_mid_run_and_a_cut_line_resume_to_the_same_records(tmp_path):
    more = ("--bench-opt", "toy_retrieval.n_samples=4")  # 8 records: the kill lands mid-run
    ref = tmp_path / "ref"
    assert finish(eval_proc(ref, *more))[0] == 0
    for attempt in range(3):  # the kill must land while the run still holds the lock with records to go
        out = tmp_path / f"run{attempt}"
        p = eval_proc(out, *more)
        deadline = time.monotonic() + 600
        while not ((out / "results.jsonl").exists() and len(lines_of(out / "results.jsonl")) >= 1):
            assert p.poll() is None and time.monotonic() < deadline, "the run ended before it could be killed"
            time.sleep(0.05)
        alive = p.poll() is None
        p.send_signal(signal.SIGKILL)
        p.wait()
        if alive and len(lines_of(out / "results.jsonl")) < 8:
            break
    else:
        pytest.fail("three runs finished before the kill landed")
    done = lines_of(out / "results.jsonl")
    with open(out / "results.jsonl", "a") as f:
        f.write('{"key": "smollm2|cut in the mid')  # a write cut by the kill
    rc, _, err = finish(eval_proc(out, *more))
    assert rc == 0, err[-2000:]
    assert "taking over the lock of a run that ended without releasing it" in err and f"PID {p.pid}" in err
    assert "dropped 1 unreadable line" in err
    got = {r["key"]: r for r in lines_of(out / "results.jsonl")}
    want = {r["key"]: r for r in lines_of(ref / "results.jsonl")}
    assert len(lines_of(out / "results.jsonl")) == len(got) == len(want) == 8
    for k in want:
        assert {x: v for x, v in got[k].items() if x not in VOLATILE} == \
            {x: v for x, v in want[k].items() if x not in VOLATILE}, k
        assert got[k]["fidelity"]["top1_agreement"] == want[k]["fidelity"]["top1_agreement"]
    for r in done:  # records finished before the kill were kept, not recomputed
        assert got[r["key"]]["finished_at"] == r["finished_at"]


def _records(tmp):
    def rec(sid, method, budget, found):
        return {"key": f"m|toy_retrieval|{sid}|{method}|{budget}", "model": "m", "benchmark": "toy_retrieval",
                "sample_id": sid, "method": method, "budget": budget,
                "budget_fraction": 1.0 if method == "full" else 1 / 32, "score": {"score": found},
                "fidelity": {"n_steps": 4, "first_divergence": None, "kl_mean": 0.0, "top1_agreement": 1.0},
                "prompt_tokens": 100, "n_generated": 4, "seconds": 1.0}

    return [rec("s0", "full", "-", 1.0), rec("s0", "yakv", "1/32", 0.0), rec("s1", "full", "-", 1.0),
            rec("s1", "yakv", "1/32", 1.0)]


def _read_only_cmd(folder: pathlib.Path, argv: list[str]) -> list[str] | None:
    """The command run with ``folder`` read-only: plain when not root (after chmod), else inside a private mount
    namespace with a read-only bind mount of it (root ignores permission bits); None when neither is possible."""
    if os.geteuid() != 0:
        return argv
    if shutil.which("unshare") is None:
        return None
    probe = subprocess.run(["unshare", "-m", "sh", "-c", f"mount --bind {folder} {folder} && "
                            f"mount -o remount,bind,ro {folder} && ! touch {folder}/probe 2>/dev/null"],
                           capture_output=True)
    if probe.returncode != 0:
        return None
    quoted = " ".join("'" + a.replace("'", "'\\''") + "'" for a in argv)
    return ["unshare", "-m", "sh", "-c", f"mount --bind {folder} {folder} && mount -o remount,bind,ro {folder} && "
            f"exec {quoted}"]


def test_a_read_only_folder_still_shows_its_summary(tmp_path):
    folder = tmp_path / "finished"
    folder.mkdir()
    recs = _records(tmp_path)
    (folder / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    empty = tmp_path / "empty"
    empty.mkdir()
    argv = [sys.executable, "-m", "kvjax.cli", "eval", *TOY]
    cmd = _read_only_cmd(folder, argv + ["--out", str(folder)])
    if cmd is None:
        pytest.skip("cannot make a folder read-only for root here (no unshare / mount)")
    for d in (folder, empty):
        os.chmod(d, 0o555)
    try:
        before = sorted(os.listdir(folder))
        r = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-2000:]
        want, _, _ = summary.render(recs)
        assert want.strip() in r.stdout and "| yakv | 1/32 | 2 | 50" in r.stdout
        assert "not writable" in r.stderr and "nothing was computed or written" in r.stderr
        assert sorted(os.listdir(folder)) == before  # no lock, summary or plots written
        r = subprocess.run(_read_only_cmd(empty, argv + ["--out", str(empty)]), cwd=REPO, env=ENV,
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
        assert f"kvjax: error: --out {empty}: not writable" in r.stderr and "no finished records" in r.stderr
    finally:
        for d in (folder, empty):
            os.chmod(d, 0o755)
