"""YAKV policy: budget plan (spec numbers), selection and decode against numpy oracles, parity with full
attention, exact short prompts, clear errors. Tiny random models on CPU; SmolLM2-135M in the slow tests."""
import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import kvjax
import models
from kvjax.budgets import memory_report_for
from kvjax.cache import KVCache
from kvjax.policies import make_policy
from kvjax.policies.yakv import YakvConfig, YakvPolicy, score_landmarks
from kvjax.quant import HiggsConfig, fp8_decode, fp8_encode, higgs_qdq, load_grid
from models import ModelConfig
from models.transformer import apply_rope, rope_tables

TINY = ModelConfig(family="llama", vocab_size=128, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=8,
                   num_kv_heads=4, head_dim=16, rope_theta=10000.0, rms_norm_eps=1e-5, tie_word_embeddings=True,
                   max_position_embeddings=4096, bos_token_id=1, eos_token_ids=(2,))
GREEDY8 = kvjax.GenerationConfig(max_new_tokens=8, stop_ids=())


@pytest.fixture(scope="module")
def tiny_lm():
    model = models.Transformer(TINY, dtype=jnp.float32, rngs=nnx.Rngs(0))
    return models.LoadedModel(TINY, model, None)


@pytest.fixture(scope="module")
def full_eng(tiny_lm):
    """Full attention on the tiny model; other policies use ``full_eng.with_policy`` to share its compiled prefill."""
    return kvjax.Engine(tiny_lm, "full")


def _prompts(lengths, seed=0):
    rng = np.random.RandomState(seed)
    return [list(rng.randint(3, TINY.vocab_size, n)) for n in lengths]


# ----------------------------------------------------------------------------------------------- budget plan
def test_defaults_are_the_eval_config():
    c = YakvConfig()
    assert (c.chunk_size, c.local_budget, c.sparse_budget, c.prefix_budget) == (1, 64, 1 / 32, 0)
    assert (c.landmark_quant, c.landmark_d, c.landmark_n, c.landmark_hadamard_group) == ("higgs", 4, 256, "head")
    assert (c.store_format, c.store_d, c.store_n, c.keys_pre_rope) == ("higgs_qdq", 2, 256, True)
    assert c.scoring == "softmax_max" and c.min_attended_tokens == 0
    assert c.min_seqlen_to_prune == 512  # kvjax: short prompts decode exactly (the paper's prompts are far longer)
    assert c.grids == "paper"  # the authors' EDEN grids
    assert isinstance(make_policy("yakv"), YakvPolicy)


def test_eval_plan_paper_numbers():
    # §3.1: T = 131072 attends 64 + 4096 tokens; landmark candidates are tokens [0, T-64)
    p = make_policy("yakv").plan([131072, 1000])
    assert p["local"].tolist() == [64, 64] and p["prefix"].tolist() == [0, 0]
    assert p["n_sel"].tolist() == [4096, 31] and p["n_lm"].tolist() == [131072 - 64, 1000 - 64]
    assert not p["fallback"].any()


def _serving_oracle(L, pre=0.00625, sp=0.015625, suf=0.00625, c=1, min_len=512):
    """algorithms.md §3.2 budget split, float32 ratios, written from the spec."""
    f32 = np.float32
    if L <= min_len:
        return L, 0, 0, 0
    prefix = min(int(np.ceil(f32(pre) * f32(L))), L)
    suffix = min(int(np.ceil(f32(suf) * f32(L))), L - prefix)
    infix = L - prefix - suffix
    extra = infix % c
    suffix += extra
    infix -= extra
    pruned = min((int(np.floor(f32(sp) * f32(L))) // c) * c, infix)
    if prefix + pruned + suffix < L and prefix + pruned + suffix < min_len:
        pruned = ((min_len - prefix - suffix) // c) * c
    return prefix, suffix, infix // c, pruned // c


def test_serving_plan_matches_spec():
    pol = make_policy("yakv-serving")
    p = pol.plan([100000])
    # the spec's worked example: prefix 625, suffix 625, infix 98750, pruned_infix 1562
    assert (p["prefix"][0], p["local"][0], p["n_lm"][0], p["n_sel"][0]) == (625, 625, 98750, 1562)
    Ls = [1, 100, 512, 513, 600, 1000, 4097, 30000, 65536]
    p = pol.plan(Ls)
    for i, L in enumerate(Ls):
        pre, suf, n_lm, n_sel = _serving_oracle(L)
        if L <= 512:
            assert p["fallback"][i] and p["prefix"][i] == L and p["n_sel"][i] == 0
        else:
            assert (p["prefix"][i], p["local"][i], p["n_lm"][i], p["n_sel"][i]) == (pre, suf, n_lm, n_sel), L


def test_chunk_remainder_goes_to_local():
    pol = make_policy("yakv", chunk_size=8)
    p = pol.plan([1000])
    # local 64, infix 936 = 117 chunks of 8, sparse floor(1000/32)=31 tokens -> 3 chunks
    assert (p["local"][0], p["n_lm"][0], p["n_sel"][0]) == (64, 117, 3)
    p = pol.plan([1003])
    assert (p["local"][0], p["n_lm"][0]) == (64 + 3, 117)


def test_too_short_to_prune_falls_back():
    p = make_policy("yakv", min_seqlen_to_prune=0).plan([66, 67])
    # T=66: 64 local + floor(66/32)=2 sparse cover every token -> exact; T=67 drops one token -> pruned
    assert p["fallback"].tolist() == [True, False]
    assert p["prefix"][0] == 66 and p["n_sel"][1] == 2


# ----------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("kw,match", [
    (dict(sparse_budget=1.5), "sparse_budget"),
    (dict(local_budget=-3), "local_budget"),
    (dict(prefix_budget=0.5, sparse_budget=0.4, local_budget=0.2), "<= 1"),
    (dict(landmark_hadamard_group=48), "power of two"),
    (dict(store_format="int4"), "store_format"),
    (dict(scoring="sum"), "scoring"),
    (dict(chunk_size=0), "chunk_size"),
    (dict(fetch_backend="pallas"), "fetch_backend"),
    (dict(grids="eden"), r"grids='eden' must be one of \('paper', 'kvjax'\)"),
])
def test_bad_config_raises(kw, match):
    with pytest.raises(ValueError, match=match):
        make_policy("yakv", **kw)


def test_bad_inputs_for_model_and_prompt_raise():
    # budgets covering a prompt are not errors: such prompts are not pruned (they decode exactly)
    assert make_policy("yakv", min_seqlen_to_prune=0).prunable(TINY, [300, 40]).tolist() == [True, False]
    assert not make_policy("yakv", min_seqlen_to_prune=0, sparse_budget=500).prunable(TINY, [300]).any()
    assert not make_policy("yakv").prunable(TINY, [300]).any()  # default min_seqlen_to_prune = 512
    # C = 4 * 16 = 64 values: a 128-value Hadamard group cannot be formed
    with pytest.raises(ValueError, match="does not divide the channel size"):
        make_policy("yakv", landmark_hadamard_group=128).validate(TINY, np.array([300]), 8)
    with pytest.raises(ValueError, match="higgs_packed"):
        make_policy("yakv", store_format="higgs_packed", store_hadamard_group="token").validate(
            TINY, np.array([300]), 8)
    with pytest.raises(ValueError, match="max_new"):
        make_policy("yakv").validate(TINY, np.array([300]), 0)
    # our grid set has no EDEN8-256 (the paper's has)
    with pytest.raises(ValueError, match="landmark_d=8, landmark_n=256: grid set grids='kvjax' has no EDEN8-256"):
        make_policy("yakv", landmark_d=8, grids="kvjax").validate(TINY, np.array([300]), 8)
    make_policy("yakv", landmark_d=8).validate(TINY, np.array([300]), 8)
    # prompts below min_seqlen_to_prune are never pruned, so budgets do not apply to them
    make_policy("yakv", min_seqlen_to_prune=64).validate(TINY, np.array([40]), 8)


def test_prompt_shorter_than_the_window_decodes_exactly(full_eng):
    prompts = [_prompts([30])[0]]
    eng = full_eng.with_policy(make_policy("yakv", min_seqlen_to_prune=0))
    assert [g.ids for g in eng.generate(prompts, GREEDY8)] == [g.ids for g in full_eng.generate(prompts, GREEDY8)]
    assert eng.last_exact


# ----------------------------------------------------------------------------------------------- oracles
L_, B_, HKV, D_, H_, TB = 2, 2, 4, 16, 8, 256


def _random_state(pol, lengths, seed=0, dtype=jnp.float32, max_new=16, lm=None):
    rng = np.random.RandomState(seed)
    k = rng.randn(L_, B_, HKV, TB, D_).astype(np.float32)
    v = rng.randn(L_, B_, HKV, TB, D_).astype(np.float32)
    eng = kvjax.Engine(lm, pol)
    st = eng.build(KVCache(jnp.asarray(k, dtype), jnp.asarray(v, dtype)), np.asarray(lengths, np.int32), max_new)
    return eng, st, k, v


def _softmax(x):
    x = x - x.max(-1, keepdims=True)
    e = np.exp(x)
    return e / e.sum(-1, keepdims=True)


def _oracle_selection(q, keys, T, local, sparse, c=1):
    """Per KV head: top-``n_sel`` chunk starts by max_g softmax(q_g . l / sqrt(D)), l = mean of each chunk's keys
    over the candidate tokens [0, T - local') (local' gets the chunk remainder). float64."""
    G = H_ // HKV
    infix = T - local
    local += infix % c
    n_lm = (T - local) // c
    n_sel = min(int(sparse * T) // c, n_lm)
    out = []
    for h in range(HKV):
        lm = keys[h, :n_lm * c].reshape(n_lm, c, D_).mean(1)
        p = _softmax(q[h * G:(h + 1) * G] @ lm.T / math.sqrt(D_))  # [G, n_lm]
        score = p.max(0)
        sel = np.argsort(-score, kind="stable")[:n_sel]
        out.append(sorted(int(s) * c + j for s in sel for j in range(c)))
    return out, local


def _oracle_attend(q, keys, vals):
    """Exact attention of q [H, D] over per-KV-head rows keys/vals [Hkv][S_h, D] (float64)."""
    G = H_ // HKV
    out = np.zeros((H_, D_))
    for h in range(HKV):
        for g in range(G):
            p = _softmax(keys[h] @ q[h * G + g] / math.sqrt(D_))
            out[h * G + g] = p @ vals[h]
    return out


def _store_keys(fmt, k_post, T_all):
    """What the offloaded store returns for post-RoPE keys [Hkv, T, D] after the fetch and re-RoPE (oracle of the
    store numerics, built from the quant module and the model's own RoPE)."""
    if fmt == "none":
        return k_post
    pos = jnp.arange(T_all)
    cos, sin = rope_tables(TINY, pos)
    pre = np.asarray(apply_rope(jnp.asarray(k_post).transpose(1, 0, 2), cos, -sin))  # [T, Hkv, D] pre-RoPE
    if fmt == "higgs_qdq":  # token rows of C values, one Hadamard group of C
        rows = pre.reshape(T_all, HKV * D_)
        pre = np.asarray(higgs_qdq(rows, load_grid(2, 256), HiggsConfig(2, 256, HKV * D_))).reshape(T_all, HKV, D_)
    elif fmt == "higgs_packed":  # one group per head
        pre = np.asarray(higgs_qdq(pre, load_grid(2, 256), HiggsConfig(2, 256, D_)))
    elif fmt == "fp8":
        pre = np.asarray(fp8_decode(fp8_encode(pre), jnp.float32))
    return np.asarray(apply_rope(jnp.asarray(pre), cos, sin)).transpose(1, 0, 2)


def _store_vals(fmt, v):
    if fmt == "higgs_qdq":
        T_all = v.shape[1]
        rows = v.transpose(1, 0, 2).reshape(T_all, HKV * D_)
        return np.asarray(higgs_qdq(rows, load_grid(2, 256), HiggsConfig(2, 256, HKV * D_))).reshape(
            T_all, HKV, D_).transpose(1, 0, 2)
    if fmt == "higgs_packed":
        return np.asarray(higgs_qdq(v, load_grid(2, 256), HiggsConfig(2, 256, D_)))
    if fmt == "fp8":
        return np.asarray(fp8_decode(fp8_encode(v), jnp.float32))
    return v


@pytest.mark.parametrize("chunk,backend,fmt", [
    (1, "host_gather", "none"),
    (1, "device", "higgs_qdq"),
    (1, "host_gather", "higgs_packed"),
    (1, "host_gather", "fp8"),
    (4, "chunk_slices", "none"),
])
def test_decode_matches_oracle(tiny_lm, chunk, backend, fmt):
    """Unquantized landmarks: the selected set is the oracle's top-k, and two decode steps equal exact attention
    over local ∪ selected ∪ generated with the store's numerics (ragged batch, each with its own budget)."""
    lengths = [200, 131]
    local, sparse = 16, 0.125
    pol = make_policy("yakv", min_seqlen_to_prune=0, landmark_quant="none", store_format=fmt, score_dtype="float32",
                      local_budget=local,
                      sparse_budget=sparse, chunk_size=chunk, fetch_backend=backend)
    eng, st, k, v = _random_state(pol, lengths, seed=chunk, lm=tiny_lm)
    if backend != "device":
        assert st.k_store.sharding.memory_kind == "pinned_host"
    layer = 1
    rng = np.random.RandomState(7)
    dec = jax.jit(lambda s, q, kk, vv, p: pol.decode(TINY, s, jnp.int32(layer), q, None, kk, vv, p))
    sel_fn = jax.jit(lambda s, q: pol.selected_tokens(TINY, s, jnp.int32(layer), q))
    mask_fn = jax.jit(lambda s, q, p: pol.attended_mask(TINY, s, jnp.int32(layer), q, p))
    gen_k, gen_v = [], []
    for step in range(2):
        q = rng.randn(B_, H_, D_).astype(np.float32)
        kn = rng.randn(B_, HKV, D_).astype(np.float32)
        vn = rng.randn(B_, HKV, D_).astype(np.float32)
        pos = np.array(lengths, np.int32) + step
        sel = np.asarray(sel_fn(st, q))
        mask = np.asarray(mask_fn(st, q, pos))
        out, st = dec(st, q, kn, vn, pos)
        gen_k.append(kn)
        gen_v.append(vn)
        for b, T in enumerate(lengths):
            want, loc = _oracle_selection(q[b], k[layer, b], T, local, sparse, chunk)
            got = [sorted(int(t) for t in sel[b, h] if t >= 0) for h in range(HKV)]
            assert got == want, (b, step)
            local_toks = list(range(T - loc, T))
            ks_all = _store_keys(fmt, k[layer, b], TB)
            vs_all = _store_vals(fmt, v[layer, b])
            keys, vals = [], []
            for h in range(HKV):
                assert set(np.nonzero(mask[b, h])[0].tolist()) == set(local_toks) | set(want[h])
                keys.append(np.concatenate([k[layer, b, h, local_toks], ks_all[h, want[h]],
                                            np.stack([g[b, h] for g in gen_k])]))
                vals.append(np.concatenate([v[layer, b, h, local_toks], vs_all[h, want[h]],
                                            np.stack([g[b, h] for g in gen_v])]))
            np.testing.assert_allclose(np.asarray(out[b]), _oracle_attend(q[b], keys, vals), rtol=2e-4, atol=2e-4)


@pytest.mark.parametrize("grids", ["paper", "kvjax"])
def test_quantized_landmark_selection_is_topk_of_dequantized_scores(tiny_lm, grids):
    """HIGGS landmarks (EDEN4-256 of the chosen grid set, one group per head): the selection is the top-k of the
    scores of the dequantized landmarks (oracle: quant module + numpy), for the jnp scorer (float32 scores: exact
    set) and the kernel dispatch (bf16 scores: a valid top-k up to one bf16 rounding)."""
    lengths = [200, 131]
    local, sparse = 16, 0.125
    grid = load_grid(4, 256, grids)
    for backend, sdt in (("jnp", "float32"), ("auto", "bfloat16")):
        pol = make_policy("yakv", min_seqlen_to_prune=0, store_format="none", local_budget=local, sparse_budget=sparse,
                          score_backend=backend, score_dtype=sdt, grids=grids)
        eng, st, k, v = _random_state(pol, lengths, seed=3, lm=tiny_lm)
        q = np.random.RandomState(5).randn(B_, H_, D_).astype(np.float32)
        sel = np.asarray(jax.jit(lambda s, q: pol.selected_tokens(TINY, s, jnp.int32(0), q))(st, q))
        for b, T in enumerate(lengths):
            n_lm, n_sel = T - local, int(sparse * T)
            lm = np.asarray(higgs_qdq(k[0, b, :, :n_lm], grid, HiggsConfig(4, 256, D_)))  # [Hkv, n_lm, D]
            for h in range(HKV):
                p = _softmax(q[b, 2 * h:2 * h + 2] @ lm[h].T / math.sqrt(D_)).max(0)
                got = np.array(sorted(int(t) for t in sel[b, h] if t >= 0))
                assert len(got) == n_sel
                if backend == "jnp":
                    assert got.tolist() == sorted(np.argsort(-p, kind="stable")[:n_sel].tolist())
                else:  # every selected score >= every unselected one, up to a bf16 rounding (2^-8 relative)
                    rest = np.setdiff1d(np.arange(n_lm), got)
                    assert p[got].min() >= p[rest].max() * (1 - 2 ** -7)


@pytest.mark.parametrize("grids", ["paper", "kvjax"])
def test_grid_set_reaches_landmarks_and_store(tiny_lm, grids):
    """``grids`` selects the EDEN grids of both HIGGS quantizers: the built landmark codes and the store equal the
    quant module's encoding with that set's EDEN4-256 / EDEN2-256, and differ from the other set's."""
    other = {"paper": "kvjax", "kvjax": "paper"}[grids]
    pol = make_policy("yakv", min_seqlen_to_prune=0, local_budget=16, sparse_budget=0.125, fetch_backend="device",
                      grids=grids)
    _, st, k, v = _random_state(pol, [200, 131], seed=4, lm=tiny_lm)
    b, layer, n_lm = 1, 0, 131 - 16
    from kvjax.quant import higgs_encode
    rows = v[layer, b].transpose(1, 0, 2).reshape(TB, HKV * D_)  # the store's token rows, one group of C
    for src, same in ((grids, True), (other, False)):
        codes = np.asarray(higgs_encode(k[layer, b, :, :n_lm], load_grid(4, 256, src), HiggsConfig(4, 256, D_)).codes)
        assert np.array_equal(np.asarray(st.lm_codes[layer, b, :, :n_lm]), codes) == same, src
        vs = np.asarray(higgs_qdq(rows, load_grid(2, 256, src), HiggsConfig(2, 256, HKV * D_)))
        vs = vs.reshape(TB, HKV, D_).transpose(1, 0, 2)
        assert np.allclose(np.asarray(st.v_store[layer, b]), vs, rtol=1e-6, atol=1e-6) == same, src


def test_memory_report_records_the_grid_set_and_nothing_else_changes():
    reps = {g: memory_report_for(make_policy("yakv", grids=g), TINY, 1000, max_new=16) for g in ("paper", "kvjax")}
    assert (reps["paper"]["grids"], reps["kvjax"]["grids"]) == ("paper", "kvjax")
    for key in ("components", "by_kind", "per_prompt_token", "per_prompt_token_variable"):
        assert reps["paper"][key] == reps["kvjax"][key], key
    assert reps["paper"]["by_kind"]["device"] > 0
    # no HIGGS quantizer in use: no grid set to record
    plain = make_policy("yakv", landmark_quant="none", store_format="fp8")
    assert memory_report_for(plain, TINY, 1000, max_new=16)["grids"] is None
    # the eval records dump the config with dataclasses.asdict: the grid set is in it
    assert dataclasses.asdict(make_policy("yakv", grids="kvjax").config)["grids"] == "kvjax"


def test_score_landmarks_matches_kernel_reference():
    """yakv.score_landmarks on dequantized landmarks == pallas_kernels' reference on the packed codes."""
    dispatch = pytest.importorskip("pallas_kernels.dispatch")
    from kvjax.quant import higgs_decode, higgs_encode
    rng = np.random.RandomState(0)
    q = jnp.asarray(rng.randn(2, 8, 16), jnp.float32)
    x = jnp.asarray(rng.randn(2, 4, 96, 16), jnp.float32)
    grid, hc = load_grid(4, 256), HiggsConfig(4, 256, 16)
    codes = higgs_encode(x, grid, hc)
    lm = higgs_decode(codes, grid, hc, jnp.float32)
    n = jnp.array([96, 50], jnp.int32)
    for scoring, mode, atol in (("softmax_max", "eval", 1e-2), ("mean_dot", "serve", 1e-4)):
        ours = np.asarray(score_landmarks(q, lm, n, scoring, jnp.float32))
        ref = np.asarray(dispatch.score_landmarks(q, codes.codes, codes.scales[..., 0], jnp.asarray(grid), n,
                                                  mode=mode, use_kernels=False), np.float32)
        assert np.array_equal(np.isinf(ours), np.isinf(ref))
        fin = np.isfinite(ours)
        np.testing.assert_allclose(ours[fin], ref[fin], rtol=1e-2, atol=atol)


# ----------------------------------------------------------------------------------------------- engine parity
def _teacher_forced_logits(eng, prompts, tokens):
    """Prefill, then feed the given tokens through a session (the engine's one decode step); returns the float32
    logits of the prefill and of every step ``[S, B, V]``."""
    sess = eng.start(prompts, len(tokens) + 1)
    out = [np.asarray(sess.first_logits)]
    for t in tokens:
        out.append(np.asarray(sess.step(t).logits))
    return np.stack(out)


@pytest.mark.parametrize("landmark_quant,grids", [("none", "paper"), ("higgs", "paper"), ("higgs", "kvjax")])
def test_covering_budget_reproduces_full(full_eng, landmark_quant, grids):
    """Budget = the whole prompt through the offloaded store (no exact fallback), unquantized store, pre-RoPE keys
    re-roped after the fetch: logits equal full attention's and greedy tokens are identical, whichever landmarks
    (exact, or HIGGS with either grid set) did the selecting."""
    prompts = _prompts([300, 190])
    full = full_eng
    ref = full.generate(prompts, GREEDY8)
    pol = make_policy("yakv", sparse_budget=1.0, local_budget=0, exact_fallback=False, store_format="none",
                      landmark_quant=landmark_quant, grids=grids, min_seqlen_to_prune=0)
    eng = full.with_policy(pol)
    assert [g.ids for g in eng.generate(prompts, GREEDY8)] == [g.ids for g in ref]
    tokens = [np.array([ref[0].ids[i], ref[1].ids[i]]) for i in range(4)]
    np.testing.assert_allclose(_teacher_forced_logits(eng, prompts, tokens),
                               _teacher_forced_logits(full, prompts, tokens), rtol=1e-4, atol=1e-4)


def test_short_prompts_decode_exactly(full_eng):
    """Prompts that cannot be pruned decode like full attention even with the quantized defaults: T=66 (64 local +
    2 sparse cover it) with the eval config, T<=512 with the serving preset."""
    full = full_eng
    for name, lengths in (("yakv", [66, 65]), ("yakv-serving", [100, 128])):
        prompts = _prompts(lengths, seed=1)
        eng = full.with_policy(name)
        assert eng.policy.plan(lengths)["fallback"].all()
        assert [g.ids for g in eng.generate(prompts, GREEDY8)] == [g.ids for g in full.generate(prompts, GREEDY8)]


# ----------------------------------------------------------------------------------------------- real model
@pytest.fixture(scope="module")
def smollm2():
    try:
        return models.load_model("smollm2-135m", dtype="float32")
    except FileNotFoundError as e:
        pytest.skip(str(e))


def _smollm2_prompt(lm, n_words=400):
    words = ("the quick brown fox jumps over a lazy dog while seven wizards quietly hex "
             "nine jovial boxers in the old garden of the museum").split()
    rng = np.random.RandomState(0)
    text = " ".join(words[i] for i in rng.randint(0, len(words), n_words))
    return lm.tokenizer.encode("The secret number is 4721. Remember it.\n" + text + "\nWhat is the secret number?")


@pytest.mark.slow
def test_smollm2_covering_budget_matches_full(smollm2):
    ids = _smollm2_prompt(smollm2)
    gen = kvjax.GenerationConfig(max_new_tokens=12, stop_ids=())
    full = kvjax.Engine(smollm2, "full")
    ref = full.generate([ids], gen)[0].ids
    pol = make_policy("yakv", sparse_budget=1.0, local_budget=0, exact_fallback=False, store_format="none",
                      landmark_quant="none", min_seqlen_to_prune=0)
    assert full.with_policy(pol).generate([ids], gen)[0].ids == ref


@pytest.mark.slow
def test_smollm2_paper_defaults_find_the_needle(smollm2):
    """The paper's eval config (2-bit landmarks, 4-bit store, 1/32 budget + 64 local) on a real model and a
    1.4K-token prompt whose needle sits at the start, far outside the local window: YAKV generates the same greedy
    answer as full attention; a 1-token budget loses the needle (control)."""
    ids = _smollm2_prompt(smollm2, 1200)
    gen = kvjax.GenerationConfig(max_new_tokens=10, stop_ids=())
    full = kvjax.Engine(smollm2, "full")
    yk = full.with_policy("yakv")
    assert not yk.policy.plan([len(ids)])["fallback"].any()
    ref = full.generate([ids], gen)[0]
    assert "4721" in ref.text
    assert yk.generate([ids], gen)[0].ids == ref.ids
    assert "4721" not in full.with_policy(make_policy("yakv", sparse_budget=1)).generate([ids], gen)[0].text
