"""Scorers against hand-made cases; expected values are worked out by hand from the spec's rules
(shared/specs/benchmarks.md §2.5, §3.4, §4.4), not taken from the code."""
import json

import pytest

from eval import metrics

R = "\u2019"

# ------------------------------------------------------------------------------------------------ Text2JSON

GOLD_ABC = json.dumps([{"name": "A", "price": "10", "color": "red"},
                       {"name": "B", "price": "20", "color": "blue"},
                       {"name": "C", "price": "30", "color": "green"}])


def test_spec_worked_example():
    pred = ('Here you go:\n```json\n[{"name":"A","price":10,"color":"red"},{"name":"B","price":"25"},'
            '{"name":"D","price":"1","color":"x"}]\n```')
    assert metrics.text2json_iou(pred, GOLD_ABC) == pytest.approx(1.25 / 4)


def test_repeated_name_counts_as_extra():
    pred = json.dumps([{"name": "A", "price": "10", "color": "red"}] * 2)
    assert metrics.text2json_iou(pred, GOLD_ABC) == pytest.approx(1.0 / 4)


@pytest.mark.parametrize("obj, expected", [
    ({"name": "X", "k1": "a", "k2": "b"}, 1.0),      # both right
    ({"name": "X", "k1": "a", "k2": "zz"}, 0.75),    # one wrong
    ({"name": "X", "k1": "q", "k2": "zz"}, 0.5),     # both wrong
    ({"name": "X", "k1": "a"}, 0.5),                 # one missing
    ({"name": "X", "k1": "a", "k2": None}, 0.5),     # null counts as missing
    ({"name": "X", "k2": "zz"}, 0.25),               # one missing, one wrong
    ({"name": "X"}, 0.0),                            # both missing
    ({"name": "X", "k1": "a", "k2": "b", "extra": "ignored"}, 1.0),
])
def test_object_score_table(obj, expected):
    gold = json.dumps([{"name": "X", "k1": "a", "k2": "b"}])
    assert metrics.text2json_iou(json.dumps([obj]), gold) == pytest.approx(expected)


@pytest.mark.parametrize("pred", [
    'Note [1]: [{"name": "X", "k1": "a", "k2": "b"}]',        # a second bracket in the prose
    '[{"name": "X", "k1": "a", "k2": ["b"]}]',                 # nested array
    '[{"name": "X", "k1": "a", "k2": "b"}',                    # truncated before ]
    '] oops [{"name": "X", "k1": "a", "k2": "b"}',             # ] before [
    "[{'name': 'X', 'k1': 'a', 'k2': 'b'}]",                   # single quotes: not strict JSON
    '[{"name": "X", "k1": "a", "k2": "b"},]',                  # trailing comma
    '{"name": "X", "k1": "a", "k2": "b"}',                     # no array at all
    "",
    None,
])
def test_malformed_prediction_scores_zero(pred):
    gold = json.dumps([{"name": "X", "k1": "a", "k2": "b"}])
    assert metrics.text2json_iou(pred, gold) == 0.0


def test_surrounding_prose_and_fence_are_fine():
    gold = json.dumps([{"name": "X", "k1": "a", "k2": "b"}])
    assert metrics.text2json_iou('Sure!\n```json\n[{"name": "X", "k1": "a", "k2": "b"}]\n```\nDone.', gold) == 1.0


def test_name_and_value_apostrophe_normalisation_but_otherwise_exact():
    gold = json.dumps([{"name": f"Dr. Ana O{R}Hara", "hospital": f"St. Brigid{R}s", "specialty": "Cardiology"},
                       {"name": "Zed", "hospital": "H", "specialty": "S"}])
    pred = json.dumps([{"name": "Dr. Ana O'Hara", "hospital": "St. Brigid's", "specialty": "Cardiology"},
                       {"name": "zed", "hospital": "H", "specialty": "S"}])  # case differs: not a match
    # first object 1.0; "zed" is an extra -> union 3 (2 gold + 1 extra)
    assert metrics.text2json_iou(pred, gold) == pytest.approx(1.0 / 3)
    pred2 = json.dumps([{"name": "Dr. Ana O'Hara", "hospital": "St. Brigid's ", "specialty": "cardiology"}])
    assert metrics.text2json_iou(pred2, gold) == pytest.approx(0.5 / 2)  # two wrong values, Zed unmatched


def test_type_policies():
    gold = json.dumps([{"name": "X", "year": "1999", "n": "True"}])
    assert metrics.text2json_iou('[{"name": "X", "year": 1999, "n": "True"}]', gold) == 1.0   # int -> str
    assert metrics.text2json_iou('[{"name": "X", "year": 1999.0, "n": "True"}]', gold) == 0.75  # float: wrong
    assert metrics.text2json_iou('[{"name": "X", "year": "1999", "n": true}]', gold) == 0.75   # bool: wrong
    assert metrics.text2json_iou('[{"name": "X", "year": {"y": 1}, "n": "True"}]', gold) == 0.75  # dict: wrong


def test_non_dict_elements_and_bad_names_are_extras():
    gold = json.dumps([{"name": "X", "k1": "a", "k2": "b"}])
    pred = '[1, "name", null, {"name": 5}, {"k1": "a"}, {"name": "X", "k1": "a", "k2": "b"}]'
    assert metrics.text2json_iou(pred, gold) == pytest.approx(1.0 / 6)


def test_empty_prediction_list_and_duplicate_gold():
    gold = json.dumps([{"name": "X", "k1": "a", "k2": "b"}])
    assert metrics.text2json_iou("[]", gold) == 0.0
    dup = json.dumps([{"name": f"O{R}Neil", "k1": "a", "k2": "b"}, {"name": "O'Neil", "k1": "c", "k2": "d"}])
    assert metrics.text2json_iou("[]", dup) is None


@pytest.mark.parametrize("gold", ["[]", "{}", "not json", json.dumps([{"name": "X", "k1": "a"}]),
                                  json.dumps([{"name": "X", "k1": "a", "k2": 3}]),
                                  json.dumps([{"nom": "X", "k1": "a", "k2": "b"}])])
def test_malformed_gold_raises(gold):
    with pytest.raises(ValueError):
        metrics.text2json_iou("[]", gold)


def test_aggregate_excludes_bad_samples_only():
    out = metrics.text2json_aggregate([1.0, None, 0.0, 0.5])
    assert out["average_score"] == pytest.approx(100 * 1.5 / 3)
    assert out["bad_samples"] == 1


def test_lines_scorer_same_rules_as_json():
    pred = "Here are the items:\nA | 10 | red\nB | 25\nD | 1 | x\n"
    assert metrics.text2json_lines_iou(pred, GOLD_ABC) == pytest.approx(1.25 / 4)


def test_lines_scorer_formatting_tolerance():
    gold = json.dumps([{"name": f"The Gambler{R}s Oath", "year": "1987", "director": "Ana Ruiz"},
                       {"name": "Tide", "year": "2001", "director": "Omar Iqbal"}])
    pred = ("name | year | director\n"                     # header line: ignored
            "| --- | --- | --- |\n"                          # markdown rule: ignored
            "- The Gambler's Oath | 1987 | Ana Ruiz\n"       # bullet + apostrophe normalisation
            "| Tide |  | Omar Iqbal |\n")                    # outer pipes; empty cell = missing
    assert metrics.text2json_lines_iou(pred, gold) == pytest.approx((1.0 + 0.5) / 2)


def test_lines_scorer_garbage():
    gold = json.dumps([{"name": "X", "k1": "a", "k2": "b"}])
    assert metrics.text2json_lines_iou("I cannot find any.", gold) == 0.0
    assert metrics.text2json_lines_iou("Y | a | b", gold) == pytest.approx(0.0)  # extra only: 0/2
    assert metrics.text2json_lines_iou("X | a | b | extra cell", gold) == 1.0
    assert metrics.text2json_lines_iou(None, gold) == 0.0


# ------------------------------------------------------------------------------------------------ MultiNeedle

NEEDLE_GOLD = "Virtual Rocket Band*Eternal Flame*Orion the Hunter#0*50*100"


def test_needle_hits_case_sensitive_substring():
    pred = "The first band was the Virtual Rocket Band. The item is the eternal flame. Orion the Hunter"
    assert metrics.needle_hits(pred, NEEDLE_GOLD) == [(0, True), (50, False), (100, True)]
    assert metrics.needle_hits("Virtual Rocket and nothing else", NEEDLE_GOLD) == [(0, False), (50, False),
                                                                                    (100, False)]
    assert metrics.needle_hits("", NEEDLE_GOLD) == [(0, False), (50, False), (100, False)]


def test_needle_aggregate_buckets():
    s1 = metrics.needle_hits("Virtual Rocket Band Eternal Flame Orion the Hunter", NEEDLE_GOLD)  # all
    s2 = metrics.needle_hits("Eternal Flame", NEEDLE_GOLD)                                        # one
    out = metrics.needlebench_aggregate([s1, s2])
    assert out["Depth0"] == pytest.approx(50.0)
    assert out["Depth50"] == pytest.approx(100.0)
    assert out["Depth100"] == pytest.approx(50.0)
    assert out["average_score"] == pytest.approx(100 * 4 / 6)  # 4 of 6 needles found


def test_needle_gold_malformed():
    with pytest.raises(ValueError):
        metrics.needle_hits("x", "a*b#0")


# ------------------------------------------------------------------------------------------------ LongProc

GT = "name\tprice\tcity\nAlpha Widget\t$10\tParis\nBeta\t$20\tN/A\nGamma\t$30\tLyon\nDelta\t$40\tOslo"


def test_extract_tsv_rules():
    assert metrics.extract_tsv("intro ```tsv\na\tb\n``` mid ``` end") == "a\tb\n``` mid"  # greedy to last ```
    assert metrics.extract_tsv("```tsv\na\tb\n1\t2") == "a\tb\n1\t2"                      # unclosed fence
    assert metrics.extract_tsv("  a\tb\n1\t2  ") == "a\tb\n1\t2"                          # no fence


def test_normalize_cell_spec_examples():
    assert metrics.normalize_cell("N/A") == "na"
    assert metrics.normalize_cell("The Beatles, Inc.") == "beatlesinc"
    assert metrics.normalize_cell("  An  apple\tpie ") == "applepie"
    assert metrics.normalize_cell("Theatre") == "theatre"  # whole words only


def test_tsv_perfect_and_subset():
    assert metrics.html_to_tsv_metrics(f"```tsv\n{GT}\n```", GT)["f1"] == 1.0
    half = "name\tprice\tcity\nGamma\t$30\tLyon\nAlpha Widget\t$10\tParis"   # order does not matter
    m = metrics.html_to_tsv_metrics(half, GT)
    assert (m["precision"], m["recall"]) == (1.0, 0.5)
    assert m["f1"] == pytest.approx(2 * 0.5 / 1.5)
    assert m["extraction_rate"] == 1.0


def test_tsv_normalisation_and_header_names_ignored():
    pred = "col1\tcol2\tcol3\nthe alpha widget\t10\tparis\nBETA\t$20\tn/a"
    m = metrics.html_to_tsv_metrics(pred, GT)
    assert (m["precision"], m["recall"]) == (1.0, 0.5)


def test_tsv_duplicates_counted_each():
    pred = "a\tb\tc\nBeta\t$20\tN/A\nBeta\t$20\tN/A\nZeta\t$1\tRome"
    m = metrics.html_to_tsv_metrics(pred, GT)
    assert m["precision"] == pytest.approx(2 / 3) and m["recall"] == pytest.approx(1 / 4)


def test_tsv_last_row_dropped_middle_row_na():
    pred = "a\tb\tc\nAlpha Widget\t$10\tParis\nBeta\t$20\nGamma\t$30\tLyon\nThe above is my TSV."
    m = metrics.html_to_tsv_metrics(pred, GT)
    # last line dropped; "Beta\t$20" becomes an N/A row -> 3 predicted rows, 2 correct
    assert m["precision"] == pytest.approx(2 / 3) and m["recall"] == pytest.approx(2 / 4)


def test_tsv_quoted_cells():
    gt = 'name\tnote\nAlpha\t"has\ttab"\nBeta\t"two\nlines"\nGamma\t"say ""hi"""'
    pred = 'name\tnote\nAlpha\t"has\ttab"\nBeta\ttwo lines\nGamma\tsay "hi"'
    assert metrics.html_to_tsv_metrics(pred, gt)["f1"] == 1.0
    # unquoted tab splits the cell: that row has 3 columns -> N/A row (and it is not last)
    pred_bad = 'name\tnote\nAlpha\thas\ttab\nBeta\ttwo lines\nGamma\tsay "hi"'
    m = metrics.html_to_tsv_metrics(pred_bad, gt)
    assert m["precision"] == pytest.approx(2 / 3) and m["recall"] == pytest.approx(2 / 3)


@pytest.mark.parametrize("pred", [
    "name\tprice\tcity",                              # header only
    "name\tprice\nAlpha Widget\t$10",                 # column count differs from GT
    "x\tx\tx\nAlpha Widget\t$10\tParis",             # duplicate header names (the original's pandas fails)
    "",
    "a\tb\tc\nonly two\tcells",                      # the only data row is dropped
])
def test_tsv_failures_give_zero(pred):
    assert metrics.html_to_tsv_metrics(pred, GT) == {"f1": 0.0, "precision": 0.0, "recall": 0.0,
                                                      "extraction_rate": 0.0}


def test_longproc_aggregate():
    out = metrics.longproc_aggregate([{"f1": 1.0, "precision": 1.0, "recall": 1.0, "extraction_rate": 1.0},
                                      {"f1": 0.0, "precision": 0.0, "recall": 0.0, "extraction_rate": 0.0},
                                      {"f1": 0.5, "precision": 0.25, "recall": 1.0, "extraction_rate": 1.0}])
    assert out == pytest.approx({"f1": 50.0, "precision": 100 * 1.25 / 3, "recall": 100 * 2 / 3,
                                 "extraction_rate": 100 * 2 / 3})
