"""The one decode step (with optional probes) and the device-side generation loop.

:func:`decode_step` runs one new token per sequence through every layer (one ``lax.scan`` over the layer-stacked
weights and policy state; the policy's ``decode`` does scoring, top-k, fetch from host memory, attention and the
append) and returns float32 logits. Everything that drives decode — :meth:`kvjax.Engine.generate`, the
:class:`kvjax.engine.Session` used by the evaluation harness for teacher forcing and forks, the benchmarks and the
tests — goes through it; there is no second copy of the step.

Probes are options of the same step (as in the gemma sampler): the **attention-recall probe**
(``probe_recall=True``) also measures, in every layer, which share of exact attention's probability mass over the
prompt falls on the tokens the policy attends at that step (``policy.attended_mask`` against the exact prompt keys
``exact_keys``); the logits the step returns are the logits probe (the harness keeps them for KL / agreement; the
device loop can keep them in a ``[B, N, V]`` buffer).

:func:`generate_loop` is the whole generation — sampling, stop ids, a per-sequence done mask, the length limit — as
one ``jax.lax.while_loop``: no host round trip per token. It gives exactly the tokens of the host loop in
:meth:`kvjax.Engine.generate` (same keys: ``fold_in(key, i + 1)`` for the token after step ``i``).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from models.config import ModelConfig
from models.transformer import Params, embed_tokens, logits_from_hidden, run_layers_carry

from .sampling import sample

#: stop reasons of :func:`generate_loop` (int codes in its output; 0 = still running)
STOP_REASONS = {1: "stop_id", 2: "length"}


def attention_recall(q: jax.Array, k_exact: jax.Array, lengths: jax.Array, attended: jax.Array) -> jax.Array:
    """Share of exact attention mass over the prompt that falls on attended prompt tokens (attention recall).

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


def decode_step(params: Params, cfg: ModelConfig, policy, state, tok: jax.Array, pos: jax.Array, *,
                probe_recall: bool = False, exact_keys: jax.Array | None = None,
                prompt_lengths: jax.Array | None = None, do_recall: jax.Array | bool = True):
    """One decode step for all layers: token ids int32 ``[B]`` fed at absolute positions ``pos [B]``.

    Returns ``(logits, state, recall)``: float32 logits ``[B, V]`` for the next token, the new layer-stacked policy
    state, and with ``probe_recall`` the attention recall float32 ``[B, L, Hkv]`` (NaN where ``do_recall`` is False
    at run time, or for a policy without ``attended_mask``), else None. The recall probe needs the exact prompt keys
    ``exact_keys [L, B, Hkv, Tb, D]`` and the prompt lengths ``[B]``.
    """
    B = tok.shape[0]
    measurable = probe_recall and policy.has_attended_mask
    if probe_recall and (exact_keys is None or prompt_lengths is None):
        raise ValueError("probe_recall needs exact_keys [L, B, Hkv, Tb, D] and prompt_lengths [B]")

    def attend(carry, layer, q, k_pre, k, v, hn):
        st, rec = carry
        q1 = q[:, 0]
        if measurable:
            def measure(_):
                mask = policy.attended_mask(cfg, st, layer, q1, pos)
                return attention_recall(q1, exact_keys[layer], prompt_lengths, mask)

            nan = jnp.full((B, cfg.num_kv_heads), jnp.nan, jnp.float32)
            r = jax.lax.cond(jnp.asarray(do_recall), measure, lambda _: nan, None)
            rec = jax.lax.dynamic_update_index_in_dim(rec, r, layer, 0)
        out, st = policy.decode(cfg, st, layer, q1, k_pre[:, 0], k[:, 0], v[:, 0], pos, hn[:, 0])
        return out[:, None], (st, rec)

    rec0 = jnp.full((cfg.num_layers, B, cfg.num_kv_heads), jnp.nan, jnp.float32) if probe_recall else None
    x, (state, rec) = run_layers_carry(params, cfg, embed_tokens(params, tok[:, None]), pos[:, None], (state, rec0),
                                       attend)
    recall = jnp.transpose(rec, (1, 0, 2)) if probe_recall else None
    return logits_from_hidden(params, cfg, x[:, 0]), state, recall


def generate_loop(params: Params, cfg: ModelConfig, policy, state, first: jax.Array, lengths: jax.Array,
                  key: jax.Array, temperature, top_k, top_p, stop_ids: jax.Array, max_new, *, gen_bucket: int,
                  keep_logits: bool = False):
    """The whole generation on the device: one ``lax.while_loop`` of :func:`decode_step` + sampling.

    ``first`` int32 ``[B]`` is the token sampled from the prefill logits; token ``i`` (0-based) is fed at position
    ``lengths + i`` and the next one is sampled with ``fold_in(key, i + 1)``. A sequence stops at a token in
    ``stop_ids`` (int32 ``[S]``, padded with -1; the stop token is not kept) or after ``max_new`` kept tokens
    (traced int32, at most ``gen_bucket``); the loop ends when every sequence has stopped. Sampling knobs are traced
    scalars (greedy when ``temperature == 0``).

    Returns ``(tokens int32 [B, gen_bucket] (-1 after the end), n_kept int32 [B], reason int32 [B]`` (codes of
    :data:`STOP_REASONS`), ``state``, and with ``keep_logits`` the float32 logits ``[B, gen_bucket, V]`` of the
    decode steps (row ``i``: the logits after feeding token ``i``), else None).
    """
    B = first.shape[0]
    V = cfg.vocab_size

    def account(cur, toks, n, reason):
        """Keep or stop on token ``cur`` for every running sequence (the host loop's bookkeeping)."""
        running = reason == 0
        is_stop = jnp.any(cur[:, None] == stop_ids[None, :], axis=1)
        keep = running & ~is_stop
        toks = toks.at[jnp.arange(B), jnp.where(keep, n, gen_bucket)].set(cur, mode="drop")
        n = n + keep.astype(jnp.int32)
        reason = jnp.where(running & is_stop, 1, reason)
        reason = jnp.where(keep & (n >= max_new), 2, reason)
        return toks, n, reason

    toks0 = jnp.full((B, gen_bucket), -1, jnp.int32)
    toks0, n0, reason0 = account(first, toks0, jnp.zeros((B,), jnp.int32), jnp.zeros((B,), jnp.int32))
    lg0 = jnp.zeros((B, gen_bucket, V), jnp.float32) if keep_logits else None

    def cond(c):
        return jnp.any(c[4] == 0)

    def body(c):
        i, state, cur, toks, reason, n, lg = c
        logits, state, _ = decode_step(params, cfg, policy, state, cur, lengths + i)
        if keep_logits:
            lg = jax.lax.dynamic_update_index_in_dim(lg, logits, i, 1)
        nxt = sample(logits, jax.random.fold_in(key, i + 1), temperature, top_k, top_p)
        toks, n, reason = account(nxt, toks, n, reason)
        return i + 1, state, nxt, toks, reason, n, lg

    carry = (jnp.int32(0), state, first, toks0, reason0, n0, lg0)
    _, state, _, toks, reason, n, lg = jax.lax.while_loop(cond, body, carry)
    return toks, n, reason, state, lg


__all__ = ["STOP_REASONS", "attention_recall", "decode_step", "generate_loop"]
