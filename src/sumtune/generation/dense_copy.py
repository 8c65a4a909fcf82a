"""The dense copy: a plain model (T5, BART, ...) built from a (PEFT-wrapped, bitsandbytes-quantized) training model,
base dequantized and LoRA merged. Every evaluation and summary generates on it, and `sumtune merge` saves it.

The training model is never modified: every parameter of the new model is a fresh tensor (dequantized,
LoRA-merged, cast), so training can go on while the copy generates.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from sumtune.errors import SumtuneError


def supports_fast_generation(model: nn.Module) -> bool:
    """Whether sumtune's own decoder knows this model (T5, PEFT-wrapped or not); others use transformers' generate."""
    from transformers import T5ForConditionalGeneration

    return isinstance(_unwrap_peft(model), T5ForConditionalGeneration)


def prepare_inference_model(model: nn.Module, dtype: torch.dtype = torch.bfloat16) -> nn.Module:
    """A plain model of the source's class (`T5ForConditionalGeneration`, `BartForConditionalGeneration`, ...) in
    `dtype`, on `model`'s device, with base weights dequantized (bitsandbytes 4-bit / 8-bit) and active LoRA
    adapters merged.

    `model` may be a `peft.PeftModel` over a quantized or dense model, or a plain one. Tied weights stay tied
    exactly where they are tied in the source; a PEFT `modules_to_save` copy of `lm_head` (trained) becomes
    the output projection while the input embeddings keep `shared`, so the two are untied in memory. The
    result is for generation, not for `save_pretrained` (the config still says the embeddings are tied).
    """
    from transformers import PreTrainedModel

    source = _unwrap_peft(model)
    if not isinstance(source, PreTrainedModel):
        raise SumtuneError(f"prepare_inference_model needs a transformers model, got {type(source).__name__}.")
    device = _model_device(source)
    config = copy.deepcopy(source.config)
    for attr in ("quantization_config", "_pre_quantization_dtype"):
        if hasattr(config, attr):
            delattr(config, attr)
    config.dtype = dtype
    with torch.device("meta"):
        fresh = type(source)(config)
    fresh.generation_config = copy.deepcopy(source.generation_config)

    converted: dict[int, nn.Parameter] = {}  # id(source tensor or module) -> new Parameter, keeps ties
    for name, module in fresh.named_modules():
        for param_name, _ in list(module.named_parameters(recurse=False)):
            key, build = _source_tensor(source, name, param_name)
            if key not in converted:
                with torch.no_grad():
                    tensor = build().to(device=device, dtype=dtype, copy=True)
                converted[key] = nn.Parameter(tensor, requires_grad=False)
            setattr(module, param_name, converted[key])
    for name, buffer in list(fresh.named_buffers()):  # what some models register (BART's final_logits_bias, ...)
        if buffer.is_meta:
            module_name, _, buffer_name = name.rpartition(".")
            owner = fresh.get_submodule(module_name) if module_name else fresh
            try:
                original = source.get_buffer(name)
            except AttributeError:
                raise SumtuneError(f"prepare_inference_model could not fill buffer {name} from the source model.") \
                    from None
            value = original.detach().to(device=device, copy=True)
            if value.is_floating_point():  # as the weights: a bf16 model should not compute in fp32 here
                value = value.to(dtype)
            owner.register_buffer(buffer_name, value, persistent=buffer_name not in owner._non_persistent_buffers_set)
    leftovers = [n for n, t in (*fresh.named_parameters(), *fresh.named_buffers()) if t.is_meta]
    if leftovers:
        raise SumtuneError(f"prepare_inference_model could not fill {leftovers[:3]} from the source model.")
    fresh.eval()
    fresh.requires_grad_(False)
    return fresh


def _unwrap_peft(model: nn.Module) -> nn.Module:
    """The model inside a PeftModel (LoRA layers still in place), or `model` itself."""
    try:
        from peft import PeftModel
    except ImportError:  # peft not installed: nothing to unwrap
        return model
    return model.get_base_model() if isinstance(model, PeftModel) else model


def _model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _source_tensor(source: nn.Module, module_name: str, param_name: str):
    """(dedup key, thunk computing the dense tensor) for parameter `param_name` of module `module_name`."""
    module = _resolve_wrappers(source.get_submodule(module_name) if module_name else source)
    if param_name == "weight" and (_is_lora_layer(module) or _is_bnb_layer(module)):
        return id(module), lambda: effective_weight(module)
    tensor = getattr(module, param_name)
    return id(tensor), lambda: tensor.detach()


def _resolve_wrappers(module: nn.Module) -> nn.Module:
    """PEFT `modules_to_save` wrapper -> the module that actually runs (the trained copy, if active)."""
    try:
        from peft.utils.other import ModulesToSaveWrapper, TrainableTokensWrapper
    except ImportError:
        return module
    if isinstance(module, TrainableTokensWrapper):
        raise SumtuneError("prepare_inference_model does not support PEFT trainable_token_indices.")
    if isinstance(module, ModulesToSaveWrapper):
        active = [a for a in module.active_adapters if a in module.modules_to_save]
        if module.disable_adapters or not active:
            return module.original_module
        if len(active) > 1:
            raise SumtuneError("prepare_inference_model supports one active modules_to_save adapter, not several.")
        return module.modules_to_save[active[0]]
    return module


def _is_lora_layer(module: nn.Module) -> bool:
    return hasattr(module, "base_layer") and hasattr(module, "lora_A") and hasattr(module, "get_delta_weight")


def _is_bnb_layer(module: nn.Module) -> bool:
    return type(module).__module__.startswith("bitsandbytes")


def effective_weight(module: nn.Module) -> torch.Tensor:
    """Dense float32 weight that `module` applies: dequantized base plus unmerged active LoRA deltas."""
    if _is_lora_layer(module):
        weight = effective_weight(module.get_base_layer())
        if module.disable_adapters:
            return weight
        for adapter in module.active_adapters:
            if adapter not in module.lora_A or adapter in module.merged_adapters:
                continue  # merged adapters already live in the base weight
            if module.use_dora.get(adapter, False) or getattr(module, "lora_bias", {}).get(adapter, False):
                raise SumtuneError("prepare_inference_model supports plain LoRA adapters, not DoRA or lora_bias.")
            delta = module.get_delta_weight(adapter).float()
            if delta.shape != weight.shape:
                raise SumtuneError(f"LoRA delta shape {tuple(delta.shape)} does not match {tuple(weight.shape)}.")
            weight = weight + delta.to(weight.device)
        return weight
    return dequantized_weight(module)


def dequantized_weight(module: nn.Module) -> torch.Tensor:
    """Dense float32 weight of a plain, bitsandbytes 4-bit, or bitsandbytes 8-bit linear/embedding layer."""
    weight = module.weight
    if not _is_bnb_layer(module):
        return weight.detach().float()
    import bitsandbytes as bnb

    if isinstance(module, bnb.nn.Linear4bit):
        from sumtune.fast_t5.extras import dequantize_4bit_weight

        return dequantize_4bit_weight(module, torch.float32)
    if isinstance(module, bnb.nn.Linear8bitLt):
        scales = getattr(weight, "SCB", None)
        if scales is None:  # not quantized yet (still on CPU before .cuda()): the data is the dense weight
            return weight.data.float()
        return bnb.functional.int8_vectorwise_dequant(weight.data, scales).float()
    raise SumtuneError(f"prepare_inference_model cannot dequantize a {type(module).__name__} layer.")
