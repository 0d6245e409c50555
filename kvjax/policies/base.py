"""The KV-cache policy contract (DESIGN.md "The data's way through"): everything a caller may rely on is declared
on :class:`Policy`, nothing is probed.

A policy is a frozen config dataclass (the paper's defaults) plus pure functions over its own registered
dataclass state, whose leaves are layer-stacked ``[L, B, ...]`` and declare their logical axes
(:func:`kvjax.cache.leaf`), from which the shardings follow:

- ``build(mcfg, k, v, lengths, max_new, extra=None, q=None) -> state_l`` — called per layer inside the prefill
  (:mod:`kvjax.prefill`) right after that layer's exact attention: ``k`` (post-RoPE) and ``v`` are
  ``[B, Hkv, Tb, D]``, rows at or beyond ``lengths[b]`` are padding. It decides what stays on the device
  and what goes to host memory. ``extra`` is this layer's slice of ``prepare(mcfg, params)`` (static data
  derived from the weights, e.g. InfiniGen's skewing); ``q`` (``[B, H, Tb, D]``, post-RoPE prompt queries)
  is given only when the policy sets ``needs_queries = True``. ``max_new`` is the generated-slot bucket.
- ``decode(mcfg, state, layer, q, k_pre, k, v, pos, h) -> (out, state)`` — one new token per sequence at
  absolute position ``pos[b]``; q ``[B, H, D]`` post-RoPE, k_pre/k/v ``[B, Hkv, D]``, ``layer`` a traced
  int32. ``state`` is the WHOLE layer-stacked state (the scan carry): read layer ``layer`` with
  ``x[layer]`` and write only the new rows (``x.at[layer, ...].set`` / dynamic-update-slice), so XLA
  updates the carried buffers in place and read-only host leaves are never copied. Called inside the
  single jitted decode step (:func:`kvjax.decode.decode_step`), so it must be pure and shape-static. ``out`` is
  ``[B, H, D]``; ``h`` ``[B, d]`` is the layer's RMS-normalised input (InfiniGen speculates from it).
- ``offloaded_fields`` — state fields kept in ``pinned_host`` memory; :attr:`Policy.host_fields` derives the
  fields actually placed there from the config's ``fetch_backend`` (``"device"`` keeps them on the device: the
  eval path's offloading simulation). ``fixed_fields`` — buffers that do not grow with the prompt (excluded from
  the per-prompt-token memory figure).
- ``budget_knob`` — the config field a single budget sets (CLI ``--budget``, eval budgets, equal-memory plans).
- ``prunable(mcfg, lengths)`` — which prompts the policy prunes; the others are decoded exactly (full attention:
  the engine substitutes it, with a notice). Every pruning policy has ``min_seqlen_to_prune`` in its config.
- ``static_sizes(mcfg, Tb, max_new)`` — the static sizes of the state for a prompt bucket (they decide compiles);
  ``prepare_shapes(mcfg, dtype)`` — ``prepare``'s output as ShapeDtypeStructs (for abstract states).
- ``memory_report(state, lengths)`` — bytes per memory kind and component (:func:`kvjax.cache.memory_report`);
  ``bytes_fetched_per_step(state)`` from ``tokens_fetched(state)``.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from .. import cache as cache_mod
from .common import budget_tokens, check_budget


def resolve_budget(budget: float | int, prompt_len: int, multiple: int = 1, name: str = "budget") -> int:
    """Tokens of a budget for one prompt after checking it: a fraction in [0, 1] or a count >= 0 (ValueError
    naming ``name`` otherwise), then :func:`kvjax.policies.common.budget_tokens` (the paper's rounding)."""
    check_budget(name, budget)
    return budget_tokens(budget, int(prompt_len), multiple=multiple)


#: prompts of at most this many tokens are not pruned by any policy (the paper's serving-path rule, algorithms.md
#: §3.2): they decode exactly. Keeps short chat prompts exact; the paper's benchmarks are far longer.
DEFAULT_MIN_SEQLEN_TO_PRUNE = 512


def bucket_size(n: int, minimum: int = 16) -> int:
    """Next power of two >= n (and >= minimum): the compile bucket of a dynamic size."""
    return max(minimum, 1 << max(0, math.ceil(math.log2(max(n, 1)))))


@dataclasses.dataclass(frozen=True)
class PolicyConfig:
    """Base of all policy configs."""


class Policy:
    """Base class; subclasses set ``name``, ``config_class`` and implement build/decode (module docstring)."""

    name: ClassVar[str] = "base"
    config_class: ClassVar[type] = PolicyConfig
    #: state fields offloaded to host memory (unless the config's ``fetch_backend`` is "device")
    offloaded_fields: ClassVar[tuple[str, ...]] = ()
    needs_queries: ClassVar[bool] = False
    #: False: rows fetched from host live only inside the decode step; memory_report then adds their device
    #: scratch (``fetch_scratch_bytes``) as a transient component so equal-memory comparisons are fair.
    fetched_rows_in_state: ClassVar[bool] = False
    #: the config field a single "budget" (CLI --budget, eval --budgets, equal-memory planning) sets; None: the
    #: policy has no budget (full attention)
    budget_knob: ClassVar[str | None] = "sparse_budget"
    #: whether the policy prunes at all (full attention does not); a pruning config has ``min_seqlen_to_prune``
    prunes: ClassVar[bool] = True
    #: whether one state can mix pruned and exactly decoded sequences (YAKV's per-sequence exact fallback); other
    #: policies get a batch of prunable prompts only (the engine splits mixed batches)
    mixes_exact_rows: ClassVar[bool] = False

    def __init__(self, config: PolicyConfig | None = None, **overrides):
        cfg_cls = type(self).config_class
        base = config or cfg_cls()
        # a CLI "none" arrives as None; for a field whose value is a string ("none" is a valid choice of several
        # str fields, e.g. yakv's store_format) it means the string
        str_fields = {f.name for f in dataclasses.fields(base) if isinstance(getattr(base, f.name), str)}
        overrides = {k: ("none" if v is None and k in str_fields else v) for k, v in overrides.items()}
        self.config = dataclasses.replace(base, **overrides)

    def __repr__(self):
        return f"{type(self).__name__}({self.config})"

    def __hash__(self):
        return hash((type(self), self.config))

    def __eq__(self, other):
        return type(self) is type(other) and self.config == other.config

    # -- declared properties
    @property
    def host_fields(self) -> tuple[str, ...]:
        """The state fields placed in host memory: :attr:`offloaded_fields` unless ``fetch_backend == "device"``."""
        if not self.offloaded_fields or self.config.fetch_backend == "device":
            return ()
        return self.offloaded_fields

    @property
    def fixed_fields(self) -> tuple[str, ...]:
        """State fields whose size does not grow with the prompt (generated slots, counters, fixed windows)."""
        return ()

    @property
    def has_attended_mask(self) -> bool:
        """Whether :meth:`attended_mask` is implemented (the attention-recall probe needs it)."""
        return type(self).attended_mask is not Policy.attended_mask

    # -- to implement
    def validate(self, mcfg, lengths: np.ndarray, max_new: int) -> None:
        """Raise a clear error for a configuration this policy cannot run with this model (before anything is
        compiled). Prompts it cannot prune are not errors: see :meth:`prunable`."""

    def can_prune(self, mcfg, T: int) -> bool:
        """Whether a prompt of ``T`` tokens (above ``min_seqlen_to_prune``) leaves anything to prune under this
        config (the budgets do not cover it, the structural minimum fits). Default: yes."""
        return True

    def prunable(self, mcfg, lengths) -> np.ndarray:
        """bool ``[B]``: the prompts this policy prunes. The others decode exactly (full attention)."""
        lengths = np.asarray(lengths).reshape(-1)
        if not self.prunes:
            return np.zeros(lengths.shape, bool)
        return np.array([int(T) > self.config.min_seqlen_to_prune and self.can_prune(mcfg, int(T))
                         for T in lengths], bool)

    def prepare(self, mcfg, params) -> Any:
        """Per-layer static data from the model weights (leading ``[L]`` on every leaf), or None."""
        return None

    def prepare_shapes(self, mcfg, dtype) -> Any:
        """:meth:`prepare`'s output as ShapeDtypeStructs, without the weights (for abstract states)."""
        return None

    def static_sizes(self, mcfg, Tb: int, max_new: int) -> dict:
        """Static sizes of the state for a prompt bucket of ``Tb`` tokens and ``max_new`` generated slots (each
        distinct dict is a distinct compile)."""
        return {}

    def build(self, mcfg, k, v, lengths, max_new: int, extra=None, q=None) -> Any:
        raise NotImplementedError

    def decode(self, mcfg, state, layer, q, k_pre, k, v, pos, h=None) -> tuple[Any, Any]:
        raise NotImplementedError

    def tokens_fetched(self, state) -> np.ndarray | None:
        """Prompt tokens fetched from host memory per KV head at one decode step, int ``[L, B]``, from a concrete
        state; None when nothing is fetched or the state is abstract."""
        return None

    def fetch_bucket_tokens(self, Tb: int) -> int:
        """Static number of token rows per KV head one decode step fetches (the selection bucket)."""
        return 0

    def attended_mask(self, mcfg, state, layer, q, pos):
        """Optional: bool ``[B, Hkv, Tb]`` of the prompt tokens the policy attends at this step in this layer (for
        the attention-recall probe). Policies that support it override this."""
        return None

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

    def _host_leaves(self, state):
        for f in self.host_fields:
            for leaf in jax.tree.leaves(getattr(state, f)):
                if leaf.ndim >= 4:
                    yield leaf

    def fetch_scratch_bytes(self, state) -> int:
        """Device bytes of the rows one step fetches from host (all layers and sequences), from static shapes:
        the selection bucket x the row bytes of every host leaf ``[L, B, Hkv, Tb, ...]``."""
        total = 0
        for leaf in self._host_leaves(state):
            rows = self.fetch_bucket_tokens(leaf.shape[3])
            total += int(np.prod(leaf.shape[:3], dtype=np.int64)) * rows * \
                int(np.prod(leaf.shape[4:], dtype=np.int64)) * jnp.dtype(leaf.dtype).itemsize
        return total

    def bytes_fetched_per_step(self, state) -> int:
        """Bytes moved host -> device per decode step (all layers and sequences): :meth:`tokens_fetched` per KV
        head times the row bytes of every host-resident leaf ``[L, B, Hkv, T, *row]``."""
        tokens = self.tokens_fetched(state)
        if tokens is None:
            return 0
        tokens = np.asarray(tokens, np.int64)
        total = 0
        for leaf in self._host_leaves(state):
            row = int(np.prod(leaf.shape[4:], dtype=np.int64)) * jnp.dtype(leaf.dtype).itemsize * leaf.shape[2]
            total += int((tokens * row).sum())
        return total


def concrete(x) -> np.ndarray | None:
    """A state leaf as numpy when it holds data (not a ShapeDtypeStruct / tracer), else None."""
    if isinstance(x, np.ndarray):
        return x
    if isinstance(x, jax.Array) and not isinstance(x, jax.core.Tracer):
        return np.asarray(x)
    return None
