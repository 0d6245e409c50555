"""Weight readers: Hugging Face safetensors (single or sharded), GGUF (dequantized with ``gguf``), orbax.

Every reader produces the layer-stacked parameter dict of :mod:`models.transformer` directly in the
target dtype and sharding: each device shard is filled by ``jax.make_array_from_callback`` from
memory-mapped file slices, so no second full host copy of the model is built (an expert-parallel shard
reads only its own experts). Checkpoints are untrusted input: nothing is unpickled; headers and shapes
are validated, and a tensor that does not fit the config is reported by its name in the file (the HF or
GGUF tensor name), its shape and the shape the config expects.

Mixture-of-experts tensors: HF checkpoints hold one ``[out, in]`` matrix per expert
(``model.layers.{i}.mlp.experts.{e}.gate_proj.weight``) and the router ``model.layers.{i}.mlp.gate.weight``
``[E, d]``; GGUF (llama.cpp ``qwen3moe``) stacks the experts of a layer in one tensor, ``blk.{i}.ffn_gate_exps``
/ ``ffn_up_exps`` with dims ``(d, f, E)`` and ``ffn_down_exps`` ``(f, d, E)`` (GGUF order, innermost first), and
the router ``blk.{i}.ffn_gate_inp`` ``(d, E)``.
"""
from __future__ import annotations

import itertools
import json
import os
import struct
from typing import Callable, Iterable

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from .config import ModelConfig
from .gguf_file import GGUFFile
from .transformer import Params, check_mesh, param_partition_specs, param_shapes, stack_layers


class WeightError(ValueError):
    """A checkpoint file is missing, truncated, or does not match the model configuration."""


# ----------------------------------------------------------------------------- safetensors
_ST_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16, "F64": np.float64,
              "I64": np.int64, "I32": np.int32, "I8": np.int8, "U8": np.uint8}


class SafetensorsFile:
    """Memory-mapped safetensors file: ``tensor(name)`` returns a read-only numpy view (no copy)."""

    def __init__(self, path: str):
        self.path = path
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise WeightError(f"{path}: truncated safetensors file ({size} bytes)")
            (n,) = struct.unpack("<Q", head)
            if n > size - 8 or n > 100 * 2**20:
                raise WeightError(f"{path}: safetensors header length {n} B exceeds the file size {size} B")
            try:
                header = json.loads(f.read(n))
            except json.JSONDecodeError as e:
                raise WeightError(f"{path}: corrupt safetensors header ({e})") from None
        header.pop("__metadata__", None)
        self._base = 8 + n
        self._mm = np.memmap(path, dtype=np.uint8, mode="r")
        self.entries = {}
        for name, e in header.items():
            if e["dtype"] not in _ST_DTYPES:
                raise WeightError(f"{path}: tensor {name} has unsupported dtype {e['dtype']}")
            dt = np.dtype(_ST_DTYPES[e["dtype"]])
            start, end = e["data_offsets"]
            want = int(np.prod(e["shape"], dtype=np.int64)) * dt.itemsize
            if end - start != want or self._base + end > size:
                raise WeightError(f"{path}: tensor {name} needs bytes [{start}, {end}) beyond the file "
                                  f"({size - self._base} data bytes): the file is truncated or corrupt")
            self.entries[name] = (dt, tuple(e["shape"]), start)

    def tensor(self, name: str) -> np.ndarray:
        dt, shape, start = self.entries[name]
        nbytes = int(np.prod(shape, dtype=np.int64)) * dt.itemsize
        return self._mm[self._base + start: self._base + start + nbytes].view(dt).reshape(shape)


def open_safetensors_dir(path: str) -> Callable[[str, tuple[int, ...]], np.ndarray]:
    """Tensor lookup for a HF checkpoint dir: ``model.safetensors`` or sharded with ``model.safetensors.index.json``."""
    index = os.path.join(path, "model.safetensors.index.json")
    single = os.path.join(path, "model.safetensors")
    files: dict[str, SafetensorsFile] = {}
    if os.path.exists(index):
        with open(index) as f:
            wmap = json.load(f)["weight_map"]
        for shard in sorted(set(wmap.values())):
            p = os.path.join(path, shard)
            if not os.path.exists(p):
                raise WeightError(f"shard {shard} listed in {index} is missing")
            files[shard] = SafetensorsFile(p)
        lookup = {name: files[shard] for name, shard in wmap.items()}
    elif os.path.exists(single):
        sf = SafetensorsFile(single)
        lookup = {name: sf for name in sf.entries}
    else:
        raise WeightError(f"no model.safetensors or model.safetensors.index.json in {path}")

    def get(name: str, shape: tuple[int, ...]) -> np.ndarray:
        """Tensor ``name``, which must have ``shape`` (as stored: HF ``[out, in]``)."""
        if name not in lookup:
            raise WeightError(f"tensor {name!r} is missing from the checkpoint at {path}")
        f = lookup[name]
        got = f.entries[name][1]
        if got != tuple(shape):
            raise WeightError(f"tensor {name!r} in {f.path} has shape {got}; the model config expects "
                              f"{tuple(shape)}")
        return f.tensor(name)

    return get


# kvjax parameter -> (HF tensor name with {i} for the layer and {e} for the expert, stored transposed?)
HF_NAMES = {
    "embed": ("model.embed_tokens.weight", False),
    "final_norm": ("model.norm.weight", False),
    "layers.attn_norm": ("model.layers.{i}.input_layernorm.weight", False),
    "layers.wq": ("model.layers.{i}.self_attn.q_proj.weight", True),
    "layers.wk": ("model.layers.{i}.self_attn.k_proj.weight", True),
    "layers.wv": ("model.layers.{i}.self_attn.v_proj.weight", True),
    "layers.wo": ("model.layers.{i}.self_attn.o_proj.weight", True),
    "layers.mlp_norm": ("model.layers.{i}.post_attention_layernorm.weight", False),
    "layers.w_gate": ("model.layers.{i}.mlp.gate_proj.weight", True),
    "layers.w_up": ("model.layers.{i}.mlp.up_proj.weight", True),
    "layers.w_down": ("model.layers.{i}.mlp.down_proj.weight", True),
    "layers.q_norm": ("model.layers.{i}.self_attn.q_norm.weight", False),
    "layers.k_norm": ("model.layers.{i}.self_attn.k_norm.weight", False),
    "dense.w_gate": ("model.layers.{i}.mlp.gate_proj.weight", True),
    "dense.w_up": ("model.layers.{i}.mlp.up_proj.weight", True),
    "dense.w_down": ("model.layers.{i}.mlp.down_proj.weight", True),
    "moe.router": ("model.layers.{i}.mlp.gate.weight", True),
    "moe.w_gate": ("model.layers.{i}.mlp.experts.{e}.gate_proj.weight", True),
    "moe.w_up": ("model.layers.{i}.mlp.experts.{e}.up_proj.weight", True),
    "moe.w_down": ("model.layers.{i}.mlp.experts.{e}.down_proj.weight", True),
    "lm_head": ("lm_head.weight", True),
}
# Parameters with an expert axis after the layer axis: read per (layer, expert).
EXPERT_AXIS_PARAMS = ("moe.w_gate", "moe.w_up", "moe.w_down")


def _swap_last(shape: tuple[int, ...]) -> tuple[int, ...]:
    return (*shape[:-2], shape[-1], shape[-2])


# ----------------------------------------------------------------------------- assembling arrays
def make_sharding(mesh, spec: tuple | None):
    if mesh is None:
        return jax.sharding.SingleDeviceSharding(jax.devices()[0])
    return NamedSharding(mesh, P(*spec))


def num_item_axes(name: str) -> int:
    """Leading axes of a parameter that index file tensors: 0 (global), 1 (layer), 2 (layer, expert)."""
    return 2 if name in EXPERT_AXIS_PARAMS else (1 if "." in name else 0)


def assemble(cfg: ModelConfig, read: Callable[[str, tuple[int, ...]], np.ndarray], dtype, mesh=None) -> Params:
    """Build the parameter dict from ``read(param_name, item) -> np.ndarray`` in kvjax layout, where ``item`` is
    ``()`` for a global parameter, ``(layer,)`` for a layer-stacked one (the decoder layer, not the stack index)
    and ``(layer, expert)`` for expert weights; ``read`` checks shapes. Each device shard is materialised from the
    items it needs only, cast to ``dtype`` one item at a time."""
    check_mesh(cfg, mesh)
    dtype = jnp.dtype(dtype)
    specs = param_partition_specs(cfg)
    out = {}
    for name, shape in param_shapes(cfg).items():
        n_items = num_item_axes(name)
        layers = stack_layers(cfg, name)

        def cb(index, name=name, shape=shape, n_items=n_items, layers=layers):
            ranges = [range(*index[a].indices(shape[a])) for a in range(n_items)]
            rest = tuple(index[n_items:])
            parts = []
            for item in itertools.product(*ranges):
                if n_items:
                    item = (layers[item[0]], *item[1:])
                parts.append(np.asarray(read(name, item)[rest], dtype=np.float32).astype(dtype))
            if not n_items:
                return parts[0]
            return np.stack(parts).reshape(tuple(len(r) for r in ranges) + parts[0].shape)

        out[name] = jax.make_array_from_callback(shape, make_sharding(mesh, specs[name]), cb)
    return out


def item_shape(cfg: ModelConfig, name: str) -> tuple[int, ...]:
    """Shape of one item of a parameter (see :func:`assemble`) in kvjax layout."""
    return param_shapes(cfg)[name][num_item_axes(name):]


def load_safetensors_params(path: str, cfg: ModelConfig, dtype=jnp.bfloat16, mesh=None) -> Params:
    """Load a HF checkpoint directory (safetensors, single or sharded) into kvjax parameters."""
    get = open_safetensors_dir(path)

    def read(name, item):
        tmpl, transpose = HF_NAMES[name]
        want = item_shape(cfg, name)
        i, e = (item + (None, None))[:2]
        a = get(tmpl.format(i=i, e=e), _swap_last(want) if transpose else want)
        return a.T if transpose else a

    return assemble(cfg, read, dtype, mesh)


# ----------------------------------------------------------------------------- GGUF
# kvjax parameter -> (GGUF tensor name with {i} for the layer, transposed?). Expert tensors hold all experts.
GGUF_NAMES = {
    "embed": ("token_embd.weight", False),
    "final_norm": ("output_norm.weight", False),
    "lm_head": ("output.weight", True),
    "layers.attn_norm": ("blk.{i}.attn_norm.weight", False),
    "layers.wq": ("blk.{i}.attn_q.weight", True),
    "layers.wk": ("blk.{i}.attn_k.weight", True),
    "layers.wv": ("blk.{i}.attn_v.weight", True),
    "layers.wo": ("blk.{i}.attn_output.weight", True),
    "layers.mlp_norm": ("blk.{i}.ffn_norm.weight", False),
    "layers.w_gate": ("blk.{i}.ffn_gate.weight", True),
    "layers.w_up": ("blk.{i}.ffn_up.weight", True),
    "layers.w_down": ("blk.{i}.ffn_down.weight", True),
    "layers.q_norm": ("blk.{i}.attn_q_norm.weight", False),
    "layers.k_norm": ("blk.{i}.attn_k_norm.weight", False),
    "dense.w_gate": ("blk.{i}.ffn_gate.weight", True),
    "dense.w_up": ("blk.{i}.ffn_up.weight", True),
    "dense.w_down": ("blk.{i}.ffn_down.weight", True),
    "moe.router": ("blk.{i}.ffn_gate_inp.weight", True),
    "moe.w_gate": ("blk.{i}.ffn_gate_exps.weight", True),
    "moe.w_up": ("blk.{i}.ffn_up_exps.weight", True),
    "moe.w_down": ("blk.{i}.ffn_down_exps.weight", True),
}

SUPPORTED_GGUF_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K")


def gguf_field_values(reader) -> dict:
    """GGUF metadata as plain Python values (strings decoded, arrays as lists)."""
    if isinstance(reader, GGUFFile):
        return dict(reader.fields)
    vals = {}
    for key, field in reader.fields.items():
        try:
            vals[key] = field.contents()
        except Exception:  # noqa: BLE001 - exotic field types are not needed
            continue
    return vals


def open_gguf(path: str) -> GGUFFile:
    if not os.path.exists(path):
        raise WeightError(f"GGUF file not found: {path}")
    try:
        return GGUFFile(path)
    except Exception as e:  # noqa: BLE001 - the reader raises many kinds on corrupt input
        raise WeightError(f"{path}: cannot read GGUF ({type(e).__name__}: {e}); the file may be truncated or corrupt") from None


def unpermute_llama_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's converter permutation of q/k rows (HF ``[out, in]``), giving HF rotate-half layout."""
    out, inp = w.shape
    hd = out // n_head
    return w.reshape(n_head, hd // 2, 2, inp).swapaxes(1, 2).reshape(out, inp)


def load_gguf_params(reader, cfg: ModelConfig, dtype=jnp.bfloat16, mesh=None) -> Params:
    """Dequantize a GGUF model's tensors into kvjax parameters (Llama q/k permutation undone)."""
    import gguf

    tensors = {t.name: t for t in reader.tensors}
    last: dict[str, np.ndarray] = {}  # the last dequantized tensor: a layer's experts are read one by one

    def read(name, item):
        tmpl, transpose = GGUF_NAMES[name]
        tname = tmpl.format(i=item[0] if item else None)
        if tname not in tensors:
            raise WeightError(f"tensor {tname!r} is missing from the GGUF file")
        t = tensors[tname]
        want = item_shape(cfg, name)
        want = _swap_last(want) if transpose else want
        if len(item) == 2:
            want = (cfg.num_experts, *want)
        got = tuple(int(x) for x in reversed(t.shape))
        if got != want:
            raise WeightError(f"GGUF tensor {tname!r} has dims {tuple(reversed(got))}; the model config expects "
                              f"{tuple(reversed(want))} (GGUF order, innermost first)")
        ttype = t.tensor_type.name
        if ttype not in SUPPORTED_GGUF_TYPES:
            raise WeightError(f"tensor {tname}: GGUF type {ttype} is not supported ({', '.join(SUPPORTED_GGUF_TYPES)})")
        if tname not in last:
            last.clear()
            last[tname] = np.asarray(gguf.dequantize(t.data, t.tensor_type), dtype=np.float32).reshape(got)
        a = last[tname]
        if len(item) == 2:
            a = a[item[1]]
        if cfg.family == "llama" and name in ("layers.wq", "layers.wk"):
            a = unpermute_llama_qk(a, cfg.num_heads if name == "layers.wq" else cfg.num_kv_heads)
        return np.swapaxes(a, -1, -2) if transpose else a

    return assemble(cfg, read, dtype, mesh)


# ----------------------------------------------------------------------------- orbax
ORBAX_CONFIG = "kvjax_config.json"


def save_orbax(path: str, params: Params, cfg: ModelConfig, extra: dict | None = None) -> None:
    """Save parameters as an orbax checkpoint at ``path`` (+ ``kvjax_config.json`` with the model config)."""
    import dataclasses

    import orbax.checkpoint as ocp

    path = os.path.abspath(path)
    os.makedirs(path, exist_ok=True)
    ckpt = ocp.StandardCheckpointer()
    ckpt.save(os.path.join(path, "params"), dict(params), force=True)
    ckpt.wait_until_finished()
    meta = {"model_config": dataclasses.asdict(cfg), **(extra or {})}
    with open(os.path.join(path, ORBAX_CONFIG), "w") as f:
        json.dump(meta, f, indent=1)


def read_orbax_meta(path: str) -> dict:
    p = os.path.join(path, ORBAX_CONFIG)
    if not os.path.exists(p):
        raise WeightError(f"{path} is not a kvjax orbax checkpoint (no {ORBAX_CONFIG})")
    with open(p) as f:
        return json.load(f)


def load_orbax_params(path: str, cfg: ModelConfig, dtype=jnp.bfloat16, mesh=None) -> Params:
    """Restore an orbax checkpoint straight into the target shardings (sharded restore) and dtype."""
    import orbax.checkpoint as ocp

    check_mesh(cfg, mesh)
    specs = param_partition_specs(cfg)
    target = {name: jax.ShapeDtypeStruct(shape, jnp.dtype(dtype), sharding=make_sharding(mesh, specs[name]))
              for name, shape in param_shapes(cfg).items()}
    ckpt = ocp.StandardCheckpointer()
    return ckpt.restore(os.path.join(os.path.abspath(path), "params"), target)


def iter_layers(params: Params) -> Iterable[str]:
    return (k for k in params if k.startswith("layers."))
