"""HIGGS vector quantization (Hadamard rotation + EDEN grid), with a packed uint8 code format.

Algorithm (algorithms.md §4.2). For an input ``x [..., C]`` split into contiguous groups of ``G`` values:

* ``s = ||x_g||_2`` per group (float32; stored in ``scale_dtype``);
* ``y = H_G x_g / s`` (unnormalised Sylvester Hadamard, so ``y`` has unit RMS per coordinate);
* each consecutive ``d``-sub-vector of ``y`` is replaced by the index of its nearest EDEN grid point,
  ``idx = argmax_j (2 <y_sub, g_j> - ||g_j||^2)`` (first index wins ties);
* decode: ``x_hat = (1/G) H_G (s * concat_j grid[idx_j])``.

A group of all zeros has ``s = 0``: it is divided by 1 instead (``y = 0``) and decodes to exactly 0.

Differences from the paper's code, on purpose: the eval path casts ``s * y_hat`` to float16 before the inverse
Hadamard; we stay in float32 until the final cast to ``out_dtype`` (the inference path also does). With
``scale_dtype="bfloat16"`` (inference path) ``y`` is normalised by the float32 norm and the bf16-rounded scale is
stored, as the authors' kernel does.

PACKED CODE FORMAT (other modules rely on exactly this). Index bits ``b = log2(n)``:

* ``b == 8``: one uint8 per sub-vector, codes ``[..., C/d]`` (d=4 -> 2 bits/value, d=2 -> 4 bits/value);
* ``b in {1, 2, 4}``: ``8/b`` indices per byte, little end first (index ``k*8/b + j`` sits in bits
  ``[j*b, (j+1)*b)`` of byte ``k``), codes ``[..., C/d * b/8]``;
* ``b in {3, 5, 6, 7}``: not bit-packed; one uint8 per sub-vector as for ``b == 8`` (so it costs 8 bits);
* ``b > 8``: rejected (n <= 256).

Scales are ``[..., C/G]`` in ``scale_dtype``.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from kvjax.quant import nearest as _nearest
from kvjax.quant.hadamard import check_group, hadamard_transform

__all__ = [
    "HiggsCodes",
    "HiggsConfig",
    "bits_per_value",
    "code_bits",
    "higgs_decode",
    "higgs_encode",
    "higgs_qdq",
    "index_bits",
    "nearest_grid_index",
    "pack_indices",
    "packed_nbytes",
    "unpack_indices",
]

_SCALE_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
# Sub-vectors scored per block in the nearest-point search: block * n floats of scratch (16 MiB at n=256).
_SEARCH_BLOCK = _nearest.SEARCH_BLOCK


@dataclasses.dataclass(frozen=True)
class HiggsConfig:
    """HIGGS quantizer settings. Defaults are the paper's YAKV landmark quantizer (eval path):
    EDEN4-256 (2 bits/value), Hadamard group 128 (one KV head), float32 scales.

    The YAKV eval keys/values use ``HiggsConfig(d=2, n=256, hadamard_group=C)``; the inference-path landmarks use
    ``HiggsConfig(d=4, n=256, hadamard_group=C, scale_dtype="bfloat16")``.

    Attributes:
      d: grid dimension (values per sub-vector), >= 1, dividing ``hadamard_group``.
      n: number of grid points, a power of two in [2, 256] (indices are stored in uint8).
      hadamard_group: ``G``, values per Hadamard group and per scale, a power of two.
      scale_dtype: dtype of the stored per-group norms: "float32", "bfloat16" or "float16".
    """

    d: int = 4
    n: int = 256
    hadamard_group: int = 128
    scale_dtype: str = "float32"

    def __post_init__(self):
        if not isinstance(self.d, (int, np.integer)) or self.d < 1:
            raise ValueError(f"HiggsConfig.d (grid dimension) must be an integer >= 1, got {self.d!r}")
        if not isinstance(self.n, (int, np.integer)) or self.n < 2 or (self.n & (self.n - 1)) != 0:
            raise ValueError(f"HiggsConfig.n (grid points) must be a power of two >= 2, got {self.n!r}")
        if self.n > 256:
            raise ValueError(
                f"HiggsConfig.n={self.n} needs {int(math.log2(self.n))} index bits; codes are uint8, so n must be "
                f"<= 256 (8 bits)"
            )
        check_group(self.hadamard_group, name="HiggsConfig.hadamard_group")
        if self.hadamard_group % self.d != 0:
            raise ValueError(
                f"HiggsConfig.d={self.d} must divide hadamard_group={self.hadamard_group} values "
                f"(each group is split into d-dim sub-vectors)"
            )
        if self.scale_dtype not in _SCALE_DTYPES:
            raise ValueError(
                f"HiggsConfig.scale_dtype must be one of {sorted(_SCALE_DTYPES)}, got {self.scale_dtype!r}"
            )

    @property
    def jnp_scale_dtype(self):
        return _SCALE_DTYPES[self.scale_dtype]


class HiggsCodes(NamedTuple):
    """Packed HIGGS codes of an input ``[..., C]`` (a pytree).

    codes: uint8 ``[..., C/d]`` (``b`` = 8, 3, 5, 6, 7) or ``[..., C/d * b/8]`` (``b`` = 1, 2, 4), see module doc.
    scales: ``[..., C/G]`` in ``cfg.scale_dtype``, the L2 norm of each Hadamard group.
    """

    codes: jax.Array
    scales: jax.Array


def index_bits(cfg: HiggsConfig) -> int:
    """Information bits per grid index, ``log2(n)``."""
    return int(cfg.n).bit_length() - 1


def code_bits(cfg: HiggsConfig) -> int:
    """Bits one index occupies in the packed format: ``log2(n)`` for 1, 2, 4, 8; otherwise a whole byte."""
    b = index_bits(cfg)
    return b if b in (1, 2, 4, 8) else 8


def bits_per_value(cfg: HiggsConfig) -> float:
    """Storage bits per quantized value: ``code_bits/d + scale_bits/G`` (exact for the packed format).

    E.g. EDEN4-256, G=128, fp32 scales: 2 + 32/128 = 2.25; EDEN2-256, G=1024: 4 + 32/1024 = 4.03125.
    """
    scale_bits = jnp.dtype(cfg.jnp_scale_dtype).itemsize * 8
    return code_bits(cfg) / cfg.d + scale_bits / cfg.hadamard_group


def _codes_last(c: int, cfg: HiggsConfig) -> int:
    """Length of the packed code axis for a row of ``c`` values (validated)."""
    subvecs = c // cfg.d
    cb = code_bits(cfg)
    if cb == 8:
        return subvecs
    per_byte = 8 // cb
    if subvecs % per_byte != 0:
        raise ValueError(
            f"a row of C={c} values has C/d={subvecs} indices of {cb} bits; packing needs a multiple of "
            f"{per_byte} indices per row (C must be a multiple of {per_byte * cfg.d} values)"
        )
    return subvecs // per_byte


def _check_c(c: int, cfg: HiggsConfig, name: str = "x") -> None:
    if c % cfg.hadamard_group != 0:
        raise ValueError(
            f"{name} has a last axis of C={c} values, which must be a multiple of "
            f"hadamard_group={cfg.hadamard_group} values"
        )
    _codes_last(c, cfg)


def packed_nbytes(shape, cfg: HiggsConfig) -> int:
    """Bytes of the packed codes plus scales for an input of ``shape`` ``[..., C]``."""
    shape = tuple(int(s) for s in shape)
    if len(shape) == 0:
        raise ValueError("shape must have at least one axis [..., C], got ()")
    c = shape[-1]
    _check_c(c, cfg, "shape")
    rows = math.prod(shape[:-1])
    scale_bytes = jnp.dtype(cfg.jnp_scale_dtype).itemsize * (c // cfg.hadamard_group)
    return rows * (_codes_last(c, cfg) + scale_bytes)


def pack_indices(idx, bits: int):
    """Pack grid indices ``[..., K]`` (each < 2**bits) into uint8.

    ``bits`` = 8 (or 3, 5, 6, 7): returns ``idx`` as uint8 ``[..., K]``. ``bits`` in {1, 2, 4}: ``8/bits``
    indices per byte, little end first, ``[..., K*bits/8]`` (``K`` must be a multiple of ``8/bits``).
    """
    idx = jnp.asarray(idx)
    if bits not in (1, 2, 3, 4, 5, 6, 7, 8):
        raise ValueError(f"bits per index must be in 1..8 (uint8 codes), got {bits}")
    if bits not in (1, 2, 4):
        return idx.astype(jnp.uint8)
    per = 8 // bits
    k = idx.shape[-1]
    if k % per != 0:
        raise ValueError(f"cannot pack {k} indices of {bits} bits: the last axis must be a multiple of {per}")
    v = idx.astype(jnp.uint8).reshape(idx.shape[:-1] + (k // per, per))
    shifts = (jnp.arange(per, dtype=jnp.uint8) * bits).astype(jnp.uint8)
    # disjoint bit fields, so a sum is the same as an OR
    return jnp.sum(jnp.left_shift(v, shifts), axis=-1, dtype=jnp.uint8)


def unpack_indices(codes, bits: int, count: int | None = None):
    """Inverse of :func:`pack_indices`: uint8 codes -> int32 indices ``[..., K]``.

    ``count`` (optional) is the expected ``K``; it is checked against the code shape.
    """
    codes = jnp.asarray(codes)
    if codes.dtype != jnp.uint8:
        raise ValueError(f"codes must be uint8, got dtype {codes.dtype}")
    if bits not in (1, 2, 3, 4, 5, 6, 7, 8):
        raise ValueError(f"bits per index must be in 1..8 (uint8 codes), got {bits}")
    if bits not in (1, 2, 4):
        out = codes.astype(jnp.int32)
    else:
        per = 8 // bits
        shifts = (jnp.arange(per, dtype=jnp.uint8) * bits).astype(jnp.uint8)
        mask = jnp.uint8((1 << bits) - 1)
        v = jnp.bitwise_and(jnp.right_shift(codes[..., None], shifts), mask)
        out = v.reshape(codes.shape[:-1] + (codes.shape[-1] * per,)).astype(jnp.int32)
    if count is not None and out.shape[-1] != count:
        raise ValueError(f"codes hold {out.shape[-1]} indices per row, expected {count}")
    return out


def _check_grid(grid, cfg: HiggsConfig):
    grid = jnp.asarray(grid, dtype=jnp.float32)
    if grid.shape != (cfg.n, cfg.d):
        raise ValueError(f"grid must have shape [n, d] = [{cfg.n}, {cfg.d}] for this HiggsConfig, got {grid.shape}")
    return grid


def nearest_grid_index(y, grid, *, block: int = _SEARCH_BLOCK):
    """Nearest grid point of each ``d``-sub-vector: ``y [M, d]``, ``grid [n, d]`` -> int32 ``[M]``.

    ``argmax_j (2 <y, g_j> - ||g_j||^2)`` in float32 (first index wins ties), by the exact cell-candidate search
    of :mod:`kvjax.quant.nearest` when the grid is concrete, else by brute force. Memory-bounded: ``block``
    sub-vectors at a time.
    """
    return _nearest.nearest_grid_index(y, grid, block=int(block))


def higgs_encode(x, grid, cfg: HiggsConfig) -> HiggsCodes:
    """HIGGS-quantize ``x [..., C]`` (any float dtype) with ``grid [n, d]`` -> packed :class:`HiggsCodes`.

    Requires ``C % cfg.hadamard_group == 0`` (and, for ``b < 8`` packing, ``C/d`` a multiple of ``8/b``).
    Jit-able with ``cfg`` static: ``jax.jit(higgs_encode, static_argnames="cfg")``.
    """
    x = jnp.asarray(x)
    if x.ndim == 0:
        raise ValueError("x must have shape [..., C], got a scalar")
    c = x.shape[-1]
    _check_c(c, cfg)
    table = _nearest.cell_table(grid)  # before the cast: a traced grid has no table (brute force)
    grid = _check_grid(grid, cfg)
    if table is None:
        return _encode(x, grid, None, cfg)
    return _encode(x, grid, table.cand, cfg, table.radius, table.cells)


@functools.partial(jax.jit, static_argnames=("cfg", "radius", "cells"))
def _encode(x, grid, cand, cfg: HiggsConfig, radius: float = 0.0, cells: int = 0) -> HiggsCodes:
    c = x.shape[-1]
    g, d = cfg.hadamard_group, cfg.d
    lead = x.shape[:-1]
    xg = x.astype(jnp.float32).reshape(lead + (c // g, g))
    s = jnp.sqrt(jnp.sum(xg * xg, axis=-1))  # [..., C/G]
    safe = jnp.where(s > 0, s, 1.0)
    y = hadamard_transform(xg) / safe[..., None]
    flat = y.reshape(-1, d)
    if cand is None:
        idx = _nearest.nearest_brute(flat, grid, _SEARCH_BLOCK)
    else:
        idx = _nearest.nearest_cells(flat, grid, _nearest.CellTable(cand, radius, cells))
    idx = idx.reshape(lead + (c // d,))
    return HiggsCodes(codes=pack_indices(idx, code_bits(cfg)), scales=s.astype(cfg.jnp_scale_dtype))


def higgs_decode(codes: HiggsCodes, grid, cfg: HiggsConfig, out_dtype=jnp.float32):
    """Dequantize :class:`HiggsCodes` to ``[..., C]`` in ``out_dtype``: ``x_hat = (1/G) H_G (s * grid[idx])``.

    ``C`` is ``scales.shape[-1] * G``; the code shape is checked against it. float32 math throughout.
    """
    codes_arr = jnp.asarray(codes.codes)
    scales = jnp.asarray(codes.scales)
    grid = _check_grid(grid, cfg)
    g = cfg.hadamard_group
    if scales.ndim == 0:
        raise ValueError("codes.scales must have shape [..., C/G], got a scalar")
    c = scales.shape[-1] * g
    expect = _codes_last(c, cfg)
    if codes_arr.shape[:-1] != scales.shape[:-1] or codes_arr.shape[-1] != expect:
        raise ValueError(
            f"codes.codes shape {codes_arr.shape} does not match scales {scales.shape}: for C={c} values "
            f"expected [..., {expect}] uint8"
        )
    return _decode(codes_arr, scales, grid, cfg, jnp.dtype(out_dtype))


@functools.partial(jax.jit, static_argnames=("cfg", "out_dtype"))
def _decode(codes_arr, scales, grid, cfg: HiggsConfig, out_dtype):
    g, d = cfg.hadamard_group, cfg.d
    c = scales.shape[-1] * g
    lead = scales.shape[:-1]
    idx = unpack_indices(codes_arr, code_bits(cfg), c // d)
    yhat = jnp.take(grid, idx, axis=0, mode="clip").reshape(lead + (c // g, g))
    z = yhat * scales.astype(jnp.float32)[..., None]
    xhat = hadamard_transform(z, scale=1.0 / g)
    return xhat.reshape(lead + (c,)).astype(out_dtype)


def higgs_qdq(x, grid, cfg: HiggsConfig):
    """Quantize then dequantize ``x [..., C]`` (the eval path's simulation); result in ``x``'s dtype."""
    x = jnp.asarray(x)
    out_dtype = x.dtype if jnp.issubdtype(x.dtype, jnp.floating) else jnp.float32
    return higgs_decode(higgs_encode(x, grid, cfg), grid, cfg, out_dtype)
