"""T5 attention in plain PyTorch, the yardstick for sumtune's Triton kernels (tests and benchmarks): the same maths
as ``flash_attention.flash_t5_attention`` at any dtype, with the L x L scores materialised. Re-exported there."""

from __future__ import annotations

import math

import torch
from torch import Tensor


def reference_t5_attention(query: Tensor, key: Tensor, value: Tensor, bias_table: Tensor | None = None,
                           key_mask: Tensor | None = None, causal: bool = False, scale: float = 1.0,
                           keep_mask: Tensor | None = None, keep_scale: float = 1.0,
                           dtype: torch.dtype = torch.float64) -> Tensor:
    """The same math in plain PyTorch at ``dtype`` (materialises the L x L scores): the yardstick for the kernels.

    ``keep_mask`` (B, H, Lq, Lk) applies dropout exactly as given, scaled by ``keep_scale``. Rows with no key to
    attend to give zeros, as the kernels do."""
    q, k, v = (t.to(dtype) for t in (query, key, value))
    scores = q @ k.transpose(-1, -2) * scale
    query_len, key_len = scores.shape[-2:]
    if bias_table is not None:
        offsets = torch.arange(key_len, device=q.device)[None, :] - torch.arange(query_len, device=q.device)[:, None]
        scores = scores + bias_table.to(dtype)[:, offsets + query_len - 1][None]
    keep = torch.ones(scores.shape[-2:], dtype=torch.bool, device=q.device)[None, None]
    if causal:
        keep = keep & torch.ones(query_len, key_len, dtype=torch.bool, device=q.device).tril()[None, None]
    if key_mask is not None:
        keep = keep & key_mask.to(torch.bool)[:, None, None, :]
    scores = scores.masked_fill(~keep, -math.inf)
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # an all-masked row: 0, not NaN
    if keep_mask is not None:
        probs = probs * keep_mask.to(dtype) * keep_scale
    return probs @ v
