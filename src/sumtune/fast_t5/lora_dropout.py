"""A LoRA layer's input dropout regenerated from a seed instead of kept (sumtune.fast_t5.lora4bit's fused node).

Public:
    can_run(x2d, weight_a, dropout_p, out_features) -> bool   (whether the kernels take this call: the lever on, ...)
    low_rank(x2d, weight_a, seed, dropout_p) -> Tensor            ((x ∘ keep / (1 - p)) Aᵀ, [M, r], x's dtype)
    low_rank_backward(x2d, weight_a, grad_low, seed, dropout_p, grad_x) -> Tensor   (dA in fp32; dx += ... in place)
    keep_mask(seed, n_rows, n_cols, dropout_p, device) -> bool Tensor             (the mask a seed gives: tests)

Why: the seed's LoRA (r=32 on v and o, dropout 0.05) runs ``native_dropout`` on each adapted layer's input, which
writes the dropped copy and a byte mask and keeps both for the backward; the backward then writes (g A), reads it
with the mask into a third tensor and adds that to dx. For o's 4096-wide input that is ~22 bytes an element moved
over forward and backward, and 3 bytes an element kept (T5-3b at 16 x 1024/128: ~2.9 G elements a step, ~8.6 GB of
activations). Here the forward reads x once for the low-rank product and keeps nothing but x (which the layer's
caller holds anyway) and an 8-byte seed; the backward reads x and dx and writes dx once: ~8 bytes an element.
The draws are feed-forward dropout's (sumtune.fast_t5.ffn_kernels), keyed by a seed drawn on the device (no host
sync; CUDA graphs draw a new one per replay; checkpointing's RNG restore draws the same one again).

On (``LORA_DROPOUT_KERNEL``; benchmark token ``noloradrop``: off). Measured on an H100 (2026-12-06, sessions 44
and 45): the seed's step at micro-batch 16 at the same speed (47.13 vs 47.09, 47.27 vs 47.38 samples/s) in 5.6-7.1
GiB less memory, and at micro-batch 24 (not run without it) 47.89 (67.2 GiB)
(results/train_throughput-2026-12-06-h100-80gb-hbm3-seed-{ws-loradrop,loradrop-b24}.json); the shipped config
with the reference's LoRA dropout 0.05 back 37.26 against 34.93 samples/s, `--batch-size auto` choosing micro-batch
16 x 2 instead of 8 x 4 (…-hbm3-shipped-ldrop5.json). Numerics against float64 equal or closer
(results/lora_dropout-2026-12-06-h100-80gb-hbm3.json).
"""

from __future__ import annotations

import functools
import importlib.util

import torch
from torch import Tensor

from sumtune.fast_t5.attention_inputs import dropout_threshold
from sumtune.fast_t5.ffn_dropout import DRAW_RANGE, relu_dropout_keep_mask

LORA_DROPOUT_KERNEL = True
# Layers whose input is narrower than their output (T5's v, wi) keep native_dropout unless this is set: one layer
# alone on an H100 (results/lora_dropout-2026-12-06-h100-80gb-hbm3.json), v (1024 -> 4096) ran 0.96 vs 0.79 ms
# with the kernels, o (4096 -> 1024) 0.89 vs 0.99; o keeps 4x the bytes v does, so most of the memory saved stays.
NARROW_INPUTS = False
# The backward's keep flags for the dx update through a scratch tile a program (a store, a block barrier, a load in
# the MMA layout) instead of drawn a second time: Triton's sm_90 build draws Philox in both layouts otherwise. Built
# (Triton 3.6, 64 x 64 x 8): the loop 651 instead of 857 instructions, 20 instead of 38 `tt.mulhiui`, 89 registers
# instead of 174 (results/kernel_builds-2026-12-06-cpu-sm90.json), though the block barrier ends Triton's cp.async
# pipelining of x and dx. On an H100 (session 46): one layer 1.70 vs 1.92 ms (1024 -> 4096) and 1.71 vs 1.91
# (4096 -> 1024) (results/lora_dropout-2026-12-06-h100-80gb-hbm3-ldscratch.json); the seed's step at b24 48.5 vs
# 48.1 and 48.7 vs 48.2 samples/s in two runs (train_throughput-…-seed-ldscratch{,-2}.json); its GPU test passed.
# On since then; benchmark token `noldscratch`: drawn twice.
MASK_SCRATCH = True
# float32 only in the interpreter (the tests' exact comparisons): compiled, tl.dot would take TF32 where torch's
# float32 matmuls do not, and IEEE float32 dots spill (3.4 KB at the backward's tile), so float32 training keeps
# torch's ops.
SUPPORTED_DTYPES = (torch.bfloat16, torch.float16)
INTERPRETER_DTYPES = (*SUPPORTED_DTYPES, torch.float32)
MAX_RANK = 128
# (BLOCK_M, BLOCK_K, warps, stages). sm_90 builds (Triton 3.6, r=32): the forward 139 registers; the backward at
# 64 x 128 x 8 254, at 64 x 64 x 8 170, at 32 x 64 x 4 136, none spilling. benchmarks/lora_dropout.py times them.
FORWARD_TILE = (64, 128, 4, 3)
BACKWARD_TILE = (64, 64, 8, 3)
# Triton's CPU interpreter is ~10x slower than torch's ops (ffn_dropout.fuses_in_model): CPU runs keep native_dropout
# unless a test sets this.
ON_CPU_IN_INTERPRETER = False
PROGRAMS_PER_SM = 4  # the backward splits its rows until the grid fills the GPU about this many times


def _kernels():
    from sumtune.fast_t5 import lora_dropout_kernels

    return lora_dropout_kernels


def can_run(x2d: Tensor, weight_a: Tensor, dropout_p: float, out_features: int) -> bool:
    """Whether :func:`low_rank` takes this layer call: dropout, the lever on, an input at least as wide as the
    output (unless NARROW_INPUTS), Triton present, a bf16/fp16 CUDA tensor (or Triton's interpreter with
    ON_CPU_IN_INTERPRETER, fp32 too), an input width that is a multiple of 4 and a rank up to MAX_RANK."""
    if not (LORA_DROPOUT_KERNEL and dropout_p > 0) or importlib.util.find_spec("triton") is None:
        return False
    if x2d.dim() == 2 and x2d.shape[1] < out_features and not NARROW_INPUTS:
        return False
    if weight_a.dtype != x2d.dtype or x2d.dim() != 2 or x2d.shape[1] % 4 or weight_a.shape[0] > MAX_RANK:
        return False
    if x2d.shape[0] == 0:
        return False
    if x2d.device.type == "cuda":
        return x2d.dtype in SUPPORTED_DTYPES
    return ON_CPU_IN_INTERPRETER and _kernels().INTERPRET and x2d.dtype in INTERPRETER_DTYPES


def _rank_block(rank: int) -> int:
    return max(16, 1 << (rank - 1).bit_length())  # tl.dot's operands: a power of two, at least 16


def _index_64(x2d: Tensor) -> bool:
    """Whether the draws' counters need int64 (row and tile padding included)."""
    return (x2d.shape[0] + 256) * x2d.shape[1] >= 2**31


def _threshold(dropout_p: float) -> tuple[int, float]:
    return dropout_threshold(dropout_p, DRAW_RANGE)


def low_rank(x2d: Tensor, weight_a: Tensor, seed: Tensor, dropout_p: float) -> Tensor:
    """``(x ∘ keep / (1 - p)) Aᵀ`` for x [M, K] and A [r, K], keep from ``seed``; [M, r] in x's dtype."""
    n_rows, n_cols = x2d.shape
    rank = weight_a.shape[0]
    out = x2d.new_empty((n_rows, rank))
    drop_below, scale = _threshold(dropout_p)
    block_m, block_k, warps, stages = FORWARD_TILE
    _kernels().low_rank_fwd[(_cdiv(n_rows, block_m),)](
        x2d, weight_a, out, seed, n_rows, rank, *x2d.stride(), *weight_a.stride(), *out.stride(), drop_below, scale,
        n_cols=n_cols, RANK=_rank_block(rank), BLOCK_M=block_m, BLOCK_K=block_k, UPCAST=_kernels().INTERPRET,
        INDEX_64=_index_64(x2d), num_warps=warps, num_stages=stages)
    return out


def low_rank_backward(x2d: Tensor, weight_a: Tensor, grad_low: Tensor, seed: Tensor, dropout_p: float,
                      grad_x: Tensor | None) -> Tensor:
    """dA = gᵀ (x ∘ keep / (1 - p)) [r, K] in fp32, and with ``grad_x`` [M, K] ``grad_x += (g A) ∘ keep / (1 - p)``
    in place; g = ``grad_low`` [M, r], the gradient of the low-rank product."""
    n_rows, n_cols = x2d.shape
    rank = weight_a.shape[0]
    rank_block = _rank_block(rank)
    block_m, block_k, warps, stages = BACKWARD_TILE
    col_blocks = _cdiv(n_cols, block_k)
    tiles_per_split = split_tiles(_cdiv(n_rows, block_m), col_blocks, x2d.device)
    splits = _cdiv(_cdiv(n_rows, block_m), tiles_per_split)
    parts = torch.empty((splits, rank_block, n_cols), dtype=torch.float32, device=x2d.device)
    drop_below, scale = _threshold(dropout_p)
    dx = grad_x if grad_x is not None else x2d  # not read without UPDATE_DX
    scratch = grad_x is not None and MASK_SCRATCH
    flags = (torch.empty((col_blocks * splits, block_m * block_k), dtype=torch.int8, device=x2d.device) if scratch
             else parts)  # not read without MASK_SCRATCH
    _kernels().low_rank_bwd[(col_blocks, splits)](
        x2d, weight_a, grad_low, dx, parts, seed, n_rows, n_cols, rank, *x2d.stride(), *weight_a.stride(),
        *grad_low.stride(), *dx.stride(), drop_below, scale, TILES_PER_SPLIT=tiles_per_split, RANK=rank_block,
        BLOCK_M=block_m, BLOCK_K=block_k, UPDATE_DX=grad_x is not None, UPCAST=_kernels().INTERPRET,
        INDEX_64=_index_64(x2d), SCRATCH=flags, MASK_SCRATCH=scratch, num_warps=warps, num_stages=stages)
    return parts[:, :rank].sum(dim=0)


def split_tiles(row_tiles: int, col_blocks: int, device: torch.device) -> int:
    """Row tiles a backward program loops over: the largest power of two that still gives a grid of about
    PROGRAMS_PER_SM programs an SM (a power of two, so a model's calls build a few variants; every tile in one
    program under the interpreter, where programs run one after another)."""
    if device.type != "cuda":
        return 1 << (row_tiles - 1).bit_length()
    wanted = PROGRAMS_PER_SM * _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    splits = max(1, _cdiv(wanted, col_blocks))
    return 1 << max(0, (row_tiles // splits).bit_length() - 1)  # rounded down: at least `splits` programs


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def keep_mask(seed: Tensor | int, n_rows: int, n_cols: int, dropout_p: float, device="cuda") -> Tensor:
    """[n_rows, n_cols] bool: True where the kernels keep an element of an [n_rows, n_cols] input for ``seed``:
    feed-forward dropout's mask of as many elements, row after row."""
    return relu_dropout_keep_mask(seed, n_rows * n_cols, dropout_p, device).view(n_rows, n_cols)
