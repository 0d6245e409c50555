"""YAKV with fetch_backend="dma": the whole decode step lowered for TPU carries the DMA kernel and keeps its stores
in pinned_host with no host compute; on CPU (where "dma" lowers to host_gather) it decodes the same tokens."""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import kvjax
import models
from models import ModelConfig

TINY = ModelConfig(family="llama", vocab_size=128, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=8,
                   num_kv_heads=4, head_dim=16, rope_theta=10000.0, rms_norm_eps=1e-5, tie_word_embeddings=True,
                   max_position_embeddings=4096, bos_token_id=1, eos_token_ids=(2,))
PROMPTS = [list(np.random.RandomState(0).randint(3, 128, n)) for n in (300, 200)]


@pytest.fixture(scope="module")
def tiny_lm():
    return models.LoadedModel(TINY, models.Transformer(TINY, dtype=jnp.float32, rngs=nnx.Rngs(0)), None)


@pytest.fixture(scope="module")
def built(tiny_lm):
    """An engine and the built state of the two prompts (the state layout does not depend on the fetch backend)."""
    eng = kvjax.Engine(tiny_lm, kvjax.make_policy("yakv", fetch_backend="dma", min_seqlen_to_prune=0))
    toks, lengths, _ = eng.prepare(PROMPTS, 8)
    _, kv = eng.dense_prefill(toks, lengths)
    return eng, eng.build(kv, lengths, 8), lengths


def _lowered(built, backend):
    """The engine's jitted decode step program lowered for TPU."""
    eng, st, lengths = built
    eng = eng.with_policy(kvjax.make_policy("yakv", fetch_backend=backend, min_seqlen_to_prune=0))
    args = (eng.params, st, jnp.zeros(len(lengths), jnp.int32), jnp.asarray(lengths), kvjax.Sampler.of(), None)
    return eng.step_program(st).trace(*args).lower(lowering_platforms=("tpu",)).as_text()


def test_tpu_step_has_the_dma_kernel_and_host_stores(built):
    txt = _lowered(built, "dma")
    st = built[1]
    assert txt.count('kernel_name = "kvjax_fetch_rows_dma"') >= 2      # keys and values (in the layer scan body)
    main = next(line for line in txt.splitlines() if "func.func public @main" in line)
    sig, results = main.split("->", 1)
    store = "x".join(map(str, st.k_store.shape))
    assert re.findall(r"%arg\d+: tensor<([0-9x]+)xf32> \{[^}]*pinned_host", sig) == [store, store]
    assert results.count("pinned_host") == 2                             # the stores stay host-resident
    assert "_xla_compute_type" not in txt                               # no host-compute gather left
    gather_txt = _lowered(built, "host_gather")
    assert "kvjax_fetch_rows_dma" not in gather_txt and '_xla_compute_type = "host"' in gather_txt


@pytest.mark.slow
def test_cpu_tokens_equal_host_gather(tiny_lm):
    gen = kvjax.GenerationConfig(max_new_tokens=4, stop_ids=())
    out = {b: [g.ids for g in kvjax.Engine(tiny_lm, kvjax.make_policy("yakv", fetch_backend=b, min_seqlen_to_prune=0)).generate(PROMPTS, gen)]
           for b in ("host_gather", "dma", "auto")}
    assert out["dma"] == out["host_gather"] == out["auto"]
