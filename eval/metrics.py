"""Task scorers of the paper's benchmarks, re-implemented from the authors' evaluators
(shared/specs/benchmarks.md §2.5, §3.4, §4.4). Pure Python, no model code.

Sections:
  * Text2JSON: `text2json_iou` (the authors' `Text2jsonEvaluator`, hardened), `text2json_lines_iou`
    (our line format scored by the same matching rules), `text2json_aggregate`.
  * MultiNeedle: `needle_hits` (case-sensitive substring per keyword), `needlebench_aggregate`.
  * LongProc HTML-to-TSV: `extract_tsv`, `html_to_tsv_metrics`, `longproc_aggregate`.
  * (A `fidelity` section, comparing a method's outputs with full attention, is added separately.)
"""
from __future__ import annotations

import csv
import json
import re
import string
from typing import Any, Iterable, Mapping, Sequence

# =================================================================================================================
# Text2JSON
# =================================================================================================================

_RSQUO = "\u2019"  # typographic apostrophe; both gold and prediction map it to "'"
MISSING_KEY_PENALTY = 0.5  # per gold attribute absent or null (max object score 1, 2 attributes)
WRONG_VALUE_PENALTY = 0.25  # per gold attribute present with a different value


def _norm_quote(s: str) -> str:
    return s.replace(_RSQUO, "'")


def parse_text2json_gold(gold: str | Sequence[Mapping[str, Any]]) -> dict[str, dict[str, str]] | None:
    """Gold answer -> {normalised name: {attr: value}} in gold order, or None for the authors' "bad sample"
    (a name repeated after U+2019 -> ' normalisation; such samples are excluded from the average).

    `gold` is the JSON-encoded list (the dataset's `answer` string) or the decoded list. Raises ValueError if it is
    not a non-empty list of objects with exactly three string-valued keys, one of them "name".
    """
    items = json.loads(gold) if isinstance(gold, str) else gold
    if not isinstance(items, list) or not items:
        raise ValueError(f"Text2JSON gold must be a non-empty JSON list of objects, got {type(items).__name__}"
                         f"{' (empty)' if isinstance(items, list) else ''}")
    mapping: dict[str, dict[str, str]] = {}
    for k, obj in enumerate(items):
        if not isinstance(obj, Mapping) or len(obj) != 3 or "name" not in obj:
            raise ValueError(f"Text2JSON gold object {k} must have exactly 3 keys including 'name', got {obj!r}")
        if not all(isinstance(v, str) for v in obj.values()):
            raise ValueError(f"Text2JSON gold object {k} must have string values only, got {obj!r}")
        name = _norm_quote(obj["name"])
        if name in mapping:
            return None
        mapping[name] = {key: val for key, val in obj.items() if key != "name"}
    return mapping


def _iou_match(gold: dict[str, dict[str, str]], predicted: Iterable[Any]) -> float:
    """The authors' object matching (§2.5 step 4-5): sum of object scores / |gold ∪ predicted-by-name|.

    Predicted items are processed in order; a gold name is consumed on its first match. Hardening (documented
    deviations from the original, which raises): a non-dict item counts as an extra; an attribute value that is
    neither str, int nor None (float, bool, list, dict) counts as a wrong value.
    """
    remaining = dict(gold)
    union = len(gold)
    total = 0.0
    for item in predicted:
        if not isinstance(item, Mapping) or not isinstance(item.get("name"), str):
            union += 1
            continue
        name = _norm_quote(item["name"])
        if name not in remaining:
            union += 1
            continue
        obj_score = 1.0
        for key, gold_value in remaining.pop(name).items():
            value = item.get(key)
            if key not in item or value is None:
                obj_score -= MISSING_KEY_PENALTY
                continue
            if type(value) is int:  # the original converts ints only (not bool, not float)
                value = str(value)
            if not isinstance(value, str) or _norm_quote(value) != _norm_quote(gold_value):
                obj_score -= WRONG_VALUE_PENALTY
        total += obj_score
    return total / union


def extract_json_array(prediction: str) -> list | None:
    """The authors' extraction: exactly one '[' and one ']', '[' first; strict json.loads of that span; a list.
    Returns None when any condition fails."""
    if not isinstance(prediction, str):
        return None
    if prediction.count("[") != 1 or prediction.count("]") != 1:
        return None
    i, j = prediction.index("["), prediction.index("]")
    if i > j:
        return None
    try:
        parsed = json.loads(prediction[i:j + 1])
    except (ValueError, RecursionError):
        return None
    return parsed if isinstance(parsed, list) else None


def text2json_iou(prediction: str, gold: str | Sequence[Mapping[str, Any]]) -> float | None:
    """Per-sample Text2JSON score in [0, 1] (the authors' `Text2jsonEvaluator`, §2.5).

    Returns None for a gold with duplicate names (the authors' "bad sample", excluded from the average).
    Any malformed prediction (bracket count, invalid JSON, not a list) scores 0.0; it never raises on the
    prediction. Raises ValueError for a malformed gold (see `parse_text2json_gold`).
    """
    mapping = parse_text2json_gold(gold)
    if mapping is None:
        return None
    items = extract_json_array(prediction)
    if items is None:
        return 0.0
    return _iou_match(mapping, items)


_BULLET = re.compile(r"^\s*(?:[-*\u2022]\s+|\d+[.)]\s+)")
_TABLE_RULE = re.compile(r"^[\s|:\-]*$")


def parse_lines_answer(prediction: str, keys: Sequence[str]) -> list[dict[str, str | None]]:
    """Parse the line format "name | attr1 | attr2" into objects {"name": ..., keys[0]: ..., keys[1]: ...}.

    Rules: lines without '|' are prose and ignored; a leading list marker ("- ", "* ", "1. ") and outer pipes
    (markdown tables) are removed; markdown rule lines ("---|---") are ignored; cells are whitespace-stripped; an
    empty or absent attribute cell is missing (None); cells after the third are ignored (like extra JSON keys); a
    line equal to the header (the key names, case-insensitive) is ignored.
    """
    keys = list(keys)
    out: list[dict[str, str | None]] = []
    if not isinstance(prediction, str):
        return out
    header = [k.lower() for k in ["name", *keys]]
    for line in prediction.splitlines():
        if "|" not in line or _TABLE_RULE.match(line):
            continue
        line = _BULLET.sub("", line).strip()
        if line.startswith("|"):
            line = line[1:]
        if line.endswith("|"):
            line = line[:-1]
        cells = [c.strip() for c in line.split("|")]
        if [c.lower() for c in cells[:3]] == header:
            continue
        obj: dict[str, str | None] = {"name": cells[0]}
        for n, key in enumerate(keys, start=1):
            obj[key] = cells[n] if n < len(cells) and cells[n] else None
        out.append(obj)
    return out


def text2json_lines_iou(prediction: str, gold: str | Sequence[Mapping[str, Any]]) -> float | None:
    """Per-sample score of the line format ("name | attr1 | attr2" per line), in [0, 1], with exactly the IoU
    matching rules of `text2json_iou` (names consumed in order, penalties 0.5 missing / 0.25 wrong, extras enlarge
    the union); the attribute order is the gold objects' key order. None for a duplicate-name gold."""
    mapping = parse_text2json_gold(gold)
    if mapping is None:
        return None
    keys = list(next(iter(mapping.values())).keys())
    return _iou_match(mapping, parse_lines_answer(prediction, keys))


def text2json_aggregate(scores: Sequence[float | None]) -> dict[str, float]:
    """`average_score` = 100 * Σ score / (n_samples - bad_samples), where bad samples (None) are excluded and
    prediction failures (0.0) stay in. Also returns the counts."""
    good = [s for s in scores if s is not None]
    bad = len(scores) - len(good)
    avg = 100.0 * sum(good) / len(good) if good else float("nan")
    return {"average_score": avg, "n_samples": float(len(scores)), "bad_samples": float(bad)}


# =================================================================================================================
# MultiNeedle (NeedleBench v2 parallel / multi-retrieval)
# =================================================================================================================


def parse_needle_gold(gold: str) -> tuple[list[str], list[int]]:
    """"kw1*kw2*…#d1*d2*…" -> (keywords, depths). Raises ValueError if the parts do not pair up."""
    if not isinstance(gold, str) or gold.count("#") != 1:
        raise ValueError(f"MultiNeedle gold must be 'kw*kw…#depth*depth…', got {gold!r}")
    kw, dp = gold.split("#")
    keywords, depths = kw.split("*"), [int(d) for d in dp.split("*")]
    if len(keywords) != len(depths):
        raise ValueError(f"MultiNeedle gold pairs {len(keywords)} keywords with {len(depths)} depths: {gold!r}")
    return keywords, depths


def needle_hits(prediction: str, gold: str) -> list[tuple[int, bool]]:
    """For each (keyword, depth) of the gold: (depth, keyword occurs in the raw prediction), case-sensitive
    substring, no normalisation (the authors' `NeedleBenchParallelEvaluator`)."""
    keywords, depths = parse_needle_gold(gold)
    pred = prediction if isinstance(prediction, str) else ""
    return [(d, kw in pred) for kw, d in zip(keywords, depths)]


def needlebench_aggregate(hits_per_sample: Sequence[Sequence[tuple[int, bool]]]) -> dict[str, float]:
    """Depth buckets and average as the authors compute them: each found keyword adds 100/N_samples to its depth's
    bucket ("Depth{d}"); `average_score` is the mean over the distinct depth buckets."""
    n = len(hits_per_sample)
    buckets: dict[int, float] = {}
    for hits in hits_per_sample:
        for depth, _ in hits:
            buckets.setdefault(depth, 0.0)
    for hits in hits_per_sample:
        for depth, found in hits:
            if found:
                buckets[depth] += 100.0 / n
    out = {f"Depth{d}": v for d, v in buckets.items()}
    out["average_score"] = sum(buckets.values()) / len(buckets) if buckets else float("nan")
    return out


# =================================================================================================================
# LongProc HTML-to-TSV
# =================================================================================================================

_TSV_FENCE = re.compile(r"```tsv([\s\S]*)```")  # greedy: first ```tsv to the LAST ```
_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)
_PUNCT = frozenset(string.punctuation)


def extract_tsv(prediction: str) -> str:
    """The authors' TSV extraction (§4.4 step 1): greedy ```tsv ... ``` fence, else everything after the first
    ```tsv, else the whole output; stripped."""
    m = _TSV_FENCE.search(prediction)
    if m is not None:
        return m.group(1).strip()
    if "```tsv" in prediction:
        prediction = prediction.split("```tsv")[1]
    return prediction.strip()


def normalize_cell(s: str) -> str:
    """lowercase -> drop ASCII punctuation -> articles a/an/the to a space -> collapse whitespace -> drop spaces."""
    s = "".join(ch for ch in s.lower() if ch not in _PUNCT)
    s = _ARTICLES.sub(" ", s)
    return " ".join(s.split()).replace(" ", "")


class _TsvError(ValueError):
    pass


def _parse_tsv(text: str) -> list[tuple[str, ...]]:
    """Rows (normalised cells) of a TSV string as the authors' `_string_to_pd` builds them: csv.reader with a tab
    delimiter over the '\\n'-split lines, first row = header (only its length and its names' uniqueness matter),
    last data row dropped if its length differs from the header's, any other wrong-length row -> all "N/A".
    Raises _TsvError where the original returns None (no data row; duplicate header names, on which the
    original's pandas column loop fails)."""
    data = list(csv.reader(text.strip().split("\n"), delimiter="\t"))
    if len(data) < 2:
        raise _TsvError("no data row after the header")
    header, rows = data[0], data[1:]
    if len(set(header)) != len(header):
        raise _TsvError(f"duplicate header names {header!r}")
    if len(rows[-1]) != len(header):
        rows = rows[:-1]
    width = len(header)
    return [tuple(normalize_cell(c) for c in (r if len(r) == width else ["N/A"] * width)) for r in rows]


def html_to_tsv_metrics(prediction: str, gold_tsv: str) -> dict[str, float]:
    """Row-level precision / recall / F1 of a predicted TSV against the ground truth (§4.4), in [0, 1].

    precision = fraction of predicted rows equal (all columns, by position, after `normalize_cell`) to some GT
    row; recall = fraction of GT rows equal to some predicted row; no one-to-one matching. Any failure (no rows,
    column counts differ, duplicate header names) gives zeros and extraction_rate 0, as in the original.
    """
    pred_text = extract_tsv(prediction if isinstance(prediction, str) else "")
    zero = {"f1": 0.0, "precision": 0.0, "recall": 0.0, "extraction_rate": 0.0}
    try:
        gt_rows = _parse_tsv(gold_tsv)
        pred_rows = _parse_tsv(pred_text)
    except (_TsvError, csv.Error):
        return zero
    if not pred_rows or not gt_rows:
        return zero  # the original divides by zero
    if len(pred_rows[0]) != len(gt_rows[0]):
        return zero  # the original's row comparison fails to broadcast
    gt_set, pred_set = set(gt_rows), set(pred_rows)
    precision = sum(r in gt_set for r in pred_rows) / len(pred_rows)
    recall = sum(r in pred_set for r in gt_rows) / len(gt_rows)
    f1 = 0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall)
    return {"f1": f1, "precision": precision, "recall": recall, "extraction_rate": 1.0}


def longproc_aggregate(metrics: Sequence[Mapping[str, float]]) -> dict[str, float]:
    """Mean of each metric over samples, ×100 (the authors' `LongProcEvaluator`)."""
    keys = ("f1", "precision", "recall", "extraction_rate")
    n = len(metrics)
    return {k: (100.0 * sum(m[k] for m in metrics) / n if n else float("nan")) for k in keys}
