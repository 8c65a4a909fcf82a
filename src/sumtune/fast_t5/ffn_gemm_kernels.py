"""Triton GEMMs for T5's feed-forward with ReLU and dropout in their epilogues (sumtune.fast_t5.ffn_gemm).

Imported lazily: importing it decorates the kernels (under ``TRITON_INTERPRET=1`` they run on CPU tensors).

* ``linear_relu_dropout``: ``Y = relu(X . W^T) * keep * scale`` from the fp32 accumulator, stored in Y's dtype.
  ``keep`` is the draw of ``ffn_kernels._counter_draws`` for the element's flat index ``m * N + n`` (Philox-4x32,
  counter = index // 4, word = index % 4, 31-bit, kept where >= drop_below): the same decisions as the standalone
  ReLU-dropout kernel for the same seed.
* ``matmul_relu_dropout_grad``: ``DX = (G . W) * (Y > 0) * scale``: the gradient reaching ``wi``'s output through
  ``wo`` (weight W [N_out=K, N]) and the ReLU-dropout, whose output Y is > 0 exactly where the input was and the
  element kept.
Tiles: grouped program order (GROUP_M row tiles share a column tile while it is in L2), K in BLOCK_K steps.
"""

from __future__ import annotations

import triton
import triton.language as tl

from sumtune.fast_t5.ffn_kernels import _counter_draws
from sumtune.triton_compat import fix_interpreter_for_numpy_2_4
from sumtune.triton_compat import interpreter_safe_dot as _dot

INTERPRET = bool(triton.knobs.runtime.interpret)
if INTERPRET:
    fix_interpreter_for_numpy_2_4()


@triton.jit
def _tile(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(row tile, column tile) of this program in grouped order."""
    pid = tl.program_id(0)
    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * tiles_n
    group = pid // per_group
    first_m = group * GROUP_M
    group_m = tl.minimum(tiles_m - first_m, GROUP_M)
    return first_m + (pid % per_group) % group_m, (pid % per_group) // group_m


@triton.jit
def _product(a_ptrs, b_ptrs, in_m, in_n, offs_k, K, b_step, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
             BLOCK_K: tl.constexpr, UPCAST: tl.constexpr):
    """fp32 (BLOCK_M, BLOCK_N) tile of A . B over K from (BLOCK_M, BLOCK_K) A and (BLOCK_K, BLOCK_N) B pointer tiles
    (A's K unit-strided; B's K step ``b_step`` elements); rows, columns and the depth past their ends read as 0."""
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, K, BLOCK_K):
        a = tl.load(a_ptrs, mask=in_m[:, None] & (offs_k[None, :] < K - k), other=0.0)
        b = tl.load(b_ptrs, mask=in_n[None, :] & (offs_k[:, None] < K - k), other=0.0)
        acc = _dot(a, b, UPCAST, acc)
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K * b_step
    return acc


@triton.jit
def _tile_draws(seed, offs_m, start_n, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """31-bit draws of a (BLOCK_M, BLOCK_N) tile: element (m, n) gets word (m * N + n) % 4 of counter // 4."""
    cols = start_n + 4 * tl.arange(0, BLOCK_N // 4)
    counters = (offs_m[:, None].to(tl.int64) * N + cols[None, :]) // 4
    return tl.reshape(_counter_draws(seed, counters), (BLOCK_M, BLOCK_N))


@triton.jit
def linear_relu_dropout(X, W, Y, SEED, M, N, K, stride_xm, stride_wn, stride_ym, drop_below, scale,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
                        DROPOUT: tl.constexpr, UPCAST: tl.constexpr):
    tile_m, tile_n = _tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = tile_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tile_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    x_ptrs = X + offs_m[:, None].to(tl.int64) * stride_xm + offs_k[None, :]
    w_ptrs = W + offs_n[None, :].to(tl.int64) * stride_wn + offs_k[:, None]  # W^T tile (K, N)
    acc = _product(x_ptrs, w_ptrs, offs_m < M, offs_n < N, offs_k, K, 1, BLOCK_M, BLOCK_N, BLOCK_K, UPCAST)
    y = tl.maximum(acc, 0.0, propagate_nan=tl.PropagateNan.ALL)
    if DROPOUT:
        keep = _tile_draws(tl.load(SEED), offs_m, tile_n * BLOCK_N, N, BLOCK_M, BLOCK_N) >= drop_below
        y = y * tl.where(keep, scale, 0.0)
    in_bounds = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    tl.store(Y + offs_m[:, None].to(tl.int64) * stride_ym + offs_n[None, :], y.to(Y.dtype.element_ty), mask=in_bounds)


@triton.jit
def matmul_relu_dropout_grad(G, W, Y, DX, M, N, K, stride_gm, stride_wk, stride_ym, stride_dxm, scale,
                             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                             GROUP_M: tl.constexpr, UPCAST: tl.constexpr):
    tile_m, tile_n = _tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = tile_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tile_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    g_ptrs = G + offs_m[:, None].to(tl.int64) * stride_gm + offs_k[None, :]
    w_ptrs = W + offs_k[:, None].to(tl.int64) * stride_wk + offs_n[None, :]  # W tile (K, N), rows of wo's weight
    acc = _product(g_ptrs, w_ptrs, offs_m < M, offs_n < N, offs_k, K, stride_wk, BLOCK_M, BLOCK_N, BLOCK_K, UPCAST)
    in_bounds = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    y = tl.load(Y + offs_m[:, None].to(tl.int64) * stride_ym + offs_n[None, :], mask=in_bounds, other=0.0)
    dx = acc * tl.where(y > 0, scale, 0.0)
    tl.store(DX + offs_m[:, None].to(tl.int64) * stride_dxm + offs_n[None, :], dx.to(DX.dtype.element_ty),
             mask=in_bounds)
