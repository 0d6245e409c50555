"""kvjax: long-prompt decoding with the KV cache offloaded to host memory (YAKV, ShadowKV and baselines) in JAX."""
from .engine import Engine, Generation, GenerationConfig, Sampler, Session
from .policies import POLICIES, Policy, make_policy
from .sampling import SamplingConfig

__all__ = ["Engine", "Generation", "GenerationConfig", "Sampler", "Session", "SamplingConfig", "Policy", "POLICIES", "make_policy"]
__version__ = "0.1.0"
