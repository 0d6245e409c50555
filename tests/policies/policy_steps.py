"""Shared test helpers for the baseline policies: run the engine's stages step by step, lower a step for TPU."""
import jax
import jax.numpy as jnp
import numpy as np


def run_steps(eng, prompts, steps=5, max_new=64):
    """Greedy decode with the engine's stages; returns (tokens [B, steps+1], logits [B, steps+1, V], state)."""
    toks, lengths, _ = eng.prepare(prompts, max_new)
    logits, kv = eng.prefill(toks, lengths)
    state = eng.build(kv, lengths, max_new)
    step = eng.step_fn(state)
    cur = np.asarray(jnp.argmax(logits, -1))
    out, lg = [cur], [np.asarray(logits)]
    for i in range(steps):
        nxt, logits, state = step(eng.params, state, eng._put(cur), eng._put(lengths + i), jax.random.key(0),
                                  jnp.float32(0), jnp.int32(0), jnp.float32(1))
        cur = np.asarray(nxt)
        out.append(cur)
        lg.append(np.asarray(logits))
    return np.stack(out, 1), np.stack(lg, 1), state


def lower_step_for_tpu(eng, state):
    """StableHLO text of the whole jitted decode step lowered for TPU (runs on CPU: a structural check)."""
    from kvjax.engine import _step_and_sample

    pol, cfg = eng.policy, eng.cfg
    fn = jax.jit(lambda params, st_, tok, pos: _step_and_sample(params, cfg, pol, st_, tok, pos, jax.random.key(0),
                                                                 jnp.float32(0), jnp.int32(0), jnp.float32(1)))
    B = state.lengths.shape[1]
    return fn.trace(eng.params, state, jnp.zeros((B,), jnp.int32), state.lengths[0]).lower(
        lowering_platforms=("tpu",)).as_text()


def smollm2_greedy_vs_full(policy) -> tuple[list, list]:
    """(policy's, full attention's) greedy token ids on SmolLM2-135M for two prompts (one long, one short),
    12 new tokens each: the real-model check that a whole-prompt budget reproduces full attention."""
    import kvjax
    import models

    lm = models.load_model("smollm2-135m", dtype="float32")
    eng = kvjax.Engine(lm, policy="full")
    prompts = [eng.encode("Summarise in one sentence: the quick brown fox jumps over the lazy dog. " * 12),
               eng.encode("Name three prime numbers and explain why they are prime.")]
    gen = kvjax.GenerationConfig(max_new_tokens=12, stop_ids=())
    ref = [o.ids for o in eng.generate(prompts, gen)]
    return [o.ids for o in eng.with_policy(policy).generate(prompts, gen)], ref
