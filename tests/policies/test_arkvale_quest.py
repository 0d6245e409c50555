"""ArkVale and Quest: the page bound, page selection, exactness at full budget, attended masks, config errors."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from hypothesis.extra import numpy as hnp

import kvjax
from kvjax.policies import make_policy
from kvjax.policies.arkvale import ArkValePolicy, page_bound, page_digests
from kvjax.policies.quest import QuestPolicy
from models import ModelConfig
from policy_steps import lower_step_for_tpu, own, run_steps, smollm2_greedy_vs_full, tiny_setup

TINY = ModelConfig(family="llama", vocab_size=97, hidden_size=64, intermediate_size=128, num_layers=3, num_heads=4,
                   num_kv_heads=2, head_dim=16, max_position_embeddings=1024)
LENS = (250, 90)  # ragged batch, one prompt bucket (256)


# ----------------------------------------------------------------------------- helpers
@pytest.fixture(scope="module")
def tiny():
    return tiny_setup(TINY, LENS, steps=6)



def page_oracle(k, n, ps):
    """numpy box digest of the pages of one (sequence, KV head): k [T, D] -> (min, max) [NP, D] over valid rows."""
    NP = math.ceil(n / ps)
    lo = np.stack([k[p * ps:min((p + 1) * ps, n)].min(0) for p in range(NP)])
    hi = np.stack([k[p * ps:min((p + 1) * ps, n)].max(0) for p in range(NP)])
    return lo, hi


def bound_oracle(q, lo, hi):
    """Σ_d max(q_d·lo_d, q_d·hi_d), plain numpy float64."""
    q = q.astype(np.float64)
    return np.maximum(q[None] * lo, q[None] * hi).sum(-1)


# ----------------------------------------------------------------------------- the bound
@settings(max_examples=60, deadline=None)
@given(ps=st.sampled_from([1, 4, 16]), n_valid=st.integers(1, 16), D=st.sampled_from([2, 8]),
       seed=st.integers(0, 2**31), scale=st.floats(1e-3, 1e3))
def test_page_bound_is_an_upper_bound_of_every_key_in_the_page(ps, n_valid, D, seed, scale):
    rng = np.random.default_rng(seed)
    n_valid = min(n_valid, ps)
    keys = (rng.standard_normal((1, 1, ps, D)) * scale).astype(np.float32)
    q = (rng.standard_normal((1, 3, D)) * scale).astype(np.float32)  # 3 query heads on 1 KV head
    dmin, dmax = page_digests(jnp.asarray(keys), jnp.asarray([n_valid]), ps)
    b = np.asarray(page_bound(jnp.asarray(q), dmin, dmax))[0, 0, :, 0]  # [G]
    dots = np.einsum("gd,td->gt", q[0].astype(np.float64), keys[0, 0, :n_valid].astype(np.float64))
    tol = 1e-5 * np.abs(q[0]).astype(np.float64) @ np.abs(keys[0, 0, :n_valid]).max(0).astype(np.float64) + 1e-30
    assert (b[:, None] >= dots - tol[:, None]).all()
    # the box is tight: the bound equals the oracle Σ max(q·min, q·max) (and q·k itself for a one-row page)
    lo, hi = keys[0, 0, :n_valid].min(0), keys[0, 0, :n_valid].max(0)
    np.testing.assert_allclose(b, [bound_oracle(q[0, g], lo[None], hi[None])[0] for g in range(3)],
                               rtol=1e-5, atol=1e-4 * scale * scale)
    if n_valid == 1:
        np.testing.assert_allclose(b, dots[:, 0], rtol=1e-5, atol=1e-4 * scale * scale)


# (subnormals excluded: XLA on CPU flushes them to zero, numpy does not)
@given(hnp.arrays(np.float32, (2, 16, 4), elements=st.floats(-100, 100, width=32, allow_subnormal=False)))
@settings(max_examples=30, deadline=None)
def test_page_digest_is_min_max_of_valid_rows(keys):
    n = 27  # second page partially valid (11 rows)
    flat = keys.reshape(1, 1, 32, 4)
    dmin, dmax = page_digests(jnp.asarray(flat), jnp.asarray([n]), 16)
    lo, hi = page_oracle(flat[0, 0], n, 16)
    np.testing.assert_array_equal(np.asarray(dmin)[0, 0], lo)
    np.testing.assert_array_equal(np.asarray(dmax)[0, 0], hi)


# ----------------------------------------------------------------------------- selection
def _state(policy, k, v, lengths, max_new=8):
    """Layer-stacked state (L = 1) built as the engine does (vmapped build), on the device."""
    return jax.vmap(lambda kk, vv: policy.build(TINY, kk, vv, jnp.asarray(lengths), max_new))(k[None], v[None])


def _candidates(n, ps, ns, nw):
    """Pages eligible for top-k: not among the ns first, not among the nw last of the prompt's ceil(n/ps) pages."""
    NP = math.ceil(n / ps)
    return [p for p in range(NP) if p >= ns and p < NP - nw]


@pytest.mark.parametrize("name", ["arkvale", "quest"])
def test_selected_pages_are_the_top_pages_by_bound(name):
    rng = np.random.default_rng(1)
    B, Hkv, Tb, D, G, ps = 2, 2, 512, 16, 2, 16
    lengths = [500, 301]
    budget = 0.1
    policy = make_policy(name, budget=budget, fetch_backend="device")
    k = rng.standard_normal((B, Hkv, Tb, D)).astype(np.float32)
    v = rng.standard_normal((B, Hkv, Tb, D)).astype(np.float32)
    q = rng.standard_normal((B, Hkv * G, D)).astype(np.float32)
    st_ = _state(policy, jnp.asarray(k), jnp.asarray(v), lengths)
    ids, ok = jax.jit(lambda s, qq: policy.select_pages(TINY, s, 0, qq))(st_, jnp.asarray(q))
    ids, ok = np.asarray(ids), np.asarray(ok)
    ns, nw = (2, 5) if name == "arkvale" else (0, 1)
    for b, n in enumerate(lengths):
        pages = math.ceil(int(budget * n) / ps)  # ceil(int(f·T)/16): the fork's rule
        n_sel = max(1, pages) if name == "arkvale" else max(1, pages - nw)  # Quest counts the kept page
        cand = _candidates(n, ps, ns, nw)
        for h in range(Hkv):
            lo, hi = page_oracle(k[b, h], n, ps)
            score = np.max([bound_oracle(q[b, h * G + g], lo, hi) for g in range(G)], axis=0)
            expect = sorted(cand, key=lambda p: -score[p])[:n_sel]
            got = ids[b, h][ok[b, h]].tolist()
            assert got == expect, (name, b, h)


# ----------------------------------------------------------------------------- end to end
def test_small_budget_attends_sinks_window_and_k_pages(tiny):
    eng, prompts, (_, ref_logits, _) = tiny
    pol = make_policy("arkvale", budget=0.1)
    e = own(eng, pol)
    tok, logits, state = run_steps(e, prompts, steps=2)
    assert not np.allclose(logits[:, 1:], ref_logits[:, 1:3], atol=1e-3)  # sparse attention changes the output
    q = jax.random.normal(jax.random.key(3), (2, TINY.num_heads, TINY.head_dim))
    pos = jnp.asarray(LENS, jnp.int32) + 2
    for layer in range(TINY.num_layers):
        m = np.asarray(jax.jit(lambda s, l, qq, p: pol.attended_mask(TINY, s, l, qq, p))(state, layer, q, pos))
        for b, n in enumerate(LENS):
            NP = math.ceil(n / 16)
            resident = min(2 * 16, n) + max(0, n - max(NP - 5, 2) * 16)  # sink tokens + window tokens
            n_sel = min(max(1, math.ceil(int(0.1 * n) / 16)), len(_candidates(n, 16, 2, 5)))
            assert (m[b].sum(-1) == resident + 16 * n_sel).all(), (layer, b)
            assert not m[b, :, n:].any()


def test_generate_api_and_registration(tiny):
    eng, prompts, (ref_tok, _, _) = tiny
    assert isinstance(make_policy("arkvale"), ArkValePolicy) and isinstance(make_policy("quest"), QuestPolicy)
    out = eng.with_policy(make_policy("quest", budget=1.0)).generate(
        prompts, kvjax.GenerationConfig(max_new_tokens=4, stop_ids=()))
    assert [o.ids for o in out] == ref_tok[:, :4].tolist()



@pytest.mark.parametrize("name", ["arkvale", "quest"])
def test_tpu_lowering_moves_pages_with_dmas_not_host_compute(tiny, name):
    eng, prompts, _ = tiny
    e = eng.with_policy(make_policy(name))
    toks, lengths, _ = e.prepare(prompts, 64)
    _, kv = e.dense_prefill(toks, lengths)
    txt = lower_step_for_tpu(e, e.build(kv, lengths, 64))
    main = next(line for line in txt.splitlines() if "func.func public @main" in line)
    assert "pinned_host" in main  # the page store stays a host-memory argument of the step
    assert '_xla_compute_type = "host"' not in txt  # the DMA kernel ("auto" on TPU): no host gather
    assert 'kernel_name = "kvjax_fetch_rows_dma"' in txt


def test_defaults_are_the_papers():
    a = make_policy("arkvale").config
    assert (a.page_size, a.budget, a.n_sink_pages, a.n_win_pages, a.dense_layers) == (16, 0.015625 / 2, 2, 5, 0)
    qc = make_policy("quest").config
    assert (qc.page_size, qc.n_sink_pages, qc.n_win_pages, qc.dense_layers) == (16, 0, 1, 2)


@pytest.mark.parametrize("kw,match", [({"budget": 1.5}, "budget=1.5"), ({"budget": -3}, "budget=-3"),
                                      ({"page_size": 12}, "page_size=12"), ({"n_win_pages": -1}, "n_win_pages"),
                                      ({"fetch_backend": "pallas"}, "fetch_backend")])
def test_config_errors(kw, match):
    with pytest.raises((ValueError, TypeError), match=match):
        make_policy("arkvale", **kw)


def test_validate_errors():
    with pytest.raises(ValueError, match="dense_layers=5"):
        make_policy("quest", dense_layers=5).validate(TINY, np.array([100]), 64)
    with pytest.raises(ValueError, match="max_new=0"):
        make_policy("arkvale").validate(TINY, np.array([100]), 0)


# ----------------------------------------------------------------------------- real model
@pytest.mark.slow
@pytest.mark.parametrize("name", ["arkvale", "quest"])
def test_smollm2_full_budget_matches_full_attention(name):
    got, ref = smollm2_greedy_vs_full(make_policy(name, budget=1.0))
    assert got == ref
