"""Optimizer and learning-rate schedule for the adapter weights."""

from __future__ import annotations

import math
from typing import Iterable

import torch

from sumtune.errors import SumtuneError


def get_lr(step: int, *, peak_lr: float, warmup_steps: int, total_steps: int, schedule: str) -> float:
    """Learning rate for optimizer step `step` (0-based): linear warm-up, then linear/cosine decay to 0, or flat."""
    if warmup_steps and step < warmup_steps:
        return peak_lr * (step + 1) / warmup_steps
    if schedule == "constant":
        return peak_lr
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    if schedule == "cosine":
        return peak_lr * 0.5 * (1.0 + math.cos(math.pi * progress))
    return peak_lr * (1.0 - progress)


def build_optimizer(name: str, params: Iterable[torch.nn.Parameter], *, lr: float, weight_decay: float,
                    device: torch.device) -> torch.optim.Optimizer:
    params = list(params)
    if not params:
        raise SumtuneError("There is nothing to train: no parameter requires a gradient.")
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=device.type == "cuda")
    import bitsandbytes as bnb

    if name == "paged_adamw_8bit":
        if device.type != "cuda":  # paging moves optimizer state between GPU and host: CPU memory is already host
            return bnb.optim.AdamW8bit(params, lr=lr, weight_decay=weight_decay)
        return bnb.optim.PagedAdamW8bit(params, lr=lr, weight_decay=weight_decay)
    if name == "adamw_8bit":
        return bnb.optim.AdamW8bit(params, lr=lr, weight_decay=weight_decay)
    raise SumtuneError(f"Unknown optimizer {name!r}.")


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
