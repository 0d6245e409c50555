"""Parsing of KEY=VALUE option values given on the command line (``--policy-opt``, ``--bench-opt``, method specs)."""
from __future__ import annotations

import fractions
from typing import Any

__all__ = ["parse_value"]


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
