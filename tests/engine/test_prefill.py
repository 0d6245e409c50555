"""The layer-by-layer prefill (kvjax/prefill.py): the same numbers as a chunk-major prefill over all layers (the
previous structure, written here as the oracle), hidden states on host, dense capture, per-platform attention
kernels in the lowered programs, and compiled memory that no longer holds every layer's dense K/V."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import kvjax
from kvjax import prefill as pf
from kvjax.cache import KVCache
from kvjax.memory import stage_memory
from kvjax.policies import make_policy
from models import LoadedModel, ModelConfig, Transformer
from models.transformer import embed_tokens, logits_from_hidden, rope_tables, run_layers_carry
from test_engine import prompts, tiny


def chunk_major_prefill(params, cfg, tokens, lengths, chunk):
    """Oracle: the prompt in chunks, ALL layers per chunk (``run_layers_carry``), writing every layer's dense
    post-RoPE K/V ``[L, B, Hkv, Tb, D]``; attention of a chunk over its layer's keys so far."""
    B, Tb = tokens.shape
    shape = (cfg.num_layers, B, cfg.num_kv_heads, Tb, cfg.head_dim)
    kv = KVCache(jnp.zeros(shape, params["embed"].dtype), jnp.zeros(shape, params["embed"].dtype))
    last = jnp.zeros((B, cfg.hidden_size), params["embed"].dtype)
    for c in range(Tb // chunk):
        start = c * chunk
        pos = jnp.broadcast_to(start + jnp.arange(chunk, dtype=jnp.int32), (B, chunk))

        def attend(st, layer, q, k_pre, k, v, hn):
            kc = st.k.at[layer, :, :, start:start + chunk].set(k.transpose(0, 2, 1, 3))
            vc = st.v.at[layer, :, :, start:start + chunk].set(v.transpose(0, 2, 1, 3))
            out = pf.block_causal_attention(q, kc[layer], vc[layer], pos, lengths, jnp.int32(start))
            return out, KVCache(kc, vc)

        x, kv = run_layers_carry(params, cfg, embed_tokens(params, tokens[:, start:start + chunk]), pos, kv, attend)
        idx = lengths - 1 - start
        inside = (idx >= 0) & (idx < chunk)
        h = jnp.take_along_axis(x, jnp.clip(idx, 0, chunk - 1)[:, None, None], axis=1)[:, 0]
        last = jnp.where(inside[:, None], h, last)
    return logits_from_hidden(params, cfg, last), kv


@pytest.mark.parametrize("family", ["llama", "qwen3"])
@pytest.mark.parametrize("offload_hidden", [False, True])
def test_layer_major_prefill_equals_chunk_major(family, offload_hidden):
    lm = tiny(family)
    eng = kvjax.Engine(lm, prefill_chunk=16, min_prompt_bucket=16, offload_hidden=offload_hidden)
    ps = prompts(2, [37, 21])
    toks, lens, _ = eng.prepare(ps, 8)
    logits, kv = eng.dense_prefill(toks, lens)
    ref_logits, ref = jax.jit(lambda p, t, l: chunk_major_prefill(p, lm.config, t, l, 16))(
        eng.params, jnp.asarray(toks), jnp.asarray(lens))
    for b, n in enumerate(lens):  # the prompt's rows; chunks wholly in the padding are skipped (left zero)
        np.testing.assert_allclose(np.asarray(kv.k)[:, b, :, :n], np.asarray(ref.k)[:, b, :, :n], rtol=0, atol=1e-5)
        np.testing.assert_allclose(np.asarray(kv.v)[:, b, :, :n], np.asarray(ref.v)[:, b, :, :n], rtol=0, atol=1e-5)
    assert toks.shape[1] - max(lens) >= 16 and not np.asarray(kv.k)[:, :, :, -16:].any()
    np.testing.assert_allclose(np.asarray(logits), np.asarray(ref_logits), rtol=0, atol=1e-5)


def test_policy_states_equal_a_build_from_the_dense_cache():
    """Building inside the layer scan == building afterwards from the dense K/V (what kvjax did before)."""
    lm = tiny()
    eng = kvjax.Engine(lm, prefill_chunk=16, min_prompt_bucket=16)
    ps = prompts(2, [37, 21])
    toks, lens, _ = eng.prepare(ps, 8)
    _, kv = eng.dense_prefill(toks, lens)
    for pol in (make_policy("full"), make_policy("yakv", min_seqlen_to_prune=0, local_budget=4, sparse_budget=4),
                make_policy("arkvale", min_seqlen_to_prune=0, page_size=4)):
        _, (st,) = eng.prefill(toks, lens, 64, (pol,))
        after = eng.with_policy(pol).build(kv, lens, 64)
        for a, b in zip(jax.tree.leaves(st), jax.tree.leaves(after)):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
            assert a.sharding.memory_kind == b.sharding.memory_kind


def test_several_policies_from_one_prefill_equal_separate_prefills():
    lm = tiny()
    eng = kvjax.Engine(lm, prefill_chunk=16, min_prompt_bucket=16)
    ps = prompts(2, [37, 21])
    pols = [make_policy("full"), make_policy("yakv", min_seqlen_to_prune=0, local_budget=4, sparse_budget=4)]
    together = eng.start(ps, 8, policies=pols)
    for pol, sess in zip(pols, together):
        alone = eng.with_policy(pol).start(ps, 8)
        for a, b in zip(jax.tree.leaves(sess.state), jax.tree.leaves(alone.state)):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_prefill_lowers_to_the_platform_attention_kernels(monkeypatch):
    """TPU: the Pallas flash-attention kernel (a Mosaic custom call); CUDA: cuDNN flash attention (its version check
    stubbed, since this CPU jaxlib has no cuDNN). CPU keeps the jnp block-causal loop."""
    cfg = ModelConfig(family="llama", vocab_size=97, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4,
                      num_kv_heads=2, head_dim=64, max_position_embeddings=1024)
    params = {k: jax.ShapeDtypeStruct(v.shape, jnp.bfloat16)
              for k, v in Transformer(cfg, dtype=jnp.bfloat16, rngs=nnx.Rngs(0)).params().items()}
    full = make_policy("full")
    fn = jax.jit(lambda p, t, l: pf.prefill(p, cfg, (full,), t, l, (None,), max_new=64, chunk=128))
    args = (params, jax.ShapeDtypeStruct((1, 256), jnp.int32), jax.ShapeDtypeStruct((1,), jnp.int32))
    tpu = fn.trace(*args).lower(lowering_platforms=("tpu",)).as_text()
    assert "tpu_custom_call" in tpu
    cpu = fn.trace(*args).lower(lowering_platforms=("cpu",)).as_text()
    assert "tpu_custom_call" not in cpu and "cudnn" not in cpu
    from jax._src.cudnn import fused_attention_stablehlo as fas

    monkeypatch.setattr(fas, "check_cudnn_version", lambda: 90500)
    monkeypatch.setattr(fas, "check_compute_capability", lambda c: True)
    monkeypatch.setattr(fas, "is_cuda_compute_capability_equal", lambda c: False)
    fn2 = jax.jit(lambda p, t, l: pf.prefill(p, cfg, (full,), t, l, (None,), max_new=64, chunk=128))
    cuda = fn2.trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    assert "__cudnn$fmha" in cuda


def test_prefill_memory_does_not_hold_every_layers_kv():
    """Compiled memory (no allocation): with 16 layers the dense K/V of all layers is 16x one layer's; the YAKV
    prefill's device peak stays far below it, full attention's (whose state IS that cache) does not. (YAKV's
    quantizer keeps a fixed ~40 MB of search scratch whatever the prompt, hence the long prompt.)"""
    cfg = ModelConfig(family="llama", vocab_size=97, hidden_size=64, intermediate_size=96, num_layers=16,
                      num_heads=4, num_kv_heads=4, head_dim=16, max_position_embeddings=131072)
    T = 65536
    all_layers_kv = 2 * cfg.num_layers * cfg.num_kv_heads * T * cfg.head_dim * 4  # float32 K and V
    full = stage_memory(cfg, make_policy("full"), T, 1, "float32")["prefill"]
    yk = stage_memory(cfg, make_policy("yakv"), T, 1, "float32")["prefill"]
    assert full.peak_device_bytes >= all_layers_kv
    assert yk.peak_device_bytes < all_layers_kv / 2
    assert yk.host_bytes >= all_layers_kv  # the offloaded stores went to host memory
