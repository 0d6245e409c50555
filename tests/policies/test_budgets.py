"""Equal-memory budgets: every policy ends up with the same device bytes, measured on real built states."""
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import kvjax
import models
from kvjax.budgets import abstract_state, device_bytes, equal_memory_budgets, memory_report_for
from kvjax.policies import make_policy
from models import ModelConfig

# head_dim 64 with LRQK's Llama rank 16 (as SmolLM2): with a tiny head dim the rank is clipped to D and LRQK's
# A_K alone would be as large as the whole KV cache, leaving no common allowance
TINY = ModelConfig(family="llama", vocab_size=97, hidden_size=64, intermediate_size=128, num_layers=3, num_heads=4,
                   num_kv_heads=2, head_dim=64, max_position_embeddings=4096)
NAMES = ["arkvale", "quest", "infinigen", "lrqk"]
PROMPT = 1000  # tokens (bucket 1024)
MAX_NEW = 64


def _min_per_token():
    """Smallest device bytes per prompt token of each policy (budget knob at 0)."""
    out = {}
    for name in NAMES:
        knob = "num_active" if name == "lrqk" else "budget"
        pol = make_policy(name, **{knob: 0.0})
        out[name] = device_bytes(pol, TINY, PROMPT, max_new=MAX_NEW, dtype=jnp.float32) / PROMPT
    return out


@pytest.fixture(scope="module")
def plan():
    allowance = 1.3 * max(_min_per_token().values())
    return equal_memory_budgets(TINY, NAMES, PROMPT, bytes_per_token=allowance, max_new=MAX_NEW, dtype=jnp.float32)


def test_equal_memory_budgets_spend_the_same_device_bytes(plan):
    assert set(plan.policies) == set(NAMES)
    for name, b in plan.device_bytes.items():
        assert b <= plan.target_bytes, name
        assert b >= 0.95 * plan.target_bytes, (name, b, plan.target_bytes)
    assert plan.spread() <= 0.05
    # the knobs really moved: every policy spends more than its minimum
    mins = _min_per_token()
    for name, b in plan.device_bytes.items():
        assert b > mins[name] * PROMPT, name
    # and they differ between policies (different per-token costs of the selected rows)
    assert len({round(v[1], 6) for v in plan.knobs.values()}) > 1


def test_planned_bytes_are_what_the_engine_builds(plan):
    """memory_report of the states the engine really builds equals the eval_shape figure (and so the plan)."""
    lm = models.LoadedModel(TINY, models.Transformer(TINY, dtype=jnp.float32, rngs=nnx.Rngs(0)), None)
    prompt = list(np.random.default_rng(0).integers(0, TINY.vocab_size, PROMPT))
    eng = kvjax.Engine(lm, policy="full")
    toks, lengths, _ = eng.prepare([prompt], MAX_NEW)
    real = {}
    for name, pol in plan.policies.items():
        if name == "infinigen":
            pol = type(pol)(pol.config.__class__(**{**pol.config.__dict__, "calibration_len": 32}))
        e = eng.with_policy(pol)
        _, kv = e.dense_prefill(toks, lengths, queries=True)  # LRQK builds from the queries too
        state = e.build(kv, lengths, 64)
        real[name] = e.memory_report(state, lengths)["by_kind"]["device"]
        assert real[name] == plan.device_bytes[name], name
    v = list(real.values())
    assert (max(v) - min(v)) / max(v) <= 0.05


def test_abstract_state_has_the_memory_kinds():
    st = abstract_state(make_policy("arkvale"), TINY, 300, max_new=10, dtype=jnp.float32)
    assert st.kv_store.sharding.memory_kind == "pinned_host"
    assert st.dmin.sharding.memory_kind == "device"
    assert st.kv_store.shape == (3, 1, 2, 512, 2, 64)
    rep = memory_report_for(make_policy("arkvale", fetch_backend="device"), TINY, 300, dtype=jnp.float32)
    assert "pinned_host" not in rep["by_kind"]
    # infinigen: the copy of W_q is not counted as policy memory
    rep = memory_report_for(make_policy("infinigen"), TINY, 300, dtype=jnp.float32)
    assert "wq" not in rep["components"] and rep["excluded"]["wq"] == 3 * 64 * 4 * 64 * 4


def test_total_allowance_matches_per_token_allowance(plan):
    per_tok = plan.target_bytes / PROMPT
    other = equal_memory_budgets(TINY, ["arkvale", "lrqk"], PROMPT, total_bytes=plan.target_bytes, max_new=MAX_NEW,
                                 dtype=jnp.float32)
    assert other.device_bytes == {k: plan.device_bytes[k] for k in ("arkvale", "lrqk")}
    assert other.target_bytes == int(per_tok * PROMPT)


def test_errors():
    with pytest.raises(ValueError, match="exactly one"):
        equal_memory_budgets(TINY, ["arkvale"], PROMPT)
    with pytest.raises(ValueError, match="exactly one"):
        equal_memory_budgets(TINY, ["arkvale"], PROMPT, bytes_per_token=10, total_bytes=10)
    with pytest.raises(ValueError, match="'lrqk' needs at least"):
        equal_memory_budgets(TINY, ["lrqk"], PROMPT, bytes_per_token=1.0, dtype=jnp.float32)
    with pytest.raises(ValueError, match="'arkvale' keeps at most"):
        equal_memory_budgets(TINY, ["arkvale"], PROMPT, bytes_per_token=1e6, dtype=jnp.float32)
    lax = equal_memory_budgets(TINY, ["arkvale"], PROMPT, bytes_per_token=1e6, dtype=jnp.float32, strict=False)
    # the largest budget that still prunes this prompt (a larger one decodes exactly: full attention)
    knob, x = lax.knobs["arkvale"]
    assert knob == "budget" and 0.5 < x < 1.0
    assert make_policy("arkvale", budget=x).prunable(TINY, [PROMPT]).all()
    assert not make_policy("arkvale", budget=min(1.0, x + 0.01)).prunable(TINY, [PROMPT]).any()
    with pytest.raises(ValueError, match="no budget knob"):
        equal_memory_budgets(TINY, ["full"], PROMPT, bytes_per_token=1e6)
