"""YAKV: per-token landmarks quantized to ~2 bits score every prompt token; the selected keys/values come from host.

The method of arXiv 2604.08426 (algorithms.md §3). Per layer and per KV head, every prompt token outside the
always-kept windows has a *landmark* — its own post-RoPE key (``chunk_size=1``), HIGGS-quantized with EDEN4-256
(2 bits/value; the authors' grid unless ``grids="kvjax"``) — kept on the device. Each decode step scores all
landmarks against the new query, takes the top-k, fetches those tokens' keys and values from the offloaded store in
host memory and attends exactly over

    sinks (prefix) ∪ selected ∪ local window (last prompt tokens) ∪ generated tokens.

Two configurations of the paper (``YakvConfig`` defaults = the accuracy-eval path, §3.1; preset ``"yakv-serving"`` =
the GPU inference path, §3.2):

==========================  ====================================  =========================================
                            eval (default)                        serving
==========================  ====================================  =========================================
sinks / local window        0 / last 64 prompt tokens             ceil(0.00625 T) / ceil(0.00625 T)
sparse budget               floor(T/32) tokens                    floor(0.015625 T), total >= 512
scoring                     max_g bf16(softmax_f32(q·l/√D))       bf16(mean_g(q) · l), no scale/softmax
landmark HIGGS group        one head (D), fp32 scales             whole token (C = Hkv·D)
offloaded keys              pre-RoPE, HIGGS d=2 n=256 (4 bit),    post-RoPE, fp8 e4m3
                            group C, quantize→dequantize
offloaded values            HIGGS d=2 n=256, group C, qdq         fp8 e4m3
no pruning when             T <= 0 (authors) / 512 (kvjax)        T <= 512 (``min_seqlen_to_prune``)
attended total raised to    -                                     >= 512 (``min_attended_tokens``)
==========================  ====================================  =========================================

What to expect against the authors' code. With the defaults (the paper's EDEN grids, ``grids="paper"``) kvjax's
HIGGS codes are the authors' codes, and its selections are theirs up to the rounding differences listed below. A
held-out comparison (issue 15: the authors' PyTorch eval-path YAKV vs kvjax, SmolLM2-135M, budget 1/32, 1.6k and
2.4k-token prompts, 32 teacher-forced steps) measured: in float32, per step/layer/KV head selected sets with mean
Jaccard 0.998 (identical in 94%), KL(authors || kvjax) = 1.8e-6 on the next-token distribution and identical
48-token greedy text; in bfloat16, Jaccard 0.861, which is the precision floor (bf16 moves the authors' *own*
selections to 0.872 against their float32 run; kvjax's bf16 forward pass is closer to float32 than theirs, KL to
the float32 reference 4.7e-4 vs 1.3e-3; reordering kvjax's scoring into the authors' bf16 order gives 0.860), so
kvjax keeps its float32 internals. Each difference, on purpose:

* Grids: ``grids="kvjax"`` uses our seeded CLVQ grids (:mod:`kvjax.quant.grids`) instead of the authors'. Their
  quantization error is the same (MSE per dimension within 0.4%), but the points differ, so the codes and the
  selections do: in the comparison above, Jaccard 0.32, KL(authors || kvjax) 7.8e-3 and greedy text diverging at
  token 9, with similar quality (KL to full attention 0.0129 vs the authors' 0.0121).
* HIGGS decode stays in float32 (landmarks and store); the eval path casts ``scale * grid[idx]`` to float16 before
  the inverse Hadamard, and keeps the dequantized landmarks in the model dtype (a bf16 rounding in bf16 runs).
  Dequantized values differ from the authors' by those roundings only; the codes themselves are identical (issue
  15: on 2000 random rows; ``tests/quant/test_paper_grids.py``: against a numpy oracle of the spec).
* Landmarks are stored packed (codes + scales) and dequantized every step, as the inference path does; the eval
  path dequantizes once at prefill (same numbers, 7x the device memory), so landmark scores match the Pallas
  scorer.
* Pre-RoPE keys are recovered at build time by rotating the post-RoPE prefill keys back (RoPE at ``-p``): the
  engine keeps only post-RoPE keys. In float32 this is exact to rounding; in bf16 it adds one bf16 rounding of the
  rotated key before the 4-bit quantization.
* RoPE of the fetched keys uses float32 tables (as the model itself does), not the eval path's bf16 tables.
* Generated tokens and the local window are always exact on the device (as in the eval path; the inference path
  keeps them fp8 in the offloaded store).
* Prompts that cannot be pruned (``T <= min_seqlen_to_prune``, or sinks + local + sparse covering the whole prompt)
  keep every prompt token exact on the device (``exact_fallback``) instead of reading all of them from the
  (quantized) store, so they decode exactly like full attention.
* ``min_seqlen_to_prune`` defaults to 512 on the eval path too (the authors' eval code prunes every prompt): prompts
  of at most 512 tokens decode exactly. None of the paper's prompts is that short, so no paper number changes; the
  serving path's second use of that number (raising the attended total to 512) is ``min_attended_tokens``.
* Budget rounding: the sparse budget uses :func:`kvjax.policies.common.budget_tokens` (Python ``int(frac*T)``, the eval
  path); sink/local fractions use the inference path's float32 ``ceil``.
* A Hadamard group must be a power of two. ``store_hadamard_group="token"`` means ``C = Hkv·D`` when that is a power
  of two (every paper model: identical to the authors), else the largest power of two dividing ``C`` (SmolLM2-135M:
  C = 192 -> three groups of 64). The authors' quantizer, given a group of 192, lets ``fast_hadamard_transform``
  zero-pad each row to 256 and crop the transform back to 192 values, in both directions; that is not invertible:
  relative round-trip error ``||x - x_hat|| / ||x||`` 0.48 (0.47 from the transform alone, without quantization)
  against 0.087 for the three groups of 64 (EDEN2-256, Gaussian rows and SmolLM2 keys/values alike). kvjax keeps
  the invertible fallback, so on such a model the store is far more accurate than the authors' code would be.
* The landmark group ``"head"`` is one head (``D``); the authors' class default is 128 values, the same for the
  paper models (``D = 128``). For ``D = 64`` their 128 spans two heads (zero-padded when ``C`` is not a multiple of
  128); set ``landmark_hadamard_group=128`` for the two-head grouping where ``C`` allows it.

Shapes are static per prompt bucket ``Tb`` (the engine pads prompts to a power of two): the exact window holds
``W`` tokens and top-k selects ``Kc`` chunks, both the maxima of the per-prompt plan over every length ``T <= Tb``,
so decode compiles once per (batch, prompt bucket = budget bucket, generation bucket). Ragged batches mask each
sequence's own budget.
"""
from __future__ import annotations

import dataclasses
import functools
import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from models.transformer import rope

from .. import offload
from ..attention import attend_segments
from ..cache import KV_AXES, SEQ_AXES, leaf
from ..quant import fp8_decode_bits, fp8_encode_bits, higgs_decode, higgs_encode, higgs_qdq, load_grid
from ..quant.grids import available_grids, check_source
from ..quant.higgs import HiggsCodes, HiggsConfig, code_bits
from .base import DEFAULT_MIN_SEQLEN_TO_PRUNE, Policy, PolicyConfig, concrete
from .common import BUILD_BLOCK_TOKENS, GenSlots, budget_tokens, is_fraction, map_token_blocks, take_rows, top_k

SCORINGS = ("softmax_max", "mean_dot")
STORE_FORMATS = ("higgs_qdq", "higgs_packed", "fp8", "none")
LANDMARK_QUANTS = ("higgs", "none")
GROUP_NAMES = ("head", "token")


@dataclasses.dataclass(frozen=True)
class YakvConfig(PolicyConfig):
    """YAKV hyper-parameters; defaults are the paper's accuracy-eval configuration (algorithms.md §3.1, §9).

    Budgets: a ``float`` is a fraction of the prompt length ``T`` (in [0, 1]), an ``int`` a number of tokens.

    Attributes:
      chunk_size: landmark chunk ``c`` in tokens (1 = one landmark per token; > 1 = mean of ``c`` post-RoPE keys,
        ShadowKV-style ablation). Selection and fetch are per chunk.
      local_budget: exact local window = the last prompt tokens (eval 64; serving 0.00625, ceil).
      sparse_budget: tokens selected per KV head, layer and step (eval 1/32 -> ``floor(T/32)``).
      prefix_budget: exact sink tokens at the start of the prompt (eval 0; serving 0.00625, ceil).
      min_seqlen_to_prune: prompts of at most this many tokens are not pruned: they decode exactly (serving path:
        512; the eval path prunes every prompt, but the paper's are far longer, so kvjax's default 512 keeps short
        chat prompts exact without changing any of the paper's numbers).
      min_attended_tokens: for pruned prompts, the attended total (sinks + selected + local) is raised to at least
        this many tokens (serving rule, 512; eval 0).
      exact_fallback: prompts that cannot be pruned keep all their tokens exact on the device (True), or (False) a
        budget covering the whole prompt selects every landmark through the offloaded store.
      scoring: ``"softmax_max"`` (eval) or ``"mean_dot"`` (serving).
      score_dtype: dtype of the scores before top-k ("bfloat16" as in the paper; "float32" avoids ties).
      landmark_quant: ``"higgs"`` (packed codes + scales on the device) or ``"none"`` (landmarks in the model dtype).
      landmark_d, landmark_n: EDEN grid of the landmarks (4, 256 -> 2 bits/value).
      landmark_hadamard_group: ``"head"`` (= D, eval), ``"token"`` (= C, serving) or an int (a power of two dividing
        D, or a multiple of D dividing C).
      landmark_scale_dtype: "float32" (eval) or "bfloat16" (serving).
      store_format: offloaded K/V format: ``"higgs_qdq"`` (eval numerics: quantize->dequantize at build, kept in the
        model dtype), ``"higgs_packed"`` (uint8 codes + scales on host, dequantized on the device after the fetch;
        real transfer savings), ``"fp8"`` (e4m3, saturating) or ``"none"`` (model dtype).
      store_d, store_n: EDEN grid of the store (2, 256 -> 4 bits/value).
      store_hadamard_group: ``None`` = ``"token"`` for higgs_qdq (group C, eval) and ``"head"`` for higgs_packed
        (each KV head fetchable on its own); or ``"head"``, ``"token"``, an int.
      store_scale_dtype: scale dtype of the store's HIGGS codes.
      keys_pre_rope: store keys before RoPE and re-apply RoPE at each fetched token's own position (eval) or store
        post-RoPE keys (serving).
      fetch_backend: :func:`kvjax.offload.fetch_rows` backend: ``"auto"`` (default: the Pallas DMA kernel on TPU, ``host_gather`` elsewhere; :mod:`kvjax.offload`), ``"dma"``,
        ``"host_gather"``, ``"chunk_slices"`` (for ``chunk_size > 1``) or ``"device"`` (the store stays on the device:
        the eval path's offload simulation).
      score_backend: ``"auto"``: HIGGS landmarks grouped per head (the eval default) are scored by
        ``pallas_kernels.dispatch.score_landmarks`` (the Pallas kernel on TPU, its jnp reference elsewhere), other
        layouts by :func:`score_landmarks`; ``"jnp"``: always :func:`score_landmarks` on dequantized landmarks.
      grids: EDEN grid set of every HIGGS quantizer (landmarks and store), :func:`kvjax.quant.load_grid`'s
        ``source``: ``"paper"`` (the authors' grids: their codes, hence their selections) or ``"kvjax"`` (our
        seeded CLVQ grids: same quantization error, different codes).
    """

    chunk_size: int = 1
    local_budget: float | int = 64
    sparse_budget: float | int = 0.015625 * 2
    prefix_budget: float | int = 0
    min_seqlen_to_prune: int = DEFAULT_MIN_SEQLEN_TO_PRUNE
    min_attended_tokens: int = 0
    exact_fallback: bool = True
    scoring: str = "softmax_max"
    score_dtype: str = "bfloat16"
    landmark_quant: str = "higgs"
    landmark_d: int = 4
    landmark_n: int = 256
    landmark_hadamard_group: int | str = "head"
    landmark_scale_dtype: str = "float32"
    store_format: str = "higgs_qdq"
    store_d: int = 2
    store_n: int = 256
    store_hadamard_group: int | str | None = None
    store_scale_dtype: str = "float32"
    keys_pre_rope: bool = True
    fetch_backend: str = "auto"
    score_backend: str = "auto"
    grids: str = "paper"

    def __post_init__(self):
        def need(cond, msg):
            if not cond:
                raise ValueError(msg)

        need(isinstance(self.chunk_size, (int, np.integer)) and self.chunk_size >= 1,
             f"chunk_size={self.chunk_size!r} must be an int >= 1 tokens")
        for name in ("local_budget", "sparse_budget", "prefix_budget"):
            b = getattr(self, name)
            if isinstance(b, bool) or not isinstance(b, (int, float, np.integer, np.floating)):
                raise TypeError(f"{name}={b!r} must be a float fraction of the prompt or an int token count")
            if isinstance(b, (float, np.floating)):
                need(0.0 <= b <= 1.0, f"{name}={b} as a fraction of the prompt must be in [0, 1]")
            else:
                need(b >= 0, f"{name}={b} tokens must be >= 0")
        fr = [getattr(self, n) for n in ("local_budget", "sparse_budget", "prefix_budget")]
        if all(isinstance(b, (float, np.floating)) for b in fr):
            need(sum(fr) <= 1.0, f"prefix_budget + sparse_budget + local_budget = {sum(fr)} must be <= 1 "
                                 "(fractions of the prompt)")
        need(self.min_seqlen_to_prune >= 0, f"min_seqlen_to_prune={self.min_seqlen_to_prune} tokens must be >= 0")
        need(self.min_attended_tokens >= 0, f"min_attended_tokens={self.min_attended_tokens} tokens must be >= 0")
        need(self.scoring in SCORINGS, f"scoring={self.scoring!r} must be one of {SCORINGS}")
        need(self.score_dtype in ("bfloat16", "float32"), f"score_dtype={self.score_dtype!r} must be "
                                                         "'bfloat16' or 'float32'")
        need(self.landmark_quant in LANDMARK_QUANTS,
             f"landmark_quant={self.landmark_quant!r} must be one of {LANDMARK_QUANTS}")
        need(self.store_format in STORE_FORMATS, f"store_format={self.store_format!r} must be one of {STORE_FORMATS}")
        need(self.score_backend in ("auto", "jnp"), f"score_backend={self.score_backend!r} must be 'auto' or 'jnp'")
        need(self.fetch_backend in offload.BACKENDS,
             f"fetch_backend={self.fetch_backend!r} must be one of {offload.BACKENDS}")
        check_source(self.grids, name="grids")
        for name in ("landmark_hadamard_group", "store_hadamard_group"):
            g = getattr(self, name)
            if g is None and name == "store_hadamard_group":
                continue
            if isinstance(g, str):
                need(g in GROUP_NAMES, f"{name}={g!r} must be one of {GROUP_NAMES} or a power-of-two int")
            else:
                need(isinstance(g, (int, np.integer)) and g >= 1 and g & (g - 1) == 0,
                     f"{name}={g!r} must be a power of two (values per Hadamard group) or one of {GROUP_NAMES}")
        if self.landmark_quant == "higgs":
            need(self.landmark_n <= 256, f"landmark_n={self.landmark_n} grid points must be <= 256 (uint8 codes)")
        if self.store_format.startswith("higgs"):
            need(self.store_n <= 256, f"store_n={self.store_n} grid points must be <= 256 (uint8 codes)")


def _check_grid_packaged(grids: str, d: int, n: int, prefix: str) -> None:
    """ValueError naming ``{prefix}_d`` / ``{prefix}_n`` when grid set ``grids`` has no EDEN{d}-{n}."""
    avail = available_grids(grids)
    if (d, n) not in avail:
        raise ValueError(f"{prefix}_d={d}, {prefix}_n={n}: grid set grids={grids!r} has no EDEN{d}-{n} grid; it has "
                         + ", ".join(f"EDEN{a}-{b}" for a, b in avail))


def _pow2_divisor(n: int) -> int:
    return n & -n


def _resolve_group(spec, D: int, C: int, name: str) -> int:
    """Hadamard group size in values for a spec ("head", "token" or an int) and head dim D / channel size C."""
    if spec == "head":
        g = D
    elif spec == "token":
        g = C if C & (C - 1) == 0 else _pow2_divisor(C)
    else:
        g = int(spec)
    if g & (g - 1) or g < 1:
        raise ValueError(f"{name}: Hadamard group {g} values (head_dim={D}) must be a power of two")
    if C % g:
        raise ValueError(f"{name}={spec!r}: Hadamard group {g} values does not divide the channel size "
                         f"C = num_kv_heads*head_dim = {C} values")
    if g < D and D % g:
        raise ValueError(f"{name}={spec!r}: Hadamard group {g} values does not divide head_dim={D}")
    if g > D and g % D:
        raise ValueError(f"{name}={spec!r}: Hadamard group {g} values is not a whole number of heads (head_dim={D})")
    return g


@struct.dataclass
class YakvState:
    """Layer-stacked YAKV state (every leaf ``[L, B, ...]``; ``W`` exact-window slots, ``Ng`` generated slots,
    ``NL`` landmark slots, ``Tb`` prompt bucket).

    Device:
      win_k, win_v: ``[L, B, Hkv, W, D]`` exact post-RoPE K/V of the sinks and the local window (all prompt tokens
        for prompts that are not pruned); win_pos int32 ``[L, B, W]``: their token positions, -1 = empty.
      gen: :class:`~kvjax.policies.common.GenSlots` ``[L, B, Hkv, Ng, D]`` exact post-RoPE K/V of the generated
        tokens (slot ``p - T``).
      lm: unquantized landmarks ``[L, B, Hkv, NL, D]`` (``landmark_quant="none"``), else None.
      lm_codes / lm_scales: HIGGS landmarks: uint8 ``[L, B, Hkv, NL, D/d]`` / ``[L, B, Hkv, NL, D/G]`` (group within a
        head) or ``[L, B, NL, C/d]`` / ``[L, B, NL, C/G]`` (group spans heads); landmark ``m`` covers tokens
        ``prefix + m*c .. prefix + m*c + c - 1``.
      length, prefix, n_lm, n_sel: int32 ``[L, B]``: prompt length, sink tokens, valid landmarks, selected chunks.
    Host (pinned_host unless ``fetch_backend="device"``):
      k_store, v_store: ``[L, B, Hkv, Tb, D]`` in the model dtype (higgs_qdq / none) or fp8 e4m3 as uint8 bit
        patterns (fp8); uint8 codes ``[L, B, Hkv, Tb, D/d]`` for higgs_packed, with k_scales / v_scales ``[L, B, Hkv, Tb, D/G]`` (else None).
        Keys are pre-RoPE when ``keys_pre_rope``.
    """

    win_k: jax.Array = leaf(*KV_AXES)
    win_v: jax.Array = leaf(*KV_AXES)
    win_pos: jax.Array = leaf(*SEQ_AXES)
    gen: GenSlots = leaf(*KV_AXES)
    lm: jax.Array | None = leaf(*KV_AXES)
    # per head [L, B, Hkv, NL, D/d] or, for a Hadamard group spanning heads, per token [L, B, NL, C/d]
    lm_codes: jax.Array | None = leaf(*KV_AXES, by_rank={4: SEQ_AXES})
    lm_scales: jax.Array | None = leaf(*KV_AXES, by_rank={4: SEQ_AXES})
    length: jax.Array = leaf(*SEQ_AXES)
    prefix: jax.Array = leaf(*SEQ_AXES)
    n_lm: jax.Array = leaf(*SEQ_AXES)
    n_sel: jax.Array = leaf(*SEQ_AXES)
    k_store: jax.Array = leaf(*KV_AXES)
    v_store: jax.Array = leaf(*KV_AXES)
    k_scales: jax.Array | None = leaf(*KV_AXES)
    v_scales: jax.Array | None = leaf(*KV_AXES)


@functools.lru_cache(maxsize=64)
def _plan_table(cfg: YakvConfig, Tb: int) -> dict:
    """The per-prompt plan for every prompt length ``T`` in ``[0, Tb]`` (numpy int32 tables indexed by T) and the
    static caps (window W, top-k chunks Kc, landmark slots NL) = its maxima.

    Per prompt (algorithms.md §3.2 budget split, with the eval path's rounding of the sparse budget)::

        prefix = min(ceil(prefix_budget*T), T);  local = min(ceil(local_budget*T), T - prefix)
        infix = T - prefix - local;  local += infix mod c;  n_lm = (T - prefix - local) / c
        n_sel = min(floor(sparse*T) // c, n_lm)   (raised so the total reaches min_attended_tokens)
        not pruned (exact, all T tokens in the window) if T <= min_seqlen_to_prune, n_lm == 0, or
        (exact_fallback and n_sel == n_lm)
    """
    c = cfg.chunk_size
    T = np.arange(Tb + 1, dtype=np.int64)
    prefix = budget_tokens(cfg.prefix_budget, T, rounding="ceil")
    local = np.minimum(budget_tokens(cfg.local_budget, T, rounding="ceil"), T - prefix)
    infix = T - prefix - local
    local = local + infix % c
    n_lm = (T - prefix - local) // c
    n_sel = np.minimum(budget_tokens(cfg.sparse_budget, T) // c, n_lm)
    if cfg.min_attended_tokens > 0:
        total = prefix + n_sel * c + local
        raise_ = (total < T) & (total < cfg.min_attended_tokens)
        n_sel = np.where(raise_, np.minimum(n_lm, np.maximum(cfg.min_attended_tokens - prefix - local, 0) // c),
                         n_sel)
    fallback = (T <= cfg.min_seqlen_to_prune) | (n_lm == 0)
    if cfg.exact_fallback:
        fallback |= n_sel >= n_lm
    prefix = np.where(fallback, T, prefix)
    local = np.where(fallback, 0, local)
    n_lm = np.where(fallback, 0, n_lm)
    n_sel = np.where(fallback, 0, n_sel)
    W = int(max(1, (prefix + local).max()))
    W = -(-W // 8) * 8
    return {"prefix": prefix.astype(np.int32), "local": local.astype(np.int32), "n_lm": n_lm.astype(np.int32),
            "n_sel": n_sel.astype(np.int32), "fallback": fallback, "W": W, "Kc": int(n_sel.max()),
            "NL": int(n_lm.max())}


def landmark_logits(q, lm, scoring: str = "softmax_max"):
    """Float32 logits of every landmark, before the scoring rule's normalisation: q ``[B, H, D]`` post-RoPE, lm
    ``[B, Hkv, N, D]`` -> ``[B, Hkv, N, G]`` (``softmax_max``: ``q_g · l / sqrt(D)`` per query head of the group) or
    ``[B, Hkv, N, 1]`` (``mean_dot``: ``mean_g(q_g) · l``). Landmarks are independent, so blocks of them give the
    same numbers."""
    B, H, D = q.shape
    Hkv = lm.shape[1]
    qf = q.astype(jnp.float32).reshape(B, Hkv, H // Hkv, D)
    lf = lm.astype(jnp.float32)
    hi = jax.lax.Precision.HIGHEST
    if scoring == "mean_dot":
        return jnp.einsum("bhd,bhmd->bhm", jnp.mean(qf, axis=2), lf, precision=hi)[..., None]
    return jnp.einsum("bhgd,bhmd->bhmg", qf, lf, precision=hi) * (1.0 / float(np.sqrt(D)))


def finish_scores(s, n_lm, scoring: str = "softmax_max", score_dtype=jnp.bfloat16):
    """Scores ``[B, Hkv, N]`` in ``score_dtype`` from :func:`landmark_logits` ``[B, Hkv, N, G]``: ``-inf`` for
    ``m >= n_lm[b]``; ``softmax_max``: ``max_g score_dtype(softmax_m(s_g))``; ``mean_dot``: the logit itself."""
    NL = s.shape[2]
    valid = (jnp.arange(NL)[None, :] < n_lm[:, None])[:, None, :]  # [B, 1, NL]
    if scoring == "mean_dot":
        return jnp.where(valid, s[..., 0], -jnp.inf).astype(score_dtype)
    s = jnp.where(valid[..., None], s, -jnp.inf)
    m = jnp.max(s, axis=2, keepdims=True)
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    e = jnp.exp(s - m)
    z = jnp.sum(e, axis=2, keepdims=True)
    p = (e / jnp.where(z > 0, z, 1.0)).astype(score_dtype)
    return jnp.where(valid, jnp.max(p, axis=3), -jnp.inf).astype(score_dtype)


def score_landmarks(q, lm, n_lm, scoring: str = "softmax_max", score_dtype=jnp.bfloat16):
    """YAKV landmark scores, pure jnp. q ``[B, H, D]`` post-RoPE; lm ``[B, Hkv, NL, D]`` (dequantized landmarks,
    any float dtype); n_lm int32 ``[B]`` valid landmarks. Returns ``[B, Hkv, NL]`` in ``score_dtype``, ``-inf`` for
    ``m >= n_lm[b]``.

    ``softmax_max`` (eval, §3.1): ``max_g score_dtype(softmax_m f32(q_g · l_m / sqrt(D)))`` over the GQA group.
    ``mean_dot`` (serving, §3.2): ``score_dtype(mean_g(q_g) · l_m)`` with the mean and the dot in float32.
    Same semantics as ``pallas_kernels.score.score_landmarks_ref`` (modes "eval" / "serve").
    """
    return finish_scores(landmark_logits(q, lm, scoring), n_lm, scoring, score_dtype)


class YakvPolicy(Policy):
    """YAKV (see the module docstring). ``make_policy("yakv")`` = eval defaults; ``"yakv-serving"`` = §3.2."""

    name = "yakv"
    config_class = YakvConfig
    config: YakvConfig

    offloaded_fields = ("k_store", "v_store", "k_scales", "v_scales")
    mixes_exact_rows = True  # prompts it cannot prune keep every token in the exact window (``exact_fallback``)
    _FIXED = ("gen", "length", "prefix", "n_lm", "n_sel")

    @property
    def fixed_fields(self) -> tuple[str, ...]:  # type: ignore[override]
        """Generated slots and per-sequence scalars; the exact window too when its size does not grow with the
        prompt (sink and local budgets given in tokens: ``W`` is then a constant, at most
        ``max(min_seqlen_to_prune, prefix + local + chunk - 1)`` and the longest prompt that cannot be pruned)."""
        cfg = self.config
        fixed_window = not is_fraction(cfg.local_budget) and not is_fraction(cfg.prefix_budget)
        return self._FIXED + (("win_k", "win_v", "win_pos") if fixed_window else ())

    # ------------------------------------------------------------------ helpers
    def _groups(self, mcfg):
        D, C = mcfg.head_dim, mcfg.num_kv_heads * mcfg.head_dim
        cfg = self.config
        lg = sg = None
        if cfg.landmark_quant == "higgs":
            lg = _resolve_group(cfg.landmark_hadamard_group, D, C, "landmark_hadamard_group")
        if not cfg.store_format.startswith("higgs"):
            return lg, sg
        spec = cfg.store_hadamard_group
        if spec is None:
            spec = "head" if cfg.store_format == "higgs_packed" else "token"
        sg = _resolve_group(spec, D, C, "store_hadamard_group")
        if cfg.store_format == "higgs_packed" and sg > D:
            raise ValueError(f"store_hadamard_group={spec!r} ({sg} values) spans several KV heads; higgs_packed needs "
                             f"a group dividing head_dim={D} so each head's rows can be fetched on their own")
        return lg, sg

    def _lm_cfg(self, mcfg) -> HiggsConfig:
        c = self.config
        return HiggsConfig(c.landmark_d, c.landmark_n, self._groups(mcfg)[0], c.landmark_scale_dtype)

    def _store_cfg(self, mcfg) -> HiggsConfig:
        c = self.config
        return HiggsConfig(c.store_d, c.store_n, self._groups(mcfg)[1], c.store_scale_dtype)

    def plan(self, lengths, Tb: int | None = None) -> dict:
        """Per-sequence plan (numpy): prefix, local, n_lm, n_sel (chunks), fallback, for prompt ``lengths``."""
        lengths = np.asarray(lengths, np.int64)
        tb = int(Tb if Tb is not None else lengths.max())
        t = _plan_table(self.config, tb)
        return {k: t[k][lengths] for k in ("prefix", "local", "n_lm", "n_sel", "fallback")}

    # ------------------------------------------------------------------ interface
    def validate(self, mcfg, lengths, max_new: int) -> None:
        """Config/model compatibility and per-prompt budget checks (clear ValueErrors)."""
        cfg = self.config
        lengths = np.asarray(lengths)
        if max_new < 1:
            raise ValueError(f"max_new={max_new} generated-token slots must be >= 1")
        lg, sg = self._groups(mcfg)
        if cfg.landmark_quant == "higgs":
            if lg % cfg.landmark_d:
                raise ValueError(f"landmark_d={cfg.landmark_d} must divide the landmark Hadamard group ({lg} values)")
            HiggsConfig(cfg.landmark_d, cfg.landmark_n, lg, cfg.landmark_scale_dtype)
            _check_grid_packaged(cfg.grids, cfg.landmark_d, cfg.landmark_n, "landmark")
        if cfg.store_format.startswith("higgs"):
            if sg % cfg.store_d:
                raise ValueError(f"store_d={cfg.store_d} must divide the store Hadamard group ({sg} values)")
            HiggsConfig(cfg.store_d, cfg.store_n, sg, cfg.store_scale_dtype)
            _check_grid_packaged(cfg.grids, cfg.store_d, cfg.store_n, "store")

    def can_prune(self, mcfg, T: int) -> bool:
        """The plan for ``T`` tokens leaves landmarks unselected (else it is the exact fallback)."""
        return not bool(_plan_table(self.config, int(T))["fallback"][int(T)])

    def static_sizes(self, mcfg, Tb: int, max_new: int) -> dict:
        """Window slots ``W``, top-k chunks ``Kc`` and landmark slots ``NL`` of a prompt bucket (the maxima of the
        plan over every length ``<= Tb``)."""
        t = _plan_table(self.config, Tb)
        return {"W": t["W"], "Kc": t["Kc"], "NL": t["NL"]}

    def tokens_fetched(self, state):
        n_sel = concrete(state.n_sel)
        if n_sel is None or not self.host_fields:
            return None
        return n_sel.astype(np.int64) * self.config.chunk_size

    def build(self, mcfg, k, v, lengths, max_new, extra=None, q=None) -> YakvState:
        """One layer's state from the exact prefill K/V (k post-RoPE, v: ``[B, Hkv, Tb, D]``)."""
        cfg = self.config
        B, Hkv, Tb, D = k.shape
        c = cfg.chunk_size
        tbl = _plan_table(cfg, Tb)
        W, NL = tbl["W"], tbl["NL"]
        dt = k.dtype
        lengths = lengths.astype(jnp.int32)
        Tc = jnp.clip(lengths, 0, Tb)
        prefix = jnp.asarray(tbl["prefix"])[Tc]
        local = jnp.asarray(tbl["local"])[Tc]
        n_lm = jnp.asarray(tbl["n_lm"])[Tc]
        n_sel = jnp.asarray(tbl["n_sel"])[Tc]

        def gather_tokens(x, tok):  # x [B, Hkv, Tb, D], tok [B, N] -> [B, Hkv, N, D]
            return take_rows(x, jnp.broadcast_to(jnp.clip(tok, 0, Tb - 1)[:, None, :], (B, Hkv, tok.shape[1])))

        # exact window: sinks [0, prefix) then the local window [T - local, T)
        j = jnp.arange(W, dtype=jnp.int32)[None, :]
        wpos = jnp.where(j < prefix[:, None], j, lengths[:, None] - local[:, None] + (j - prefix[:, None]))
        wvalid = j < (prefix + local)[:, None]
        win_pos = jnp.where(wvalid, wpos, -1)
        wmask = wvalid[:, None, :, None]
        win_k = jnp.where(wmask, gather_tokens(k, wpos), 0).astype(dt)
        win_v = jnp.where(wmask, gather_tokens(v, wpos), 0).astype(dt)

        # landmarks: mean of each chunk's post-RoPE keys, quantized block by block (bounded temporaries)
        lq = cfg.landmark_quant != "none"
        hc = self._lm_cfg(mcfg) if lq else None
        grid = load_grid(cfg.landmark_d, cfg.landmark_n, cfg.grids) if lq else None  # numpy: the cell search
        spans = lq and hc.hadamard_group > D

        def landmark_block(m0, size):
            m = m0 + jnp.arange(size, dtype=jnp.int32)
            tok = prefix[:, None, None] + m[None, :, None] * c + jnp.arange(c, dtype=jnp.int32)  # [B, size, c]
            lk = gather_tokens(k, tok.reshape(B, size * c)).reshape(B, Hkv, size, c, D)
            lk = jnp.mean(lk.astype(jnp.float32), axis=3) if c > 1 else lk[:, :, :, 0]
            lk = jnp.where((m[None, :] < n_lm[:, None])[:, None, :, None], lk, 0).astype(dt)
            if not lq:
                return lk, None, None
            if spans:  # group spans heads: quantize token rows [B, size, C]; token axis moved to 2
                codes = higgs_encode(lk.transpose(0, 2, 1, 3).reshape(B, size, Hkv * D), grid, hc)
                return None, codes.codes[:, None], codes.scales[:, None]
            codes = higgs_encode(lk, grid, hc)
            return None, codes.codes, codes.scales

        lm, lm_codes, lm_scales = map_token_blocks(landmark_block, max(NL, 1))
        if NL == 0:
            lm, lm_codes, lm_scales = (None if x is None else x[:, :, :0] for x in (lm, lm_codes, lm_scales))
        if spans:
            lm_codes, lm_scales = lm_codes[:, 0], lm_scales[:, 0]

        # offloaded store (all Tb rows; rows >= T are never selected), encoded block by block
        def store_block(t0, size):
            ks = jax.lax.dynamic_slice_in_dim(k, t0, size, axis=2)
            vs = jax.lax.dynamic_slice_in_dim(v, t0, size, axis=2)
            if cfg.keys_pre_rope:
                ks = rope(mcfg, ks, (t0 + jnp.arange(size))[None, None, :], inverse=True)
            return self._encode_store(mcfg, ks, vs)

        k_store, v_store, k_scales, v_scales = map_token_blocks(store_block, Tb)
        return YakvState(win_k, win_v, win_pos, GenSlots.zeros(B, Hkv, max_new, D, dt), lm, lm_codes, lm_scales,
                         lengths, prefix, n_lm, n_sel, k_store, v_store, k_scales, v_scales)

    def _encode_store(self, mcfg, ks, v):
        """One block of the offloaded store: keys (pre- or post-RoPE) and values ``[B, Hkv, n, D]`` in the store
        format -> (k_store, v_store, k_scales, v_scales), token axis 2."""
        cfg = self.config
        fmt = cfg.store_format
        if fmt == "none":
            return ks, v, None, None
        if fmt == "fp8":
            return fp8_encode_bits(ks), fp8_encode_bits(v), None, None  # uint8 bit patterns, see fp8.py
        hc = self._store_cfg(mcfg)
        grid = load_grid(cfg.store_d, cfg.store_n, cfg.grids)  # numpy (concrete), see above
        if fmt == "higgs_packed":
            kc, vc = higgs_encode(ks, grid, hc), higgs_encode(v, grid, hc)
            return kc.codes, vc.codes, kc.scales, vc.scales
        B, Hkv, n, D = ks.shape

        def qdq(x):  # token rows [B, n, C], one Hadamard group per hc.hadamard_group values (eval: the whole row)
            rows = x.transpose(0, 2, 1, 3).reshape(B, n, Hkv * D)
            return higgs_qdq(rows, grid, hc).reshape(B, n, Hkv, D).transpose(0, 2, 1, 3).astype(x.dtype)

        return qdq(ks), qdq(v), None, None

    def _landmarks(self, mcfg, st, layer, start=0, size=None):
        """Dequantized landmarks ``start .. start+size`` of one layer (all by default), ``[B, Hkv, size, D]`` (float32
        for HIGGS, the model dtype otherwise)."""
        cfg = self.config
        token_layout = st.lm is None and st.lm_codes.ndim == 4  # [L, B, NL, C/d]
        NL = (st.lm if st.lm is not None else st.lm_codes).shape[2 if token_layout else 3]
        size = NL if size is None else size

        def part(x):  # landmark slots [start, start+size) of layer `layer`
            return jax.lax.dynamic_slice_in_dim(x[layer], start, size, axis=1 if token_layout else 2)

        if st.lm is not None:
            return part(st.lm)
        hc = self._lm_cfg(mcfg)
        grid = jnp.asarray(load_grid(cfg.landmark_d, cfg.landmark_n, cfg.grids))
        x = higgs_decode(HiggsCodes(part(st.lm_codes), part(st.lm_scales)), grid, hc, jnp.float32)
        if token_layout:  # [B, size, C] -> [B, Hkv, size, D]
            B = x.shape[0]
            x = x.reshape(B, size, mcfg.num_kv_heads, mcfg.head_dim).transpose(0, 2, 1, 3)
        return x

    def _score_kernel(self, mcfg):
        """``pallas_kernels.dispatch.score_landmarks`` when it applies (packed per-head HIGGS landmarks, uint8 codes,
        one scale per head, and a score dtype the kernel's mode produces), else None."""
        cfg = self.config
        if cfg.score_backend != "auto" or cfg.landmark_quant != "higgs":
            return None
        if code_bits(self._lm_cfg(mcfg)) != 8:  # the kernel reads one uint8 index per sub-vector
            return None
        if self._groups(mcfg)[0] != mcfg.head_dim or (cfg.scoring == "softmax_max" and cfg.score_dtype != "bfloat16"):
            return None
        try:
            from pallas_kernels import dispatch
        except ImportError:
            return None
        return getattr(dispatch, "score_landmarks", None)

    def _select(self, mcfg, st, layer, q):
        """Top-k chunk selection of one layer: chunk start tokens int32 ``[B, Hkv, Kc]`` and their validity
        (``j < n_sel[b]``) ``[B, 1, Kc]``."""
        cfg = self.config
        Tb = st.k_store.shape[3]
        Kc = _plan_table(cfg, Tb)["Kc"]
        n_lm, n_sel, prefix = st.n_lm[layer], st.n_sel[layer], st.prefix[layer]
        kernel = self._score_kernel(mcfg)
        if kernel is not None:
            grid = jnp.asarray(load_grid(cfg.landmark_d, cfg.landmark_n, cfg.grids))
            mode = "eval" if cfg.scoring == "softmax_max" else "serve"
            # the layer-stacked codes and scales, read in place by the kernel (``x[layer]`` would be copied first);
            # dropping the scales' trailing singleton axis is a bitcast
            scales = st.lm_scales.reshape(st.lm_scales.shape[:-1]).astype(jnp.float32)
            scores = kernel(q, st.lm_codes, scales, grid, n_lm, mode=mode, layer=layer).astype(
                jnp.dtype(cfg.score_dtype))
        else:  # dequantize and score block by block: the temporaries stay one block of landmarks big
            NL = _plan_table(cfg, Tb)["NL"]
            size = min(BUILD_BLOCK_TOKENS, NL)

            def block(m0, size):
                # the last block may run past NL: score [NL - size, NL) and shift it into place (slots >= NL are cut)
                start = jnp.minimum(m0, NL - size)
                out = landmark_logits(q, self._landmarks(mcfg, st, layer, start, size), cfg.scoring)
                return (jnp.roll(out, start - m0, axis=2),)

            (logits,) = map_token_blocks(block, NL, size) if NL else (
                jnp.zeros((q.shape[0], mcfg.num_kv_heads, 0, 1), jnp.float32),)
            scores = finish_scores(logits, n_lm, cfg.scoring, jnp.dtype(cfg.score_dtype))
        _, sel = top_k(scores, Kc)  # [B, Hkv, Kc], sorted by score
        start = prefix[:, None, None] + sel.astype(jnp.int32) * cfg.chunk_size
        valid = (jnp.arange(Kc)[None, :] < n_sel[:, None])[:, None, :]
        return start, valid

    def _fetch(self, mcfg, st, layer, start):
        """Fetch the selected chunks' K/V from the store and decode them: post-RoPE k, v ``[B, Hkv, Kc*c, D]``."""
        cfg = self.config
        c = cfg.chunk_size
        dt = st.win_k.dtype
        fetch = functools.partial(offload.fetch_rows, layer=layer, idx=start, backend=cfg.fetch_backend, chunk=c)
        kr, vr = fetch(st.k_store), fetch(st.v_store)
        if cfg.store_format == "fp8":
            kr, vr = fp8_decode_bits(kr, dt), fp8_decode_bits(vr, dt)
        elif cfg.store_format == "higgs_packed":
            hc = self._store_cfg(mcfg)
            grid = jnp.asarray(load_grid(cfg.store_d, cfg.store_n, cfg.grids))
            kr = higgs_decode(HiggsCodes(kr, fetch(st.k_scales)), grid, hc, dt)
            vr = higgs_decode(HiggsCodes(vr, fetch(st.v_scales)), grid, hc, dt)
        kr, vr = kr.astype(dt), vr.astype(dt)
        if cfg.keys_pre_rope:
            B, Hkv, K = start.shape
            tok = (start[..., None] + jnp.arange(c, dtype=jnp.int32)).reshape(B, Hkv, K * c)
            kr = rope(mcfg, kr, tok)
        return kr, vr

    def fetch_bucket_tokens(self, Tb: int) -> int:
        return int(_plan_table(self.config, Tb)["Kc"]) * self.config.chunk_size

    def memory_report(self, state, lengths) -> dict:
        """The base report plus ``"grids"``: the EDEN grid set of the HIGGS landmarks / store (``config.grids``), or
        None when neither is HIGGS-quantized."""
        rep = super().memory_report(state, lengths)
        cfg = self.config
        rep["grids"] = cfg.grids if cfg.landmark_quant == "higgs" or cfg.store_format.startswith("higgs") else None
        return rep

    def decode(self, mcfg, st: YakvState, layer, q, k_pre, k, v, pos, h=None):
        """One decode step of one layer (see the module docstring). q ``[B, H, D]``, k/v ``[B, Hkv, D]``."""
        c = self.config.chunk_size
        length = st.length[layer]
        gen = st.gen.append(layer, k, v, pos, length)
        st = st.replace(gen=gen)
        # attention over window ∪ selected ∪ generated, as segments (read in place by the GPU kernel)
        segments = [(st.win_k[layer], st.win_v[layer], (st.win_pos[layer] >= 0)[:, None, :])]
        Kc = _plan_table(self.config, st.k_store.shape[3])["Kc"]
        if Kc > 0:
            start, sel_valid = self._select(mcfg, st, layer, q)
            kr, vr = self._fetch(mcfg, st, layer, start)
            segments.append((kr, vr, jnp.repeat(sel_valid, c, axis=2) if c > 1 else sel_valid))
        segments.append((gen.k[layer], gen.v[layer], gen.valid(pos, length)[:, None, :]))
        return attend_segments(q, segments), st

    def selected_tokens(self, mcfg, st: YakvState, layer, q):
        """Token indices selected from the store at this step, int32 ``[B, Hkv, Kc*c]``, -1 where not selected."""
        c = self.config.chunk_size
        start, valid = self._select(mcfg, st, layer, q)
        B, Hkv, K = start.shape
        tok = (start[..., None] + jnp.arange(c, dtype=jnp.int32)).reshape(B, Hkv, K * c)
        return jnp.where(jnp.repeat(valid, c, axis=2), tok, -1)

    def attended_mask(self, mcfg, st: YakvState, layer, q, pos):
        """bool ``[B, Hkv, Tb]``: prompt tokens attended at this step in this layer (window ∪ selected)."""
        Tb = st.k_store.shape[3]
        B, Hkv = st.win_k.shape[1], st.win_k.shape[2]
        mask = jnp.zeros((B, Hkv, Tb + 1), bool)
        wpos = jnp.where(st.win_pos[layer] >= 0, st.win_pos[layer], Tb)  # [B, W]; Tb = the dump slot
        bi = jnp.arange(B)[:, None, None]
        hi = jnp.arange(Hkv)[None, :, None]
        mask = mask.at[bi, hi, wpos[:, None, :]].set(True)
        if _plan_table(self.config, Tb)["Kc"] > 0:
            tok = self.selected_tokens(mcfg, st, layer, q)
            mask = mask.at[bi, hi, jnp.where(tok >= 0, tok, Tb)].set(True)
        return mask[..., :Tb]
