"""Which kernel runs T5 attention on the fast path, and what each needs from the stack (first-match dispatch).

``sdpa``: torch's scaled_dot_product_attention with the relative position bias materialised (B|1, H, L, L) and the
masks folded in (sumtune.fast_t5.bias). ``triton``: sumtune's kernels (sumtune.fast_t5.flash_attention), which take
an (H, Lq + Lk - 1) bias-by-offset table and per-row key padding instead, compute bias, masks and dropout inside,
and never build an L x L tensor. ``auto`` picks ``triton`` when :func:`triton_blocker` finds no reason against it,
else ``sdpa``.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass

import torch

from sumtune.fast_t5 import bias as bias_lib

ATTENTION_BACKENDS = ("auto", "triton", "sdpa")
BACKEND_ATTR = "_sumtune_attention_backend"


@dataclass(frozen=True)
class FlashInputs:
    """What the Triton route hands each attention layer in place of a dense bias (built once per stack)."""

    table_log2: torch.Tensor | None  # flash_attention.bias_table_log2 of the bias by offset j - i; None: no bias
    bias_radius: int  # offsets beyond +-bias_radius share the bias at +-bias_radius (T5's max_distance); 0: none
    padding: object | None  # flash_attention.KeyPadding, or None when every key is attended
    causal: bool


def _interpreter_active() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def triton_blocker(device: torch.device, dtype: torch.dtype, head_dim: int,
                   bias_attention: torch.nn.Module | None, allow_interpreter: bool = False) -> str | None:
    """The first reason the Triton kernels cannot run this attention, or None when they can."""
    from sumtune.fast_t5.flash_attention import SUPPORTED_DTYPES, SUPPORTED_HEAD_DIMS

    if device.type != "cuda" and not (allow_interpreter and _interpreter_active()):
        return f"it needs a CUDA device, not {device.type}"
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed"
    if dtype not in SUPPORTED_DTYPES:
        return f"it computes in bfloat16 or float16, not {dtype}"
    if head_dim not in SUPPORTED_HEAD_DIMS:
        return f"head_dim {head_dim} is not one of {SUPPORTED_HEAD_DIMS}"
    if bias_attention is not None:
        if bias_attention.relative_attention_bias.weight.requires_grad and torch.is_grad_enabled():
            return "the relative position bias is trainable and the kernels give it no gradient"
        if bias_attention.relative_attention_max_distance <= bias_attention.relative_attention_num_buckets // 2:
            return "relative_attention_max_distance is below num_buckets / 2, so far offsets do not share a bucket"
    return None


def check_backend_name(name: str) -> None:
    if name not in ATTENTION_BACKENDS:
        from sumtune.errors import SumtuneError

        raise SumtuneError(f"attention_backend must be one of {', '.join(ATTENTION_BACKENDS)}, not {name!r}.")


def choose_backend(requested: str, device: torch.device, dtype: torch.dtype, head_dim: int,
                   bias_attention: torch.nn.Module | None) -> str:
    """``sdpa`` or ``triton`` for ``requested`` (one of ATTENTION_BACKENDS); a forced ``triton`` that cannot run
    is an error, ``auto`` falls back to ``sdpa``. Triton's CPU interpreter counts only when ``triton`` is forced."""
    check_backend_name(requested)
    if requested == "sdpa":
        return "sdpa"
    reason = triton_blocker(device, dtype, head_dim, bias_attention, allow_interpreter=requested == "triton")
    if reason is None:
        return "triton"
    if requested == "triton":
        from sumtune.errors import SumtuneError

        raise SumtuneError(f"attention_backend 'triton' cannot run here: {reason}.")
    return "sdpa"


def self_attention_inputs(attention: torch.nn.Module, seq_len: int, attention_mask: torch.Tensor | None,
                          dtype: torch.dtype, causal: bool) -> FlashInputs:
    """Bias table from the stack's first layer (shared by all its layers) and key padding, no device sync."""
    from sumtune.fast_t5 import flash_attention

    table = bias_lib.relative_position_bias_by_offset(attention, seq_len, seq_len, dtype)
    padding = flash_attention.key_padding(attention_mask) if attention_mask is not None else None
    return FlashInputs(flash_attention.bias_table_log2(table), attention.relative_attention_max_distance, padding,
                       causal)


def cross_attention_inputs(encoder_attention_mask: torch.Tensor | None) -> FlashInputs:
    """No position bias in T5's cross-attention: key padding only."""
    from sumtune.fast_t5 import flash_attention

    padding = flash_attention.key_padding(encoder_attention_mask) if encoder_attention_mask is not None else None
    return FlashInputs(None, 0, padding, False)


def flash_attend(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, inputs: FlashInputs,
                 dropout_p: float) -> torch.Tensor:
    """(B, H, Lq, D) attention output from the Triton kernels; T5 does not scale q.k (scale 1)."""
    from sumtune.fast_t5 import flash_attention

    return flash_attention.t5_flash_attention(query, key, value, inputs.table_log2, inputs.bias_radius,
                                              inputs.padding, inputs.causal, 1.0, dropout_p)
