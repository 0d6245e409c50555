"""Shared test helpers for the policies: run the engine's session step by step, lower a step for TPU."""
import jax
import jax.numpy as jnp
import numpy as np

from kvjax.decode import decode_step


def run_steps(eng, prompts, steps=5, max_new=64):
    """Greedy decode through :class:`kvjax.engine.Session`; returns (tokens [B, steps+1], logits [B, steps+1, V],
    the final state)."""
    sess = eng.start(prompts, max_new)
    logits = sess.first_logits
    cur = np.asarray(jnp.argmax(logits, -1))
    out, lg = [cur], [np.asarray(logits)]
    for _ in range(steps):
        o = sess.step(cur)
        cur = np.asarray(o.tokens)
        out.append(cur)
        lg.append(np.asarray(o.logits))
    return np.stack(out, 1), np.stack(lg, 1), sess.state


def tiny_setup(cfg, lens, steps):
    """(full-attention engine of a seed-0 random model of ``cfg``, seed-0 random prompts of ``lens`` tokens,
    :func:`run_steps` of full attention on them): the shared start of the policy tests on tiny models."""
    import kvjax
    import models
    from flax import nnx

    lm = models.LoadedModel(cfg, models.Transformer(cfg, dtype=jnp.float32, rngs=nnx.Rngs(0)), None)
    rng = np.random.default_rng(0)
    prompts = [list(rng.integers(0, cfg.vocab_size, n)) for n in lens]
    eng = kvjax.Engine(lm, policy="full")
    return eng, prompts, run_steps(eng, prompts, steps=steps)


def own(eng, policy):
    """An engine on the same model that runs ``policy``'s own machinery even on prompts it would not prune
    (``exact_fallback=False``): the tests of selection and whole-prompt budgets use it."""
    import kvjax

    return kvjax.Engine(eng.lm, policy=policy, mesh=eng.mesh, prefill_chunk=eng.prefill_chunk,
                        min_prompt_bucket=eng.min_prompt_bucket, exact_fallback=False)


def lower_step_for_tpu(eng, state):
    """StableHLO text of the whole jitted decode step lowered for TPU (runs on CPU: a structural check)."""
    pol, cfg = eng.policy, eng.cfg
    fn = jax.jit(lambda params, st_, tok, pos: decode_step(params, cfg, pol, st_, tok, pos)[:2])
    lengths = jax.tree.leaves(state)[0].shape[1]
    return fn.trace(eng.params, state, jnp.zeros((lengths,), jnp.int32), jnp.zeros((lengths,), jnp.int32)).lower(
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
    return [o.ids for o in own(eng, policy).generate(prompts, gen)], ref
