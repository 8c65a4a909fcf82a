"""Fast training path for T5 QLoRA: Triton (or SDPA) attention, fused RMSNorm, bf16 GEMMs.

Public API:
    enable_fast_t5(model, compute_dtype=None, attention_backend="auto") -> model   (auto | triton | sdpa)
    disable_fast_t5(model) -> model
    is_fast_t5_enabled(model) -> bool
    compile_for_training(model, mode=None, dynamic=False) -> model      (T5 blocks compiled in place)
    cache_dequantized_weights(model, dtype=None) -> int                 (bytes held by the cache)
    dequantized_weight_bytes(model, dtype=None) -> int                  (bytes that cache would hold)
    uncache_dequantized_weights(model) -> int                           (modules restored)
    fuse_lora_4bit(model, concat_gemms=False) -> int / unfuse_lora_4bit(model) -> int   (one autograd node per
                                                                         LoRA-on-NF4 layer)
    ATTENTION_BACKENDS, choose_attention_backend(...)                    (which attention kernel runs, and why)

The Triton kernels themselves: sumtune.fast_t5.flash_attention.flash_t5_attention.
"""

from sumtune.fast_t5.attention import ATTENTION_BACKENDS
from sumtune.fast_t5.attention import choose_backend as choose_attention_backend
from sumtune.fast_t5.extras import (cache_dequantized_weights, compile_for_training, dequantized_weight_bytes,
                                   uncache_dequantized_weights)
from sumtune.fast_t5.lora4bit import fuse_lora_4bit, unfuse_lora_4bit
from sumtune.fast_t5.patch import (disable_fast_t5, enable_fast_t5, find_compute_dtype, fix_quantized_ffn,
                                  is_fast_t5_enabled)

__all__ = [
    "ATTENTION_BACKENDS",
    "cache_dequantized_weights",
    "choose_attention_backend",
    "compile_for_training",
    "dequantized_weight_bytes",
    "disable_fast_t5",
    "enable_fast_t5",
    "find_compute_dtype",
    "fix_quantized_ffn",
    "fuse_lora_4bit",
    "is_fast_t5_enabled",
    "uncache_dequantized_weights",
    "unfuse_lora_4bit",
]
