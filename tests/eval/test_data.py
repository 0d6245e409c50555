"""Where benchmark data comes from (eval/data.py): --data-dir > $KVJAX_DATA > kvjax's cache > the Hugging Face hub,
tested against a local stand-in of the hub (never the network), and the `kvjax data` command."""
import fnmatch
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
import types

import huggingface_hub
import huggingface_hub.constants
import pytest

from eval import data, data_cli, summary
from eval.benchmarks import SimpleCodec, build_multineedle, load

ROOT = pathlib.Path(__file__).resolve().parents[2]
ESSAY = " ".join(f"Essay sentence number {i} talks about nothing in particular." for i in range(400))


def _needlebench_files(folder: pathlib.Path, bad_lines: int = 0) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "PaulGrahamEssays.jsonl").write_text(
        "".join(json.dumps({"title": f"t{i}", "text": ESSAY}) + "\n" for i in range(3)) + "{cut\n" * bad_lines,
        encoding="utf-8")
    needles = [{"needle": f"The key of box {i} is Gold{i}.", "retrieval_question": f"What is the key of box {i}? "
                f"Please answer in the format 'The key of box {i} is ____.'", "arg1": f"box {i}", "arg2": f"Gold{i}",
                "type": 0, "language": "English"} for i in range(12)]
    (folder / "needles.jsonl").write_text("".join(json.dumps(n) + "\n" for n in needles), encoding="utf-8")


class StandInHub:
    """A local stand-in of the Hugging Face hub: repositories are folders the test writes; `dataset_info` resolves
    a revision to a commit, `snapshot_download` copies the files matching allow_patterns into local_dir."""

    def __init__(self, tmp: pathlib.Path):
        self.repos: dict[str, tuple[str, pathlib.Path]] = {}
        self.tmp = tmp
        self.calls: list[tuple] = []
        self.fail = False

    def add(self, repo: str, sha: str) -> pathlib.Path:
        folder = self.tmp / "hub" / repo.replace("/", "__")
        folder.mkdir(parents=True)
        self.repos[repo] = (sha, folder)
        return folder

    def dataset_info(self, repo_id, revision=None, **kw):
        self.calls.append(("dataset_info", repo_id, revision))
        if self.fail:
            raise ConnectionError("stand-in hub is down")
        return types.SimpleNamespace(sha=self.repos[repo_id][0])

    def snapshot_download(self, repo_id, *, repo_type=None, revision=None, allow_patterns=None, local_dir=None,
                          **kw):
        self.calls.append(("snapshot_download", repo_id, repo_type, revision, tuple(allow_patterns)))
        sha, folder = self.repos[repo_id]
        assert repo_type == "dataset" and revision == sha
        for p in folder.rglob("*"):
            rel = str(p.relative_to(folder))
            if p.is_file() and any(fnmatch.fnmatch(rel, pat) for pat in allow_patterns):
                (pathlib.Path(local_dir) / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(p, pathlib.Path(local_dir) / rel)
        return str(local_dir)


@pytest.fixture
def fresh(tmp_path, monkeypatch):
    """No data anywhere: KVJAX_DATA unset, an empty HOME (so an empty kvjax cache), online, a stand-in hub."""
    for var in ("KVJAX_DATA", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "XDG_CACHE_HOME"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    hub = StandInHub(tmp_path)
    monkeypatch.setattr(huggingface_hub, "dataset_info", hub.dataset_info)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", hub.snapshot_download)
    return hub


def test_cache_is_under_home_or_xdg(fresh, tmp_path, monkeypatch):
    assert data.cache_root() == tmp_path / "home" / ".cache" / "kvjax" / "data"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert data.cache_root() == tmp_path / "xdg" / "kvjax" / "data"


def test_data_dir_beats_env_beats_cache(fresh, tmp_path, monkeypatch):
    a, b = tmp_path / "a", tmp_path / "b"
    for root in (a, b, data.cache_root()):
        _needlebench_files(root / "needlebench")
    monkeypatch.setenv("KVJAX_DATA", str(b))
    got = data.locate("multineedle", a)
    assert (got.root, got.kind, got.via) == (a, "local", "--data-dir")
    got = data.locate("needlebench")
    assert (got.root, got.kind, got.via) == (b, "local", "KVJAX_DATA")
    monkeypatch.delenv("KVJAX_DATA")
    got = data.locate("needlebench")
    assert (got.root, got.kind) == (data.cache_root(), "cache")
    assert fresh.calls == []


def test_a_named_folder_is_the_only_place_looked_at(fresh, tmp_path, monkeypatch):
    fresh.add("opencompass/NeedleBench", "c0ffee" * 6 + "beef")
    _needlebench_files(data.cache_root() / "needlebench")  # would be found if the named folder were skipped
    (tmp_path / "mine").mkdir()
    with pytest.raises(data.DataNotFoundError, match=re.escape(str(tmp_path / "mine" / "needlebench"))) as e:
        data.locate("multineedle", tmp_path / "mine")
    assert "--data-dir" in str(e.value) and "kvjax data download" in str(e.value)
    monkeypatch.setenv("KVJAX_DATA", str(tmp_path / "typo"))
    with pytest.raises(data.DataNotFoundError, match=r"KVJAX_DATA=.*typo.* is not a folder"):
        data.locate("needlebench")
    with pytest.raises(data.DataNotFoundError, match=r"--data-dir .*nope.* is not a folder"):
        data.find("needlebench", tmp_path / "nope")
    assert fresh.calls == []  # never downloaded around a folder the user named


def test_hub_download_then_cache_reuse(fresh):
    sha = "1234567890abcdef1234567890abcdef12345678"
    repo = fresh.add("opencompass/NeedleBench", sha)
    _needlebench_files(repo)
    (repo / "zh_finance.jsonl").write_text("{}\n", encoding="utf-8")  # not asked for: must not be fetched

    got = data.locate("multineedle")
    assert (got.kind, got.repo, got.revision) == ("hub", "opencompass/NeedleBench", sha)
    assert got.path == data.cache_root() / "needlebench"
    assert sorted(p.name for p in got.path.iterdir() if p.is_file()) == [
        ".kvjax-source.json", "PaulGrahamEssays.jsonl", "needles.jsonl"]
    pinned = data.DATASETS["needlebench"].hub.revision
    assert fresh.calls[0] == ("dataset_info", "opencompass/NeedleBench", pinned)
    assert fresh.calls[1][:4] == ("snapshot_download", "opencompass/NeedleBench", "dataset", sha)
    manifest = json.loads((got.path / ".kvjax-source.json").read_text())
    assert manifest["revision"] == sha and manifest["repo"] == "opencompass/NeedleBench"
    assert manifest["files"]["needles.jsonl"] == (repo / "needles.jsonl").stat().st_size
    assert not [p for p in data.cache_root().iterdir() if p.name.startswith(".")]  # no partial folders left

    n_calls = len(fresh.calls)
    again = data.locate("needlebench")
    assert (again.kind, again.revision) == ("cache", sha) and len(fresh.calls) == n_calls
    samples, _ = build_multineedle(tokenizer=SimpleCodec(), context_length=1500, length_buffer=100, needle_count=3,
                                   n_samples=1)
    assert "Gold" in samples[0].gold and len(fresh.calls) == n_calls
    _, report = load("multineedle", tokenizer=SimpleCodec(), context_length=1500, length_buffer=100, needle_count=3,
                     n_samples=1)
    assert report.source == {"kind": "cache", "via": "kvjax cache", "dataset": "needlebench",
                             "path": str(got.path), "repo": "opencompass/NeedleBench", "revision": sha}
    assert summary.sources_line([{"benchmark": "multineedle", "data_source": report.source}]) == (
        f"sources: multineedle: {got.path} (kvjax cache; opencompass/NeedleBench@{sha[:12]})")


def test_offline_error_names_every_way_to_supply_data(fresh, monkeypatch):
    fresh.add("opencompass/NeedleBench", "ab" * 20)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(data.DataNotFoundError) as e:
        data.locate("multineedle")
    msg = str(e.value)
    for part in ("--data-dir", "KVJAX_DATA", "kvjax data download --benchmarks needlebench", "HF_HUB_OFFLINE",
                 "opencompass/NeedleBench", str(data.cache_root())):
        assert part in msg, (part, msg)
    assert fresh.calls == []
    with pytest.raises(data.DataNotFoundError, match="not public"):
        data.locate("text2json")


def test_failed_download_leaves_nothing_behind(fresh):
    fresh.add("PrincetonPLI/LongProc", "cd" * 20)
    fresh.fail = True
    with pytest.raises(data.DataNotFoundError, match=r"PrincetonPLI/LongProc.*stand-in hub is down"):
        data.locate("longproc")
    assert not data.cache_root().exists() or not any(data.cache_root().iterdir())


def _parquet(path: pathlib.Path, rows: list[dict]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)


def test_longproc_hub_form_through_the_stand_in(fresh):
    sha = "fe" * 20
    repo = fresh.add("PrincetonPLI/LongProc", sha)
    rows = [{"id": "W1_0.5k_1", "input_prompt": "[TASK] extract\n<html>a</html>", "reference_output": "h\nx",
             "metadata": json.dumps({"task_topic": "Cards", "website_id": "W1"})},
            {"id": "W1_0.5k_2", "input_prompt": "", "reference_output": "h\ny", "metadata": "{}"},
            {"id": "W2_0.5k_1", "input_prompt": "[TASK] more", "reference_output": "h\nz", "metadata": "{oops"},
            {"id": "W3_0.5k_1", "input_prompt": "[TASK] third", "reference_output": "h\nw", "metadata": "{}"}]
    _parquet(repo / "html_to_tsv_0.5k" / "test-00000-of-00001.parquet", rows)
    _parquet(repo / "path_traversal_0.5k" / "test-00000-of-00001.parquet", rows[:1])  # another task: not fetched
    with pytest.warns(UserWarning, match="skipped 2 malformed"):
        samples, report = load("longproc", split="html_to_tsv_0.5k")
    assert [(s.id, s.user_text, s.gold) for s in samples] == [
        ("W1_0.5k_1", "[TASK] extract\n<html>a</html>", "h\nx"), ("W3_0.5k_1", "[TASK] third", "h\nw")]
    assert samples[0].meta["task_topic"] == "Cards" and samples[0].meta["form"] == "hub"
    assert report.source["kind"] == "hub" and report.source["revision"] == sha
    assert any("'input_prompt'" in m for m in report.malformed) and any("metadata" in m for m in report.malformed)
    assert not (data.cache_root() / "longproc" / "path_traversal_0.5k").exists()
    with pytest.warns(UserWarning, match="malformed"):
        picked, _ = load("longproc", split="html_to_tsv_0.5k", task_ids=["W3_0.5k_1"])
    assert [s.id for s in picked] == ["W3_0.5k_1"]
    checks = data_cli.check_dataset(data.locate("longproc"))
    assert [(pathlib.Path(c.file).name, c.n_records, len(c.malformed)) for c in checks] == [("html_to_tsv_0.5k", 2, 2)]


# ------------------------------------------------------------------------------------------------ the command
def _kvjax(*argv):
    from kvjax import cli

    return cli.main(["data", *argv])


def test_data_command_download_list_check(fresh, tmp_path, capsys, monkeypatch):
    sha = "9a" * 20
    _needlebench_files(fresh.add("opencompass/NeedleBench", sha))
    assert _kvjax("download", "--benchmarks", "multineedle") == 0
    out = capsys.readouterr().out
    assert "needlebench: downloaded" in out and sha in out

    assert _kvjax("list", "--benchmarks", "needlebench,longproc") == 0
    out = capsys.readouterr().out
    line = next(x for x in out.splitlines() if x.startswith("needlebench") and "kvjax cache" in x)
    size = sum(p.stat().st_size for p in (data.cache_root() / "needlebench").glob("*.jsonl"))
    assert f"opencompass/NeedleBench@{sha[:12]}" in line and f"{size / 1000:.1f} kB (2 files)" in line
    assert line.rstrip().endswith("*")
    assert any(x.startswith("longproc") and "not available" in x for x in out.splitlines())
    assert "ruler_cwe" in out and "multineedle_synth" in out  # the generated benchmarks need no data

    assert _kvjax("check", "--benchmarks", "needlebench") == 0
    assert "PaulGrahamEssays.jsonl: 3 record(s), 0 malformed" in capsys.readouterr().out
    bad = tmp_path / "bad"
    _needlebench_files(bad / "needlebench", bad_lines=2)
    assert _kvjax("check", "--benchmarks", "multineedle", "--data-dir", str(bad)) == 1
    out = capsys.readouterr().out
    assert "PaulGrahamEssays.jsonl: 3 record(s), 2 malformed" in out and "line 4: invalid JSON" in out


def test_data_command_user_mistakes_are_one_line(fresh, capsys, monkeypatch):
    assert _kvjax("download", "--benchmarks", "nope") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("kvjax: error: --benchmarks 'nope'") and "needlebench" in err[0]
    assert _kvjax("download", "--benchmarks", "text2json") == 2
    assert "not public" in capsys.readouterr().err
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert _kvjax("download", "--benchmarks", "longproc") == 2
    assert "HF_HUB_OFFLINE" in capsys.readouterr().err
    assert _kvjax() == 2
    assert "download, list or check" in capsys.readouterr().err


def test_data_command_in_a_subprocess_exits_2_without_traceback(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "KVJAX_DATA"}
    env.update(PYTHONPATH=str(ROOT), HOME=str(tmp_path))
    p = subprocess.run([sys.executable, "-m", "kvjax.cli", "data", "check", "--data-dir", str(tmp_path / "no")],
                       capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert p.stderr.strip().startswith("kvjax: error: --data-dir") and str(tmp_path / "no") in p.stderr


def test_a_file_or_hub_name_the_user_gives_is_recorded_as_given(fresh, tmp_path):
    params, src = data.resolve_source("text2json", {"hub_name": "me/t2j", "revision": "v1", "data_dir": "x"})
    assert "data_dir" not in params and src == {"kind": "hub", "via": "hub_name", "dataset": "text2json",
                                                "repo": "me/t2j", "revision": "v1", "path": None}
    assert data.describe(src) == "hub dataset me/t2j@v1"
    params, src = data.resolve_source("text2json", {"path": str(tmp_path / "t.jsonl")})
    assert src["kind"] == "local" and src["path"] == str(tmp_path / "t.jsonl")
    assert data.describe(src) == f"{tmp_path / 't.jsonl'} (path)"
    assert fresh.calls == []
