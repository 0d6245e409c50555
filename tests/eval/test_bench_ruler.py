"""RULER-style generated tasks (eval/benchmarks/ruler.py, arXiv 2404.06654 §3): determinism, where the needles and
answers are, target lengths, and the scorer's ends (100 on the reference answer, 0 on an empty one)."""
import collections
import math
import re

import pytest

from eval.benchmarks import count_simple_tokens, get_benchmark, load
from eval.benchmarks import ruler, synthetic

TASKS = sorted(ruler.TASKS)


def _build(task, **kw):
    kw.setdefault("n_samples", 2)
    kw.setdefault("target_tokens", 1500)
    return load(task, count_tokens=count_simple_tokens, **kw)[0]


@pytest.mark.parametrize("task", TASKS)
def test_deterministic_per_seed(task):
    a, b, c = _build(task, seed=3), _build(task, seed=3), _build(task, seed=4)
    assert [(s.user_text, s.gold, s.answer_prefix) for s in a] == [(s.user_text, s.gold, s.answer_prefix) for s in b]
    assert [s.user_text for s in a] != [s.user_text for s in c]
    assert a[0].user_text != a[1].user_text  # samples differ from each other


@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("target", [1500, 4000, 12000])
def test_length_is_within_two_percent_below_the_target(task, target):
    for s in _build(task, target_tokens=target):
        n = count_simple_tokens(s.user_text)
        assert 0.98 * target <= n <= target, (task, target, n)
        assert s.meta["prompt_tokens"] == n


@pytest.mark.parametrize("task", TASKS)
def test_scorer_gives_100_on_the_reference_and_0_on_empty(task):
    samples = _build(task)
    bench = get_benchmark(task)
    ref = [bench.score(s, " " + ", ".join(s.gold) + ".") for s in samples]
    empty = [bench.score(s, "") for s in samples]
    assert bench.aggregate(samples, ref)["average_score"] == 100.0
    assert bench.aggregate(samples, empty)["average_score"] == 0.0
    half = bench.score(samples[0], " " + samples[0].gold[0])
    assert half["score"] == pytest.approx(1 / len(samples[0].gold))


def test_answers_must_be_whole_tokens():
    assert ruler.found_answers("The number is 91234567.", ["1234567"]) == [False]
    assert ruler.found_answers("the number is 1234567.", ["1234567"]) == [True]
    assert ruler.found_answers("They are: QWERT, ASDFG", ["qwert", "asdfgh"]) == [True, False]


def _context(s, head_end: str, question_start: str) -> str:
    text = s.user_text
    return text[text.index(head_end) + len(head_end):text.rindex(question_start)]


@pytest.mark.parametrize("haystack", ["prose", "noise", "needles"])
def test_multikey_needles_sit_at_the_asked_depths(haystack):
    depths = [0, 30, 65, 100]
    for s in _build("ruler_niah_multikey", depths=depths, haystack=haystack, target_tokens=3000):
        ctx = _context(s, "afterwards you will be asked for one of them.\n\n", "\n\nWhat is the special")
        needles = s.meta["needles"]
        assert len({n.split(" for ")[1].split(" is:")[0] for n in needles}) == 4  # four distinct keys
        asked = [n for n in needles if f"for {s.meta['asked']} is:" in n]
        assert len(asked) == 1 and asked[0].endswith(f"{s.gold[0]}.")
        assert ctx.count(f"for {s.meta['asked']} is:") == 1  # distractor needles never reuse a key
        assert f"for {s.meta['asked']} mentioned" in s.user_text[-120:]
        hay_len = len(ctx) - sum(len(n) + 1 for n in needles)  # haystack characters without the needles
        for needle, d in zip(needles, depths):
            pos = ctx.index(needle)
            before = sum(len(o) + 1 for o in needles if ctx.index(o) < pos)
            assert abs((pos - before) / hay_len - d / 100) < 0.02, (needle, d, (pos - before) / hay_len)


def test_multivalue_asks_for_every_value_of_one_key():
    for s in _build("ruler_niah_multivalue", n_values=4):
        key = s.meta["asked"]
        found = re.findall(rf"One of the special magic numbers for {re.escape(key)} is: (\d+)\.", s.user_text)
        assert sorted(found) == sorted(s.gold) and len(set(found)) == 4
        assert "What are all the special magic numbers for " + key in s.user_text


def test_variable_tracking_chain_is_in_order_and_complete():
    for s in _build("ruler_vt", n_chains=2, n_hops=3, target_tokens=1200):
        value = re.search(r"assigned the value (\d{5}) in the text above", s.user_text).group(1)
        names = s.gold
        assert len(names) == 4
        lines = s.user_text.splitlines()
        first = lines.index(f"VAR {names[0]} = {value}.")
        prev = first
        for a, b in zip(names, names[1:]):
            here = lines.index(f"VAR {b} = VAR {a}.")
            assert here > prev
            prev = here
        # an independent oracle: follow the assignments from the value
        assign = dict(re.findall(r"^VAR ([A-Z]{5}) = (?:VAR )?([A-Z]{5}|\d{5})\.$", s.user_text, re.M))
        holders = {v for v in assign if _resolve(assign, v) == value}
        assert holders == set(names)


def _resolve(assign, v):
    while v in assign:
        v = assign[v]
    return v


def test_common_words_are_the_most_common_entries():
    for target, fc, fu in ((2000, 6, 1), (5000, 30, 3)):
        for s in _build("ruler_cwe", target_tokens=target):
            listing = s.user_text.rsplit("appear most often.\n", 1)[1].split("\nQuestion:")[0]
            entries = re.findall(r"(\d+)\. (\S+)", listing)
            assert [int(i) for i, _ in entries] == list(range(1, len(entries) + 1))
            counts = collections.Counter(w for _, w in entries)
            assert {w for w, _ in counts.most_common(10)} == set(s.gold) and len(s.gold) == 10
            assert {counts[w] for w in s.gold} == {fc}
            assert set(counts.values()) == {fc, fu}
            assert "Answer: The top 10 words" in s.user_text  # the solved example comes first


def test_frequent_words_follow_zipf_counts():
    for s in _build("ruler_fwe", target_tokens=3000):
        coded = s.user_text.split("coded words. ", 1)[1].split("\nQuestion:")[0].split()
        counts = collections.Counter(coded)
        assert counts.most_common(1)[0][0] == "..."
        top = [w for w, _ in counts.most_common(4)[1:]]
        assert top == s.gold
        n = s.meta["n_words"]
        zeta2 = math.pi ** 2 / 6  # the spec number for alpha = 2
        assert [counts["..."]] + [counts[w] for w in top] == [int(n / (k * k * zeta2)) for k in range(1, 5)]


def test_insert_at_depths_hand_oracle():
    units = ["aaaa", "bbbb", "cccc", "dddd"]  # boundaries at characters 0, 5, 10, 15, 20 (with " ")
    out, where = synthetic.insert_at_depths(units, ["X", "Y", "Z"], [0, 50, 100])
    assert out == ["X", "aaaa", "bbbb", "Y", "cccc", "dddd", "Z"] and where == [0, 3, 6]
    out, _ = synthetic.insert_at_depths(units, ["P", "Q"], [26, 24])  # same boundary: given order kept
    assert out == ["aaaa", "P", "Q", "bbbb", "cccc", "dddd"]


def test_errors_name_the_argument():
    with pytest.raises(ValueError, match="count_tokens"):
        ruler.build_vt(count_tokens=None)
    with pytest.raises(ValueError, match="target_tokens=100 is too small"):
        ruler.build_cwe(count_tokens=count_simple_tokens, target_tokens=100, n_samples=1)
    with pytest.raises(ValueError, match="haystack='essay'"):
        ruler.build_niah_multikey(count_tokens=count_simple_tokens, haystack="essay")
    with pytest.raises(ValueError, match="depths has 2 entries but 4"):
        ruler.build_niah_multikey(count_tokens=count_simple_tokens, depths=[0, 50])
    with pytest.raises(ValueError, match="alpha"):
        ruler.build_fwe(count_tokens=count_simple_tokens, alpha=1.0)
