"""Inputs of sumtune's Triton T5 attention (``flash_attention``, which re-exports these): the key padding a stack
computes once, and the dropout seeds and thresholds its kernels (and ``ffn_dropout``'s) read on the device."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor


class KeyPadding(NamedTuple):
    """Per-row key mask as int8 (B, Lk), key lengths as int32 (B,): last kept key + 1, bounding the loops, and
    ``holes`` as int8 (B,): 1 where a key before that length is masked (else the row needs only its length)."""

    mask: Tensor
    lengths: Tensor
    holes: Tensor


def key_padding(key_mask: Tensor) -> KeyPadding:
    """From a (B, Lk) attention mask (bool or 0/1 ints); device-side only, no sync."""
    keep = key_mask.to(torch.bool)
    positions = torch.arange(1, keep.shape[-1] + 1, device=keep.device, dtype=torch.int32)
    lengths = torch.where(keep, positions, 0).amax(dim=-1).to(torch.int32)
    holes = (~keep & (positions <= lengths[:, None])).any(dim=-1)
    return KeyPadding(keep.to(torch.int8).contiguous(), lengths.contiguous(), holes.to(torch.int8))


def dropout_threshold(dropout_p: float, draw_range: int) -> tuple[int, float]:
    """(drop_below, scale): an element is dropped when its draw (uniform in [0, draw_range)) is below ``drop_below``.

    The drop probability is ``dropout_p`` rounded to a multiple of 1 / draw_range (the attention kernels' draws are
    ``DROPOUT_DRAW_BITS`` wide: 0.1 -> 0.100006 at 16 bits); kept values are scaled by the inverse of the exact keep
    probability, so the output's expectation is unchanged (torch's 1 / (1 - p)). sumtune.fast_t5.ffn_dropout uses it
    with 31-bit draws."""
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    drop_below = min(int(round(dropout_p * draw_range)), draw_range - 1)
    return drop_below, draw_range / (draw_range - drop_below)


def draw_seed(device: torch.device | str) -> Tensor:
    """The dropout seed of one forward: a (1,) int64 tensor on ``device``, drawn by that device's generator."""
    return torch.randint(0, 2**31 - 1, (1,), dtype=torch.int64, device=device)


def dropout_seed(like: Tensor, dropout_p: float) -> Tensor:
    """A kernel call's seed: :func:`draw_seed` on ``like``'s device with dropout, else an unread placeholder (no
    draw, so the RNG state moves only when there is dropout)."""
    return draw_seed(like.device) if dropout_p > 0 else like.new_empty((1,), dtype=torch.int64)
