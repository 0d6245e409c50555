"""Qwen3-MoE: the sparse block against a numpy oracle of transformers' semantics, the tiny MoE checkpoints against
transformers (recorded greedy tokens, live), expert parallelism, every KV-cache policy on top, GGUF and orbax.

Oracles: ``numpy_moe`` (written from ``Qwen3MoeSparseMoeBlock``: softmax router, top-k, optional renormalisation,
weighted sum of SwiGLU experts), ``reference.npz`` of ``tests/fixtures/make_hf_fixtures.py`` (transformers' greedy
``generate``), transformers itself when torch is importable, and the layer layout stated in the fixture script.
"""
from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

import kvjax
import models
from kvjax.compat import make_mesh
from models import LoadedModel, ModelConfig, Transformer
from models.moe import moe_block, uses_gather
from models.transformer import param_partition_specs, param_shapes
from models.weights import WeightError

HF_DIR = os.path.join(os.path.dirname(__file__), "..", "fixtures", "hf")
MOE = ("tiny_qwen3_moe", "tiny_qwen3_moe_sparse2")
# The sparse layers the fixture script builds (mlp_only_layers=[1]; decoder_sparse_step=2 of 4 layers).
SPARSE_LAYERS = {"tiny_qwen3_moe": (0, 2, 3), "tiny_qwen3_moe_sparse2": (1, 3)}
HAS_TORCH_HF = all(importlib.util.find_spec(m) is not None for m in ("torch", "transformers"))
GREEDY8 = kvjax.GenerationConfig(max_new_tokens=8, stop_ids=())
_LOADED: dict = {}


def _load(name: str) -> LoadedModel:
    if name not in _LOADED:
        _LOADED[name] = models.load_model(os.path.join(HF_DIR, name), dtype="float32")
    return _LOADED[name]


def _ref(name: str):
    return np.load(os.path.join(HF_DIR, name, "reference.npz"))


def _prompts(lengths, vocab=512, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, vocab, size=n).tolist() for n in lengths]


def _copy(name, tmp_path, **config_edits):
    d = tmp_path / name
    shutil.copytree(os.path.join(HF_DIR, name), d)
    if config_edits:
        cfg = json.loads((d / "config.json").read_text())
        cfg.update(config_edits)
        (d / "config.json").write_text(json.dumps(cfg))
    return d


# ----------------------------------------------------------------------------------------- the block vs numpy
def numpy_moe(h, router, w_gate, w_up, w_down, k, norm):
    """transformers' Qwen3MoeSparseMoeBlock in float64 numpy: h [N, d], router [d, E], experts [E, d, f] / [E, f, d]."""
    h = h.astype(np.float64)
    out = np.zeros_like(h)
    for n in range(h.shape[0]):
        z = h[n] @ router
        p = np.exp(z - z.max())
        p /= p.sum()
        top = np.argsort(-p, kind="stable")[:k]
        w = p[top] / (p[top].sum() if norm else 1.0)
        for j, e in enumerate(top):
            g, u = h[n] @ w_gate[e], h[n] @ w_up[e]
            out[n] += w[j] * ((g / (1 + np.exp(-g)) * u) @ w_down[e])
    return out


def _random_params(cfg, seed=0, only=""):
    """Numpy draws of the config's parameters named ``only*``: RMSNorm scales U(0.5, 1.5), embeddings N(0, 0.5^2),
    matrices N(0, 1/fan_in)."""
    rng = np.random.default_rng(seed)
    out = {}
    for k, s in param_shapes(cfg).items():
        if k.startswith(only):
            if k.endswith("norm"):
                v = rng.uniform(0.5, 1.5, s)
            else:
                v = rng.normal(0, 0.5 if k == "embed" else s[-2] ** -0.5, s)
            out[k] = jnp.asarray(v, jnp.float32)
    return out


@pytest.mark.parametrize("E,k,norm", [(8, 2, True), (6, 3, False), (4, 1, False), (8, 8, True)])
@pytest.mark.parametrize("B,T", [(1, 1), (2, 9)])
def test_moe_block_matches_numpy_oracle(E, k, norm, B, T):
    """Both expert paths (gathered for few tokens, grouped ragged_dot otherwise) equal the oracle, for every stacked
    sparse layer, top-1 to top-all, renormalised or not."""
    cfg = ModelConfig(family="qwen3_moe", vocab_size=11, hidden_size=16, intermediate_size=24, num_layers=3,
                      num_heads=2, num_kv_heads=1, head_dim=8, qk_norm=True, num_experts=E, num_experts_per_tok=k,
                      moe_intermediate_size=12, norm_topk_prob=norm)
    p = _random_params(cfg, only="moe.")
    h = jax.random.normal(jax.random.key(1), (B, T, 16), jnp.float32)
    fn = jax.jit(lambda p, h, s: moe_block(p, cfg, s, h))
    for slot in range(3):
        got = np.asarray(fn(p, h, slot))
        want = numpy_moe(np.asarray(h).reshape(B * T, 16), *(np.asarray(p[n][slot], np.float64) for n in
                         ("moe.router", "moe.w_gate", "moe.w_up", "moe.w_down")), k, norm)
        np.testing.assert_allclose(got.reshape(B * T, 16), want, atol=2e-5, rtol=1e-5)
    assert uses_gather(B * T, cfg) == (B * T * k <= E)


def test_moe_block_expert_parallel_moves_only_activations():
    """Experts split over 4 'model' devices (2 'data'): same output as one device on both paths, an all-reduce of
    the [tokens, d] output combines the devices, and no collective carries expert weights (the only arrays with an
    axis of the expert width, 40)."""
    cfg = ModelConfig(family="qwen3_moe", vocab_size=11, hidden_size=16, intermediate_size=24, num_layers=2,
                      num_heads=2, num_kv_heads=1, head_dim=8, qk_norm=True, num_experts=8, num_experts_per_tok=2,
                      moe_intermediate_size=40, norm_topk_prob=True)
    p = _random_params(cfg, only="moe.")
    mesh = make_mesh(data=2, model=4)
    specs = param_partition_specs(cfg)
    ps = {n: jax.device_put(v, NamedSharding(mesh, P(*specs[n]))) for n, v in p.items()}
    fn = jax.jit(lambda p, h: moe_block(p, cfg, 1, h))
    for T in (1, 12):
        h = jax.random.normal(jax.random.key(T), (2, T, 16), jnp.float32)
        hs = jax.device_put(h, NamedSharding(mesh, P("data")))
        np.testing.assert_allclose(np.asarray(fn(ps, hs)), np.asarray(fn(p, h)), atol=1e-5)
        hlo = fn.lower(ps, hs).compile().as_text()
        moved = re.findall(r"= \w+\[([\d,]*)\][^=]* (all-reduce|all-gather|all-to-all|collective-permute)\(", hlo)
        assert ("1,16", "all-reduce") in moved or (f"{T},16", "all-reduce") in moved, moved
        assert not any("40" in shape.split(",") for shape, _ in moved), moved


# ----------------------------------------------------------------------------------------- config
@pytest.mark.parametrize("name", MOE)
def test_moe_config_read_from_checkpoint(name):
    cfg = json.loads(open(os.path.join(HF_DIR, name, "config.json")).read())
    c = _load(name).config
    experts = cfg.get("num_experts", cfg.get("num_local_experts"))
    assert (c.family, c.num_experts, c.num_experts_per_tok, c.moe_intermediate_size, c.norm_topk_prob) == (
        "qwen3_moe", experts, cfg["num_experts_per_tok"], cfg["moe_intermediate_size"], cfg["norm_topk_prob"])
    assert c.moe_layers == SPARSE_LAYERS[name]
    assert c.dense_layers == tuple(i for i in range(c.num_layers) if i not in SPARSE_LAYERS[name])
    shapes = {k: v.shape for k, v in _load(name).model.params().items()}
    assert shapes["moe.w_gate"] == (len(c.moe_layers), experts, c.hidden_size, c.moe_intermediate_size)
    assert shapes["dense.w_down"] == (len(c.dense_layers), c.intermediate_size, c.hidden_size)
    assert not any(k.startswith("layers.w_") for k in shapes), "MLP weights stacked over every layer"


@pytest.mark.skipif(not HAS_TORCH_HF, reason="torch and transformers are not installed (test-only reference)")
@pytest.mark.parametrize("name", MOE)
def test_sparse_layers_are_transformers_sparse_layers(name):
    from transformers import AutoModelForCausalLM
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

    hf = AutoModelForCausalLM.from_pretrained(os.path.join(HF_DIR, name))
    sparse = tuple(i for i, l in enumerate(hf.model.layers) if isinstance(l.mlp, Qwen3MoeSparseMoeBlock))
    assert _load(name).config.moe_layers == sparse


def test_preset_is_the_published_qwen3_30b_a3b():
    """Qwen3-30B-A3B-Instruct-2507 model card: 48 layers, 32 Q / 4 KV heads, 128 experts with 8 activated, 262,144
    tokens of context, 30.5 B parameters (29.9 B without embeddings), 3.3 B activated (as the card truncates)."""
    c = models.PRESETS["qwen3-30b-a3b-instruct-2507"]
    assert (c.family, c.num_layers, c.num_heads, c.num_kv_heads, c.num_experts, c.num_experts_per_tok) == (
        "qwen3_moe", 48, 32, 4, 128, 8)
    assert c.max_position_embeddings == 262144 and c.moe_layers == tuple(range(48)) and c.norm_topk_prob
    assert 30.45e9 < c.num_params() < 30.55e9
    assert 29.85e9 < c.num_params() - 2 * c.vocab_size * c.hidden_size < 29.95e9
    assert 3.3e9 < c.num_active_params() < 3.4e9
    assert c.num_kv_heads * c.head_dim == 512  # algorithms.md: C = Hkv * D = 512 for this model


@pytest.mark.parametrize("kw,match", [
    (dict(num_experts=8, num_experts_per_tok=9), r"num_experts_per_tok=9 must be between 1 and num_experts=8"),
    (dict(num_experts=8, num_experts_per_tok=0), r"num_experts_per_tok=0 must be between 1 and num_experts=8"),
    (dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=0), r"moe_intermediate_size=0"),
    (dict(num_experts=8, num_experts_per_tok=2, decoder_sparse_step=0), r"decoder_sparse_step=0 must be >= 1"),
    (dict(family="qwen3", num_experts=8, num_experts_per_tok=2), r"num_experts=8 needs family='qwen3_moe'"),
])
def test_config_errors(kw, match):
    base = dict(family="qwen3_moe", vocab_size=11, hidden_size=16, intermediate_size=24, num_layers=2, num_heads=2,
                num_kv_heads=1, head_dim=8, moe_intermediate_size=12)
    with pytest.raises(ValueError, match=match):
        ModelConfig(**{**base, **kw})


def test_hf_config_errors(tmp_path):
    with pytest.raises(ValueError, match=r"num_experts_per_tok=7 must be between 1 and num_experts=6"):
        models.load_model(str(_copy("tiny_qwen3_moe_sparse2", tmp_path, num_experts_per_tok=7)))
    with pytest.raises(ValueError, match=r"two expert counts: \{'num_experts': 4, 'num_local_experts': 6\}"):
        ModelConfig.from_hf({**json.loads(open(os.path.join(HF_DIR, MOE[1], "config.json")).read()),
                             "num_experts": 4})
    with pytest.raises(ValueError, match=r"use_sliding_window=True is not supported"):
        models.load_model(str(_copy("tiny_qwen3_moe", tmp_path / "a", use_sliding_window=True)))


# ----------------------------------------------------------------------------------------- weights errors
def test_missing_expert_tensor_names_it(tmp_path):
    d = _copy("tiny_qwen3_moe", tmp_path)
    index = json.loads((d / "model.safetensors.index.json").read_text())
    del index["weight_map"]["model.layers.3.mlp.experts.5.up_proj.weight"]
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(WeightError, match=r"tensor 'model\.layers\.3\.mlp\.experts\.5\.up_proj\.weight' is missing"):
        models.load_model(str(d), dtype="float32")


@pytest.mark.parametrize("edit,match", [
    (dict(moe_intermediate_size=64), r"tensor 'model\.layers\.1\.mlp\.experts\.0\.gate_proj\.weight' in .*"
                                     r"model\.safetensors has shape \(48, 64\); the model config expects \(64, 64\)"),
    (dict(num_local_experts=8), r"tensor 'model\.layers\.1\.mlp\.gate\.weight' in .*model\.safetensors has shape "
                                r"\(6, 64\); the model config expects \(8, 64\)"),
    (dict(decoder_sparse_step=1), r"tensor 'model\.layers\.0\.mlp\.gate\.weight' is missing"),
])
def test_mismatched_moe_checkpoint_names_the_hf_tensor(tmp_path, edit, match):
    with pytest.raises(WeightError, match=match):
        models.load_model(str(_copy("tiny_qwen3_moe_sparse2", tmp_path, **edit)), dtype="float32")


def test_mesh_that_cannot_split_the_experts(tmp_path):
    with pytest.raises(ValueError, match=r"num_experts=6 is not divisible by the mesh's model axis \(4 devices\)"):
        models.load_model(os.path.join(HF_DIR, "tiny_qwen3_moe_sparse2"), dtype="float32",
                          mesh=make_mesh(data=1, model=4))


# ----------------------------------------------------------------------------------------- generation
@pytest.mark.parametrize("name", MOE)
@pytest.mark.parametrize("chunk", [16, 512])
def test_greedy_tokens_match_recorded_transformers(name, chunk):
    """Engine (chunked prefill + per-token decode) greedy ids == transformers' generate, for both prompts at once."""
    ref = _ref(name)
    eng = kvjax.Engine(_load(name), "full", prefill_chunk=chunk, min_prompt_bucket=16)
    gen = kvjax.GenerationConfig(max_new_tokens=ref["greedy_ids"].shape[1], stop_ids=())
    out = eng.generate([t.tolist() for t in ref["tokens"]], gen)
    assert [o.ids for o in out] == ref["greedy_ids"].tolist()


@pytest.mark.skipif(not HAS_TORCH_HF, reason="torch and transformers are not installed (test-only reference)")
@pytest.mark.parametrize("name", MOE)
def test_greedy_tokens_match_live_transformers(name):
    import torch
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(os.path.join(HF_DIR, name), dtype=torch.float32).eval()
    hf.generation_config.eos_token_id = None
    prompt = _prompts([37], seed=5)[0]
    ids = torch.tensor([prompt])
    with torch.no_grad():  # explicit mask: generate would mask the prompt's tokens equal to pad_token_id
        want = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=10, do_sample=False,
                           pad_token_id=0)[0, 37:]
    got = kvjax.Engine(_load(name)).generate([prompt], kvjax.GenerationConfig(max_new_tokens=10, stop_ids=()))
    assert got[0].ids == want.tolist()


def test_expert_parallel_mesh_gives_same_tokens():
    """8 forced CPU devices as data=2 x model=4: experts split 2 per device, the same greedy tokens."""
    ps = _prompts([30, 19])
    gen = kvjax.GenerationConfig(max_new_tokens=12, stop_ids=())
    ref = [g.ids for g in kvjax.Engine(_load("tiny_qwen3_moe")).generate(ps, gen)]
    mesh = make_mesh(data=2, model=4)
    lm = models.load_model(os.path.join(HF_DIR, "tiny_qwen3_moe"), dtype="float32", mesh=mesh)
    w = lm.model.params()["moe.w_gate"]
    assert w.sharding.spec[1] == "model" and len(w.sharding.device_set) == 8
    assert w.addressable_shards[0].data.shape[1] == 2
    assert [g.ids for g in kvjax.Engine(lm).generate(ps, gen)] == ref


def test_yakv_covering_budget_reproduces_full_attention():
    full = kvjax.Engine(_load("tiny_qwen3_moe"), "full")
    ps = _prompts([300, 190], seed=2)
    pol = kvjax.make_policy("yakv", sparse_budget=1.0, local_budget=0, exact_fallback=False, store_format="none",
                            landmark_quant="none", min_seqlen_to_prune=0)
    eng = full.with_policy(pol)
    assert [g.ids for g in eng.generate(ps, GREEDY8)] == [g.ids for g in full.generate(ps, GREEDY8)]
    assert not eng.last_exact  # YAKV's own machinery ran, not the exact fallback


def test_decode_compiles_once():
    eng = kvjax.Engine(_load("tiny_qwen3_moe"), "full", min_prompt_bucket=64)
    eng.generate(_prompts([30]), kvjax.GenerationConfig(max_new_tokens=20, stop_ids=()))
    counts = eng.compile_counts()
    eng.generate(_prompts([45], seed=1), kvjax.GenerationConfig(max_new_tokens=33, stop_ids=()))
    assert counts["loop"] == 1 and eng.compile_counts() == counts


def test_moe_lowers_for_tpu():
    """Structural: prefill (grouped, ragged_dot) and decode (gathered) forwards lower for TPU on this CPU."""
    lm = _load("tiny_qwen3_moe")
    fwd = jax.jit(lambda p, t: models.forward_logits_pure(p, lm.config, t))
    for T in (1, 24):
        text = fwd.trace(lm.model.params(), jnp.zeros((1, T), jnp.int32)).lower(lowering_platforms=("tpu",)).as_text()
        assert ("ragged_dot" in text) == (T > 1)


# ----------------------------------------------------------------------------------------- orbax
def test_orbax_convert_and_expert_parallel_restore(tmp_path):
    from kvjax.cli import main

    out = str(tmp_path / "ckpt")
    assert main(["convert", "--model", os.path.join(HF_DIR, "tiny_qwen3_moe"), "--dtype", "float32", "--out", out]) == 0
    ref = _ref("tiny_qwen3_moe")
    back = models.load_model(out, dtype="float32")
    assert back.config == _load("tiny_qwen3_moe").config.replace(name=back.config.name)
    np.testing.assert_allclose(np.asarray(models.forward_logits(back.model, ref["tokens"])), ref["logits"], atol=2e-4)
    sharded = models.load_model(out, dtype="float32", mesh=make_mesh(data=2, model=4))
    w = sharded.model.params()["moe.w_down"]
    assert w.sharding.spec[1] == "model" and len(w.sharding.device_set) == 8
    np.testing.assert_allclose(np.asarray(models.forward_logits(sharded.model, ref["tokens"])), ref["logits"],
                               atol=2e-4)


# ----------------------------------------------------------------------------------------- GGUF
gguf = pytest.importorskip("gguf")
from gguf_files import add_tensor, finish, open_writer  # noqa: E402 - needs gguf


def _all_sparse_model(seed=0, E=4):
    """A random tiny Qwen3-MoE with every layer sparse (llama.cpp's qwen3moe has no dense layers)."""
    cfg = ModelConfig(family="qwen3_moe", vocab_size=64, hidden_size=32, intermediate_size=80, num_layers=2,
                      num_heads=4, num_kv_heads=2, head_dim=16, rope_theta=1e6, rms_norm_eps=1e-6, qk_norm=True,
                      max_position_embeddings=256, num_experts=E, num_experts_per_tok=2, moe_intermediate_size=64,
                      norm_topk_prob=True, name="tiny-moe")
    return LoadedModel(cfg, Transformer(cfg, dtype=jnp.float32, params=_random_params(cfg, seed)), None)


def write_qwen3moe_gguf(path, lm, qtype=None, expert_ff=None):
    """Write a model the way llama.cpp's converter does for Qwen3MoeForCausalLM: HF [out, in] matrices, the experts
    of a layer stacked as [E, out, in] (GGUF dims (in, out, E)), the router [E, d]; metadata keys of gguf-py."""
    cfg = lm.config
    p = {k: np.asarray(v, np.float32) for k, v in lm.model.params().items()}
    w = open_writer(path, "qwen3moe", cfg)
    w.add_key_length(cfg.head_dim)
    w.add_value_length(cfg.head_dim)
    w.add_expert_count(cfg.num_experts)
    w.add_expert_used_count(cfg.num_experts_per_tok)
    w.add_expert_feed_forward_length(expert_ff or cfg.moe_intermediate_size)

    def add(name, arr):
        add_tensor(w, name, arr, qtype)

    add("token_embd.weight", p["embed"])
    add("output_norm.weight", p["final_norm"])
    add("output.weight", p["lm_head"].T)
    attn = {"attn_norm": "attn_norm", "wq": "attn_q", "wk": "attn_k", "wv": "attn_v", "wo": "attn_output",
            "mlp_norm": "ffn_norm", "q_norm": "attn_q_norm", "k_norm": "attn_k_norm"}
    for i in range(cfg.num_layers):
        for k, g in attn.items():
            a = p["layers." + k][i]
            add(f"blk.{i}.{g}.weight", a if a.ndim == 1 else a.T)
        add(f"blk.{i}.ffn_gate_inp.weight", p["moe.router"][i].T)
        for k, g in (("w_gate", "ffn_gate_exps"), ("w_up", "ffn_up_exps"), ("w_down", "ffn_down_exps")):
            add(f"blk.{i}.{g}.weight", np.stack([e.T for e in p["moe." + k][i]]))
    finish(w)


@pytest.mark.parametrize("qtype", [None, "Q8_0"])
def test_gguf_qwen3moe_roundtrip(tmp_path, qtype):
    """Write with llama.cpp's layout, read back: the config, and logits equal to the source model's with every
    matrix put through the gguf package's own quantize -> dequantize (blocks along each HF row)."""
    lm = _all_sparse_model()
    path = str(tmp_path / "m.gguf")
    qt = getattr(gguf.GGMLQuantizationType, qtype) if qtype else None
    write_qwen3moe_gguf(path, lm, qt)
    dims = {t.name: tuple(int(x) for x in t.shape) for t in gguf.GGUFReader(path).tensors}
    c = lm.config
    # llama.cpp src/models/qwen3moe.cpp create_tensor dims
    assert dims["blk.0.ffn_gate_exps.weight"] == (c.hidden_size, c.moe_intermediate_size, c.num_experts)
    assert dims["blk.0.ffn_down_exps.weight"] == (c.moe_intermediate_size, c.hidden_size, c.num_experts)
    assert dims["blk.0.ffn_gate_inp.weight"] == (c.hidden_size, c.num_experts)
    back = models.load_model(path, dtype="float32")
    assert back.config == c.replace(name="m.gguf")

    def qdq_rows(a):  # a: HF layout, rows along the last axis
        return a if qt is None else gguf.quants.dequantize(gguf.quants.quantize(a, qt), qt)

    want = {}
    for n, v in lm.model.params().items():
        v = np.asarray(v, np.float32)
        if n.endswith("norm"):
            want[n] = v
        elif n == "embed":
            want[n] = qdq_rows(v)
        else:  # kvjax [..., in, out] is stored as HF [..., out, in]
            want[n] = np.swapaxes(qdq_rows(np.swapaxes(v, -1, -2)), -1, -2)
    got = back.model.params()
    np.testing.assert_allclose(np.asarray(got["moe.w_up"][1, 3]), want["moe.w_up"][1, 3], atol=1e-6)
    oracle = Transformer(c, dtype=jnp.float32, params={k: jnp.asarray(v) for k, v in want.items()})
    tokens = np.asarray(_prompts([20, 20], vocab=64, seed=3), np.int32)
    np.testing.assert_allclose(np.asarray(models.forward_logits(back.model, tokens)),
                               np.asarray(models.forward_logits(oracle, tokens)), atol=1e-5)
    if qt is None:
        np.testing.assert_allclose(np.asarray(models.forward_logits(back.model, tokens)),
                                   np.asarray(models.forward_logits(lm.model, tokens)), atol=1e-5)


def test_gguf_expert_tensor_mismatch_names_the_gguf_tensor(tmp_path):
    lm = _all_sparse_model()
    path = str(tmp_path / "bad.gguf")
    write_qwen3moe_gguf(path, lm, expert_ff=40)
    with pytest.raises(WeightError, match=r"GGUF tensor 'blk\.0\.ffn_gate_exps\.weight' has dims \(32, 64, 4\); the "
                                          r"model config expects \(32, 40, 4\) \(GGUF order"):
        models.load_model(path, dtype="float32")


# ----------------------------------------------------------------------------------------- the CLI
def _cli_checkpoint(tmp_path, words):
    """tiny_qwen3_moe with a byte-level tokenizer (256 byte tokens), a 4096-token context and a prompt file of
    ``words`` words (about 5 tokens each)."""
    from tokenizers import Tokenizer, decoders, models as tk_models, pre_tokenizers

    d = _copy("tiny_qwen3_moe", tmp_path, max_position_embeddings=4096)
    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    tok = Tokenizer(tk_models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.save(str(d / "tokenizer.json"))
    vocab_words = "the quick brown fox jumps over a lazy dog while seven wizards hex nine jovial boxers".split()
    text = " ".join(np.random.default_rng(0).choice(vocab_words, words))
    (tmp_path / "prompt.txt").write_text(text)
    return d, tmp_path / "prompt.txt"


@pytest.mark.slow
@pytest.mark.parametrize("method", ["full", "yakv", "yakv-serving", "shadowkv", "arkvale", "quest", "infinigen",
                                    "lrqk"])
def test_cli_generate_every_method(tmp_path, capsys, method):
    """``kvjax generate`` on a Qwen3-MoE checkpoint dir with each method's paper defaults: a ~1400-token prompt,
    ~2800 for ShadowKV (its defaults need 2048 sparse + 384 outlier + local tokens)."""
    from kvjax.cli import main

    d, prompt = _cli_checkpoint(tmp_path, 520 if method == "shadowkv" else 260)
    assert main(["generate", "--model", str(d), "--method", method, "--prompt-file", str(prompt), "--no-chat",
                 "--max-new-tokens", "6", "--dtype", "float32", "-v"]) == 0
    err = capsys.readouterr().err
    assert re.search(r"\[[12]\d\d\d prompt tokens, \d generated", err), err


def test_benchmark_shapes_are_not_models():
    """The bench decode shapes: MoE and dense with equal active parameters up to the router; no checkpoint name."""
    from models.config import BENCH_SHAPES

    moe, dense = BENCH_SHAPES["bench-qwen3-moe-small"], BENCH_SHAPES["bench-qwen3-dense-small"]
    router = moe.num_layers * moe.hidden_size * moe.num_experts
    assert moe.num_active_params() - router == dense.num_params() and moe.num_params() > 4 * dense.num_params()
    assert not set(BENCH_SHAPES) & set(models.known_models())
    with pytest.raises(FileNotFoundError, match="is a benchmark shape with random weights"):
        models.load_model("bench-qwen3-moe-small")
