"""FLOPs of a T5 training step, counted from the model's shapes, and MFU against the GPU's peak.

Counted (a multiply-add is 2 FLOPs; only matrix products: norms, softmax, the position-bias add and dropout are
left out, as in the PaLM paper's MFU), for a frozen base with LoRA adapters:
- linear layers: 2·in·out per token they see (encoder layers see source tokens; decoder layers and the output
  head see target tokens; cross-attention k/v see source tokens). Training costs 2× their forward: the backward
  computes input gradients (the same work again) but no weight gradients, as the base is frozen.
- attention products, QKᵀ (scores) and PV (values): 2·Lq·Lk·inner each per layer, inner = heads × d_kv, in
  encoder self-attention, decoder self-attention and cross-attention. Training costs 3× their forward: the
  backward computes the gradients of both operands of each product (dQ, dK from the scores, dP, dV from the
  values). Causal decoder self-attention counts the pairs it needs, Lt·(Lt+1)/2 (each target token and the ones
  before it), not the Lt² a dense kernel computes with a masking bias: masked work is not useful work.
  Fused kernels (cuDNN, FlashAttention) also recompute the scores in their backward; that is repeated work and
  not counted, like activation checkpointing below.
- LoRA: the adapters' forward, counted roughly (as if every adapter saw half of the tokens), 3× for training
  (forward, input gradient, weight gradient).
- gradient checkpointing recomputes the forward once more: counted only when asked (`recompute`), since MFU
  excludes repeated work by definition.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass

import torch

# Dense bf16 tensor-core peaks from vendor datasheets (TFLOP/s), matched by substring of the device name.
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0, "L4": 121.0,
                    "4090": 165.0, "3090": 71.0, "V100": 125.0, "T4": 65.0}
# What every MFU figure sumtune prints or saves is measured against: shown next to it, so a reader can tell
# whether attention was counted (MFU without attention is lower at long lengths, for the same speed).
FLOPS_COUNTED = ("attention counted: linear layers ×2, QKᵀ and PV ×3 (causal self-attention: lower triangle), "
                 "LoRA ×3")
ATTENTION_COUNTED = True
ATTENTION_NOTE = "attention included; see sumtune.flops"


@dataclass(frozen=True)
class ForwardFlops:
    """The forward FLOPs of one sample, split by how the backward multiplies them."""

    linear: float
    """Weight matrix products: attention projections, feed-forward, output head."""
    attention: float
    """Score (QKᵀ) and value (PV) products of every attention layer."""

    @property
    def total(self) -> float:
        return self.linear + self.attention


def causal_pairs(length: int) -> int:
    """(query, key) pairs of causal self-attention over `length` tokens: each token and the ones before it."""
    return length * (length + 1) // 2


def t5_forward_flops(config, src_len: int, tgt_len: int) -> ForwardFlops:
    """Forward FLOPs of one sample of `src_len` source and `tgt_len` target tokens through a T5 of `config`."""
    d, ff, inner = config.d_model, config.d_ff, config.num_heads * config.d_kv
    n_enc, n_dec = config.num_layers, config.num_decoder_layers
    ffn = 2 * d * ff * (3 if getattr(config, "is_gated_act", False) else 2)  # wi (or wi_0 and wi_1), wo
    projections = 4 * 2 * d * inner                                            # q, k, v, o
    linear = n_enc * src_len * (projections + ffn)
    linear += n_dec * tgt_len * (projections + ffn)                            # decoder self-attention + FFN
    linear += n_dec * (tgt_len * 2 * 2 * d * inner + src_len * 2 * 2 * d * inner)  # cross: q,o on tgt; k,v on src
    linear += tgt_len * 2 * d * config.vocab_size                              # output head
    product = 2 * 2 * inner                                                    # QKᵀ and PV, per (query, key) pair
    attention = n_enc * product * src_len * src_len
    attention += n_dec * product * (causal_pairs(tgt_len) + tgt_len * src_len)
    return ForwardFlops(linear=float(linear), attention=float(attention))


def t5_forward_flops_per_sample(config, src_len: int, tgt_len: int) -> float:
    return t5_forward_flops(config, src_len, tgt_len).total


def train_flops_per_sample(config, src_len: int, tgt_len: int, *, lora_params: int = 0,
                           recompute: bool = False) -> float:
    """Useful FLOPs of one training sample, from shapes (see the module docstring for what is counted).

    Training = 2 × the linear forward + 3 × the attention forward + 3 × the LoRA forward; `recompute` adds one
    forward for gradient checkpointing (repeated work: MFU leaves it out)."""
    fwd = t5_forward_flops(config, src_len, tgt_len)
    lora = 2 * lora_params * (src_len + tgt_len) / 2  # rough: adapters see about half the tokens on average
    total = 2 * fwd.linear + 3 * fwd.attention + 3 * lora
    return total + (fwd.total if recompute else 0.0)


def peak_tflops(device: torch.device) -> float | None:
    """Datasheet dense bf16 peak of this GPU, or None when unknown (then MFU is not reported)."""
    if device.type != "cuda":
        return None
    return peak_tflops_for_name(torch.cuda.get_device_name(device))


def peak_tflops_for_name(device_name: str | None) -> float | None:
    """Datasheet dense bf16 peak for a GPU name such as "NVIDIA H100 80GB HBM3"; None when unknown."""
    if not device_name:
        return None
    name = device_name.lower()
    return next((tflops for key, tflops in PEAK_BF16_TFLOPS.items() if key.lower() in name), None)


def measure_bf16_matmul_tflops(device: torch.device, size: int = 8192, iters: int = 20) -> float | None:
    """This GPU's achieved dense bf16 matmul rate, TFLOP/s: the median of `iters` size × size × size GEMMs timed
    with CUDA events (~0.1 s); None off CUDA.

    Why next to the datasheet peak: no real GEMM reaches that figure (an H200 measures 750-800 TFLOP/s of its
    989), so MFU against the measured rate says how close the step runs to what this GPU does, and MFU against the
    datasheet how close to what it is sold as."""
    if device.type != "cuda":
        return None
    with torch.cuda.device(device):
        a = torch.randn(size, size, device=device, dtype=torch.bfloat16)
        b = torch.randn(size, size, device=device, dtype=torch.bfloat16)
        for _ in range(3):  # clocks up, cuBLAS's choice made
            a @ b
        times_ms = []
        for _ in range(iters):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            a @ b
            end.record()
            end.synchronize()
            times_ms.append(start.elapsed_time(end))
        del a, b
    return 2 * size**3 / (statistics.median(times_ms) / 1e3) / 1e12


def mfu_basis(device_name: str | None, peak: float | None, matmul: float | None) -> str | None:
    """The line that says what the training log's MFU figures divide by; None when there is no figure."""
    if not peak and not matmul:
        return None
    parts = ([f"the datasheet bf16 peak of the {device_name or 'GPU'} ({peak:.0f} TFLOP/s)"] if peak else []) + \
        ([f"{'in brackets, ' if peak else ''}the bf16 matmul rate measured on it now ({matmul:.0f} TFLOP/s)"]
         if matmul else [])
    return f"sumtune: MFU counts the step's matrix products ({ATTENTION_NOTE}) against {'; '.join(parts)}."


def mfu(flops: float, seconds: float, peak: float | None) -> float | None:
    if not peak or seconds <= 0:
        return None
    return flops / seconds / (peak * 1e12)
