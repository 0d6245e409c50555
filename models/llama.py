"""Llama 3 / 3.1 / 3.2 family (SmolLM2 is this family): GQA, SwiGLU, RMSNorm, rotate-half RoPE with optional
"llama3" frequency scaling, tied or untied embeddings. The computation is :mod:`models.transformer` with
``qk_norm=False``; this module holds the family's specifics."""
from .config import PRESETS, ModelConfig

FAMILY = "llama"
# llama.cpp's converter permutes q/k rows for Llama (undone in models.weights.unpermute_llama_qk).
GGUF_QK_PERMUTED = True


def preset(name: str) -> ModelConfig:
    cfg = PRESETS[name]
    assert cfg.family == FAMILY
    return cfg
