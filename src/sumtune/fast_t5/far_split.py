"""The far-left part of T5 attention through a fused causal kernel without bias (cuDNN's on a GPU).

T5's relative position bias is one constant per head for every key at least ``R`` (max_distance, 128) positions
before its query. So over those keys (j <= i - R) attention is plain softmax(q.k) attention, a constant added to its
log-sum-exp: queries R.. against keys ..L-R with a causal mask, which cuDNN runs at the speed of attention without
bias. sumtune's forward kernel (``flash_kernels.t5_flash_attention_fwd`` with ``FAR_GIVEN``) then runs only the near
and far-right tiles and folds this part in as one more online-softmax step from its output and log-sum-exp.

Only where no gradient follows (generation's encoder, evaluation's loss): this module has no backward. Only for rows
whose key mask is right padding (a row with holes takes the kernel's own far-left loop). A padded query's output
takes in the padding keys that lie that far before it (no real query's does): the padded positions' encoder states,
which the decoder never attends to, differ from stock transformers'.

Public:
    FAR_SPLIT_WITHOUT_GRAD = bool   (on/off; benchmark token ``farsplit``)
    FAR_SPLIT_MIN_KEYS = int        (shorter sequences keep the one kernel)
    applies(...) -> bool
    far_left_attention(q, k, v, radius, scale) -> (out (B, H, L - R, D), lse (B, H, L - R) float32, natural log)
"""

from __future__ import annotations

import torch
from torch import Tensor

FAR_SPLIT_WITHOUT_GRAD = False
FAR_SPLIT_MIN_KEYS = 2048


def applies(query_len: int, key_len: int, radius: int, has_bias: bool, causal: bool, dropout_p: float,
            gradient: bool, precise_pv: bool) -> bool:
    """Whether a forward takes its far-left part from :func:`far_left_attention`."""
    return (FAR_SPLIT_WITHOUT_GRAD and not gradient and not precise_pv and has_bias and not causal
            and dropout_p == 0.0 and query_len == key_len >= FAR_SPLIT_MIN_KEYS and 0 < radius < query_len)


def far_left_attention(q: Tensor, k: Tensor, v: Tensor, radius: int, scale: float) -> tuple[Tensor, Tensor]:
    """softmax(q_i . k_j * scale over j <= i - radius) . v for the queries i >= radius, with its log-sum-exp.

    (B, H, L, D) inputs; a causal kernel on the shifted slices (query i - radius meets keys 0..i - radius)."""
    length = q.shape[2]
    q_far, k_far, v_far = q[:, :, radius:], k[:, :, :length - radius], v[:, :, :length - radius]
    if q.device.type == "cuda":
        out, lse = torch.ops.aten._scaled_dot_product_cudnn_attention(
            q_far, k_far, v_far, None, True, 0.0, True, False, scale=scale)[:2]
    else:  # CPU (tests, with the kernels in Triton's interpreter): the same maths in torch's CPU flash kernel
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q_far, k_far, v_far, 0.0, True, scale=scale)
    return out, lse.reshape(q.shape[0], q.shape[1], length - radius).float().contiguous()
