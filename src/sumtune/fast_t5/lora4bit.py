"""One autograd node for a PEFT LoRA layer on a bitsandbytes 4-bit linear (training only).

PEFT's `lora.bnb.Linear4bit.forward` computes `base(x).clone() + lora_B(lora_A(dropout(x))) * scaling`: per layer
and step that is a defensive copy of the output, a scaling pass and an addition pass over the output, and seven
autograd nodes, each a host round of Python and kernel launches. With LoRA on every linear layer of T5-3b (384
layers) the host, not the GPU, sets the step time. Here the same maths is one `autograd.Function`:

    forward:  y = x Wᵀ  (W dequantized from NF4, as bnb does),  y += s · (dropout(x) Aᵀ) Bᵀ  (one addmm)
    backward: dx = dy W + dropout'(s · (dy B) A),  dA = (s · dy B)ᵀ dropout(x),  dB = s · dyᵀ (dropout(x) Aᵀ)

The frozen weight is dequantized again in backward instead of being kept (as bnb does), so memory is PEFT's.

With ``concat_gemms`` the low-rank term rides inside the base GEMM where the addmm would be a pass over a wide
tensor: when the output is at least twice as wide as the input (T5's q/k/v/wi), forward computes
``[x | s·xAᵀ] [W | B]ᵀ`` and backward ``dy [W | B]`` (dx's base part and dy B in one read of dy); when the input is
the wide side (o/wo, no LoRA dropout), backward computes ``[dy | s·dy B] [W ; A]``. The concatenated copies are of
the narrow side (and of W), so each layer skips a read and write of its widest activation.
Layers this does not cover (eval/no-grad, merged or disabled adapters, several adapters, DoRA and other
variants, LoRA bias, inputs or adapters in another dtype than bnb's compute dtype) take PEFT's own forward.
"""

from __future__ import annotations

from types import MethodType

import torch
import torch.nn.functional as F

from sumtune.fast_t5 import lora_dropout
from sumtune.fast_t5.attention_inputs import dropout_seed
from sumtune.fast_t5.extras import _CACHE_ATTR, _JOINED_ATTR, _JOINED_LAYOUT_ATTR, dequantize_4bit_weight

_FUSED_ATTR = "_sumtune_fused_lora"
# With the weight cache, keep W beside the low-rank weight in one buffer for the concatenated GEMMs (_joined_weight)
# instead of concatenating a copy of W per call. A module constant so that benchmarks can measure both.
JOIN_CACHED_WEIGHTS = True
_CONCAT_ATTR = "_sumtune_lora_concat_gemms"


def _base_weight(base: torch.nn.Module, dtype: torch.dtype) -> torch.Tensor:
    cached = getattr(base, _CACHE_ATTR, None)  # cache_dequantized_weights keeps a dense copy
    if cached is not None and cached.dtype == dtype:
        return cached
    return dequantize_4bit_weight(base, dtype)


def _joined_weight(base: torch.nn.Module, wide: str, low_w: torch.Tensor, dtype: torch.dtype, pad_before: int = 0,
                   pad_after: int = 0) -> torch.Tensor:
    """``[W | B]`` (wide side "out", ``low_w`` = B) or ``[W ; A]`` ("in", ``low_w`` = A) for the concatenated GEMMs.

    With the dequantized-weight cache, W lives in one buffer with r spare columns (rows) beside it, the cache
    becomes a view of it, and each call copies only the low-rank weight in: concatenating afresh copied all of W
    per call (T5-3b's wi: a 32 MiB read and write, forward and backward; by arithmetic about half of the 20 ms of
    concatenation copies in the shipped 1024/128 step's H200 profile, 2026-12-02). Measured: +1.2% (1024/128) and
    +0.7% (4096/512) samples/s. Without the cache W is dequantized per call anyway, and is concatenated.
    ``pad_before``/``pad_after``: zero columns (rows) each side of the low-rank weight (lora_group's layout)."""
    dim = 1 if wide == "out" else 0
    rank = low_w.shape[dim]
    cached = getattr(base, _CACHE_ATTR, None)
    if cached is None or cached.dtype != dtype or not JOIN_CACHED_WEIGHTS:
        parts = [_base_weight(base, dtype)]
        parts += [low_w.new_zeros(_resized(low_w.shape, dim, pad_before))] if pad_before else []
        parts += [low_w] + ([low_w.new_zeros(_resized(low_w.shape, dim, pad_after))] if pad_after else [])
        return torch.cat(parts, dim=dim)
    joined = getattr(base, _JOINED_ATTR, None)
    width = cached.shape[dim]
    total = width + pad_before + rank + pad_after
    layout = (pad_before, rank, pad_after)
    if joined is None or joined.data_ptr() != cached.data_ptr() or getattr(base, _JOINED_LAYOUT_ATTR, None) != layout:
        joined = torch.cat([cached, cached.new_zeros(_resized(cached.shape, dim, total - width))], dim=dim)
        setattr(base, _CACHE_ATTR, joined.narrow(dim, 0, width))  # the old cache tensor is freed
        setattr(base, _JOINED_ATTR, joined)
        setattr(base, _JOINED_LAYOUT_ATTR, layout)
    joined.narrow(dim, width + pad_before, rank).copy_(low_w)  # the padding stays zero: nothing else writes it
    return joined


def _resized(shape: torch.Size, dim: int, size: int) -> tuple[int, ...]:
    return tuple(size if d == dim else n for d, n in enumerate(shape))


def wide_side(in_features: int, out_features: int) -> str | None:
    """Which side of a linear layer `concat_gemms` spares a pass over: "out" when the output is at least twice as
    wide as the input, "in" when the input is, else None (the concatenated copy would cost about what it saves)."""
    if out_features >= 2 * in_features:
        return "out"
    if in_features >= 2 * out_features:
        return "in"
    return None


class FusedLora4bit(torch.autograd.Function):
    """y = base(x) + scaling · B(A(dropout(x))) for a frozen 4-bit base, as one autograd node."""

    @staticmethod
    def forward(ctx, x, weight_a, weight_b, base, scaling: float, dropout_p: float, dtype: torch.dtype,
                concat_gemms: bool = False):
        with torch.autocast(x.device.type, enabled=False):
            x2d = x.reshape(-1, x.shape[-1]).to(dtype)
            a_w, b_w = weight_a.to(dtype), weight_b.to(dtype)
            bias = None if base.bias is None else base.bias.to(dtype)
            wide = wide_side(base.in_features, base.out_features) if concat_gemms else None
            seed = None
            # the kernels keep x and a seed, not a dropped copy and its mask
            if lora_dropout.can_run(x2d, a_w, dropout_p, base.out_features):
                seed = dropout_seed(x2d, dropout_p)
                dropped, mask = x2d, None
                low_rank = lora_dropout.low_rank(x2d, a_w, seed, dropout_p)
            else:
                dropped, mask = torch.native_dropout(x2d, dropout_p, True) if dropout_p > 0 else (x2d, None)
                low_rank = dropped @ a_w.t()  # [N, r]
            if wide == "out":  # one GEMM over K = in + r: the wide output is written once, never re-read
                out = F.linear(torch.cat([x2d, low_rank * scaling], dim=1), _joined_weight(base, wide, b_w, dtype),
                               bias)
            else:
                out = F.linear(x2d, _base_weight(base, dtype), bias)
                out.addmm_(low_rank, b_w.t(), alpha=scaling)
        ctx.save_for_backward(dropped, mask, low_rank, a_w, b_w, seed)
        ctx.base, ctx.scaling, ctx.dropout_p, ctx.dtype, ctx.wide = base, scaling, dropout_p, dtype, wide
        ctx.x_shape, ctx.x_dtype, ctx.param_dtypes = x.shape, x.dtype, (weight_a.dtype, weight_b.dtype)
        return out.reshape(*x.shape[:-1], out.shape[-1]).to(x.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        dropped, mask, low_rank, a_w, b_w, seed = ctx.saved_tensors
        with torch.autocast(grad_out.device.type, enabled=False):
            grad2d = grad_out.reshape(-1, grad_out.shape[-1]).to(ctx.dtype)
            grad_x = None
            if ctx.needs_input_grad[0]:  # not for the first layers' q/k/v/wi, whose input is the embedding
                grad_x, grad_low = _input_grad(ctx, grad2d, mask, a_w, b_w, add_low_rank=seed is None)
            else:
                grad_low = (grad2d @ b_w).mul_(ctx.scaling)  # [N, r]: dL/d(dropped Aᵀ)
            if seed is None:
                grad_a = grad_low.t() @ dropped
            else:  # dropped is x: the kernel regenerates the mask, and adds the low-rank term to grad_x
                grad_a = lora_dropout.low_rank_backward(dropped, a_w, grad_low, seed, ctx.dropout_p, grad_x)
            if grad_x is not None:
                grad_x = grad_x.reshape(ctx.x_shape).to(ctx.x_dtype)
            grad_b = (grad2d.t() @ low_rank).mul_(ctx.scaling)
        dtype_a, dtype_b = ctx.param_dtypes
        return grad_x, grad_a.to(dtype_a), grad_b.to(dtype_b), None, None, None, None, None


def _input_grad(ctx, grad2d, mask, a_w, b_w, add_low_rank: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(dx [N, in], s · dy B [N, r]) of the fused node's backward; without ``add_low_rank`` dx lacks the low-rank
    term (lora_dropout's kernel adds it)."""
    scaling = ctx.scaling
    if ctx.wide == "in" and mask is None and add_low_rank:  # one GEMM over K = out + r: the wide dx is written once
        grad_low = (grad2d @ b_w).mul_(scaling)
        return torch.cat([grad2d, grad_low], dim=1) @ _joined_weight(ctx.base, "in", a_w, ctx.dtype), grad_low
    if ctx.wide == "out":  # dx's base part and dy B from one read of the wide dy
        both = grad2d @ _joined_weight(ctx.base, "out", b_w, ctx.dtype)
        in_features = ctx.base.in_features
        grad_x, grad_low = both[:, :in_features], both[:, in_features:] * scaling
    else:
        grad_x, grad_low = grad2d @ _base_weight(ctx.base, ctx.dtype), (grad2d @ b_w).mul_(scaling)
    if not add_low_rank:
        return grad_x, grad_low
    if mask is None:
        grad_x.addmm_(grad_low, a_w)
    else:
        grad_x += torch.ops.aten.native_dropout_backward(grad_low @ a_w, mask, 1.0 / (1.0 - ctx.dropout_p))
    return grad_x, grad_low


def _lora_dtype(layer, x: torch.Tensor, weight_a: torch.Tensor) -> torch.dtype:
    """The dtype PEFT's LoRA matmuls run in: autocast's when it is on, else the adapter weights'."""
    device_type = x.device.type
    return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else weight_a.dtype


def _fusable_adapter(layer, x: torch.Tensor, args, kwargs) -> str | None:
    """The single vanilla adapter this call can fuse, or None when PEFT's forward must run."""
    if args or kwargs or not (layer.training and torch.is_grad_enabled()):
        return None
    if layer.disable_adapters or layer.merged or len(layer.active_adapters) != 1:
        return None
    name = layer.active_adapters[0]
    if name not in layer.lora_A or name in getattr(layer, "lora_variant", {}):
        return None
    if layer.lora_B[name].bias is not None or layer.lora_A[name].bias is not None:
        return None
    base = layer.get_base_layer()
    if getattr(base.weight, "quant_state", None) is None or base.compute_dtype is None:
        return None
    dropout = layer.lora_dropout[name]
    if not isinstance(dropout, (torch.nn.Dropout, torch.nn.Identity)):
        return None
    # Inputs in another dtype (float32 activations after prepare_model_for_kbit_training) get PEFT's mixed
    # precision exactly: bnb's backward then runs in float32, which one bf16 node would not reproduce.
    if not base.compute_dtype == x.dtype == _lora_dtype(layer, x, layer.lora_A[name].weight):
        return None
    return name


def lora_dropout_p(layer, name: str) -> float:
    """The LoRA dropout rate of a fusable adapter (its dropout is an nn.Dropout or an nn.Identity)."""
    dropout = layer.lora_dropout[name]
    return float(dropout.p) if isinstance(dropout, torch.nn.Dropout) else 0.0


# Kept out of torch.compile'd graphs (a graph break in each compiled T5 block; ~1 us a call eagerly): traced by
# dynamo, the node lost the LoRA gradients on CUDA (torch 2.11, H200: every lora_B gradient zero, tiny T5, with and
# without CUDA graphs; benchmarks/results/logs/compile_fused_lora_disable-2026-12-01-h200.log), and before that
# every encoder gradient (`needs_input_grad` as traced for the first layer, as in pytorch/pytorch#159299). Eagerly
# between compiled regions it trains as PEFT's layers do (tests/test_cuda_graphs.py, GPU).
@torch.compiler.disable
def fused_lora_4bit_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """Bound onto `peft.tuners.lora.bnb.Linear4bit` instances: the fused node in training, PEFT's forward else."""
    name = _fusable_adapter(self, x, args, kwargs)
    if name is None:
        return type(self).forward(self, x, *args, **kwargs)
    base = self.get_base_layer()
    return FusedLora4bit.apply(x, self.lora_A[name].weight, self.lora_B[name].weight, base,
                               float(self.scaling[name]), lora_dropout_p(self, name), base.compute_dtype,
                               getattr(self, _CONCAT_ATTR, False))


def _lora_4bit_class():
    try:
        from peft.tuners.lora.bnb import Linear4bit
    except ImportError:  # peft without bitsandbytes support: nothing to fuse
        return None
    return Linear4bit


def fuse_lora_4bit(model: torch.nn.Module, concat_gemms: bool = False) -> int:
    """Bind the fused forward onto every PEFT LoRA layer over a 4-bit linear in ``model``; returns how many.

    ``concat_gemms``: the low-rank term inside the base GEMM on a layer's wide side (module docstring).
    Undo with :func:`unfuse_lora_4bit` (deletes the instance attribute, so the class forward is back)."""
    layer_class = _lora_4bit_class()
    if layer_class is None:
        return 0
    fused = 0
    for module in model.modules():
        if isinstance(module, layer_class):
            module.forward = MethodType(fused_lora_4bit_forward, module)
            setattr(module, _FUSED_ATTR, True)
            setattr(module, _CONCAT_ATTR, concat_gemms)
            fused += 1
    return fused


def unfuse_lora_4bit(model: torch.nn.Module) -> int:
    restored = 0
    for module in model.modules():
        if getattr(module, _FUSED_ATTR, False):
            del module.forward
            delattr(module, _FUSED_ATTR)
            delattr(module, _CONCAT_ATTR)
            restored += 1
    return restored
