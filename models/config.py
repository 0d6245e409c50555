"""Model configuration: one frozen dataclass for the Llama 3, Qwen3 (dense) and Qwen3-MoE decoder families.

Built from a Hugging Face ``config.json`` (:meth:`ModelConfig.from_hf`), from GGUF metadata
(:meth:`ModelConfig.from_gguf_fields`), or from the presets of the paper's models (:data:`PRESETS`).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any, Mapping

import numpy as np

FAMILIES = ("llama", "qwen3", "qwen3_moe")
# Hugging Face ``model_type`` and GGUF ``general.architecture`` of each family.
HF_MODEL_TYPES = {"llama": "llama", "qwen3": "qwen3", "qwen3_moe": "qwen3_moe"}
GGUF_ARCHS = {"llama": "llama", "qwen3": "qwen3", "qwen3moe": "qwen3_moe"}


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """Llama-3 ("llama3") RoPE frequency scaling; ``None`` on a config means plain RoPE."""

    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Shape and numerics of a decoder-only transformer (Llama 3 / 3.1 / 3.2, SmolLM2, Qwen3 dense, Qwen3-MoE).

    ``qk_norm`` is Qwen3's per-head RMSNorm of q and k before RoPE. GQA: query head h uses KV head
    ``h // (num_heads // num_kv_heads)``.

    Mixture of experts (family ``qwen3_moe``, Hugging Face ``Qwen3MoeForCausalLM``): a layer's feed-forward is
    ``num_experts`` SwiGLU experts of width ``moe_intermediate_size``, of which a softmax router picks
    ``num_experts_per_tok`` per token (their probabilities renormalised to sum 1 when ``norm_topk_prob``).
    Layer i is such a sparse layer when ``num_experts > 0``, i is not in ``mlp_only_layers`` and
    ``(i + 1) % decoder_sparse_step == 0`` (exactly transformers' rule); the other layers are dense SwiGLU MLPs
    of width ``intermediate_size``. ``num_experts=0`` (the dense families) means every layer is dense.
    """

    family: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    rms_norm_eps: float = 1e-5
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 8192
    qk_norm: bool = False
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int | None = None
    name: str = ""
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = False
    decoder_sparse_step: int = 1
    mlp_only_layers: tuple[int, ...] = ()

    def __post_init__(self):
        if self.family not in FAMILIES:
            raise ValueError(f"family={self.family!r} is not supported; expected one of {FAMILIES}")
        # JSON (orbax kvjax_config.json, config.json) gives lists; the config is hashed as a jit static argument.
        object.__setattr__(self, "mlp_only_layers", tuple(int(i) for i in self.mlp_only_layers))
        for field in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                      "num_kv_heads", "head_dim"):
            if getattr(self, field) <= 0:
                raise ValueError(f"{field}={getattr(self, field)} must be positive")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim} must be even for RoPE")
        if self.num_experts < 0:
            raise ValueError(f"num_experts={self.num_experts} must be >= 0 (0 = no mixture-of-experts layers)")
        if self.num_experts and self.family != "qwen3_moe":
            raise ValueError(f"num_experts={self.num_experts} needs family='qwen3_moe'; family={self.family!r} "
                             f"is dense")
        if self.decoder_sparse_step < 1:
            raise ValueError(f"decoder_sparse_step={self.decoder_sparse_step} must be >= 1")
        if self.num_experts:
            if not 1 <= self.num_experts_per_tok <= self.num_experts:
                raise ValueError(f"num_experts_per_tok={self.num_experts_per_tok} must be between 1 and "
                                 f"num_experts={self.num_experts}")
            if self.moe_intermediate_size <= 0:
                raise ValueError(f"moe_intermediate_size={self.moe_intermediate_size} must be positive")

    @property
    def group_size(self) -> int:
        """GQA group size G = num_heads / num_kv_heads."""
        return self.num_heads // self.num_kv_heads

    @property
    def moe_layers(self) -> tuple[int, ...]:
        """Indices of the sparse (mixture-of-experts) layers, by transformers' ``Qwen3MoeDecoderLayer`` rule."""
        if not self.num_experts:
            return ()
        return tuple(i for i in range(self.num_layers)
                     if i not in self.mlp_only_layers and (i + 1) % self.decoder_sparse_step == 0)

    @property
    def dense_layers(self) -> tuple[int, ...]:
        """Indices of the layers with a dense SwiGLU MLP (all layers of the dense families)."""
        moe = set(self.moe_layers)
        return tuple(i for i in range(self.num_layers) if i not in moe)

    def kv_bytes_per_token(self, dtype_bytes: int = 2) -> int:
        """Bytes of K+V of one token over all layers (bf16 by default)."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * dtype_bytes

    def num_params(self) -> int:
        """Number of parameters (all experts counted)."""
        return self._count_params(self.num_experts)

    def num_active_params(self) -> int:
        """Parameters used per token: like :meth:`num_params` with only ``num_experts_per_tok`` experts (and the
        router) of each sparse layer; equal to :meth:`num_params` for a dense model."""
        return self._count_params(self.num_experts_per_tok)

    def _count_params(self, experts: int) -> int:
        d, f, L = self.hidden_size, self.intermediate_size, self.num_layers
        attn = d * (self.num_heads + 2 * self.num_kv_heads) * self.head_dim + self.num_heads * self.head_dim * d
        per_layer = attn + 2 * d + (2 * self.head_dim if self.qk_norm else 0)
        n_moe = len(self.moe_layers)
        ffn = (L - n_moe) * 3 * d * f + n_moe * (d * self.num_experts + experts * 3 * d * self.moe_intermediate_size)
        emb = self.vocab_size * d * (1 if self.tie_word_embeddings else 2)
        return L * per_layer + ffn + emb + d

    def replace(self, **kw) -> "ModelConfig":
        return dataclasses.replace(self, **kw)

    # ------------------------------------------------------------------ constructors
    @classmethod
    def from_hf(cls, cfg: Mapping[str, Any] | str | os.PathLike, name: str = "") -> "ModelConfig":
        """Build from a Hugging Face ``config.json`` (a dict, the file, or the checkpoint directory)."""
        if not isinstance(cfg, Mapping):
            path = os.fspath(cfg)
            if os.path.isdir(path):
                path = os.path.join(path, "config.json")
            if not os.path.exists(path):
                raise FileNotFoundError(f"no config.json at {path}")
            with open(path) as f:
                cfg = json.load(f)
            name = name or os.path.basename(os.path.dirname(os.path.abspath(path)))
        mt = cfg.get("model_type", "")
        families = {v: k for k, v in HF_MODEL_TYPES.items()}
        if mt not in families:
            raise ValueError(f"model_type={mt!r} is not supported; kvjax implements "
                             f"{', '.join(repr(m) for m in families)}")
        family = families[mt]
        heads = cfg["num_attention_heads"]
        head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
        # transformers 5 writes theta and scaling inside "rope_parameters"; 4.x at the top level.
        rp = cfg.get("rope_parameters") or {}
        theta = cfg.get("rope_theta", rp.get("rope_theta", 10000.0))
        rs = cfg.get("rope_scaling") or (rp if rp.get("rope_type", "default") != "default" else None)
        scaling = None
        if rs:
            rtype = rs.get("rope_type", rs.get("type"))
            if rtype == "llama3":
                scaling = RopeScaling(float(rs["factor"]), float(rs.get("low_freq_factor", 1.0)),
                                      float(rs.get("high_freq_factor", 4.0)),
                                      int(rs.get("original_max_position_embeddings", 8192)))
            elif rtype not in (None, "default"):
                raise ValueError(f"rope_scaling type {rtype!r} is not supported (only 'llama3')")
        if cfg.get("attention_bias", False):
            raise ValueError(f"attention_bias=True is not supported (model_type={mt!r}): kvjax has no q/k/v/o biases")
        if cfg.get("hidden_act", "silu") != "silu":
            raise ValueError(f"hidden_act={cfg['hidden_act']!r} is not supported; kvjax implements 'silu' (SwiGLU)")
        if cfg.get("use_sliding_window", False):
            raise ValueError(f"use_sliding_window=True is not supported (model_type={mt!r}): kvjax attends to the "
                             f"whole context")
        eos = cfg.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, (list, tuple)) else ((eos,) if eos is not None else ())
        return cls(
            family=family, vocab_size=cfg["vocab_size"], hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"], num_layers=cfg["num_hidden_layers"],
            num_heads=heads, num_kv_heads=cfg.get("num_key_value_heads", heads), head_dim=head_dim,
            rope_theta=float(theta), rope_scaling=scaling,
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            max_position_embeddings=int(cfg.get("max_position_embeddings", 8192)),
            qk_norm=(family in ("qwen3", "qwen3_moe")), bos_token_id=cfg.get("bos_token_id"), eos_token_ids=eos_ids,
            pad_token_id=cfg.get("pad_token_id"), name=name, **(_hf_moe_fields(cfg) if family == "qwen3_moe" else {}))

    @classmethod
    def from_gguf_fields(cls, fields: Mapping[str, Any], has_output_weight: bool, name: str = "") -> "ModelConfig":
        """Build from GGUF metadata (``{key: python value}``); ``has_output_weight`` False means tied embeddings."""
        arch = fields.get("general.architecture")
        if arch not in GGUF_ARCHS:
            raise ValueError(f"GGUF general.architecture={arch!r} is not supported; expected one of "
                             f"{tuple(GGUF_ARCHS)}")
        family = GGUF_ARCHS[arch]
        p = arch + "."
        heads = int(fields[p + "attention.head_count"])
        hidden = int(fields[p + "embedding_length"])
        head_dim = int(fields.get(p + "attention.key_length", hidden // heads))
        scaling = None
        if fields.get(p + "rope.scaling.type") == "llama3" or p + "rope.scaling.factor" in fields:
            scaling = RopeScaling(float(fields.get(p + "rope.scaling.factor", 8.0)),
                                  float(fields.get(p + "rope.scaling.low_freq_factor", 1.0)),
                                  float(fields.get(p + "rope.scaling.high_freq_factor", 4.0)),
                                  int(fields.get(p + "rope.scaling.original_context_length", 8192)))
        vocab = fields.get(p + "vocab_size")
        if vocab is None:
            vocab = len(fields["tokenizer.ggml.tokens"])
        eos = fields.get("tokenizer.ggml.eos_token_id")
        # float32 storage of eps (9.9999997e-06): round to the decimal it stands for.
        eps = float(np.format_float_positional(np.float32(fields.get(p + "attention.layer_norm_rms_epsilon", 1e-5))))
        moe = {}
        if family == "qwen3_moe":
            # llama.cpp's qwen3moe graph: every layer sparse, softmax router, top-k weights always renormalised.
            expert_ff = int(fields[p + "expert_feed_forward_length"])
            moe = dict(num_experts=int(fields[p + "expert_count"]),
                       num_experts_per_tok=int(fields[p + "expert_used_count"]), moe_intermediate_size=expert_ff,
                       norm_topk_prob=bool(fields.get(p + "expert_weights_norm", True)))
            ffn = int(fields.get(p + "feed_forward_length", expert_ff))
        else:
            ffn = int(fields[p + "feed_forward_length"])
        return cls(
            family=family, vocab_size=int(vocab), hidden_size=hidden,
            intermediate_size=ffn, num_layers=int(fields[p + "block_count"]),
            num_heads=heads, num_kv_heads=int(fields.get(p + "attention.head_count_kv", heads)), head_dim=head_dim,
            rope_theta=float(fields.get(p + "rope.freq_base", 10000.0)), rope_scaling=scaling, rms_norm_eps=eps,
            tie_word_embeddings=not has_output_weight,
            max_position_embeddings=int(fields.get(p + "context_length", 8192)),
            qk_norm=(family in ("qwen3", "qwen3_moe")), bos_token_id=fields.get("tokenizer.ggml.bos_token_id"),
            eos_token_ids=(int(eos),) if eos is not None else (),
            pad_token_id=fields.get("tokenizer.ggml.padding_token_id"), name=name or fields.get("general.name", ""),
            **moe)


def _hf_moe_fields(cfg: Mapping[str, Any]) -> dict:
    """Mixture-of-experts fields of a ``qwen3_moe`` config.json, with ``Qwen3MoeConfig``'s defaults.

    The hub files spell the expert count ``num_experts``; transformers 5 writes ``num_local_experts``."""
    counts = {k: int(cfg[k]) for k in ("num_experts", "num_local_experts") if k in cfg}
    if len(set(counts.values())) > 1:
        raise ValueError(f"config.json gives two expert counts: {counts}")
    return dict(num_experts=next(iter(counts.values()), 128),
                num_experts_per_tok=int(cfg.get("num_experts_per_tok", 8)),
                moe_intermediate_size=int(cfg.get("moe_intermediate_size", 768)),
                norm_topk_prob=bool(cfg.get("norm_topk_prob", False)),
                decoder_sparse_step=int(cfg.get("decoder_sparse_step", 1)),
                mlp_only_layers=tuple(cfg.get("mlp_only_layers") or ()))


def rope_inv_freq(cfg: ModelConfig) -> np.ndarray:
    """RoPE inverse frequencies ``[head_dim/2]`` (float64), with Llama-3 scaling applied when configured."""
    d = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (np.arange(0, d, 2, dtype=np.float64) / d))
    s = cfg.rope_scaling
    if s is None:
        return inv
    low_wl = s.original_max_position_embeddings / s.low_freq_factor
    high_wl = s.original_max_position_embeddings / s.high_freq_factor
    wl = 2 * math.pi / inv
    scaled = np.where(wl > low_wl, inv / s.factor, inv)
    smooth = (s.original_max_position_embeddings / wl - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
    mid = (1 - smooth) * scaled / s.factor + smooth * scaled
    is_mid = (wl >= high_wl) & (wl <= low_wl)
    return np.where(is_mid, mid, scaled)


# Real configurations of the paper's models (from their Hugging Face config.json files).
PRESETS: dict[str, ModelConfig] = {
    "llama-3.1-8b-instruct": ModelConfig(
        family="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_layers=32, num_heads=32,
        num_kv_heads=8, head_dim=128, rope_theta=500000.0,
        rope_scaling=RopeScaling(8.0, 1.0, 4.0, 8192), rms_norm_eps=1e-5, tie_word_embeddings=False,
        max_position_embeddings=131072, bos_token_id=128000, eos_token_ids=(128001, 128008, 128009),
        name="meta-llama/Llama-3.1-8B-Instruct"),
    "llama-3.2-3b-instruct": ModelConfig(
        family="llama", vocab_size=128256, hidden_size=3072, intermediate_size=8192, num_layers=28, num_heads=24,
        num_kv_heads=8, head_dim=128, rope_theta=500000.0,
        rope_scaling=RopeScaling(32.0, 1.0, 4.0, 8192), rms_norm_eps=1e-5, tie_word_embeddings=True,
        max_position_embeddings=131072, bos_token_id=128000, eos_token_ids=(128001, 128008, 128009),
        name="meta-llama/Llama-3.2-3B-Instruct"),
    "qwen3-4b-instruct-2507": ModelConfig(
        family="qwen3", vocab_size=151936, hidden_size=2560, intermediate_size=9728, num_layers=36, num_heads=32,
        num_kv_heads=8, head_dim=128, rope_theta=5000000.0, rms_norm_eps=1e-6, tie_word_embeddings=True,
        max_position_embeddings=262144, qk_norm=True, bos_token_id=None, eos_token_ids=(151645,),
        pad_token_id=151643, name="Qwen/Qwen3-4B-Instruct-2507"),
    # config.json of Qwen/Qwen3-30B-A3B-Instruct-2507: 48 layers, 32 query / 4 KV heads of 128, 128 experts of width
    # 768 with 8 routed per token (top-k renormalised), every layer sparse, untied, 262144-token context,
    # rope_theta 1e7. 30.5 B parameters, 3.3 B active.
    "qwen3-30b-a3b-instruct-2507": ModelConfig(
        family="qwen3_moe", vocab_size=151936, hidden_size=2048, intermediate_size=6144, num_layers=48, num_heads=32,
        num_kv_heads=4, head_dim=128, rope_theta=10000000.0, rms_norm_eps=1e-6, tie_word_embeddings=False,
        max_position_embeddings=262144, qk_norm=True, bos_token_id=151643, eos_token_ids=(151645,),
        name="Qwen/Qwen3-30B-A3B-Instruct-2507", num_experts=128, num_experts_per_tok=8, moe_intermediate_size=768,
        norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=()),
    "smollm2-135m": ModelConfig(
        family="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30, num_heads=9,
        num_kv_heads=3, head_dim=64, rope_theta=100000.0, rms_norm_eps=1e-5, tie_word_embeddings=True,
        max_position_embeddings=8192, bos_token_id=1, eos_token_ids=(2,), pad_token_id=2,
        name="HuggingFaceTB/SmolLM2-135M-Instruct"),
}

# Benchmark shapes (no checkpoint exists; ``kvjax bench decode --shape`` builds them with random weights): a small
# Qwen3-MoE in Qwen3-30B-A3B's proportions (GQA 4:1 with 4 KV heads, every layer sparse, k/E = 1/8, renormalised
# top-k) and a dense Qwen3 with the same attention and the same active parameters (its MLP width = k x the expert
# width), to compare MoE and dense decode at equal active compute.
BENCH_SHAPES: dict[str, ModelConfig] = {
    "bench-qwen3-moe-small": ModelConfig(
        family="qwen3_moe", vocab_size=32000, hidden_size=1024, intermediate_size=2048, num_layers=12, num_heads=16,
        num_kv_heads=4, head_dim=64, rope_theta=1e7, rms_norm_eps=1e-6, max_position_embeddings=32768, qk_norm=True,
        num_experts=32, num_experts_per_tok=4, moe_intermediate_size=512, norm_topk_prob=True,
        name="benchmark shape: small Qwen3-MoE (random weights)"),
    "bench-qwen3-dense-small": ModelConfig(
        family="qwen3", vocab_size=32000, hidden_size=1024, intermediate_size=2048, num_layers=12, num_heads=16,
        num_kv_heads=4, head_dim=64, rope_theta=1e7, rms_norm_eps=1e-6, max_position_embeddings=32768, qk_norm=True,
        name="benchmark shape: dense Qwen3 with bench-qwen3-moe-small's active parameters (random weights)"),
}
PRESETS.update(BENCH_SHAPES)
