"""Equal-memory budgets: set each policy's budget so that all of them keep the same device bytes.

The quantity matched is the **device bytes of the policy state** that :class:`kvjax.Engine` builds for a prompt
(``memory_report(...)["by_kind"]["device"]``: everything but the host-resident stores — digests, partial or
low-rank keys, resident windows, the recall buffer of selected rows, generated-token slots). It is measured on
``jax.eval_shape``'d states, i.e. from each policy's own ``build`` and ``memory_report`` with no arithmetic
duplicated here, so the figure is the one a real run reports (tests check both agree).

Each policy has one **budget knob** (a float fraction) whose value moves its device bytes: ``budget`` for ArkVale,
Quest and InfiniGen, ``num_active`` for LRQK (the policy class's ``budget_knob``; pass ``knobs=`` for others). The
device bytes are a non-decreasing step function of the knob, so a bisection finds the largest knob whose bytes do
not exceed the allowance; all policies then sit within one step (one page or token slot) below it. A policy whose
smallest footprint (knob 0) already exceeds the allowance is reported with a clear error, and so is one that stays
more than ``tolerance`` below it even at knob 1 (the whole prompt selected) unless ``strict=False``.

>>> plan = equal_memory_budgets(mcfg, ["arkvale", "quest", "infinigen", "lrqk"], prompt_len=8192,
...                             bytes_per_token=4096, max_new=256)
>>> plan.policies["arkvale"].config.budget, plan.device_bytes
"""
from __future__ import annotations

import dataclasses
from typing import Iterable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from . import cache as cache_mod
from .engine import generation_bucket
from .policies import Policy, make_policy
from .policies.base import bucket_size
from .prefill import build_from_kv


def _knob(policy: Policy, knobs: Mapping[str, str] | None) -> str:
    knobs = dict(knobs or {})
    name = knobs.get(policy.name) or policy.budget_knob
    if name is None:
        raise ValueError(f"no budget knob known for policy {policy.name!r}; pass knobs={{{policy.name!r}: '<field>'}}")
    if not hasattr(policy.config, name):
        raise ValueError(f"policy {policy.name!r} has no config field {name!r}")
    return name


def abstract_state(policy: Policy, mcfg, prompt_len: int, max_new: int = 256, batch: int = 1,
                   dtype=jnp.bfloat16, min_prompt_bucket: int = 128, extra=None):
    """The state :meth:`kvjax.Engine.build` makes for ``batch`` prompts of ``prompt_len`` tokens and
    ``max_new`` new tokens, as ``ShapeDtypeStruct`` leaves carrying their memory kinds (no arithmetic runs).

    ``extra`` is the policy's ``prepare`` output (or shapes); by default ``policy.prepare_shapes(mcfg, dtype)``.
    """
    if prompt_len < 1:
        raise ValueError(f"prompt_len={prompt_len} must be >= 1 token")
    if max_new < 1:
        raise ValueError(f"max_new={max_new} must be >= 1 token")
    if batch < 1:
        raise ValueError(f"batch={batch} must be >= 1 sequence")
    Tb = bucket_size(prompt_len, min_prompt_bucket)
    gen = generation_bucket(max_new)
    L, Hkv, H, D = mcfg.num_layers, mcfg.num_kv_heads, mcfg.num_heads, mcfg.head_dim
    sds = jax.ShapeDtypeStruct
    k = sds((L, batch, Hkv, Tb, D), dtype)
    q = sds((L, batch, H, Tb, D), dtype) if policy.needs_queries else None
    if extra is None:
        extra = policy.prepare_shapes(mcfg, dtype)
    policy.validate(mcfg, np.full((batch,), prompt_len, np.int32), gen)

    st = jax.eval_shape(lambda k, v, q, lens, e: build_from_kv(policy, mcfg, k, v, q, lens, gen, e), k, k, q,
                        sds((batch,), jnp.int32), extra)
    shard = cache_mod.state_shardings(st, None, mcfg, policy)
    return jax.tree.map(lambda a, s: sds(a.shape, a.dtype, sharding=s), st, shard)


def memory_report_for(policy: Policy, mcfg, prompt_len: int, max_new: int = 256, batch: int = 1,
                      dtype=jnp.bfloat16, min_prompt_bucket: int = 128, extra=None) -> dict:
    """``policy.memory_report`` of :func:`abstract_state` (bytes per memory kind and component)."""
    st = abstract_state(policy, mcfg, prompt_len, max_new, batch, dtype, min_prompt_bucket, extra)
    return policy.memory_report(st, np.full((batch,), prompt_len, np.int64))


def device_bytes(policy: Policy, mcfg, prompt_len: int, **kw) -> int:
    """Device bytes of the state for ``prompt_len`` (see :func:`memory_report_for` for the keywords)."""
    return int(memory_report_for(policy, mcfg, prompt_len, **kw)["by_kind"].get("device", 0))


@dataclasses.dataclass
class BudgetPlan:
    """Result of :func:`equal_memory_budgets`: the configured policies, their device bytes, the allowance (bytes
    for the batch) and the knob values chosen."""

    policies: dict[str, Policy]
    device_bytes: dict[str, int]
    target_bytes: int
    knobs: dict[str, tuple[str, float]]

    def spread(self) -> float:
        """(max − min) / max of the device bytes over the policies."""
        v = list(self.device_bytes.values())
        return (max(v) - min(v)) / max(max(v), 1)


def equal_memory_budgets(mcfg, policies: Iterable[str | Policy], prompt_len: int, bytes_per_token: float | None = None,
                         total_bytes: int | None = None, max_new: int = 256, batch: int = 1, dtype=jnp.bfloat16,
                         min_prompt_bucket: int = 128, knobs: Mapping[str, str] | None = None,
                         extras: Mapping[str, object] | None = None, iters: int = 40, strict: bool = True,
                         tolerance: float = 0.05) -> BudgetPlan:
    """Budgets giving every policy the same device memory for prompts of ``prompt_len`` tokens.

    The allowance is ``bytes_per_token`` × ``prompt_len`` × ``batch`` (device bytes per prompt token) or
    ``total_bytes`` (for the batch); exactly one must be given. For each policy the largest knob value in [0, 1]
    whose state keeps at most that many device bytes is found by bisection (``iters`` halvings; shapes are cached, so
    only distinct static sizes are traced). Policies may be names or configured :class:`Policy` objects (their other
    settings are kept). ``extras`` maps a policy name to its ``prepare`` output when the policy has no
    ``prepare_shapes``. With ``strict`` (default) a policy that cannot come within ``tolerance`` of the allowance
    even with its whole prompt selected (knob 1) is an error; otherwise it keeps knob 1.
    """
    if (bytes_per_token is None) == (total_bytes is None):
        raise ValueError("give exactly one of bytes_per_token (device bytes per prompt token) or total_bytes")
    if bytes_per_token is not None:
        if not bytes_per_token > 0:
            raise ValueError(f"bytes_per_token={bytes_per_token} must be > 0 bytes")
        target = int(bytes_per_token * prompt_len * batch)
    else:
        if not total_bytes > 0:
            raise ValueError(f"total_bytes={total_bytes} must be > 0 bytes")
        target = int(total_bytes)
    kw = dict(max_new=max_new, batch=batch, dtype=dtype, min_prompt_bucket=min_prompt_bucket)
    Tb = bucket_size(prompt_len, min_prompt_bucket)
    gen = generation_bucket(max_new)
    out, nbytes, chosen = {}, {}, {}
    for p in policies:
        pol = make_policy(p)
        knob = _knob(pol, knobs)
        extra = (extras or {}).get(pol.name)
        cache: dict = {}

        def measure(x: float) -> int:
            cand = type(pol)(dataclasses.replace(pol.config, **{knob: float(x)}))
            sizes = cand.static_sizes(mcfg, Tb, gen)
            key = tuple(sorted(sizes.items())) if sizes else float(x)
            if key not in cache:
                cache[key] = device_bytes(cand, mcfg, prompt_len, extra=extra, **kw)
            return cache[key]

        lo_b = measure(0.0)
        if lo_b > target:
            raise ValueError(
                f"policy {pol.name!r} needs at least {lo_b} device bytes ({lo_b / (prompt_len * batch):.1f} per prompt "
                f"token) at {knob}=0, more than the allowance of {target} bytes "
                f"({target / (prompt_len * batch):.1f} per prompt token)")
        def valid(x: float) -> bool:
            cand = type(pol)(dataclasses.replace(pol.config, **{knob: float(x)}))
            lens = np.array([prompt_len] * batch, np.int32)
            try:
                cand.validate(mcfg, lens, gen)
            except ValueError:
                return False
            return bool(cand.prunable(mcfg, lens).all())

        top = 1.0  # the largest knob value that still prunes this prompt (larger budgets decode exactly)
        if not valid(top):
            ok, bad = 0.0, 1.0
            for _ in range(iters):
                mid = 0.5 * (ok + bad)
                ok, bad = (mid, bad) if valid(mid) else (ok, mid)
            top = ok
        hi_b = measure(top)
        if hi_b <= target:
            if strict and hi_b < (1.0 - tolerance) * target:
                raise ValueError(
                    f"policy {pol.name!r} keeps at most {hi_b} device bytes ({hi_b / (prompt_len * batch):.1f} per "
                    f"prompt token) at {knob}=1 (the whole prompt), below the allowance of {target} bytes by more "
                    f"than {tolerance:.0%}; lower the allowance, or pass strict=False to keep {knob}=1")
            x = top
        else:
            lo, hi = 0.0, top  # measure(lo) <= target < measure(hi)
            for _ in range(iters):
                mid = 0.5 * (lo + hi)
                if measure(mid) <= target:
                    lo = mid
                else:
                    hi = mid
            x = lo
        cand = type(pol)(dataclasses.replace(pol.config, **{knob: float(x)}))
        out[pol.name] = cand
        nbytes[pol.name] = measure(x)
        chosen[pol.name] = (knob, float(x))
    return BudgetPlan(out, nbytes, target, chosen)


__all__ = ["BudgetPlan", "abstract_state", "device_bytes", "equal_memory_budgets", "memory_report_for"]
