"""The method grid of ``kvjax eval``: budgets as given on the command line, one configured policy per (method,
budget), and equal-memory budgets (the same device bytes per prompt token for every method, kvjax.budgets)."""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, Sequence

from kvjax import options
from kvjax.options import budget_knob, budget_label, parse_methods

from .presets import PAPER_BUDGETS


def parse_budget(s: str, arg: str = "--budgets") -> tuple[str, float | int | None]:
    """``"default"`` (each method's paper default) or a budget as :func:`kvjax.options.parse_budget` reads it
    (fraction ``"1/64"`` / ``"0.03125"`` of the prompt in (0, 1], token count ``"2048"`` >= 1) -> (label, value).
    Raises :class:`kvjax.options.UsageError` (a ValueError) naming the value and the allowed forms."""
    s = s.strip()
    if s.lower() == "default":
        return "default", None
    val = options.parse_budget(s, arg)
    return budget_label(val), val


@dataclasses.dataclass
class MethodSpec:
    """One cell of the grid: the method's label, the budget's label ("-" for full attention, "default" resolved to
    a value), the budget value (None: full, or an equal-memory spec before planning) and the configured policy."""

    method: str
    budget: str
    budget_value: float | int | None
    policy: Any


def method_specs(methods: Sequence[str], budgets: Sequence[tuple[str, Any]],
                 policy_opts: Mapping[str, Mapping[str, Any]],
                 method_budgets: Mapping[str, Sequence[tuple[str, Any]]] | None = None) -> list[MethodSpec]:
    """(method, budget) grid: full once ("-"), every other method at every budget of ``budgets``, or of
    ``method_budgets[label or base method]`` when given there. ``"default"`` = the paper's budget
    (:data:`PAPER_BUDGETS`) or the policy's own default; the budget sets the method's budget knob."""
    from kvjax.policies import make_policy

    specs = []
    for name, m, inline in parse_methods(",".join(methods)):
        own = (method_budgets or {}).get(name, (method_budgets or {}).get(m))
        # "yakv[store_format=none]" is a variant of yakv with its own label; --policy-opt for the base name
        # applies to every variant, for the full label to that variant only, inline options last
        opts = {**policy_opts.get(m, {}), **(policy_opts.get(name, {}) if name != m else {}), **inline}
        if m == "full":
            if inline:
                raise ValueError(f"method {name!r}: full attention is the reference and takes no variant options")
            specs.append(MethodSpec("full", "-", None, make_policy("full", **opts)))
            continue
        knob = budget_knob(m)
        for label, val in (budgets if own is None else own):
            if val is None:  # default
                val = PAPER_BUDGETS.get(m)
                if val is None:
                    val = getattr(make_policy(m, **opts).config, knob)
                label = budget_label(val)
            try:
                pol = make_policy(m, **{**opts, knob: val})
            except (TypeError, ValueError) as e:
                raise ValueError(f"method {name!r} with {knob}={val!r} and options {opts}: {e}") from None
            specs.append(MethodSpec(name, label, val, pol))
    seen, out = set(), []
    for s in specs:
        if (s.method, s.budget) not in seen:
            seen.add((s.method, s.budget))
            out.append(s)
    return out


def families_of(method: str, method_families: Mapping[str, Sequence[str]]) -> list[str] | None:
    """The model families (models.config.FAMILIES) ``method`` (a label, e.g. ``"infinigen"`` or
    ``"yakv[store_format=none]"``, looked up by label, then by its base method) is limited to; None = every family."""
    base = parse_methods(method)[0][1]
    allowed = method_families.get(method, method_families.get(base))
    return None if allowed is None else list(allowed)


def runs_on(method: str, family: str, method_families: Mapping[str, Sequence[str]]) -> bool:
    """Whether the grid runs ``method`` on a model of ``family`` (:func:`families_of`)."""
    allowed = families_of(method, method_families)
    return allowed is None or family in allowed


def budget_fraction(spec: MethodSpec, prompt_tokens: int) -> float | None:
    """The budget of ``spec`` as a fraction of a ``prompt_tokens``-token prompt (full attention: 1; a token count
    divided by the prompt; None when not known, e.g. an equal-memory spec before planning)."""
    v = spec.budget_value
    if spec.method == "full":
        return 1.0
    if v is None:
        return None
    if isinstance(v, int):
        return v / max(prompt_tokens, 1)
    return float(v)


def equal_memory_specs(todo: Sequence[MethodSpec], mcfg, prompt_len: int, max_new: int, bytes_per_token: float,
                       policy_opts: Mapping[str, Mapping[str, Any]], dtype: str, emit) -> list[MethodSpec]:
    """Configured policies with ``bytes_per_token`` device bytes per prompt token (kvjax.budgets) for a prompt of
    ``prompt_len`` tokens and ``max_new`` new ones; a method that cannot meet the allowance gets an error record
    through ``emit({"method", "budget", "error"})`` instead."""
    import jax.numpy as jnp
    from kvjax import budgets as budgets_mod
    from kvjax.policies import make_policy

    out = []
    for sp in todo:
        if sp.method == "full":
            out.append(sp)
            continue
        try:
            knob = budget_knob(sp.method)
            pol = make_policy(sp.method, **policy_opts.get(sp.method, {}))
            plan = budgets_mod.equal_memory_budgets(mcfg, [pol], prompt_len, bytes_per_token=bytes_per_token,
                                                    max_new=max_new, dtype=jnp.dtype(dtype),
                                                    knobs={pol.name: knob})
            chosen = plan.policies[pol.name]
            val = plan.knobs[pol.name][1]
            out.append(MethodSpec(sp.method, sp.budget, val, chosen))
        except Exception as e:
            emit({"method": sp.method, "budget": sp.budget, "error": f"equal-memory budget: {type(e).__name__}: {e}"})
    return out


def budget_sort_key(rec_or_row: Mapping[str, Any]) -> tuple:
    """Order of records or summary rows: full first, then by method, budget fraction (unknown last) and label."""
    f = rec_or_row.get("budget_fraction")
    return (0 if rec_or_row.get("method") == "full" else 1, rec_or_row.get("method", ""),
            f if isinstance(f, (int, float)) else math.inf, str(rec_or_row.get("budget")))


__all__ = ["MethodSpec", "budget_fraction", "budget_sort_key", "equal_memory_specs", "method_specs",
           "families_of", "parse_budget", "runs_on"]
