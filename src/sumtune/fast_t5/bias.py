"""Attention biases for the fast T5 path: relative position bias with the padding/causal masks folded in.

All functions are pure. Masks are additive in the compute dtype: 0 where a key is attended and
``torch.finfo(dtype).min`` where it is masked, exactly what stock transformers puts there
(``create_position_bias_mask`` uses ``torch.where(mask, position_bias, finfo.min)``).
"""

from __future__ import annotations

import torch


def relative_position_bias(attention: torch.nn.Module, query_len: int, key_len: int,
                           device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """(1, H, query_len, key_len) bias from a T5Attention that owns ``relative_attention_bias``.

    Computed without autograd when the bias table is frozen (QLoRA: it is), so SDPA sees a
    bias that needs no gradient and can use the memory-efficient kernel.
    """
    needs_grad = attention.relative_attention_bias.weight.requires_grad and torch.is_grad_enabled()
    with torch.set_grad_enabled(needs_grad):
        bias = attention.compute_bias(query_len, key_len, device=device)
    # compute_bias returns a permuted view (last-dim stride = heads). SDPA's memory-efficient kernel needs a
    # bias with unit stride in the last dimension, else it silently falls back to the slow fp32 math kernel
    # (measured on an H200: 96 of 144 attention calls in math, ~45% of the step).
    return bias.to(dtype).contiguous()


def _all_kept(mask: torch.Tensor) -> bool:
    # Only a mask that is not a tensor on a device can be checked without a host sync. A device mask is folded
    # into the bias even when nothing is padded: one sync per stack (4 per step, measured) would stall the GPU
    # and break CUDA-graph capture; the price is a (B, H, L, L) bias where a broadcast one would do.
    return mask.device.type == "cpu" and bool(mask.all())


def encoder_self_bias(position_bias: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """Bias for bidirectional self-attention: (1, H, L, L) without padding, else (B, H, L, L)."""
    if attention_mask is None or _all_kept(attention_mask):
        return position_bias
    keep = attention_mask.to(torch.bool)[:, None, None, :]
    return torch.where(keep, position_bias, torch.finfo(position_bias.dtype).min).contiguous()


def decoder_self_bias(position_bias: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """Bias for causal self-attention: causal mask (and key padding, if any) folded into the bias."""
    query_len, key_len = position_bias.shape[-2:]
    device = position_bias.device
    keep = (torch.arange(query_len, device=device)[:, None] >= torch.arange(key_len, device=device)[None, :])
    keep = keep[None, None]
    if attention_mask is not None and not _all_kept(attention_mask):
        keep = keep & attention_mask.to(torch.bool)[:, None, None, :]
    return torch.where(keep, position_bias, torch.finfo(position_bias.dtype).min).contiguous()


def cross_attention_bias(encoder_attention_mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """(B, 1, 1, S) additive key-padding bias for cross-attention (T5 has no position bias there), or None."""
    if encoder_attention_mask is None or _all_kept(encoder_attention_mask):
        return None
    keep = encoder_attention_mask.to(torch.bool)[:, None, None, :]
    zero = torch.zeros((), dtype=dtype, device=keep.device)
    return torch.where(keep, zero, torch.finfo(dtype).min)


def relative_position_bias_by_offset(attention: torch.nn.Module, query_len: int, key_len: int,
                                     dtype: torch.dtype) -> torch.Tensor:
    """(H, Lq + Lk - 1) float32 table: ``table[h, (j - i) + (Lq - 1)]`` is the bias ``compute_bias`` gives query i
    and key j, without the (H, Lq, Lk) tensor.

    Built with the model's own bucket function and embedding over the offsets, rounded to ``dtype`` like the dense
    bias, without autograd (the Triton route has no gradient for the bias). T5's bucket function sends every
    |j - i| >= relative_attention_max_distance to one bucket per direction (when max_distance > num_buckets // 2,
    true of every released T5), which lets the kernels skip the table for far-apart tiles.
    """
    weight = attention.relative_attention_bias.weight
    offsets = torch.arange(1 - query_len, key_len, dtype=torch.long, device=weight.device)
    buckets = attention._relative_position_bucket(offsets, bidirectional=not attention.is_decoder,
                                                  num_buckets=attention.relative_attention_num_buckets,
                                                  max_distance=attention.relative_attention_max_distance)
    with torch.no_grad():
        values = attention.relative_attention_bias(buckets)  # (Lq + Lk - 1, H)
    return values.to(dtype).float().T.contiguous()
