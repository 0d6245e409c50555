"""Parsing of KEY=VALUE option values given on the command line (``--policy-opt``, ``--bench-opt``, method specs)."""
from __future__ import annotations

import fractions
from typing import Any

__all__ = ["parse_methods", "parse_value"]


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
