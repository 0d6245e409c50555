"""Backend choice for the kvjax kernels: one entry point per op.

* :func:`score_landmarks` — YAKV landmark scores against HIGGS codes (:mod:`pallas_kernels.score`).
* :func:`decode_attention` — one-query GQA attention over gathered rows (:mod:`pallas_kernels.decode_attention`).

Which implementation runs is set by ``use_kernels`` (argument > :func:`set_use_kernels` > env ``KVJAX_KERNELS``,
default ``"auto"``):

=====================  ==================================================================================
value                  behaviour
=====================  ==================================================================================
``"auto"``             TPU: compiled Pallas kernel. GPU: the pure-jnp reference (see below). CPU: the
                       reference. Chosen per lowering platform with ``jax.lax.platform_dependent``, so a
                       function traced on CPU and lowered for TPU (``lower(lowering_platforms=("tpu",))``)
                       gets the kernel, and a multi-platform export carries both.
``True`` / ``"kernel"``  force the kernel: compiled on TPU, Pallas interpret mode elsewhere (slow; tests).
``"interpret"``        Pallas interpret mode everywhere (``interpret=True`` on a call does the same).
``False`` / ``"reference"``  the pure-jnp reference everywhere.
=====================  ==================================================================================

The setting is read when a function is traced: change it before ``jax.jit`` traces (or clear the jit cache).

GPU: both kernels are written for Mosaic TPU (scalar-prefetch grids, ``tpu.dynamic_gather``, TPU compiler
params); Pallas on GPU lowers through Mosaic GPU / Triton, which support neither scalar prefetch nor that
gather, so :data:`GPU_KERNELS` lists no op and "auto" uses the reference there. XLA:GPU runs the reference's table
gathers natively; a GPU kernel can be registered in :data:`GPU_KERNELS` when one exists.

Top-k stays outside these ops. ``jax.lax.approx_max_k(scores, k, recall_target=0.95)`` is available and is only
optimised on TPU (the TPU partial-reduction algorithm of arXiv:2206.14286); elsewhere XLA lowers it to an exact
top-k. On TPU it returns a set whose expected recall of the true top-k is at least ``recall_target`` (0.95 by
default): up to ~5 % of the selected tokens (about 200 of YAKV's 4096 at 131K) may be replaced by lower-scored
ones. That changes which tokens attention sees, so its accuracy cost must be measured on the benchmarks before it
replaces ``jax.lax.top_k``; the paper's results use exact top-k (eval path sorted, serving path unsorted, which
only changes summation order). Masked landmarks score ``-inf`` here, so both rank them last.
"""
from __future__ import annotations

import contextlib
import functools
import os

import jax
from jax import lax

from pallas_kernels import decode_attention as _attn
from pallas_kernels import score as _score

__all__ = [
    "GPU_KERNELS",
    "score_landmarks",
    "decode_attention",
    "resolve_backend",
    "set_use_kernels",
    "get_use_kernels",
    "kernels_override",
]

ENV_VAR = "KVJAX_KERNELS"
GPU_KERNELS: dict[str, bool] = {"score_landmarks": False, "decode_attention": False}
_VALUES = {
    "auto": "auto",
    "1": "kernel", "true": "kernel", "on": "kernel", "yes": "kernel", "kernel": "kernel", "kernels": "kernel",
    "0": "reference", "false": "reference", "off": "reference", "no": "reference", "reference": "reference",
    "ref": "reference",
    "interpret": "interpret",
}
_setting: str | None = None   # None: read the environment variable


def _normalise(value) -> str:
    if isinstance(value, bool):
        return "kernel" if value else "reference"
    key = str(value).strip().lower()
    if key not in _VALUES:
        raise ValueError(f"use_kernels={value!r}: expected 'auto', True/'kernel', False/'reference' or 'interpret'"
                         f" (env {ENV_VAR} takes the same strings)")
    return _VALUES[key]


def set_use_kernels(value) -> None:
    """Set the process-wide default (``None`` = go back to env ``KVJAX_KERNELS``, default "auto")."""
    global _setting
    _setting = None if value is None else _normalise(value)


def get_use_kernels() -> str:
    """The current default: "auto", "kernel", "reference" or "interpret"."""
    return _setting if _setting is not None else _normalise(os.environ.get(ENV_VAR, "auto"))


@contextlib.contextmanager
def kernels_override(value):
    """Context manager form of :func:`set_use_kernels` (restores the previous setting)."""
    global _setting
    old = _setting
    set_use_kernels(value)
    try:
        yield
    finally:
        _setting = old


def resolve_backend(use_kernels=None, interpret: bool = False) -> str:
    """"auto", "kernel", "interpret" or "reference" for a call (``interpret=True`` wins)."""
    if interpret:
        return "interpret"
    return get_use_kernels() if use_kernels is None else _normalise(use_kernels)


def _run(op: str, kernel_fn, ref_fn, arrays, backend: str):
    """Dispatch ``kernel_fn(*arrays, interpret=...)`` / ``ref_fn(*arrays)`` per ``backend``."""
    if backend == "reference":
        return ref_fn(*arrays)
    if backend == "interpret":
        return kernel_fn(*arrays, interpret=True)
    compiled = functools.partial(kernel_fn, interpret=False)
    if backend == "kernel":
        other = functools.partial(kernel_fn, interpret=True)
        return lax.platform_dependent(*arrays, tpu=compiled, default=other)
    gpu = {"cuda": compiled, "rocm": compiled} if GPU_KERNELS.get(op) else {}
    return lax.platform_dependent(*arrays, tpu=compiled, default=ref_fn, **gpu)


def score_landmarks(q, codes, scales, grid, lengths, *, mode: str = "eval", use_kernels=None,
                    interpret: bool = False, block_tokens: int = 512, kernel_method: str = "gather",
                    ref_method: str = "lut"):
    """YAKV landmark scores, ``[B, Hkv, T]`` (bf16 in ``mode="eval"``, float32 in ``"serve"``; ``-inf`` invalid).

    Inputs as in :mod:`pallas_kernels.score`: ``q [B, H, D]``, uint8 ``codes [B, Hkv, T, D/d]``, float32
    ``scales [B, Hkv, T]``, float32 ``grid [n, d]``, int ``lengths [B]``. ``kernel_method`` ("gather" | "onehot")
    and ``block_tokens`` tune the kernel, ``ref_method`` ("lut" | "lut_f32" | "dequant") the reference.
    """
    _score.check_score_inputs(q, codes, scales, grid, lengths, mode)
    kern = functools.partial(_score.score_landmarks_kernel, mode=mode, block_tokens=block_tokens,
                             method=kernel_method)
    ref = functools.partial(_score.score_landmarks_ref, mode=mode, method=ref_method)
    return _run("score_landmarks", kern, ref, (q, codes, scales, grid, lengths),
                resolve_backend(use_kernels, interpret))


def decode_attention(q, k, v, mask=None, *, lengths=None, scale: float | None = None, use_kernels=None,
                     interpret: bool = False, block_size: int = 512):
    """One-query GQA attention ``[B, H, D]`` over ``k, v [B, Hkv, S, D]``.

    ``mask`` ``[B, Hkv, S]`` / ``[B, 1, S]``, bool (True = valid) or additive float; ``lengths`` int ``[B]`` or
    ``[B, Hkv]`` (rows ``>= length`` invalid). Both optional and combinable. Softmax scale ``1/sqrt(D)`` unless
    ``scale`` is given. Numerics in :mod:`pallas_kernels.decode_attention`.
    """
    _attn.check_attention_inputs(q, k, v, lengths, mask)
    arrays = [q, k, v]
    names = []
    if lengths is not None:
        arrays.append(lengths)
        names.append("lengths")
    if mask is not None:
        arrays.append(mask)
        names.append("mask")

    def bind(fn):
        def call(q_, k_, v_, *extra, **kw):
            return fn(q_, k_, v_, scale=scale, **dict(zip(names, extra)), **kw)
        return call

    kern = bind(functools.partial(_attn.decode_attention_kernel, block_size=block_size))
    ref = bind(_attn.decode_attention_ref)
    return _run("decode_attention", kern, ref, tuple(arrays), resolve_backend(use_kernels, interpret))
