"""The far-left part of T5 attention through a fused causal kernel without bias (cuDNN's on a GPU).

T5's relative position bias is one constant per head for every key at least ``R`` (max_distance, 128) positions
before its query. Over those keys (j <= i - R) attention is plain softmax(q.k) attention, a constant added to its
log-sum-exp: queries R.. against keys ..L-R with a causal mask, which cuDNN runs at the speed of attention without
bias. sumtune's forward kernel (``flash_kernels.t5_flash_attention_fwd`` with ``FAR_GIVEN``) then runs only the near
and far-right tiles and folds this part in as one more online-softmax step from its output and log-sum-exp.

Only where no gradient follows (generation's encoder, evaluation's loss): this module has no backward. Only for rows
whose key mask is right padding (a row with holes takes the kernel's own far-left loop). A padded query's output
takes in the padding keys that lie that far before it (no real query's does): the padded positions' encoder states,
which the decoder never attends to, differ from stock transformers'. The part reaches the kernel rounded to the
inputs' dtype, so the output is a little further from float32 than the one kernel's (see FAR_SPLIT_WITHOUT_GRAD).

Public:
    FAR_SPLIT_WITHOUT_GRAD, FAR_SPLIT_MIN_KEYS   (settings; benchmark tokens `nofarsplit`, `farsplitall`)
    applies(...) -> bool
    far_left(q, k, v, radius, scale) -> (out (B, H, L - R, D), lse (B, H, L - R) float32, natural log) or None
"""

from __future__ import annotations

import torch
from torch import Tensor

# Measured on an H200 (2026-12-04, T5-3b's 32 heads x 128, 16 rows x 4096 tokens, under no_grad): the encoder's
# attention forward 10.68 against 12.42 ms (cuDNN without bias 7.00), its output's error against float32 at the real
# queries 1.79e-3 against 1.60e-3 (SDPA with the bias 1.60e-3; results/attention_kernels-2026-12-04-h200-farsplit-
# s31.json); the encoder of 256 full-length inputs 8.27 against 8.71 s (generate_profile-2026-12-04-h200-farsplit-
# s31.json); whole generation 10.52 against 10.38 summaries/s, tokens equal to transformers' (8 inputs, 512 forced
# tokens; generate_throughput-2026-12-04-h200-full-farsplit.json). Token `nofarsplit`: off.
# At 1024 keys (64 rows) it is slower, 4.04 against 3.70 ms (attention_kernels-2026-12-04-h200-farright-s31.json):
# hence FAR_SPLIT_MIN_KEYS. The far-right keys (j >= i + R) the same way, over copies of q, k and v with each row's
# tokens reversed, measured slower: 13.64 ms at 4096 (the copies), whole generation 10.11 against 10.52 (same file,
# generate_throughput-2026-12-04-h200-full-farright.json); commit 10b629b has it (FAR_RIGHT_TOO).
FAR_SPLIT_WITHOUT_GRAD = True
FAR_SPLIT_MIN_KEYS = 2048  # shorter sequences keep the one kernel (token `farsplitall`: every length)
MIN_CAPABILITY = (9, 0)  # measured on Hopper only; elsewhere the one kernel


def applies(query_len: int, key_len: int, radius: int, has_bias: bool, causal: bool, dropout_p: float,
            gradient: bool, precise_pv: bool, device: torch.device) -> bool:
    """Whether a forward takes its far-left part from :func:`far_left`."""
    if not (FAR_SPLIT_WITHOUT_GRAD and not gradient and not precise_pv and has_bias and not causal
            and dropout_p == 0.0 and query_len == key_len >= FAR_SPLIT_MIN_KEYS and 0 < radius < query_len):
        return False
    return device.type != "cuda" or (torch.backends.cuda.cudnn_sdp_enabled()
                                     and torch.cuda.get_device_capability(device) >= MIN_CAPABILITY)


def far_left(q: Tensor, k: Tensor, v: Tensor, radius: int, scale: float) -> tuple[Tensor, Tensor] | None:
    """softmax(q_i . k_j * scale over j <= i - radius) . v for the queries i >= radius of (B, H, L, D) inputs, with
    its log-sum-exp (natural log, float32, (B, H, L - radius) contiguous): a causal kernel on shifted slices. None
    where cuDNN refuses the inputs (the one kernel then runs as before)."""
    length = q.shape[2]
    try:
        out, lse = _causal_attention(q[:, :, radius:], k[:, :, :length - radius], v[:, :, :length - radius], scale)
    except torch.OutOfMemoryError:
        raise
    except RuntimeError:  # e.g. a cuDNN build without these shapes: not worth failing a forward over
        return None
    return out, lse.reshape(q.shape[0], q.shape[1], length - radius).float().contiguous()


def _causal_attention(q: Tensor, k: Tensor, v: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    """(output, log-sum-exp) of causal attention without bias: cuDNN's kernel on a GPU; on the CPU (tests, with the
    kernels in Triton's interpreter) the same maths in torch's CPU flash kernel."""
    if q.device.type == "cuda":
        return torch.ops.aten._scaled_dot_product_cudnn_attention(q, k, v, None, True, 0.0, True, False,
                                                                   scale=scale)[:2]
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, True, scale=scale)
