"""ShadowKV policy (algorithms.md §2): SVD / landmark / outlier / selection oracles, exactness against full
attention with full rank and whole-prompt budgets, ragged batches, host placement, and input errors."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import kvjax
import models
from kvjax import compat
from kvjax.prefill import build_from_kv
from policy_steps import own
from kvjax.policies import POLICIES, make_policy
from kvjax.policies.base import resolve_budget
from kvjax.policies.shadowkv import ShadowKVConfig, ShadowKVPolicy
from models import ModelConfig

CFG = ModelConfig(family="llama", vocab_size=128, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                  num_kv_heads=2, head_dim=16, max_position_embeddings=512)
C = CFG.num_kv_heads * CFG.head_dim  # 32


@pytest.fixture(scope="module")
def tiny():
    """A full-attention engine on a tiny random f32 model; ``with_policy`` shares its compiled prefill."""
    model = models.Transformer(CFG, dtype=jnp.float32, rngs=nnx.Rngs(0))
    return kvjax.Engine(models.LoadedModel(CFG, model, None), policy="full")


def _prompt(n, seed):
    return np.random.default_rng(seed).integers(0, CFG.vocab_size, n).tolist()


# ----------------------------------------------------------------------------- numpy oracles
def _np_rope(x, pos, theta=CFG.rope_theta):
    """RoPE (rotate-half) of x [..., T, D] at positions pos [T], float64."""
    D = x.shape[-1]
    inv = 1.0 / theta ** (np.arange(0, D, 2) / D)
    ang = np.asarray(pos, np.float64)[:, None] * inv[None, :]
    ang = np.concatenate([ang, ang], -1)
    rot = np.concatenate([-x[..., D // 2:], x[..., :D // 2]], -1)
    return x * np.cos(ang) + rot * np.sin(ang)


def _random_layer(L, B, Tb, lengths, seed=0):
    """Random pre-RoPE keys, their post-RoPE keys (padding rows replaced by large garbage) and values."""
    rng = np.random.default_rng(seed)
    Hkv, D = CFG.num_kv_heads, CFG.head_dim
    k_pre = rng.standard_normal((L, B, Hkv, Tb, D))
    k_pre += 0.5 * rng.standard_normal((L, B, Hkv, 1, D))  # a shared direction, as real keys have
    k = _np_rope(k_pre, np.arange(Tb))
    v = rng.standard_normal((L, B, Hkv, Tb, D))
    for b, T in enumerate(lengths):
        k[:, b, :, T:] = 100.0 * rng.standard_normal(k[:, b, :, T:].shape)
        k_pre[:, b, :, T:] = np.nan  # must never be used
    return k_pre, k.astype(np.float32), v.astype(np.float32)


def _build(pol, k, v, lengths, max_new=8):
    """The layer-stacked state as the prefill builds it (host fields placed in host memory)."""
    fn = jax.jit(lambda kk, vv: build_from_kv(pol, CFG, kk, vv, None, jnp.asarray(lengths, jnp.int32), max_new, None))
    return fn(jnp.asarray(k), jnp.asarray(v))


def _partition(T, c, local, outl):
    n_chunks = T // c - local // c
    return n_chunks, n_chunks * c, outl // c


def _oracle_outliers(k_bh, T, c, local, outl):
    """Chunk means and the outlier chunks (smallest min-cosine) of one head's post-RoPE keys [Tb, D]."""
    n_chunks, _, n_out = _partition(T, c, local, outl)
    chunks = k_bh[:n_chunks * c].astype(np.float64).reshape(n_chunks, c, -1)
    means = chunks.mean(1)
    cos = np.einsum("ncd,nd->nc", chunks, means) / (
        np.linalg.norm(chunks, axis=-1) * np.linalg.norm(means, axis=-1)[:, None])
    mincos = cos.min(1)
    return means, set(np.argsort(mincos, kind="stable")[:n_out].tolist()), n_chunks


# ----------------------------------------------------------------------------- config and errors
def test_config_defaults_and_registry():
    cfg = ShadowKVConfig()
    assert (cfg.rank, cfg.chunk_size, cfg.local_budget, cfg.outlier_budget, cfg.sparse_budget) == (160, 8, 32, 384,
                                                                                                    2048)
    assert POLICIES["shadowkv"] is ShadowKVPolicy
    pol = make_policy("shadowkv", rank=64, sparse_budget=0.125)
    assert isinstance(pol, ShadowKVPolicy) and pol.name == "shadowkv"
    assert pol.config.rank == 64 and pol.config.sparse_budget == 0.125
    assert pol.host_fields == ("v_store",)
    assert make_policy("shadowkv", fetch_backend="device").host_fields == ()


@pytest.mark.parametrize("kw,exc,match", [
    (dict(rank=0), ValueError, "rank=0"),
    (dict(chunk_size=0), ValueError, "chunk_size=0"),
    (dict(local_budget=12), ValueError, "local_budget=12 tokens must be a multiple of chunk_size=8"),
    (dict(outlier_budget=20), ValueError, "outlier_budget=20"),
    (dict(outlier_budget=1.5), ValueError, r"outlier_budget=1.5 .*\[0, 1\]"),
    (dict(sparse_budget=-8), ValueError, "sparse_budget=-8"),
    (dict(sparse_budget=True), TypeError, "sparse_budget"),
    (dict(fetch_backend="nfs"), ValueError, "fetch_backend='nfs'"),
])
def test_bad_config(kw, exc, match):
    with pytest.raises(exc, match=match):
        make_policy("shadowkv", **kw)


@pytest.mark.parametrize("kw", [dict(sparse_budget=2048), dict(local_budget=128), dict(outlier_budget=80),
                                dict(sparse_budget=48), dict(sparse_budget=56)])
def test_budgets_covering_the_prompt_decode_exactly(tiny, kw):
    """A 100-token prompt in chunks of 8 with a 32-token local window has 8 candidate chunks, 2 of them outliers:
    budgets that select every remaining landmark chunk (or leave none) prune nothing, so the prompt decodes exactly
    (full attention) instead of through the low-rank keys."""
    base = dict(rank=8, local_budget=32, outlier_budget=16, sparse_budget=40, min_seqlen_to_prune=0)
    assert make_policy("shadowkv", **base).prunable(CFG, [100]).all()  # 5 of 6 landmark chunks
    pol = make_policy("shadowkv", **{**base, **kw})
    pol.validate(CFG, np.array([100]), 8)  # not an error
    assert not pol.prunable(CFG, [100]).any()
    gen = kvjax.GenerationConfig(max_new_tokens=4, stop_ids=())
    eng = tiny.with_policy(pol)
    assert eng.generate([_prompt(100, 0)], gen)[0].ids == tiny.generate([_prompt(100, 0)], gen)[0].ids
    assert eng.last_exact


def test_budget_resolution_matches_paper_rule():
    pol = make_policy("shadowkv", local_budget=0.1, outlier_budget=0.2, sparse_budget=0.3, chunk_size=4)
    lengths = np.arange(60, 200, 7)
    got = pol.per_sequence_budgets(lengths)
    for T, g in zip(lengths, got):
        loc = (int(0.1 * T) // 4) * 4
        n_chunks = T // 4 - loc // 4
        assert g["local"] == T - n_chunks * 4 and g["n_chunks"] == n_chunks
        assert g["outlier_chunks"] == (int(0.2 * T) // 4)
        assert g["select_chunks"] == (int(0.3 * T) // 4)
    # and the traced per-sequence budgets inside build use the same rule
    Tb = 256
    st = _build(pol, *_random_layer(1, len(lengths), Tb, lengths)[1:], lengths)
    np.testing.assert_array_equal(np.asarray(st.n_sel[0]), [g["select_chunks"] for g in got])
    np.testing.assert_array_equal(np.asarray(st.n_out[0]), [g["outlier_chunks"] for g in got])
    np.testing.assert_array_equal(np.asarray(st.local_len[0]), [g["local"] for g in got])
    assert [g["select_chunks"] * 4 for g in got] == [resolve_budget(0.3, int(T), 4) for T in lengths]


# ----------------------------------------------------------------------------- prefill oracles
def test_unrope_inverts_model_rope():
    from kvjax.policies.shadowkv import rope, unrope
    from models.transformer import apply_rope, rope_tables

    x = jax.random.normal(jax.random.key(0), (2, 40, 3, 16))  # [B, T, heads, D] (model layout)
    pos = jnp.arange(40)
    cos, sin = rope_tables(CFG, pos)
    y = apply_rope(x, cos, sin)
    yt = y.transpose(0, 2, 1, 3)  # [B, heads, T, D] (policy layout)
    np.testing.assert_allclose(np.asarray(unrope(CFG, yt, pos)), np.asarray(x.transpose(0, 2, 1, 3)), atol=2e-5)
    np.testing.assert_allclose(np.asarray(rope(CFG, x.transpose(0, 2, 1, 3), pos)), np.asarray(yt), atol=2e-5)


def test_svd_reconstruction_matches_numpy_and_decreases_with_rank():
    Tb, lengths = 64, [64, 45, 20]
    k_pre, k, v = _random_layer(1, 3, Tb, lengths)
    errs = []
    for rank in (2, 4, 8, 16, 32, 1000):
        pol = make_policy("shadowkv", rank=rank, chunk_size=4, local_budget=8, outlier_budget=4, sparse_budget=4)
        st = _build(pol, k, v, lengths)
        r = min(rank, C)
        assert st.u.shape == (1, 3, Tb, r) and st.sv.shape == (1, 3, CFG.num_kv_heads, r, CFG.head_dim)
        e_rank = []
        for b, T in enumerate(lengths):
            M = k_pre[0, b, :, :T].transpose(1, 0, 2).reshape(T, C)  # [T, C], head-major rows
            U, s, Vt = np.linalg.svd(M, full_matrices=False)
            rr = min(r, len(s))
            oracle = (U[:, :rr] * s[:rr]) @ Vt[:rr]
            sv = np.asarray(st.sv[0, b]).transpose(1, 0, 2).reshape(r, C)
            recon = np.asarray(st.u[0, b, :T], np.float64) @ sv
            np.testing.assert_allclose(recon, oracle, atol=2e-4)
            err = np.linalg.norm(M - recon)
            np.testing.assert_allclose(err, np.sqrt(np.sum(s[rr:] ** 2)), rtol=1e-3, atol=1e-3)
            np.testing.assert_allclose(np.asarray(st.u[0, b, T:]), 0.0, atol=1e-5)  # padding never enters U
            e_rank.append(err)
        errs.append(e_rank)
    errs = np.array(errs)  # [rank, seq]
    assert np.all(np.diff(errs[:5, 0]) < 0)  # strictly better with rank (T=64 > C)
    assert np.all(errs[4:] < 1e-3)  # rank C (and beyond, clipped): exact
    assert errs[2, 2] > 1e-2 and errs[4, 2] < 1e-3  # T=20 < C: rank 20 is exact, rank 8 is not


@pytest.mark.parametrize("c", [8, 4, 1])
def test_landmarks_outliers_local_match_oracle(c):
    Tb, lengths = 128, [128, 101, 67]
    local, outl = 16, 3 * c
    k_pre, k, v = _random_layer(2, 3, Tb, lengths, seed=c)
    pol = make_policy("shadowkv", rank=8, chunk_size=c, local_budget=local, outlier_budget=outl, sparse_budget=c)
    st = _build(pol, k, v, lengths)
    for layer in range(2):
        for b, T in enumerate(lengths):
            n_chunks, start, n_out = _partition(T, c, local, outl)
            assert int(st.local_start[layer, b]) == start and int(st.local_len[layer, b]) == T - start
            n = T - start
            np.testing.assert_array_equal(np.asarray(st.local_k[layer, b, :, :n]), k[layer, b, :, start:T])
            np.testing.assert_array_equal(np.asarray(st.local_v[layer, b, :, :n]), v[layer, b, :, start:T])
            for h in range(CFG.num_kv_heads):
                means, outs, _ = _oracle_outliers(k[layer, b, h], T, c, local, outl)
                np.testing.assert_allclose(np.asarray(st.landmarks[layer, b, h, :n_chunks]), means, atol=1e-5)
                got = np.asarray(st.out_ids[layer, b, h, :n_out]).tolist()
                if c == 1:
                    assert got == list(range(n_out))  # c == 1: the first chunks (§2.2 step 6)
                    outs = set(got)
                else:
                    assert set(got) == outs
                tok = [j * c + t for j in got for t in range(c)]
                np.testing.assert_array_equal(np.asarray(st.out_k[layer, b, h, :n_out * c]), k[layer, b, h, tok])
                np.testing.assert_array_equal(np.asarray(st.out_v[layer, b, h, :n_out * c]), v[layer, b, h, tok])
                exp_valid = np.zeros(Tb // c, bool)
                exp_valid[:n_chunks] = True
                exp_valid[list(outs)] = False
                np.testing.assert_array_equal(np.asarray(st.lm_valid[layer, b, h]), exp_valid)


def _oracle_selection(st, layer, q, b, h, G):
    lm = np.asarray(st.landmarks[layer, b, h], np.float64)
    valid = np.asarray(st.lm_valid[layer, b, h])
    s = np.asarray(q[b, h * G:(h + 1) * G], np.float64) @ lm[valid].T / np.sqrt(CFG.head_dim)  # [G, M]
    p = np.exp(s - s.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    a = p.max(0)
    n = int(st.n_sel[layer, b])
    return np.flatnonzero(valid)[np.argsort(-a, kind="stable")[:n]]


def test_selection_and_attended_mask_match_oracle():
    Tb, lengths = 128, [128, 93]
    c, local, outl = 4, 8, 8
    k_pre, k, v = _random_layer(2, 2, Tb, lengths, seed=3)
    pol = make_policy("shadowkv", rank=8, chunk_size=c, local_budget=local, outlier_budget=outl, sparse_budget=0.25)
    st = _build(pol, k, v, lengths)
    q = np.asarray(jax.random.normal(jax.random.key(1), (2, CFG.num_heads, CFG.head_dim)))
    G = CFG.group_size
    for layer in range(2):
        ids, ok = jax.jit(lambda s, qq, l=layer: pol.select_chunks(CFG, s, l, qq))(st, q)
        mask = np.asarray(jax.jit(lambda s, qq, l=layer: pol.attended_mask(CFG, s, l, qq, None))(st, q))
        assert mask.shape == (2, CFG.num_kv_heads, Tb)
        for b, T in enumerate(lengths):
            n = int(st.n_sel[layer, b])
            assert n == (int(0.25 * T) // c)
            assert np.asarray(ok[b]).sum(-1).tolist() == [n] * CFG.num_kv_heads
            for h in range(CFG.num_kv_heads):
                exp = _oracle_selection(st, layer, q, b, h, G)
                np.testing.assert_array_equal(np.asarray(ids[b, h, :n]), exp)  # same chunks, same order
                n_chunks, start, n_out = _partition(T, c, local, outl)
                exp_mask = np.zeros(Tb, bool)
                exp_mask[start:T] = True
                for j in list(exp) + np.asarray(st.out_ids[layer, b, h, :n_out]).tolist():
                    exp_mask[j * c:(j + 1) * c] = True
                np.testing.assert_array_equal(mask[b, h], exp_mask)
                assert mask[b, h].sum() == (T - start) + n_out * c + n * c


@pytest.mark.parametrize("backend", ["host_gather", "chunk_slices", "device"])
def test_decode_matches_oracle_attention(backend):
    """One decode step = exact attention over local ∪ outliers ∪ selected (keys rebuilt from the rank-r SVD of
    the pre-RoPE keys and re-RoPE'd, values from the host store) ∪ the new token."""
    Tb, lengths, rank = 128, [128, 90], 8
    c, local, outl = 8, 16, 16
    k_pre, k, v = _random_layer(2, 2, Tb, lengths, seed=5)
    pol = make_policy("shadowkv", rank=rank, chunk_size=c, local_budget=local, outlier_budget=outl,
                      sparse_budget=0.2, fetch_backend=backend)
    st = _build(pol, k, v, lengths)
    if backend != "device":
        assert st.v_store.sharding.memory_kind == "pinned_host"
    rng = np.random.default_rng(9)
    q = rng.standard_normal((2, CFG.num_heads, CFG.head_dim)).astype(np.float32)
    kn = rng.standard_normal((2, CFG.num_kv_heads, CFG.head_dim)).astype(np.float32)
    vn = rng.standard_normal((2, CFG.num_kv_heads, CFG.head_dim)).astype(np.float32)
    pos = np.array(lengths, np.int32)
    layer = 1
    ids = np.asarray(jax.jit(lambda s: pol.select_chunks(CFG, s, layer, q)[0])(st))
    step = jax.jit(lambda s, qq, kk, vv, p: pol.decode(CFG, s, jnp.int32(layer), qq, kk, kk, vv, p))
    out, st2 = step(st, q, kn, vn, pos)
    out = np.asarray(out)
    G, D = CFG.group_size, CFG.head_dim
    for b, T in enumerate(lengths):
        M = k_pre[layer, b, :, :T].transpose(1, 0, 2).reshape(T, C)
        U, s, Vt = np.linalg.svd(M, full_matrices=False)
        recon_pre = ((U[:, :rank] * s[:rank]) @ Vt[:rank]).reshape(T, CFG.num_kv_heads, D).transpose(1, 0, 2)
        recon = _np_rope(recon_pre, np.arange(T))
        n_chunks, start, n_out = _partition(T, c, local, outl)
        n_sel = int(0.2 * T) // c
        for h in range(CFG.num_kv_heads):
            outs = np.asarray(st.out_ids[layer, b, h, :n_out])
            exact_tok = list(range(start, T)) + [j * c + t for j in outs for t in range(c)]
            sel_tok = [j * c + t for j in ids[b, h, :n_sel] for t in range(c)]
            keys = np.concatenate([k[layer, b, h, exact_tok], recon[h, sel_tok], kn[b, h][None]])
            vals = np.concatenate([v[layer, b, h, exact_tok], v[layer, b, h, sel_tok], vn[b, h][None]])
            sc = q[b, h * G:(h + 1) * G] @ keys.T / np.sqrt(D)
            p = np.exp(sc - sc.max(1, keepdims=True))
            p /= p.sum(1, keepdims=True)
            np.testing.assert_allclose(out[b, h * G:(h + 1) * G], p @ vals, atol=2e-4)
    # the new token went into generated slot 0 of this layer only
    np.testing.assert_array_equal(np.asarray(st2.gen.k[layer, :, :, 0]), kn)
    np.testing.assert_array_equal(np.asarray(st2.gen.v[layer, :, :, 0]), vn)
    assert not np.asarray(st2.gen.k[0]).any()


# ----------------------------------------------------------------------------- end to end
def _covering(T, c=8, local=32, outl=16):
    """Budgets whose local ∪ outliers ∪ selected cover the whole prompt."""
    n_chunks = T // c - local // c
    return dict(chunk_size=c, local_budget=local, outlier_budget=outl, sparse_budget=(n_chunks - outl // c) * c)


def _greedy_logits(eng, ids, steps):
    """Logits [steps+1, 1, V] of greedy decoding (each step feeds back its own argmax) through a session."""
    sess = eng.start([ids], steps + 1)
    out, tok = [np.asarray(sess.first_logits)], np.asarray(sess.first_logits).argmax(-1).astype(np.int32)
    for _ in range(steps):
        logits = sess.step(tok).logits
        out.append(np.asarray(logits))
        tok = np.asarray(logits).argmax(-1).astype(np.int32)
    return np.stack(out)


def test_full_rank_whole_prompt_reproduces_full(tiny):
    ids = _prompt(100, 1)
    sk = own(tiny, make_policy("shadowkv", rank=C, **_covering(100)))
    lf, ls = _greedy_logits(tiny, ids, 8), _greedy_logits(sk, ids, 8)
    np.testing.assert_allclose(ls, lf, atol=2e-4, rtol=1e-4)
    # each run feeds back its own argmax: greedy decoding, token for token
    np.testing.assert_array_equal(ls.argmax(-1), lf.argmax(-1))
    # a low rank changes the logits (the tolerance above is not vacuous)
    low = own(tiny, make_policy("shadowkv", rank=2, **_covering(100)))
    assert np.abs(_greedy_logits(low, ids, 1) - lf[:2]).max() > 1e-3


def test_ragged_batch_matches_each_alone(tiny):
    pol = make_policy("shadowkv", rank=8, chunk_size=8, local_budget=16, outlier_budget=16, sparse_budget=0.25,
                      min_seqlen_to_prune=0)
    eng = tiny.with_policy(pol)
    prompts = [_prompt(100, 2), _prompt(77, 3), _prompt(120, 4)]
    gen = kvjax.GenerationConfig(max_new_tokens=6, stop_ids=())
    together = [g.ids for g in eng.generate(prompts, gen)]
    st = eng.last_state
    assert np.asarray(st.n_sel[0]).tolist() == [3, 2, 3]  # per-sequence budgets inside one static top-k of 4
    alone = [eng.generate([p], gen)[0].ids for p in prompts]
    assert together == alone
    rep = eng.memory_report()
    assert rep["components"]["v_store"]["kind"] == "pinned_host"
    assert all(v["kind"] == "device" for n, v in rep["components"].items() if n != "v_store")
    assert rep["components"]["gen"]["fixed"] and not rep["components"]["u"]["fixed"]
    # prompt lengths within the bucket do not recompile the decode loop (batch 1 and batch 3: two programs)
    counts = eng.compile_counts()
    eng.generate([_prompt(90, 5)], gen)
    assert eng.compile_counts() == counts
    # KV heads split over a 2-device "model" axis, values in pinned_host on that mesh: same tokens
    mesh = compat.make_mesh(1, 2)
    meng = kvjax.Engine(tiny.lm, policy=pol, mesh=mesh)
    with jax.set_mesh(mesh):
        assert [g.ids for g in meng.generate(prompts, gen)] == together
    assert meng.last_state.v_store.sharding.memory_kind == "pinned_host"
    assert meng.last_state.v_store.sharding.spec[2] == "model"


@pytest.mark.parametrize("backend,host_compute", [("host_gather", True), ("chunk_slices", False), ("device", False)])
def test_tpu_lowering_keeps_values_in_host_memory(backend, host_compute):
    """Structural: the decode step lowered for TPU moves the value rows host -> device explicitly; only the
    host gather runs as host compute (algorithms.md §8.7, jax_notes §4)."""
    lengths = [100]
    _, k, v = _random_layer(2, 1, 128, lengths)
    pol = make_policy("shadowkv", rank=8, local_budget=16, outlier_budget=16, sparse_budget=0.25,
                      fetch_backend=backend)
    st = _build(pol, k, v, lengths)
    q, kn = jnp.zeros((1, CFG.num_heads, CFG.head_dim)), jnp.zeros((1, CFG.num_kv_heads, CFG.head_dim))
    fn = jax.jit(lambda s, l: pol.decode(CFG, s, l, q, kn, kn, kn, jnp.asarray(lengths)))
    txt = fn.trace(st, jnp.int32(1)).lower(lowering_platforms=("tpu",)).as_text()
    assert ("annotate_device_placement" in txt) == (backend != "device")
    assert ("_xla_compute_type" in txt) == host_compute


@pytest.mark.slow
def test_smollm2_full_rank_whole_prompt_reproduces_full():
    lm = models.load_model("smollm2-135m", dtype="float32")
    cfg = lm.config
    text = ("The quick brown fox jumps over the lazy dog. " * 6 +
            "Alice has three apples and Bob has five pears. How many fruits do they have in total?")
    full = kvjax.Engine(lm, policy="full")
    ids = full.encode(text)
    T = len(ids)
    assert T > 80
    pol = make_policy("shadowkv", rank=cfg.num_kv_heads * cfg.head_dim, **_covering(T))
    sk = own(full, pol)
    lf, ls = _greedy_logits(full, ids, 4), _greedy_logits(sk, ids, 4)
    np.testing.assert_allclose(ls, lf, atol=5e-3, rtol=1e-3)
    gen = kvjax.GenerationConfig(max_new_tokens=12)
    assert sk.generate([ids], gen)[0].ids == full.generate([ids], gen)[0].ids
