"""YAKV in the engine: device memory per prompt token, host placement in the TPU lowering, one compile per bucket,
and the same tokens on an 8-device mesh as on one device."""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import kvjax
import models
from kvjax import compat
from kvjax.cache import KVCache
from models import ModelConfig
from models.config import PRESETS

TINY = ModelConfig(family="llama", vocab_size=128, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=8,
                   num_kv_heads=4, head_dim=16, rope_theta=10000.0, rms_norm_eps=1e-5, tie_word_embeddings=True,
                   max_position_embeddings=4096, bos_token_id=1, eos_token_ids=(2,))


@pytest.fixture(scope="module")
def tiny_lm():
    return models.LoadedModel(TINY, models.Transformer(TINY, dtype=jnp.float32, rngs=nnx.Rngs(0)), None)


@pytest.fixture(scope="module")
def yakv_run(tiny_lm):
    """Default (paper eval) YAKV on a ragged batch of two prompts; the engine keeps its compiled functions."""
    rng = np.random.RandomState(0)
    prompts = [list(rng.randint(3, 128, n)) for n in (300, 200)]
    eng = kvjax.Engine(tiny_lm, kvjax.make_policy("yakv", min_seqlen_to_prune=0))
    out = eng.generate(prompts, kvjax.GenerationConfig(max_new_tokens=6, stop_ids=()))
    return eng, prompts, [g.ids for g in out]


def test_memory_per_prompt_token_at_paper_defaults():
    """SmolLM2-135M-shaped layers (3 KV heads x 64 dims, bf16) at 4096 prompt tokens: device bytes per prompt token
    of the buffers that grow with the prompt (2-bit landmarks + fp32 per-head scales) <= 1/12 of full attention's
    bf16 K+V; the offloaded store is in pinned_host memory."""
    cfg = PRESETS["smollm2-135m"].replace(num_layers=1, vocab_size=256)
    lm = models.LoadedModel(cfg, models.Transformer(cfg, dtype=jnp.bfloat16, rngs=nnx.Rngs(0)), None)
    eng = kvjax.Engine(lm, "yakv")
    T = 4096
    rng = np.random.RandomState(0)
    shape = (cfg.num_layers, 1, cfg.num_kv_heads, T, cfg.head_dim)
    kv = KVCache(jnp.asarray(rng.randn(*shape), jnp.bfloat16), jnp.asarray(rng.randn(*shape), jnp.bfloat16))
    lengths = np.array([T], np.int32)
    st = eng.build(kv, lengths, 64)
    rep = eng.memory_report(st, lengths)
    full_bytes_per_token = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * 2
    dev = rep["per_prompt_token_variable"]["device"]
    assert dev <= full_bytes_per_token / 12, (dev, full_bytes_per_token)
    # independent count: (T - 64) landmarks x (C/4 one-byte codes + Hkv fp32 scales) per layer
    C = cfg.num_kv_heads * cfg.head_dim
    assert dev == pytest.approx((T - 64) * (C // 4 + 4 * cfg.num_kv_heads) * cfg.num_layers / T)
    comps = rep["components"]
    assert comps["k_store"]["kind"] == comps["v_store"]["kind"] == "pinned_host"
    assert comps["lm_codes"]["kind"] == "device" and not comps["lm_codes"]["fixed"]
    assert comps["win_k"]["fixed"] and comps["gen"]["fixed"]


def test_no_recompiles_across_steps_and_lengths(yakv_run):
    """Decode compiles once per (batch, prompt bucket, generation bucket): more steps and other prompt lengths in
    the same bucket reuse the same executable."""
    eng, _, _ = yakv_run
    counts = eng.compile_counts()
    assert counts["loop"] == 1 and counts["prefill"] == 1
    rng = np.random.RandomState(1)
    prompts = [list(rng.randint(3, 128, n)) for n in (400, 257)]  # same 512 bucket, other lengths and budgets
    eng.generate(prompts, kvjax.GenerationConfig(max_new_tokens=9, stop_ids=()))
    assert eng.compile_counts() == counts


def test_tpu_lowering_keeps_host_placement(yakv_run):
    """The whole jitted decode step lowered for TPU from CPU: the K/V stores are pinned_host parameters and results,
    the selected rows are DMA'd from them to the device."""
    eng, prompts, _ = yakv_run
    st = eng.last_state
    args = (eng.params, st, jnp.zeros(2, jnp.int32), jnp.asarray(eng.last_session.lengths), kvjax.Sampler.of(),
            None)
    txt = eng.step_program(st).trace(*args).lower(lowering_platforms=("tpu",)).as_text()
    main = next(line for line in txt.splitlines() if "func.func public @main" in line)
    sig, results = main.split("->", 1)
    store_shape = "x".join(map(str, st.k_store.shape))
    host_args = re.findall(r"%arg\d+: tensor<([0-9x]+)xf32> \{[^}]*pinned_host", sig)
    assert host_args == [store_shape, store_shape]
    assert results.count("pinned_host") == 2
    # the default fetch backend "auto" on TPU: the selected rows come by the Pallas DMA kernel, no host compute
    assert txt.count('kernel_name = "kvjax_fetch_rows_dma"') >= 2 and "_xla_compute_type" not in txt


def test_mesh_gives_same_tokens(tiny_lm, yakv_run):
    """8 forced CPU devices, data=2 x model=4 (4 KV heads): the same greedy tokens as one device, and the stores
    stay in pinned_host sharded over batch and KV heads."""
    _, prompts, ref = yakv_run
    mesh = compat.make_mesh(data=2, model=4)
    eng = kvjax.Engine(tiny_lm, kvjax.make_policy("yakv", min_seqlen_to_prune=0), mesh=mesh)
    out = eng.generate(prompts, kvjax.GenerationConfig(max_new_tokens=6, stop_ids=()))
    assert [g.ids for g in out] == ref
    st = eng.last_state
    assert st.k_store.sharding.memory_kind == "pinned_host"
    assert tuple(st.k_store.sharding.spec)[:3] == (None, "data", "model")
