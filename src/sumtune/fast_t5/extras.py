"""Optional speed knobs on top of the fast path: torch.compile of T5 blocks and a dequantized-weight cache."""

from __future__ import annotations

import math
from types import MethodType

import torch
import torch.nn.functional as F

_CACHE_ATTR = "_sumtune_dequantized_weight"
# The fused LoRA node's [W | B] or [W ; A] buffer (sumtune.fast_t5.lora4bit._joined_weight), of which the cache is
# then a view: dropped with the cache.
_JOINED_ATTR = "_sumtune_lora_joined_weight"
_JOINED_LAYOUT_ATTR = "_sumtune_joined_layout"  # (zero columns before, rank, zero columns after) of that buffer


def compile_for_training(model: torch.nn.Module, mode: str | None = None, dynamic: bool = False) -> torch.nn.Module:
    """torch.compile every T5Block in place (``nn.Module.compile``); returns ``model`` for chaining.

    Blocks, not the whole model: the stack loop, masks and loss stay eager, which keeps graph
    breaks (bnb custom ops, PEFT) local. Shapes are static (padded batches) so ``dynamic=False``.
    Call after :func:`sumtune.fast_t5.enable_fast_t5` and after gradient checkpointing is set.
    """
    from transformers.models.t5.modeling_t5 import T5Block

    blocks = [m for m in model.modules() if isinstance(m, T5Block)]
    if not blocks:
        from sumtune.errors import SumtuneError

        raise SumtuneError("compile needs a T5 model, but no T5Block was found in it.")
    for block in blocks:
        block.compile(mode=mode, dynamic=dynamic)
    return model


def _linear4bit_class():
    import bitsandbytes as bnb

    return bnb.nn.Linear4bit


def dequantize_4bit_weight(module: torch.nn.Module, dtype: torch.dtype) -> torch.Tensor:
    """Dense `dtype` copy of a bitsandbytes Linear4bit's weight (its own dequantization, then a cast)."""
    import bitsandbytes.functional as bnbf

    weight = module.weight
    state = weight.quant_state
    if getattr(state, "packing_format_for_cpu", False):
        return _dequantize_cpu_packed(weight.data, state).to(dtype)
    return bnbf.dequantize_4bit(weight.data, state).to(dtype)


def _dequantize_cpu_packed(packed: torch.Tensor, state) -> torch.Tensor:
    """Dequantize a weight bitsandbytes has repacked for its AVX512-BF16 CPU kernel.

    On such CPUs bnb's first eval-mode forward rewrites the weight in place into a blocked
    [N, K/2] layout with bf16 absmax [K/blocksize, N] (`_convert_weight_packed_for_cpu`);
    `dequantize_4bit` then reads garbage. bnb's own inverse mutates the layer and re-quantizes
    the absmax, so this reads the packed layout directly (same nibble order as that inverse).
    """
    block_n, half = 32, 32
    rows, half_cols = packed.shape
    nibbles = packed.reshape(-1, half)
    codes = torch.cat([nibbles & 0xF, (nibbles >> 4) & 0xF], dim=-1)  # [.., 64]: 32 low, then 32 high
    codes = codes.reshape(rows // block_n, half_cols, block_n, 2).transpose(1, 2).reshape(rows, 2 * half_cols)
    values = state.code.to(torch.float32)[codes.long()]  # [N, K]
    absmax = state.absmax.to(torch.float32).T.repeat_interleave(state.blocksize, dim=1)  # [N, K]
    return (values * absmax).reshape(state.shape)


def _cached_linear4bit_forward(self, x: torch.Tensor) -> torch.Tensor:
    # Same math as bnb's Linear4bit for batched inputs (dequantize, then one GEMM in the compute
    # dtype), minus the per-call dequantization in forward and again in backward.
    weight = getattr(self, _CACHE_ATTR)
    bias = None if self.bias is None else self.bias.to(weight.dtype)
    return F.linear(x.to(weight.dtype), weight, bias).to(x.dtype)


def _cacheable(model: torch.nn.Module):
    linear4bit = _linear4bit_class()
    return [m for m in model.modules() if isinstance(m, linear4bit) and not m.weight.requires_grad]


def dequantized_weight_bytes(model: torch.nn.Module, dtype: torch.dtype | None = None) -> int:
    """Bytes :func:`cache_dequantized_weights` would hold for ``model`` (0 when it has no frozen 4-bit weights)."""
    total = 0
    for module in _cacheable(model):
        state = getattr(module.weight, "quant_state", None)
        if state is None:  # not quantized yet (a Linear4bit still on the CPU before .to(device))
            continue
        itemsize = (dtype or module.compute_dtype or torch.bfloat16).itemsize
        total += math.prod(state.shape) * itemsize
    return total


def cache_dequantized_weights(model: torch.nn.Module, dtype: torch.dtype | None = None) -> int:
    """Keep a dequantized copy of every frozen bnb Linear4bit weight; returns the bytes it holds.

    Off by default: it trades 2 bytes/param of GPU memory (about 5.7 GB for T5-3b) for skipping
    the dequantization that bnb does on every forward and backward. The copy is a non-persistent
    buffer, so checkpoints and adapters are unaffected. Undo with :func:`uncache_dequantized_weights`.
    """
    cached_bytes = 0
    for module in _cacheable(model):
        target_dtype = dtype or module.compute_dtype or torch.bfloat16
        with torch.no_grad():
            weight = dequantize_4bit_weight(module, target_dtype)
        module.register_buffer(_CACHE_ATTR, weight, persistent=False)
        module.forward = MethodType(_cached_linear4bit_forward, module)
        cached_bytes += weight.numel() * weight.element_size()
    return cached_bytes


def uncache_dequantized_weights(model: torch.nn.Module) -> int:
    """Drop the cache made by :func:`cache_dequantized_weights`; returns how many modules were restored."""
    restored = 0
    for module in model.modules():
        if hasattr(module, _CACHE_ATTR):
            delattr(module, _CACHE_ATTR)
            for attr in (_JOINED_ATTR, _JOINED_LAYOUT_ATTR):
                if hasattr(module, attr):
                    delattr(module, attr)
            del module.forward
            restored += 1
    return restored
