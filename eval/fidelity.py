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

Everything runs on the engine's one decode step (:func:`kvjax.decode.decode_step`) through
:class:`kvjax.engine.Session`: the logits the step returns are the logits probe, and the attention recall is the
step's recall probe (``Session.step(recall=True)``), so the numbers are measured on the code users run. Every
method of a prompt is built from one exact prefill (:meth:`kvjax.Engine.start` with several policies).
"""
from __future__ import annotations

import dataclasses
import time
from typing import Any, Sequence

import jax
import numpy as np

from kvjax.decode import attention_recall
from kvjax.engine import Engine, Session
from kvjax.policies import make_policy


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


# ----------------------------------------------------------------------------------------------------- runs
@dataclasses.dataclass
class Prefilled:
    """A prompt after its one exact prefill: ids, lengths ``[1]``, float32 last-token logits ``[V]`` (numpy), one
    :class:`~kvjax.engine.Session` per policy (each used once), and the prefill seconds (every policy's state
    build included)."""

    ids: list[int]
    lengths: np.ndarray
    first_logits: np.ndarray
    sessions: dict
    prefill_s: float

    @property
    def prompt_tokens(self) -> int:
        return int(self.lengths[0])

    def session(self, policy) -> Session:
        """A session of ``policy`` (a name or Policy); each built session may be taken once (decoding consumes it)."""
        pol = make_policy(policy)
        if not self.sessions.get(pol):
            raise KeyError(f"no (more) session of {pol!r} from this prefill ({list(self.sessions)})")
        return self.sessions[pol].pop(0)


def prefill(engine: Engine, ids: Sequence[int], max_new: int, policies: Sequence = ("full",),
            recall: bool = True) -> Prefilled:
    """One exact prefill of a prompt (token ids) building every policy's state, with room for ``max_new`` tokens:
    one session per entry of ``policies`` (equal policies share one build). ``recall`` keeps the exact prompt keys
    for the attention-recall probe."""
    pols = [make_policy(p) for p in policies]
    t0 = time.perf_counter()
    want_keys = recall and any(p.has_attended_mask for p in pols)
    sessions = engine.start([list(ids)], max_new, policies=pols, exact_keys=want_keys)
    first = np.asarray(sessions[0].first_logits)[0].astype(np.float32)
    jax.block_until_ready([s.state for s in sessions])
    by_policy: dict = {}
    for p, sess in zip(pols, sessions):
        by_policy.setdefault(p, []).append(sess)
    return Prefilled(list(ids), sessions[0].lengths, first, by_policy, time.perf_counter() - t0)


@dataclasses.dataclass
class MethodRun:
    """One method on one prompt.

    ids: the free-running greedy output (stop token excluded), stop_reason "stop_id" or "length";
    ref_tokens: the tokens fed when teacher-forcing (the reference), or for a reference run its own sampled
      tokens including the stop token; logits ``[steps, V]`` of the teacher-forced (or, without a reference, the
      free-run) decode steps, kept only when asked; fidelity: :func:`fidelity_metrics` (None without a
      reference); memory: ``policy.memory_report`` of the built state; seconds: build_s (0: the state is built
      inside the shared prefill), decode_s (free-run decode steps, including the shared teacher-forced ones),
      fidelity_s (extra teacher-forced steps after the fork); exact: the policy could not prune the prompt and full
      attention ran.
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
    exact: bool = False


def run_method(sess: Session, pre: Prefilled, max_new: int, stop_ids: Sequence[int],
               reference: tuple[Sequence[int], np.ndarray] | None = None, recall_every: int = 1,
               keep_logits: bool = False) -> MethodRun:
    """Greedy decode of a session's policy on its prefilled prompt, teacher-forced on ``reference`` when given.

    Args:
      sess: the method's session from :func:`prefill` (consumed).
      pre: the shared prefill.
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
    stop = set(int(s) for s in stop_ids)
    memory = sess.memory_report()
    first = int(np.argmax(pre.first_logits))
    ref_tokens = list(reference[0]) if reference is not None else None
    free = [first]  # sampled tokens of the free run (a trailing stop token included)
    probe = recall_every > 0 and sess.exact_keys is not None and sess.policy.has_attended_mask

    def free_active() -> bool:
        return free[-1] not in stop and len(free) < max_new

    logits_list, recall_list = [], []
    decode_s = fid_s = 0.0
    steps = 0
    if ref_tokens is None:
        t1 = time.perf_counter()
        while free_active():
            lg = np.asarray(sess.step([free[-1]]).logits)[0]
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
        L, Hkv = sess.engine.cfg.num_layers, sess.engine.cfg.num_kv_heads
        shared = True  # the free run still equals the reference
        need_fork, fork = False, None
        t1 = time.perf_counter()
        for i in range(n - 1):
            do_rec = recall_every > 0 and i % recall_every == 0
            if need_fork:  # the free run diverged: keep this point for it, teacher-force on
                fork, need_fork = sess.fork(), False
            out = sess.step([ref_tokens[i]], recall=probe, measure=do_rec)
            lg = np.asarray(out.logits)[0]
            logits_list.append(lg)
            recall_list.append(np.asarray(out.recall)[0] if probe else np.full((L, Hkv), np.nan))
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
        # finish the free run on its own tokens, from the fork (or the final state if the reference ended right at
        # the divergence)
        if free_active():
            st = fork if fork is not None else sess
            t2 = time.perf_counter()
            while free_active():
                free.append(int(np.argmax(np.asarray(st.step([free[-1]]).logits)[0])))
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
    return MethodRun(ids, reason, list(free), logits, fidelity, memory, 0.0, decode_s, fid_s, steps, sess.exact)


def teacher_force(sess: Session, tokens: Sequence[int]) -> np.ndarray:
    """Decode logits ``[len(tokens)-1, V]`` of a session's policy fed ``tokens`` (used to rebuild full's reference
    logits from its cached tokens when a run resumes). Consumes the session."""
    out = [np.asarray(sess.step([t]).logits)[0] for t in tokens[:-1]]
    V = sess.engine.cfg.vocab_size
    return np.stack(out) if out else np.zeros((0, V), np.float32)


def compare(engine: Engine, method, ids: Sequence[int], max_new: int, stop_ids: Sequence[int],
            recall_every: int = 1) -> tuple[MethodRun, MethodRun]:
    """Convenience: full's greedy reference and ``method`` (a name or Policy) teacher-forced on it, for one prompt,
    both from one prefill. Returns (full run, method run)."""
    pre = prefill(engine, ids, max_new, ["full", method], recall=recall_every > 0)
    ref = run_method(pre.session("full"), pre, max_new, stop_ids, keep_logits=True)
    run = run_method(pre.session(method), pre, max_new, stop_ids, reference=(ref.sampled, ref.logits),
                     recall_every=recall_every)
    return ref, run


__all__ = ["MethodRun", "Prefilled", "attention_recall", "compare", "fidelity_metrics", "kl_divergence",
           "log_softmax64", "prefill", "recall_summary", "run_method", "teacher_force"]
