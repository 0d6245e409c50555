"""MultiNeedle (NeedleBench v2 parallel / multi-retrieval, English; shared/specs/benchmarks.md §3), and
"multineedle_synth", the same prompt, question and scoring around a generated haystack with kvjax's own needles
(no essays: it runs with no data).

Construction, as the authors' `NeedleBenchParallelDataset` (OpenCompass) does it:
  * needle pool: the first `n` English entries of needles.jsonl (file order) with a new `arg1`, a new `arg2` and a
    new (arg1, arg2) pair; n = number of depths (11 by default);
  * sample c = 0..n_samples-1: the essay list is shuffled in place with CPython `random.seed(c)` + `shuffle`
    (cumulatively: sample c sees the composition of shuffles 0..c), the needle list is copied and shuffled with
    `random.seed(c)` again, needle i goes to depths[i];
  * haystack: essays' token lists concatenated in shuffled order until they reach
    context_length - length_buffer - Σ len(tokens("\\n" + needle + "\\n")), then cut to exactly that many tokens;
  * needles inserted at token positions int(L * depth / 100) (shifted by what was already inserted), decoded;
  * the English "question at the end" prompt; gold "kw*kw*…#depth*depth*…".
The harness appends "\\n\\n" to the prompt (the empty BOT turn, §1), so `user_text` ends with three newlines.

Tokenizer: the authors count with tiktoken cl100k_base. It is used when available (`cl100k_codec`); otherwise pass
the model's tokenizer (a `tokenizers.Tokenizer`, tiktoken Encoding or any encode/decode object). Another tokenizer
cuts the haystack at another place, so samples then differ from the authors' by a few hundred characters.
We use private `random.Random(c)` instances: the same sequence as the authors' global seeding, without touching
the global random state.
"""
from __future__ import annotations

import json
import pathlib
import random
import warnings
from typing import Any, Iterator, Mapping, Sequence

from eval import metrics

from eval.data import locate

from . import synthetic
from .base import CountTokens, FileCheck, MalformedLog, Sample, as_codec, cl100k_codec, register, require_path

MAX_NEW_TOKENS = 1024
DEFAULT_DEPTHS = tuple(range(0, 101, 10))

PROMPT_HEAD_EN = ("This is a test of long-text capability. You need to first read the long document below, and "
                  "then answer the final questions one by one based on the information in the document.\n"
                  "The content of the long document is as follows\n\n<Document>\n")
PROMPT_TAIL_EN = "\n</Document>\n\nBased on the information in the document, now please answer: "
HARNESS_SUFFIX = "\n\n"  # "\n" between the HUMAN and BOT turns + the empty BOT turn "{answer}\n"


def build_prompt(context: str, retrieval_question: str) -> str:
    """The authors' English NeedleBench prompt with the question at the end (ends with one newline)."""
    return PROMPT_HEAD_EN + context + PROMPT_TAIL_EN + retrieval_question + "\n"


def _needle_problem(entry: Any) -> str | None:
    if not isinstance(entry, Mapping):
        return f"entry is {type(entry).__name__}, expected an object"
    for key in ("needle", "retrieval_question", "arg1", "arg2", "language"):
        if not isinstance(entry.get(key), str):
            return f"field {key!r} missing or not a string"
    q = entry["retrieval_question"]
    if entry["language"] == "English" and ("?" not in q or q.count("'") < 2):
        return "English retrieval_question lacks a '?' or a quoted answer format"
    return None


def _jsonl(path: str | pathlib.Path, log: MalformedLog, problem) -> Iterator[dict]:
    """The records of a JSON Lines file for which problem(record) is None; the others are logged and skipped."""
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            try:
                entry = json.loads(line)
            except json.JSONDecodeError as e:
                log.skip(f"line {lineno}", f"invalid JSON ({e.msg})")
                continue
            why = problem(entry)
            if why is not None:
                log.skip(f"line {lineno}", why)
                continue
            yield entry


def _essay_problem(rec: Any) -> str | None:
    if not isinstance(rec, Mapping) or not isinstance(rec.get("text"), str):
        return "field 'text' missing or not a string"
    return None


def needle_pool(needles_path: str | pathlib.Path, n: int, language: str = "English",
                log: MalformedLog | None = None) -> list[dict]:
    """The first `n` entries of `language` in file order whose arg1, arg2 and (arg1, arg2) are all new.

    Malformed lines are skipped (and recorded in `log`). Raises ValueError if fewer than `n` qualify.
    """
    log = log or MalformedLog(str(needles_path))
    seen1, seen2, seen12, out = set(), set(), set(), []
    for entry in _jsonl(needles_path, log, _needle_problem):
        if len(out) == n:
            break
        if entry["language"] != language:
            continue
        a1, a2 = entry["arg1"], entry["arg2"]
        if a1 in seen1 or a2 in seen2 or (a1, a2) in seen12:
            continue
        seen1.add(a1), seen2.add(a2), seen12.add((a1, a2))
        out.append(entry)
    if len(out) < n:
        raise ValueError(f"needle_count={n}: only {len(out)} distinct {language} needles in {str(needles_path)!r}")
    return out


def check_files(folder: str | pathlib.Path) -> list[FileCheck]:
    """`kvjax data check` for a NeedleBench folder: records and malformed lines of the essays and needles."""
    out = []
    for name, problem in (("PaulGrahamEssays.jsonl", _essay_problem), ("needles.jsonl", _needle_problem)):
        path = pathlib.Path(folder) / name
        log = MalformedLog(str(path))
        out.append(FileCheck(str(path), sum(1 for _ in _jsonl(path, log, problem)), log.messages))
    return out


def retrieval_question(needles: Sequence[Mapping[str, str]]) -> str:
    """Questions up to and including their first '?', joined by '、', then "Please answer in the format of '…'"
    with each answer format (between the first pair of single quotes, up to the first '.') joined by '、'."""
    questions = "\u3001".join(e["retrieval_question"].split("?")[0] + "?" for e in needles)
    formats = "\u3001".join(e["retrieval_question"].split("'")[1].split(".")[0] for e in needles)
    return questions + "Please answer in the format of '" + formats + "'"


def insert_needles(haystack: list[int], depths: Sequence[float], needle_tokens: Sequence[list[int]]) -> list[int]:
    """Insert needle i at token position min(int(L * depths[i] / 100) + tokens inserted so far, current length),
    where L is the haystack length before insertion (the authors' `_generate_context`)."""
    L = len(haystack)
    points = [int(L * (d / 100)) for d in depths]
    out, inserted = list(haystack), 0
    for p, toks in zip(points, needle_tokens):
        at = min(p + inserted, len(out))
        out[at:at] = toks
        inserted += len(toks)
    return out


def _depths(depths: Sequence[float] | None, needle_count: int | None) -> list:
    if depths is None:
        if needle_count is None:
            depths = list(DEFAULT_DEPTHS)
        elif needle_count == 1:
            depths = [50]
        else:
            depths = [round(100 * i / (needle_count - 1)) for i in range(needle_count)] if needle_count > 1 else []
    depths = list(depths)
    if needle_count is not None and needle_count != len(depths):
        raise ValueError(f"needle_count={needle_count} but {len(depths)} depths were given; they must match "
                         f"(needle i goes to depths[i])")
    if not depths:
        raise ValueError(f"needle_count={needle_count!r}, depths={depths!r}: need at least one needle")
    for d in depths:
        if not 0 <= d <= 100:
            raise ValueError(f"depths contains {d!r}; allowed: numbers in [0, 100] (percent of the haystack)")
    return depths


def build_multineedle(*, tokenizer: Any = None, data_dir: str | pathlib.Path | None = None,
                      context_length: int = 128_000, length_buffer: int = 3000,
                      depths: Sequence[float] | None = None, needle_count: int | None = None,
                      n_samples: int = 100, language: str = "English") -> tuple[list[Sample], list[str]]:
    """The authors' MultiNeedle samples (defaults: 128k, buffer 3000, depths 0,10,…,100, 100 samples).

    Args:
      tokenizer: cuts and measures the haystack in its tokens; None = the authors' cl100k_base via tiktoken
        (raises a clear error where it is unavailable).
      data_dir: data root holding needlebench/PaulGrahamEssays.jsonl and needlebench/needles.jsonl; None = found by
        `eval.data.locate` ($KVJAX_DATA, kvjax's cache, the hub).
      context_length: the authors' `length` in tokens; the haystack plus needles take exactly
        context_length - length_buffer tokens before decoding.
      depths: percent positions, one per needle (needle i at depths[i]); default evenly spaced over
        `needle_count` (default 11) from 0 to 100.
      needle_count: number of needles (<= 20 distinct English needles exist).
    Returns:
      (samples, malformed-record messages).
    """
    if language != "English":
        raise ValueError(f"language={language!r}, allowed: 'English' (the authors' configuration)")
    if not isinstance(context_length, int) or context_length < 1:
        raise ValueError(f"context_length={context_length!r}, allowed: int >= 1 tokens")
    if not isinstance(length_buffer, int) or not 0 <= length_buffer < context_length:
        raise ValueError(f"length_buffer={length_buffer!r}, allowed: int in [0, context_length) tokens")
    if not isinstance(n_samples, int) or n_samples < 1:
        raise ValueError(f"n_samples={n_samples!r}, allowed: int >= 1")
    depths = _depths(depths, needle_count)
    codec = cl100k_codec() if tokenizer is None else as_codec(tokenizer)

    root = locate("needlebench", data_dir).path
    essays_path = require_path(root / "PaulGrahamEssays.jsonl", "NeedleBench haystack (PaulGrahamEssays.jsonl)")
    needles_path = require_path(root / "needles.jsonl", "NeedleBench needles (needles.jsonl)")

    log = MalformedLog(str(essays_path))
    essays = [rec["text"] for rec in _jsonl(essays_path, log, _essay_problem)]
    if not essays:
        raise ValueError(f"no usable essay in {str(essays_path)!r}")
    nlog = MalformedLog(str(needles_path))
    pool = needle_pool(needles_path, len(depths), language, nlog)

    cache: dict[int, list[int]] = {}
    order = list(range(len(essays)))  # shuffled in place, cumulatively, like the authors' `lines`
    samples = []
    for c in range(n_samples):
        random.Random(c).shuffle(order)
        needles = list(pool)
        random.Random(c).shuffle(needles)
        needle_texts = ["\n" + e["needle"] + "\n" for e in needles]
        needle_tokens = [codec.encode(t) for t in needle_texts]
        target = max(context_length - length_buffer - sum(map(len, needle_tokens)), 0)
        acc: list[int] = []
        for i in order:
            if i not in cache:
                cache[i] = codec.encode(essays[i])
            acc.extend(cache[i])
            if len(acc) >= target:
                break
        if len(acc) < target:
            raise ValueError(f"context_length={context_length}: the essays give only {len(acc)} haystack tokens, "
                             f"{target} are needed")
        tokens = insert_needles(acc[:target], depths, needle_tokens)
        prompt = build_prompt(codec.decode(tokens), retrieval_question(needles))
        keywords = [e["arg2"] for e in needles]
        samples.append(Sample(
            id=f"multineedle-{context_length}-{c}", benchmark="multineedle", user_text=prompt + HARNESS_SUFFIX,
            gold="*".join(keywords) + "#" + "*".join(map(str, depths)), max_new_tokens=MAX_NEW_TOKENS,
            meta={"depths": list(depths), "keywords": keywords, "needles": [e["needle"] for e in needles],
                  "context_tokens": len(tokens), "context_length": context_length,
                  "length_buffer": length_buffer, "repeat": c}))
    log.messages.extend(nlog.messages)
    log.warn()
    return samples, log.messages


# ---------------------------------------------------------------------------------------------------------------
# MultiNeedle with a generated haystack (no essays) and kvjax's own needles

#: kvjax's needle set for the generated variant, in the NeedleBench record format: invented facts whose keyword
#: (arg2) occurs nowhere else (not in the question, not in the generated prose).
SYNTH_NEEDLES: tuple[dict[str, str], ...] = tuple(
    {"needle": n, "retrieval_question": q, "arg1": a1, "arg2": a2, "language": "English"}
    for n, q, a1, a2 in (
        ("The lighthouse on Korvath Point was first lit by Admiral Tessaly Vohn.",
         "Who first lit the lighthouse on Korvath Point? Please answer in the format 'The lighthouse on Korvath "
         "Point was first lit by ________.'", "Korvath Point", "Admiral Tessaly Vohn"),
        ("The orchestra of Brimhollow always opens its season with the Quillmarsh Overture.",
         "Which piece does the orchestra of Brimhollow open its season with? Please answer in the format 'The "
         "orchestra of Brimhollow opens its season with ________.'", "Brimhollow", "Quillmarsh Overture"),
        ("The oldest bridge in Sarnovel was designed by the engineer Ilsabet Crowe.",
         "Who designed the oldest bridge in Sarnovel? Please answer in the format 'The oldest bridge in Sarnovel "
         "was designed by ________.'", "Sarnovel", "Ilsabet Crowe"),
        ("The annual kite race on Mount Peveril is won most often by the Tinwhistle Flyers.",
         "Which team wins the kite race on Mount Peveril most often? Please answer in the format 'The kite race on "
         "Mount Peveril is won most often by ________.'", "Mount Peveril", "Tinwhistle Flyers"),
        ("The first ship to reach the Ozmara Reef was called the Lantern of Dusk.",
         "What was the first ship to reach the Ozmara Reef called? Please answer in the format 'The first ship to "
         "reach the Ozmara Reef was called ________.'", "Ozmara Reef", "Lantern of Dusk"),
        ("The secret recipe of the Haldane bakery is kept by Master Orrin Pellwick.",
         "Who keeps the secret recipe of the Haldane bakery? Please answer in the format 'The secret recipe of the "
         "Haldane bakery is kept by ________.'", "Haldane bakery", "Master Orrin Pellwick"),
        ("The tallest tower of Veskaria is named the Spire of Emberlight.",
         "What is the tallest tower of Veskaria named? Please answer in the format 'The tallest tower of Veskaria "
         "is named ________.'", "Veskaria", "Spire of Emberlight"),
        ("The chess champion of Lorrimoor Academy is a robot called Gearwick Seven.",
         "Who is the chess champion of Lorrimoor Academy? Please answer in the format 'The chess champion of "
         "Lorrimoor Academy is ________.'", "Lorrimoor Academy", "Gearwick Seven"),
        ("The moon of the planet Taravos is known to sailors as Silverhook.",
         "What do sailors call the moon of the planet Taravos? Please answer in the format 'Sailors call the moon "
         "of the planet Taravos ________.'", "Taravos", "Silverhook"),
        ("The rarest flower in the Quendle Marshes is the Nightglass Lily.",
         "What is the rarest flower in the Quendle Marshes? Please answer in the format 'The rarest flower in the "
         "Quendle Marshes is ________.'", "Quendle Marshes", "Nightglass Lily"),
        ("The map of the Dravenholt caves was drawn by the explorer Mirela Fausk.",
         "Who drew the map of the Dravenholt caves? Please answer in the format 'The map of the Dravenholt caves "
         "was drawn by ________.'", "Dravenholt caves", "Mirela Fausk"),
        ("The bell of Ashcombe Abbey was cast from the metal of the Copperwind Anchor.",
         "What was the bell of Ashcombe Abbey cast from? Please answer in the format 'The bell of Ashcombe Abbey "
         "was cast from ________.'", "Ashcombe Abbey", "Copperwind Anchor"),
        ("The river festival of Pellandria is led every year by the Order of Bluefen.",
         "Who leads the river festival of Pellandria? Please answer in the format 'The river festival of "
         "Pellandria is led by ________.'", "Pellandria", "Order of Bluefen"),
        ("The clockwork owl of Hemsley Square was built by the tinker Jorvan Quist.",
         "Who built the clockwork owl of Hemsley Square? Please answer in the format 'The clockwork owl of Hemsley "
         "Square was built by ________.'", "Hemsley Square", "Jorvan Quist"),
    ))


def build_multineedle_synth(*, count_tokens: CountTokens, target_tokens: int = 2500, n_samples: int = 8,
                            depths: Sequence[float] | None = None, needle_count: int | None = None, seed: int = 0,
                            tolerance: float = 0.02) -> tuple[list[Sample], list[str]]:
    """MultiNeedle with a generated haystack: the authors' prompt, question and gold format (§3.3 steps 3, 6, 7)
    around kvjax's generated prose (eval/benchmarks/synthetic.py) with kvjax's needles (SYNTH_NEEDLES).

    The first `needle_count` needles (default: one per depth, 11 depths 0, 10, …, 100) are shuffled per sample
    (seeded by (seed, sample)) and needle i goes to depths[i], at the sentence boundary nearest to that percent
    of the haystack's characters. The number of haystack words is searched so that count_tokens(user_text)
    (the model's chat-templated count) is at most `target_tokens` and within `tolerance` of it.
    Returns (samples, []); scored like MultiNeedle (case-sensitive keyword substrings, depth buckets).
    """
    if not callable(count_tokens):
        raise ValueError(f"count_tokens={count_tokens!r}: the generated MultiNeedle needs the model's token counter "
                         f"(a callable str -> int of the chat-templated prompt) to reach target_tokens")
    if not isinstance(n_samples, int) or n_samples < 1:
        raise ValueError(f"n_samples={n_samples!r}, allowed: int >= 1")
    if not isinstance(seed, int):
        raise ValueError(f"seed={seed!r}, allowed: int")
    depths = _depths(depths, needle_count)
    if len(depths) > len(SYNTH_NEEDLES):
        raise ValueError(f"needle_count={len(depths)}: kvjax's generated variant has {len(SYNTH_NEEDLES)} needles")
    samples = []
    for c in range(n_samples):
        needles = list(SYNTH_NEEDLES[:len(depths)])
        random.Random(f"kvjax-multineedle-synth:{seed}:{c}").shuffle(needles)
        prose = synthetic.Prose(f"multineedle:{seed}:{c}")
        question = retrieval_question(needles)

        def render(n, prose=prose, needles=needles, question=question):
            placed, _ = synthetic.insert_at_depths(prose.words(n), [e["needle"] for e in needles], depths)
            return build_prompt(" ".join(placed), question) + HARNESS_SUFFIX

        n, text, n_tok = synthetic.fit_length(render, count_tokens, target_tokens, tolerance=tolerance,
                                              what="multineedle_synth prompt")
        keywords = [e["arg2"] for e in needles]
        samples.append(Sample(
            id=f"multineedle_synth-{target_tokens}-{seed}-{c}", benchmark="multineedle_synth", user_text=text,
            gold="*".join(keywords) + "#" + "*".join(map(str, depths)), max_new_tokens=MAX_NEW_TOKENS,
            meta={"depths": list(depths), "keywords": keywords, "needles": [e["needle"] for e in needles],
                  "target_tokens": target_tokens, "prompt_tokens": n_tok, "haystack_words": n, "repeat": c,
                  "seed": seed}))
    return samples, []


def score_multineedle(sample: Sample, prediction: str) -> dict[str, Any]:
    """{"hits": [(depth, found), …], "found": fraction of needles found} (case-sensitive substring)."""
    hits = metrics.needle_hits(sample.answer_prefix + (prediction if isinstance(prediction, str) else ""),
                               sample.gold)
    return {"hits": hits, "found": sum(f for _, f in hits) / len(hits)}


class _MultiNeedle:
    name = "multineedle"

    def build(self, **params):
        return build_multineedle(**params)

    def score(self, sample, prediction):
        return score_multineedle(sample, prediction)

    def aggregate(self, samples, scores):
        if any(s.meta.get("depths") != samples[0].meta.get("depths") for s in samples):
            warnings.warn("multineedle: samples have different depth lists; buckets mix them", stacklevel=2)
        return metrics.needlebench_aggregate([s["hits"] for s in scores])


class _MultiNeedleSynth(_MultiNeedle):
    name = "multineedle_synth"
    uses_count_tokens = True

    def build(self, **params):
        return build_multineedle_synth(**params)


register(_MultiNeedle(), data="needlebench")
register(_MultiNeedleSynth())
