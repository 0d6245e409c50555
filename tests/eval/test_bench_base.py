"""Sample record, registry, length filtering, data-dir resolution and the stand-in codec."""
import dataclasses

import pytest
from hypothesis import given, strategies as st

from eval.benchmarks import (Sample, SimpleCodec, available, count_simple_tokens, dataset_of, filter_by_length,
                             get_benchmark, load)


def _s(i, text):
    return Sample(id=f"s{i}", benchmark="t", user_text=text, gold="g")


def test_sample_is_frozen_and_validated():
    s = _s(0, "hello")
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.user_text = "x"
    with pytest.raises(ValueError, match="user_text"):
        Sample(id="a", benchmark="t", user_text="", gold=None)
    with pytest.raises(ValueError, match="max_new_tokens"):
        Sample(id="a", benchmark="t", user_text="x", gold=None, max_new_tokens=0)


def test_filter_skips_and_never_truncates():
    samples = [_s(0, "one two"), _s(1, "one two three four five"), _s(2, "a b c")]
    count = lambda t: len(t.split())  # noqa: E731
    kept, too_long, lengths = filter_by_length(samples, count, 3)
    assert kept == [samples[0], samples[2]]
    assert kept[1].user_text == "a b c"          # untouched
    assert too_long == ["s1"]
    assert lengths == {"s0": 2, "s1": 5, "s2": 3}  # == max is kept
    kept, too_long, _ = filter_by_length(samples, count, None)
    assert len(kept) == 3 and too_long == []
    with pytest.raises(ValueError, match="max_prompt_tokens"):
        filter_by_length(samples, count, 0)


def test_registry_names_and_unknown():
    assert {"text2json", "text2json_synth", "multineedle", "longproc"} <= set(available())
    with pytest.raises(KeyError, match="nope"):
        get_benchmark("nope")


def test_load_requires_counter_for_limit():
    with pytest.raises(ValueError, match="count_tokens"):
        load("text2json_synth", max_prompt_tokens=100, n_samples=1, count_tokens=None, target_tokens=500)


def test_load_report_counts_too_long():
    # two synthetic samples of ~600 tokens; a limit equal to the shorter one drops only the longer one(s)
    samples, report = load("text2json_synth", n_samples=2, count_tokens=count_simple_tokens, target_tokens=600,
                           n_entities=2)
    assert report.n_built == 2 and report.n_too_long == 0 and set(report.prompt_tokens) == {s.id for s in samples}
    limit = min(report.prompt_tokens.values())
    with pytest.warns(UserWarning, match="over max_prompt_tokens"):
        kept, rep2 = load("text2json_synth", n_samples=2, count_tokens=count_simple_tokens, target_tokens=600,
                          n_entities=2, max_prompt_tokens=limit)
    assert all(count_simple_tokens(s.user_text) <= limit for s in kept)
    assert rep2.n_kept == len(kept) == 2 - rep2.n_too_long
    assert "over max_prompt_tokens" in rep2.summary()


def test_registry_declares_the_data_each_benchmark_reads():
    assert {b: dataset_of(b) for b in ("text2json", "multineedle", "longproc")} == {
        "text2json": "text2json", "multineedle": "needlebench", "longproc": "longproc"}
    for b in ("text2json_synth", "multineedle_synth", "ruler_niah_multikey", "ruler_vt", "ruler_cwe", "ruler_fwe"):
        assert dataset_of(b) is None


def test_load_reports_a_generated_source_with_its_seed():
    _, report = load("text2json_synth", n_samples=1, count_tokens=count_simple_tokens, target_tokens=600,
                     n_entities=2, seed=7, data_dir="/ignored/for/generated")
    assert report.source == {"kind": "generated", "seed": 7}
    _, report = load("text2json_synth", n_samples=1, count_tokens=count_simple_tokens, target_tokens=600,
                     n_entities=2)
    assert report.source == {"kind": "generated", "seed": 0}


@given(st.text())
def test_simple_codec_roundtrip(text):
    c = SimpleCodec()
    ids = c.encode(text)
    assert c.decode(ids) == text
    assert len(ids) == count_simple_tokens(text)


def test_simple_codec_counts_words_and_punctuation():
    assert count_simple_tokens("Hello, world!") == 5  # Hello , ␠ world !


def test_max_samples_stops_counting_once_enough_are_kept():
    """load(max_samples=N): the token counter sees only the samples up to the N-th kept one (over-long ones are
    still skipped, not counted as kept), and the report says how many were left unread."""
    from eval.benchmarks import load

    seen = []

    def count(text):
        seen.append(text)
        return 10_000 if len(seen) == 2 else 10  # the second sample is too long

    samples, rep = load("toy_retrieval", count_tokens=count, max_prompt_tokens=1000, max_samples=2, n_samples=6,
                        n_pairs=4)
    assert len(samples) == 2 and len(seen) == 3 and rep.too_long == [rep.too_long[0]]
    assert rep.n_built == 6 and rep.not_read == 3 and rep.n_kept == 2
    assert "3 more not read" in rep.summary()
