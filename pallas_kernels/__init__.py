"""Pallas kernels of kvjax, each with a pure-jnp reference beside it.

* :mod:`pallas_kernels.score` — YAKV landmark scoring against HIGGS codes (query-side lookup tables; TPU kernel).
* :mod:`pallas_kernels.score_gpu` — the same scoring as a Triton-backend (GPU) kernel.
* :mod:`pallas_kernels.decode_attention` — one-query GQA attention over gathered K/V rows (TPU kernel).
* :mod:`pallas_kernels.decode_attention_gpu` — split-K GPU kernel of it, also over several row segments.
* :mod:`pallas_kernels.fetch_dma` — selected rows DMA'd from a host-resident store (TPU kernel).
* :mod:`pallas_kernels.stacked` — ``layer=``: kernels reading one layer of layer-stacked inputs in place.
* :mod:`pallas_kernels.dispatch` — one entry point per op choosing kernel / interpret / reference per platform
  (``use_kernels`` argument, :func:`set_use_kernels`, env ``KVJAX_KERNELS``).
* :mod:`pallas_kernels.bench` — scoring speed vs copy bandwidth and vs full attention (:func:`bench_score`).
"""
from pallas_kernels.decode_attention import decode_attention_kernel, decode_attention_ref
from pallas_kernels.decode_attention_gpu import decode_attention_gpu, decode_attention_segments_gpu
from pallas_kernels.dispatch import (
    decode_attention,
    decode_attention_segments,
    get_use_kernels,
    kernels_override,
    resolve_backend,
    score_landmarks,
    set_use_kernels,
)
from pallas_kernels.fetch_dma import fetch_rows_dma
from pallas_kernels.score import query_tables, score_landmarks_kernel, score_landmarks_ref
from pallas_kernels.score_gpu import score_landmarks_gpu

__all__ = [
    "decode_attention",
    "decode_attention_gpu",
    "decode_attention_kernel",
    "decode_attention_ref",
    "decode_attention_segments",
    "decode_attention_segments_gpu",
    "fetch_rows_dma",
    "get_use_kernels",
    "kernels_override",
    "query_tables",
    "resolve_backend",
    "score_landmarks",
    "score_landmarks_gpu",
    "score_landmarks_kernel",
    "score_landmarks_ref",
    "set_use_kernels",
]
