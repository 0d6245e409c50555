"""InfiniGen: skewing matrices, the speculative query, token selection, exactness at full budget, and the
speculation's recall of the true top tokens on SmolLM2's own activations (slow)."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import kvjax
import models
from kvjax.policies import make_policy
from kvjax.policies.infinigen import InfiniGenPolicy, skewing_from_activations
from models import ModelConfig
from models.transformer import causal_attention, embed_tokens, layer_qkv, rope_tables, run_layers_carry
from policy_steps import lower_step_for_tpu, own, run_steps, smollm2_greedy_vs_full

TINY = ModelConfig(family="llama", vocab_size=97, hidden_size=64, intermediate_size=128, num_layers=4, num_heads=4,
                   num_kv_heads=2, head_dim=16, max_position_embeddings=1024)
TINY_QWEN = ModelConfig(family="qwen3", vocab_size=97, hidden_size=64, intermediate_size=128, num_layers=3,
                        num_heads=4, num_kv_heads=2, head_dim=16, max_position_embeddings=1024, qk_norm=True)
LENS = (250, 90)




def _lm(cfg, seed=0):
    return models.LoadedModel(cfg, models.Transformer(cfg, dtype=jnp.float32, rngs=nnx.Rngs(seed)), None)


# ----------------------------------------------------------------------------- offline skewing
def test_skewing_is_orthogonal_and_channels_maximise_the_product():
    rng = np.random.default_rng(0)
    H, Hkv, T, D, nch = 4, 2, 50, 8, 3
    # anisotropic activations, so a few skewed channels dominate
    scale = np.array([5, 3, 1, 0.5, 0.2, 0.1, 0.1, 0.05])
    q = rng.standard_normal((H, T, D)) * scale
    k = rng.standard_normal((Hkv, T, D)) * scale[::-1]
    A, ch = skewing_from_activations(q, k, H // Hkv, nch)
    for h in range(Hkv):
        np.testing.assert_allclose(A[h].T @ A[h], np.eye(D), atol=1e-10)
        # q·k is unchanged by the skew (A orthogonal)
        np.testing.assert_allclose((q[2 * h] @ A[h]) @ (k[h] @ A[h]).T, q[2 * h] @ k[h].T, rtol=1e-9, atol=1e-9)
        # A diagonalises the group's query covariance (right singular vectors), by decreasing variance
        qs = np.concatenate([q[2 * h], q[2 * h + 1]]) @ A[h]
        cov = qs.T @ qs
        np.testing.assert_allclose(cov - np.diag(np.diag(cov)), 0, atol=1e-8 * np.abs(cov).max())
        assert (np.diff(np.diag(cov)) <= 1e-9).all()
        imp = np.abs(qs).sum(0) * np.abs(k[h] @ A[h]).sum(0)
        assert set(ch[h]) == set(np.argsort(-imp)[:nch])


# ----------------------------------------------------------------------------- speculation and selection
@pytest.mark.parametrize("cfg", [TINY, TINY_QWEN], ids=["llama", "qwen3"])
def test_speculative_query_is_previous_input_through_this_layers_wq(cfg):
    lm = _lm(cfg, seed=1)
    params = lm.model.params()
    pol = make_policy("infinigen", calibration_len=40)
    extra = pol.prepare(cfg, params)
    B, Tb = 2, 128
    k = jax.random.normal(jax.random.key(0), (cfg.num_layers, B, cfg.num_kv_heads, Tb, cfg.head_dim))
    st = jax.vmap(lambda kk, x: pol.build(cfg, kk, kk, jnp.asarray([100, 60]), 8, extra=x))(k, extra)
    h_prev = jax.random.normal(jax.random.key(1), (B, cfg.hidden_size))
    pos = jnp.asarray([100, 60], jnp.int32)
    layer = 2
    got = pol.speculative_query(cfg, st, layer, h_prev, pos)
    # oracle: the model's own pre-attention code of layer `layer`, fed h_prev as its normalised input
    lp = {name[len("layers."):]: v[layer] for name, v in params.items() if name.startswith("layers.")}
    cos, sin = rope_tables(cfg, pos[:, None])
    q_ref = layer_qkv(lp, cfg, h_prev[:, None], cos, sin, h=h_prev[:, None])[0][:, 0]
    np.testing.assert_allclose(np.asarray(got), np.asarray(q_ref), rtol=1e-5, atol=1e-5)


def test_selection_is_per_query_head_top_k_of_partial_skewed_scores():
    cfg = TINY
    rng = np.random.default_rng(2)
    pol = make_policy("infinigen", budget=0.1, calibration_len=40)
    params = _lm(cfg, seed=2).model.params()
    extra = jax.tree.map(lambda x: x[:1], pol.prepare(cfg, params))
    B, Hkv, Tb, D, G, M = 2, 2, 128, 16, 2, 8
    lengths = np.array([120, 70])
    k = rng.standard_normal((1, B, Hkv, Tb, D)).astype(np.float32)
    st = jax.vmap(lambda kk, x: pol.build(cfg, kk, kk, jnp.asarray(lengths), M, extra=x))(jnp.asarray(k), extra)
    gen_k = rng.standard_normal((B, Hkv, M, D)).astype(np.float32)
    h_prev = rng.standard_normal((B, cfg.hidden_size)).astype(np.float32)
    pos = jnp.asarray(lengths + 3, jnp.int32)  # 3 generated tokens before this one: 4 generated slots valid
    ids, ok = pol.select_tokens(cfg, st, 0, jnp.asarray(h_prev), pos, jnp.asarray(gen_k))
    ids, ok = np.asarray(ids), np.asarray(ok)
    q_spec = np.asarray(pol.speculative_query(cfg, st, 0, jnp.asarray(h_prev), pos))  # tested above
    skew = np.asarray(extra["skew"][0])  # [Hkv, D, nch]
    for b, n in enumerate(lengths):
        S = n + 4
        n_sel = max(1, int(0.1 * S))
        for h in range(Hkv):
            keys = np.concatenate([k[0, b, h, :n], gen_k[b, h, :4]])  # positions 0..n-1, then n..n+3
            for g in range(G):
                s = (q_spec[b, h * G + g] @ skew[h]) @ (keys @ skew[h]).T
                expect = np.argsort(-s, kind="stable")[:n_sel]
                slot = ids[b, h, g][ok[b, h, g]]
                got = np.where(slot >= Tb, slot - Tb + n, slot)
                assert sorted(got.tolist()) == sorted(expect.tolist())


# ----------------------------------------------------------------------------- end to end
def test_full_budget_reproduces_full_attention():
    lm = _lm(TINY)
    rng = np.random.default_rng(0)
    prompts = [list(rng.integers(0, TINY.vocab_size, n)) for n in LENS]
    eng = kvjax.Engine(lm, policy="full")
    ref_tok, ref_logits, _ = run_steps(eng, prompts)
    pol = make_policy("infinigen", budget=1.0, calibration_len=64)
    tok, logits, state = run_steps(own(eng, pol), prompts)
    np.testing.assert_array_equal(tok, ref_tok)
    np.testing.assert_allclose(logits, ref_logits, atol=2e-5, rtol=1e-5)
    assert state.kv_store.sharding.memory_kind == "pinned_host"
    txt = lower_step_for_tpu(own(eng, pol), state)  # lowers for TPU: dense layers' cond included
    # the default fetch backend "auto" is the Pallas DMA kernel on TPU: no host-compute gather
    assert 'kernel_name = "kvjax_fetch_rows_dma"' in txt and "_xla_compute_type" not in txt
    rep = pol.memory_report(state, np.array(LENS))
    assert "wq" not in rep["components"] and rep["excluded"]["wq"] == state.wq.size * 4
    # a small budget attends floor(0.2·S) tokens per query head (G slot sets per KV head); dense layers none
    pol2 = make_policy("infinigen", calibration_len=64)
    _, logits2, st2 = run_steps(own(eng, pol2), prompts, steps=2)
    assert not np.allclose(logits2[:, 1:], ref_logits[:, 1:3], atol=1e-3)
    used = np.asarray(st2.buf_pos >= 0).sum(-1)  # [L, B, Hkv]
    S = np.array(LENS) + 2  # the step at position n + 1 attends S = n + 2 tokens
    for layer in range(TINY.num_layers):
        expect = np.zeros_like(S) if layer < 2 else 2 * (S * 2 // 10)  # G = 2 query heads per KV head
        assert (used[layer] == expect[:, None]).all(), layer


def test_config_errors():
    with pytest.raises(ValueError, match="dense_layers=0"):
        make_policy("infinigen", dense_layers=0)
    with pytest.raises(ValueError, match="partial_ratio"):
        make_policy("infinigen", partial_ratio=0.0)
    with pytest.raises(ValueError, match="budget=2.0"):
        make_policy("infinigen", budget=2.0)
    with pytest.raises(ValueError, match="calibration_ids"):
        make_policy("infinigen", calibration_ids=[1, 2, 3])
    with pytest.raises(ValueError, match="prepare"):
        InfiniGenPolicy().build(TINY, jnp.zeros((1, 2, 128, 16)), jnp.zeros((1, 2, 128, 16)), jnp.asarray([5]), 8)


def test_defaults_are_the_papers():
    c = make_policy("infinigen").config
    assert (c.budget, c.partial_ratio, c.dense_layers) == (0.2, 0.2, 2)


# ----------------------------------------------------------------------------- real activations
def _essay_ids(lm, shared_dir, start, n):
    path = shared_dir / "data" / "needlebench" / "PaulGrahamEssays.jsonl"
    if not path.exists():
        pytest.skip(f"{path} is not present")
    texts = [json.loads(line)["text"] for line in path.open()][:8]
    ids = lm.tokenizer.encode(" ".join(texts))
    return ids[start:start + n]


def capture_activations(lm, ids):
    """Exact causal forward recording every layer's post-RoPE q, k, v and normalised input h (numpy)."""
    cfg, params = lm.config, lm.model.params()
    T = len(ids)
    L, H, Hkv, D, d = cfg.num_layers, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.hidden_size
    pos = jnp.arange(T, dtype=jnp.int32)[None]
    st0 = {"q": jnp.zeros((L, 1, T, H, D)), "k": jnp.zeros((L, 1, T, Hkv, D)), "v": jnp.zeros((L, 1, T, Hkv, D)),
           "h": jnp.zeros((L, 1, T, d))}

    def attend(st, layer, q, k_pre, k, v, hn):
        out = causal_attention(q, k, v, pos, pos)
        return out, {"q": st["q"].at[layer].set(q), "k": st["k"].at[layer].set(k), "v": st["v"].at[layer].set(v),
                     "h": st["h"].at[layer].set(hn)}

    fn = jax.jit(lambda p, t: run_layers_carry(p, cfg, embed_tokens(p, t), pos, st0, attend)[1])
    return jax.tree.map(np.asarray, fn(params, jnp.asarray([ids], jnp.int32)))


@pytest.mark.slow
def test_smollm2_speculation_recalls_the_true_top_tokens(shared_dir):
    """Recall of the exact top-floor(0.2·S) tokens (by q·k of the true query) among the speculated top tokens.

    Threshold 0.6: a random choice of 20 % of the tokens has expected recall 0.2; InfiniGen's claim is that the
    previous layer's input, skewed partial channels, predicts the attention pattern well (its paper's Fig. 7 shows
    most of the attention mass kept). Measured on SmolLM2-135M (calibrated on another essay segment, 1024 tokens,
    16 query positions in the second half, layers 2..29, all 9 heads): mean recall 0.72 (every layer between 0.66
    and 0.77), so 0.6 for the mean leaves room for numerics while a speculation no better than chance (0.2) fails.
    """
    lm = models.load_model("smollm2-135m", dtype="float32")
    cfg, params = lm.config, lm.model.params()
    ids = _essay_ids(lm, shared_dir, 0, 1024)
    calib = _essay_ids(lm, shared_dir, 5000, 1024)
    act = capture_activations(lm, ids)
    pol = make_policy("infinigen", calibration_ids=tuple(calib))
    extra = pol.prepare(cfg, params)
    T, G = len(ids), cfg.group_size
    kk = jnp.asarray(act["k"]).transpose(0, 1, 3, 2, 4)
    st = jax.vmap(lambda k, v, x: pol.build(cfg, k, v, jnp.asarray([T]), 1, extra=x))(kk, kk, extra)
    positions = np.random.default_rng(0).choice(np.arange(T // 2, T), 16, replace=False)
    zero_gen = jnp.zeros((1, cfg.num_kv_heads, 1, cfg.head_dim))

    @jax.jit
    def spec(layer, h_prev, t):
        qs = pol.speculative_query(cfg, st, layer, h_prev, t)
        return pol.speculative_scores(cfg, st, layer, qs, zero_gen)[0]  # [Hkv, G, T + 1]

    rec = {}
    for layer in range(2, cfg.num_layers):
        for t in positions:
            s = np.asarray(spec(jnp.int32(layer), jnp.asarray(act["h"][layer - 1][:, t]), jnp.asarray([t])))
            s = s[:, :, :t + 1]
            K = int(0.2 * (t + 1))
            for h in range(cfg.num_heads):
                exact = act["k"][layer][0, :t + 1, h // G] @ act["q"][layer][0, t, h]
                top_true = set(np.argsort(-exact)[:K].tolist())
                top_spec = set(np.argsort(-s[h // G, h % G])[:K].tolist())
                rec.setdefault(layer, []).append(len(top_true & top_spec) / K)
    per_layer = {layer: float(np.mean(r)) for layer, r in rec.items()}
    mean = float(np.mean(list(per_layer.values())))
    print("InfiniGen recall: mean", mean, "per layer", per_layer)
    assert mean > 0.6, per_layer


@pytest.mark.slow
def test_smollm2_full_budget_matches_full_attention():
    got, ref = smollm2_greedy_vs_full(make_policy("infinigen", budget=1.0, calibration_len=256))
    assert got == ref
