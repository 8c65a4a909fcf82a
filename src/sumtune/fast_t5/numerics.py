"""Float32 ground truth for LoRA gradients, to judge bf16 paths (fast or stock) against the same yardstick.

bf16 paths disagree with each other by a few percent on single small gradient tensors (stock transformers' own
eager and SDPA attention do, measured at T5-3b widths), so "fast matches stock" is judged against float32:
the fast path must be no further from it than the stock path is.
"""

from __future__ import annotations

import torch
from torch import nn


def lora_grads(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.float().clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}


def fp32_reference_grads(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[float, dict[str, torch.Tensor]]:
    """Loss and LoRA gradients of `model` (PEFT over a quantized or bf16 T5) recomputed in float32 end to end:
    base weights dequantized to fp32, the same LoRA weights, no autocast, no TF32. `model` is left untouched."""
    from peft import get_peft_model

    from sumtune.generation import prepare_inference_model

    with model.disable_adapter():
        dense = prepare_inference_model(model, torch.float32)
    reference = get_peft_model(dense, model.peft_config[model.active_adapter]).train()
    trained = {n: p for n, p in model.named_parameters() if p.requires_grad}
    with torch.no_grad():
        for name, param in reference.named_parameters():
            if name in trained:
                param.copy_(trained[name].float())
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        loss = reference(**batch).loss
        loss.backward()
        grads = lora_grads(reference)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
    missing = sorted(set(trained) - set(grads))
    if missing:
        raise RuntimeError(f"the float32 reference has no gradient for {missing[:3]}")
    return float(loss.detach()), {n: grads[n] for n in trained}


def relative_errors(grads: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> dict[str, float]:
    """Per tensor: ||g - ref|| / ||ref||."""
    return {n: float((grads[n] - reference[n]).norm() / reference[n].norm().clamp_min(1e-30)) for n in reference}


def vector_relative_error(grads: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> float:
    """All gradients taken as one vector: ||g - ref|| / ||ref||."""
    diff = sum(float((grads[n] - reference[n]).double().pow(2).sum()) for n in reference)
    norm = sum(float(reference[n].double().pow(2).sum()) for n in reference)
    return (diff / max(norm, 1e-300)) ** 0.5
