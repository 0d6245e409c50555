"""``kvjax eval --preset paper`` (eval/paper.py), ``--dry-run`` (eval/dryrun.py) and the paper-style table
(eval/summary.py): the preset's settings against the authors' configs as the specs record them, the dry run over
config-only checkpoints of the four paper models, and the usage errors."""
import argparse
import json
import math
import pathlib
import sys

import pytest

from eval import cli as eval_cli, dryrun, runner, summary
from kvjax.options import UsageError

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from paper_checkpoints import HF_CONFIGS, write_checkpoints, write_tokenizer  # noqa: E402

# --- the authors' settings, written from shared/specs/benchmarks.md §1, §3.1, §3.3, §4.1 and algorithms.md §2.1,
# §5, §9 (run_cfg.py and the dataset configs it imports) -- not from eval/paper.py
SPEC_BENCHMARKS = {  # run_cfg.py: needlebench_en_datasets + text2json_datasets + longproc_datasets
    "multineedle": {"context_length": 128000, "length_buffer": 3000, "depths": [0, 10, 20, 30, 40, 50, 60, 70, 80, 90,
                                                                                100],
                    "n_samples": 100, "max_new_tokens": 1024},
    "text2json": {"max_new_tokens": 1024},
    "longproc": {"split": "html_to_tsv_8k", "max_new_tokens": 9216},
}
SPEC_MAX_LENGTH = 131072  # max_length=128*1024
SPEC_MODELS = {"Qwen/Qwen3-30B-A3B-Instruct-2507", "Qwen/Qwen3-4B-Instruct-2507", "meta-llama/Llama-3.1-8B-Instruct",
               "meta-llama/Llama-3.2-3B-Instruct"}
# (method, budget knob value) -> the config fields the spec fixes
SPEC_METHODS = {
    ("full", None): {},
    ("yakv", 0.015625 * 2): {"local_budget": 64, "chunk_size": 1, "landmark_d": 4, "landmark_n": 256, "store_d": 2,
                             "store_n": 256, "grids": "paper"},
    ("shadowkv", 0.015625): {"rank": 160, "chunk_size": 8, "local_budget": 32, "outlier_budget": 384},
    ("shadowkv", 0.15625): {"rank": 160, "chunk_size": 8, "local_budget": 32, "outlier_budget": 384},
    ("arkvale", 0.015625 / 2): {"page_size": 16, "n_sink_pages": 2, "n_win_pages": 5},
    ("infinigen", 0.2): {"partial_ratio": 0.2},
    ("lrqk", 0.0009765625 + 0.0016): {"lite_tokens": 64},
}
KNOBS = {"yakv": "sparse_budget", "shadowkv": "sparse_budget", "arkvale": "budget", "infinigen": "budget",
         "lrqk": "num_active"}


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """The four config-only checkpoints (config.json + SmolLM2's tokenizer as a stand-in, no weights)."""
    root = tmp_path_factory.mktemp("paper_ckpts")
    return write_checkpoints(root)


def _args(*argv):
    p = argparse.ArgumentParser()
    eval_cli.add_args(p)
    return p.parse_args(list(argv))


def _paper_cfg(ckpts, *extra):
    return eval_cli.config_from_args(_args("--preset", "paper", "--models", *map(str, ckpts.values()), "--dry-run",
                                           *extra))


def test_paper_preset_settings_equal_the_authors(ckpts):
    cfg = _paper_cfg(ckpts)
    assert list(cfg.benchmarks) == list(SPEC_BENCHMARKS)  # run_cfg.py's order
    for name, want in SPEC_BENCHMARKS.items():
        got = cfg.benchmarks[name]
        for k, v in want.items():
            assert got[k] == v, (name, k)
        assert got["max_prompt_tokens"] == SPEC_MAX_LENGTH
    assert cfg.benchmarks["multineedle"]["language"] == "English"
    assert cfg.dtype == "bfloat16"
    cells = {}
    for sp in runner.grid_specs(cfg):
        base = sp.policy.name
        cells[(base, None if base == "full" else getattr(sp.policy.config, KNOBS[base]))] = sp.policy.config
    assert set(cells) == set(SPEC_METHODS), sorted(cells, key=str)
    for key, fields in SPEC_METHODS.items():
        for f, v in fields.items():
            assert getattr(cells[key], f) == v, (key, f)
    # InfiniGen: the authors' wrapper is Llama-only
    assert cfg.method_families == {"infinigen": ["llama"]}
    # the preset's own model list names the paper's four models (registry config presets)
    from models import PRESETS
    from eval.presets import PRESETS as EVAL_PRESETS

    assert {PRESETS[m].name for m in EVAL_PRESETS["paper"]["models"]} == SPEC_MODELS


def test_budgets_flag_replaces_the_per_method_budgets(ckpts):
    cfg = _paper_cfg(ckpts, "--budgets", "1/16", "--methods", "yakv,shadowkv")
    got = {(sp.method, sp.budget) for sp in runner.grid_specs(cfg)}
    assert got == {("full", "-"), ("yakv", "1/16"), ("shadowkv", "1/16")}


@pytest.mark.slow
def test_dry_run_of_the_paper_preset_over_four_config_only_checkpoints(ckpts, monkeypatch, capsys):
    """The grid (4 models x 3 benchmarks x the paper's methods and budgets, InfiniGen on the Llama models only),
    Text2JSON reported missing with eval.data's message, full attention's device bytes >= weights + its KV cache
    (an oracle from the config numbers), flagged above --device-gib, and no weight loader called."""
    import models.registry as reg

    def never(*a, **k):
        raise AssertionError("a dry run loaded weights")

    for fn in ("load_safetensors_params", "load_gguf_params", "load_orbax_params", "load_model"):
        monkeypatch.setattr(reg, fn, never)
    plan = dryrun.plan(_paper_cfg(ckpts, "--max-samples", "1", "--dry-run-memory", "state"), device_gib=16,
                       memory="state")
    assert [m.name for m in plan.models] == [str(p) for p in ckpts.values()]
    methods_llama = {("full", "-"), ("yakv", "1/32"), ("shadowkv", "1/64"), ("shadowkv", "0.15625"),
                     ("arkvale", "1/128"), ("infinigen", "1/5"), ("lrqk", "0.00257656")}
    for m, (folder, hf) in zip(plan.models, HF_CONFIGS.items()):
        assert [b.name for b in m.benches] == ["multineedle", "text2json", "longproc"]
        want = methods_llama if hf["model_type"] == "llama" else methods_llama - {("infinigen", "1/5")}
        for b in m.benches:
            assert {(c.method, c.budget) for c in m.configs if c.benchmark == b.name} == want, (folder, b.name)
        nb = {b.name: b for b in m.benches}
        assert nb["multineedle"].n_samples == 1 and nb["longproc"].n_samples == 1
        assert "Text2JSON" in nb["text2json"].missing and "text2json.jsonl" in nb["text2json"].missing
        # MultiNeedle: 125,000 haystack+needle tokens plus the prompt wrapper and chat template
        assert 125_000 < nb["multineedle"].lengths[0] < 126_500
        # full attention: weights + K and V of every layer for the 131072-token bucket, bf16
        full = next(c for c in m.configs if c.method == "full" and c.benchmark == "multineedle")
        L, Hkv = hf["num_hidden_layers"], hf["num_key_value_heads"]
        kv = 2 * L * Hkv * 128 * 2 * 131072
        assert full.weights_bytes == pytest.approx(2 * _n_params(hf), rel=1e-6)
        assert kv + full.weights_bytes <= full.device_bytes < 1.05 * (kv + full.weights_bytes)
        assert full.fits is False  # > 16 GiB for every paper model
    small = plan.models[1]  # Llama-3.2-3B: 6 GiB of weights; YAKV's device state is small
    yakv = next(c for c in small.configs if c.method == "yakv" and c.benchmark == "multineedle")
    assert yakv.fits is True and yakv.host_bytes > 0
    text = dryrun.render(plan)
    assert "flagged:" in text and "**NO**" in text and "not run on this model: infinigen" in text


def _n_params(hf):
    d, L, H, Hkv, D = hf["hidden_size"], hf["num_hidden_layers"], hf["num_attention_heads"], hf["num_key_value_heads"], 128
    attn = d * (H + 2 * Hkv) * D + H * D * d + 2 * d + (2 * D if hf["model_type"] != "llama" else 0)
    if hf["model_type"] == "qwen3_moe":
        ffn = d * hf["num_experts"] + hf["num_experts"] * 3 * d * hf["moe_intermediate_size"]
    else:
        ffn = 3 * d * hf["intermediate_size"]
    emb = hf["vocab_size"] * d * (1 if hf["tie_word_embeddings"] else 2)
    return L * (attn + ffn) + emb + d


def test_dry_run_reads_no_weights(tmp_path, monkeypatch, capsys):
    """A checkpoint dir with no weights file: the dry run lists the grid; the weight loaders are never called; a
    real run of the same dir would fail to load."""
    import models.registry as reg

    d = tmp_path / "Llama-3.2-3B-Instruct"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(HF_CONFIGS["Llama-3.2-3B-Instruct"]))
    calls = []
    for fn in ("load_safetensors_params", "load_gguf_params", "load_orbax_params", "load_model"):
        monkeypatch.setattr(reg, fn, lambda *a, _fn=fn, **k: calls.append(_fn))
    rc = eval_cli.cli(["--preset", "toy", "--models", str(d), "--dry-run", "--dry-run-memory", "state",
                       "--device-gib", "6", "--methods", "full,yakv"])
    out = capsys.readouterr().out
    assert rc == 0 and calls == []
    assert "| toy_retrieval | 4 | 0 |" in out
    assert "1 model(s) x 1 benchmark(s) x 2 method/budget configuration(s)" in out
    assert "flagged: 2 configuration(s) need more than 6 GiB" in out  # 3B weights alone: 6.0 GiB


@pytest.mark.parametrize("argv, msg", [
    (["--dry-run", "--device-gib", "0"], "--device-gib=0, allowed: > 0 GiB"),
    (["--device-gib", "8"], "--device-gib=8 is only read by --dry-run"),
    (["--dry-run", "--models", "/no/such/checkpoint"], "--models '/no/such/checkpoint': unknown model"),
    (["--dry-run", "--data-dir", "/no/such/data"], "--data-dir '/no/such/data' is not a folder"),
    (["--preset", "paper", "--dry-run"], "--models 'qwen3-30b-a3b-instruct-2507': model "
                                         "'qwen3-30b-a3b-instruct-2507' is a config preset"),
])
def test_usage_errors_are_one_line(argv, msg, capsys):
    assert eval_cli.cli(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("kvjax: error: ") and msg in err and "\n" not in err, err


def test_paper_run_without_text2json_stops_before_loading(ckpts, monkeypatch, shared_dir):
    """Without --dry-run the missing Text2JSON file is eval.data's error, raised before any model is looked up."""
    monkeypatch.setenv("KVJAX_DATA", str(shared_dir / "data"))
    with pytest.raises(UsageError, match=r"--benchmarks 'text2json': Text2JSON \(text2json.jsonl\) is not in"):
        eval_cli.config_from_args(_args("--preset", "paper", "--models", "/no/such/checkpoint"))


def test_paper_table_rows_models_methods_columns_benchmarks(tmp_path):
    """paper_table.md next to summary.md: one row per model x method (budget), one column per benchmark, the
    mean primary score x100 of that cell's records."""
    recs = []
    for model in ("m1", "m2"):
        for method, budget, found, f1 in (("full", "-", (1.0, 0.5), (0.8,)), ("yakv", "1/32", (0.5, 0.0), (0.4,))):
            for i, v in enumerate(found):
                recs.append({"model": model, "benchmark": "multineedle", "sample_id": f"s{i}", "method": method,
                             "budget": budget, "score": {"found": v}})
            recs.append({"model": model, "benchmark": "longproc", "sample_id": "p0", "method": method,
                         "budget": budget, "score": {"f1": f1[0]}})
    summary.write_summary(recs, tmp_path, plots=False)
    lines = (tmp_path / "paper_table.md").read_text().splitlines()
    table = [ln for ln in lines if ln.startswith("| ")]
    assert table[0] == "| model | method | budget | longproc | multineedle |"
    assert table[1:] == ["| m1 | full | - | 80.0 | 75.0 |", "| m1 | yakv | 1/32 | 40.0 | 25.0 |",
                         "| m2 | full | - | 80.0 | 75.0 |", "| m2 | yakv | 1/32 | 40.0 | 25.0 |"]
    assert (tmp_path / "summary.md").exists()
