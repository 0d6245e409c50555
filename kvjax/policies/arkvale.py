"""``arkvale``: ArkVale (Chen et al., NeurIPS 2024) as the paper runs it (the authors' fork, algorithms.md §5, §9),
and the page machinery Quest shares (digests, box bound, page selection).

ArkVale splits the prompt's KV cache into pages of ``page_size = 16`` tokens. Every full page keeps a small
**digest** of its keys on the device: the elementwise minimum and maximum of the page's post-RoPE keys (a
bounding box, per KV head). At each decode step, per layer and KV head, a page is scored by the largest value
``q·k`` can take over its box,

    bound(q, page) = Σ_d max(q_d · min_d, q_d · max_d)  ≥  q·k   for every key k of the page,

computed per query head and reduced by the **max over the GQA group** (the fork selects per KV head,
``group_size = 1``). The ``n_sink_pages = 2`` first and ``n_win_pages = 5`` last pages of the prompt are always
attended; of the pages between them the top-``K`` by bound are fetched, at full precision, from the host copy of
the prompt's K/V. ``K = max(1, ceil(int(budget·T) / page_size))`` pages with ``budget = 1/128`` of the prompt
(the fork's ``token_budget = 0.015625/2``; its ``page_topks`` bookkeeping reduces to exactly this many selected
pages on top of the sink and window pages). Generated tokens are kept on the device and always attended (the
fork's change; an upper bound on ArkVale). Every layer is sparse (``n_unlimited_layers = 0``).

State of one layer (``[L]`` leading axis added by the engine; K = selected-page slots, R = resident tokens):

=============  ================================  =============================================================
field          shape (per layer)                 meaning
=============  ================================  =============================================================
``kv_store``   ``[B, Hkv, Tb, 2, D]`` **host**   every prompt token's key and value (pinned_host)
``dmin/dmax``  ``[B, Hkv, NP, D]`` device        per-page key digest (NP = Tb / page_size pages)
``res_kv``     ``[B, Hkv, R, 2, D]`` device      sink pages and window pages, exact (R = (sink + win)·page)
``res_pos``    ``[B, R]`` int32                  prompt position of each resident row, -1 if empty
``buf_kv``     ``[B, Hkv, K·page, 2, D]`` device the recall buffer: the K pages fetched at the latest step
``buf_pages``  ``[B, Hkv, K]`` int32             page ids in the recall buffer (-1: empty or masked slot)
``gen``        ``[B, Hkv, max_new, D]`` device   generated tokens (k, v: :class:`~kvjax.policies.common.GenSlots`)
``lengths``,   ``[B]`` int32                     prompt length, selected pages per sequence, first window page
``n_sel``, ``cand_end``
=============  ================================  =============================================================

The recall buffer is ArkVale's device page pool: it holds exactly what the step attends, so the device memory the
budget costs appears in :meth:`memory_report`. Every selected page is fetched each step (no hit/miss reuse across
steps), i.e. the host→device traffic is an upper bound of ArkVale's.

Shapes depend only on (batch, prompt bucket ``Tb``, ``max_new``, config): ``K`` is the page count the budget gives
for a prompt of ``Tb`` tokens (the largest over the bucket), masked per sequence, so prompts of one bucket never
recompile.
"""
from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from ..attention import attend_rows
from ..cache import KV_AXES, SEQ_AXES, leaf
from ..offload import BACKENDS, fetch_rows
from .base import DEFAULT_MIN_SEQLEN_TO_PRUNE, Policy, PolicyConfig, concrete
from .common import (GenSlots, bcast_heads, budget_tokens, check_budget, check_common, check_int, dense_attend,
                     layer_cond, length_table, pack_kv, take_rows, top_k)

_HI = jax.lax.Precision.HIGHEST


# ============================================================================= page digests (ArkVale, Quest)
def page_digests(k: jax.Array, lengths: jax.Array, page_size: int) -> tuple[jax.Array, jax.Array]:
    """Per-page bounding box of the keys: k ``[B, Hkv, Tb, D]`` -> (min, max) ``[B, Hkv, Tb/page, D]`` in k's dtype.

    Rows at or beyond ``lengths[b]`` are ignored; a page with no valid row gets a zero box (such pages are never
    candidates). The digest values are key values themselves (no rounding)."""
    B, H, Tb, D = k.shape
    NP = Tb // page_size
    kp = k.reshape(B, H, NP, page_size, D)
    valid = (jnp.arange(Tb) < lengths[:, None]).reshape(B, 1, NP, page_size, 1)
    big = jnp.asarray(jnp.inf, k.dtype)
    dmin = jnp.min(jnp.where(valid, kp, big), axis=3)
    dmax = jnp.max(jnp.where(valid, kp, -big), axis=3)
    any_valid = jnp.any(valid, axis=3)
    zero = jnp.zeros((), k.dtype)
    return jnp.where(any_valid, dmin, zero), jnp.where(any_valid, dmax, zero)


def page_bound(q: jax.Array, dmin: jax.Array, dmax: jax.Array) -> jax.Array:
    """Upper bound of ``q·k`` over each page's box, per query head: float32 ``[B, Hkv, G, NP]``.

    q ``[B, H, D]`` (post-RoPE), dmin/dmax ``[B, Hkv, NP, D]``. ``Σ_d max(q_d·min_d, q_d·max_d)`` is evaluated as
    ``q·c + |q|·r`` with the box centre ``c = (min+max)/2`` and half-width ``r = (max-min)/2`` (the two agree term by
    term: q_d ≥ 0 gives q_d·max_d, q_d < 0 gives q_d·min_d), i.e. two matmuls at float32 ``HIGHEST`` precision.
    """
    B, H, D = q.shape
    Hkv = dmin.shape[1]
    qg = q.reshape(B, Hkv, H // Hkv, D).astype(jnp.float32)
    lo, hi = dmin.astype(jnp.float32), dmax.astype(jnp.float32)
    c, r = (lo + hi) * 0.5, (hi - lo) * 0.5
    return (jnp.einsum("bhgd,bhnd->bhgn", qg, c, precision=_HI)
            + jnp.einsum("bhgd,bhnd->bhgn", jnp.abs(qg), r, precision=_HI))


# ============================================================================= page-sparse policies
@dataclasses.dataclass(frozen=True)
class PageConfig(PolicyConfig):
    """Hyper-parameters shared by the page policies (ArkVale, Quest); see the subclasses for defaults.

    - ``page_size``: tokens per page (a power of two, so it divides every prompt bucket).
    - ``budget``: selected prompt tokens, a float fraction of the prompt or an int token count (rounded to pages
      as each policy describes).
    - ``n_sink_pages`` / ``n_win_pages``: first / last prompt pages always attended (resident on the device).
    - ``dense_layers``: the first layers attend every token (fetched whole from host memory).
    - ``fetch_backend``: :data:`kvjax.offload.BACKENDS`; ``"auto"`` (default: the Pallas DMA kernel on TPU, ``host_gather`` elsewhere; :mod:`kvjax.offload`) — one DMA per page on TPU;
      ``"chunk_slices"`` is a dynamic-slice per page; ``"device"`` keeps the store on the device (the eval path's
      offloading simulation).
    - ``min_seqlen_to_prune``: prompts of at most this many tokens are decoded exactly (full attention).
    """

    page_size: int = 16
    budget: float | int = 0.0078125
    n_sink_pages: int = 2
    n_win_pages: int = 5
    dense_layers: int = 0
    fetch_backend: str = "auto"
    min_seqlen_to_prune: int = DEFAULT_MIN_SEQLEN_TO_PRUNE

    def __post_init__(self):
        check_int("page_size", self.page_size, 1, "tokens")
        if self.page_size & (self.page_size - 1):
            raise ValueError(f"page_size={self.page_size} tokens must be a power of two (it must divide the "
                             "power-of-two prompt bucket)")
        check_budget("budget", self.budget)
        check_int("n_sink_pages", self.n_sink_pages, 0, "pages")
        check_int("n_win_pages", self.n_win_pages, 0, "pages")
        check_int("dense_layers", self.dense_layers, 0, "layers")
        check_int("min_seqlen_to_prune", self.min_seqlen_to_prune, 0, "tokens")
        if self.fetch_backend not in BACKENDS:
            raise ValueError(f"fetch_backend={self.fetch_backend!r} must be one of {BACKENDS}")


@struct.dataclass
class PageState:
    """Layer-stacked state of the page policies (fields in the :mod:`kvjax.policies.arkvale` docstring)."""

    kv_store: jax.Array = leaf(*KV_AXES)
    dmin: jax.Array = leaf(*KV_AXES)
    dmax: jax.Array = leaf(*KV_AXES)
    res_kv: jax.Array = leaf(*KV_AXES)
    res_pos: jax.Array = leaf(*SEQ_AXES)
    buf_kv: jax.Array = leaf(*KV_AXES)
    buf_pages: jax.Array = leaf(*KV_AXES)
    gen: GenSlots = leaf(*KV_AXES)
    lengths: jax.Array = leaf(*SEQ_AXES)
    n_sel: jax.Array = leaf(*SEQ_AXES)
    cand_end: jax.Array = leaf(*SEQ_AXES)


class PagePolicy(Policy):
    """Page-level selection by key bounding boxes, exact K/V of the chosen pages fetched from host memory.

    Subclasses define :meth:`selected_pages` (the budget rule) and the config defaults.
    """

    name = "base"
    fetched_rows_in_state = True  # the recall buffer of attended rows is part of the state
    config_class = PageConfig
    budget_knob: ClassVar[str] = "budget"
    offloaded_fields = ("kv_store",)

    # -- budget rule
    def selected_pages(self, n: int) -> int:
        """Pages picked by top-k for a prompt of ``n`` tokens (Python int)."""
        raise NotImplementedError

    @property
    def fixed_fields(self) -> tuple[str, ...]:
        fixed = ["res_kv", "res_pos", "gen", "lengths", "n_sel", "cand_end"]
        if not isinstance(self.config.budget, (float, np.floating)):
            fixed += ["buf_kv", "buf_pages"]
        return tuple(fixed)

    def static_sizes(self, mcfg, Tb: int, max_new: int) -> dict:
        """Static sizes for a prompt bucket of ``Tb`` tokens: ``NP`` pages, ``K`` selected-page slots (the largest
        page count of the bucket), ``R`` resident (sink + window) token slots."""
        cfg = self.config
        NP = Tb // cfg.page_size
        K = max(1, min(self.selected_pages(Tb), NP))
        R = min((cfg.n_sink_pages + cfg.n_win_pages) * cfg.page_size, Tb)
        return {"NP": NP, "K": K, "R": R}

    def validate(self, mcfg, lengths, max_new):
        check_common(mcfg, lengths, max_new, self.config.dense_layers)

    def can_prune(self, mcfg, T: int) -> bool:
        """Some candidate page (not sink, not window) is left out: the selected pages do not cover them all."""
        ps, cfg = self.config.page_size, self.config
        n_pages = -(-T // ps)
        candidates = max(n_pages - cfg.n_win_pages, cfg.n_sink_pages) - cfg.n_sink_pages
        return candidates > self.selected_pages(T)

    def tokens_fetched(self, state):
        n_sel = concrete(state.n_sel)
        if n_sel is None or not self.host_fields:
            return None
        tok = n_sel.astype(np.int64) * self.config.page_size
        dense = np.arange(tok.shape[0]) < self.config.dense_layers  # dense layers fetch the whole prompt bucket
        return np.where(dense[:, None], state.kv_store.shape[3], tok)

    def fetch_bucket_tokens(self, Tb: int) -> int:
        return self.static_sizes(None, Tb, 1)["K"] * self.config.page_size

    # -- prefill
    def build(self, mcfg, k, v, lengths, max_new, extra=None, q=None):
        cfg, ps = self.config, self.config.page_size
        B, Hkv, Tb, D = k.shape
        if Tb % ps:
            raise ValueError(f"prompt bucket of {Tb} tokens is not a multiple of page_size={ps} tokens")
        sz = self.static_sizes(mcfg, Tb, max_new)
        NP, K, R = sz["NP"], sz["K"], sz["R"]
        ns, nw = cfg.n_sink_pages, cfg.n_win_pages
        n = lengths.astype(jnp.int32)
        n_pages = (n + ps - 1) // ps
        cand_end = jnp.maximum(n_pages - nw, ns)  # first window page; candidates are pages [ns, cand_end)
        n_sel = length_table(lambda t: max(1, min(self.selected_pages(t), NP)), Tb)[n]

        # resident rows: sink tokens [0, min(ns·ps, n)) then window tokens [cand_end·ps, n)
        ns_tok = min(ns * ps, R)
        j = jnp.arange(R, dtype=jnp.int32)
        in_sink = j < ns_tok
        pos = jnp.where(in_sink[None, :], j[None, :], cand_end[:, None] * ps + (j - ns_tok)[None, :])
        ok = jnp.where(in_sink[None, :], pos < jnp.minimum(n, ns * ps)[:, None], pos < n[:, None])
        res_pos = jnp.where(ok, pos, -1)
        tok = jnp.broadcast_to(jnp.clip(pos, 0, Tb - 1)[:, None, :], (B, Hkv, R))
        kv = pack_kv(k, v)
        dmin, dmax = page_digests(k, n, ps)
        return PageState(
            kv_store=kv, dmin=dmin, dmax=dmax, res_kv=take_rows(kv, tok), res_pos=res_pos,
            buf_kv=jnp.zeros((B, Hkv, K * ps, 2, D), k.dtype), buf_pages=jnp.full((B, Hkv, K), -1, jnp.int32),
            gen=GenSlots.zeros(B, Hkv, max_new, D, k.dtype), lengths=n, n_sel=n_sel, cand_end=cand_end)

    # -- decode
    def page_scores(self, q, dmin, dmax) -> jax.Array:
        """Score of every page for one KV head: float32 ``[B, Hkv, NP]`` (the max over the group of
        :func:`page_bound`)."""
        return jnp.max(page_bound(q, dmin, dmax), axis=2)

    def select_pages(self, mcfg, st: PageState, layer, q):
        """Top pages by bound among the candidates (not sink, not window, inside the prompt).

        Returns (page ids int32 ``[B, Hkv, K]``, largest score first, ties to the lower page id; bool ``[B, Hkv, K]``
        slot in use, i.e. rank < ``n_sel[b]`` and a real candidate).
        """
        dmin, dmax = st.dmin[layer], st.dmax[layer]
        B, Hkv, NP, _ = dmin.shape
        K = st.buf_pages.shape[-1]
        s = self.page_scores(q, dmin, dmax)
        p = jnp.arange(NP)[None, :]
        cand = (p >= self.config.n_sink_pages) & (p < st.cand_end[layer][:, None])  # [B, NP]
        s = jnp.where(cand[:, None, :], s, -jnp.inf)
        vals, ids = top_k(s, K)
        ok = (jnp.arange(K)[None, None, :] < st.n_sel[layer][:, None, None]) & (vals > -jnp.inf)
        return ids.astype(jnp.int32), ok

    def decode(self, mcfg, st: PageState, layer, q, k_pre, k, v, pos, h=None):
        cfg, ps = self.config, self.config.page_size
        n = st.lengths[layer]
        gen = st.gen.append(layer, k, v, pos, n)
        B, Hkv = k.shape[:2]
        gen_ok = gen.valid(pos, n)
        K = st.buf_pages.shape[-1]

        def sparse():
            ids, ok = self.select_pages(mcfg, st, layer, q)
            rows = fetch_rows(st.kv_store, layer, ids * ps, backend=cfg.fetch_backend, chunk=ps)  # [B,Hkv,K·ps,2,D]
            res = st.res_kv[layer]
            dt = gen.k.dtype
            keys = jnp.concatenate([res[..., 0, :], rows[..., 0, :].astype(dt), gen.k[layer]], axis=2)
            vals = jnp.concatenate([res[..., 1, :], rows[..., 1, :].astype(dt), gen.v[layer]], axis=2)
            valid = jnp.concatenate([bcast_heads(st.res_pos[layer] >= 0, Hkv), jnp.repeat(ok, ps, axis=2),
                                     bcast_heads(gen_ok, Hkv)], axis=2)
            out = attend_rows(q, keys, vals, valid)
            return out, rows.astype(st.buf_kv.dtype), jnp.where(ok, ids, -1)

        def dense():
            out = dense_attend(q, st.kv_store, layer, cfg.fetch_backend, n, gen, gen_ok)
            return (out, jnp.zeros(st.buf_kv.shape[1:], st.buf_kv.dtype),
                    jnp.full((B, Hkv, K), -1, jnp.int32))

        out, rows, pages = layer_cond(cfg.dense_layers, layer, dense, sparse)
        st = st.replace(gen=gen, buf_kv=st.buf_kv.at[layer].set(rows),
                        buf_pages=st.buf_pages.at[layer].set(pages))
        return out, st

    def attended_mask(self, mcfg, st: PageState, layer, q, pos):
        """bool ``[B, Hkv, Tb]``: prompt tokens this step attends in this layer (sinks ∪ window ∪ selected pages;
        every prompt token in a dense layer), recomputed from ``q`` and the state."""
        ps = self.config.page_size
        B, Hkv, Tb = st.kv_store.shape[1:4]
        NP = Tb // ps
        n = st.lengths[layer]
        ids, ok = self.select_pages(mcfg, st, layer, q)
        bi = jnp.arange(B)[:, None, None]
        hi = jnp.arange(Hkv)[None, :, None]
        page_m = jnp.zeros((B, Hkv, NP), jnp.int8).at[bi, hi, ids].max(ok.astype(jnp.int8)) > 0
        t = jnp.arange(Tb)[None, :]
        inside = t < n[:, None]
        res = inside & ((t < self.config.n_sink_pages * ps) | (t >= st.cand_end[layer][:, None] * ps))
        m = jnp.repeat(page_m, ps, axis=2) | res[:, None, :]
        dense = jnp.asarray(layer) < self.config.dense_layers
        return jnp.where(dense, jnp.broadcast_to(inside[:, None, :], m.shape), m)


# ============================================================================= ArkVale
@dataclasses.dataclass(frozen=True)
class ArkValeConfig(PageConfig):
    """ArkVale as the paper ran it (the authors' fork ``run_config.py``, algorithms.md §9): pages of 16 tokens,
    ``budget = 0.015625/2`` of the prompt (selected pages ``max(1, ceil(int(budget·T)/16))``), 2 sink pages, 5
    window pages, every layer sparse, pages fetched with one DMA each on TPU (``fetch_backend="auto"``) — the defaults of
    :class:`PageConfig`."""


class ArkValePolicy(PagePolicy):
    """ArkVale (fork): page digests on device, top pages by box bound (max over the GQA group) recalled from host."""

    name = "arkvale"
    config_class = ArkValeConfig

    def selected_pages(self, n: int) -> int:
        """The fork's rule: ``max(1, ceil(int(budget·n) / page_size))`` pages on top of the sink and window pages."""
        ps = self.config.page_size
        return max(1, -(-budget_tokens(self.config.budget, n) // ps))


__all__ = ["ArkValeConfig", "ArkValePolicy", "PageConfig", "PagePolicy", "PageState", "page_bound", "page_digests"]
