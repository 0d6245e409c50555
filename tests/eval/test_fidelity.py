"""Fidelity to full attention (eval/fidelity.py): KL, agreement, first divergence, attention recall, teacher forcing."""
import math
import pathlib

import jax.numpy as jnp
import numpy as np
import pytest

from eval import fidelity
from kvjax.engine import Engine, GenerationConfig
from kvjax.policies import make_policy
from models import load_model
from models.transformer import forward_logits_pure

TINY = pathlib.Path(__file__).resolve().parents[1] / "fixtures" / "hf" / "tiny_llama"
STOP = (2,)


@pytest.fixture(scope="module")
def tiny():
    lm = load_model(str(TINY), dtype="float32")
    return lm, Engine(lm)


def _prompt(n=150, seed=0):
    return [int(x) for x in np.random.default_rng(seed).integers(3, 500, size=n)]


# ------------------------------------------------------------------------------------------------ pure metrics
def test_kl_divergence_matches_the_definition():
    p = np.log(np.array([[0.5, 0.5], [0.2, 0.8]]))
    q = np.log(np.array([[0.9, 0.1], [0.2, 0.8]]))
    expected0 = 0.5 * math.log(0.5 / 0.9) + 0.5 * math.log(0.5 / 0.1)
    kl = fidelity.kl_divergence(p + 3.0, q - 7.0)  # logits are shift-invariant
    assert kl[0] == pytest.approx(expected0, rel=1e-12)
    assert kl[1] == pytest.approx(0.0, abs=1e-15)
    assert fidelity.kl_divergence(q, p)[0] != pytest.approx(expected0)  # not symmetric: the direction matters


def test_fidelity_metrics_first_divergence_and_agreement():
    V = 5
    ref = [1, 3, 0, 4, 2]  # r_0..r_4: four decode steps predict r_1..r_4
    full = np.full((4, V), -5.0)
    full[np.arange(4), ref[1:]] = 5.0
    method = full.copy()
    method[1] = 0.0
    method[1, 2] = 9.0  # step 1 predicts token 2 instead of r_2 = 0
    m = fidelity.fidelity_metrics(ref, full, method)
    assert m["n_steps"] == 4
    assert m["top1_agreement"] == pytest.approx(0.75)
    assert m["first_divergence"] == 2  # the second generated token after the prefill token
    per_step = [fidelity.kl_divergence(full[i], method[i]) for i in range(4)]
    assert m["kl_mean"] == pytest.approx(float(np.mean(per_step)))
    same = fidelity.fidelity_metrics(ref, full, full)
    assert same["kl_mean"] == 0.0 and same["top1_agreement"] == 1.0 and same["first_divergence"] is None


def test_attention_recall_against_numpy():
    rng = np.random.default_rng(0)
    B, H, Hkv, Tb, D = 2, 4, 2, 16, 8
    q = rng.normal(size=(B, H, D)).astype(np.float32)
    k = rng.normal(size=(B, Hkv, Tb, D)).astype(np.float32)
    lengths = np.array([16, 11], np.int32)
    att = rng.random((B, Hkv, Tb + 4)) < 0.4  # extra columns (generated slots) are ignored
    att[1, :, 12] = True  # a padding slot marked attended must not count
    got = np.asarray(fidelity.attention_recall(jnp.asarray(q), jnp.asarray(k), jnp.asarray(lengths), jnp.asarray(att)))
    G = H // Hkv
    for b in range(B):
        T = lengths[b]
        for h in range(Hkv):
            shares = []
            for g in range(G):
                s = k[b, h, :T] @ q[b, h * G + g] / math.sqrt(D)
                p = np.exp(s - s.max())
                p /= p.sum()
                shares.append(p[att[b, h, :T]].sum())
            assert got[b, h] == pytest.approx(np.mean(shares), rel=1e-5, abs=1e-6)
    full = np.asarray(fidelity.attention_recall(jnp.asarray(q), jnp.asarray(k), jnp.asarray(lengths),
                                                jnp.ones((B, Hkv, Tb), bool)))
    np.testing.assert_allclose(full, 1.0, rtol=1e-6)


def test_recall_summary_skips_unmeasured_steps():
    r = np.full((3, 2, 2), np.nan)
    r[0] = [[1.0, 0.5], [0.25, 0.25]]
    r[2] = [[0.0, 0.5], [0.75, 0.25]]
    s = fidelity.recall_summary(r)
    assert s["recall_steps"] == 2
    assert s["recall_layer_head"] == [[0.5, 0.5], [0.5, 0.25]]
    assert s["recall_per_layer"] == [0.5, 0.375]
    assert s["recall_mean"] == pytest.approx(0.4375)


# ------------------------------------------------------------------------------------------------ teacher forcing
def test_full_against_itself(tiny):
    lm, eng = tiny
    ref, run = fidelity.compare(eng, "full", _prompt(), 12, STOP)
    f = run.fidelity
    assert f["n_steps"] == len(ref.sampled) - 1 > 0
    assert f["kl_mean"] == pytest.approx(0.0, abs=1e-9)
    assert f["top1_agreement"] == 1.0
    assert f["first_divergence"] is None
    assert f["recall_mean"] == pytest.approx(1.0, abs=1e-6)
    assert len(f["recall_per_layer"]) == lm.config.num_layers
    assert run.ids == ref.ids


def test_teacher_forced_logits_equal_a_full_forward(tiny):
    """Full's reference logits at decode step i = the causal forward of prompt + r_0..r_i at its last position."""
    lm, eng = tiny
    ids = _prompt(90, seed=3)
    pre = fidelity.prefill(eng, ids, 8)
    ref = fidelity.run_method(pre.session("full"), pre, 8, STOP, keep_logits=True)
    seq = jnp.asarray([ids + ref.sampled[:-1]], jnp.int32)
    oracle = np.asarray(forward_logits_pure(lm.model.params(), lm.config, seq))[0]
    n = len(ref.sampled) - 1
    np.testing.assert_allclose(ref.logits, oracle[len(ids):len(ids) + n], rtol=2e-4, atol=2e-4)
    assert np.argmax(oracle[len(ids) - 1]) == ref.sampled[0]


def test_method_free_run_matches_engine_generate(tiny):
    """The free run forked at the first divergence produces exactly what Engine.generate produces."""
    lm, eng = tiny
    ids = _prompt(200, seed=5)
    pol = make_policy("yakv", sparse_budget=1 / 32, min_seqlen_to_prune=0)
    ref, run = fidelity.compare(eng, pol, ids, 24, STOP)
    assert run.fidelity["first_divergence"] is not None  # a random tiny model diverges: the fork path runs
    assert run.fidelity["recall_mean"] < 0.99
    g = eng.with_policy(pol).generate([ids], GenerationConfig(max_new_tokens=24, stop_ids=STOP))[0]
    assert run.ids == g.ids
    assert run.stop_reason == g.stop_reason


def test_whole_prompt_budget_is_exact_on_tiny_model(tiny):
    """YAKV selecting every prompt token from an unquantized store attends exactly like full."""
    lm, eng = tiny
    pol = make_policy("yakv", min_seqlen_to_prune=0, sparse_budget=1.0, exact_fallback=False, store_format="none", landmark_quant="none")
    ref, run = fidelity.compare(eng, pol, _prompt(160, seed=7), 16, STOP)
    assert run.fidelity["top1_agreement"] == 1.0
    assert run.fidelity["kl_mean"] < 1e-9
    assert run.fidelity["recall_mean"] == pytest.approx(1.0, abs=1e-6)
    assert run.ids == ref.ids


def test_recall_every_measures_a_subset(tiny):
    lm, eng = tiny
    pre_ref, run = fidelity.compare(eng, make_policy("yakv", min_seqlen_to_prune=0), _prompt(), 12, STOP,
                                     recall_every=4)
    n = run.fidelity["n_steps"]
    assert run.fidelity["recall_steps"] == len(range(0, n, 4))


@pytest.mark.slow
def test_whole_prompt_budget_agrees_on_smollm2():
    lm = load_model("smollm2-135m", dtype="float32")
    eng = Engine(lm)
    tok = lm.tokenizer
    text = ("The meeting notes say that Anna will bring the projector, Ben the cables and Carla the snacks. " * 12
            + "\nWho brings the cables?")
    ids = tok.encode(tok.apply_chat_template(text))
    pol = make_policy("yakv", min_seqlen_to_prune=0, sparse_budget=1.0, exact_fallback=False, store_format="none", landmark_quant="none")
    ref, run = fidelity.compare(eng, pol, ids, 24, tok.stop_ids())
    assert run.fidelity["n_steps"] > 3
    assert run.fidelity["top1_agreement"] == 1.0
    assert run.fidelity["first_divergence"] is None
    assert run.fidelity["recall_mean"] == pytest.approx(1.0, abs=1e-5)
    assert run.ids == ref.ids
