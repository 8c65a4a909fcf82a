"""`sumtune memory`: model footprint fp32 vs quantized vs quantized + adapters, and parameter counts.

Computed from the model's shapes (a model built on the `meta` device: no weights needed, nothing downloaded
for the known T5 sizes), so it answers "will T5-3b fit my card?" before anything is loaded.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import torch
from torch import nn

from sumtune.config import TrainConfig
from sumtune.errors import SumtuneError

if TYPE_CHECKING:
    from sumtune.modeling import QuantSettings

BNB_BLOCKSIZE = 64          # bitsandbytes 4-bit block size (one absmax per 64 weights)
NESTED_BLOCKSIZE = 256      # double quantization: one fp32 absmax per 256 quantized absmax values
BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}


def quantized_linear_bytes(numel: int, out_features: int, quantization: str, double_quant: bool) -> int:
    """Bytes a bitsandbytes layer holds for a weight of `numel` elements (packed data + quantization constants)."""
    if quantization == "int8":
        return numel + 4 * out_features  # int8 weights + one fp32 scale per row
    blocks = -(-numel // BNB_BLOCKSIZE)
    packed = -(-numel // 2)
    if double_quant:
        nested = -(-blocks // NESTED_BLOCKSIZE)
        return packed + blocks + 4 * nested + 4 * 256 + 4  # uint8 absmax, fp32 nested absmax, code, offset
    return packed + 4 * blocks


@dataclass
class MemoryReport:
    model: str
    total_params: int
    trainable_params: int
    fp32_bytes: int
    compute_dtype_bytes: int
    transformers_default_bytes: int
    quantized_bytes: int
    adapter_bytes: int

    @property
    def trainable_pct(self) -> float:
        return 100.0 * self.trainable_params / self.total_params

    def rows(self) -> list[tuple[str, str]]:
        gib = lambda b: f"{b / 2**30:.2f} GiB ({b / 1e9:.2f} GB)"  # noqa: E731
        return [
            ("model", self.model),
            ("footprint fp32", gib(self.fp32_bytes)),
            ("footprint compute dtype", gib(self.compute_dtype_bytes)),
            ("quantized as the reference loads it (wo, embeddings fp32)", gib(self.transformers_default_bytes)),
            ("quantized, sumtune", gib(self.quantized_bytes)),
            ("quantized + adapters (fp32)", gib(self.quantized_bytes + self.adapter_bytes)),
            ("total parameters (base + adapters)", f"{self.total_params:,}"),
            ("trainable parameters", f"{self.trainable_params:,} ({self.trainable_pct:.2f}%)"),
        ]

    def format(self) -> str:
        width = max(len(k) for k, _ in self.rows())
        return "\n".join(f"{k:<{width}}  {v}" for k, v in self.rows())

    def as_dict(self) -> dict:
        return {**self.__dict__, "trainable_pct": self.trainable_pct}


def meta_model(cfg: TrainConfig) -> nn.Module:
    """The model's modules on the meta device: shapes only."""
    from transformers import AutoConfig, AutoModelForSeq2SeqLM

    from sumtune.modeling import model_source, t5_config, untie_head_if_untied

    shape = model_source(cfg.model).shape
    if shape is not None:
        config = t5_config(shape)
    else:
        try:
            config = AutoConfig.from_pretrained(cfg.model, trust_remote_code=cfg.trust_remote_code)
        except OSError:
            raise SumtuneError(f"Cannot read the config of {cfg.model!r} (not a local directory, not a known T5 "
                               f"size, and the hub is unreachable).") from None
    with torch.device("meta"):
        return untie_head_if_untied(AutoModelForSeq2SeqLM.from_config(config))


def _unique_params(model: nn.Module) -> dict[int, tuple[str, nn.Parameter]]:
    seen: dict[int, tuple[str, nn.Parameter]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        seen.setdefault(id(param), (name, param))
    return seen


def footprint_bytes(model: nn.Module, quant: QuantSettings, skip: set[str]) -> int:
    """Bytes of the base with every linear layer not in `skip` quantized as `quant` says."""
    linear_weights = {id(m.weight): m for n, m in model.named_modules()
                      if isinstance(m, nn.Linear) and n.rsplit(".", 1)[-1] not in skip}
    total = 0
    for name, param in _unique_params(model).values():
        if quant.kind != "none" and id(param) in linear_weights:
            total += quantized_linear_bytes(param.numel(), param.shape[0], quant.kind, quant.double_quant)
        else:
            fp32_kept = quant.compute_dtype == "fp16" and ".wo." in f".{name}"
            total += param.numel() * (4 if fp32_kept else BYTES[quant.compute_dtype])
    return total


def memory_report(cfg: TrainConfig) -> MemoryReport:
    from sumtune.lora import apply_lora
    from sumtune.modeling import QuantSettings, skipped_modules

    model = meta_model(cfg)
    total = sum(p.numel() for _, p in _unique_params(model).values())
    fp32 = total * 4
    compute = total * BYTES[cfg.compute_dtype]
    # The reference loads without a dtype: unquantized layers (T5's wo, embeddings, norms) stay fp32.
    quant = QuantSettings.of(cfg)
    reference = footprint_bytes(model, replace(quant, compute_dtype="fp32"), skip={"lm_head", "wo"})
    ours = footprint_bytes(model, quant, skip=set(skipped_modules(cfg.compute_dtype)))
    peft_model = apply_lora(model, cfg)  # unties lm_head itself when it is in modules_to_save
    trainable = sum(p.numel() for _, p in _unique_params(peft_model).values() if p.requires_grad)
    # As PEFT's print_trainable_parameters counts on the tied model: base + adapters (+ saved module copies).
    with_adapters = total + trainable
    return MemoryReport(model=cfg.model, total_params=with_adapters, trainable_params=trainable, fp32_bytes=fp32,
                        compute_dtype_bytes=compute, transformers_default_bytes=reference, quantized_bytes=ours,
                        adapter_bytes=4 * trainable)


def measured_footprint_bytes(model: nn.Module) -> int:
    """Bytes a loaded model really holds: unique parameters and buffers plus bitsandbytes quantization state."""
    total = sum(p.numel() * p.element_size() for _, p in _unique_params(model).values())
    total += sum(b.numel() * b.element_size() for b in model.buffers())
    for module in model.modules():
        state = getattr(getattr(module, "weight", None), "quant_state", None)
        if state is None:
            continue
        tensors = [state.absmax, getattr(state, "code", None)]
        nested = getattr(state, "state2", None)
        if nested is not None:
            tensors += [nested.absmax, nested.code]
        total += sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))
        total += 4 if getattr(state, "offset", None) is not None else 0
    return total
