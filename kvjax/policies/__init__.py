"""KV-cache policies: ``full`` (exact), and the offloading methods of the paper and its baselines."""
from __future__ import annotations

from .base import Policy, PolicyConfig, resolve_budget
from .full import FullConfig, FullPolicy

POLICIES: dict[str, type[Policy]] = {"full": FullPolicy}


def register(cls: type[Policy]) -> type[Policy]:
    POLICIES[cls.name] = cls
    return cls


def _load_optional():
    import importlib

    for mod in ("yakv", "shadowkv", "arkvale", "quest", "infinigen", "lrqk"):
        try:
            m = importlib.import_module(f"{__name__}.{mod}")
        except ImportError as e:
            if f"{__name__}.{mod}" in str(e) or f"'{mod}'" in str(e):
                continue
            raise
        for obj in vars(m).values():
            if isinstance(obj, type) and issubclass(obj, Policy) and obj is not Policy and obj.name != "base":
                POLICIES.setdefault(obj.name, obj)


_load_optional()


def make_policy(name: str | Policy, **overrides) -> Policy:
    """Policy by name with config overrides (e.g. ``make_policy("yakv", sparse_budget=1/64)``)."""
    if isinstance(name, Policy):
        return name
    key = name.lower()
    if key in PRESETS:
        base, preset_kw = PRESETS[key]
        return POLICIES[base](**{**preset_kw, **overrides})
    if key not in POLICIES:
        raise ValueError(f"unknown method {name!r}; available: {', '.join(sorted(set(POLICIES) | set(PRESETS)))}")
    return POLICIES[key](**overrides)


# Named presets: name -> (policy, config overrides). Offloading modules add theirs.
PRESETS: dict[str, tuple[str, dict]] = {
    # YAKV in the paper's GPU inference path (algorithms.md §3.2); plain "yakv" is the accuracy-eval path (§3.1).
    "yakv-serving": ("yakv", dict(prefix_budget=0.00625, sparse_budget=0.015625, local_budget=0.00625,
                                  min_seqlen_to_prune=512, min_attended_tokens=512, scoring="mean_dot", landmark_hadamard_group="token",
                                  landmark_scale_dtype="bfloat16", store_format="fp8", keys_pre_rope=False)),
}

__all__ = ["Policy", "PolicyConfig", "resolve_budget", "FullPolicy", "FullConfig", "POLICIES", "PRESETS",
           "make_policy", "register"]
