"""Common pieces of the benchmark harness: the `Sample` record, the benchmark registry (with the dataset each
benchmark reads), length filtering and token codecs.

A benchmark turns files (or a generator's parameters) into a list of `Sample`s whose `user_text` is the exact
user-turn string the model sees before chat templating (the authors' OpenCompass flattening, see
shared/specs/benchmarks.md §1), and scores one prediction string against a sample's `gold`.

Length policy: a sample whose chat-templated prompt is longer than `max_prompt_tokens` is skipped and counted,
never truncated (the authors' harness right-truncates at 131,072 tokens, which would silently cut the question).
Malformed records are skipped with a count and one message each; `load` warns once and returns them in the report.

Data: a benchmark registered with `data=<dataset>` reads real files, found by `eval.data.locate` (--data-dir,
$KVJAX_DATA, kvjax's cache, the Hugging Face hub); one registered without it generates its samples from a `seed`.
`load` records which in `SkipReport.source` (the runner copies it into every record as `data_source`).
"""
from __future__ import annotations

import dataclasses
import pathlib
import re
import warnings
from typing import Any, Callable, Iterable, Mapping, Protocol, Sequence, runtime_checkable

CountTokens = Callable[[str], int]
"""Token count of a user-turn string *as the model will see it*: the caller applies the model's chat template
(with the generation prompt) inside this callable, then counts the model tokenizer's ids."""


# ---------------------------------------------------------------------------------------------------------------
# Records


@dataclasses.dataclass(frozen=True)
class Sample:
    """One evaluation item.

    Attributes:
      id: unique within its benchmark (e.g. LongProc `task_id`, "multineedle-128000-c7").
      benchmark: registry name of the benchmark that built it; `get_benchmark(sample.benchmark).score(...)` scores it.
      user_text: the exact user-turn string before chat templating. No system prompt is added by the harness.
      gold: what the scorer needs: Text2JSON the JSON-encoded answer string, MultiNeedle the authors'
        "kw*kw*…#depth*depth*…" string, LongProc the ground-truth TSV string.
      meta: benchmark-specific extras (domain, depths, task ids, …); JSON-serialisable values only.
      max_new_tokens: the authors' `max_out_len` for this benchmark (1024, 1024, 9216).
      answer_prefix: text the runner appends after the chat template's generation prompt, so the model continues
        from it (empty for the authors' benchmarks). `Benchmark.score` prepends it to the generated text.
    """

    id: str
    benchmark: str
    user_text: str
    gold: Any
    meta: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    max_new_tokens: int = 1024
    answer_prefix: str = ""

    def __post_init__(self):
        if not isinstance(self.user_text, str) or not self.user_text:
            raise ValueError(f"Sample {self.id!r}: user_text must be a non-empty str, got {type(self.user_text)}")
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise ValueError(f"Sample {self.id!r}: max_new_tokens={self.max_new_tokens!r}, allowed: int >= 1 tokens")


@dataclasses.dataclass
class SkipReport:
    """What `load` left out, and why.

    n_built: samples produced by the loader/generator (after malformed-record skipping).
    malformed: one message per skipped malformed record (file, line or index, reason).
    too_long: ids of samples whose chat-templated prompt exceeded `max_prompt_tokens` (not truncated, skipped).
    prompt_tokens: id -> token count, for every sample looked at, when a `count_tokens` callable was given.
    not_read: samples left unread because `max_samples` were already kept.
    """

    benchmark: str
    n_built: int = 0
    malformed: list[str] = dataclasses.field(default_factory=list)
    too_long: list[str] = dataclasses.field(default_factory=list)
    max_prompt_tokens: int | None = None
    prompt_tokens: dict[str, int] = dataclasses.field(default_factory=dict)
    source: dict[str, Any] = dataclasses.field(default_factory=dict)
    not_read: int = 0

    @property
    def n_malformed(self) -> int:
        return len(self.malformed)

    @property
    def n_too_long(self) -> int:
        return len(self.too_long)

    @property
    def n_kept(self) -> int:
        return self.n_built - self.n_too_long - self.not_read

    def summary(self) -> str:
        s = f"{self.benchmark}: kept {self.n_kept} of {self.n_built} built samples"
        if self.malformed:
            s += f"; skipped {self.n_malformed} malformed record(s)"
        if self.too_long:
            s += f"; skipped {self.n_too_long} over max_prompt_tokens={self.max_prompt_tokens}"
        if self.not_read:
            s += f"; {self.not_read} more not read (--max-samples)"
        return s


class MalformedLog:
    """Collects messages about skipped malformed records; used by every loader."""

    def __init__(self, source: str):
        self.source = source
        self.messages: list[str] = []

    def skip(self, where: str, why: str) -> None:
        self.messages.append(f"{self.source} {where}: {why}")

    def warn(self) -> None:
        if self.messages:
            head = "; ".join(self.messages[:5])
            more = f" (and {len(self.messages) - 5} more)" if len(self.messages) > 5 else ""
            warnings.warn(f"skipped {len(self.messages)} malformed record(s): {head}{more}", stacklevel=3)


# ---------------------------------------------------------------------------------------------------------------
# Registry


@runtime_checkable
class Benchmark(Protocol):
    """A benchmark: builds samples and scores predictions.

    build(**params) -> (samples, malformed_messages)
    score(sample, prediction) -> dict of per-sample metrics (floats, or None where the authors exclude a sample)
    aggregate(samples, scores) -> dict of benchmark metrics, in the authors' units (×100)
    """

    name: str

    def build(self, **params) -> tuple[list[Sample], list[str]]: ...

    def score(self, sample: Sample, prediction: str) -> dict[str, Any]: ...

    def aggregate(self, samples: Sequence[Sample], scores: Sequence[Mapping[str, Any]]) -> dict[str, Any]: ...


#: name -> benchmark; each benchmark module registers itself on import, and the package (eval/benchmarks/__init__.py)
#: imports every benchmark module, so importing any part of eval.benchmarks fills it.
_REGISTRY: dict[str, Benchmark] = {}
_DATA: dict[str, str | None] = {}


def register(benchmark: Benchmark, *, data: str | None = None) -> Benchmark:
    """Add a benchmark to the registry under `benchmark.name` (last registration wins).

    data: the dataset it reads (a name of `eval.data.DATASETS`), or None for a benchmark that generates its
    samples (its build takes a `seed`, default 0).
    """
    _REGISTRY[benchmark.name] = benchmark
    _DATA[benchmark.name] = data
    return benchmark


def dataset_of(name: str) -> str | None:
    """The dataset benchmark `name` reads, or None when it generates its samples."""
    get_benchmark(name)
    return _DATA[name]


def available() -> list[str]:
    """Names of the registered benchmarks."""
    return sorted(_REGISTRY)


def get_benchmark(name: str) -> Benchmark:
    if name not in _REGISTRY:
        raise KeyError(f"benchmark {name!r} is unknown; available: {sorted(_REGISTRY)}")
    return _REGISTRY[name]


def load(name: str, *, count_tokens: CountTokens | None = None, max_prompt_tokens: int | None = None,
         max_samples: int | None = None, **params) -> tuple[list[Sample], SkipReport]:
    """Build benchmark `name` with `params` and drop samples longer than `max_prompt_tokens`.

    Args:
      name: a registered benchmark (see `available()`).
      count_tokens: token count of a user-turn string after the model's chat template (see `CountTokens`).
        Needed when `max_prompt_tokens` is given; when given alone, every sample's length is still recorded.
        Benchmarks with `uses_count_tokens = True` (the Text2JSON generator) also receive it in `build`.
      max_prompt_tokens: samples whose count exceeds it are skipped (counted in the report), never truncated.
      max_samples: stop after this many kept samples (the rest are neither counted nor returned), so a capped run
        of a long benchmark does not tokenize every prompt.
      **params: passed to the benchmark's `build` (split, n_samples, context_length, …). `data_dir` is taken
        out and resolved with `eval.data.resolve_source` (benchmarks that read data get the resolved root; it is
        ignored by generated ones).
    Returns:
      (samples kept, SkipReport). Malformed records and over-long samples also produce a `warnings.warn`;
      `report.source` says where the data came from (generated + seed, local path, cache, hub repo + revision).
    """
    from eval.data import resolve_source

    bench = get_benchmark(name)
    if max_prompt_tokens is not None and count_tokens is None:
        raise ValueError(f"max_prompt_tokens={max_prompt_tokens} needs a count_tokens callable (got None)")
    params, source = resolve_source(dataset_of(name), params)
    if getattr(bench, "uses_count_tokens", False):  # generators that size prompts in tokens
        params["count_tokens"] = count_tokens
    samples, malformed = bench.build(**params)
    report = SkipReport(benchmark=name, n_built=len(samples), malformed=list(malformed),
                        max_prompt_tokens=max_prompt_tokens, source=source)
    if count_tokens is not None:
        samples, too_long, lengths = filter_by_length(samples, count_tokens, max_prompt_tokens, max_samples)
        report.too_long = too_long
        report.prompt_tokens = lengths
        report.not_read = report.n_built - len(lengths)
        if too_long:
            warnings.warn(f"{name}: skipped {len(too_long)} sample(s) over max_prompt_tokens={max_prompt_tokens} "
                          f"(not truncated): {too_long[:5]}", stacklevel=2)
    elif max_samples is not None:
        report.not_read = max(0, len(samples) - max_samples)
        samples = samples[:max_samples]
    return samples, report


def filter_by_length(samples: Iterable[Sample], count_tokens: CountTokens, max_prompt_tokens: int | None,
                     max_kept: int | None = None) -> tuple[list[Sample], list[str], dict[str, int]]:
    """Split samples by chat-templated prompt length.

    Returns (kept samples, ids of samples with count_tokens(user_text) > max_prompt_tokens, id -> token count).
    `max_prompt_tokens=None` keeps everything and only measures; `max_kept` stops once that many are kept.
    """
    if max_prompt_tokens is not None and (not isinstance(max_prompt_tokens, int) or max_prompt_tokens < 1):
        raise ValueError(f"max_prompt_tokens={max_prompt_tokens!r}, allowed: int >= 1 tokens, or None")
    kept, too_long, lengths = [], [], {}
    for s in samples:
        if max_kept is not None and len(kept) >= max_kept:
            break
        n = int(count_tokens(s.user_text))
        lengths[s.id] = n
        if max_prompt_tokens is not None and n > max_prompt_tokens:
            too_long.append(s.id)
        else:
            kept.append(s)
    return kept, too_long, lengths


# ---------------------------------------------------------------------------------------------------------------
# Files


@dataclasses.dataclass
class FileCheck:
    """What `kvjax data check` reports for one file: records read and one message per malformed record."""

    file: str
    n_records: int
    malformed: list[str]


def require_path(path: pathlib.Path, what: str) -> pathlib.Path:
    """Return `path` if it exists, else raise FileNotFoundError naming it and what it should hold."""
    if not path.exists():
        raise FileNotFoundError(f"{what} not found at {str(path)!r}")
    return path


# ---------------------------------------------------------------------------------------------------------------
# Token codecs (encode/decode pairs) for builders that cut text at token boundaries (MultiNeedle)


@runtime_checkable
class TokenCodec(Protocol):
    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...


class _TokenizersCodec:
    """Adapter for a Hugging Face `tokenizers.Tokenizer`: no special tokens added, none skipped."""

    def __init__(self, tok):
        self.tok = tok

    def encode(self, text: str) -> list[int]:
        return list(self.tok.encode(text, add_special_tokens=False).ids)

    def decode(self, ids: Sequence[int]) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=False)


class _TiktokenCodec:
    """Adapter for a tiktoken Encoding (the authors' cl100k_base), special-token text treated as plain text."""

    def __init__(self, enc):
        self.enc = enc

    def encode(self, text: str) -> list[int]:
        return self.enc.encode(text, disallowed_special=())

    def decode(self, ids: Sequence[int]) -> str:
        return self.enc.decode(list(ids))


def as_codec(tokenizer: Any) -> TokenCodec:
    """Wrap a tokenizer as a `TokenCodec`: `tokenizers.Tokenizer`, tiktoken `Encoding`, or any object whose
    `encode(str)` returns a list of ints and `decode(list)` returns a str (returned as is)."""
    mod = type(tokenizer).__module__
    if mod.startswith("tokenizers"):
        return _TokenizersCodec(tokenizer)
    if mod.startswith("tiktoken"):
        return _TiktokenCodec(tokenizer)
    if callable(getattr(tokenizer, "encode", None)) and callable(getattr(tokenizer, "decode", None)):
        return tokenizer
    raise TypeError(f"tokenizer of type {type(tokenizer).__name__} has no encode/decode; pass a tokenizers."
                    f"Tokenizer, a tiktoken Encoding or an object with encode(str)->list[int], decode(list)->str")


def cl100k_codec() -> TokenCodec:
    """The authors' NeedleBench tokenizer (tiktoken cl100k_base, i.e. `encoding_for_model('gpt-4')`).

    Needs the `tiktoken` package and its cached BPE file (it cannot be downloaded on offline machines).
    """
    try:
        import tiktoken

        return _TiktokenCodec(tiktoken.get_encoding("cl100k_base"))
    except Exception as e:  # ImportError, or the BPE file cannot be fetched offline
        raise RuntimeError("tiktoken cl100k_base is unavailable (install tiktoken and provide its BPE cache via "
                           "TIKTOKEN_CACHE_DIR), so pass tokenizer=<the model's tokenizer> instead: "
                           f"{type(e).__name__}: {e}") from e


_PIECE = re.compile(r"\s+|\w+|[^\w\s]")


class SimpleCodec:
    """A cheap deterministic stand-in tokenizer for tests and dry runs: pieces are whitespace runs, words
    (`\\w+`) and single other characters; ids come from a vocabulary grown on first sight.
    decode(encode(s)) == s for every string s."""

    def __init__(self):
        self._ids: dict[str, int] = {}
        self._pieces: list[str] = []

    def encode(self, text: str) -> list[int]:
        out = []
        for p in _PIECE.findall(text):
            i = self._ids.get(p)
            if i is None:
                i = self._ids[p] = len(self._pieces)
                self._pieces.append(p)
            out.append(i)
        return out

    def decode(self, ids: Sequence[int]) -> str:
        return "".join(self._pieces[i] for i in ids)


def count_simple_tokens(text: str) -> int:
    """Number of `SimpleCodec` pieces in `text` (no chat template): a cheap deterministic token counter."""
    return len(_PIECE.findall(text))
