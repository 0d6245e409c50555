"""Fidelity to full attention: teacher-forced logit comparison and attention recall.

For one prompt, ``full`` (exact attention) first generates greedily; its tokens ``r_0 … r_{n-1}`` (the stop token
included when it stopped on one) are the *reference*. Every other method then runs on the same exact prefill
(prefill is exact for every policy, so ``r_0`` — the token from the prefill logits — is shared) and is
**teacher-forced**: decode step ``i`` feeds ``r_i`` at position ``T + i`` and yields the method's logits for
``r_{i+1}``. Over the ``n - 1`` decode steps we report

* ``kl_mean``: mean over steps of KL(p_full ‖ p_method) in nats, with p = softmax of the float32 logits
  (computed in float64);
* ``top1_agreement``: share of steps whose method argmax equals full's greedy token ``r_{i+1}``;
* ``first_divergence``: index of the first generated token where the method's greedy choice differs from full's
  (1 = the first token after the prefill token), ``None`` when it never differs over the reference;
* **attention recall**: at a decode step, in layer ``l`` and KV head ``h``, for each query head ``g`` of the GQA
  group, the share of *full* attention's probability mass over the prompt —
  ``softmax_t(q_g · k_t / sqrt(D))`` over the prompt tokens ``t < T`` with the exact post-RoPE prefill keys — that
  falls on the prompt tokens the method attends at that step (``policy.attended_mask``). The query is the method's
  own query at that layer and step (teacher-forced), so recall measures what its selection keeps of the attention
  that query would pay under exact attention. We take the **mean over the group's query heads**, then average
  over the steps where recall is computed; reported per layer and KV head, per layer, and overall.
  Generated tokens are excluded (every method keeps them exactly). ``full`` has recall 1 by construction.

The method's own free-running greedy output (for the task score) shares the teacher-forced steps until its first
divergence; there the state is forked (one non-donating step) and the free run continues on its own tokens, so
a method costs ``n - 1`` teacher-forced steps plus the free-run steps after its divergence.

Decode is instrumented without touching the engine: :func:`instrumented_step` runs
:func:`models.transformer.run_layers_carry` with an attend callback that calls ``policy.decode`` and, when asked,
``policy.attended_mask`` on the same query, accumulating the recall ``[B, L, Hkv]`` in the scan carry.
"""
from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from kvjax.engine import Engine
from kvjax.policies.base import Policy, bucket_size
from models.transformer import embed_tokens, logits_from_hidden, run_layers_carry


# ----------------------------------------------------------------------------------------------------- metrics
def log_softmax64(logits: np.ndarray) -> np.ndarray:
    """float64 log-softmax over the last axis."""
    x = np.asarray(logits, np.float64)
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


def kl_divergence(p_logits: np.ndarray, q_logits: np.ndarray) -> np.ndarray:
    """KL(softmax(p) ‖ softmax(q)) in nats per row, float64. ``[..., V]`` -> ``[...]``. Rows where p puts mass
    on a token q gives zero probability (q logit -inf) give +inf."""
    lp, lq = log_softmax64(p_logits), log_softmax64(q_logits)
    p = np.exp(lp)
    with np.errstate(invalid="ignore"):
        terms = np.where(p > 0, p * (lp - lq), 0.0)
    return terms.sum(axis=-1)


def attention_recall(q: jax.Array, k_exact: jax.Array, lengths: jax.Array, attended: jax.Array) -> jax.Array:
    """Share of exact attention mass over the prompt that falls on attended prompt tokens.

    q ``[B, H, D]`` post-RoPE query of one decode step; k_exact ``[B, Hkv, Tb, D]`` the exact post-RoPE prompt
    keys (rows ``>= lengths[b]`` are padding); attended bool ``[B, Hkv, S]`` with ``S >= Tb`` (only the first
    ``Tb`` columns, the prompt slots, are read). Softmax of ``q·k/sqrt(D)`` in float32 over ``t < lengths[b]``,
    per query head; returns float32 ``[B, Hkv]``: the mean over each KV head's group of query heads.
    """
    B, H, D = q.shape
    Hkv, Tb = k_exact.shape[1], k_exact.shape[2]
    qg = q.reshape(B, Hkv, H // Hkv, D)
    s = jnp.einsum("bhgd,bhtd->bhgt", qg, k_exact, preferred_element_type=jnp.float32) * (1.0 / float(np.sqrt(D)))
    valid = jnp.arange(Tb)[None, :] < lengths[:, None]  # [B, Tb]
    s = jnp.where(valid[:, None, None, :], s, -jnp.inf)
    p = jax.nn.softmax(s, axis=-1)
    m = (attended[:, :, :Tb] & valid[:, None, :]).astype(jnp.float32)
    return jnp.mean(jnp.sum(p * m[:, :, None, :], axis=-1), axis=-1)


def fidelity_metrics(ref_tokens: Sequence[int], ref_logits: np.ndarray, method_logits: np.ndarray,
                     recall: np.ndarray | None = None) -> dict[str, Any]:
    """Metrics of a teacher-forced run. ``ref_tokens`` r_0..r_{n-1}; ``ref_logits``/``method_logits``
    ``[n-1, V]`` the decode-step logits predicting r_1..r_{n-1}; ``recall`` ``[steps, L, Hkv]`` (NaN rows =
    not computed) or None. Returns a JSON-serialisable dict (see the module docstring)."""
    n = len(ref_tokens) - 1
    ref_logits = np.asarray(ref_logits).reshape(n, -1) if n > 0 else np.zeros((0, 1))
    method_logits = np.asarray(method_logits).reshape(n, -1) if n > 0 else np.zeros((0, 1))
    out: dict[str, Any] = {"n_steps": n}
    if n > 0:
        kl = kl_divergence(ref_logits, method_logits)
        agree = np.argmax(method_logits, axis=-1) == np.asarray(ref_tokens[1:])
        bad = np.flatnonzero(~agree)
        out.update(kl_mean=float(kl.mean()), kl_max=float(kl.max()), top1_agreement=float(agree.mean()),
                   first_divergence=int(bad[0]) + 1 if bad.size else None)
    else:
        out.update(kl_mean=None, kl_max=None, top1_agreement=None, first_divergence=None)
    out.update(recall_summary(recall))
    return out


def recall_summary(recall: np.ndarray | None) -> dict[str, Any]:
    """``[steps, L, Hkv]`` recall (NaN = step not measured / policy without ``attended_mask``) -> mean over the
    measured steps: per layer and KV head, per layer, overall, and the number of steps measured."""
    if recall is None or len(recall) == 0:
        return {"recall_mean": None, "recall_per_layer": None, "recall_layer_head": None, "recall_steps": 0}
    r = np.asarray(recall, np.float64)
    rows = ~np.isnan(r).any(axis=(1, 2))
    if not rows.any():
        return {"recall_mean": None, "recall_per_layer": None, "recall_layer_head": None, "recall_steps": 0}
    lh = r[rows].mean(axis=0)
    return {"recall_mean": float(lh.mean()), "recall_per_layer": [float(x) for x in lh.mean(axis=1)],
            "recall_layer_head": [[float(x) for x in row] for row in lh], "recall_steps": int(rows.sum())}


# ----------------------------------------------------------------------------------------------------- decode
def instrumented_step(params, state, k_exact, lengths, tok, pos, do_recall, *, cfg, policy):
    """One decode step of ``policy`` (all layers) that also measures attention recall.

    state: the policy's layer-stacked state; k_exact ``[L, B, Hkv, Tb, D]`` exact post-RoPE prompt keys;
    lengths int32 ``[B]`` prompt lengths; tok int32 ``[B]`` fed at positions ``pos [B]``; do_recall a bool
    scalar (when False the recall branch is skipped at run time and NaN is returned).
    Returns (float32 logits ``[B, V]``, new state, float32 recall ``[B, L, Hkv]``).
    """
    B = tok.shape[0]
    L, Hkv = cfg.num_layers, cfg.num_kv_heads
    rec0 = jnp.full((L, B, Hkv), jnp.nan, jnp.float32)
    measurable = type(policy).attended_mask is not Policy.attended_mask

    def attend(carry, layer, q, k_pre, k, v, hn):
        st, rec = carry
        q1 = q[:, 0]

        def measure(_):
            mask = policy.attended_mask(cfg, st, layer, q1, pos)
            return attention_recall(q1, k_exact[layer], lengths, mask)

        if measurable:
            r = jax.lax.cond(do_recall, measure, lambda _: jnp.full((B, Hkv), jnp.nan, jnp.float32), None)
            rec = jax.lax.dynamic_update_index_in_dim(rec, r, layer, 0)
        out, st = policy.decode(cfg, st, layer, q1, k_pre[:, 0], k[:, 0], v[:, 0], pos, hn[:, 0])
        return out[:, None], (st, rec)

    x, (state, rec) = run_layers_carry(params, cfg, embed_tokens(params, tok[:, None]), pos[:, None], (state, rec0),
                                       attend)
    return logits_from_hidden(params, cfg, x[:, 0]), state, jnp.transpose(rec, (1, 0, 2))


class Decoder:
    """Jitted instrumented decode steps of one :class:`Engine` (model + policy), cached per state layout:
    a donating step (the normal path, state updated in place) and a non-donating one (to fork a state)."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self._jit: dict = {}

    def step(self, state, k_exact, lengths, tok, pos, do_recall: bool, donate: bool = True):
        eng = self.engine
        key = (donate, str(jax.tree.map(lambda x: (x.shape, x.dtype), state)), k_exact.shape)
        if key not in self._jit:
            shard = jax.tree.map(lambda x: x.sharding, state)
            fn = functools.partial(instrumented_step, cfg=eng.cfg, policy=eng.policy)
            self._jit[key] = jax.jit(fn, donate_argnums=(1,) if donate else (),
                                     out_shardings=(eng._batch_sharding(2), shard, eng._batch_sharding(3)))
        return self._jit[key](eng.params, state, k_exact, lengths, eng._put(np.asarray(tok, np.int32)),
                              eng._put(np.asarray(pos, np.int32)), jnp.bool_(do_recall))


@dataclasses.dataclass
class Prefilled:
    """A prompt after the exact prefill, shared by every method: ids, padded tokens ``[1, Tb]``, lengths ``[1]``,
    float32 last-token logits ``[V]`` (numpy), the dense KVCache, and the prefill seconds."""

    ids: list[int]
    toks: np.ndarray
    lengths: np.ndarray
    first_logits: np.ndarray
    kv: Any
    prefill_s: float

    @property
    def prompt_tokens(self) -> int:
        return int(self.lengths[0])


def prefill(engine: Engine, ids: Sequence[int], max_new: int) -> Prefilled:
    """Exact chunked prefill of one prompt (token ids) with room for ``max_new`` generated tokens."""
    t0 = time.perf_counter()
    toks, lengths, _ = engine.prepare([list(ids)], max_new)
    logits, kv = engine.prefill(toks, lengths)
    first = np.asarray(logits)[0].astype(np.float32)
    jax.block_until_ready(kv.k)
    return Prefilled(list(ids), toks, lengths, first, kv, time.perf_counter() - t0)


@dataclasses.dataclass
class MethodRun:
    """One method on one prompt.

    ids: the free-running greedy output (stop token excluded), stop_reason "stop_id" or "length";
    ref_tokens: the tokens fed when teacher-forcing (the reference), or for a reference run its own sampled
      tokens including the stop token; logits ``[steps, V]`` of the teacher-forced (or, without a reference, the
      free-run) decode steps, kept only when asked; fidelity: :func:`fidelity_metrics` (None without a
      reference); memory: ``policy.memory_report`` of the built state; seconds: build_s (policy build),
      decode_s (free-run decode steps, including the shared teacher-forced ones), fidelity_s (extra
      teacher-forced steps after the fork).
    """

    ids: list[int]
    stop_reason: str
    sampled: list[int]
    logits: np.ndarray | None
    fidelity: dict | None
    memory: dict
    build_s: float
    decode_s: float
    fidelity_s: float
    n_decode_steps: int = 0


def run_method(engine: Engine, pre: Prefilled, max_new: int, stop_ids: Sequence[int],
               reference: tuple[Sequence[int], np.ndarray] | None = None, recall_every: int = 1,
               keep_logits: bool = False, decoder: Decoder | None = None) -> MethodRun:
    """Greedy decode of ``engine.policy`` on a prefilled prompt, teacher-forced on ``reference`` when given.

    Args:
      engine: the model with the method's policy (``Engine.with_policy``).
      pre: the shared exact prefill (:func:`prefill`).
      max_new: most tokens generated (the engine's convention: the prefill token counts; a stop token ends
        the output and is not part of it).
      stop_ids: token ids that end generation.
      reference: (full's sampled tokens r_0..r_{n-1}, full's decode logits ``[n-1, V]``) -> teacher forcing and
        fidelity metrics; None -> a plain free run (used for ``full`` itself, whose logits then are the reference).
      recall_every: measure attention recall on teacher-forced steps ``i`` with ``i % recall_every == 0``
        (0 = never).
      keep_logits: return the decode logits (``full``'s reference run needs them).
    """
    if max_new < 1:
        raise ValueError(f"max_new={max_new}, allowed: int >= 1 tokens")
    dec = decoder or Decoder(engine)
    stop = set(int(s) for s in stop_ids)
    gen_bucket = bucket_size(max_new, 64)
    T = pre.prompt_tokens
    lengths_dev = engine._put(pre.lengths)
    k_exact = pre.kv.k

    t0 = time.perf_counter()
    state = engine.build(pre.kv, pre.lengths, gen_bucket)
    jax.block_until_ready(state)
    memory = engine.policy.memory_report(state, pre.lengths)
    build_s = time.perf_counter() - t0

    first = int(np.argmax(pre.first_logits))
    ref_tokens = list(reference[0]) if reference is not None else None
    free = [first]  # sampled tokens of the free run (a trailing stop token included)

    def free_active() -> bool:
        return free[-1] not in stop and len(free) < max_new

    logits_list, recall_list = [], []
    decode_s = fid_s = 0.0
    steps = 0
    if ref_tokens is None:
        t1 = time.perf_counter()
        while free_active():
            i = len(free) - 1
            lg, state, _ = dec.step(state, k_exact, lengths_dev, [free[-1]], [T + i], False)
            lg = np.asarray(lg)[0]
            if keep_logits:
                logits_list.append(lg)
            free.append(int(np.argmax(lg)))
            steps += 1
        decode_s = time.perf_counter() - t1
        fidelity = None
    else:
        if ref_tokens[0] != first:
            raise ValueError(f"reference starts with token {ref_tokens[0]} but the prefill logits give {first}: the "
                             f"reference was made from another prompt or model")
        n = len(ref_tokens)
        shared = True  # the free run still equals the reference
        need_fork, fork = False, None
        t1 = time.perf_counter()
        for i in range(n - 1):
            do_rec = recall_every > 0 and i % recall_every == 0
            if need_fork:  # the free run diverged: keep this state for it, teacher-force a new one
                lg, new_state, rec = dec.step(state, k_exact, lengths_dev, [ref_tokens[i]], [T + i], do_rec,
                                              donate=False)
                fork, state, need_fork = state, new_state, False
            else:
                lg, state, rec = dec.step(state, k_exact, lengths_dev, [ref_tokens[i]], [T + i], do_rec)
            lg = np.asarray(lg)[0]
            logits_list.append(lg)
            recall_list.append(np.asarray(rec)[0])
            steps += 1
            if shared and free_active():
                a = int(np.argmax(lg))
                free.append(a)
                if a != ref_tokens[i + 1]:
                    shared = False
                    decode_s = time.perf_counter() - t1
                    t1 = time.perf_counter()
                    need_fork = free_active() and i + 1 < n - 1
        if shared:
            decode_s = time.perf_counter() - t1
        else:
            fid_s = time.perf_counter() - t1
        # finish the free run on its own tokens, from the forked state (or the final state if the reference
        # ended right at the divergence)
        if free_active():
            st = fork if fork is not None else state
            t2 = time.perf_counter()
            while free_active():
                i = len(free) - 1
                lg, st, _ = dec.step(st, k_exact, lengths_dev, [free[-1]], [T + i], False)
                free.append(int(np.argmax(np.asarray(lg)[0])))
                steps += 1
            decode_s += time.perf_counter() - t2
        V = len(pre.first_logits)
        m_logits = np.stack(logits_list) if logits_list else np.zeros((0, V), np.float32)
        rec = np.stack(recall_list) if recall_list else None
        fidelity = fidelity_metrics(ref_tokens, reference[1], m_logits, rec)
        if not keep_logits:
            logits_list = []
    reason = "stop_id" if free[-1] in stop else "length"
    ids = free[:-1] if reason == "stop_id" else free
    V = len(pre.first_logits)
    logits = (np.stack(logits_list) if logits_list else np.zeros((0, V), np.float32)) if keep_logits else None
    return MethodRun(ids, reason, list(free), logits, fidelity, memory, build_s, decode_s, fid_s, steps)


def teacher_force(engine: Engine, pre: Prefilled, tokens: Sequence[int], max_new: int) -> np.ndarray:
    """Decode logits ``[len(tokens)-1, V]`` of ``engine.policy`` fed ``tokens`` (used to rebuild full's reference
    logits from its cached tokens when a run resumes)."""
    dec = Decoder(engine)
    state = engine.build(pre.kv, pre.lengths, bucket_size(max_new, 64))
    lengths_dev = engine._put(pre.lengths)
    out = []
    for i in range(len(tokens) - 1):
        lg, state, _ = dec.step(state, pre.kv.k, lengths_dev, [tokens[i]], [pre.prompt_tokens + i], False)
        out.append(np.asarray(lg)[0])
    return np.stack(out) if out else np.zeros((0, len(pre.first_logits)), np.float32)


def compare(engine: Engine, method, ids: Sequence[int], max_new: int, stop_ids: Sequence[int],
            recall_every: int = 1) -> tuple[MethodRun, MethodRun]:
    """Convenience: full's greedy reference and ``method`` (a name or Policy) teacher-forced on it, for one prompt.
    ``engine`` may hold any policy; full is run with ``engine.with_policy("full")``. Returns (full run, method run)."""
    full, meth = engine.with_policy("full"), engine.with_policy(method)
    pre = prefill(meth if getattr(meth.policy, "needs_queries", False) else full, ids, max_new)
    ref = run_method(full, pre, max_new, stop_ids, keep_logits=True)
    run = run_method(meth, pre, max_new, stop_ids, reference=(ref.sampled, ref.logits),
                     recall_every=recall_every)
    return ref, run


__all__ = ["Decoder", "MethodRun", "Prefilled", "attention_recall", "compare", "fidelity_metrics",
           "instrumented_step", "kl_divergence", "log_softmax64", "prefill", "recall_summary", "run_method",
           "teacher_force"]
