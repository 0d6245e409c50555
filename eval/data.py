"""Where benchmark data comes from (the `kvjax data download|list|check` command over it is eval/data_cli.py).

A *data root* is a folder holding one entry per dataset, laid out as the authors' harness expects:
``needlebench/`` (PaulGrahamEssays.jsonl, needles.jsonl), ``longproc/`` (html_to_tsv/… as in the LongProc GitHub
repository, or the Hugging Face dump's html_to_tsv_<split>/*.parquet) and ``text2json.jsonl``.

Resolution (:func:`locate`), first match wins:

1. ``--data-dir DIR`` (``data_dir=``): the only place looked at when given;
2. ``$KVJAX_DATA``: the only place looked at when set (and no ``--data-dir``);
3. kvjax's cache, ``$XDG_CACHE_HOME/kvjax/data`` or ``~/.cache/kvjax/data`` (what ``kvjax data download`` wrote);
4. a download from the Hugging Face hub into that cache (pinned revision, recorded in
   ``<dataset>/.kvjax-source.json``), unless ``HF_HUB_OFFLINE`` is set or the dataset has no hub source;
5. otherwise :class:`DataNotFoundError`, naming ``--data-dir``, ``KVJAX_DATA`` and ``kvjax data download``.

A folder the user names is authoritative: a dataset missing from it is an error, not a reason to download.
The library never looks beside the repository; tests set ``KVJAX_DATA`` themselves.

Hub sources: NeedleBench = ``opencompass/NeedleBench`` (MIT), LongProc = ``PrincetonPLI/LongProc`` (Apache-2.0,
the HTML-to-TSV splits as parquet with the prompt already filled in). Text2JSON has no public source: a local
file, or a hub dataset the user names (``text2json.hub_name=…``).
"""
from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import shutil
import sys
import time
from typing import Any, Mapping

DATA_ENV = "KVJAX_DATA"
MANIFEST = ".kvjax-source.json"


class DataNotFoundError(FileNotFoundError):
    """A dataset is in none of the places :func:`locate` may look at (the message says where it looked and how
    to supply it)."""


class DownloadError(OSError):
    """A hub download was impossible (offline, no hub source) or failed."""


# ---------------------------------------------------------------------------------------------------------------
# What exists


@dataclasses.dataclass(frozen=True)
class HubSource:
    """A dataset repository on the Hugging Face hub: the files kvjax fetches from it, at a pinned revision."""

    repo: str
    revision: str
    patterns: tuple[str, ...]
    license: str


@dataclasses.dataclass(frozen=True)
class Dataset:
    """One benchmark dataset.

    name: its name (``kvjax data --benchmarks`` accepts it, and the names in ``benchmarks``).
    path: its entry under a data root (a folder, or a file for Text2JSON).
    layouts: alternative lists of glob patterns relative to the data root; the dataset is present when every
      pattern of one layout matches an existing file.
    benchmarks: the registered benchmarks that read it.
    """

    name: str
    path: str
    layouts: tuple[tuple[str, ...], ...]
    benchmarks: tuple[str, ...]
    title: str
    hub: HubSource | None = None
    note: str = ""


DATASETS: dict[str, Dataset] = {
    "needlebench": Dataset(
        "needlebench", "needlebench", (("needlebench/PaulGrahamEssays.jsonl", "needlebench/needles.jsonl"),),
        ("multineedle",), "NeedleBench (PaulGrahamEssays.jsonl, needles.jsonl)",
        HubSource("opencompass/NeedleBench", "bb30238fea08590e7b9b8021a40b51d44b105e55",
                  ("PaulGrahamEssays.jsonl", "needles.jsonl", "README.md"), "MIT")),
    "longproc": Dataset(
        "longproc", "longproc",
        (("longproc/html_to_tsv/prompts.yaml", "longproc/html_to_tsv/html_to_tsv_*.json"),
         ("longproc/html_to_tsv_*/*.parquet",), ("longproc/html_to_tsv_*.jsonl",)),
        ("longproc",), "LongProc HTML-to-TSV",
        HubSource("PrincetonPLI/LongProc", "a6ca97a5a1a20b2d519dd2a5348a04ae558dd0ce",
                  ("html_to_tsv_*/*.parquet", "html_to_tsv_*.jsonl", "README.md"), "Apache-2.0")),
    "text2json": Dataset(
        "text2json", "text2json.jsonl", (("text2json.jsonl",),), ("text2json",), "Text2JSON (text2json.jsonl)",
        None, "the authors' file is not public: run the generated text2json_synth, or give text2json.path=FILE "
              "or text2json.hub_name=OWNER/NAME"),
}


def dataset(name: str) -> Dataset:
    """The dataset called `name` or read by the benchmark `name` (e.g. "multineedle" -> NeedleBench)."""
    for ds in DATASETS.values():
        if name == ds.name or name in ds.benchmarks:
            return ds
    allowed = sorted(set(DATASETS) | {b for ds in DATASETS.values() for b in ds.benchmarks})
    raise ValueError(f"--benchmarks {name!r} names no dataset; allowed: {', '.join(allowed)} (the generated "
                     f"benchmarks need no data)")


def cache_root() -> pathlib.Path:
    """kvjax's data cache: ``$XDG_CACHE_HOME/kvjax/data``, else ``~/.cache/kvjax/data``."""
    base = os.environ.get("XDG_CACHE_HOME") or str(pathlib.Path.home() / ".cache")
    return pathlib.Path(base).expanduser() / "kvjax" / "data"


def is_present(ds: Dataset, root: str | os.PathLike) -> bool:
    """Whether `root` holds `ds` in one of its layouts."""
    root = pathlib.Path(root)
    return any(all(any(True for _ in root.glob(pat)) for pat in layout) for layout in ds.layouts)


def read_manifest(ds: Dataset, root: str | os.PathLike) -> dict | None:
    """The record ``kvjax data download`` left beside `ds` under `root` (repo, revision, files), or None."""
    p = pathlib.Path(root) / ds.path
    p = (p if p.is_dir() else p.parent) / MANIFEST
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None


@dataclasses.dataclass(frozen=True)
class Located:
    """Where a dataset was found.

    root: the data root (pass it as the loaders' `data_dir`); path: the dataset's own folder or file.
    kind: "local" (a folder the user named), "cache" (kvjax's cache) or "hub" (downloaded just now).
    via: "--data-dir", "KVJAX_DATA", "kvjax cache" or "download". repo/revision: the hub source, when known.
    """

    dataset: str
    root: pathlib.Path
    kind: str
    via: str
    repo: str | None = None
    revision: str | None = None

    @property
    def path(self) -> pathlib.Path:
        return self.root / DATASETS[self.dataset].path

    def record(self) -> dict[str, Any]:
        """JSON-ready description for result records (``data_source``)."""
        return {"kind": self.kind, "via": self.via, "dataset": self.dataset, "path": str(self.path),
                "repo": self.repo, "revision": self.revision}


def _located(ds: Dataset, root: pathlib.Path, kind: str, via: str) -> Located:
    m = read_manifest(ds, root) or {}
    return Located(ds.name, root, kind, via, m.get("repo"), m.get("revision"))


def named_root(data_dir: str | os.PathLike | None) -> tuple[pathlib.Path, str] | None:
    """The folder the user named (``--data-dir`` first, then $KVJAX_DATA), or None; raises if it does not exist."""
    if data_dir is not None:
        root, via = pathlib.Path(data_dir).expanduser(), "--data-dir"
    elif os.environ.get(DATA_ENV):
        root, via = pathlib.Path(os.environ[DATA_ENV]).expanduser(), DATA_ENV
    else:
        return None
    if not root.is_dir():
        shown = f"--data-dir {str(root)!r}" if via == "--data-dir" else f"{DATA_ENV}={str(root)!r}"
        raise DataNotFoundError(f"{shown} is not a folder; allowed: a folder holding "
                                f"{', '.join(d.path + ('/' if d.name != 'text2json' else '') for d in DATASETS.values())}")
    return root, via


def find(name: str, data_dir: str | os.PathLike | None = None) -> Located | None:
    """Where dataset `name` is without downloading it: the named folder (``--data-dir``, else $KVJAX_DATA) when
    given, else kvjax's cache; None when it is not there."""
    ds = dataset(name)
    named = named_root(data_dir)
    if named is not None:
        root, via = named
        return _located(ds, root, "local", via) if is_present(ds, root) else None
    root = cache_root()
    return _located(ds, root, "cache", "kvjax cache") if is_present(ds, root) else None


def offline() -> bool:
    """Whether the hub must not be contacted: ``HF_HUB_OFFLINE`` (or ``TRANSFORMERS_OFFLINE``) set to 1/on/yes/
    true, now or when huggingface_hub was imported."""
    v = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    if v.strip().upper() in ("1", "ON", "YES", "TRUE"):
        return True
    if "huggingface_hub" in sys.modules:
        from huggingface_hub import constants

        return bool(constants.is_offline_mode())
    return False


def locate(name: str, data_dir: str | os.PathLike | None = None, *, download_missing: bool = True) -> Located:
    """Where dataset `name` (or the dataset of benchmark `name`) is, in the order of the module docstring;
    downloads it into kvjax's cache when allowed. Raises :class:`DataNotFoundError` saying where it looked."""
    ds = dataset(name)
    named = named_root(data_dir)
    if named is not None:
        root, via = named
        if is_present(ds, root):
            return _located(ds, root, "local", via)
        raise DataNotFoundError(
            f"{ds.title} is not in {str(root / ds.path)!r} ({via} names {str(root)!r}, and a folder you name is the "
            f"only place kvjax looks). Put the files there"
            + (f", or fetch them with `kvjax data download --benchmarks {ds.name} --data-dir {root}`" if ds.hub
               else f" ({ds.note})") + ".")
    found = find(name)
    if found is not None:
        return found
    if ds.hub is None:
        raise DataNotFoundError(
            f"{ds.title} not found: no --data-dir, {DATA_ENV} is unset and kvjax's cache {str(cache_root())!r} "
            f"has no {ds.path}; {ds.note}. To use a local copy pass --data-dir DIR or set {DATA_ENV}=DIR "
            f"(a folder holding {ds.path}).")
    hint = (f"pass --data-dir DIR or set {DATA_ENV}=DIR (a folder holding {ds.path}/), or run "
            f"`kvjax data download --benchmarks {ds.name}` where the network is available")
    if not download_missing:
        raise DataNotFoundError(f"{ds.title} not found: no --data-dir, {DATA_ENV} is unset and kvjax's cache "
                                f"{str(cache_root())!r} has no {ds.path}/; {hint}.")
    if offline():
        raise DataNotFoundError(f"{ds.title} not found: no --data-dir, {DATA_ENV} is unset, kvjax's cache "
                                f"{str(cache_root())!r} has no {ds.path}/, and HF_HUB_OFFLINE is set, so the hub "
                                f"({ds.hub.repo}) was not tried; {hint}.")
    try:
        return download(name)
    except DownloadError as e:
        raise DataNotFoundError(f"{ds.title} not found locally and the download failed ({e}); {hint}.") from e


# ---------------------------------------------------------------------------------------------------------------
# Downloads


def dataset_files(path: pathlib.Path) -> list[pathlib.Path]:
    """The files of a dataset at `path` (a file, or every file under a folder, hub cache folders left out), sorted."""
    if path.is_file():
        return [path]
    return sorted(p for p in path.rglob("*") if p.is_file() and ".cache" not in p.relative_to(path).parts
                  and p.name != MANIFEST)


def download(name: str, *, root: str | os.PathLike | None = None, revision: str | None = None,
             force: bool = False) -> Located:
    """Fetch dataset `name` from its hub repository into `root` (default: kvjax's cache) and return it.

    The revision (default: the pinned one of :data:`DATASETS`) is resolved to a commit first; the files
    (``huggingface_hub.snapshot_download`` with the dataset's patterns, showing its progress bars) land in a
    temporary folder that replaces ``<root>/<dataset>`` only when complete, with a ``.kvjax-source.json`` (repo,
    commit, files and sizes). An existing complete copy is kept unless `force`.
    """
    ds = dataset(name)
    if ds.hub is None:
        raise DownloadError(f"{ds.title} has no source on the Hugging Face hub; {ds.note}")
    root = pathlib.Path(root).expanduser() if root is not None else cache_root()
    final = root / ds.path
    kind = "cache" if root == cache_root() else "local"
    if is_present(ds, root) and not force:
        return _located(ds, root, kind, "kvjax cache" if kind == "cache" else "--data-dir")
    if final.exists() and not force:
        raise DownloadError(f"{str(final)!r} exists but is not a complete {ds.title}; pass --force to replace it")
    if offline():
        raise DownloadError(f"HF_HUB_OFFLINE is set, so {ds.hub.repo} cannot be downloaded")
    import huggingface_hub

    rev = revision or ds.hub.revision
    root.mkdir(parents=True, exist_ok=True)
    partial = root / f".{ds.path}.partial-{os.getpid()}"
    shutil.rmtree(partial, ignore_errors=True)
    print(f"[kvjax data] downloading {ds.hub.repo}@{rev} ({', '.join(ds.hub.patterns)}) into {final}",
          file=sys.stderr, flush=True)
    try:
        sha = huggingface_hub.dataset_info(ds.hub.repo, revision=rev).sha
        huggingface_hub.snapshot_download(ds.hub.repo, repo_type="dataset", revision=sha,
                                          allow_patterns=list(ds.hub.patterns), local_dir=partial)
    except Exception as e:  # network, auth, unknown revision: one message naming the repository
        shutil.rmtree(partial, ignore_errors=True)
        raise DownloadError(f"{ds.hub.repo}@{rev}: {type(e).__name__}: {e}") from e
    staged = root / f".{ds.path}.staged-{os.getpid()}"  # lay the files out as the data root expects
    shutil.rmtree(staged, ignore_errors=True)
    staged.mkdir()
    os.replace(partial, staged / ds.path)
    if not is_present(ds, staged):
        got = [str(p.relative_to(staged / ds.path)) for p in dataset_files(staged / ds.path)]
        shutil.rmtree(staged, ignore_errors=True)
        raise DownloadError(f"{ds.hub.repo}@{sha} did not provide the files of {ds.title} (got {got})")
    files = {str(p.relative_to(staged / ds.path)): p.stat().st_size for p in dataset_files(staged / ds.path)}
    manifest = {"dataset": ds.name, "repo": ds.hub.repo, "revision": sha, "requested_revision": rev,
                "license": ds.hub.license, "files": files, "downloaded_at": time.strftime("%Y-%m-%dT%H:%M:%S")}
    (staged / ds.path / MANIFEST).write_text(json.dumps(manifest, indent=1), encoding="utf-8")
    if final.exists():
        shutil.rmtree(final)
    os.replace(staged / ds.path, final)
    shutil.rmtree(staged, ignore_errors=True)
    return Located(ds.name, root, "hub", "download", ds.hub.repo, sha)


# ---------------------------------------------------------------------------------------------------------------
# Sources of a benchmark run (records and summary.md)


def resolve_source(dataset_name: str | None, params: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(build parameters, ``data_source`` record) of one benchmark build.

    Generated benchmarks (`dataset_name` None): {"kind": "generated", "seed": seed} (seed default 0). Real data:
    an explicit ``hub_name`` or ``path`` parameter is recorded as given; otherwise ``data_dir`` (popped) goes
    through :func:`locate` and the parameters get the resolved root as ``data_dir``.
    """
    params = dict(params)
    data_dir = params.pop("data_dir", None)
    if dataset_name is None:
        params.setdefault("seed", 0)
        return params, {"kind": "generated", "seed": params["seed"]}
    if params.get("hub_name"):
        return params, {"kind": "hub", "via": "hub_name", "dataset": dataset_name, "repo": params["hub_name"],
                        "revision": params.get("revision"), "path": None}
    if params.get("path"):
        path = pathlib.Path(params["path"]).expanduser()
        return params, {"kind": "local", "via": "path", "dataset": dataset_name, "path": str(path),
                        "repo": None, "revision": None}
    loc = locate(dataset_name, data_dir)
    params["data_dir"] = loc.root
    return params, loc.record()


def describe(source: Mapping[str, Any] | None) -> str:
    """One human line for a ``data_source`` record: "generated (seed 0)", "/data/needlebench (KVJAX_DATA)",
    "~/.cache/kvjax/data/needlebench (kvjax cache; opencompass/NeedleBench@bb30238)", ..."""
    if not source:
        return "unknown"
    if source.get("kind") == "generated":
        return f"generated (seed {source.get('seed')})"
    hub = source.get("repo")
    if hub and source.get("revision"):
        hub += f"@{str(source['revision'])[:12]}"
    if source.get("path") is None:
        return f"hub dataset {hub}"
    if source.get("kind") == "hub":
        return f"{source['path']} (downloaded from {hub})"
    return f"{source['path']} ({source.get('via')}" + (f"; {hub})" if hub else ")")


# ---------------------------------------------------------------------------------------------------------------


__all__ = ["DATASETS", "DATA_ENV", "DataNotFoundError", "Dataset", "DownloadError", "HubSource", "Located",
           "cache_root", "dataset", "dataset_files", "named_root", "describe", "download", "find", "is_present",
           "locate", "offline", "read_manifest", "resolve_source"]
