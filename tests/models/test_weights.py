"""Weight readers: GGUF (dequantizers + llama.cpp Q/K permutation), orbax round trip, corrupt/mismatched files."""
import json
import os
import shutil
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import models
from models.weights import WeightError, unpermute_llama_qk

FIX = os.path.join(os.path.dirname(__file__), "..", "fixtures", "hf")
gguf = pytest.importorskip("gguf")
from gguf_files import add_tensor, finish, open_writer  # noqa: E402 - needs gguf


def _ref(name):
    r = np.load(os.path.join(FIX, name, "reference.npz"))
    return r["tokens"], r["logits"]


def permute_like_llama_cpp(w, n_head):
    """llama.cpp converter layout (the inverse of what the loader must undo), written from the spec."""
    out, inp = w.shape
    return w.reshape(n_head, 2, out // n_head // 2, inp).swapaxes(1, 2).reshape(out, inp)


def write_gguf(path, lm, qtype):
    """Write a kvjax model to GGUF the way llama.cpp's converter would (HF names -> GGUF, q/k permuted)."""
    cfg = lm.config
    p = {k: np.asarray(v, np.float32) for k, v in lm.model.params().items()}
    w = open_writer(path, "llama", cfg)
    if cfg.rope_scaling is not None:
        w.add_string("llama.rope.scaling.type", "llama3")
        w.add_float32("llama.rope.scaling.factor", cfg.rope_scaling.factor)
        w.add_float32("llama.rope.scaling.low_freq_factor", cfg.rope_scaling.low_freq_factor)
        w.add_float32("llama.rope.scaling.high_freq_factor", cfg.rope_scaling.high_freq_factor)
        w.add_uint32("llama.rope.scaling.original_context_length", cfg.rope_scaling.original_max_position_embeddings)

    def add(name, arr):
        add_tensor(w, name, arr, qtype)

    add("token_embd.weight", p["embed"])
    add("output_norm.weight", p["final_norm"])
    if "lm_head" in p:
        add("output.weight", p["lm_head"].T)
    names = {"attn_norm": "attn_norm", "wq": "attn_q", "wk": "attn_k", "wv": "attn_v", "wo": "attn_output",
             "mlp_norm": "ffn_norm", "w_gate": "ffn_gate", "w_up": "ffn_up", "w_down": "ffn_down"}
    for i in range(cfg.num_layers):
        for k, g in names.items():
            a = p["layers." + k][i]
            a = a if a.ndim == 1 else a.T  # HF [out, in]
            if k == "wq":
                a = permute_like_llama_cpp(a, cfg.num_heads)
            if k == "wk":
                a = permute_like_llama_cpp(a, cfg.num_kv_heads)
            add(f"blk.{i}.{g}.weight", a)
    finish(w)


def test_unpermute_inverts_the_converter_permutation():
    w = np.random.default_rng(0).normal(size=(12, 5))
    assert np.array_equal(unpermute_llama_qk(permute_like_llama_cpp(w, 3), 3), w)
    assert not np.array_equal(permute_like_llama_cpp(w, 3), w)


@pytest.mark.parametrize("qtype,tol", [("F32", 1e-5), ("F16", 2e-2), ("BF16", 5e-2), ("Q8_0", 0.15),
                                       ("Q4_0", None), ("Q4_1", None)])
def test_gguf_roundtrip(tmp_path, qtype, tol):
    lm = models.load_model(os.path.join(FIX, "tiny_llama"), dtype="float32")
    tokens, ref = _ref("tiny_llama")
    qt = getattr(gguf.GGMLQuantizationType, qtype)
    path = str(tmp_path / f"m-{qtype}.gguf")
    if qtype == "BF16":
        pytest.importorskip("gguf.quants")
    write_gguf(path, lm, qt)
    lg = models.load_model(path, dtype="float32")
    assert lg.config.rope_scaling == lm.config.rope_scaling
    assert lg.config.num_kv_heads == lm.config.num_kv_heads
    # dequantized weights match the gguf package's own quantize->dequantize round trip
    wq_ref = np.asarray(lm.model.params()["layers.wq"][1], np.float32).T
    qd = wq_ref if qtype == "F32" else gguf.quants.dequantize(gguf.quants.quantize(wq_ref, qt), qt) \
        if qtype != "F16" else wq_ref.astype(np.float16).astype(np.float32)
    np.testing.assert_allclose(np.asarray(lg.model.params()["layers.wq"][1]).T, qd, atol=1e-6)
    logits = np.asarray(models.forward_logits(lg.model, tokens))
    err = np.abs(logits - ref).max()
    if tol is not None:
        assert err < tol * np.abs(ref).max(), err
    else:  # 4-bit weights of a random model: logits stay strongly correlated with the exact ones
        corr = np.corrcoef(logits.ravel(), ref.ravel())[0, 1]
        assert corr > 0.8, corr


def test_orbax_convert_and_sharded_restore(tmp_path):
    from kvjax.compat import make_mesh
    from kvjax.cli import main

    src = os.path.join(FIX, "tiny_qwen3")
    out = str(tmp_path / "ckpt")
    assert main(["convert", "--model", src, "--dtype", "float32", "--out", out]) == 0
    tokens, ref = _ref("tiny_qwen3")
    back = models.load_model(out, dtype="float32")
    np.testing.assert_allclose(np.asarray(models.forward_logits(back.model, tokens)), ref, atol=1e-4)
    mesh = make_mesh(data=1, model=2)
    sharded = models.load_model(out, dtype="float32", mesh=mesh)
    wq = sharded.model.params()["layers.wq"]
    assert wq.sharding.spec[2] == "model" and len(wq.sharding.device_set) == 2
    np.testing.assert_allclose(np.asarray(models.forward_logits(sharded.model, tokens)), ref, atol=1e-4)


def test_truncated_safetensors_is_a_clear_error(tmp_path):
    d = tmp_path / "m"
    shutil.copytree(os.path.join(FIX, "tiny_llama_tied"), d)
    f = d / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(WeightError, match="truncated"):
        models.load_model(str(d), dtype="float32")


def test_missing_weight_file_and_shard(tmp_path):
    d = tmp_path / "m"
    shutil.copytree(os.path.join(FIX, "tiny_llama"), d)
    shard = sorted(p for p in os.listdir(d) if p.endswith(".safetensors"))[0]
    os.remove(d / shard)
    with pytest.raises(WeightError, match="missing"):
        models.load_model(str(d), dtype="float32")
    e = tmp_path / "empty"
    e.mkdir()
    (e / "config.json").write_text((d / "config.json").read_text())
    with pytest.raises(WeightError, match="no model.safetensors"):
        models.load_model(str(e), dtype="float32")


def test_shape_mismatch_names_the_tensor(tmp_path):
    d = tmp_path / "m"
    shutil.copytree(os.path.join(FIX, "tiny_llama_tied"), d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["intermediate_size"] = cfg["intermediate_size"] * 2
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(WeightError, match=r"tensor 'model\.layers\.0\.mlp\.gate_proj\.weight' in .*model\.safetensors "
                                          r"has shape \(128, 64\); the model config expects \(256, 64\)"):
        models.load_model(str(d), dtype="float32")


def test_gguf_shape_mismatch_names_the_gguf_tensor(tmp_path):
    """Metadata saying feed_forward_length=256 over 128-wide FFN tensors: the error names the GGUF tensor and its
    dims in GGUF order, not kvjax's parameter."""
    lm = models.load_model(os.path.join(FIX, "tiny_llama"), dtype="float32")
    lie = types.SimpleNamespace(config=lm.config.replace(intermediate_size=256), model=lm.model)
    path = str(tmp_path / "bad.gguf")
    write_gguf(path, lie, gguf.GGMLQuantizationType.F32)
    with pytest.raises(WeightError, match=r"GGUF tensor 'blk\.0\.ffn_gate\.weight' has dims \(64, 128\); the model "
                                          r"config expects \(64, 256\)"):
        models.load_model(path, dtype="float32")


def test_truncated_gguf_is_a_clear_error(tmp_path):
    lm = models.load_model(os.path.join(FIX, "tiny_llama_tied"), dtype="float32")
    path = tmp_path / "m.gguf"
    write_gguf(str(path), lm, gguf.GGMLQuantizationType.F32)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(WeightError, match=r"m\.gguf: cannot read GGUF .*truncated or corrupt"):
        models.load_model(str(path), dtype="float32")


def test_unknown_model_lists_known_names():
    with pytest.raises(FileNotFoundError) as e:
        models.load_model("no-such-model")
    assert "smollm2-135m" in str(e.value) and "llama-3.1-8b-instruct" in str(e.value)


def test_presets_match_published_configs():
    c = models.PRESETS["llama-3.1-8b-instruct"]
    assert (c.num_layers, c.num_heads, c.num_kv_heads, c.head_dim) == (32, 32, 8, 128)
    assert 8.0e9 < c.num_params() < 8.1e9  # Llama-3.1-8B has 8.03 B parameters
    q = models.PRESETS["qwen3-4b-instruct-2507"]
    assert q.qk_norm and q.head_dim == 128 and 4.0e9 < q.num_params() < 4.1e9  # 4.02 B
    s = models.PRESETS["llama-3.2-3b-instruct"]
    assert s.tie_word_embeddings and 3.2e9 < s.num_params() < 3.3e9  # 3.21 B
