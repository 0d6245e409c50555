"""``shadowkv``: ShadowKV (Sun et al., 2024) as the paper evaluates it (algorithms.md §2, eval path ``ShadowKVCache``).

What is kept, per layer and sequence (``[L]`` leading axis on every leaf, added by the prefill's layer scan):

=============  ===========================  ======================================================================
field          shape (per layer)            meaning
=============  ===========================  ======================================================================
``u``          ``[B, Tb, r]`` device         ``U_r`` of the rank-r SVD of the pre-RoPE keys ``[T, C]`` (C = Hkv·D)
``sv``         ``[B, Hkv, r, D]`` device     ``Σ_r V_rᵀ`` reshaped per KV head
``landmarks``  ``[B, Hkv, NC, D]`` device    mean of each chunk of ``c`` post-RoPE keys (NC = Tb // c slots)
``lm_valid``   ``[B, Hkv, NC]`` device       chunk is a landmark: inside the prompt, not local, not an outlier
``local_k/v``  ``[B, Hkv, Lw, D]`` device    exact local window (the last ``local + T mod c`` prompt tokens)
``out_ids``    ``[B, Hkv, O]`` device        outlier chunk ids (smallest min-cosine to their landmark)
``out_k/v``    ``[B, Hkv, O·c, D]`` device   exact keys/values of the outlier chunks
``gen``        ``[B, Hkv, max_new, D]``      exact generated tokens (appended every step, never scored; GenSlots)
``v_store``    ``[B, Hkv, Tb, D]`` **host**  all prompt values (pinned_host; on device with ``fetch_backend="device"``)
``lengths``,   ``[B]`` int32                 prompt length, local-window start / length, outlier and selected chunks
``local_start``, ``local_len``, ``n_out``, ``n_sel``
=============  ===========================  ======================================================================

Decode (§2.3), per layer and KV head: softmax over the landmarks of ``q·l/√D`` per query head (fp32, cast to the
model dtype), max over the GQA group, ``lax.top_k`` of ``n_sel`` chunks (ties: lower chunk id), keys rebuilt as
``RoPE(U_r[pos] · SV_r[h], pos)`` and values fetched from host memory with :func:`kvjax.offload.fetch_rows`; one exact
attention over local ∪ outliers ∪ selected ∪ generated.

Static shapes depend only on (batch, prompt bucket ``Tb``, ``max_new``, config): ``r = min(rank, C, Tb)``;
outlier and selection slots are sized for the budgets resolved at ``Tb`` (a float budget gives at most that many
tokens for any prompt of the bucket) and masked per sequence, so ragged batches and prompt lengths inside a bucket
never recompile.

Deviations from the eval-path code, on purpose:

- Pre-RoPE keys are recovered by rotating the (model-dtype) post-RoPE prefill keys back (:func:`unrope`); with bf16
  keys this adds bf16 rounding to the SVD input (the eval path has the pre-RoPE keys themselves).
- RoPE of the rebuilt keys uses fp32 cos/sin and fp32 arithmetic (then cast), as the model does; the eval path
  rotates in bf16 with bf16 tables.
- Batch size > 1 is supported (the eval path asserts B = 1): every budget is resolved per sequence.
- Padding chunks, local chunks and outliers stay in the landmark array but are masked (-inf before the softmax,
  below every probability before top-k) instead of being compacted away: same softmax, same top-k order and
  tie-breaking (ascending chunk ids) as the compacted landmark list.
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from models.transformer import rope

from ..attention import attend_rows
from ..cache import KV_AXES, SEQ_AXES, leaf
from ..offload import BACKENDS, fetch_rows
from .base import DEFAULT_MIN_SEQLEN_TO_PRUNE, Policy, PolicyConfig, concrete
from .common import GenSlots, budget_tokens, check_int, is_fraction, take_rows, top_k


@dataclasses.dataclass(frozen=True)
class ShadowKVConfig(PolicyConfig):
    """ShadowKV hyper-parameters (paper defaults, algorithms.md §2.1 and §9).

    - ``rank``: rank r of the SVD of the pre-RoPE keys (160). Clipped to ``min(T, C)`` (C = Hkv·head_dim): beyond
      that the singular values are zero and the factorisation is exact, so a larger rank changes nothing.
    - ``chunk_size``: tokens per landmark chunk c (8).
    - ``local_budget``: exact local window at the end of the prompt, tokens (32 = 4 chunks); the ``T mod c``
      remainder tokens join it.
    - ``outlier_budget``: tokens of exact outlier chunks (384 = 48 chunks), those with the smallest min-cosine
      similarity between the chunk's keys and its landmark.
    - ``sparse_budget``: tokens selected per step, per layer and KV head (2048, the model-class default; the paper's
      OpenCompass configs use 10240). A float is a fraction of the prompt T.

    Budgets given as a float in [0, 1] are fractions of each prompt: ``floor(floor(frac·T) / c)·c`` tokens
    (:func:`kvjax.policies.common.budget_tokens`). Integer local/outlier budgets must be multiples of ``c``; an
    integer sparse budget is rounded down to a multiple of ``c``.
    - ``fetch_backend``: how selected values come from host memory (:data:`kvjax.offload.BACKENDS`):
      ``"auto"`` (default: the Pallas DMA kernel on TPU, ``host_gather`` elsewhere; :mod:`kvjax.offload`), ``"dma"``, ``"host_gather"``, ``"chunk_slices"`` (one DMA
      per chunk), or ``"device"`` (values stay on the device: the eval path's offloading *simulation*).
    - ``min_seqlen_to_prune``: prompts of at most this many tokens are decoded exactly (full attention), as are
      prompts whose budgets leave nothing to prune.
    """

    rank: int = 160
    chunk_size: int = 8
    local_budget: int | float = 32
    outlier_budget: int | float = 384
    sparse_budget: int | float = 2048
    fetch_backend: str = "auto"
    min_seqlen_to_prune: int = DEFAULT_MIN_SEQLEN_TO_PRUNE

    def __post_init__(self):
        check_int("min_seqlen_to_prune", self.min_seqlen_to_prune, 0, "tokens")
        if isinstance(self.rank, bool) or not isinstance(self.rank, (int, np.integer)) or self.rank < 1:
            raise ValueError(f"rank={self.rank!r} must be an integer >= 1 (singular vectors)")
        if (isinstance(self.chunk_size, bool) or not isinstance(self.chunk_size, (int, np.integer))
                or self.chunk_size < 1):
            raise ValueError(f"chunk_size={self.chunk_size!r} must be an integer >= 1 tokens")
        for name in ("local_budget", "outlier_budget", "sparse_budget"):
            b = getattr(self, name)
            if isinstance(b, bool) or not isinstance(b, (int, float, np.integer, np.floating)):
                raise TypeError(f"{name}={b!r} must be a float fraction of the prompt in [0, 1] or an int token count")
            if isinstance(b, (float, np.floating)):
                if not 0.0 <= b <= 1.0:
                    raise ValueError(f"{name}={b} as a fraction of the prompt must be in [0, 1]")
            elif b < 0:
                raise ValueError(f"{name}={b} tokens must be >= 0")
            elif name != "sparse_budget" and b % self.chunk_size:
                raise ValueError(f"{name}={b} tokens must be a multiple of chunk_size={self.chunk_size} tokens")
        if self.fetch_backend not in BACKENDS:
            raise ValueError(f"fetch_backend={self.fetch_backend!r} must be one of {BACKENDS}")


@struct.dataclass
class ShadowKVState:
    """Layer-stacked ShadowKV state (see the module docstring for every field's shape and placement)."""

    u: jax.Array = leaf(*SEQ_AXES)
    sv: jax.Array = leaf(*KV_AXES)
    landmarks: jax.Array = leaf(*KV_AXES)
    lm_valid: jax.Array = leaf(*KV_AXES)
    local_k: jax.Array = leaf(*KV_AXES)
    local_v: jax.Array = leaf(*KV_AXES)
    out_ids: jax.Array = leaf(*KV_AXES)
    out_k: jax.Array = leaf(*KV_AXES)
    out_v: jax.Array = leaf(*KV_AXES)
    gen: GenSlots = leaf(*KV_AXES)
    v_store: jax.Array = leaf(*KV_AXES)
    lengths: jax.Array = leaf(*SEQ_AXES)
    local_start: jax.Array = leaf(*SEQ_AXES)
    local_len: jax.Array = leaf(*SEQ_AXES)
    n_out: jax.Array = leaf(*SEQ_AXES)
    n_sel: jax.Array = leaf(*SEQ_AXES)


# ----------------------------------------------------------------------------- helpers
def unrope(mcfg, k: jax.Array, positions: jax.Array) -> jax.Array:
    """Inverse RoPE: the pre-RoPE key (float32) from a post-RoPE key ``[..., T, D]`` (rotation by ``-p·θ``)."""
    return rope(mcfg, k, positions, inverse=True, dtype=jnp.float32)


def _chunk_tokens(ids: jax.Array, c: int) -> jax.Array:
    """Chunk ids ``[..., K]`` -> token positions ``[..., K·c]`` (each chunk's c tokens in order)."""
    if c == 1:
        return ids
    return (ids[..., None] * c + jnp.arange(c, dtype=ids.dtype)).reshape(*ids.shape[:-1], ids.shape[-1] * c)


# ----------------------------------------------------------------------------- policy
class ShadowKVPolicy(Policy):
    """ShadowKV: low-rank pre-RoPE keys + chunk landmarks + exact outliers/local window on device, values on host."""

    name = "shadowkv"
    config_class = ShadowKVConfig
    offloaded_fields = ("v_store",)

    @property
    def fixed_fields(self) -> tuple[str, ...]:
        """Buffers that do not grow with the prompt: SV_r, generated slots, per-sequence counters, and the
        local/outlier buffers when those budgets are token counts (not fractions)."""
        cfg = self.config
        fixed = ["sv", "gen", "lengths", "local_start", "local_len", "n_out", "n_sel"]
        if not is_fraction(cfg.local_budget):
            fixed += ["local_k", "local_v"]
        if not is_fraction(cfg.outlier_budget):
            fixed += ["out_ids", "out_k", "out_v"]
        return tuple(fixed)

    # -- shapes
    def fetch_bucket_tokens(self, Tb: int) -> int:
        c = self.config.chunk_size
        return min(budget_tokens(self.config.sparse_budget, Tb, multiple=c) // c, Tb // c) * c

    def tokens_fetched(self, state):
        n_sel = concrete(state.n_sel)
        if n_sel is None or not self.host_fields:
            return None
        return n_sel.astype(np.int64) * self.config.chunk_size

    def static_sizes(self, mcfg, Tb: int, max_new: int = 0) -> dict:
        """Static sizes for a prompt bucket of ``Tb`` tokens: ``r`` (SVD rank kept), ``NC`` (landmark slots),
        ``Lw`` (local-window slots), ``O`` (outlier chunk slots), ``K`` (selected chunk slots)."""
        cfg, c = self.config, self.config.chunk_size
        C = mcfg.num_kv_heads * mcfg.head_dim
        NC = Tb // c
        local = budget_tokens(cfg.local_budget, Tb, multiple=c)
        return {
            "r": min(cfg.rank, C, Tb),
            "NC": NC,
            "Lw": min(Tb, local + c - 1),
            "O": min(budget_tokens(cfg.outlier_budget, Tb, multiple=c) // c, NC),
            "K": min(budget_tokens(cfg.sparse_budget, Tb, multiple=c) // c, NC),
        }

    def partition(self, T):
        """The §2.2 partition of prompts of ``T`` tokens (int or numpy int array), in tokens / chunks: ``local``
        window (incl. the ``T mod c`` remainder), ``n_chunks`` candidate chunks, ``outlier_chunks``, ``landmarks``
        and ``select_chunks`` (top-k size). Budgets larger than what the prompt holds are capped (such prompts are
        not pruned: :meth:`can_prune`)."""
        cfg, c = self.config, self.config.chunk_size
        T = np.asarray(T, np.int64)
        loc = budget_tokens(cfg.local_budget, T, multiple=c)
        n_chunks = T // c - loc // c
        n_out = np.minimum(budget_tokens(cfg.outlier_budget, T, multiple=c) // c, n_chunks)
        n_land = n_chunks - n_out
        n_sel = np.minimum(budget_tokens(cfg.sparse_budget, T, multiple=c) // c, n_land)
        out = {"T": T, "local": T - n_chunks * c, "n_chunks": n_chunks, "outlier_chunks": n_out,
               "landmarks": n_land, "select_chunks": n_sel}
        return {k: (int(v) if v.ndim == 0 else v) for k, v in out.items()}

    def per_sequence_budgets(self, lengths) -> list[dict]:
        """:meth:`partition` of every prompt."""
        return [self.partition(T) for T in np.asarray(lengths).reshape(-1).tolist()]

    def can_prune(self, mcfg, T: int) -> bool:
        """Some landmark chunk is left unselected (else every key would come from the low-rank factors for
        nothing: such prompts decode exactly)."""
        p = self.partition(T)
        return p["select_chunks"] < p["landmarks"]

    def validate(self, mcfg, lengths, max_new):
        if max_new < 1:
            raise ValueError(f"max_new={max_new} generated-token slots must be >= 1")
        if mcfg.head_dim % 2:
            raise ValueError(f"head_dim={mcfg.head_dim} must be even for RoPE")

    # -- prefill
    def build(self, mcfg, k, v, lengths, max_new, extra=None, q=None):
        """One layer's state from its post-RoPE prefill keys/values ``[B, Hkv, Tb, D]`` (§2.2)."""
        c = self.config.chunk_size
        B, Hkv, Tb, D = k.shape
        sz = self.static_sizes(mcfg, Tb, max_new)
        r, NC, Lw, O = sz["r"], sz["NC"], sz["Lw"], sz["O"]
        dt = k.dtype
        lengths = lengths.astype(jnp.int32)
        table = {name: jnp.asarray(t.astype(np.int32)) for name, t in self.partition(np.arange(Tb + 1)).items()}
        n_chunks = table["n_chunks"][lengths]
        local_start = n_chunks * c
        local_len = lengths - local_start
        n_out = table["outlier_chunks"][lengths]
        n_sel = table["select_chunks"][lengths]
        tpos = jnp.arange(Tb, dtype=jnp.int32)
        tok_valid = tpos[None, :] < lengths[:, None]  # [B, Tb]

        # 1. rank-r SVD of the pre-RoPE keys [T, C] (head-major rows), fp32; padding rows zeroed so they do not
        #    change the factors (the non-zero singular triplets of [K; 0] are those of K, with U's rows padded by 0)
        k_pre = unrope(mcfg, k, tpos)  # [B, Hkv, Tb, D] f32
        k_pre = jnp.where(tok_valid[:, None, :, None], k_pre, 0.0)
        mat = k_pre.transpose(0, 2, 1, 3).reshape(B, Tb, Hkv * D)
        U, S, Vt = jnp.linalg.svd(mat, full_matrices=False)
        # rows of padding tokens are zero in every column with a non-zero singular value; columns of zero singular
        # values (T < r) are an arbitrary orthonormal completion, so clear the padding rows explicitly
        u = jnp.where(tok_valid[:, :, None], U[..., :r], 0.0).astype(dt)  # [B, Tb, r]
        sv = (S[:, :r, None] * Vt[:, :r, :]).reshape(B, r, Hkv, D).transpose(0, 2, 1, 3).astype(dt)

        # 2. landmarks: chunk means of post-RoPE keys; min cosine of each chunk's keys to its landmark
        kc = k[:, :, :NC * c].astype(jnp.float32).reshape(B, Hkv, NC, c, D)
        landmarks = jnp.mean(kc, axis=3).astype(dt)
        lf = landmarks.astype(jnp.float32)
        dots = jnp.einsum("bhncd,bhnd->bhnc", kc, lf)
        norms = jnp.linalg.norm(kc, axis=-1) * jnp.linalg.norm(lf, axis=-1)[..., None]
        min_cos = jnp.min(dots / jnp.maximum(norms, 1e-30), axis=-1)  # [B, Hkv, NC]
        chunk_ids = jnp.arange(NC, dtype=jnp.int32)
        cand = jnp.broadcast_to((chunk_ids[None, :] < n_chunks[:, None])[:, None, :], (B, Hkv, NC))

        # 3. outlier chunks: the n_out candidates with the smallest min-cosine (c == 1: the first chunks)
        if O > 0:
            if c == 1:
                out_ids = jnp.broadcast_to(jnp.arange(O, dtype=jnp.int32), (B, Hkv, O))
            else:
                _, out_ids = top_k(jnp.where(cand, -min_cos, -jnp.inf), O)
                out_ids = out_ids.astype(jnp.int32)
            slot_ok = jnp.broadcast_to((jnp.arange(O)[None, :] < n_out[:, None])[:, None, :], (B, Hkv, O))
            bi = jnp.arange(B)[:, None, None]
            hi = jnp.arange(Hkv)[None, :, None]
            is_out = jnp.zeros((B, Hkv, NC), jnp.int8).at[bi, hi, out_ids].max(slot_ok.astype(jnp.int8)) > 0
        else:
            out_ids = jnp.zeros((B, Hkv, 0), jnp.int32)
            is_out = jnp.zeros((B, Hkv, NC), bool)
        out_tok = _chunk_tokens(out_ids, c)
        lm_valid = cand & ~is_out

        # 4. local window (exact): tokens [n_chunks·c, T)
        ltok = jnp.minimum(local_start[:, None] + jnp.arange(Lw, dtype=jnp.int32)[None, :], Tb - 1)
        ltok = jnp.broadcast_to(ltok[:, None, :], (B, Hkv, Lw))

        return ShadowKVState(
            u=u, sv=sv, landmarks=landmarks, lm_valid=lm_valid,
            local_k=take_rows(k, ltok), local_v=take_rows(v, ltok),
            out_ids=out_ids, out_k=take_rows(k, out_tok), out_v=take_rows(v, out_tok),
            gen=GenSlots.zeros(B, Hkv, max_new, D, dt), v_store=v,
            lengths=lengths, local_start=local_start, local_len=local_len, n_out=n_out, n_sel=n_sel)

    # -- decode
    def select_chunks(self, mcfg, st: ShadowKVState, layer, q):
        """Landmark scoring and top-k (§2.3 step 3). q ``[B, H, D]`` post-RoPE.

        Returns (chunk ids int32 ``[B, Hkv, K]``, sorted by score, largest first; bool ``[B, Hkv, K]`` slot
        valid, i.e. ``slot < n_sel[b]``).
        """
        lm = st.landmarks[layer]  # [B, Hkv, NC, D]
        valid = st.lm_valid[layer]
        n_sel = st.n_sel[layer]
        B, Hkv, NC, D = lm.shape
        K = self.static_sizes(mcfg, st.v_store.shape[3], 1)["K"]
        dt = lm.dtype
        qg = q.reshape(B, Hkv, -1, D).astype(dt)
        s = jnp.einsum("bhgd,bhnd->bhgn", qg, lm, preferred_element_type=jnp.float32) * (1.0 / math.sqrt(D))
        s = jnp.where(valid[:, :, None, :], s.astype(dt).astype(jnp.float32), -jnp.inf)
        p = jax.nn.softmax(s, axis=-1).astype(dt)  # fp32 softmax, cast back to the model dtype
        a = jnp.max(p, axis=2).astype(jnp.float32)  # max over the GQA group
        a = jnp.where(valid, a, -1.0)  # below every probability, so masked chunks lose every tie
        kk = max(K, 1)
        _, ids = top_k(a, kk)
        ok = jnp.broadcast_to((jnp.arange(kk)[None, :] < n_sel[:, None])[:, None, :], (B, Hkv, kk))
        if K == 0:
            ok = jnp.zeros_like(ok)
        return ids.astype(jnp.int32), ok

    def decode(self, mcfg, st, layer, q, k_pre, k, v, pos, h=None):
        c = self.config.chunk_size
        T = st.lengths[layer]
        gen = st.gen.append(layer, k, v, pos, T)
        st = st.replace(gen=gen)

        ids, ok = self.select_chunks(mcfg, st, layer, q)
        tok = _chunk_tokens(ids, c)  # [B, Hkv, K·c] absolute prompt positions
        ok_tok = jnp.repeat(ok, c, axis=2) if c > 1 else ok
        # keys: RoPE(U_r[pos] · SV_r[h], pos)
        u_rows = jax.vmap(lambda u_b, t_b: u_b[t_b])(st.u[layer], tok)  # [B, Hkv, K·c, r]
        k_sel = jnp.einsum("bhtr,bhrd->bhtd", u_rows, st.sv[layer], preferred_element_type=jnp.float32)
        k_sel = rope(mcfg, k_sel.astype(st.sv.dtype), tok)
        # values: from the (host) store
        backend = self.config.fetch_backend
        if backend == "host_gather":
            v_sel = fetch_rows(st.v_store, layer, tok, backend="host_gather")
        else:
            v_sel = fetch_rows(st.v_store, layer, ids * c, backend=backend, chunk=c)

        B, Hkv = ids.shape[:2]
        Lw, O = st.local_k.shape[3], st.out_ids.shape[3]
        loc_ok = jnp.arange(Lw)[None, :] < st.local_len[layer][:, None]
        out_ok = jnp.arange(O * c)[None, :] < (st.n_out[layer] * c)[:, None]
        gen_ok = gen.valid(pos, T)
        bh = lambda m: jnp.broadcast_to(m[:, None, :], (B, Hkv, m.shape[-1]))  # noqa: E731
        keys = jnp.concatenate([st.local_k[layer], st.out_k[layer], k_sel.astype(gen.k.dtype), gen.k[layer]], axis=2)
        vals = jnp.concatenate([st.local_v[layer], st.out_v[layer], v_sel.astype(gen.v.dtype), gen.v[layer]], axis=2)
        valid = jnp.concatenate([bh(loc_ok), bh(out_ok), ok_tok, bh(gen_ok)], axis=2)
        return attend_rows(q, keys, vals, valid), st

    def attended_mask(self, mcfg, st, layer, q, pos):
        """bool ``[B, Hkv, Tb]``: prompt tokens attended at this step in this layer (local ∪ outliers ∪ selected)."""
        c = self.config.chunk_size
        B, Hkv, NC = st.lm_valid.shape[1:4]
        Tb = st.v_store.shape[3]
        ids, ok = self.select_chunks(mcfg, st, layer, q)
        O = st.out_ids.shape[3]
        bi = jnp.arange(B)[:, None, None]
        hi = jnp.arange(Hkv)[None, :, None]
        chunk_m = jnp.zeros((B, Hkv, NC), jnp.int8).at[bi, hi, ids].max(ok.astype(jnp.int8))
        if O:
            out_ok = jnp.broadcast_to((jnp.arange(O)[None, :] < st.n_out[layer][:, None])[:, None, :], (B, Hkv, O))
            chunk_m = chunk_m.at[bi, hi, st.out_ids[layer]].max(out_ok.astype(jnp.int8))
        tok_m = jnp.repeat(chunk_m > 0, c, axis=2)
        tok_m = jnp.pad(tok_m, ((0, 0), (0, 0), (0, Tb - NC * c)))
        t = jnp.arange(Tb)[None, :]
        start, n = st.local_start[layer][:, None], st.local_len[layer][:, None]
        loc = (t >= start) & (t < start + n)
        return tok_m | loc[:, None, :]


__all__ = ["ShadowKVConfig", "ShadowKVPolicy", "ShadowKVState", "rope", "unrope"]
