"""``lrqk``: LRQK, low-rank query and key selection (Li et al., 2025), as the paper runs it (the authors' fork,
algorithms.md §5, §9).

**Prefill** (per layer, sequence and *query* head; keys are repeated over the GQA group as in the fork): the
post-RoPE prompt queries ``Q [T, D]`` and keys ``K [T, D]`` are factorised with a shared rank r,
``Q ≈ A_Q B_Q``, ``K ≈ A_K B_K`` (``A [T, r]``, ``B [r, D]``), by alternating least squares on

    J = ||Q Kᵀ − A_Q A_Kᵀ||² + λ ||Q − A_Q B_Q||² + λ ||K − A_K B_K||²       (λ = 1)

(:func:`lrqk_factorize`): initialise ``A_Q = Q[:, c]``, ``A_K = K[:, c]`` with ``c`` the r channels of largest
``Σ_t |Q| + |K|`` ("topcol"); then each iteration sets ``B_Q, B_K`` by least squares, ``A_Q`` exactly minimising J
given ``(A_K, B_Q)``, then ``A_K`` given the new ``A_Q`` and ``B_K`` — block-coordinate descent, so J never
increases — at most 8 iterations, stopping when the mean squared change of ``A_Q`` and ``A_K`` is below 1e-5.
The prompt's ``A_K`` (``[T, r]`` per query head) and ``B_Q, B_K`` stay on the device; K/V go to host memory.

**Decode** (per layer): the new q and k are projected to rank-r coordinates ``q̂, k̂`` by 2 alternating solves of
``min ||q kᵀ − q̂ k̂ᵀ||² + ||q − q̂ B_Q||² + ||k − k̂ B_K||² + ||q K_Ωᵀ − q̂ A_{K,Ω}ᵀ||²`` over the previously
attended prompt tokens Ω (selected ∪ recent), then ``B_Q``, ``B_K`` take one gradient step with the exact
line-search step size (:func:`lrqk_project`). The proxy scores ``q̂ · A_Kᵀ`` pick, per query head, the top
``int((1/1024 + 0.0016)·T)`` prompt tokens (at least 1) outside the ``lite_tokens = 64`` most recent prompt
tokens; attention is exact (full-precision K/V fetched from host) over the selected, the 64 recent prompt tokens and
every generated token.

Deviations, on purpose: generated tokens stay on the device and are always attended (the fork moves them to its
CPU store in blocks of 64 and lets them compete in the top-k); every selected row is fetched each step (the fork's
GPU hit/miss cache only moves misses, which changes traffic, not results); a tiny ridge (1e-6 of the mean
diagonal) keeps the r×r solves defined when a prompt has fewer than r tokens; the rank is clipped to the head dim
(``min(rank, D)``: beyond D the factorisation is already exact), which matters only for tiny test models.

State of one layer (``[L]`` added by the prefill's layer scan; K = selected-token slots per query head, W = lite window):

=============  ================================  =============================================================
``kv_store``   ``[B, Hkv, Tb, 2, D]`` **host**   prompt keys and values
``a_k``        ``[B, H, Tb, r]`` device          ``A_K`` of every prompt token, per query head
``b_q/b_k``    ``[B, H, r, D]`` device           ``B_Q``, ``B_K`` (updated every decode step)
``win_kv``     ``[B, Hkv, W, 2, D]`` device      the last ``lite_tokens`` prompt tokens, exact
``win_pos``    ``[B, W]`` int32                  their positions (-1: empty slot)
``buf_kv``     ``[B, Hkv, G·K, 2, D]`` device    recall buffer: the selected rows of the latest step
``buf_idx``    ``[B, H, K]`` int32               their positions per query head (-1: unused slot)
``gen``        ``[B, Hkv, max_new, D]`` device   generated tokens (:class:`~kvjax.policies.common.GenSlots`)
``lengths``,   ``[B]`` int32                     prompt length, selected tokens, first recent token
``n_sel``, ``cand_end``
=============  ================================  =============================================================
"""
from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from ..cache import KV_AXES, SEQ_AXES, leaf
from ..offload import BACKENDS, fetch_rows
from .base import DEFAULT_MIN_SEQLEN_TO_PRUNE, Policy, PolicyConfig, concrete
from .common import (GenSlots, attend_per_query_head, bcast_heads, budget_tokens, check_budget, check_common,
                     check_int, dense_attend, layer_cond, length_table, pack_kv, take_rows, top_k)

_HI = jax.lax.Precision.HIGHEST
DEFAULT_RANK = {"llama": 16, "qwen3": 32, "qwen3_moe": 32}


@dataclasses.dataclass(frozen=True)
class LRQKConfig(PolicyConfig):
    """LRQK (fork ``run_config.py``, algorithms.md §9).

    - ``rank``: shared rank r of the Q/K factorisation; None = the paper's per family (16 Llama, 32 Qwen3).
      Clipped to the head dim.
    - ``num_active``: selected prompt tokens per query head, a float fraction of the prompt (``1/1024 + 0.0016``)
      or an int token count; at least 1.
    - ``lite_tokens``: most recent prompt tokens always attended, exact (64).
    - ``max_iters`` / ``tol`` / ``lam``: prefill ALS iterations (8), stopping tolerance on the mean squared change
      of ``A_Q, A_K`` (1e-5), and the weight λ of the reconstruction terms (1).
    - ``decode_iters`` / ``lam_decode``: alternating solves for ``q̂, k̂`` per step (2) and their λ (1).
    - ``init``: ``"topcol"`` (the paper's), the only initialisation implemented.
    - ``dense_layers``: first layers with full attention (0: every layer sparse).
    - ``fetch_backend``: :data:`kvjax.offload.BACKENDS` (token rows; ``"auto"`` (default: the Pallas DMA kernel on TPU, ``host_gather`` elsewhere; :mod:`kvjax.offload`)).
    - ``min_seqlen_to_prune``: prompts of at most this many tokens are decoded exactly (full attention).
    """

    rank: int | None = None
    num_active: float | int = 0.0009765625 + 0.0016
    lite_tokens: int = 64
    max_iters: int = 8
    tol: float = 1e-5
    lam: float = 1.0
    decode_iters: int = 2
    lam_decode: float = 1.0
    init: str = "topcol"
    dense_layers: int = 0
    fetch_backend: str = "auto"
    min_seqlen_to_prune: int = DEFAULT_MIN_SEQLEN_TO_PRUNE

    def __post_init__(self):
        if self.rank is not None:
            check_int("rank", self.rank, 1, "(rank of the Q/K factorisation)")
        check_budget("num_active", self.num_active)
        check_int("lite_tokens", self.lite_tokens, 0, "tokens")
        check_int("max_iters", self.max_iters, 1, "iterations")
        check_int("decode_iters", self.decode_iters, 1, "iterations")
        check_int("dense_layers", self.dense_layers, 0, "layers")
        check_int("min_seqlen_to_prune", self.min_seqlen_to_prune, 0, "tokens")
        for name in ("tol", "lam", "lam_decode"):
            x = getattr(self, name)
            if isinstance(x, bool) or not isinstance(x, (int, float)) or not x >= 0:
                raise ValueError(f"{name}={x!r} must be a number >= 0")
        if self.init != "topcol":
            raise ValueError(f"init={self.init!r} is not supported; only 'topcol' (the paper's) is implemented")
        if self.fetch_backend not in BACKENDS:
            raise ValueError(f"fetch_backend={self.fetch_backend!r} must be one of {BACKENDS}")


@struct.dataclass
class LRQKState:
    """Layer-stacked LRQK state (fields in the module docstring)."""

    kv_store: jax.Array = leaf(*KV_AXES)
    a_k: jax.Array = leaf("layers", "batch", "heads")
    b_q: jax.Array = leaf("layers", "batch", "heads")
    b_k: jax.Array = leaf("layers", "batch", "heads")
    win_kv: jax.Array = leaf(*KV_AXES)
    win_pos: jax.Array = leaf(*SEQ_AXES)
    buf_kv: jax.Array = leaf(*KV_AXES)
    buf_idx: jax.Array = leaf("layers", "batch", "heads")
    gen: GenSlots = leaf(*KV_AXES)
    lengths: jax.Array = leaf(*SEQ_AXES)
    n_sel: jax.Array = leaf(*SEQ_AXES)
    cand_end: jax.Array = leaf(*SEQ_AXES)


# ----------------------------------------------------------------------------- linear algebra
def _t(x):
    return jnp.swapaxes(x, -1, -2)


def _mm(a, b):
    return jnp.matmul(a, b, precision=_HI)


def _ridge(M: jax.Array, eps: float = 1e-6) -> jax.Array:
    """``M + eps·mean(diag M)·I`` (plus a floor), so a rank-deficient Gram matrix still solves."""
    r = M.shape[-1]
    d = jnp.trace(M, axis1=-2, axis2=-1)[..., None, None] / r
    return M + (eps * d + 1e-30) * jnp.eye(r, dtype=M.dtype)


def _solve_right(M: jax.Array, R: jax.Array) -> jax.Array:
    """X with ``X M = R`` for symmetric M ``[..., r, r]``: ``R [..., n, r]`` -> ``[..., n, r]``."""
    return _t(jnp.linalg.solve(_ridge(M), _t(R)))


def _ls(A: jax.Array, X: jax.Array) -> jax.Array:
    """Least squares ``argmin_B ||X − A B||²``: ``(AᵀA)⁻¹ Aᵀ X`` ``[..., r, D]``."""
    return jnp.linalg.solve(_ridge(_mm(_t(A), A)), _mm(_t(A), X))


def lrqk_objective(Q, K, A_Q, B_Q, A_K, B_K, lam: float = 1.0) -> jax.Array:
    """``J = ||QKᵀ − A_Q A_Kᵀ||² + λ||Q − A_Q B_Q||² + λ||K − A_K B_K||²`` per leading index (float32), with the
    ``T×T`` term evaluated through ``r×r`` / ``D×D`` traces (never materialised)."""
    def tr(a, b):  # tr(a b) for [.., n, m] x [.., m, n]
        return jnp.sum(a * _t(b), axis=(-2, -1))

    qk = tr(_mm(_t(Q), Q), _mm(_t(K), K))
    cross = jnp.sum(_mm(_mm(_t(A_Q), Q), _t(K)) * _t(A_K), axis=(-2, -1))  # tr(A_Qᵀ Q Kᵀ A_K)
    aa = tr(_mm(_t(A_Q), A_Q), _mm(_t(A_K), A_K))
    fit = qk - 2.0 * cross + aa
    rq = jnp.sum((Q - _mm(A_Q, B_Q)) ** 2, axis=(-2, -1))
    rk = jnp.sum((K - _mm(A_K, B_K)) ** 2, axis=(-2, -1))
    return fit + lam * (rq + rk)


def topcol_init(Q: jax.Array, K: jax.Array, r: int) -> tuple[jax.Array, jax.Array]:
    """LRQK's "topcol" start: ``A_Q = Q[:, c]``, ``A_K = K[:, c]`` with c the r channels of largest
    ``Σ_t |Q| + |K|`` (per leading index). Q, K ``[..., T, D]`` -> ``[..., T, r]``."""
    score = jnp.sum(jnp.abs(Q), axis=-2) + jnp.sum(jnp.abs(K), axis=-2)  # [..., D]
    _, c = top_k(score, r)
    c = c[..., None, :]
    return jnp.take_along_axis(Q, c, axis=-1), jnp.take_along_axis(K, c, axis=-1)


def lrqk_factorize(Q: jax.Array, K: jax.Array, r: int, lam: float = 1.0, max_iters: int = 8, tol: float = 1e-5,
                   history: bool = False, n_rows=None):
    """Alternating least squares for LRQK's prefill factorisation (module docstring), float32.

    Q, K ``[..., T, D]``; zero rows are padding and do not change the factors. The stopping rule compares the mean
    squared change of ``A_Q``/``A_K`` over the real rows (``n_rows``: their total count over every leading index;
    default all rows), as the fork does over its unpadded tensors. Returns
    ``(A_Q, B_Q, A_K, B_K)`` (``[..., T, r]``, ``[..., r, D]``) and, with ``history``, also the objective J summed
    over the leading indices after the initial least-squares B's (entry 0) and after each iteration (entries
    1..max_iters; NaN for iterations skipped by the stopping rule).
    """
    Q = Q.astype(jnp.float32)
    K = K.astype(jnp.float32)
    A_Q, A_K = topcol_init(Q, K, r)
    count = (jnp.float32(np.prod(Q.shape[:-1])) if n_rows is None else jnp.asarray(n_rows, jnp.float32)) * r
    hist0 = jnp.full((max_iters + 1,), jnp.nan, jnp.float32)
    j0 = jnp.sum(lrqk_objective(Q, K, A_Q, _ls(A_Q, Q), A_K, _ls(A_K, K), lam))
    hist0 = hist0.at[0].set(j0)

    def body(carry):
        i, A_Q, A_K, _, hist = carry
        B_Q, B_K = _ls(A_Q, Q), _ls(A_K, K)
        new_AQ = _mm(Q, _solve_right(_mm(_t(A_K), A_K) + lam * _mm(B_Q, _t(B_Q)), _mm(_t(K), A_K) + lam * _t(B_Q)))
        new_AK = _mm(K, _solve_right(_mm(_t(new_AQ), new_AQ) + lam * _mm(B_K, _t(B_K)),
                                     _mm(_t(Q), new_AQ) + lam * _t(B_K)))
        delta = jnp.maximum(jnp.sum((new_AQ - A_Q) ** 2), jnp.sum((new_AK - A_K) ** 2)) / count
        if history:
            hist = hist.at[i + 1].set(jnp.sum(lrqk_objective(Q, K, new_AQ, B_Q, new_AK, B_K, lam)))
        return i + 1, new_AQ, new_AK, delta, hist

    def cond(carry):
        i, _, _, delta, _ = carry
        return (i < max_iters) & (delta >= tol)

    _, A_Q, A_K, _, hist = jax.lax.while_loop(cond, body, (0, A_Q, A_K, jnp.float32(jnp.inf), hist0))
    out = (A_Q, _ls(A_Q, Q), A_K, _ls(A_K, K))
    return (out, hist) if history else out


def lrqk_project(q, k, B_Q, B_K, K_act, A_act, act_ok, lam: float = 1.0, iters: int = 2):
    """LRQK's decode step for one new token, per leading index (float32).

    q, k ``[..., D]``; B_Q, B_K ``[..., r, D]``; K_act ``[..., S, D]`` / A_act ``[..., S, r]``: keys and ``A_K`` rows
    of the previously attended prompt tokens Ω, act_ok ``[..., S]`` marks real ones. Solves alternately for the
    rank-r coordinates (λ = ``lam`` on the ``q kᵀ`` and ``q K_Ωᵀ`` fits)::

        k̂ ← k B_Kᵀ (B_K B_Kᵀ)⁻¹ ;  repeat ``iters``:
        q̂ ← (q B_Qᵀ + λ (q K_Ωᵀ) A_Ω + λ (q·k) k̂) (B_Q B_Qᵀ + λ A_Ωᵀ A_Ω + λ k̂ᵀ k̂)⁻¹
        k̂ ← (k B_Kᵀ + λ (q·k) q̂) (B_K B_Kᵀ + λ q̂ᵀ q̂)⁻¹

    then one gradient step on ``||q − q̂ B_Q||²`` (and k) with the exact line-search step
    ``||∇||² / ||q̂ ∇||²``. Returns ``(q̂, k̂, B_Q', B_K')``.
    """
    f = jnp.float32
    q, k, B_Q, B_K = q.astype(f), k.astype(f), B_Q.astype(f), B_K.astype(f)
    K_act = jnp.where(act_ok[..., None], K_act.astype(f), 0.0)
    A_act = jnp.where(act_ok[..., None], A_act.astype(f), 0.0)
    row = lambda x: x[..., None, :]  # noqa: E731  [..., n] -> [..., 1, n]
    kBK = _mm(row(k), _t(B_K))  # [..., 1, r]
    BKBK = _mm(B_K, _t(B_K))
    rhs_q = _mm(row(q), _t(B_Q)) + lam * _mm(_mm(row(q), _t(K_act)), A_act)
    M_q = _mm(B_Q, _t(B_Q)) + lam * _mm(_t(A_act), A_act)
    qk = lam * jnp.sum(q * k, axis=-1)[..., None, None]
    hk = _solve_right(BKBK, kBK)
    hq = hk
    for _ in range(iters):
        hq = _solve_right(M_q + lam * _mm(_t(hk), hk), rhs_q + qk * hk)
        hk = _solve_right(BKBK + lam * _mm(_t(hq), hq), kBK + qk * hq)

    def step(B, h, x):
        dB = _mm(_t(h), _mm(h, B) - row(x))  # [..., r, D]
        lr = jnp.sum(dB * dB, axis=(-2, -1), keepdims=True) / (
            jnp.sum(_mm(h, dB) ** 2, axis=(-2, -1), keepdims=True) + 1e-6)
        return B - lr * dB

    return hq[..., 0, :], hk[..., 0, :], step(B_Q, hq, q), step(B_K, hk, k)


# ----------------------------------------------------------------------------- policy
class LRQKPolicy(Policy):
    """LRQK: rank-r proxy scores ``q̂·A_Kᵀ`` per query head pick exact tokens fetched from host memory."""

    name = "lrqk"
    fetched_rows_in_state = True  # the recall buffer of attended rows is part of the state
    config_class = LRQKConfig
    needs_queries = True
    budget_knob: ClassVar[str] = "num_active"
    offloaded_fields = ("kv_store",)

    @property
    def fixed_fields(self) -> tuple[str, ...]:
        fixed = ["b_q", "b_k", "win_kv", "win_pos", "gen", "lengths", "n_sel", "cand_end"]
        if not isinstance(self.config.num_active, (float, np.floating)):
            fixed += ["buf_kv", "buf_idx"]
        return tuple(fixed)

    def rank(self, mcfg) -> int:
        """The rank used: the config's (or the family's paper default), clipped to the head dim."""
        r = self.config.rank if self.config.rank is not None else DEFAULT_RANK.get(mcfg.family, 16)
        return min(r, mcfg.head_dim)

    def selected_tokens(self, n: int) -> int:
        return max(1, budget_tokens(self.config.num_active, n))

    def static_sizes(self, mcfg, Tb: int, max_new: int) -> dict:
        """``r`` rank, ``K`` selected-token slots per query head (the largest over the bucket), ``W`` lite slots."""
        return {"r": self.rank(mcfg), "K": min(self.selected_tokens(Tb), Tb), "W": min(self.config.lite_tokens, Tb)}

    def validate(self, mcfg, lengths, max_new):
        check_common(mcfg, lengths, max_new, self.config.dense_layers)

    def can_prune(self, mcfg, T: int) -> bool:
        """Some prompt token outside the lite window is left out by the per-head selection."""
        return self.selected_tokens(T) < max(T - self.config.lite_tokens, 0)

    def tokens_fetched(self, state):
        if concrete(state.lengths) is None or not self.host_fields:
            return None
        L, B = state.lengths.shape
        rows = np.where(np.arange(L) < self.config.dense_layers, state.kv_store.shape[3],
                        state.buf_kv.shape[3])  # G·K selected rows per KV head
        return np.broadcast_to(rows[:, None], (L, B))

    # -- prefill
    def build(self, mcfg, k, v, lengths, max_new, extra=None, q=None):
        if q is None:
            raise ValueError("lrqk needs the prompt queries (needs_queries=True; kvjax.Engine passes them)")
        cfg = self.config
        B, Hkv, Tb, D = k.shape
        H = q.shape[1]
        G = H // Hkv
        sz = self.static_sizes(mcfg, Tb, max_new)
        r, K, W = sz["r"], sz["K"], sz["W"]
        n = lengths.astype(jnp.int32)
        valid = (jnp.arange(Tb)[None, :] < n[:, None])[:, None, :, None]  # [B, 1, Tb, 1]
        Qm = jnp.where(valid, q.astype(jnp.float32), 0.0)
        Km = jnp.where(valid, jnp.repeat(k, G, axis=1).astype(jnp.float32), 0.0)
        A_Q, B_Q, A_K, B_K = lrqk_factorize(Qm, Km, r, cfg.lam, cfg.max_iters, cfg.tol, n_rows=jnp.sum(n) * H)
        cand_end = jnp.maximum(n - cfg.lite_tokens, 0)
        n_sel = length_table(lambda t: min(self.selected_tokens(t), Tb), Tb)[n]

        # the lite window: the last W prompt tokens
        j = jnp.arange(W, dtype=jnp.int32)
        wpos = cand_end[:, None] + j[None, :]
        win_pos = jnp.where(wpos < n[:, None], wpos, -1)
        kv = pack_kv(k, v)
        win_kv = take_rows(kv, jnp.broadcast_to(jnp.clip(wpos, 0, Tb - 1)[:, None, :], (B, Hkv, W)))

        # initial active set, as the fork's prefill: scored by the last prompt query's coordinates
        last = jnp.clip(n - 1, 0, Tb - 1)
        hq0 = jnp.take_along_axis(A_Q, last[:, None, None, None], axis=2)[:, :, 0]  # [B, H, r]
        ids, ok = self._select(A_K, hq0, cand_end, n_sel, K)
        rows = take_rows(kv, ids.reshape(B, Hkv, G * K))
        dt = k.dtype
        return LRQKState(
            kv_store=kv, a_k=A_K.astype(dt), b_q=B_Q.astype(dt), b_k=B_K.astype(dt),
            win_kv=win_kv, win_pos=win_pos, buf_kv=rows, buf_idx=jnp.where(ok, ids, -1),
            gen=GenSlots.zeros(B, Hkv, max_new, D, k.dtype), lengths=n, n_sel=n_sel, cand_end=cand_end)

    @staticmethod
    def _select(a_k, hq, cand_end, n_sel, K):
        """Top-K prompt tokens per query head by the proxy ``q̂·A_Kᵀ`` among positions ``< cand_end``.
        a_k ``[B, H, Tb, r]``, hq ``[B, H, r]`` -> (ids int32 ``[B, H, K]``, ok bool ``[B, H, K]``)."""
        Tb = a_k.shape[2]
        s = jnp.einsum("bhtr,bhr->bht", a_k.astype(jnp.float32), hq.astype(jnp.float32), precision=_HI)
        s = jnp.where((jnp.arange(Tb)[None, :] < cand_end[:, None])[:, None, :], s, -jnp.inf)
        vals, ids = top_k(s, K)
        ok = (jnp.arange(K)[None, None, :] < n_sel[:, None, None]) & (vals > -jnp.inf)
        return ids.astype(jnp.int32), ok

    def proxy_scores(self, st: LRQKState, layer, hq) -> jax.Array:
        """``q̂ · A_Kᵀ`` for every prompt token: float32 ``[B, H, Tb]``."""
        return jnp.einsum("bhtr,bhr->bht", st.a_k[layer].astype(jnp.float32), hq.astype(jnp.float32), precision=_HI)

    # -- decode
    def decode(self, mcfg, st: LRQKState, layer, q, k_pre, k, v, pos, h=None):
        cfg = self.config
        n = st.lengths[layer]
        gen = st.gen.append(layer, k, v, pos, n)
        B, Hkv, D = k.shape
        H = q.shape[1]
        G = H // Hkv
        K = st.buf_idx.shape[-1]
        W = st.win_pos.shape[-1]
        gen_ok = gen.valid(pos, n)

        def sparse():
            a_k = st.a_k[layer]
            # Ω = previously selected ∪ lite window: keys per query head and their A_K rows
            prev = st.buf_idx[layer]  # [B, H, K]
            k_prev = st.buf_kv[layer][..., 0, :].reshape(B, H, K, D)
            wk = jnp.broadcast_to(st.win_kv[layer][:, :, None, :, 0, :], (B, Hkv, G, W, D)).reshape(B, H, W, D)
            wpos = jnp.broadcast_to(st.win_pos[layer][:, None, :], (B, H, W))
            act_pos = jnp.concatenate([prev, wpos], axis=2)
            act_ok = act_pos >= 0
            A_act = take_rows(a_k, jnp.maximum(act_pos, 0))
            K_act = jnp.concatenate([k_prev, wk.astype(k_prev.dtype)], axis=2)
            hq, _, B_Q, B_K = lrqk_project(q, jnp.repeat(k, G, axis=1), st.b_q[layer], st.b_k[layer], K_act, A_act,
                                           act_ok, cfg.lam_decode, cfg.decode_iters)
            ids, ok = self._select(a_k, hq, st.cand_end[layer], st.n_sel[layer], K)
            rows = fetch_rows(st.kv_store, layer, ids.reshape(B, Hkv, G * K), backend=cfg.fetch_backend)
            rows = rows.astype(st.buf_kv.dtype)
            own = rows.reshape(B, Hkv, G, K, 2, D)
            shared_k = jnp.concatenate([st.win_kv[layer][..., 0, :], gen.k[layer]], axis=2)
            shared_v = jnp.concatenate([st.win_kv[layer][..., 1, :], gen.v[layer]], axis=2)
            shared_ok = jnp.concatenate([bcast_heads(st.win_pos[layer] >= 0, Hkv), bcast_heads(gen_ok, Hkv)], axis=2)
            out = attend_per_query_head(q, own[..., 0, :], own[..., 1, :], ok.reshape(B, Hkv, G, K),
                                        shared_k, shared_v, shared_ok)
            return (out, rows, jnp.where(ok, ids, -1), B_Q.astype(st.b_q.dtype), B_K.astype(st.b_k.dtype))

        def dense():
            out = dense_attend(q, st.kv_store, layer, cfg.fetch_backend, n, gen, gen_ok)
            return (out, st.buf_kv[layer], st.buf_idx[layer], st.b_q[layer], st.b_k[layer])

        out, rows, idx, B_Q, B_K = layer_cond(cfg.dense_layers, layer, dense, sparse)
        st = st.replace(gen=gen, buf_kv=st.buf_kv.at[layer].set(rows),
                        buf_idx=st.buf_idx.at[layer].set(idx), b_q=st.b_q.at[layer].set(B_Q),
                        b_k=st.b_k.at[layer].set(B_K))
        return out, st

    def attended_mask(self, mcfg, st: LRQKState, layer, q, pos):
        """bool ``[B, Hkv, Tb]``: prompt tokens attended in this layer by any query head of the group at the latest
        decode step (its stored selection ∪ the lite window; every prompt token in a dense layer).

        LRQK's selection comes out of the decode-time solve, which also updates ``B_Q, B_K``; recomputing it from
        ``q`` alone would need the step's new key too, so the mask reports the stored selection and ``q`` is unused.
        """
        B, Hkv, Tb = st.kv_store.shape[1:4]
        n = st.lengths[layer]
        idx = st.buf_idx[layer].reshape(B, Hkv, -1)
        bi = jnp.arange(B)[:, None, None]
        hi = jnp.arange(Hkv)[None, :, None]
        m = jnp.zeros((B, Hkv, Tb + 1), jnp.int8).at[bi, hi, jnp.where(idx >= 0, idx, Tb)].max(1)[..., :Tb] > 0
        t = jnp.arange(Tb)[None, :]
        win = (t >= st.cand_end[layer][:, None]) & (t < n[:, None])
        m = m | win[:, None, :]
        inside = jnp.broadcast_to((t < n[:, None])[:, None, :], m.shape)
        return jnp.where(jnp.asarray(layer) < self.config.dense_layers, inside, m)


__all__ = ["LRQKConfig", "LRQKPolicy", "LRQKState", "lrqk_factorize", "lrqk_objective", "lrqk_project",
           "topcol_init"]
