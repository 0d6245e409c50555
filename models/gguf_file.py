"""A GGUF file's metadata and tensor table, read directly (the ``gguf`` package's reader builds a numpy view per
array element, which takes seconds for a tokenizer's 49k-entry vocabulary; this reads the same layout in a fraction
of that).

Layout (GGUF v2/v3, little-endian): magic ``GGUF``, version u32, tensor count u64, metadata count u64; each
metadata entry is a string key (u64 length + UTF-8 bytes), a value type u32 and the value (arrays: element type u32,
count u64, elements); then per tensor: name, dims count u32, dims u64 (innermost first), ggml type u32, offset u64
from the data section, which starts at the next multiple of ``general.alignment`` (default 32) after the table.
Tensor data are memory-mapped and shaped like ``gguf.GGUFReader``'s (outermost first; quantized types as rows of
bytes), so ``gguf.dequantize`` takes them unchanged.
"""
from __future__ import annotations

import dataclasses
import mmap
import struct

import numpy as np

_SCALARS = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "<u1", 10: "<u8", 11: "<i8",
            12: "<f8"}
_BOOL, _STRING, _ARRAY = 7, 8, 9
_PLAIN = {"F32": np.float32, "F16": np.float16, "F64": np.float64, "I8": np.int8, "I16": np.int16, "I32": np.int32,
          "I64": np.int64}


@dataclasses.dataclass(frozen=True)
class GGUFTensor:
    """One tensor: ``shape`` in GGUF order (innermost first), ``tensor_type`` a ``gguf.GGMLQuantizationType``,
    ``data`` the memory-mapped values (outermost first; uint8 rows for quantized types)."""

    name: str
    shape: tuple[int, ...]
    tensor_type: object
    data: np.ndarray


class GGUFFile:
    """``fields`` {key: value} (strings decoded, arrays as lists, booleans as bool) and ``tensors`` (list of
    :class:`GGUFTensor`) of a GGUF file. Raises ValueError on a file that is not GGUF or is cut short."""

    def __init__(self, path: str):
        import gguf

        self.path = path
        with open(path, "rb") as f:
            self._mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        self._size = len(self._mm)
        self._pos = 0
        if self._take(4) != b"GGUF":
            raise ValueError("not a GGUF file (bad magic)")
        version = self._scalar("<I")
        if version not in (2, 3):
            raise ValueError(f"GGUF version {version} is not supported (2, 3)")
        n_tensors, n_fields = self._scalar("<Q"), self._scalar("<Q")
        self.fields: dict = {"GGUF.version": version, "GGUF.tensor_count": n_tensors, "GGUF.kv_count": n_fields}
        for _ in range(n_fields):
            key = self._string()
            self.fields[key] = self._value(self._scalar("<I"))
        infos = []
        for _ in range(n_tensors):
            name = self._string()
            n_dims = self._scalar("<I")
            dims = tuple(int(x) for x in self._array_of("<u8", n_dims))
            infos.append((name, dims, self._scalar("<I"), self._scalar("<Q")))
        align = int(self.fields.get("general.alignment", 32))
        start = -(-self._pos // align) * align
        self.tensors: list[GGUFTensor] = []
        for name, dims, raw_type, offset in infos:
            qtype = gguf.GGMLQuantizationType(raw_type)
            block, type_size = gguf.GGML_QUANT_SIZES[qtype]
            n = int(np.prod(dims)) if dims else 1
            shape = tuple(reversed(dims))
            if qtype.name in _PLAIN:
                dt, count = np.dtype(_PLAIN[qtype.name]), n
            else:
                dt, count = np.dtype(np.uint8), n * type_size // block
                shape = (*shape[:-1], shape[-1] // block * type_size)
            lo = start + offset
            if lo + count * dt.itemsize > self._size:
                raise ValueError(f"tensor {name!r} runs past the end of the file (truncated?)")
            data = np.frombuffer(self._mm, dt, count, lo).reshape(shape)
            self.tensors.append(GGUFTensor(name, dims, qtype, data))

    # -- little readers over the memory map
    def _take(self, nbytes: int) -> bytes:
        if self._pos + nbytes > self._size:
            raise ValueError("the file ends inside its header (truncated?)")
        out = self._mm[self._pos:self._pos + nbytes]
        self._pos += nbytes
        return out

    def _scalar(self, fmt: str):
        n = struct.calcsize(fmt)
        if self._pos + n > self._size:
            raise ValueError("the file ends inside its header (truncated?)")
        v = struct.unpack_from(fmt, self._mm, self._pos)[0]
        self._pos += n
        return v

    def _array_of(self, dt: str, count: int) -> np.ndarray:
        return np.frombuffer(self._take(np.dtype(dt).itemsize * count), dt)

    def _string(self) -> str:
        return self._take(self._scalar("<Q")).decode("utf-8", errors="replace")

    def _value(self, vtype: int):
        if vtype == _STRING:
            return self._string()
        if vtype == _ARRAY:
            etype, count = self._scalar("<I"), self._scalar("<Q")
            if etype == _STRING:
                return [self._string() for _ in range(count)]
            if etype in _SCALARS:
                vals = self._array_of(_SCALARS[etype], count)
                return [bool(v) for v in vals] if etype == _BOOL else vals.tolist()
            return [self._value(etype) for _ in range(count)]
        if vtype in _SCALARS:
            v = self._array_of(_SCALARS[vtype], 1)[0].item()
            return bool(v) if vtype == _BOOL else v
        raise ValueError(f"unknown GGUF value type {vtype}")
