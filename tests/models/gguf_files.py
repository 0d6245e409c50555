"""Test helper: write kvjax models as GGUF files the way llama.cpp's converter lays them out (metadata keys and
tensor names of gguf-py; HF ``[out, in]`` matrices; tensors quantized with the ``gguf`` package)."""
import gguf
import numpy as np


def open_writer(path, arch: str, cfg) -> gguf.GGUFWriter:
    """A GGUFWriter for ``arch`` with the model-shape metadata every architecture shares."""
    w = gguf.GGUFWriter(path, arch)
    w.add_block_count(cfg.num_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_heads)
    w.add_head_count_kv(cfg.num_kv_heads)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    return w


def add_tensor(w: gguf.GGUFWriter, name: str, arr, qtype=None) -> None:
    """Add a float32 array; matrices quantized to ``qtype`` (None or F32: kept float32; F16 as float16)."""
    arr = np.ascontiguousarray(arr, np.float32)
    if qtype is None or arr.ndim == 1 or qtype == gguf.GGMLQuantizationType.F32:
        w.add_tensor(name, arr)
    elif qtype == gguf.GGMLQuantizationType.F16:
        w.add_tensor(name, arr.astype(np.float16))
    else:
        w.add_tensor(name, gguf.quants.quantize(arr, qtype), raw_dtype=qtype)


def finish(w: gguf.GGUFWriter) -> None:
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
