"""Qwen3 dense family: like Llama plus a per-head RMSNorm on q and k before RoPE (``q_norm``/``k_norm``), no
attention bias, head_dim independent of hidden/heads. The computation is :mod:`models.transformer` with
``qk_norm=True``."""
from .config import PRESETS, ModelConfig

FAMILY = "qwen3"
# llama.cpp does not permute Qwen q/k rows (NEOX RoPE = HF rotate-half).
GGUF_QK_PERMUTED = False


def preset(name: str) -> ModelConfig:
    cfg = PRESETS[name]
    assert cfg.family == FAMILY
    return cfg
