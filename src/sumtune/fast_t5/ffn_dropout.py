"""T5's feed-forward ``dropout(relu(wi(x)))`` in one kernel each way (Triton, sumtune.fast_t5.ffn_kernels), and
T5 v1.1 / FLAN-T5's ``dropout(gelu_new(wi_0(x)) * wi_1(x))`` likewise.

Public:
    relu_dropout(x, dropout_p) -> Tensor         (autograd; the kernels on CUDA, or in Triton's CPU interpreter)
    gated_gelu_dropout(a, b, dropout_p) -> Tensor   (autograd; the same, for the gated GELU feed-forward)
    is_tanh_gelu(act) -> bool                    (whether a feed-forward's activation is the one the kernel computes)
    relu_dropout_keep_mask(seed, numel, dropout_p, device) -> bool Tensor   (the mask a seed gives: tests)
    can_fuse(x) -> bool                          (whether the kernels can run on x here)
    fuses_in_model(x) -> bool                    (whether the fast T5 feed-forward uses them for x: CUDA only)

Why: in T5-3b the FF intermediate is 16,384 wide, so at 16 × 1024 tokens each pass over it moves ~0.5 GB. Stock
runs ReLU (a clamp kernel), dropout (a kernel writing the output and a byte mask), and in the backward dropout's
masked scale and ReLU's threshold: ~5 GB a layer and micro-batch, and it keeps the ReLU output and the mask for the
backward (0.75 GiB a layer). Here: one read and one write each way, and the backward needs only the output, which
``wo`` keeps anyway (y > 0 exactly where x > 0 and the element was kept). The forward and backward are
``torch.library`` custom ops, so ``torch.compile`` keeps them as opaque calls, and the dropout seed is drawn on the
device by torch's generator (no host sync; CUDA graphs draw a new one per replay; checkpointing's RNG restore
makes a recomputed forward draw the same mask), as in sumtune's attention kernels.

The gated form keeps a and b (wi_0's and wi_1's outputs) for its backward and recomputes the GELU and the mask:
stock keeps a, gelu(a), b and the mask. Its GELU runs in fp32 (stock's ``gelu_new`` rounds each of its five ops to
bf16), so it is not bitwise stock's; the tests hold it to a float64 reference.
"""

from __future__ import annotations

import importlib.util

import torch
from torch import Tensor

from sumtune.fast_t5.attention_inputs import dropout_seed, dropout_threshold

BLOCK = 4096  # elements per program (a multiple of 4: Philox gives 4 draws per counter)
DRAW_RANGE = 1 << 31  # dropout decisions are 31-bit draws
SUPPORTED_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def _kernels():
    from sumtune.fast_t5 import ffn_kernels

    return ffn_kernels


def can_fuse(x: Tensor) -> bool:
    """The kernels run on CUDA tensors (or any tensor under Triton's interpreter) of a supported dtype."""
    if x.dtype not in SUPPORTED_DTYPES or importlib.util.find_spec("triton") is None:
        return False
    return x.device.type == "cuda" or _kernels().INTERPRET


def fuses_in_model(x: Tensor) -> bool:
    """Whether the fast T5 feed-forward takes the kernels for ``x``: on CUDA only. Triton's CPU interpreter (which
    the tests switch on, and which their subprocesses inherit) is ~10x slower than torch's ops on a CPU: a demo
    run took 5 min instead of 29 s, benchmarks/results/demo_triton_interpret-*; tests that check the wiring patch
    this to :func:`can_fuse`."""
    return x.device.type == "cuda" and can_fuse(x)


def _threshold(dropout_p: float) -> tuple[int, float]:
    """(drop_below, scale) for 31-bit draws, as the attention kernels derive theirs for 16-bit ones."""
    return dropout_threshold(dropout_p, DRAW_RANGE)


def _grid(numel: int) -> tuple[int]:
    return (max(1, -(-numel // BLOCK)),)


@torch.library.custom_op("sumtune::relu_dropout", mutates_args=())
def _relu_dropout_op(x: Tensor, dropout_p: float) -> tuple[Tensor, Tensor]:
    x = x.contiguous()
    seed = dropout_seed(x, dropout_p)
    y = torch.empty_like(x)
    drop_below, scale = _threshold(dropout_p)
    _kernels().relu_dropout_fwd[_grid(x.numel())](x, y, seed, x.numel(), drop_below, scale, BLOCK=BLOCK,
                                                  DROPOUT=dropout_p > 0)
    return y, seed


@_relu_dropout_op.register_fake
def _(x, dropout_p):
    return torch.empty_like(x, memory_format=torch.contiguous_format), x.new_empty((1,), dtype=torch.int64)


@torch.library.custom_op("sumtune::relu_dropout_backward", mutates_args=())
def _relu_dropout_backward_op(grad_y: Tensor, y: Tensor, dropout_p: float) -> Tensor:
    grad_y = grad_y.contiguous()
    grad_x = torch.empty_like(y)
    _kernels().relu_dropout_bwd[_grid(y.numel())](grad_y, y, grad_x, y.numel(), _threshold(dropout_p)[1],
                                                  BLOCK=BLOCK)
    return grad_x


@_relu_dropout_backward_op.register_fake
def _(grad_y, y, dropout_p):
    return torch.empty_like(y)


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(output[0])  # the output only: the next layer keeps it anyway
    ctx.dropout_p = inputs[1]


def _backward(ctx, grad_y, _grad_seed):
    (y,) = ctx.saved_tensors
    return _relu_dropout_backward_op(grad_y, y, ctx.dropout_p), None


_relu_dropout_op.register_autograd(_backward, setup_context=_setup_context)


def relu_dropout(x: Tensor, dropout_p: float) -> Tensor:
    """``dropout(relu(x), dropout_p)`` (training-mode dropout; 0 gives ReLU) in one kernel, its backward in one."""
    if not can_fuse(x):
        raise RuntimeError(f"the fused ReLU-dropout kernels need a CUDA tensor of {SUPPORTED_DTYPES}, got "
                           f"{x.device.type} {x.dtype}")
    return _relu_dropout_op(x, float(dropout_p))[0]


def relu_dropout_keep_mask(seed: Tensor | int, numel: int, dropout_p: float, device="cuda") -> Tensor:
    """(numel,) bool: True where the forward keeps an element for this seed (the first draw_seed after an RNG
    state, as :func:`sumtune.fast_t5.flash_attention.dropout_keep_mask` documents)."""
    seed = torch.as_tensor(seed, dtype=torch.int64).reshape(1).to(device)
    keep = torch.empty(numel, dtype=torch.int8, device=device)
    _kernels().relu_dropout_keep[_grid(numel)](keep, seed, numel, _threshold(dropout_p)[0], BLOCK=BLOCK)
    return keep.bool()


def dropout_scale(dropout_p: float) -> float:
    """What the forward multiplies kept values by."""
    return _threshold(dropout_p)[1]


# ----------------------------------------------------------------------------- gated GELU (T5 v1.1 / FLAN-T5)
def is_tanh_gelu(act: torch.nn.Module) -> bool:
    """transformers' ``gelu_new`` or ``gelu_pytorch_tanh`` (the tanh approximation the kernels compute)."""
    name = type(act).__name__
    if name == "GELUTanh" or name == "NewGELUActivation":
        return True
    return isinstance(act, torch.nn.GELU) and act.approximate == "tanh"


@torch.library.custom_op("sumtune::gated_gelu_dropout", mutates_args=())
def _gated_op(a: Tensor, b: Tensor, dropout_p: float) -> tuple[Tensor, Tensor]:
    a, b = a.contiguous(), b.contiguous()
    seed = dropout_seed(a, dropout_p)
    y = torch.empty_like(a)
    drop_below, scale = _threshold(dropout_p)
    _kernels().gated_gelu_dropout_fwd[_grid(a.numel())](a, b, y, seed, a.numel(), drop_below, scale, BLOCK=BLOCK,
                                                        DROPOUT=dropout_p > 0)
    return y, seed


@_gated_op.register_fake
def _(a, b, dropout_p):
    return torch.empty_like(a, memory_format=torch.contiguous_format), a.new_empty((1,), dtype=torch.int64)


@torch.library.custom_op("sumtune::gated_gelu_dropout_backward", mutates_args=())
def _gated_backward_op(grad_y: Tensor, a: Tensor, b: Tensor, seed: Tensor, dropout_p: float) -> tuple[Tensor, Tensor]:
    grad_y = grad_y.contiguous()
    grad_a, grad_b = torch.empty_like(a), torch.empty_like(b)
    drop_below, scale = _threshold(dropout_p)
    _kernels().gated_gelu_dropout_bwd[_grid(a.numel())](grad_y, a, b, seed, grad_a, grad_b, a.numel(), drop_below,
                                                        scale, BLOCK=BLOCK, DROPOUT=dropout_p > 0)
    return grad_a, grad_b


@_gated_backward_op.register_fake
def _(grad_y, a, b, seed, dropout_p):
    return torch.empty_like(a), torch.empty_like(b)


def _gated_setup_context(ctx, inputs, output):
    a, b, dropout_p = inputs
    ctx.save_for_backward(a.contiguous(), b.contiguous(), output[1])
    ctx.dropout_p = dropout_p


def _gated_backward(ctx, grad_y, _grad_seed):
    a, b, seed = ctx.saved_tensors
    grad_a, grad_b = _gated_backward_op(grad_y, a, b, seed, ctx.dropout_p)
    return grad_a, grad_b, None


_gated_op.register_autograd(_gated_backward, setup_context=_gated_setup_context)


def gated_gelu_dropout(a: Tensor, b: Tensor, dropout_p: float) -> Tensor:
    """``dropout(gelu_tanh(a) * b, dropout_p)`` (training-mode dropout) in one kernel, its backward in one."""
    if a.shape != b.shape or a.dtype != b.dtype or not can_fuse(a) or b.device != a.device:
        raise RuntimeError(f"the fused gated-GELU kernels need two CUDA tensors of one shape and dtype in "
                           f"{SUPPORTED_DTYPES}, got {a.device.type} {a.dtype} {tuple(a.shape)} and "
                           f"{b.device.type} {b.dtype} {tuple(b.shape)}")
    return _gated_op(a, b, float(dropout_p))[0]
