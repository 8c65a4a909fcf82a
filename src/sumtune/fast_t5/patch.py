"""enable_fast_t5 / disable_fast_t5: swap T5 module forwards in place (works under PEFT wrappers)."""

from __future__ import annotations

from types import MethodType

import torch

from sumtune.fast_t5 import attention as attention_lib
from sumtune.fast_t5 import modules as fast

_PATCHED_ATTR = "_sumtune_fast_patched"
_FIXED_FORWARD_ATTR = "_sumtune_stock_forward"  # fix_quantized_ffn's forward, which disable_fast_t5 restores


def _t5_classes():
    from transformers.models.t5 import modeling_t5 as t5

    return t5


def _is_quantized_weight(param: torch.Tensor) -> bool:
    return not torch.is_floating_point(param) or type(param).__name__ in ("Params4bit", "Int8Params")


def find_compute_dtype(model: torch.nn.Module) -> torch.dtype:
    """The dtype the fast path computes in: bnb's compute dtype, else the first half-precision weight."""
    for module in model.modules():
        compute_dtype = getattr(module, "compute_dtype", None)
        if type(module).__name__ in ("Linear4bit", "LinearNF4", "LinearFP4") and compute_dtype is not None:
            return compute_dtype
    for param in model.parameters():
        if param.dtype in (torch.bfloat16, torch.float16):
            return param.dtype
    return torch.float32


def _has_mixed_frozen_dtypes(stack: torch.nn.Module, dtype: torch.dtype) -> bool:
    """True when a frozen, unquantized float weight of the stack is not in the compute dtype."""
    for name, param in stack.named_parameters():
        if "lora_" in name or param.requires_grad or _is_quantized_weight(param):
            continue  # PEFT casts LoRA inputs itself; trainable weights keep their precision
        if param.dtype != dtype:
            return True
    return False


def _bind(module: torch.nn.Module, function, dtype: torch.dtype) -> None:
    module.forward = MethodType(function, module)
    setattr(module, fast.COMPUTE_DTYPE_ATTR, dtype)
    setattr(module, _PATCHED_ATTR, True)


def _fast_forward_for(module: torch.nn.Module, final_norms: set[int]):
    t5 = _t5_classes()
    if isinstance(module, t5.T5Stack):
        return fast.fast_stack_forward
    if isinstance(module, t5.T5Attention):
        return fast.fast_attention_forward
    if isinstance(module, t5.T5LayerNorm):
        return fast.fast_final_layer_norm_forward if id(module) in final_norms else fast.fast_layer_norm_forward
    if isinstance(module, t5.T5DenseGatedActDense):
        return fast.fast_dense_gated_act_dense_forward
    if isinstance(module, t5.T5DenseActDense):
        return fast.fast_dense_act_dense_forward
    return None


def enable_fast_t5(model: torch.nn.Module, compute_dtype: torch.dtype | None = None,
                   attention_backend: str = "auto", fused_ffn_dropout: bool = False,
                   fused_gated_ffn: bool = False) -> torch.nn.Module:
    """Patch every T5 stack/attention/layernorm/FFN of ``model`` (plain or PEFT-wrapped) in place.

    Training then runs fused RMSNorm, bf16 GEMMs, and attention in the kernel ``attention_backend`` names
    (``auto``: sumtune's Triton kernels with bias, masks and dropout inside when they can run, else SDPA with a
    no-grad materialised bias; ``triton`` or ``sdpa`` force one; see sumtune.fast_t5.attention). Forwards with a
    KV cache (generation) use the stock code. ``fused_ffn_dropout``: in training, the ReLU feed-forward blocks run
    ReLU and dropout as one Triton kernel each way (sumtune.fast_t5.ffn_dropout; CUDA only, elsewhere stock);
    ``fused_gated_ffn`` likewise for the gated-GELU feed-forward of T5 v1.1 / FLAN-T5.
    Returns ``model`` for chaining; :func:`disable_fast_t5` undoes it.
    """
    t5 = _t5_classes()
    attention_lib.check_backend_name(attention_backend)
    dtype = compute_dtype or find_compute_dtype(model)
    stacks = [m for m in model.modules() if isinstance(m, t5.T5Stack)]
    if not stacks:
        from sumtune.errors import SumtuneError

        raise SumtuneError("fast_kernels needs a T5 model, but no T5Stack was found in it.")
    final_norms = {id(stack.final_layer_norm) for stack in stacks}
    for module in model.modules():
        function = _fast_forward_for(module, final_norms)
        if function is not None:
            _bind(module, function, dtype)
            if isinstance(module, t5.T5DenseActDense):
                setattr(module, fast.FUSED_RELU_DROPOUT_ATTR, fused_ffn_dropout)
            if isinstance(module, t5.T5DenseGatedActDense):
                setattr(module, fast.FUSED_GATED_DROPOUT_ATTR, fused_gated_ffn)
    for stack in stacks:
        stack._sumtune_mixed_dtypes = _has_mixed_frozen_dtypes(stack, dtype)
        setattr(stack, attention_lib.BACKEND_ATTR, attention_backend)
    return model


def disable_fast_t5(model: torch.nn.Module) -> torch.nn.Module:
    """Restore the stock transformers forwards on every module patched by :func:`enable_fast_t5`."""
    for module in model.modules():
        if getattr(module, _PATCHED_ATTR, False):
            del module.forward
            delattr(module, _PATCHED_ATTR)
            for attr in (attention_lib.BACKEND_ATTR, fast.FUSED_RELU_DROPOUT_ATTR, fast.FUSED_GATED_DROPOUT_ATTR):
                if attr in module.__dict__:
                    delattr(module, attr)
            if _FIXED_FORWARD_ATTR in module.__dict__:  # keep the quantized-wo fix (fix_quantized_ffn)
                module.forward = module.__dict__[_FIXED_FORWARD_ATTR]
    return model


def is_fast_t5_enabled(model: torch.nn.Module) -> bool:
    return any(getattr(m, _PATCHED_ATTR, False) for m in model.modules())


def fix_quantized_ffn(model: torch.nn.Module) -> int:
    """Make stock T5 FFNs safe for a quantized `wo` (not an optimisation: a correctness fix).

    transformers' T5 FFN casts its activations to `wo.weight.dtype`; for a 4-bit `wo` that dtype is the packed
    uint8 storage, so activations would be truncated to integers 0-255. Feed `wo` in the compute dtype instead.
    This binding is separate from the fast path and stays when the fast path is disabled. Returns modules fixed.
    """
    t5 = _t5_classes()
    fixed = 0
    dtype = find_compute_dtype(model)
    for module in model.modules():
        if isinstance(module, (t5.T5DenseActDense, t5.T5DenseGatedActDense)) and _is_quantized_weight(module.wo.weight):
            gated = isinstance(module, t5.T5DenseGatedActDense)
            function = fast.fast_dense_gated_act_dense_forward if gated else fast.fast_dense_act_dense_forward
            module.__dict__[_FIXED_FORWARD_ATTR] = MethodType(function, module)
            setattr(module, fast.COMPUTE_DTYPE_ATTR, dtype)
            module.forward = module.__dict__[_FIXED_FORWARD_ATTR]
            fixed += 1
    return fixed
