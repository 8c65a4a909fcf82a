"""The far parts of T5 attention through a fused causal kernel without bias (cuDNN's on a GPU).

T5's relative position bias is one constant per head for every key at least ``R`` (max_distance, 128) positions
before its query, and another for every key ``R`` or more after it. Over the keys j <= i - R attention is plain
softmax(q.k) attention, a constant added to its log-sum-exp: queries R.. against keys ..L-R with a causal mask,
which cuDNN runs at the speed of attention without bias. The keys j >= i + R are the same over each row's tokens in
reverse order (padding left in place). sumtune's forward kernel (``flash_kernels.t5_flash_attention_fwd`` with
``FAR_GIVEN``) then runs only the near tiles (and the far-right ones, with the left part alone) and folds these
parts in as more online-softmax steps from their outputs and log-sum-exps.

Only where no gradient follows (generation's encoder, evaluation's loss): this module has no backward. Only for rows
whose key mask is right padding (a row with holes takes the kernel's own far loops). A padded query's output takes
in keys that its one-kernel output would not: the padded positions' encoder states, which the decoder never attends
to, differ from stock transformers'. Each far part reaches the kernel rounded to the inputs' dtype, so the output
is a little further from float32 than the one kernel's (measured in benchmarks/results, see FAR_SPLIT_WITHOUT_GRAD).

Public:
    FAR_SPLIT_WITHOUT_GRAD, FAR_RIGHT_TOO, FAR_SPLIT_MIN_KEYS   (settings; benchmark tokens below)
    mode(...) -> 0 | 1 | 2                       (none, far-left, far-left and far-right)
    far_parts(q, k, v, radius, scale, lengths, mode) -> tuple of (out (B, H, L - R, D), lse (B, H, L - R)) or None
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
FAR_SPLIT_WITHOUT_GRAD = True
FAR_RIGHT_TOO = False  # the far-right part as well, over reversed copies of q, k and v (token `farright`)
FAR_SPLIT_MIN_KEYS = 2048  # shorter sequences keep the one kernel (token `farsplitall`: every length)
MIN_CAPABILITY = (9, 0)  # measured on Hopper only; elsewhere the one kernel


def mode(query_len: int, key_len: int, radius: int, has_bias: bool, causal: bool, dropout_p: float,
         gradient: bool, precise_pv: bool, device: torch.device) -> int:
    """0: the one kernel; 1: the far-left part from :func:`far_parts`; 2: the far-right part too."""
    if not (FAR_SPLIT_WITHOUT_GRAD and not gradient and not precise_pv and has_bias and not causal
            and dropout_p == 0.0 and query_len == key_len >= FAR_SPLIT_MIN_KEYS and 0 < radius < query_len):
        return 0
    if device.type == "cuda" and not (torch.backends.cuda.cudnn_sdp_enabled()
                                      and torch.cuda.get_device_capability(device) >= MIN_CAPABILITY):
        return 0
    return 2 if FAR_RIGHT_TOO else 1


def far_parts(q: Tensor, k: Tensor, v: Tensor, radius: int, scale: float, lengths: Tensor | None,
              split: int) -> tuple[tuple[Tensor, Tensor], ...] | None:
    """The far-left part (and with ``split`` 2 the far-right one) of (B, H, L, D) inputs; ``lengths`` (B,) each
    row's key length (None: all L). None where cuDNN refuses the inputs (the one kernel then runs as before)."""
    try:
        parts = [_causal_part(q, k, v, radius, scale)]
        if split == 2:
            flip = _row_reversal(q.shape[0], q.shape[2], lengths, q.device)
            parts.append(_causal_part(flip(q), flip(k), flip(v), radius, scale))
    except torch.OutOfMemoryError:
        raise
    except RuntimeError:  # e.g. a cuDNN build without these shapes: not worth failing a forward over
        return None
    if any(part[0].stride() != parts[0][0].stride() for part in parts):
        parts = [(out.contiguous(), lse) for out, lse in parts]
    return tuple(parts)


def _causal_part(q: Tensor, k: Tensor, v: Tensor, radius: int, scale: float) -> tuple[Tensor, Tensor]:
    """softmax(q_i . k_j * scale over j <= i - radius) . v for the queries i >= radius, with its log-sum-exp
    (natural log, float32, (B, H, L - radius) contiguous): a causal kernel on shifted slices."""
    length = q.shape[2]
    q_far, k_far, v_far = q[:, :, radius:], k[:, :, :length - radius], v[:, :, :length - radius]
    if q.device.type == "cuda":
        out, lse = torch.ops.aten._scaled_dot_product_cudnn_attention(
            q_far, k_far, v_far, None, True, 0.0, True, False, scale=scale)[:2]
    else:  # CPU (tests, with the kernels in Triton's interpreter): the same maths in torch's CPU flash kernel
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q_far, k_far, v_far, 0.0, True, scale=scale)
    return out, lse.reshape(q.shape[0], q.shape[1], length - radius).float().contiguous()


def _row_reversal(batch: int, length: int, lengths: Tensor | None, device: torch.device):
    """A function taking (B, H, L, D) to the same with each row's first lengths[b] tokens in reverse order (padding
    left in place), as a (B, H, L, D) view of a new (B, L, H, D) tensor."""
    positions = torch.arange(length, device=device)
    if lengths is None:
        order = (length - 1 - positions).expand(batch, length)
    else:
        last = lengths.to(device=device, dtype=torch.long)[:, None] - 1
        order = torch.where(positions[None, :] <= last, last - positions[None, :], positions[None, :])
    rows = torch.arange(batch, device=device)[:, None]
    return lambda x: x.transpose(1, 2)[rows, order].transpose(1, 2)
