"""Triton kernels for a LoRA layer's input dropout regenerated from a seed (sumtune.fast_t5.lora_dropout).

Imported lazily: importing it decorates the kernels (under ``TRITON_INTERPRET=1`` they run on CPU tensors).

The keep decision of element (m, k) of the layer's input x [M, K] is feed-forward dropout's
(sumtune.fast_t5.ffn_kernels): a 31-bit draw >= drop_below, word e % 4 of ``randint4x(seed, e // 4)`` for the
element index e = m K + k (K a multiple of 4, so a row's words start at a counter).

* ``low_rank_fwd``: ``low = (x ∘ keep · scale) Aᵀ`` [M, r], a program per BLOCK_M rows looping over K (a
  constexpr: a model has a few widths). The dropped input is rounded to x's dtype before the product, as
  ``native_dropout`` then a GEMM round it.
* ``low_rank_bwd``: a program per (BLOCK_K columns, TILES_PER_SPLIT row tiles, a power of two so that a model's
  calls build a few variants): ``dA_part[split] = gᵀ (x ∘ keep · scale)`` [r, BLOCK_K] in fp32 over its rows
  (summed over the splits afterwards: deterministic, no atomics) and, with UPDATE_DX, ``dx += (g A) ∘ keep · scale``
  in place, g = s · dy B [M, r]. One read of x and of dx and one write of
  dx an element: no dropped copy or mask kept from the forward, no (g A) tensor. With MASK_SCRATCH the keep flags
  reach the dx update through a 4 KiB scratch tile a program (``_through_scratch``) instead of a second draw.
"""

from __future__ import annotations

import triton
import triton.language as tl

from sumtune.triton_compat import fix_interpreter_for_numpy_2_4
from sumtune.triton_compat import interpreter_safe_dot as _dot

INTERPRET = bool(triton.knobs.runtime.interpret)

if INTERPRET:
    fix_interpreter_for_numpy_2_4()


@triton.jit
def _keep_scale(seed, rows, k0, n_cols, drop_below, scale, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
                INDEX_64: tl.constexpr):
    """[BLOCK_M, BLOCK_K] fp32: ``scale`` where element (row, k0 + j) is kept, else 0. The counters in int32 unless
    INDEX_64 (an input of 2^31 elements or more): the same draws (randint4x's high word is 0 either way), less
    integer work."""
    if INDEX_64:
        counters = (rows.to(tl.int64)[:, None] * n_cols + k0) // 4 + tl.arange(0, BLOCK_K // 4)[None, :]
    else:
        counters = rows[:, None] * (n_cols // 4) + (k0 // 4 + tl.arange(0, BLOCK_K // 4))[None, :]
    r0, r1, r2, r3 = tl.randint4x(seed, counters)
    words = tl.reshape(tl.join(tl.join(r0, r2), tl.join(r1, r3)), (BLOCK_M, BLOCK_K))  # element 4c + w <- word w
    return tl.where((words >> 1).to(tl.int32) >= drop_below, scale, 0.0)


@triton.jit
def _through_scratch(SCRATCH, flags, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """``flags`` [BLOCK_M, BLOCK_K] stored to this program's tile of SCRATCH and loaded back. Why: the backward
    needs the keep flags in x's layout (x ∘ keep for dA) and in the MMA layout of (g A); given the draws twice,
    Triton's sm_90 build computes the Philox rounds in both layouts (38 `tt.mulhiui` against 20:
    results/kernel_builds-2026-12-06-cpu-sm90.json). Through memory the
    rounds run once and the load takes whatever layout its use wants. The barriers: every thread's flags stored
    before any is read, and all read before the next tile's store."""
    program = tl.program_id(1) * tl.num_programs(0) + tl.program_id(0)
    ptrs = (SCRATCH + program.to(tl.int64) * (BLOCK_M * BLOCK_K) + tl.arange(0, BLOCK_M)[:, None] * BLOCK_K
            + tl.arange(0, BLOCK_K)[None, :])
    tl.store(ptrs, flags)
    tl.debug_barrier()
    loaded = tl.load(ptrs)
    tl.debug_barrier()
    return loaded


@triton.jit
def low_rank_fwd(X, A, LOW, SEED, n_rows, rank, stride_xm, stride_xk, stride_ar, stride_ak, stride_lm, stride_lr,
                 drop_below, scale, n_cols: tl.constexpr, RANK: tl.constexpr, BLOCK_M: tl.constexpr,
                 BLOCK_K: tl.constexpr, UPCAST: tl.constexpr, INDEX_64: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    ranks = tl.arange(0, RANK)
    row_in = rows < n_rows
    seed = tl.load(SEED)
    acc = tl.zeros((BLOCK_M, RANK), dtype=tl.float32)
    for k0 in range(0, n_cols, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        col_in = cols < n_cols
        x = tl.load(X + rows[:, None].to(tl.int64) * stride_xm + cols[None, :] * stride_xk,
                    mask=row_in[:, None] & col_in[None, :], other=0.0)
        keep_scale = _keep_scale(seed, rows, k0, n_cols, drop_below, scale, BLOCK_M, BLOCK_K, INDEX_64)
        dropped = x.to(tl.float32) * keep_scale
        a_t = tl.load(A + ranks[None, :] * stride_ar + cols[:, None] * stride_ak,
                      mask=col_in[:, None] & (ranks < rank)[None, :], other=0.0)  # [BLOCK_K, RANK] = Aᵀ's tile
        acc = _dot(dropped.to(X.dtype.element_ty), a_t, UPCAST, acc)
    tl.store(LOW + rows[:, None].to(tl.int64) * stride_lm + ranks[None, :] * stride_lr, acc.to(LOW.dtype.element_ty),
             mask=row_in[:, None] & (ranks < rank)[None, :])


@triton.jit
def low_rank_bwd(X, A, G, DX, DA_PART, SEED, n_rows, n_cols, rank, stride_xm, stride_xk, stride_ar, stride_ak,
                 stride_gm, stride_gr, stride_dm, stride_dk, drop_below, scale, TILES_PER_SPLIT: tl.constexpr,
                 RANK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, UPDATE_DX: tl.constexpr,
                 UPCAST: tl.constexpr, INDEX_64: tl.constexpr, SCRATCH=None, MASK_SCRATCH: tl.constexpr = False):
    k0 = tl.program_id(0) * BLOCK_K
    cols = k0 + tl.arange(0, BLOCK_K)
    split = tl.program_id(1)
    ranks = tl.arange(0, RANK)
    col_in = cols < n_cols
    rank_in = ranks < rank
    seed = tl.load(SEED)
    a = tl.load(A + ranks[:, None] * stride_ar + cols[None, :] * stride_ak, mask=rank_in[:, None] & col_in[None, :],
                other=0.0)  # [RANK, BLOCK_K]
    acc = tl.zeros((RANK, BLOCK_K), dtype=tl.float32)
    for tile in range(TILES_PER_SPLIT):
        rows = (split * TILES_PER_SPLIT + tile) * BLOCK_M + tl.arange(0, BLOCK_M)
        row_in = rows < n_rows
        in_tile = row_in[:, None] & col_in[None, :]
        g = tl.load(G + rows[:, None].to(tl.int64) * stride_gm + ranks[None, :] * stride_gr,
                    mask=row_in[:, None] & rank_in[None, :], other=0.0)  # [BLOCK_M, RANK]
        keep_scale = _keep_scale(seed, rows, k0, n_cols, drop_below, scale, BLOCK_M, BLOCK_K, INDEX_64)
        x = tl.load(X + rows[:, None].to(tl.int64) * stride_xm + cols[None, :] * stride_xk, mask=in_tile, other=0.0)
        dropped = (x.to(tl.float32) * keep_scale).to(X.dtype.element_ty)
        acc = _dot(tl.trans(g), dropped, UPCAST, acc)
        if UPDATE_DX:
            dx_ptrs = DX + rows[:, None].to(tl.int64) * stride_dm + cols[None, :] * stride_dk
            dx = tl.load(dx_ptrs, mask=in_tile, other=0.0).to(tl.float32)
            if MASK_SCRATCH:  # the keep flags through the program's own scratch tile, in the dot's layout
                flags = _through_scratch(SCRATCH, (keep_scale != 0).to(tl.int8), BLOCK_M, BLOCK_K)
                dx += tl.where(flags != 0, _dot(g, a, UPCAST) * scale, 0.0)
            else:
                dx += _dot(g, a, UPCAST) * keep_scale
            tl.store(dx_ptrs, dx.to(DX.dtype.element_ty), mask=in_tile)
    tl.store(DA_PART + split.to(tl.int64) * RANK * n_cols + ranks[:, None] * n_cols + cols[None, :], acc,
             mask=col_in[None, :])

