"""Pallas kernels of kvjax, each with a pure-jnp reference beside it.

* :mod:`pallas_kernels.score` — YAKV landmark scoring against HIGGS codes (query-side lookup tables).
* :mod:`pallas_kernels.decode_attention` — one-query GQA attention over gathered K/V rows.
* :mod:`pallas_kernels.dispatch` — one entry point per op choosing kernel / interpret / reference per platform
  (``use_kernels`` argument, :func:`set_use_kernels`, env ``KVJAX_KERNELS``).
* :mod:`pallas_kernels.bench` — scoring speed vs copy bandwidth and vs full attention (:func:`bench_score`).
"""
from pallas_kernels.decode_attention import decode_attention_kernel, decode_attention_ref
from pallas_kernels.dispatch import (
    decode_attention,
    get_use_kernels,
    kernels_override,
    resolve_backend,
    score_landmarks,
    set_use_kernels,
)
from pallas_kernels.score import query_tables, score_landmarks_kernel, score_landmarks_ref

__all__ = [
    "decode_attention",
    "decode_attention_kernel",
    "decode_attention_ref",
    "get_use_kernels",
    "kernels_override",
    "query_tables",
    "resolve_backend",
    "score_landmarks",
    "score_landmarks_kernel",
    "score_landmarks_ref",
    "set_use_kernels",
]
