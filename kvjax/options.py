"""The command line's shared vocabulary: KEY=VALUE option values (``--policy-opt``, ``--bench-opt``, method specs),
budgets (``--budget`` / ``--budgets``) and the policy knob a budget sets, meshes, and :class:`UsageError`, the one
error type of a user mistake (``kvjax.cli.main`` prints it as ``kvjax: error: ...`` and exits with status 2)."""
from __future__ import annotations

import fractions
from typing import Any

__all__ = ["UsageError", "budget_knob", "budget_label", "check_policy_options", "method_names", "parse_budget",
           "parse_mesh", "parse_methods", "parse_value", "policy_class"]


class UsageError(ValueError):
    """A mistake in what the user asked for (an argument, a file it names): the message says what was given and
    what is allowed. The CLI prints it as one line, ``kvjax: error: <message>``, and exits with status 2."""


def parse_value(v: str, lists: bool = False) -> Any:
    """A CLI value: int, float, ``a/b`` fraction (as float), true/false, none, else the string itself; with
    ``lists=True`` a comma list becomes a list of such values (``"4000,7000"`` -> ``[4000, 7000]``)."""
    v = v.strip()
    if lists and "," in v:
        return [parse_value(x) for x in v.split(",") if x.strip()]
    for conv in (int, float):
        try:
            return conv(v)
        except ValueError:
            pass
    if "/" in v:
        try:
            return float(fractions.Fraction(v))
        except (ValueError, ZeroDivisionError):
            pass
    low = v.lower()
    if low in ("true", "false"):
        return low == "true"
    if low == "none":
        return None
    return v


def parse_methods(spec: str) -> list[tuple[str, str, dict]]:
    """Method specs ``"full,yakv[sparse_budget=1/64;chunk_size=4]"`` -> ``[(label, method, overrides), ...]``.

    A method (policy or preset name) may carry config overrides in brackets, ``;``-separated ``KEY=VALUE`` with
    values as :func:`parse_value`; the label is the spec as written (e.g. ``"yakv[store_format=none]"``), used
    to name the variant in tables and records. Commas inside brackets do not separate methods."""
    items, depth, cur = [], 0, ""
    for ch in spec:
        depth += ch == "["
        depth -= ch == "]"
        if ch == "," and depth == 0:
            items.append(cur)
            cur = ""
        else:
            cur += ch
    items.append(cur)
    out = []
    for it in (x.strip() for x in items):
        if not it:
            continue
        name, _, rest = it.partition("[")
        opts = {}
        if rest:
            if not rest.endswith("]"):
                raise ValueError(f"method spec {it!r}: expected NAME or NAME[KEY=VALUE;...]")
            for kv in filter(None, (x.strip() for x in rest[:-1].split(";"))):
                if "=" not in kv:
                    raise ValueError(f"method spec {it!r}: option {kv!r} is not KEY=VALUE")
                k, _, v = kv.partition("=")
                opts[k.strip()] = parse_value(v)
        out.append((it, name.strip(), opts))
    return out


def parse_budget(s: str, arg: str = "--budget") -> float | int:
    """A budget as given on the command line -> its value: a fraction of the prompt (``"1/64"``, ``"0.015625"``,
    ``"1e-2"``: float in (0, 1]) or a token count (``"2048"``: int >= 1). ``arg`` names the flag in the error.

    Raises :class:`UsageError` for anything else, 0 included (a budget of no tokens; a policy's own knob can still
    be set to 0 through ``--policy-opt``)."""
    s = str(s).strip()
    allowed = "allowed: a fraction of the prompt in (0, 1] (1/64, 0.015625) or a token count >= 1 (2048)"
    try:
        if "/" in s:
            val: float | int = float(fractions.Fraction(s))
        elif "." in s or "e" in s.lower():
            val = float(s)
        else:
            val = int(s)
    except (ValueError, ZeroDivisionError):
        raise UsageError(f"{arg} {s!r}: not a budget; {allowed}") from None
    if isinstance(val, float) and not 0.0 < val <= 1.0:
        raise UsageError(f"{arg} {s!r} = {val:g}: a fraction must be in (0, 1]; {allowed}")
    if isinstance(val, int) and val < 1:
        raise UsageError(f"{arg} {s!r}: a token count must be >= 1 token"
                         + (" (a budget of 0 keeps no selected tokens; to ablate a policy's selection set its knob, "
                            "e.g. --policy-opt sparse_budget=0)" if val == 0 else "") + f"; {allowed}")
    return val


def budget_label(val: float | int) -> str:
    """Name of a budget in tables and record keys: ``"1/64"`` for fractions with an integer reciprocal, the int for
    token counts, else ``%.6g``."""
    if isinstance(val, int):
        return str(val)
    if val > 0:
        inv = 1.0 / val
        if abs(inv - round(inv)) < 1e-9:
            return f"1/{round(inv)}"
    return f"{val:.6g}"


def method_names() -> list[str]:
    """Every name ``kvjax.make_policy`` accepts: the registered policies and the named presets."""
    from .policies import POLICIES, PRESETS

    return sorted(set(POLICIES) | set(PRESETS))


def policy_class(method: str):
    """The :class:`kvjax.policies.Policy` subclass behind a method name (a policy, or a preset of one). Raises
    :class:`UsageError` for an unknown name."""
    from .policies import POLICIES, PRESETS

    key = method.lower()
    base = PRESETS[key][0] if key in PRESETS else key
    if base not in POLICIES:
        raise UsageError(f"method {method!r} is unknown; allowed: {', '.join(method_names())}")
    return POLICIES[base]


def budget_knob(method: str) -> str | None:
    """The config field a single budget sets for ``method`` (a policy or preset name): the policy class's declared
    ``Policy.budget_knob`` (``sparse_budget`` for YAKV/ShadowKV, ``budget`` for ArkVale/Quest/InfiniGen,
    ``num_active`` for LRQK; None for full attention). Raises :class:`UsageError` for an unknown method."""
    return policy_class(method).budget_knob


def check_policy_options(method: str, keys, arg: str = "--policy-opt ") -> None:
    """Every key must be a field of ``method``'s config dataclass; raises :class:`UsageError` naming the flag (``arg``
    is the text before the key, e.g. ``"--policy-opt yakv."``), the first unknown key and the fields there are."""
    import dataclasses

    fields = [f.name for f in dataclasses.fields(policy_class(method).config_class)]
    bad = [k for k in keys if k not in fields]
    if bad:
        raise UsageError(f"{arg}{bad[0]}: {method} has no option {bad[0]!r}; allowed: {', '.join(fields)}")


def parse_mesh(spec: str, n_devices: int | None = None, arg: str = "--mesh") -> tuple[int, int]:
    """``"DATAxMODEL"`` (e.g. ``"2x4"``) -> (data, model), both >= 1; with ``n_devices`` also checks that the mesh
    fits the devices there are. Raises :class:`UsageError`."""
    try:
        d, m = (int(x) for x in str(spec).lower().split("x"))
    except ValueError:
        raise UsageError(f"{arg} {spec!r}: expected DATAxMODEL with two integers >= 1, e.g. 1x1 or 2x4") from None
    if d < 1 or m < 1:
        raise UsageError(f"{arg} {spec!r}: both sizes must be >= 1 device, e.g. 1x1 or 2x4")
    if n_devices is not None and d * m > n_devices:
        raise UsageError(f"{arg} {spec!r} needs {d * m} devices; {n_devices} available (allowed: DATAxMODEL with "
                         f"DATA*MODEL <= {n_devices})")
    return d, m
