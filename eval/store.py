"""Where ``kvjax eval`` keeps its results: the append-only records file, the parts of a distributed run and their
merge, the run manifest, and the lock that keeps a second run out of a folder in use.

Layout of an output folder: ``results.jsonl`` (one JSON record per line, keyed by ``record["key"]`` =
``model|benchmark|sample_id|method|budget``), ``run_config.json`` (the manifest: settings that change a record's
content beyond its key), and under ``--distributed`` ``parts/results.part-i-of-n.jsonl`` and
``parts/done-i-of-n.json`` per process, and the lock files ``eval.lock`` (``eval.lock.part-i-of-n``) naming the run
that holds the folder (its part). Every record is flushed and fsynced when written, so a killed run loses at
most the line in flight; unreadable (half-written) lines are dropped on load.
"""
from __future__ import annotations

import fcntl
import json
import os
import pathlib
import socket
import sys
import time
from typing import Any, Mapping, Sequence

from kvjax.options import UsageError


def record_key(model: str, benchmark: str, sample_id: str, method: str, budget: str) -> str:
    return f"{model}|{benchmark}|{sample_id}|{method}|{budget}"


def load_records(path: str | os.PathLike) -> list[dict]:
    """Records of a results JSONL file, one per key: the first, unless a later one without ``error`` replaces an
    error record (a retried failure). Unreadable lines are skipped."""
    out: dict[str, dict] = {}
    p = pathlib.Path(path)
    if not p.exists():
        return []
    with open(p, encoding="utf-8", errors="replace") as f:
        for line in f:
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if not isinstance(rec, dict) or not isinstance(rec.get("key"), str):
                continue
            keep_record(out, rec)
    return list(out.values())


def keep_record(records: dict[str, dict], rec: dict) -> None:
    """Keep the first record of a key, except that a record without ``error`` replaces an error record."""
    old = records.get(rec["key"])
    if old is None or (old.get("error") and not rec.get("error")):
        records[rec["key"]] = rec


class ResultStore:
    """Append-only JSONL of records keyed by ``record["key"]``.

    Existing records are read from ``read_paths`` and ``path`` (first occurrence of a key wins); unreadable lines
    of ``path`` (a write cut by a kill) are dropped by rewriting it atomically. ``add`` appends one line, flushes
    and fsyncs, and refuses a key already present."""

    def __init__(self, path: str | os.PathLike, read_paths: Sequence[str | os.PathLike] = ()):
        self.path = pathlib.Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.records: dict[str, dict] = {}
        self.dropped = 0
        for p in list(read_paths) + [self.path]:
            self._load(pathlib.Path(p), repair=pathlib.Path(p) == self.path)
        self._f = open(self.path, "a", encoding="utf-8")

    def _load(self, p: pathlib.Path, repair: bool) -> None:
        if not p.exists():
            return
        good, bad = [], 0
        with open(p, encoding="utf-8", errors="replace") as f:
            for line in f:
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    bad += 1
                    continue
                if not isinstance(rec, dict) or not isinstance(rec.get("key"), str):
                    bad += 1
                    continue
                good.append(line if line.endswith("\n") else line + "\n")
                keep_record(self.records, rec)
        if bad and repair:
            tmp = p.with_suffix(p.suffix + ".tmp")
            with open(tmp, "w", encoding="utf-8") as f:
                f.writelines(good)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, p)
            self.dropped += bad
            log(f"{p}: dropped {bad} unreadable line(s) (a write cut short)")
        elif repair and p.stat().st_size:
            with open(p, "rb") as f:
                f.seek(-1, os.SEEK_END)
                last = f.read(1)
            if last != b"\n":  # a complete last record without its newline: finish the line before appending
                with open(p, "a", encoding="utf-8") as f:
                    f.write("\n")

    def __contains__(self, key: str) -> bool:
        return key in self.records

    def get(self, key: str) -> dict | None:
        return self.records.get(key)

    def add(self, rec: dict) -> bool:
        if rec["key"] in self.records:
            return False
        self._f.write(json.dumps(rec, ensure_ascii=False) + "\n")
        self._f.flush()
        os.fsync(self._f.fileno())
        self.records[rec["key"]] = rec
        return True

    def replace(self, rec: dict) -> None:
        """Append a newer record of a key whose stored record is an error (``--retry-errors``); on load a record
        without ``error`` takes precedence over an error record of the same key."""
        self._f.write(json.dumps(rec, ensure_ascii=False) + "\n")
        self._f.flush()
        os.fsync(self._f.fileno())
        self.records[rec["key"]] = rec

    def close(self) -> None:
        self._f.close()


def merge_parts(out: pathlib.Path, part_paths: Sequence[pathlib.Path]) -> int:
    """Merge part files into ``out/results.jsonl`` (existing records first; first record of a key wins); written
    atomically. Returns the number of records."""
    main = out / "results.jsonl"
    seen: dict[str, dict] = {}
    for p in [main, *part_paths]:
        for rec in load_records(p):  # per file the same rule, so merging files keeps it
            keep_record(seen, rec)
    tmp = main.with_suffix(".jsonl.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for rec in seen.values():
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, main)
    return len(seen)


def check_manifest(out: pathlib.Path, manifest: Mapping[str, Any], write: bool = True) -> None:
    """Compare ``manifest`` (JSON-able settings that determine the records' content beyond their keys) with
    ``out/run_config.json``: warn on stderr when they differ (finished records keep their old settings), write
    it atomically when absent and ``write``."""
    path = pathlib.Path(out) / "run_config.json"
    cur = json.loads(json.dumps(manifest, default=str))
    if path.exists():
        try:
            old = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            old = None
        if old is not None and old != cur:
            diff = sorted(k for k in set(old) | set(cur) if old.get(k) != cur.get(k))
            log(f"warning: {path} was written with other settings ({', '.join(diff)}); finished records keep "
                f"their old settings (keys are model|benchmark|sample|method|budget). Use a new --out to redo them.")
        return
    if not write:
        return
    tmp = path.with_suffix(f".json.tmp{os.getpid()}")
    tmp.write_text(json.dumps(cur, indent=1))
    os.replace(tmp, path)


def done_marker(out: pathlib.Path, pid: int, n: int) -> pathlib.Path:
    """``out/parts/done-{pid}-of-{n}.json``: written by process ``pid`` of ``n`` when it has finished."""
    return pathlib.Path(out) / "parts" / f"done-{pid}-of-{n}.json"


def part_path(out: pathlib.Path, pid: int, n: int) -> pathlib.Path:
    """``out/parts/results.part-{pid}-of-{n}.jsonl``: the records of process ``pid`` of ``n``."""
    return pathlib.Path(out) / "parts" / f"results.part-{pid}-of-{n}.jsonl"


class OutputLocked(UsageError):
    """Another live run holds the output folder (or this process's part of it)."""


class OutputLock:
    """An exclusive lock on an output folder or on one process's part of it: ``fcntl.flock`` on the lock file
    ``path`` (kept in the folder; the kernel drops the lock when its holder exits, SIGKILL included), which also
    records the holder (PID, host, start time, command) for the message of a refused run.

    :meth:`acquire` takes it, or raises :class:`OutputLocked` naming the holder, or with ``wait=True`` blocks until
    the holder is gone. A lock file that still names a holder although nobody holds the lock is stale (its run was
    killed): taken over, with a notice, and the previous holder kept in :attr:`stale`. :meth:`release` clears the
    record (a clean exit leaves an empty file) and unlocks. Opening the file raises ``OSError`` when the folder is
    not writable."""

    def __init__(self, path: str | os.PathLike, what: str, wait: bool = False):
        self.path = pathlib.Path(path)
        self.what = what
        self.wait = wait
        self.stale: dict | None = None
        self._f = None

    def _holder(self) -> dict:
        self._f.seek(0)
        try:
            rec = json.loads(self._f.read() or "{}")
        except json.JSONDecodeError:
            rec = {}
        return rec if isinstance(rec, dict) else {}

    def acquire(self) -> "OutputLock":
        self._f = open(self.path, "a+", encoding="utf-8")
        try:
            fcntl.flock(self._f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            who = _describe(self._holder())
            if not self.wait:
                self._f.close()
                self._f = None
                raise OutputLocked(f"{self.what} is in use by another kvjax eval ({who}); wait for it with --wait, "
                                   f"or give another --out") from None
            log(f"{self.what} is in use ({who}); waiting for it to finish (--wait)")
            fcntl.flock(self._f.fileno(), fcntl.LOCK_EX)
        prev = self._holder()
        if prev:
            self.stale = prev
            log(f"{self.what}: taking over the lock of a run that ended without releasing it ({_describe(prev)}; "
                f"killed?); its finished records are kept and the rest is resumed")
        me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
              "command": " ".join(sys.argv)}
        self._f.seek(0)
        self._f.truncate()
        self._f.write(json.dumps(me))
        self._f.flush()
        os.fsync(self._f.fileno())
        return self

    def release(self) -> None:
        if self._f is None:
            return
        self._f.seek(0)
        self._f.truncate()
        self._f.flush()
        fcntl.flock(self._f.fileno(), fcntl.LOCK_UN)
        self._f.close()
        self._f = None

    def __enter__(self) -> "OutputLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _describe(holder: Mapping[str, Any]) -> str:
    if not holder:
        return "holder unknown"
    return (f"PID {holder.get('pid')} on host {holder.get('host')}, started {holder.get('started')}: "
            f"{holder.get('command')}")


def lock_path(out: pathlib.Path, part: tuple[int, int] | None = None) -> pathlib.Path:
    """The lock file of the output folder ``out/eval.lock``, or of process ``i`` of ``n``'s part,
    ``out/eval.lock.part-i-of-n``."""
    name = "eval.lock" if part is None else f"eval.lock.part-{part[0]}-of-{part[1]}"
    return pathlib.Path(out) / name


def log(msg: str) -> None:
    """A progress or warning line of the harness on stderr (``[eval] msg``)."""
    print(f"[eval] {msg}", file=sys.stderr, flush=True)


__all__ = ["OutputLock", "OutputLocked", "ResultStore", "check_manifest", "done_marker", "keep_record", "load_records",
           "lock_path", "log", "merge_parts", "part_path", "record_key"]
