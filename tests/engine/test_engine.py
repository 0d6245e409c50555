"""Engine: chunked prefill + step decode == full forward, ragged batches, sharding, compile counts, bad input."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import models
from kvjax import Engine, GenerationConfig, SamplingConfig
from kvjax.compat import make_mesh
from models import LoadedModel, ModelConfig, Transformer


def tiny(family="llama", **kw):
    base = dict(family=family, vocab_size=97, hidden_size=64, intermediate_size=96, num_layers=3, num_heads=8,
                num_kv_heads=4, head_dim=16, rope_theta=10000.0, max_position_embeddings=512,
                qk_norm=(family == "qwen3"), tie_word_embeddings=(family == "qwen3"))
    base.update(kw)
    cfg = ModelConfig(**base)
    m = Transformer(cfg, dtype=jnp.float32, rngs=nnx.Rngs(1))
    # random (non-unit) norm scales so q/k-norm and RMSNorm mistakes show
    p = m.params()
    key = jax.random.key(2)
    for name in [n for n in p if n.endswith("norm")]:
        key, sub = jax.random.split(key)
        p[name] = jax.random.uniform(sub, p[name].shape, jnp.float32, 0.5, 1.5)
    m.set_params(p)
    return LoadedModel(cfg, m, None)


def prompts(n, lens, vocab=97, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, vocab, size=l).tolist() for l in lens][:n]


@pytest.mark.parametrize("family", ["llama", "qwen3"])
@pytest.mark.parametrize("chunk", [16, 64])
def test_prefill_then_decode_equals_full_forward(family, chunk):
    lm = tiny(family)
    eng = Engine(lm, prefill_chunk=chunk, min_prompt_bucket=16)
    ps = prompts(2, [37, 21])
    sess = eng.start(ps, 8)
    lens = sess.lengths
    seqs = [list(p) for p in ps]
    step_logits = [np.asarray(sess.first_logits)]
    cur = np.asarray(sess.first_logits).argmax(-1)
    for i in range(6):
        for b in range(2):
            seqs[b].append(int(cur[b]))
        lg = sess.step(cur).logits
        step_logits.append(np.asarray(lg))
        cur = np.asarray(lg).argmax(-1)
    for b in range(2):
        full = np.asarray(models.forward_logits(lm.model, np.array([seqs[b]])))[0]
        for i, lg in enumerate(step_logits[:-1]):
            np.testing.assert_allclose(lg[b], full[lens[b] - 1 + i], atol=2e-4, rtol=1e-4)


def test_ragged_batch_equals_single_runs():
    lm = tiny()
    eng = Engine(lm, min_prompt_bucket=16)
    ps = prompts(3, [5, 40, 23])
    gen = GenerationConfig(max_new_tokens=10, stop_ids=())
    batch = eng.generate(ps, gen)
    for b, p in enumerate(ps):
        assert eng.generate([p], gen)[0].ids == batch[b].ids


def test_sharded_mesh_gives_same_tokens():
    lm = tiny()
    ps = prompts(2, [30, 19])
    gen = GenerationConfig(max_new_tokens=12, stop_ids=())
    ref = [g.ids for g in Engine(lm).generate(ps, gen)]
    mesh = make_mesh(data=2, model=4)
    eng = Engine(lm, mesh=mesh)
    out = eng.generate(ps, gen)
    assert [g.ids for g in out] == ref
    kshard = eng.last_state.k.sharding
    assert kshard.spec[1] == "data" and kshard.spec[2] == "model" and len(kshard.device_set) == 8


def test_decode_compiles_once_per_bucket():
    lm = tiny()
    eng = Engine(lm, min_prompt_bucket=64)
    gen = GenerationConfig(max_new_tokens=20, stop_ids=())
    eng.generate(prompts(1, [30]), gen)
    eng.generate(prompts(1, [45], seed=1), GenerationConfig(max_new_tokens=33, stop_ids=()))  # same buckets
    assert eng.compile_counts() == {"prefill": 1, "build": 0, "step": 0, "loop": 1}
    # sampling settings are traced values: no recompilation either, in the device loop or the host loop
    eng.generate(prompts(1, [30]), GenerationConfig(max_new_tokens=20, sampling=SamplingConfig(0.8, 5, 0.9)))
    eng.generate(prompts(1, [30]), gen, loop="host")
    eng.generate(prompts(1, [41]), GenerationConfig(max_new_tokens=9, sampling=SamplingConfig(0.8, 5, 0.9)),
                 loop="host")
    assert eng.compile_counts() == {"prefill": 1, "build": 0, "step": 1, "loop": 1}


def test_stop_ids_and_length():
    lm = tiny()
    eng = Engine(lm)
    p = prompts(1, [12])
    free = eng.generate(p, GenerationConfig(max_new_tokens=8, stop_ids=()))[0]
    assert len(free.ids) == 8 and free.stop_reason == "length"
    stop_tok = free.ids[3]
    first = free.ids.index(stop_tok)
    stopped = eng.generate(p, GenerationConfig(max_new_tokens=8, stop_ids=(stop_tok,)))[0]
    assert stopped.ids == free.ids[:first] and stopped.stop_reason == "stop_id"


def test_sampling_is_seeded_and_differs_from_greedy():
    lm = tiny()
    eng = Engine(lm)
    p = prompts(1, [12])
    s = SamplingConfig(temperature=1.5)
    a = eng.generate(p, GenerationConfig(max_new_tokens=16, sampling=s, stop_ids=(), seed=3))[0].ids
    b = eng.generate(p, GenerationConfig(max_new_tokens=16, sampling=s, stop_ids=(), seed=3))[0].ids
    c = eng.generate(p, GenerationConfig(max_new_tokens=16, sampling=s, stop_ids=(), seed=4))[0].ids
    g = eng.generate(p, GenerationConfig(max_new_tokens=16, stop_ids=()))[0].ids
    assert a == b and a != c and a != g


@pytest.mark.parametrize("bad", [dict(temperature=-1.0), dict(top_k=-2), dict(top_p=0.0), dict(top_p=1.5)])
def test_invalid_sampling_parameters(bad):
    with pytest.raises(ValueError, match=list(bad)[0]):
        SamplingConfig(**bad)


def test_bad_prompts():
    lm = tiny(max_position_embeddings=64)
    eng = Engine(lm)
    with pytest.raises(ValueError, match="longer than the model's context of 64 tokens"):
        eng.generate(prompts(1, [80]), GenerationConfig(max_new_tokens=4))
    with pytest.raises(ValueError, match="exceeds the model's context"):
        eng.generate(prompts(1, [60]), GenerationConfig(max_new_tokens=10))
    with pytest.raises(ValueError, match="empty"):
        eng.generate([[]], GenerationConfig(max_new_tokens=4))
    with pytest.raises(ValueError, match="outside"):
        eng.generate([[1, 2, 500]], GenerationConfig(max_new_tokens=4))
    with pytest.raises(ValueError, match="max_new_tokens"):
        GenerationConfig(max_new_tokens=0)
    with pytest.raises(ValueError, match="not divisible by the mesh's data axis"):
        Engine(lm, mesh=make_mesh(data=2, model=1)).generate(prompts(3, [5, 5, 5]), GenerationConfig(max_new_tokens=2))


@pytest.mark.parametrize("sampling", [SamplingConfig(), SamplingConfig(temperature=0.9, top_k=20, top_p=0.9)])
def test_device_loop_gives_the_host_loops_tokens(sampling):
    """The whole generation as one while_loop on the device == the Python loop over single steps (ragged batch,
    stop ids, sampling with the same keys)."""
    lm = tiny()
    eng = Engine(lm, min_prompt_bucket=16)
    ps = prompts(3, [5, 40, 23])
    free = eng.generate(ps, GenerationConfig(max_new_tokens=12, stop_ids=(), sampling=sampling, seed=2))
    stop = free[1].ids[4]  # a token sequence 1 produces: it stops there, the others maybe elsewhere
    gen = GenerationConfig(max_new_tokens=12, stop_ids=(stop,), sampling=sampling, seed=2)
    dev, host = eng.generate(ps, gen), eng.generate(ps, gen, loop="host")
    assert [g.ids for g in dev] == [g.ids for g in host]
    assert [g.stop_reason for g in dev] == [g.stop_reason for g in host]
    assert dev[1].stop_reason == "stop_id" and dev[1].ids == free[1].ids[:free[1].ids.index(stop)]


def test_loop_choice_and_errors():
    lm = tiny()
    eng = Engine(lm, min_prompt_bucket=16)
    with pytest.raises(ValueError, match="loop="):
        eng.generate(prompts(1, [5]), GenerationConfig(max_new_tokens=2), loop="gpu")
    with pytest.raises(ValueError, match="need loop='host'"):
        eng.generate(prompts(1, [5]), GenerationConfig(max_new_tokens=2, stop_strings=("x",)), loop="device")


def test_session_fork_and_teacher_forcing():
    """A fork continues independently: stepping the fork with other tokens leaves the original's logits as if the
    fork never happened (the shared state is not donated)."""
    lm = tiny()
    eng = Engine(lm, min_prompt_bucket=16)
    ps = prompts(2, [20, 11])
    a = eng.start(ps, 8)
    ref = eng.start(ps, 8)
    toks = [np.array([3, 4]), np.array([5, 6]), np.array([7, 8])]
    a.step(toks[0])
    ref.step(toks[0])
    b = a.fork()
    b.step(np.array([9, 9]))
    b.step(np.array([1, 2]))
    for t in toks[1:]:
        np.testing.assert_array_equal(np.asarray(a.step(t).logits), np.asarray(ref.step(t).logits))
    assert (a.pos == ref.pos).all() and (b.pos == a.pos).all()


@pytest.mark.parametrize("order", [("full", "yakv"), ("yakv", "full")])
def test_sessions_say_which_policy_fell_back_to_full(order):
    """One prefill for full and for a policy that cannot prune the prompt (shorter than min_seqlen_to_prune): both
    sessions run full attention, and only the fallen-back one says so, in either order of the policies."""
    eng = Engine(tiny(), min_prompt_bucket=16)
    sessions = eng.start(prompts(1, [20]), 8, policies=list(order))
    assert [s.exact for s in sessions] == [name == "yakv" for name in order]
    assert all(s.policy.name == "full" for s in sessions)


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_per_layer_decode_equals_the_stacked_layer_scan(family):
    """The CPU decode path (each layer's matmuls on its own weight buffers, picked by lax.switch) gives the logits
    and tokens of the layer-stacked scan the accelerators run, for full attention and a pruning policy."""
    from kvjax import make_policy

    lm = tiny(family)
    ps = prompts(2, [37, 21])
    gen = GenerationConfig(max_new_tokens=8, stop_ids=())
    for pol in ["full", make_policy("yakv", min_seqlen_to_prune=0, sparse_budget=4, local_budget=4)]:
        runs = []
        for per_layer in (True, False):
            eng = Engine(lm, pol, min_prompt_bucket=16, prefill_chunk=16, per_layer_decode=per_layer)
            assert eng.per_layer_decode is per_layer
            sess = eng.start(ps, 8)
            steps = [np.asarray(sess.step([3, 5]).logits) for _ in range(3)]
            runs.append((steps, [g.ids for g in eng.generate(ps, gen)]))
        (lg_a, ids_a), (lg_b, ids_b) = runs
        np.testing.assert_allclose(np.stack(lg_a), np.stack(lg_b), rtol=0, atol=1e-5)
        assert ids_a == ids_b
