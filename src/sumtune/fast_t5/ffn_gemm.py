"""T5's feed-forward GEMMs with the ReLU-dropout in their epilogues (Triton, sumtune.fast_t5.ffn_gemm_kernels): a
candidate, used by the model only where ``USE_IN_MODEL`` says so (``benchmarks/ffn_epilogue.py`` times the kernels,
``benchmarks/train_throughput.py`` the step with the token ``ffngemm``).

Public:
    relu_feed_forward(x, wi_weight, wo_weight, dropout_p) -> Tensor   (autograd: T5DenseActDense's training forward
        with frozen weights, ``wo(dropout(relu(wi(x))))``, the ReLU-dropout in the GEMMs' epilogues)
    weights_in_model(module, x) -> (wi_weight, wo_weight) | None   (what the fast T5 feed-forward passes it, when it
        takes it for ``x``)
    linear_relu_dropout(x, weight, dropout_p, seed=None, tiles=FORWARD_TILES) -> (y, seed)
        ``dropout(relu(x @ weight.T))`` with the draws of ``ffn_dropout.relu_dropout`` for the same seed
    relu_dropout_grad_input(grad_out, weight_out, y, dropout_p, tiles=BACKWARD_TILES) -> Tensor
        ``(grad_out @ weight_out) * (y > 0) / (1 - p)``: the gradient at ``wi``'s output, through ``wo`` and the
        ReLU-dropout whose output was ``y``

Why: in T5-3b the feed-forward's intermediate is 16,384 wide; today ``wi``'s cuBLAS GEMM writes it, the ReLU-dropout
kernel reads it and writes its output (and in the backward reads the gradient and the output and writes the input
gradient): ~5 GB of memory traffic a layer at 32 x 1024 tokens, 37 ms of a 672 ms step in the seed's best profile
(`results/logs/profile_seed_best-2026-12-03-h200.log`: relu_dropout_fwd 2.7%, relu_dropout_bwd 3.1% of kernel time).
In the GEMMs' epilogues that traffic is one write forward and one read of ``y`` backward; whether a Triton GEMM runs
these shapes close enough to cuBLAS to keep the saving is the benchmark's question.
"""

from __future__ import annotations

import torch
from torch import Tensor

import torch.nn.functional as F

from sumtune.fast_t5.attention_inputs import dropout_seed
from sumtune.fast_t5.extras import _CACHE_ATTR
from sumtune.fast_t5.ffn_dropout import draw_threshold, fuses_in_model as kernels_run_in_model

# (BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, num_warps, num_stages); compiled for sm_90 on the CPU at T5-3b shapes: 158 and
# 155 registers, no spill, 96 KiB of shared memory (128 x 256 tiles spill in the Philox epilogue;
# results/ffn_epilogue_compile-2026-12-03-cpu-sm90.json)
FORWARD_TILES = (128, 128, 64, 8, 8, 3)
BACKWARD_TILES = (128, 128, 64, 8, 8, 3)
INTERPRETER_TILES = (16, 32, 16, 2, 4, 1)
USE_IN_MODEL = False  # off until the seed's step measures it faster (train_throughput.py token `ffngemm`)


def _kernels():
    from sumtune.fast_t5 import ffn_gemm_kernels

    return ffn_gemm_kernels


def _grid(rows: int, cols: int, tiles) -> tuple[int]:
    return (-(-rows // tiles[0]) * -(-cols // tiles[1]),)


def _launch_options(tiles) -> dict:
    block_m, block_n, block_k, group_m, num_warps, num_stages = tiles
    return dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, GROUP_M=group_m, num_warps=num_warps,
                num_stages=num_stages)


def linear_relu_dropout(x: Tensor, weight: Tensor, dropout_p: float, seed: Tensor | None = None,
                        tiles=None) -> tuple[Tensor, Tensor]:
    """``dropout(relu(x @ weight.T), dropout_p)`` for x [M, K] and weight [N, K] (N a multiple of 4), and its seed
    (a device tensor; a new draw from torch's generator when not given)."""
    kernels = _kernels()
    tiles = tiles or (INTERPRETER_TILES if kernels.INTERPRET else FORWARD_TILES)
    x, weight = x.contiguous(), weight.contiguous()
    (rows, depth), cols = x.shape, weight.shape[0]
    if weight.shape[1] != depth or cols % 4:
        raise ValueError(f"x {tuple(x.shape)} and weight {tuple(weight.shape)}: need weight [N, K], N % 4 == 0")
    seed = dropout_seed(x, dropout_p) if seed is None else seed
    drop_below, scale = draw_threshold(dropout_p)
    y = torch.empty((rows, cols), device=x.device, dtype=x.dtype)
    kernels.linear_relu_dropout[_grid(rows, cols, tiles)](
        x, weight, y, seed, rows, cols, depth, x.stride(0), weight.stride(0), y.stride(0), drop_below, scale,
        DROPOUT=dropout_p > 0, UPCAST=kernels.INTERPRET, **_launch_options(tiles))
    return y, seed


def relu_dropout_grad_input(grad_out: Tensor, weight_out: Tensor, y: Tensor, dropout_p: float,
                            tiles=None) -> Tensor:
    """``(grad_out @ weight_out) * (y > 0) * scale`` for grad_out [M, K], weight_out [K, N] (``wo``'s weight:
    d_model x d_ff) and y [M, N] (the forward's output)."""
    kernels = _kernels()
    tiles = tiles or (INTERPRETER_TILES if kernels.INTERPRET else BACKWARD_TILES)
    grad_out, weight_out, y = grad_out.contiguous(), weight_out.contiguous(), y.contiguous()
    (rows, depth), cols = grad_out.shape, weight_out.shape[1]
    if weight_out.shape[0] != depth or y.shape != (rows, cols):
        raise ValueError(f"grad_out {tuple(grad_out.shape)}, weight_out {tuple(weight_out.shape)}, y "
                         f"{tuple(y.shape)}: need [M, K], [K, N], [M, N]")
    grad_in = torch.empty_like(y)
    kernels.matmul_relu_dropout_grad[_grid(rows, cols, tiles)](
        grad_out, weight_out, y, grad_in, rows, cols, depth, grad_out.stride(0), weight_out.stride(0), y.stride(0),
        grad_in.stride(0), draw_threshold(dropout_p)[1], UPCAST=kernels.INTERPRET, **_launch_options(tiles))
    return grad_in


def _cached_weight(linear: torch.nn.Module, dtype: torch.dtype) -> Tensor | None:
    """A frozen Linear4bit's dequantized copy (``cache_dequantized_weights``) in ``dtype``, when it has no bias."""
    weight = getattr(linear, _CACHE_ATTR, None)
    if weight is None or weight.dtype != dtype or getattr(linear, "bias", None) is not None:
        return None
    return weight


def weights_in_model(module: torch.nn.Module, x: Tensor) -> tuple[Tensor, Tensor] | None:
    """(wi's, wo's weight) when T5DenseActDense ``module`` takes :func:`relu_feed_forward` for ``x``, else None:
    ``USE_IN_MODEL``, the standalone kernels' conditions (CUDA), and ``wi`` and ``wo`` both frozen 4-bit layers with
    cached weights in x's dtype (no LoRA on them, as with the reference's LoRA on attention's v and o)."""
    if not (USE_IN_MODEL and kernels_run_in_model(x)):
        return None
    wi, wo = _cached_weight(module.wi, x.dtype), _cached_weight(module.wo, x.dtype)
    if wi is None or wo is None or wi.shape[0] % 4:
        return None
    return wi, wo


@torch.library.custom_op("sumtune::relu_feed_forward", mutates_args=())
def _relu_feed_forward_op(x: Tensor, wi_weight: Tensor, wo_weight: Tensor, dropout_p: float
                          ) -> tuple[Tensor, Tensor]:
    y, _ = linear_relu_dropout(x, wi_weight, dropout_p)
    return F.linear(y, wo_weight), y


@_relu_feed_forward_op.register_fake
def _(x, wi_weight, wo_weight, dropout_p):
    rows = x.shape[0]
    return x.new_empty((rows, wo_weight.shape[0])), x.new_empty((rows, wi_weight.shape[0]))


@torch.library.custom_op("sumtune::relu_feed_forward_backward", mutates_args=())
def _relu_feed_forward_backward_op(grad_out: Tensor, wi_weight: Tensor, wo_weight: Tensor, y: Tensor,
                                   dropout_p: float) -> Tensor:
    return relu_dropout_grad_input(grad_out, wo_weight, y, dropout_p) @ wi_weight


@_relu_feed_forward_backward_op.register_fake
def _(grad_out, wi_weight, wo_weight, y, dropout_p):
    return grad_out.new_empty((grad_out.shape[0], wi_weight.shape[1]))


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(inputs[1], inputs[2], output[1])  # y only (what wo's input would keep anyway)
    ctx.dropout_p = inputs[3]


def _backward(ctx, grad_out, _grad_y):
    wi_weight, wo_weight, y = ctx.saved_tensors
    grad_x = _relu_feed_forward_backward_op(grad_out.contiguous(), wi_weight, wo_weight, y, ctx.dropout_p)
    return grad_x, None, None, None


_relu_feed_forward_op.register_autograd(_backward, setup_context=_setup_context)


def relu_feed_forward(x: Tensor, wi_weight: Tensor, wo_weight: Tensor, dropout_p: float) -> Tensor:
    """``dropout(relu(x @ wi_weight.T)) @ wo_weight.T`` for x [..., d_model] with frozen weights (no weight
    gradients): forward, one epilogue GEMM and one cuBLAS GEMM; backward, one epilogue GEMM and one cuBLAS GEMM."""
    lead = x.shape[:-1]
    out, _ = _relu_feed_forward_op(x.reshape(-1, x.shape[-1]), wi_weight, wo_weight, float(dropout_p))
    return out.view(*lead, out.shape[-1])
