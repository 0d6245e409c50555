"""LongProc HTML-to-TSV loader (§4.1-4.3) on the real files, and malformed-record handling."""
import json
import re

import pytest
import yaml

from eval.benchmarks import get_benchmark, load, load_longproc


@pytest.fixture(scope="module")
def root(shared_dir):
    r = shared_dir / "data" / "longproc" / "html_to_tsv"
    if not (r / "html_to_tsv_8k.json").exists():
        pytest.skip("LongProc data absent")
    return r


@pytest.fixture(scope="module")
def samples_8k(root):
    return load_longproc("html_to_tsv_8k", data_dir=root.parents[1])[0]


def test_real_8k_split(root, samples_8k):
    records = json.loads((root / "html_to_tsv_8k.json").read_text(encoding="utf-8"))
    assert len(samples_8k) == len(records) == 120
    assert len({s.id for s in samples_8k}) == 120
    assert sum(s.meta["filtered"] for s in samples_8k) == 60
    for s, rec in zip(samples_8k, records):
        html = (root / rec["html_path"]).read_text(encoding="utf-8")
        t = s.user_text
        assert t.startswith("[TASK]\n")
        assert "```html\n" + html + "\n```" in t
        assert (f"extract the following properties from the items listed on the webpage: "
                f"{rec['task_description']}{rec['filtering_instruction']}\n") in t
        assert f"about {rec['task_topic']}," in t
        assert "```tsv\n" + rec["tsv_header"] + "\n{Your TSV output}\n```" in t
        assert 'separated from each other by a tab "\\t"' in t  # literal backslash-t in the prompt
        assert t.endswith("follow the output format above in your answer.")
        assert s.gold == rec["gt"] and s.max_new_tokens == 9216 and s.id == rec["task_id"]


def test_gt_scores_itself_perfectly(samples_8k):
    bench = get_benchmark("longproc")
    scores = [bench.score(s, f"```tsv\n{s.gold}\n```") for s in samples_8k]
    assert all(x["f1"] == 1.0 for x in scores)
    assert bench.aggregate(samples_8k, scores)["f1"] == 100.0


def test_other_splits(root):
    assert len(load_longproc("html_to_tsv_0.5k", data_dir=root.parents[1])[0]) == 100
    assert len(load_longproc("html_to_tsv_2k", data_dir=root.parents[1])[0]) == 189
    with pytest.raises(ValueError, match="split"):
        load_longproc("html_to_tsv_4k", data_dir=root.parents[1])


def test_malformed_records(tmp_path):
    h = tmp_path / "longproc" / "html_to_tsv"
    (h / "webpage").mkdir(parents=True)
    (h / "prompts.yaml").write_text(yaml.safe_dump({"USER_PROMPT": "Page:\n{html_str}\nTopic {task_topic}: "
                                                   "{task_description}{filtering_instruction}\n{tsv_header}\n"
                                                   "{{Your TSV output}}"}), encoding="utf-8")
    (h / "webpage" / "a.html").write_text("<p>{not a placeholder}</p>\r\n", encoding="utf-8")
    (h / "webpage" / "bad.html").write_bytes(b"\xff\xfe\x00bad")
    good = {"output_length_group": "8k", "task_id": "T1", "website_id": "W1", "html_path": "webpage/a.html",
            "task_topic": "Cards", "task_description": "(1) Name", "tsv_header": "name",
            "filtering_instruction": "\nOnly red ones.", "gt": "name\nx"}
    recs = [good, {**good, "task_id": "T2", "html_path": "webpage/missing.html"}, {**good, "task_id": "T3",
            "gt": None}, "string record", {**good}, {**good, "task_id": "T4", "html_path": "webpage/bad.html"},
            {**good, "task_id": "T5"}]
    (h / "html_to_tsv_8k.json").write_text(json.dumps(recs), encoding="utf-8")
    with pytest.warns(UserWarning, match="skipped 5 malformed"):
        samples, report = load("longproc", data_dir=tmp_path)
    assert [s.id for s in samples] == ["T1", "T5"]
    assert report.n_malformed == 5
    assert any("missing.html" in m and "not found" in m for m in report.malformed)
    assert any("duplicate task_id" in m for m in report.malformed)
    assert any("not UTF-8" in m for m in report.malformed)
    # str.format fills the template only; braces in the page survive; {{…}} becomes {…}; \r\n read as \n
    assert samples[0].user_text == ("Page:\n<p>{not a placeholder}</p>\n\nTopic Cards: (1) Name\nOnly red ones.\n"
                                    "name\n{Your TSV output}")


def test_missing_folder_names_path(tmp_path):
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "longproc"))):
        load_longproc(data_dir=tmp_path)
