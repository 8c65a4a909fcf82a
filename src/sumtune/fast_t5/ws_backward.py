"""T5 attention's dK/dV backward, warp-specialized on Hopper (FlashAttention-3's backward structure, in Gluon).

`sumtune.fast_t5.flash_attention.WS_BACKWARD` (token `wsbwd`) sends the dK/dV launches this kernel covers
(`covers`: the encoder's self-attention in training: bf16, head_dim 128, not causal, T5's bias with a radius the band
holds, dS stored for the dQ GEMM) here instead of to `flash_kernels_bwd.t5_flash_attention_bwd_dkdv`. Off: its GPU
test passes, but at 32x32x1024x128 on an H100 the backward ran 5.04 vs 4.69 ms
(results/attention_kernels-2026-12-06-h100-80gb-hbm3-wstrain.json).

A program takes 128 keys of one (batch, head); one producer warp loads them (K and V, once) and then each
BLOCK_M-query tile of Q and dO by TMA into rings (a slot's Q and dO freed by one arrive of each consumer: Triton 3.6
lowers every arrive as a warpgroup barrier plus one thread's arrive); two consumer warpgroups of 64 keys each run,
per query tile, keys first:

    Sᵀ  = K Qᵀ,  dPᵀ = V dOᵀ                 (warpgroup MMAs, both operands in shared memory)
    Pᵀ  = exp2(Sᵀ · scale + biasᵀ - lse)      (masked keys and queries past Lq: 0)
    dV += (Pᵀ ∘ keep) dO,  dSᵀ = Pᵀ ∘ (dPᵀ ∘ keep - delta · (1 - p)),  dK += dSᵀ Q   (A operands in registers)

and store dSᵀ for the dQ GEMM (`flash_attention._dq_from_ds`). Dropout's scale is folded as the Triton kernel's
LEAN_TILES build folds it (`FOLD_DROP`): dK and dV take it once at the end, the stored dS leaves it to the GEMM. The
keep mask is the Triton kernels' paired draws in this (keys, queries) layout (`_keep_pairs_keys_first`), so forward
and backward drop the same elements. Gluon has no interpreter: `compile_for_sm90` builds it on any machine (a CPU
test), a GPU test compares its gradients with the Triton backward's.
"""

from __future__ import annotations

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import fence_async_shared, mbarrier, tma, warpgroup_mma
from triton.experimental.gluon.language.nvidia.hopper import warpgroup_mma_wait

from sumtune.fast_t5.ws_forward import (BOX_COLUMNS, CONSUMER_REGISTERS, LAUNCH_REGISTERS, _load_tile, _pair_draws,
                                        compile_gluon, covers, rows_descriptor, rows_stride, said_once)

_barrier = getattr(gl, "barrier", None) or gl.thread_barrier  # names that moved between Triton 3.6 and 3.9
_tma_store = getattr(tma, "async_store", None) or tma.async_copy_shared_to_global

KEYS = 64  # a consumer warpgroup's keys (one warpgroup MMA's M); a program takes two
# Queries a tile: 32, not 64, so that Sᵀ, dPᵀ and P (16 registers each instead of 32) fit beside dK and dV's 128
# accumulator registers with dropout's draws (m64n64 tiles spilled 610 bytes in the loop:
# results/ws_kernels_compile-2026-12-05-cpu-sm90.json).
BLOCK_M = 32
STAGES = 3  # slots in the Q and dO rings (123 KiB of shared memory in all)
_KEYS = gl.constexpr(KEYS)


@gluon.jit
def _producer(q_desc, do_desc, k_desc, v_desc, k_bufs, v_bufs, q_ring, do_ring, kv_bar, q_ready, q_empty, do_ready,
              q_row0, kv_row0, col, n_tiles):
    keys: gl.constexpr = k_bufs.type.shape[1]
    block_m: gl.constexpr = q_ring.type.shape[1]
    stages: gl.constexpr = q_ring.type.shape[0]
    for c in gl.static_range(2):  # both consumers' keys and values, once, on one barrier
        _load_tile(k_desc, kv_row0 + c * keys, col, kv_bar, k_bufs.index(c))
    for c in gl.static_range(2):
        _load_tile(v_desc, kv_row0 + c * keys, col, kv_bar, v_bufs.index(c))
    for i in range(n_tiles):
        slot = i % stages
        phase = ((i // stages) & 1) ^ 1  # a fresh barrier's previous phase counts as complete
        mbarrier.wait(q_empty.index(slot), phase)  # the slot's Q and dO, freed together
        _load_tile(q_desc, q_row0 + i * block_m, col, q_ready.index(slot), q_ring.index(slot))
        _load_tile(do_desc, q_row0 + i * block_m, col, do_ready.index(slot), do_ring.index(slot))


@gluon.jit
def _keep_pairs_keys_first(seed, stream, kn, start_m, n_cols, drop_below, KEYS: gl.constexpr,
                           QUERIES: gl.constexpr, s_layout: gl.constexpr):
    """The (KEYS, QUERIES) keep mask of keys kn.. and queries start_m.. in ``s_layout``: `dropout_draws._keep_pairs`
    with KEYS_FIRST, laid out as `ws_forward._keep_pairs` lays the queries-first mask (asserted trivial)."""
    gl.static_assert(KEYS == 64 and (QUERIES == 64 or QUERIES == 32), "a 4-warp m64n64 or m64n32 accumulator")
    # An accumulator element (r, c) of m64nN: register bits c + 1, +8 row, c + 8, 16, (32); lane bits c + 2, 4,
    # r + 1, 2, 4; warp bits r + 16, 32. The call of (r, c) with r % 16 < 8 and c % 16 < 8 sits where it does.
    if QUERIES == 64:
        calls: gl.constexpr = gl.DistributedLinearLayout(
            reg_bases=[[0, 1], [0, 8], [0, 16]], lane_bases=[[0, 2], [0, 4], [1, 0], [2, 0], [4, 0]],
            warp_bases=[[8, 0], [16, 0]], block_bases=[], shape=[KEYS // 2, QUERIES // 2])
    else:
        calls: gl.constexpr = gl.DistributedLinearLayout(
            reg_bases=[[0, 1], [0, 8]], lane_bases=[[0, 2], [0, 4], [1, 0], [2, 0], [4, 0]],
            warp_bases=[[8, 0], [16, 0]], block_bases=[], shape=[KEYS // 2, QUERIES // 2])
    key_cols = kn // 2 + gl.arange(0, KEYS // 2, layout=gl.SliceLayout(1, calls))  # counter column: 8 per 16 keys
    query_rows = start_m // 2 + gl.arange(0, QUERIES // 2, layout=gl.SliceLayout(0, calls))  # row: 8 per 16 queries
    # (query r, key c), (r, c + 8): this tile's next row band, (r + 8, c): its next column band, (r + 8, c + 8)
    near, far_key, far_query, far_both = _pair_draws(seed, stream, query_rows[None, :] * n_cols + key_cols[:, None],
                                                     drop_below)
    keep = gl.join(gl.join(near, far_query), gl.join(far_key, far_both))  # (rows, columns, +8 column, +8 row)
    keep = gl.reshape(keep, (KEYS // 16, 8, QUERIES // 16, 8, 2, 2))
    keep = gl.permute(keep, (0, 5, 1, 2, 4, 3))
    return gl.convert_layout(gl.reshape(keep, (KEYS, QUERIES)), s_layout, assert_trivial=True)


@gluon.jit
def _store_ds(ds_desc, ds_smem, ds_t, row, col):
    """A (keys, queries) tile of dSᵀ to [row, col] of the dS buffer by TMA, through this consumer's shared tile (no
    per-element addresses in registers)."""
    tma.store_wait(0)  # the previous tile's store has read the shared tile
    _barrier()  # inside a partition: its own warps only
    ds_smem.store(ds_t)
    fence_async_shared()
    _barrier()
    _tma_store(ds_desc, [row, col], ds_smem)


@gluon.jit
def _consumer(which: gl.constexpr, k_bufs, v_bufs, q_ring, do_ring, kv_bar, q_ready, q_empty, do_ready,
              ds_bufs, ds_desc, ds_row0, DK, DV, LSE, DELTA, TABLE, BAND, KMASK, SEED, start_n, n_tiles, b, h, bh, Lq,
              Lk, kv_len, R, table_row, table_zero, band_head, band_w, qk_scale, scale, drop_below, drop_scale,
              stride_dkb, stride_dkh, stride_dkn, stride_dvb, stride_dvh, stride_dvn, stride_mask_b,
              HAS_KEY_MASK: gl.constexpr, DROPOUT: gl.constexpr):
    keys: gl.constexpr = k_bufs.type.shape[1]
    head_dim: gl.constexpr = k_bufs.type.shape[2]
    block_m: gl.constexpr = q_ring.type.shape[1]
    stages: gl.constexpr = q_ring.type.shape[0]
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, block_m, 16])
    acc_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                         instr_shape=[16, head_dim, 16])
    a_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=acc_layout, k_width=2)
    dtype: gl.constexpr = k_bufs.dtype
    kn = start_n + which * keys
    offs_n = kn + gl.arange(0, keys, layout=gl.SliceLayout(1, s_layout))
    key_ok = offs_n < kv_len
    if HAS_KEY_MASK:
        key_ok = key_ok & (gl.load(KMASK + b.to(gl.int64) * stride_mask_b + offs_n, mask=offs_n < Lk, other=0) != 0)
    TABLE += h * table_row + table_zero  # TABLE[d]: bias at offset d = j - i
    far_left = gl.load(TABLE + gl.maximum(-R, 1 - Lq))  # the bias of every offset <= -R
    far_right = gl.load(TABLE + gl.minimum(R, Lk - 1))  # the bias of every offset >= +R
    band = BAND + h * band_head
    seed = 0
    n_cols = 0
    delta_scale = 1.0
    if DROPOUT:
        seed = gl.load(SEED)
        n_cols = gl.cdiv(Lk, 16) * 8  # dropout_draws._counter_cols with PAIRS
        delta_scale = 1.0 / drop_scale  # FOLD_DROP: P and dP without dropout's scale, delta divided by it
    LSE += bh.to(gl.int64) * Lq
    DELTA += bh.to(gl.int64) * Lq
    ds_smem = ds_bufs.index(which)
    k_smem = k_bufs.index(which)
    v_smem = v_bufs.index(which)
    zero_s = gl.zeros([keys, block_m], gl.float32, layout=s_layout)
    dk = gl.zeros([keys, head_dim], gl.float32, layout=acc_layout)
    dv = gl.zeros([keys, head_dim], gl.float32, layout=acc_layout)
    cols = gl.arange(0, block_m, layout=gl.SliceLayout(0, s_layout))
    rows = gl.arange(0, keys, layout=gl.SliceLayout(1, s_layout))
    mbarrier.wait(kv_bar, 0)
    for i in range(n_tiles):
        slot = i % stages
        phase = (i // stages) & 1
        start_m = i * block_m
        q_tile = q_ring.index(slot)
        do_tile = do_ring.index(slot)
        mbarrier.wait(q_ready.index(slot), phase)
        s_t = warpgroup_mma(k_smem, q_tile.permute((1, 0)), zero_s, use_acc=False, is_async=True)
        offs_m = start_m + cols
        q_ok = offs_m < Lq
        lse = gl.load(LSE + offs_m, mask=q_ok, other=float("inf"))  # small loads while the product runs
        delta = gl.load(DELTA + offs_m, mask=q_ok, other=0.0) * delta_scale
        s_t = warpgroup_mma_wait(num_outstanding=0, deps=(s_t,))
        x = s_t * qk_scale
        if start_m - (kn + keys - 1) >= R:  # every offset j - i <= -R: far left
            x = x + far_left
        elif kn - (start_m + block_m - 1) >= R:  # every offset >= +R: far right
            x = x + far_right
        else:  # rows 0..keys-1 of the transposed band from column start_m - kn (band_zero folded into ``band``)
            x = x + gl.load(band + (start_m - kn) + rows[:, None] * band_w + cols[None, :])
        live = key_ok[:, None] & q_ok[None, :]  # keys masked or past the row, queries past Lq: no probability
        p_t = gl.exp2(gl.where(live, x, float("-inf")) - lse[None, :])
        # the keep mask before dPᵀ's accumulator takes its registers (drawn beside it, they spill)
        if DROPOUT:
            kept = _keep_pairs_keys_first(seed, bh.to(gl.int32), kn, start_m, n_cols, drop_below, keys, block_m,
                                          s_layout)
            pd_t = gl.where(kept, p_t, 0.0).to(dtype)
        else:
            pd_t = p_t.to(dtype)
        mbarrier.wait(do_ready.index(slot), phase)
        dp_t = warpgroup_mma(v_smem, do_tile.permute((1, 0)), zero_s, use_acc=False, is_async=True)
        pd_op = gl.convert_layout(pd_t, a_layout)  # kept live until its MMA is waited for (deps below)
        dv = warpgroup_mma(pd_op, do_tile, dv, is_async=True)
        dp_t = warpgroup_mma_wait(num_outstanding=1, deps=(dp_t,))  # dPᵀ done; P·dO may run on
        if DROPOUT:  # a dropped element has pd 0 (a kept one too only where p is 0, and then dS is 0 either way)
            dp_t = gl.where(pd_t != 0.0, dp_t, 0.0)
        ds_t = (p_t * (dp_t - delta[None, :])).to(dtype)
        ds_op = gl.convert_layout(ds_t, a_layout)
        dk = warpgroup_mma(ds_op, q_tile, dk, is_async=True)
        _store_ds(ds_desc, ds_smem, ds_t, ds_row0 + which * keys, start_m)  # its buffer is padded to 128-tiles
        dv, dk, pd_op, ds_op = warpgroup_mma_wait(num_outstanding=0, deps=(dv, dk, pd_op, ds_op))
        # one arrive frees the slot's Q and dO (Triton 3.6 lowers each arrive as a warpgroup barrier + one thread's)
        mbarrier.arrive(q_empty.index(slot), count=1)
    if n_tiles == 0:  # keys past the row's length: zero gradients, and zeros in dSᵀ for the GEMM
        zeros = gl.zeros([keys, block_m], dtype, layout=s_layout)
        for start_m in range(0, Lq, block_m):
            _store_ds(ds_desc, ds_smem, zeros, ds_row0 + which * keys, start_m)
    tma.store_wait(0)
    offs_na = kn + gl.arange(0, keys, layout=gl.SliceLayout(1, acc_layout))
    offs_d = gl.arange(0, head_dim, layout=gl.SliceLayout(0, acc_layout))
    in_k = (offs_na < Lk)[:, None]
    gl.store(DK + b.to(gl.int64) * stride_dkb + h * stride_dkh + offs_na.to(gl.int64)[:, None] * stride_dkn
             + offs_d[None, :], (dk * (scale * drop_scale)).to(dtype), mask=in_k)
    gl.store(DV + b.to(gl.int64) * stride_dvb + h * stride_dvh + offs_na.to(gl.int64)[:, None] * stride_dvn
             + offs_d[None, :], (dv * drop_scale).to(dtype), mask=in_k)


@gluon.jit
def _consumer0(k_bufs, v_bufs, q_ring, do_ring, kv_bar, q_ready, q_empty, do_ready, ds_bufs, ds_desc,
               ds_row0, DK, DV, LSE, DELTA, TABLE, BAND, KMASK, SEED, start_n, n_tiles, b, h, bh, Lq, Lk, kv_len, R,
               table_row, table_zero, band_head, band_w, qk_scale, scale, drop_below, drop_scale, stride_dkb,
               stride_dkh, stride_dkn, stride_dvb, stride_dvh, stride_dvn, stride_mask_b, flags):
    _consumer(0, k_bufs, v_bufs, q_ring, do_ring, kv_bar, q_ready, q_empty, do_ready, ds_bufs, ds_desc,
              ds_row0, DK, DV, LSE, DELTA, TABLE, BAND, KMASK, SEED, start_n, n_tiles, b, h, bh, Lq, Lk, kv_len, R,
              table_row, table_zero, band_head, band_w, qk_scale, scale, drop_below, drop_scale, stride_dkb,
              stride_dkh, stride_dkn, stride_dvb, stride_dvh, stride_dvn, stride_mask_b, flags.type.shape[0] > 1,
              flags.type.shape[1] > 1)


@gluon.jit
def _consumer1(k_bufs, v_bufs, q_ring, do_ring, kv_bar, q_ready, q_empty, do_ready, ds_bufs, ds_desc,
               ds_row0, DK, DV, LSE, DELTA, TABLE, BAND, KMASK, SEED, start_n, n_tiles, b, h, bh, Lq, Lk, kv_len, R,
               table_row, table_zero, band_head, band_w, qk_scale, scale, drop_below, drop_scale, stride_dkb,
               stride_dkh, stride_dkn, stride_dvb, stride_dvh, stride_dvn, stride_mask_b, flags):
    _consumer(1, k_bufs, v_bufs, q_ring, do_ring, kv_bar, q_ready, q_empty, do_ready, ds_bufs, ds_desc,
              ds_row0, DK, DV, LSE, DELTA, TABLE, BAND, KMASK, SEED, start_n, n_tiles, b, h, bh, Lq, Lk, kv_len, R,
              table_row, table_zero, band_head, band_w, qk_scale, scale, drop_below, drop_scale, stride_dkb,
              stride_dkh, stride_dkn, stride_dvb, stride_dvh, stride_dvn, stride_mask_b, flags.type.shape[0] > 1,
              flags.type.shape[1] > 1)


@gluon.jit
def t5_ws_bwd_dkdv(q_desc, do_desc, k_desc, v_desc, ds_desc, DK, DV, LSE, DELTA, TABLE, BAND, KMASK, KV_LEN, SEED,
                   stride_dkb, stride_dkh, stride_dkn, stride_dvb, stride_dvh, stride_dvn, stride_mask_b, ds_rows, H,
                   Lq, Lk, R, table_row, table_zero, band_head, band_w, qk_scale, scale,
                   drop_below, drop_scale, HEAD_DIM: gl.constexpr, BLOCK_M: gl.constexpr, STAGES: gl.constexpr,
                   HAS_KEY_MASK: gl.constexpr, DROPOUT: gl.constexpr, CONSUMER_REGS: gl.constexpr,
                   num_warps: gl.constexpr):
    tile_smem: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=16, rank=2)
    dtype: gl.constexpr = q_desc.dtype
    keys: gl.constexpr = _KEYS
    start_n = gl.program_id(0) * (2 * keys)
    bh = gl.program_id(1)
    b = bh // H
    h = bh % H
    kv_len = Lk + 0 * bh  # a value, not a constant: a partition's arguments must be
    if HAS_KEY_MASK:
        kv_len = gl.load(KV_LEN + b)
    n_tiles = gl.where(start_n < kv_len, gl.cdiv(Lq, BLOCK_M), 0)  # keys past the row's length: no work

    k_bufs = gl.allocate_shared_memory(dtype, [2, keys, HEAD_DIM], tile_smem)
    v_bufs = gl.allocate_shared_memory(dtype, [2, keys, HEAD_DIM], tile_smem)
    q_ring = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_M, HEAD_DIM], tile_smem)
    do_ring = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_M, HEAD_DIM], tile_smem)
    ds_smem_layout: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=2 * BLOCK_M, element_bitwidth=16, rank=2)
    ds_bufs = gl.allocate_shared_memory(dtype, [2, keys, BLOCK_M], ds_smem_layout)  # each consumer's dSᵀ for TMA
    kv_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    q_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    q_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    do_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    # the flags as a tiny buffer's shape: a partition's constexpr arguments arrive as tensors in Triton 3.6
    flags = gl.allocate_shared_memory(gl.int8, [1 + HAS_KEY_MASK, 1 + DROPOUT], gl.SwizzledSharedLayout(1, 1, 1,
                                                                                                      [1, 0]))
    mbarrier.init(kv_bar, count=4)  # the producer's four tile loads each arrive on it (expect = arrive.expect_tx)
    for i in gl.static_range(STAGES):
        mbarrier.init(q_ready.index(i), count=1)
        mbarrier.init(do_ready.index(i), count=1)
        mbarrier.init(q_empty.index(i), count=2)  # both consumers release a slot (its Q and dO)
    fence_async_shared()

    col = h * HEAD_DIM
    consumer_args = (k_bufs, v_bufs, q_ring, do_ring, kv_bar, q_ready, q_empty, do_ready, ds_bufs, ds_desc,
                     bh * ds_rows + start_n, DK, DV, LSE, DELTA, TABLE, BAND, KMASK, SEED, start_n, n_tiles, b, h, bh,
                     Lq, Lk, kv_len, R, table_row, table_zero, band_head, band_w, qk_scale, scale, drop_below,
                     drop_scale, stride_dkb, stride_dkh, stride_dkn, stride_dvb, stride_dvh, stride_dvn, stride_mask_b,
                     flags)
    producer_args = (q_desc, do_desc, k_desc, v_desc, k_bufs, v_bufs, q_ring, do_ring, kv_bar, q_ready, q_empty,
                     do_ready, b * Lq, b * Lk + start_n, col, n_tiles)
    gl.warp_specialize([(_consumer0, consumer_args), (_consumer1, consumer_args), (_producer, producer_args)],
                       [4, 1], [CONSUMER_REGS, 24])


def covers_backward(q, k, v, grad_out, causal: bool, table, radius_given: int, band_max_radius: int,
                    store_ds: bool) -> bool:
    """Whether this kernel takes the call's dK/dV (first match: otherwise the Triton kernel runs)."""
    return (covers(q, k, v, causal) and rows_stride(grad_out) is not None and table is not None
            and 0 < radius_given <= band_max_radius and store_ds)


def _ds_descriptor(ds: torch.Tensor):
    """The contiguous (B, H, Lk_pad, Lq_pad) dSᵀ buffer as [B * H * Lk_pad, Lq_pad] rows in (KEYS, BLOCK_M) boxes."""
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    batch, heads, keys_pad, queries_pad = ds.shape
    assert ds.is_contiguous()
    layout = gl.NVMMASharedLayout(swizzle_byte_width=2 * BLOCK_M, element_bitwidth=16, rank=2)
    return TensorDescriptor(ds, [batch * heads * keys_pad, queries_pad], [queries_pad, 1], [KEYS, BLOCK_M], layout)


def dkdv(q, k, v, grad_out, dk, dv, ds, lse, delta, table, table_geometry, band, mask, lengths, radius, qk_scale,
         scale, seed, drop_below, drop_scale, dropout: bool) -> None:
    """dK, dV and dSᵀ (dropout's scale left to the dQ GEMM) for the call; ``band`` from `bias_band.build_band` with
    128-row tiles, transposed."""
    batch, heads, query_len, head_dim = q.shape
    key_len = k.shape[2]
    dummy = lse
    t5_ws_bwd_dkdv[(triton.cdiv(key_len, 2 * KEYS), batch * heads)](
        rows_descriptor(q, BLOCK_M), rows_descriptor(grad_out, BLOCK_M), rows_descriptor(k, KEYS),
        rows_descriptor(v, KEYS), _ds_descriptor(ds), dk, dv, lse, delta, table, band["BAND"],
        mask if mask is not None else dummy, lengths if lengths is not None else dummy, seed if dropout else dummy,
        dk.stride(0), dk.stride(1), dk.stride(2), dv.stride(0), dv.stride(1), dv.stride(2),
        mask.stride(0) if mask is not None else 0, ds.shape[2], heads, query_len, key_len, radius, *table_geometry,
        band["band_head"], band["band_w"], qk_scale, scale, drop_below, drop_scale, HEAD_DIM=head_dim,
        BLOCK_M=BLOCK_M, STAGES=STAGES, HAS_KEY_MASK=mask is not None, DROPOUT=dropout,
        CONSUMER_REGS=CONSUMER_REGISTERS, num_warps=4, maxnreg=LAUNCH_REGISTERS)


_SIGNATURE = dict(DK="*bf16", DV="*bf16", LSE="*fp32", DELTA="*fp32", TABLE="*fp32", BAND="*fp32",
                  KMASK="*i8", KV_LEN="*i32", SEED="*i64", qk_scale="fp32", scale="fp32", drop_scale="fp32")


def compile_for_sm90(stages: int | None = None, block_m: int | None = None, **flags):
    """triton.compile for sm_90 on any machine (no GPU), specialised as a T5 launch would be; ``flags`` override
    HAS_KEY_MASK (on) and DROPOUT (on)."""
    constexprs = {**dict(HEAD_DIM=128, BLOCK_M=block_m or BLOCK_M, STAGES=stages or STAGES, HAS_KEY_MASK=True,
                         DROPOUT=True, CONSUMER_REGS=CONSUMER_REGISTERS, num_warps=4), **flags}
    layout = "NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=16, rank=2)"
    block_m = constexprs["BLOCK_M"]
    ds_layout = f"NVMMASharedLayout(swizzle_byte_width={2 * block_m}, element_bitwidth=16, rank=2)"
    types = dict(_SIGNATURE, q_desc=f"tensordesc<bf16[{block_m}, {BOX_COLUMNS}],{layout}>",
                 do_desc=f"tensordesc<bf16[{block_m}, {BOX_COLUMNS}],{layout}>",
                 k_desc=f"tensordesc<bf16[{KEYS}, {BOX_COLUMNS}],{layout}>",
                 v_desc=f"tensordesc<bf16[{KEYS}, {BOX_COLUMNS}],{layout}>",
                 ds_desc=f"tensordesc<bf16[{KEYS}, {block_m}],{ds_layout}>")
    return compile_gluon(t5_ws_bwd_dkdv, types, constexprs, LAUNCH_REGISTERS)


# A launch that raised (Gluon's API moves between Triton releases): the Triton dK/dV kernel runs from then on.
failure: str | None = None


def run_if_covered(q, k, v, grad_out, dk, dv, ds, lse, delta, causal, table, table_geometry, radius_given, radius,
                   band_max_radius, store_ds, mask, lengths, qk_scale, scale, seed, dropout_p, drop_below,
                   drop_scale) -> bool:
    """This kernel for the call's dK, dV and dSᵀ where it covers it (`covers_backward`); whether it ran. The first
    launch that raises turns it off for the process, with one warning."""
    global failure
    if failure is not None or not covers_backward(q, k, v, grad_out, causal, table, radius_given, band_max_radius,
                                                  store_ds):
        return False
    from sumtune.fast_t5 import bias_band

    band = bias_band.build_band(table, radius, q.shape[2], k.shape[2], table_geometry[1], 2 * KEYS, transposed=True)
    try:
        dkdv(q, k, v, grad_out, dk, dv, ds, lse, delta, table, table_geometry, band, mask, lengths, radius, qk_scale,
             scale, seed, drop_below, drop_scale, dropout_p > 0)
    except Exception as error:  # noqa: BLE001 - any launch failure: the Triton kernels, said once
        failure = said_once(error, "backward", "the Triton kernels run")
        return False
    return True
