"""MultiNeedle construction (§3.3) and scoring (§3.4). Real-data tests read ../shared/data/needlebench."""
import json
import random
import re

import pytest

from eval.benchmarks import SimpleCodec, build_multineedle, get_benchmark, load
from eval.benchmarks.multineedle import PROMPT_HEAD_EN, insert_needles, needle_pool

# spec table §3.3 step 1, in order
SPEC_POOL = ["Virtual Rocket Band", "Interstellar Flight Band", "Galaxy Melody Band", "Intelligent Robot Zambot",
             "Cosmic Ruler Starshine", "Guardian of Time Lightspeed", "Voyager of the Stars",
             "Poseidon of the North Sea", "Orion the Hunter", "Counterclockwise Crystal", "Eternal Flame"]


@pytest.fixture(scope="module")
def data(shared_dir):
    d = shared_dir / "data"
    if not (d / "needlebench" / "needles.jsonl").exists():
        pytest.skip("needlebench data absent")
    return d


@pytest.fixture(scope="module")
def small(data):
    return build_multineedle(tokenizer=SimpleCodec(), data_dir=data, context_length=6000, length_buffer=1000,
                             n_samples=4)[0]


def test_insert_needles_hand_oracle():
    hay = list(range(10))
    out = insert_needles(hay, [0, 50, 100], [[100], [200, 201], [300]])
    # points 0, 5, 10; shifted by what was inserted before (0, 1, 3); the last clipped to the length
    assert out == [100, 0, 1, 2, 3, 4, 200, 201, 5, 6, 7, 8, 9, 300]


def test_needle_pool_matches_spec(data):
    pool = needle_pool(data / "needlebench" / "needles.jsonl", 11)
    assert [e["arg2"] for e in pool] == SPEC_POOL
    assert len(needle_pool(data / "needlebench" / "needles.jsonl", 20)) == 20
    with pytest.raises(ValueError, match="needle_count=21"):
        needle_pool(data / "needlebench" / "needles.jsonl", 21)


def test_first_sample_gold_matches_spec(small):
    kws, depths = small[0].gold.split("#")
    assert kws.startswith("Orion the Hunter*Counterclockwise Crystal*")
    assert kws.endswith("*Voyager of the Stars")
    assert sorted(kws.split("*")) == sorted(SPEC_POOL)
    assert depths == "0*10*20*30*40*50*60*70*80*90*100"


def test_sample_structure(small):
    for s in small:
        t = s.user_text
        assert t.startswith(PROMPT_HEAD_EN)
        assert t.endswith("'\n\n\n")  # prompt's own newline + the harness's "\n\n"
        assert s.max_new_tokens == 1024 and s.benchmark == "multineedle"
        context = t[len(PROMPT_HEAD_EN):t.index("\n</Document>")]
        # every needle verbatim, in depth order
        pos = [context.index("\n" + n + "\n") for n in s.meta["needles"]]
        assert pos == sorted(pos)
        assert context.startswith("\n" + s.meta["needles"][0] + "\n")   # depth 0: very start
        assert context.endswith("\n" + s.meta["needles"][-1] + "\n")    # depth 100: very end
        # haystack + needles take exactly context_length - length_buffer tokens of the codec
        assert s.meta["context_tokens"] == 5000
        assert abs(len(SimpleCodec().encode(context)) - 5000) <= 20
        # the question lists every needle's question, joined by the ideographic comma
        q = t[t.index("now please answer: ") + len("now please answer: "):]
        assert q.count("?") == 11 and q.count("\u3001") == 20
        assert "Please answer in the format of '" in q


def test_cumulative_essay_shuffle(data, small):
    # independent oracle: the authors' procedure with the global random module
    with open(data / "needlebench" / "PaulGrahamEssays.jsonl", encoding="utf-8") as f:
        lines = [json.loads(x)["text"] for x in f]
    state = random.getstate()
    try:
        firsts = []
        for c in range(4):
            random.seed(c)
            random.shuffle(lines)
            firsts.append(lines[0])
    finally:
        random.setstate(state)
    for s, first in zip(small, firsts):
        context = s.user_text[len(PROMPT_HEAD_EN):]
        after_needle = context[len(s.meta["needles"][0]) + 2:]
        assert after_needle.startswith(first[:300])


def test_deterministic_and_distinct(data, small):
    again = build_multineedle(tokenizer=SimpleCodec(), data_dir=data, context_length=6000, length_buffer=1000,
                              n_samples=4)[0]
    assert [s.user_text for s in again] == [s.user_text for s in small]
    assert len({s.gold for s in small}) == 4 and len({s.id for s in small}) == 4


def test_needle_count_and_depth_parameters(data):
    s = build_multineedle(tokenizer=SimpleCodec(), data_dir=data, context_length=3000, length_buffer=0,
                          needle_count=3, n_samples=1)[0][0]
    assert s.meta["depths"] == [0, 50, 100] and len(s.meta["keywords"]) == 3
    s = build_multineedle(tokenizer=SimpleCodec(), data_dir=data, context_length=3000, length_buffer=0,
                          depths=[25, 75], n_samples=1)[0][0]
    assert s.gold.endswith("#25*75")
    with pytest.raises(ValueError, match="needle_count"):
        build_multineedle(tokenizer=SimpleCodec(), data_dir=data, needle_count=2, depths=[0, 50, 100])
    with pytest.raises(ValueError, match="depths"):
        build_multineedle(tokenizer=SimpleCodec(), data_dir=data, depths=[0, 120])
    with pytest.raises(ValueError, match="needle_count=21"):
        build_multineedle(tokenizer=SimpleCodec(), data_dir=data, needle_count=21, context_length=3000,
                          length_buffer=0)


def test_scoring_through_registry(small):
    bench = get_benchmark("multineedle")
    s = small[0]
    kws = s.meta["keywords"]
    all_found = "、".join(f"The answer is {k}." for k in kws)
    assert bench.score(s, all_found)["found"] == 1.0
    assert bench.score(s, "I do not know.")["found"] == 0.0
    assert bench.score(s, kws[0].lower())["found"] == 0.0   # case-sensitive
    scores = [bench.score(s, all_found), bench.score(small[1], "")]
    out = bench.aggregate(small[:2], scores)
    assert out["average_score"] == pytest.approx(50.0)
    assert all(out[f"Depth{d}"] == pytest.approx(50.0) for d in range(0, 101, 10))


def test_malformed_records_and_missing_dir(tmp_path, data):
    nb = tmp_path / "needlebench"
    nb.mkdir()
    essays = (data / "needlebench" / "PaulGrahamEssays.jsonl").read_text(encoding="utf-8").splitlines()[:20]
    (nb / "PaulGrahamEssays.jsonl").write_text("\n".join(essays[:10] + ["{broken", json.dumps({"title": "x"})]
                                                         + essays[10:]) + "\n", encoding="utf-8")
    needles = (data / "needlebench" / "needles.jsonl").read_text(encoding="utf-8").splitlines()
    english = [x for x in needles if '"English"' in x]
    (nb / "needles.jsonl").write_text("\n".join(["not json", json.dumps({"needle": 1})] + english) + "\n",
                                      encoding="utf-8")
    with pytest.warns(UserWarning, match="skipped 4 malformed"):
        samples, report = load("multineedle", tokenizer=SimpleCodec(), data_dir=tmp_path, context_length=4000,
                               n_samples=1)
    assert report.n_malformed == 4 and len(samples) == 1
    assert any("line 11" in m and "invalid JSON" in m for m in report.malformed)
    assert any("'text'" in m for m in report.malformed)
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "nowhere"))):
        build_multineedle(tokenizer=SimpleCodec(), data_dir=tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="needlebench"):
        build_multineedle(tokenizer=SimpleCodec(), data_dir=tmp_path / "empty")


# ------------------------------------------------------------------------------- generated haystack (no data)
def _synth(**kw):
    from eval.benchmarks import count_simple_tokens

    kw.setdefault("n_samples", 2)
    kw.setdefault("target_tokens", 3000)
    return load("multineedle_synth", count_tokens=count_simple_tokens, **kw)


def test_synth_is_deterministic_and_needs_no_data(monkeypatch, tmp_path):
    monkeypatch.delenv("KVJAX_DATA", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    a, rep = _synth(seed=1)
    b, _ = _synth(seed=1)
    c, _ = _synth(seed=2)
    assert [s.user_text for s in a] == [s.user_text for s in b] != [s.user_text for s in c]
    assert rep.source == {"kind": "generated", "seed": 1}


def test_synth_needles_sit_at_their_depths_and_the_target_length():
    from eval.benchmarks import count_simple_tokens
    from eval.benchmarks.multineedle import SYNTH_NEEDLES

    for target in (1500, 3000, 12000):
        samples, _ = _synth(target_tokens=target, needle_count=5)
        for s in samples:
            assert 0.98 * target <= count_simple_tokens(s.user_text) <= target
            assert s.user_text.startswith(PROMPT_HEAD_EN) and s.user_text.endswith("'\n\n\n")
            ctx = s.user_text[len(PROMPT_HEAD_EN):s.user_text.index("\n</Document>")]
            needles, depths = s.meta["needles"], s.meta["depths"]
            assert depths == [0, 25, 50, 75, 100]
            keywords, gold_depths = s.gold.split("#")
            assert keywords.split("*") == s.meta["keywords"] and gold_depths == "0*25*50*75*100"
            hay = len(ctx) - sum(len(n) + 1 for n in needles)
            for needle, kw, d in zip(needles, s.meta["keywords"], depths):
                assert s.user_text.count(kw) == 1  # the keyword occurs only in its needle
                pos = ctx.index(needle)
                before = sum(len(o) + 1 for o in needles if ctx.index(o) < pos)
                assert abs((pos - before) / hay - d / 100) < 0.02
            asked = {e["arg1"] for e in SYNTH_NEEDLES if e["needle"] in needles}
            assert all(a in s.user_text.split("</Document>")[1] for a in asked)


def test_synth_scorer_gives_100_on_the_reference_and_0_on_empty():
    samples, _ = _synth()
    bench = get_benchmark("multineedle_synth")
    ref = [bench.score(s, "; ".join(s.meta["keywords"])) for s in samples]
    assert bench.aggregate(samples, ref)["average_score"] == 100.0
    assert bench.aggregate(samples, [bench.score(s, "") for s in samples])["average_score"] == 0.0
