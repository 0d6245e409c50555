"""Text2JSON: synthetic generator (§2.7) and the loader of the authors' JSONL format."""
import dataclasses
import json
import re

import pytest

from eval.benchmarks import count_simple_tokens, generate_text2json, get_benchmark, load, load_text2json
from eval.benchmarks.text2json import DOMAINS, make_text2json_sample, write_text2json_jsonl

R = "\u2019"


def chars4(text: str) -> int:
    """A second, differently shaped counter (characters / 4)."""
    return len(text) // 4


@pytest.mark.parametrize("fmt", ["json", "lines"])
@pytest.mark.parametrize("domain", sorted(DOMAINS))
def test_gold_verbatim_and_well_formed(domain, fmt):
    s = make_text2json_sample(domain=domain, count_tokens=count_simple_tokens, target_tokens=3000, n_entities=8,
                              seed=3, answer_format=fmt)
    gold = json.loads(s.gold)
    assert len(gold) == 8
    names = [g["name"] for g in gold]
    assert len({n.replace(R, "'") for n in names}) == 8
    for obj in gold:
        assert set(obj) == {"name", *DOMAINS[domain].keys}
        for v in obj.values():
            assert isinstance(v, str) and v
            assert "[" not in v and "]" not in v
            assert v in s.user_text, v
    # gold order = order of first appearance in the prompt
    firsts = [s.user_text.index(n) for n in names]
    assert firsts == sorted(firsts)
    # the instruction names the three keys
    tail = s.user_text[-700:]
    for key in DOMAINS[domain].keys:
        assert key in tail
    assert s.meta["domain"] == domain and s.meta["format"] == fmt and s.max_new_tokens == 1024


@pytest.mark.parametrize("target", [1000, 4000, 20000, 40000])
@pytest.mark.parametrize("counter", [count_simple_tokens, chars4])
def test_prompt_length_within_ten_percent(target, counter):
    for s in generate_text2json(4, count_tokens=counter, target_tokens=target, n_entities=(3, 6), seed=11):
        n = counter(s.user_text)
        assert abs(n - target) <= 0.1 * target, (n, target)


def test_length_range_draws_a_target_per_sample_within_ten_percent():
    samples = generate_text2json(12, count_tokens=count_simple_tokens, target_tokens=(2000, 6000), n_entities=5,
                                 seed=3)
    lengths = [count_simple_tokens(s.user_text) for s in samples]
    assert all(2000 * 0.9 <= n <= 6000 * 1.1 for n in lengths), lengths
    assert max(lengths) - min(lengths) > 1000, lengths  # a spread, not one target
    again = generate_text2json(12, count_tokens=count_simple_tokens, target_tokens=[2000, 6000], n_entities=5, seed=3)
    assert [s.user_text for s in again] == [s.user_text for s in samples]  # a CLI list works and is deterministic
    with pytest.raises(ValueError, match="target_tokens"):
        generate_text2json(1, count_tokens=count_simple_tokens, target_tokens=(5000, 4000))


def test_deterministic_per_seed():
    kw = dict(count_tokens=count_simple_tokens, target_tokens=2500, n_entities=5)
    a = generate_text2json(4, seed=7, **kw)
    b = generate_text2json(4, seed=7, **kw)
    c = generate_text2json(4, seed=8, **kw)
    assert [(s.user_text, s.gold) for s in a] == [(s.user_text, s.gold) for s in b]
    assert all(x.gold != y.gold for x, y in zip(a, c))
    assert [s.meta["domain"] for s in a] == ["products", "medical", "organisations", "movies"]
    assert len({s.id for s in a}) == 4


def test_apostrophe_names_occur():
    # the name pools include U+2019 so the scorer's normalisation is exercised somewhere in a modest set
    samples = generate_text2json(8, count_tokens=count_simple_tokens, target_tokens=3000, n_entities=12, seed=0)
    assert any(R in json.loads(s.gold)[i]["name"] for s in samples for i in range(12))


def test_distractors_present():
    s = make_text2json_sample(domain="products", count_tokens=count_simple_tokens, target_tokens=6000,
                              n_entities=5, seed=1)
    text = s.user_text
    # passages about entities of the other domains (doctors, films, organisations) are mixed in as distractors
    assert re.search(r"\bDr\. ", text) and re.search(r"directed|Directed", text)
    assert re.search(r"[Ff]ounded in|established in", text)
    # non-target attributes of the products themselves (a shipping fee next to the price, weights, ratings)
    assert re.search(r"Shipping adds|warranty|weighs|rate it", text)


def test_target_too_small_raises():
    with pytest.raises(ValueError, match="target_tokens"):
        make_text2json_sample(domain="movies", count_tokens=count_simple_tokens, target_tokens=200, n_entities=30)
    with pytest.raises(ValueError, match="count_tokens"):
        make_text2json_sample(domain="movies", count_tokens=None, target_tokens=2000)
    with pytest.raises(ValueError, match="domain"):
        make_text2json_sample(domain="cars", count_tokens=count_simple_tokens, target_tokens=2000)
    with pytest.raises(ValueError, match="answer_format"):
        make_text2json_sample(domain="movies", count_tokens=count_simple_tokens, target_tokens=2000,
                              answer_format="yaml")


def test_perfect_answers_score_one_and_prefix_is_used():
    bench = get_benchmark("text2json_synth")
    js = make_text2json_sample(domain="medical", count_tokens=count_simple_tokens, target_tokens=2000,
                               n_entities=4, seed=2, answer_prefix='[{"name": "')
    gold = json.loads(js.gold)
    full = json.dumps(gold, ensure_ascii=False)
    assert full.startswith('[{"name": "')
    assert bench.score(js, full[len(js.answer_prefix):]) == {"score": 1.0}
    ln = make_text2json_sample(domain="medical", count_tokens=count_simple_tokens, target_tokens=2000,
                               n_entities=4, seed=2, answer_format="lines")
    keys = DOMAINS["medical"].keys
    lines = "\n".join(f"{g['name']} | {g[keys[0]]} | {g[keys[1]]}" for g in gold)
    assert bench.score(ln, lines) == {"score": 1.0}
    # half the entities, all right: 2 / 4
    assert bench.score(ln, "\n".join(lines.split("\n")[:2]))["score"] == pytest.approx(0.5)
    # the lines answer given to a JSON sample is unparseable -> 0
    assert bench.score(dataclasses.replace(js, answer_prefix=""), lines) == {"score": 0.0}


def test_aggregate_per_domain():
    bench = get_benchmark("text2json_synth")
    samples = generate_text2json(4, count_tokens=count_simple_tokens, target_tokens=1500, n_entities=3, seed=4)
    preds = [s.gold if i % 2 == 0 else "nothing" for i, s in enumerate(samples)]
    scores = [bench.score(s, p) for s, p in zip(samples, preds)]
    out = bench.aggregate(samples, scores)
    assert out["average_score"] == pytest.approx(50.0)
    assert out["average_score_products"] == 100.0 and out["average_score_medical"] == 0.0


def test_roundtrip_through_authors_format(tmp_path):
    samples = generate_text2json(3, count_tokens=count_simple_tokens, target_tokens=1500, n_entities=3, seed=5)
    path = write_text2json_jsonl(samples, tmp_path / "t2j.jsonl")
    for line in path.read_text(encoding="utf-8").splitlines():
        rec = json.loads(line)
        assert isinstance(rec["problem"], str) and isinstance(rec["answer"], str)
        assert isinstance(json.loads(rec["answer"]), list)
    loaded, report = load("text2json", path=path)
    assert [s.user_text for s in loaded] == [s.user_text for s in samples]
    assert [s.gold for s in loaded] == [s.gold for s in samples]
    assert loaded[0].meta["domain"] == "products" and report.n_malformed == 0
    assert loaded[0].benchmark == "text2json" and loaded[0].max_new_tokens == 1024
    # first N lines only, like TEXT2JSON_N_SAMPLES
    assert len(load_text2json(path, n_samples=2)[0]) == 2


def test_loader_rejects_malformed_records(tmp_path):
    good = {"problem": "Extract things.", "answer": json.dumps([{"name": "X", "a": "1", "b": "2"}])}
    lines = [
        json.dumps(good),
        "{not json",
        json.dumps({"answer": good["answer"]}),                                            # no problem
        json.dumps({"problem": "p", "answer": [{"name": "X", "a": "1", "b": "2"}]}),        # answer not a string
        json.dumps({"problem": "p", "answer": json.dumps({"name": "X"})}),                  # not a list
        json.dumps({"problem": "p", "answer": json.dumps([{"name": "X", "a": "1"}])}),      # 2 keys
        json.dumps({"problem": "p", "answer": json.dumps([{"name": "X", "a": 1, "b": "2"}])}),  # non-str value
        json.dumps({"problem": "p", "answer": json.dumps([{"name": f"O{R}N", "a": "1", "b": "2"},
                                                          {"name": "O'N", "a": "1", "b": "2"}])}),  # dup names
        json.dumps({"problem": "p", "answer": "[]"}),                                       # empty gold
        "",
        json.dumps(["a list"]),
        json.dumps(good),
    ]
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.warns(UserWarning, match="skipped 10 malformed"):
        samples, msgs = load_text2json(path)
    assert len(samples) == 2 and len(msgs) == 10
    assert any("line 2" in m and "invalid JSON" in m for m in msgs)
    assert any("line 8" in m and "repeats a name" in m for m in msgs)
    assert all(str(path) in m for m in msgs)


def test_loader_datasets_branch(tmp_path):
    import datasets

    recs = [{"problem": "p1", "answer": json.dumps([{"name": "X", "a": "1", "b": "2"}])},
            {"problem": "p2", "answer": "oops"}]
    datasets.Dataset.from_list(recs).save_to_disk(str(tmp_path / "ds"))
    with pytest.warns(UserWarning):
        samples, msgs = load_text2json(tmp_path / "ds")
    assert [s.user_text for s in samples] == ["p1"] and len(msgs) == 1 and "row 1" in msgs[0]


def test_missing_file_names_path(tmp_path):
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "none.jsonl"))):
        load_text2json(tmp_path / "none.jsonl")
    with pytest.raises(FileNotFoundError, match="text2json.jsonl"):
        load_text2json(data_dir=tmp_path)
