"""Qwen3-MoE family (Qwen3-30B-A3B): Qwen3's attention (per-head q/k RMSNorm before RoPE, GQA, no bias) with a
sparse mixture-of-experts feed-forward (:mod:`models.moe`) in the layers ``ModelConfig.moe_layers`` and dense
SwiGLU MLPs in the others. The computation is :mod:`models.transformer`."""
from .config import PRESETS, ModelConfig

FAMILY = "qwen3_moe"
# llama.cpp does not permute Qwen q/k rows (NEOX RoPE = HF rotate-half).
GGUF_QK_PERMUTED = False


def preset(name: str) -> ModelConfig:
    cfg = PRESETS[name]
    assert cfg.family == FAMILY
    return cfg
