"""Flax NNX Llama 3 / Qwen3 / Qwen3-MoE models, weight readers, tokenizer and the model registry."""
from .config import PRESETS, ModelConfig, RopeScaling
from .registry import LoadedModel, known_models, load_model
from .transformer import Transformer, forward_logits_pure


def forward_logits(model: Transformer, tokens):
    """Full causal forward of a model: int32 ``[B, T]`` -> float32 logits ``[B, T, V]`` (jitted)."""
    import jax
    import jax.numpy as jnp

    fn = _JIT.get(model.cfg)
    if fn is None:
        fn = _JIT[model.cfg] = jax.jit(lambda p, t, cfg=model.cfg: forward_logits_pure(p, cfg, t))
    return fn(model.params(), jnp.asarray(tokens, jnp.int32))


_JIT: dict = {}

__all__ = ["ModelConfig", "RopeScaling", "PRESETS", "LoadedModel", "load_model", "known_models", "Transformer",
           "forward_logits", "forward_logits_pure"]
