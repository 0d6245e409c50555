"""The KV-cache policy interface (DESIGN.md "The data's way through").

A policy is a frozen config dataclass (the paper's defaults) plus pure functions over its own registered
dataclass state, whose leaves are layer-stacked ``[L, B, ...]``:

- ``build(mcfg, k, v, lengths, max_new, extra=None, q=None) -> state_l`` — called per layer (vmapped over
  L by the engine) right after the exact, chunked prefill: ``k`` (post-RoPE) and ``v`` are
  ``[B, Hkv, Tb, D]``, rows at or beyond ``lengths[b]`` are padding. It decides what stays on the device
  and what goes to host memory. ``extra`` is this layer's slice of ``prepare(mcfg, params)`` (static data
  derived from the weights, e.g. InfiniGen's skewing); ``q`` (``[B, H, Tb, D]``, post-RoPE prompt queries)
  is given only when the policy sets ``needs_queries = True``. ``max_new`` is the generated-slot bucket.
- ``decode(mcfg, state, layer, q, k_pre, k, v, pos) -> (out, state)`` — one new token per sequence at
  absolute position ``pos[b]``; q ``[B, H, D]`` post-RoPE, k_pre/k/v ``[B, Hkv, D]``, ``layer`` a traced
  int32. ``state`` is the WHOLE layer-stacked state (the scan carry): read layer ``layer`` with
  ``x[layer]`` and write only the new rows (``x.at[layer, ...].set`` / dynamic-update-slice), so XLA
  updates the carried buffers in place and read-only host leaves are never copied. Called inside the
  single jitted decode step, so it must be pure and shape-static. ``out`` is ``[B, H, D]``. A final
  argument ``h`` ``[B, d]`` is the layer's RMS-normalised input (InfiniGen speculates from it).
- ``host_fields`` — state fields placed in ``pinned_host`` memory; ``fixed_fields`` — buffers that do not
  grow with the prompt (excluded from the per-prompt-token memory figure).
- ``memory_report(state, lengths)`` — bytes per memory kind and component (:func:`kvjax.cache.memory_report`).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from .. import cache as cache_mod


def resolve_budget(budget: float | int, prompt_len: int, multiple: int = 1, name: str = "budget") -> int:
    """Tokens for a budget given as a fraction of the prompt (float in [0, 1]) or a token count (int).

    Paper rule (ShadowKV/YAKV eval path, algorithms.md §2.1): ``floor(floor(frac * T) / c) * c`` — Python
    ``int()`` truncation, then rounded down to a multiple of the chunk size ``c``. Counts are rounded down
    to a multiple of ``c`` too.
    """
    if isinstance(budget, bool):
        raise TypeError(f"{name}={budget!r} must be a float fraction or an int token count")
    if isinstance(budget, float) or isinstance(budget, np.floating):
        if not 0.0 <= budget <= 1.0:
            raise ValueError(f"{name}={budget} as a fraction of the prompt must be in [0, 1]")
        tokens = int(budget * prompt_len)
    else:
        tokens = int(budget)
        if tokens < 0:
            raise ValueError(f"{name}={tokens} tokens must be >= 0")
        if tokens > prompt_len:
            raise ValueError(f"{name}={tokens} tokens exceeds the prompt length {prompt_len} tokens")
    return (tokens // multiple) * multiple


def top_k(scores: jax.Array, k: int):
    """``lax.top_k`` over the last axis, computed in float32.

    Scores rounded to bf16 (the paper's selection precision) are exactly representable in float32, so the
    result -- values, order and the lower-index-first tie-breaking -- is the same, but XLA:CPU's bf16
    top-k is ~17x slower than its float32 one (25 ms vs 1.4 ms for 3 x 32k scores, k=1024, measured here).
    """
    vals, idx = jax.lax.top_k(scores.astype(jnp.float32), k)
    return vals.astype(scores.dtype), idx


def check_common(mcfg, lengths, max_new: int, dense_layers: int = 0) -> None:
    """Checks shared by the baseline policies: generated slots >= 1, prompts non-empty, dense layers <= L."""
    lengths = np.asarray(lengths).reshape(-1)
    if max_new < 1:
        raise ValueError(f"max_new={max_new} generated-token slots must be >= 1")
    if (lengths < 1).any():
        raise ValueError(f"prompt lengths {lengths.tolist()} must all be >= 1 token")
    if dense_layers > mcfg.num_layers:
        raise ValueError(f"dense_layers={dense_layers} exceeds the model's {mcfg.num_layers} layers")


def bucket_size(n: int, minimum: int = 16) -> int:
    """Next power of two >= n (and >= minimum): the compile bucket of a dynamic size."""
    return max(minimum, 1 << max(0, math.ceil(math.log2(max(n, 1)))))


@dataclasses.dataclass(frozen=True)
class PolicyConfig:
    """Base of all policy configs."""


class Policy:
    """Base class; subclasses set ``name``, ``config`` and implement build/decode."""

    name: ClassVar[str] = "base"
    host_fields: ClassVar[tuple[str, ...]] = ()
    fixed_fields: ClassVar[tuple[str, ...]] = ()
    needs_queries: ClassVar[bool] = False
    # False: rows fetched from host live only inside the decode step; memory_report then adds their device
    # scratch (``bytes_fetched_per_step``) as a transient component so equal-memory comparisons are fair.
    fetched_rows_in_state: ClassVar[bool] = False
    #: the config field a single "budget" (CLI --budget, eval --budgets, equal-memory planning) sets; None: the
    #: policy has no budget (full attention)
    budget_knob: ClassVar[str | None] = "sparse_budget"

    def __init__(self, config: PolicyConfig | None = None, **overrides):
        cfg_cls = type(self).config_class
        base = config or cfg_cls()
        # a CLI "none" arrives as None; for a field whose value is a string ("none" is a valid choice of several
        # str fields, e.g. yakv's store_format) it means the string
        str_fields = {f.name for f in dataclasses.fields(base) if isinstance(getattr(base, f.name), str)}
        overrides = {k: ("none" if v is None and k in str_fields else v) for k, v in overrides.items()}
        self.config = dataclasses.replace(base, **overrides)

    config_class: ClassVar[type] = PolicyConfig

    def __repr__(self):
        return f"{type(self).__name__}({self.config})"

    def __hash__(self):
        return hash((type(self), self.config))

    def __eq__(self, other):
        return type(self) is type(other) and self.config == other.config

    # -- to implement
    def validate(self, mcfg, lengths: np.ndarray, max_new: int) -> None:
        """Raise a clear error for prompts this policy cannot serve (before anything is compiled)."""

    def prepare(self, mcfg, params) -> Any:
        """Per-layer static data from the model weights (leading ``[L]`` on every leaf), or None."""
        return None

    def build(self, mcfg, k, v, lengths, max_new: int, extra=None, q=None) -> Any:
        raise NotImplementedError

    def decode(self, mcfg, state, layer, q, k_pre, k, v, pos, h=None) -> tuple[Any, Any]:
        raise NotImplementedError

    def static_key(self, lengths: np.ndarray, max_new: int) -> tuple:
        """Hashable budget bucket: shapes of the state depend only on this (plus batch and prompt bucket)."""
        return ()

    # -- shared
    def memory_report(self, state, lengths) -> dict:
        extra = {}
        if not self.fetched_rows_in_state:
            scratch = self.fetch_scratch_bytes(state)
            if scratch:
                extra["fetch_scratch"] = ("device", scratch)
        rep = cache_mod.memory_report(state, lengths, fixed_fields=self.fixed_fields, extra=extra)
        rep["policy"] = self.name
        return rep

    def fetch_bucket_tokens(self, Tb: int) -> int:
        """Static number of token rows per KV head one decode step fetches (the selection bucket)."""
        return 0

    def fetch_scratch_bytes(self, state) -> int:
        """Device bytes of the rows one step fetches from host (all layers and sequences), from static shapes:
        the selection bucket x the row bytes of every host leaf ``[L, B, Hkv, Tb, ...]``."""
        total = 0
        for f in self.host_fields:
            for leaf in jax.tree.leaves(getattr(state, f, None)):
                if leaf.ndim < 4:
                    continue
                rows = self.fetch_bucket_tokens(leaf.shape[3])
                total += int(np.prod(leaf.shape[:3], dtype=np.int64)) * rows * \
                    int(np.prod(leaf.shape[4:], dtype=np.int64)) * jnp.dtype(leaf.dtype).itemsize
        return total

    def bytes_fetched_per_step(self, state) -> int:
        """Bytes moved host -> device per decode step (all layers and sequences): the selected tokens per KV
        head (``state.n_sel`` chunks x ``chunk_size``) times the row bytes of every host-resident leaf
        (``[L, B, Hkv, T, ...]``). 0 for policies without an offloaded store."""
        n_sel = getattr(state, "n_sel", None)
        if n_sel is None or not self.host_fields or not hasattr(n_sel, "addressable_data") and \
                not isinstance(n_sel, np.ndarray):
            return 0  # abstract state (eval_shape): the selection count is data-dependent
        tokens = np.asarray(n_sel, np.int64) * int(getattr(self.config, "chunk_size", 1) or 1)
        total = 0
        for f in self.host_fields:
            for leaf in jax.tree.leaves(getattr(state, f, None)):
                if leaf.ndim < 4:
                    continue
                row = int(np.prod(leaf.shape[4:], dtype=np.int64)) * jnp.dtype(leaf.dtype).itemsize * leaf.shape[2]
                total += int((tokens * row).sum())
        return total

    def attended_mask(self, mcfg, state, layer, q, pos):
        """Optional: bool ``[B, Hkv, Tb]`` of the prompt tokens the policy attends at this step in this
        layer (for the attention-recall metric). Policies that support it override this."""
        return None
