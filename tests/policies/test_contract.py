"""The policy contract, one parametrized test per invariant over every policy (tiny random model, ragged batch):

* a budget covering the whole prompt reproduces full attention (tokens and logits), on the policy's own machinery
  (``Engine(exact_fallback=False)``), with its host fields in pinned_host memory;
* the device loop gives the host loop's tokens, and neither recompiles for another prompt length or generation
  length inside the same buckets;
* ``memory_report`` adds up to the state's bytes per memory kind;
* prompts a policy cannot prune (at or below ``min_seqlen_to_prune``, the default 512) decode exactly like full
  attention, with a notice.
"""
import jax
import numpy as np
import pytest

import kvjax
from kvjax.memory import leaf_kind
from kvjax.policies import make_policy
from models import ModelConfig
from policy_steps import run_steps, tiny_setup

TINY = ModelConfig(family="llama", vocab_size=97, hidden_size=64, intermediate_size=128, num_layers=3, num_heads=4,
                   num_kv_heads=2, head_dim=16, max_position_embeddings=1024)
LENS = (250, 90)  # ragged, one prompt bucket (256)

#: per policy: a configuration whose budget covers the whole prompt (and stores keys/values exactly)
WHOLE = {
    "yakv": dict(sparse_budget=1.0, local_budget=0, exact_fallback=False, store_format="none"),
    "yakv-serving": dict(sparse_budget=1.0, prefix_budget=0, local_budget=0, exact_fallback=False,
                         store_format="none"),
    "shadowkv": dict(sparse_budget=1.0, outlier_budget=0, local_budget=8),  # rank >= C: exact keys
    "arkvale": dict(budget=1.0),
    "arkvale:host_gather": dict(budget=1.0, fetch_backend="host_gather"),
    "quest": dict(budget=1.0),
    "infinigen": dict(budget=1.0, calibration_len=64),
    "lrqk": dict(num_active=1.0),
}
NAMES = sorted(n for n in WHOLE if ":" not in n)
#: per policy: a small budget that prunes every prompt of these tests
SMALL = {
    "yakv": {}, "yakv-serving": dict(min_attended_tokens=0),
    "shadowkv": dict(sparse_budget=16, outlier_budget=16, local_budget=16),
    "arkvale": dict(budget=0.1, n_sink_pages=1, n_win_pages=1), "quest": dict(budget=0.2),
    "infinigen": dict(calibration_len=64), "lrqk": {},
}


@pytest.fixture(scope="module")
def tiny():
    return tiny_setup(TINY, LENS, steps=5)


def test_every_policy_is_covered():
    assert set(kvjax.POLICIES) - {"full"} <= {n.split("-")[0] for n in NAMES}


@pytest.mark.parametrize("case", sorted(WHOLE))
def test_whole_prompt_budget_reproduces_full_attention(tiny, case):
    eng, prompts, (ref_tok, ref_logits, _) = tiny
    name = case.split(":")[0]
    pol = make_policy(name, min_seqlen_to_prune=0, **WHOLE[case])
    e = kvjax.Engine(eng.lm, policy=pol, exact_fallback=False)
    tok, logits, state = run_steps(e, prompts, steps=5)
    assert type(state).__name__ != "KVCache"  # the policy's own state, not a fallback
    np.testing.assert_array_equal(tok, ref_tok)
    np.testing.assert_allclose(logits, ref_logits, atol=3e-5, rtol=1e-5)
    assert pol.host_fields
    for f in pol.host_fields:
        for leaf in jax.tree.leaves(getattr(state, f)):
            assert leaf.sharding.memory_kind == "pinned_host", (name, f)


@pytest.mark.parametrize("name", NAMES)
def test_device_loop_equals_host_loop_and_compiles_once_per_bucket(tiny, name):
    eng, prompts, _ = tiny
    pol = make_policy(name, min_seqlen_to_prune=0, **SMALL[name])
    e = kvjax.Engine(eng.lm, policy=pol)
    assert pol.prunable(TINY, LENS).all() and pol.prunable(TINY, (200, 140)).all()
    gen = kvjax.GenerationConfig(max_new_tokens=9, stop_ids=(3,))
    dev = e.generate(prompts, gen)
    host = e.generate(prompts, gen, loop="host")
    assert [o.ids for o in dev] == [o.ids for o in host]
    assert [o.stop_reason for o in dev] == [o.stop_reason for o in host]
    counts = e.compile_counts()
    # other prompt lengths in the same bucket (and still prunable), another generation length in the same bucket
    rng = np.random.default_rng(5)
    other = [list(rng.integers(0, TINY.vocab_size, n)) for n in (200, 140)]
    e.generate(other, kvjax.GenerationConfig(max_new_tokens=5, stop_ids=(3,)))
    assert e.compile_counts() == counts


@pytest.mark.parametrize("name", NAMES + ["full"])
def test_memory_report_adds_up_to_the_state(tiny, name):
    eng, prompts, _ = tiny
    e = kvjax.Engine(eng.lm, policy=make_policy(name, **({} if name == "full" else
                                                        {"min_seqlen_to_prune": 0, **SMALL[name]})))
    e.generate(prompts, kvjax.GenerationConfig(max_new_tokens=2, stop_ids=()))
    state = e.last_state
    rep = e.memory_report()
    by_kind: dict = {}
    for leaf in jax.tree.leaves(state):
        by_kind[leaf_kind(leaf)] = by_kind.get(leaf_kind(leaf), 0) + leaf.size * leaf.dtype.itemsize
    transient = {c["kind"]: c["bytes"] for c in rep["components"].values() if c.get("transient")}
    excluded = sum(rep.get("excluded", {}).values())  # InfiniGen's copy of W_q (the resident weights)
    for kind, nbytes in by_kind.items():
        assert rep["by_kind"][kind] - transient.get(kind, 0) + (excluded if kind == "device" else 0) == nbytes
    assert sum(c["bytes"] for c in rep["components"].values()) == sum(rep["by_kind"].values())


@pytest.mark.parametrize("name", NAMES)
def test_prompts_too_short_to_prune_decode_exactly(tiny, name, caplog):
    eng, prompts, (ref_tok, _, _) = tiny
    e = eng.with_policy(make_policy(name))  # default min_seqlen_to_prune = 512 > every prompt here
    assert not e.policy.prunable(TINY, LENS).any()
    with caplog.at_level("WARNING", logger="kvjax"):
        out = e.generate(prompts, kvjax.GenerationConfig(max_new_tokens=6, stop_ids=()))
    assert [o.ids for o in out] == ref_tok.tolist()
    assert any("decoding them exactly" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("name", ["shadowkv", "arkvale"])
def test_mixed_batch_is_split_and_each_part_decodes_right(tiny, name):
    """One prompt above min_seqlen_to_prune, one below: the short one decodes exactly, the long one with the
    policy, both as they would alone."""
    eng, prompts, (ref_tok, _, _) = tiny
    pol = make_policy(name, min_seqlen_to_prune=100, **SMALL[name])
    e = eng.with_policy(pol)
    assert pol.prunable(TINY, LENS).tolist() == [True, False]
    gen = kvjax.GenerationConfig(max_new_tokens=6, stop_ids=())
    both = e.generate(prompts, gen)
    alone = e.generate(prompts[:1], gen)
    assert both[0].ids == alone[0].ids
    assert both[1].ids == ref_tok[1].tolist()
    with pytest.raises(ValueError, match="separate batches"):
        e.start(prompts, 8)
