"""Fast training path for T5 QLoRA: efficient SDPA attention, fused RMSNorm, bf16 GEMMs.

Public API:
    enable_fast_t5(model, compute_dtype=None) -> model
    disable_fast_t5(model) -> model
    is_fast_t5_enabled(model) -> bool
    compile_for_training(model, mode=None, dynamic=False) -> model      (T5 blocks compiled in place)
    cache_dequantized_weights(model, dtype=None) -> int                 (bytes held by the cache)
    uncache_dequantized_weights(model) -> int                           (modules restored)
"""

from sumtune.fast_t5.extras import cache_dequantized_weights, compile_for_training, uncache_dequantized_weights
from sumtune.fast_t5.patch import (disable_fast_t5, enable_fast_t5, find_compute_dtype, fix_quantized_ffn,
                                  is_fast_t5_enabled)

__all__ = [
    "cache_dequantized_weights",
    "compile_for_training",
    "disable_fast_t5",
    "enable_fast_t5",
    "find_compute_dtype",
    "fix_quantized_ffn",
    "is_fast_t5_enabled",
    "uncache_dequantized_weights",
]
