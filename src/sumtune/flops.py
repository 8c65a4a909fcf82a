"""FLOPs of a T5 training step, counted from the model's shapes, and MFU against the GPU's peak.

Counted (multiply-add = 2 FLOPs), for a frozen base with LoRA adapters:
- forward: every linear layer, 2·in·out per token it sees (encoder layers see source tokens, decoder layers and
  the output head see target tokens; cross-attention k/v see source tokens), plus the attention products
  QKᵀ and AV: 2·2·Lq·Lk·inner per layer;
- backward: the activation gradients cost the same as the forward again (the frozen base needs no weight
  gradients); LoRA's own weight gradients are small and counted as one more forward of the adapters;
- gradient checkpointing recomputes the forward once more (counted when asked: it is work the GPU does, but
  not useful work, so MFU excludes it by default, as in the PaLM paper's definition).
"""

from __future__ import annotations

import torch

# Dense bf16 tensor-core peaks from vendor datasheets (TFLOP/s), matched by substring of the device name.
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0, "L4": 121.0,
                    "4090": 165.0, "3090": 71.0, "V100": 125.0, "T4": 65.0}


def t5_forward_flops_per_sample(config, src_len: int, tgt_len: int) -> float:
    d, ff, inner = config.d_model, config.d_ff, config.num_heads * config.d_kv
    gated = 2 if getattr(config, "is_gated_act", False) else 1
    ffn = 2 * d * ff * (gated + 1)                      # wi (or wi_0, wi_1) and wo
    attn_proj = 2 * d * inner * 4                       # q, k, v, o
    enc = config.num_layers * src_len * (attn_proj + ffn)
    enc += config.num_layers * 4 * src_len * src_len * inner
    n_dec = config.num_decoder_layers
    dec = n_dec * tgt_len * (attn_proj + ffn)                       # self-attention + FFN
    dec += n_dec * (tgt_len * 2 * d * inner * 2 + src_len * 2 * d * inner * 2)  # cross: q,o on tgt; k,v on src
    dec += n_dec * 4 * (tgt_len * tgt_len + tgt_len * src_len) * inner
    head = tgt_len * 2 * d * config.vocab_size
    return float(enc + dec + head)


def train_flops_per_sample(config, src_len: int, tgt_len: int, *, lora_params: int = 0,
                           recompute: bool = False) -> float:
    """Useful FLOPs of one training sample, from shapes (multiply-add = 2 FLOPs).

    Training = 2 x forward (backward computes activation gradients, one more forward's worth; the frozen base
    has no weight gradients) + 3 x the LoRA forward. `recompute` adds a forward for gradient checkpointing
    (repeated work: MFU leaves it out)."""
    fwd = t5_forward_flops_per_sample(config, src_len, tgt_len)
    lora = 2 * lora_params * (src_len + tgt_len) / 2  # rough: adapters see about half the tokens on average
    total = 2 * fwd + 3 * lora
    return total + (fwd if recompute else 0.0)


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


def mfu(flops: float, seconds: float, peak: float | None) -> float | None:
    if not peak or seconds <= 0:
        return None
    return flops / seconds / (peak * 1e12)
