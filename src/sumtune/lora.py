"""PEFT LoRA adapters on a frozen (quantized) base."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from sumtune.errors import SumtuneError

if TYPE_CHECKING:
    from sumtune.config import TrainConfig

OUTPUT_HEADS = ("lm_head",)


def is_linear(module: nn.Module) -> bool:
    """nn.Linear or one of its bitsandbytes replacements (which subclass nn.Linear)."""
    return isinstance(module, nn.Linear)


def linear_layer_names(model: nn.Module) -> list[str]:
    """The distinct short names of the model's linear layers (`q`, `k`, `v`, `o`, `wi`, `wo`, `lm_head`)."""
    return sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules() if name and is_linear(m)})


def resolve_targets(model: nn.Module, targets: list[str]) -> list[str] | str:
    if [t.lower() for t in targets] == ["all-linear"]:
        return "all-linear"  # PEFT's own rule: every linear layer except the output head
    known = linear_layer_names(model)
    unknown = [t for t in targets if t not in known]
    if unknown:
        raise SumtuneError(
            f"Unknown LoRA target module{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))}; "
            f"this model's linear layers are: {', '.join(known)} (or use all-linear)."
        )
    return list(targets)


def check_modules_to_save(model: nn.Module, names: list[str]) -> None:
    present = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules() if name}
    missing = [n for n in names if n not in present]
    if missing:
        raise SumtuneError(f"`modules_to_save` names {', '.join(map(repr, missing))}, which this model does not have.")


def untie_output_head(model: nn.Module) -> None:
    """Give `lm_head` its own weight when it is trained in full.

    T5 ties `lm_head` to the input embeddings. Training a copy of the head (PEFT `modules_to_save`) while the
    embeddings keep the original is only consistent if the two are separate tensors before PEFT wraps them;
    transformers then saves and reloads (or merges) the trained head as its own tensor.
    """
    head = model.get_output_embeddings()
    if head is not None and head.weight is model.get_input_embeddings().weight:
        head.weight = nn.Parameter(head.weight.detach().clone(), requires_grad=False)


def apply_lora(model: nn.Module, cfg: "TrainConfig"):
    """Wrap the frozen base in a PEFT LoRA model; returns the `PeftModel`."""
    from peft import LoraConfig, TaskType, get_peft_model

    targets = resolve_targets(model, cfg.lora_targets)
    if cfg.modules_to_save:
        check_modules_to_save(model, cfg.modules_to_save)
        if any(n in OUTPUT_HEADS for n in cfg.modules_to_save):
            untie_output_head(model)
    lora_config = LoraConfig(
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=targets,
        modules_to_save=list(cfg.modules_to_save) or None,
        task_type=TaskType.SEQ_2_SEQ_LM,
        bias="none",
    )
    torch.manual_seed(cfg.seed)
    peft_model = get_peft_model(model, lora_config)
    # Trainable weights live in fp32 (the optimizer's master copy); the forward runs under bf16 autocast.
    for param in peft_model.parameters():
        if param.requires_grad and param.dtype != torch.float32:
            param.data = param.data.float()
    return peft_model
