"""Backend choice for the kvjax kernels: one entry point per op.

* :func:`score_landmarks` — YAKV landmark scores against HIGGS codes (:mod:`pallas_kernels.score`,
  :mod:`pallas_kernels.score_gpu`).
* :func:`decode_attention` — one-query GQA attention over gathered rows (:mod:`pallas_kernels.decode_attention`,
  :mod:`pallas_kernels.decode_attention_gpu`).
* :func:`decode_attention_segments` — the same attention over several row segments (window, fetched rows,
  generated slots) that the GPU kernel reads where they lie instead of concatenating them first.

Which implementation runs is set by ``use_kernels`` (argument > :func:`set_use_kernels` > env ``KVJAX_KERNELS``,
default ``"auto"``):

=========================  ===============================================================================
value                      behaviour
=========================  ===============================================================================
``"auto"``                 TPU: the compiled Mosaic kernel. GPU (cuda/rocm): the compiled Triton kernel of
                           the ops in :data:`GPU_KERNELS`, else the reference. CPU: the reference. Chosen
                           per lowering platform with ``jax.lax.platform_dependent``, so a function traced
                           on CPU and lowered for TPU or CUDA (``lower(lowering_platforms=("tpu",))``) gets
                           that platform's kernel, and a multi-platform export carries all of them.
``True`` / ``"kernel"``    force a kernel: compiled on TPU and GPU, the TPU kernel in Pallas interpret mode
                           elsewhere (slow; tests).
``"interpret"``            the TPU (Mosaic) kernel in Pallas interpret mode everywhere (``interpret=True`` on
                           a call does the same).
``"interpret_gpu"``        the GPU (Triton) kernel in Pallas interpret mode everywhere (tests of the GPU path
                           on CPU).
``False`` / ``"reference"``  the pure-jnp reference everywhere.
=========================  ===============================================================================

The setting is read when a function is traced: change it before ``jax.jit`` traces (or clear the jit cache).

Two kernel families, because Pallas lowers through different compilers: the TPU kernels use Mosaic TPU features
(scalar-prefetch grids, ``tpu.dynamic_gather``, TPU compiler params) that the Triton backend lacks; the GPU
kernels use Triton pointer gathers and masked loads (:mod:`pallas_kernels.score_gpu`). Both share the inputs
checks and the jnp references.

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

import jax.numpy as jnp
from jax import lax

from pallas_kernels import decode_attention as _attn
from pallas_kernels import score as _score
from pallas_kernels.decode_attention_gpu import decode_attention_gpu, decode_attention_segments_gpu
from pallas_kernels.score_gpu import score_landmarks_gpu

__all__ = [
    "GPU_KERNELS",
    "score_landmarks",
    "decode_attention",
    "decode_attention_segments",
    "resolve_backend",
    "set_use_kernels",
    "get_use_kernels",
    "kernels_override",
]

ENV_VAR = "KVJAX_KERNELS"
#: ops whose GPU (Triton) kernel "auto" uses on cuda/rocm; set an entry False to run the reference there instead
GPU_KERNELS: dict[str, bool] = {"score_landmarks": True, "decode_attention": True, "decode_attention_segments": True}
_VALUES = {
    "auto": "auto",
    "1": "kernel", "true": "kernel", "on": "kernel", "yes": "kernel", "kernel": "kernel", "kernels": "kernel",
    "0": "reference", "false": "reference", "off": "reference", "no": "reference", "reference": "reference",
    "ref": "reference",
    "interpret": "interpret",
    "interpret_gpu": "interpret_gpu", "interpret-gpu": "interpret_gpu",
}
_setting: str | None = None   # None: read the environment variable


def _normalise(value) -> str:
    if isinstance(value, bool):
        return "kernel" if value else "reference"
    key = str(value).strip().lower()
    if key not in _VALUES:
        raise ValueError(f"use_kernels={value!r}: expected 'auto', True/'kernel', False/'reference', 'interpret' or "
                         f"'interpret_gpu' (env {ENV_VAR} takes the same strings)")
    return _VALUES[key]


def set_use_kernels(value) -> None:
    """Set the process-wide default (``None`` = go back to env ``KVJAX_KERNELS``, default "auto")."""
    global _setting
    _setting = None if value is None else _normalise(value)


def get_use_kernels() -> str:
    """The current default: "auto", "kernel", "reference", "interpret" or "interpret_gpu"."""
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
    """"auto", "kernel", "interpret", "interpret_gpu" or "reference" for a call (``interpret=True`` wins)."""
    if interpret:
        return "interpret"
    return get_use_kernels() if use_kernels is None else _normalise(use_kernels)


def _run(op: str, tpu_fn, gpu_fn, ref_fn, arrays, backend: str):
    """Dispatch ``tpu_fn(*arrays, interpret=...)`` / ``gpu_fn(*arrays, interpret=...)`` / ``ref_fn(*arrays)`` per
    ``backend`` (see the module docstring)."""
    if backend == "reference":
        return ref_fn(*arrays)
    if backend == "interpret":
        return tpu_fn(*arrays, interpret=True)
    if backend == "interpret_gpu":
        return gpu_fn(*arrays, interpret=True)
    tpu = functools.partial(tpu_fn, interpret=False)
    gpu = functools.partial(gpu_fn, interpret=False)
    if backend == "kernel":
        return lax.platform_dependent(*arrays, tpu=tpu, cuda=gpu, rocm=gpu,
                                      default=functools.partial(tpu_fn, interpret=True))
    on_gpu = {"cuda": gpu, "rocm": gpu} if GPU_KERNELS.get(op) else {}
    return lax.platform_dependent(*arrays, tpu=tpu, default=ref_fn, **on_gpu)


def score_landmarks(q, codes, scales, grid, lengths, *, mode: str = "eval", layer=None, use_kernels=None,
                    interpret: bool = False, block_tokens: int = 512, kernel_method: str = "gather",
                    ref_method: str = "lut"):
    """YAKV landmark scores, ``[B, Hkv, T]`` (bf16 in ``mode="eval"``, float32 in ``"serve"``; ``-inf`` invalid).

    Inputs as in :mod:`pallas_kernels.score`: ``q [B, H, D]``, uint8 ``codes [B, Hkv, T, D/d]``, float32
    ``scales [B, Hkv, T]``, float32 ``grid [n, d]``, int ``lengths [B]``; with ``layer`` (int scalar) ``codes`` /
    ``scales`` are layer-stacked ``[L, ...]`` and the kernels read that layer in place (pass the stacked arrays
    rather than ``codes[layer]``, which XLA copies before a kernel call). ``kernel_method`` ("gather" | "onehot")
    and ``block_tokens`` tune the TPU kernel, ``ref_method`` ("lut" | "lut_f32" | "dequant") the reference; the GPU
    kernel runs with its defaults (:func:`pallas_kernels.score_gpu.score_landmarks_gpu`).
    """
    _score.check_score_inputs(q, codes, scales, grid, lengths, mode, layer)
    kern = functools.partial(_score.score_landmarks_kernel, mode=mode, block_tokens=block_tokens,
                             method=kernel_method)
    gpu = functools.partial(score_landmarks_gpu, mode=mode)
    ref = functools.partial(_score.score_landmarks_ref, mode=mode, method=ref_method)
    arrays = (q, codes, scales, grid, lengths)
    if layer is not None:
        arrays += (jnp.asarray(layer, jnp.int32),)
        kern, gpu, ref = (lambda *a, _f=f, **kw: _f(*a[:5], layer=a[5], **kw) for f in (kern, gpu, ref))
    return _run("score_landmarks", kern, gpu, ref, arrays, resolve_backend(use_kernels, interpret))


def decode_attention(q, k, v, mask=None, *, lengths=None, layer=None, scale: float | None = None, use_kernels=None,
                     interpret: bool = False, block_size: int = 512):
    """One-query GQA attention ``[B, H, D]`` over ``k, v [B, Hkv, S, D]``.

    ``mask`` ``[B, Hkv, S]`` / ``[B, 1, S]``, bool (True = valid) or additive float; ``lengths`` int ``[B]`` or
    ``[B, Hkv]`` (rows ``>= length`` invalid). Both optional and combinable. ``layer`` (int scalar): ``k, v`` are
    layer-stacked ``[L, B, Hkv, S, D]`` and the kernels read that layer in place (pass the stacked cache rather
    than ``k[layer]``, which XLA copies before a kernel call). Softmax scale ``1/sqrt(D)`` unless ``scale`` is
    given. Numerics in :mod:`pallas_kernels.decode_attention`.
    """
    _attn.check_layered(q, k, v, lengths, mask, layer)
    arrays = [q, k, v]
    names = []
    for name, x in (("lengths", lengths), ("mask", mask), ("layer", layer)):
        if x is not None:
            arrays.append(x if name != "layer" else jnp.asarray(x, jnp.int32))
            names.append(name)

    def bind(fn):
        def call(q_, k_, v_, *extra, **kw):
            return fn(q_, k_, v_, scale=scale, **dict(zip(names, extra)), **kw)
        return call

    kern = bind(functools.partial(_attn.decode_attention_kernel, block_size=block_size))
    gpu = bind(decode_attention_gpu)
    ref = bind(_attn.decode_attention_ref)
    return _run("decode_attention", kern, gpu, ref, tuple(arrays), resolve_backend(use_kernels, interpret))


def decode_attention_segments(q, segments, *, scale: float | None = None, use_kernels=None, interpret: bool = False,
                              block_size: int = 512):
    """One-query GQA attention ``[B, H, D]`` of ``q`` over the union of row ``segments``.

    ``segments``: a sequence of ``(k, v, mask)`` with ``k, v [B, Hkv, S_i, D]`` (same KV heads and dtypes) and
    ``mask`` ``[B, 1|Hkv, S_i]`` bool (True = valid) / additive float, or None (all valid). Equals
    :func:`decode_attention` over the segments concatenated along rows
    (:func:`pallas_kernels.decode_attention.concat_segments`), which is what the reference and the TPU kernel run;
    the GPU kernel reads each segment in place (:func:`pallas_kernels.decode_attention_gpu.decode_attention_segments_gpu`).
    """
    _attn.check_segments(q, segments)
    segments = [tuple(s) for s in segments]

    def concatenated(fn):
        def call(q_, segs, **kw):
            k, v, mask = _attn.concat_segments(segs)
            return fn(q_, k, v, mask=mask, scale=scale, **kw)
        return call

    kern = concatenated(functools.partial(_attn.decode_attention_kernel, block_size=block_size))
    gpu = functools.partial(decode_attention_segments_gpu, scale=scale)
    ref = concatenated(_attn.decode_attention_ref)
    return _run("decode_attention_segments", kern, gpu, ref, (q, segments), resolve_backend(use_kernels, interpret))
