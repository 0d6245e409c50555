"""Quantizers for offloaded KV and landmarks: HIGGS (Hadamard + EDEN grids), FP8 e4m3, Walsh–Hadamard."""
from kvjax.quant.fp8 import FP8_DTYPE, FP8_MAX, fp8_decode, fp8_encode, fp8_overflow_count
from kvjax.quant.grids import (
    available_grids,
    generate_eden_grid,
    grid_filename,
    load_grid,
    nearest_grid_index_np,
    quantization_mse,
)
from kvjax.quant.hadamard import check_group, hadamard_matrix, hadamard_transform
from kvjax.quant.higgs import (
    HiggsCodes,
    HiggsConfig,
    bits_per_value,
    code_bits,
    higgs_decode,
    higgs_encode,
    higgs_qdq,
    index_bits,
    nearest_grid_index,
    pack_indices,
    packed_nbytes,
    unpack_indices,
)

__all__ = [
    "FP8_DTYPE",
    "FP8_MAX",
    "HiggsCodes",
    "HiggsConfig",
    "available_grids",
    "bits_per_value",
    "check_group",
    "code_bits",
    "fp8_decode",
    "fp8_encode",
    "fp8_overflow_count",
    "generate_eden_grid",
    "grid_filename",
    "hadamard_matrix",
    "hadamard_transform",
    "higgs_decode",
    "higgs_encode",
    "higgs_qdq",
    "index_bits",
    "load_grid",
    "nearest_grid_index",
    "nearest_grid_index_np",
    "pack_indices",
    "packed_nbytes",
    "quantization_mse",
    "unpack_indices",
]
