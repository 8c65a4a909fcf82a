"""T5 attention's forward, warp-specialized on Hopper: for calls no gradient reaches (generation's encoder, evaluation)
and, behind a flag, for training's forwards with dropout.

`sumtune.fast_t5.flash_attention.WS_NO_GRAD_FORWARD` sends the no-gradient forwards this kernel covers (`covers`)
here instead of to the Triton forward (`flash_kernels.t5_flash_attention_fwd`); `WS_TRAINING_FORWARD` sends the
forwards a gradient reaches too, below PRECISE_PV_MIN_KEYS keys, with dropout's draws made as the Triton backward
remakes them (`_keep_pairs`). The result is the same op's (output, log-sum-exp). The training route is off: its GPU
test passes, but at 32x32x1024x128 on an H100 the forward with dropout ran 2.79 vs 2.71 ms
(results/attention_kernels-2026-12-06-h100-80gb-hbm3-wstrain.json).

FlashAttention-3's structure, in Gluon's `warp_specialize`: one producer warp loads a program's two 64-row query
tiles and the key and value tiles by TMA into rings (an mbarrier per slot for "landed" and one for "released by both
consumers"); two consumer warpgroups of 64 query rows each run S = Q·Kᵀ, the online softmax and O += P·V with
warpgroup MMAs, P in registers, the next tile's Q·Kᵀ issued before this tile's P·V (FlashAttention-3's intra-warpgroup
overlap). Two warpgroups, each with its own barriers, let one's softmax run while the other's MMAs do, which one
warpgroup alone could not (session 34's Gluon forward, commit f21cad8, was slower than Triton's). Why: the probe of
this structure without T5's extras ran 7.20 ms against cuDNN's 6.88 (no bias) at 16x32x4096x128 on an H100, where
the Triton forward with T5's bias takes 9.50 (benchmarks/results/attention_ws_probe-2026-12-05-h100.json).

T5's extras: a tile whose offsets j - i all lie at or beyond -R or +R adds one value; the near tiles read their bias
from the band (`sumtune.fast_t5.bias_band`, rows 0..63 of the forward's band); keys at or past a row's length are
masked in the tile that holds the length, and a row with a hole before its length reads the key mask (as the Triton
forward's MASK_ONLY_WITH_HOLES). Gluon has no interpreter: `compile_for_sm90` builds it for Hopper on any machine
(a CPU test), a GPU test compares it with float64 and the Triton forward.
"""

from __future__ import annotations

import functools

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import fence_async_shared, mbarrier, tma, warpgroup_mma
from triton.experimental.gluon.language.nvidia.hopper import warpgroup_mma_wait

ROWS = 64  # a consumer warpgroup's query rows (one warpgroup MMA's M); a program takes two
BLOCK_N = 128  # keys a tile
STAGES = 2  # slots in the K and V rings (three: 224 KiB of shared memory at head_dim 128)
# The head widths it takes: 128 (T5-3b) and 64 (T5-base/large, FLAN-T5-XL). Head_dim 64, on an H100: no-gradient
# forward at 16x32x4096x64 with T5's bias 5.45 against the Triton forward's 6.46 ms (session 46, results/
# attention_kernels-2026-12-06-h100-80gb-hbm3-ws64.json) and 5.54 against 6.49 (session 47, …-ws64b.json, rebuilt from
# its log); its GPU test cases `d64` and `d64lean` (the default form) passed. On since session 47; token `nows64`.
HEAD_DIMS = (64, 128)
# Calls without a position bias (the decoder's cross-attention in an evaluation loss) at these head widths. On an H100
# (session 47, …-ws64b.json): 7.54 against the Triton forward's 9.96 ms at 16x32x4096x128 (cuDNN 6.63), but 4.81
# against 4.68 at head_dim 64, which stays in the Triton forward; the GPU test's no-bias cases passed (`lean` in
# session 45, `ring2` and `d64lean` in 47). Token `nowsnobias`: none.
WITHOUT_BIAS_HEAD_DIMS = (128,)
CONSUMER_REGISTERS = 240  # per thread of a consumer warpgroup; the producer warp gets 24 (FlashAttention-3's split)
LAUNCH_REGISTERS = 168  # 12 warps (8 consumers, the producer's warpgroup) x 168 = the 64 Ki registers of an SM
# Tiles with no masked key and one bias value (far beyond +-R, or no bias): the scale and that value folded into the
# exponent's one FFMA, the row maximum taken before them (Triton's tutorial's form; the others add the bias tile and
# mask, then subtract the maximum). On since session 45 (H100, 2026-12-06): its GPU test passed, whole generation at
# 256 rows x 4096 -> 512 12.55 against 12.48 summaries/s alone and 13.11 against 12.99 beside decodews32, tokens equal
# to transformers' (results/generate_throughput-2026-12-06-h100-80gb-hbm3-unsplit.json); token `nowslean`: off.
LEAN_FAR_TILES = True
BOX_COLUMNS = 64  # 128 bytes of bf16: the 128-byte swizzle's width, so a head_dim-128 tile lands as two boxes
_BOX = gl.constexpr(BOX_COLUMNS)
_ROWS = gl.constexpr(ROWS)
_tma_load = getattr(tma, "async_load", None) or tma.async_copy_global_to_shared  # renamed after Triton 3.6
_PHILOX2_M = gl.constexpr(0xD256D193)  # dropout_draws' Philox-2x32 multiplier and key increment
_PHILOX2_W = gl.constexpr(0x9E3779B9)


@gluon.jit
def _load_tile(desc, row, col, bar, buf):
    """A (rows, head_dim) tile at [row, col] of a 2-D descriptor into ``buf`` by TMA, counted on ``bar``."""
    rows: gl.constexpr = buf.type.shape[0]
    head_dim: gl.constexpr = buf.type.shape[1]
    mbarrier.expect(bar, rows * head_dim * 2)
    for j in gl.static_range(head_dim // _BOX):
        _tma_load(desc, [row, col + j * _BOX], bar, buf.slice(j * _BOX, _BOX, dim=1))


@gluon.jit
def _producer(q_desc, k_desc, v_desc, q_bufs, k_ring, v_ring, q_bars, k_ready, k_empty, v_ready, v_empty,
              q_row0, kv_row0, col, n_tiles):
    # Shapes come from the buffers: Triton 3.6 hands a partition's constexpr arguments over as tensors.
    block_n: gl.constexpr = k_ring.type.shape[1]
    stages: gl.constexpr = k_ring.type.shape[0]
    rows: gl.constexpr = q_bufs.type.shape[1]
    for c in gl.static_range(2):
        _load_tile(q_desc, q_row0 + c * rows, col, q_bars.index(c), q_bufs.index(c))
    for j in range(n_tiles):
        slot = j % stages
        phase = (j // stages) & 1
        mbarrier.wait(k_empty.index(slot), phase ^ 1)  # a fresh barrier's "previous phase" counts as complete
        _load_tile(k_desc, kv_row0 + j * block_n, col, k_ready.index(slot), k_ring.index(slot))
        mbarrier.wait(v_empty.index(slot), phase ^ 1)
        _load_tile(v_desc, kv_row0 + j * block_n, col, v_ready.index(slot), v_ring.index(slot))


@gluon.jit
def _pair_draws(seed, stream, counter, drop_below):
    """`dropout_draws._pair_draws` in Gluon: the keep flags of one Philox-2x32 call per counter (in the counter's
    layout), for (query r, key c), (r, c + 8), (r + 8, c), (r + 8, c + 8)."""
    c0 = counter.to(gl.uint32, bitcast=True)
    c1 = (gl.zeros_like(counter) + stream).to(gl.uint32, bitcast=True)
    key = (gl.zeros_like(counter).to(gl.int64) + seed).to(gl.uint32)
    for _ in gl.static_range(7):  # dropout_draws.PHILOX_ROUNDS
        hi = gl.umulhi(c0, _PHILOX2_M)
        lo = c0 * _PHILOX2_M
        c0 = hi ^ c1 ^ key
        c1 = lo
        key = key + _PHILOX2_W
    return ((c0 & 0xFFFF).to(gl.int32) >= drop_below, (c0 >> 16).to(gl.int32) >= drop_below,
            (c1 & 0xFFFF).to(gl.int32) >= drop_below, (c1 >> 16).to(gl.int32) >= drop_below)


@gluon.jit
def _keep_pairs(seed, stream, m0, start_n, n_cols, drop_below, ROWS: gl.constexpr, COLS: gl.constexpr,
                s_layout: gl.constexpr):
    """The (ROWS, COLS) keep mask of queries m0.. and keys start_n.. in ``s_layout``: the draws of
    ``dropout_draws._keep_pairs`` (one Philox-2x32 call per queries {r, r + 8} x keys {c, c + 8}, four 16-bit draws),
    so the Triton backward regenerates the same mask. The calls are laid out (linear layout below) where the
    warpgroup accumulator holds their (r, c) element; joined, reshaped and permuted as the Triton helper does, the
    mask is in ``s_layout`` with no data movement (the conversion is asserted trivial at compile time)."""
    gl.static_assert(ROWS == 64 and COLS == 128, "the calls' layout below is that of a 4-warp m64n128 accumulator")
    # An accumulator element (r, c): register bits c + 1, +8 row, c + 8, 16, 32, 64; lane bits c + 2, 4, r + 1, 2, 4;
    # warp bits r + 16, 32. The call of (r, c) with r % 16 < 8 and c % 16 < 8 sits where that element does.
    calls: gl.constexpr = gl.DistributedLinearLayout(
        reg_bases=[[0, 1], [0, 8], [0, 16], [0, 32]], lane_bases=[[0, 2], [0, 4], [1, 0], [2, 0], [4, 0]],
        warp_bases=[[8, 0], [16, 0]], block_bases=[], shape=[ROWS // 2, COLS // 2])
    rows = m0 // 2 + gl.arange(0, ROWS // 2, layout=gl.SliceLayout(1, calls))  # counter row: 8 per 16-query band
    cols = start_n // 2 + gl.arange(0, COLS // 2, layout=gl.SliceLayout(0, calls))  # 8 per 16-key band
    near, far_key, far_query, far_both = _pair_draws(seed, stream, rows[:, None] * n_cols + cols[None, :],
                                                     drop_below)
    keep = gl.join(gl.join(near, far_key), gl.join(far_query, far_both))  # (rows, columns, +8 column, +8 row)
    keep = gl.reshape(keep, (ROWS // 16, 8, COLS // 16, 8, 2, 2))
    keep = gl.permute(keep, (0, 5, 1, 2, 4, 3))  # (row band, +8 row, row, column band, +8 column, column)
    return gl.convert_layout(gl.reshape(keep, (ROWS, COLS)), s_layout, assert_trivial=True)


@gluon.jit
def _scores(s, j, m0, block_n: gl.constexpr, s_layout: gl.constexpr, qk_scale, far_left, far_right, R, band,
            band_w, kv_len, read_mask, kmask, Lk, HAS_BIAS: gl.constexpr, HAS_KEY_MASK: gl.constexpr):
    """Tile ``j``'s scores in log2 units: scaled, T5's bias added, keys past the row's length (or masked) -inf."""
    rows: gl.constexpr = s.type.shape[0]
    start_n = j * block_n
    x = s * qk_scale
    if HAS_BIAS:
        if start_n + block_n - 1 - m0 <= -R:
            x = x + far_left
        elif start_n - (m0 + rows - 1) >= R:
            x = x + far_right
        else:  # rows 0..rows-1 of the band from column start_n - m0 (band_zero is folded into ``band``)
            r = gl.arange(0, rows, layout=gl.SliceLayout(1, s_layout))
            c = gl.arange(0, block_n, layout=gl.SliceLayout(0, s_layout))
            x = x + gl.load(band + (start_n - m0) + r[:, None] * band_w + c[None, :])
    if (start_n + block_n > kv_len) | read_mask:
        offs_n = start_n + gl.arange(0, block_n, layout=gl.SliceLayout(0, s_layout))
        key_ok = offs_n < kv_len
        if HAS_KEY_MASK:
            if read_mask:
                key_ok = key_ok & (gl.load(kmask + offs_n, mask=offs_n < Lk, other=0) != 0)
        x = gl.where(key_ok[None, :], x, float("-inf"))
    return x


@gluon.jit
def _consumer(which: gl.constexpr, O, LSE, q_bufs, k_ring, v_ring, q_bars, k_ready, k_empty, v_ready, v_empty,
              out_base, bh, start_m, Lq, Lk, stride_om, n_tiles, qk_scale, TABLE, BAND, table_row, table_zero,
              band_head, band_w, R, KMASK, kv_len, read_mask, h, SEED, drop_below, drop_scale,
              HAS_BIAS: gl.constexpr, HAS_KEY_MASK: gl.constexpr, LEAN_FAR: gl.constexpr, DROPOUT: gl.constexpr):
    rows: gl.constexpr = q_bufs.type.shape[1]
    head_dim: gl.constexpr = q_bufs.type.shape[2]
    block_n: gl.constexpr = k_ring.type.shape[1]
    stages: gl.constexpr = k_ring.type.shape[0]
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, block_n, 16])
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, head_dim, 16])
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    dtype: gl.constexpr = q_bufs.dtype
    m0 = start_m + which * rows
    far_left = 0.0
    far_right = 0.0
    band = BAND
    if HAS_BIAS:
        far_left = gl.load(TABLE + h * table_row + table_zero + gl.maximum(-R, 1 - Lq))  # every offset <= -R
        far_right = gl.load(TABLE + h * table_row + table_zero + gl.minimum(R, Lk - 1))  # every offset >= +R
        band = BAND + h * band_head
    seed = 0
    n_cols = 0
    if DROPOUT:
        seed = gl.load(SEED)
        n_cols = gl.cdiv(Lk, 16) * 8  # dropout_draws._counter_cols with PAIRS
    q = q_bufs.index(which)
    mbarrier.wait(q_bars.index(which), 0)

    zero_s = gl.zeros([rows, block_n], gl.float32, layout=s_layout)
    m_i = gl.full([rows], float("-inf"), gl.float32, layout=gl.SliceLayout(1, s_layout))
    l_i = gl.zeros([rows], gl.float32, layout=gl.SliceLayout(1, s_layout))
    acc = gl.zeros([rows, head_dim], gl.float32, layout=o_layout)
    mbarrier.wait(k_ready.index(0), 0)
    s = warpgroup_mma(q, k_ring.index(0).permute((1, 0)), zero_s, use_acc=False, is_async=True)
    s = warpgroup_mma_wait(num_outstanding=0, deps=(s,))
    mbarrier.arrive(k_empty.index(0), count=1)
    for j in range(n_tiles):
        slot = j % stages
        start_n = j * block_n
        far_left_tile = start_n + block_n - 1 - m0 <= -R
        lean = (start_n + block_n <= kv_len) & ~read_mask  # no key masked in this tile
        if HAS_BIAS:
            lean = lean & (far_left_tile | (start_n - (m0 + rows - 1) >= R))  # and one bias value for all of it
        if LEAN_FAR and lean:  # the scale and the one bias value inside the exponent's FFMA, as Triton's tutorial
            c = gl.where(far_left_tile, far_left, far_right) if HAS_BIAS else 0.0
            m_new = gl.maximum(m_i, gl.max(s, 1) * qk_scale + c)  # finite: the tile has keys
            p = gl.exp2(s * qk_scale + (c - m_new)[:, None])
            alpha = gl.exp2(m_i - m_new)
        else:
            x = _scores(s, j, m0, block_n, s_layout, qk_scale, far_left, far_right, R, band, band_w, kv_len,
                        read_mask, KMASK, Lk, HAS_BIAS, HAS_KEY_MASK)
            m_new = gl.maximum(m_i, gl.max(x, 1))
            m_use = gl.where(m_new == float("-inf"), 0.0, m_new)  # a row masked so far: exp2(-inf - 0) = 0, no NaN
            p = gl.exp2(x - m_use[:, None])
            alpha = gl.exp2(m_i - m_use)
        l_i = l_i * alpha + gl.sum(p, 1)
        m_i = m_new
        p_half = p.to(dtype)
        if DROPOUT:  # the denominator counts every key; dropout acts on the normalised probabilities (masked after
            # the rounding: the same values)
            p_half = gl.where(_keep_pairs(seed, bh.to(gl.int32), m0, start_n, n_cols, drop_below, rows, block_n,
                                          s_layout), p_half, 0.0)
        p_op = gl.convert_layout(p_half, p_layout)
        # the next tile's scores to the tensor cores before this tile's P·V (none after the last: a stale slot's
        # product, never read)
        nxt = j + 1
        has_next = nxt < n_tiles
        next_slot = nxt % stages
        mbarrier.wait(k_ready.index(next_slot), (nxt // stages) & 1, pred=has_next)
        s_next = warpgroup_mma(q, k_ring.index(next_slot).permute((1, 0)), zero_s, use_acc=False, is_async=True)
        acc = acc * gl.convert_layout(alpha, gl.SliceLayout(1, o_layout))[:, None]
        mbarrier.wait(v_ready.index(slot), (j // stages) & 1)
        acc = warpgroup_mma(p_op, v_ring.index(slot), acc, is_async=True)
        s = warpgroup_mma_wait(num_outstanding=1, deps=(s_next,))
        mbarrier.arrive(k_empty.index(next_slot), count=1, pred=has_next)
        acc, p_op = warpgroup_mma_wait(num_outstanding=0, deps=(acc, p_op))
        mbarrier.arrive(v_empty.index(slot), count=1)

    empty = l_i == 0.0  # no key to attend to: output 0, and lse = +inf (as the Triton forward writes it)
    l_safe = gl.where(empty, 1.0, l_i)
    out = acc * gl.convert_layout(drop_scale / l_safe, gl.SliceLayout(1, o_layout))[:, None]
    offs_m = m0 + gl.arange(0, rows, layout=gl.SliceLayout(1, o_layout))
    offs_d = gl.arange(0, head_dim, layout=gl.SliceLayout(0, o_layout))
    gl.store(O + out_base + offs_m.to(gl.int64)[:, None] * stride_om + offs_d[None, :], out.to(dtype),
             mask=(offs_m < Lq)[:, None])
    offs_ml = m0 + gl.arange(0, rows, layout=gl.SliceLayout(1, s_layout))
    gl.store(LSE + bh.to(gl.int64) * Lq + offs_ml, gl.where(empty, float("inf"), m_i + gl.log2(l_safe)),
             mask=offs_ml < Lq)


@gluon.jit
def _consumer0(O, LSE, q_bufs, k_ring, v_ring, q_bars, k_ready, k_empty, v_ready, v_empty, out_base, bh,
               start_m, Lq, Lk, stride_om, n_tiles, qk_scale, TABLE, BAND, table_row, table_zero, band_head, band_w,
               R, KMASK, kv_len, read_mask, h, SEED, drop_below, drop_scale, flags):
    _consumer(0, O, LSE, q_bufs, k_ring, v_ring, q_bars, k_ready, k_empty, v_ready, v_empty, out_base, bh,
              start_m, Lq, Lk, stride_om, n_tiles, qk_scale, TABLE, BAND, table_row, table_zero, band_head, band_w,
              R, KMASK, kv_len, read_mask, h, SEED, drop_below, drop_scale, flags.type.shape[0] > 1,
              flags.type.shape[1] > 1, flags.type.shape[2] > 1, flags.type.shape[3] > 1)


@gluon.jit
def _consumer1(O, LSE, q_bufs, k_ring, v_ring, q_bars, k_ready, k_empty, v_ready, v_empty, out_base, bh,
               start_m, Lq, Lk, stride_om, n_tiles, qk_scale, TABLE, BAND, table_row, table_zero, band_head, band_w,
               R, KMASK, kv_len, read_mask, h, SEED, drop_below, drop_scale, flags):
    _consumer(1, O, LSE, q_bufs, k_ring, v_ring, q_bars, k_ready, k_empty, v_ready, v_empty, out_base, bh,
              start_m, Lq, Lk, stride_om, n_tiles, qk_scale, TABLE, BAND, table_row, table_zero, band_head, band_w,
              R, KMASK, kv_len, read_mask, h, SEED, drop_below, drop_scale, flags.type.shape[0] > 1,
              flags.type.shape[1] > 1, flags.type.shape[2] > 1, flags.type.shape[3] > 1)


@gluon.jit
def t5_ws_fwd(q_desc, k_desc, v_desc, O, LSE, TABLE, BAND, KMASK, KV_LEN, HOLES, SEED,
              stride_ob, stride_oh, stride_om, stride_mask_b, H, Lq, Lk, R, table_row, table_zero, band_head,
              band_w, qk_scale, drop_below, drop_scale, HEAD_DIM: gl.constexpr, BLOCK_N: gl.constexpr,
              STAGES: gl.constexpr, HAS_BIAS: gl.constexpr, HAS_KEY_MASK: gl.constexpr, LEAN_FAR: gl.constexpr,
              DROPOUT: gl.constexpr, CONSUMER_REGS: gl.constexpr, num_warps: gl.constexpr):
    tile_smem: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=16, rank=2)
    dtype: gl.constexpr = q_desc.dtype
    rows: gl.constexpr = _ROWS
    start_m = gl.program_id(0) * (2 * rows)
    bh = gl.program_id(1)
    b = bh // H
    h = bh % H
    kv_len = Lk + 0 * bh  # tensors, not constants: a partition's arguments must be values
    read_mask = kv_len < 0
    kmask = KMASK
    if HAS_KEY_MASK:
        kv_len = gl.load(KV_LEN + b)
        read_mask = gl.load(HOLES + b) != 0  # a row padded only at its end needs its length alone
        kmask = KMASK + b.to(gl.int64) * stride_mask_b
    # at least one tile, even for a row without keys (all masked: zeros out, lse +inf)
    n_tiles = gl.maximum(gl.cdiv(kv_len, BLOCK_N), 1)

    q_bufs = gl.allocate_shared_memory(dtype, [2, rows, HEAD_DIM], tile_smem)
    k_ring = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, HEAD_DIM], tile_smem)
    v_ring = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, HEAD_DIM], tile_smem)
    q_bars = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    k_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    k_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    v_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    v_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    # the flags as a tiny buffer's shape: a partition's constexpr arguments arrive as tensors (see _producer)
    flags = gl.allocate_shared_memory(gl.int8, [1 + HAS_BIAS, 1 + HAS_KEY_MASK, 1 + LEAN_FAR, 1 + DROPOUT],
                                      gl.SwizzledSharedLayout(1, 1, 1, [3, 2, 1, 0]))
    for i in gl.static_range(2):
        mbarrier.init(q_bars.index(i), count=1)
    for i in gl.static_range(STAGES):
        mbarrier.init(k_ready.index(i), count=1)
        mbarrier.init(v_ready.index(i), count=1)
        mbarrier.init(k_empty.index(i), count=2)  # both consumers release a slot
        mbarrier.init(v_empty.index(i), count=2)
    fence_async_shared()

    col = h * HEAD_DIM
    out_base = b.to(gl.int64) * stride_ob + h * stride_oh
    consumer_args = (O, LSE, q_bufs, k_ring, v_ring, q_bars, k_ready, k_empty, v_ready, v_empty, out_base, bh,
                     start_m, Lq, Lk, stride_om, n_tiles, qk_scale, TABLE, BAND, table_row,
                     table_zero, band_head, band_w, R, kmask, kv_len, read_mask, h, SEED, drop_below, drop_scale,
                     flags)
    producer_args = (q_desc, k_desc, v_desc, q_bufs, k_ring, v_ring, q_bars, k_ready, k_empty, v_ready, v_empty,
                     b * Lq + start_m, b * Lk, col, n_tiles)
    gl.warp_specialize([(_consumer0, consumer_args), (_consumer1, consumer_args), (_producer, producer_args)],
                       [4, 1], [CONSUMER_REGS, 24])


@functools.cache
def _hopper(device_index: int) -> bool:
    return torch.cuda.get_device_capability(device_index)[0] == 9


def rows_stride(x: torch.Tensor) -> int | None:
    """The row stride s of a (B, H, L, D) view laid out as [B * L, H * D] rows s apart (the projections' layout,
    fused or not), or None."""
    batch, heads, length, head_dim = x.shape
    s = x.stride(2)
    if x.stride() != (length * s, head_dim, s, 1) or (s * x.element_size()) % 16 or x.data_ptr() % 16:
        return None
    return s


def covers(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> bool:
    """Whether this kernel takes the call (first match: otherwise the Triton forward runs)."""
    return (q.is_cuda and _hopper(q.device.index or 0) and not causal
            and q.dtype == k.dtype == v.dtype == torch.bfloat16 and q.shape[-1] in HEAD_DIMS
            and all(rows_stride(x) is not None for x in (q, k, v)))


def rows_descriptor(x: torch.Tensor, rows: int):
    """A TMA descriptor over a (B, H, L, D) view's [B * L, H * D] rows in (rows, 64) boxes (see `rows_stride`)."""
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    batch, heads, length, head_dim = x.shape
    layout = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=16, rank=2)
    return TensorDescriptor(x, [batch * length, heads * head_dim], [rows_stride(x), 1], [rows, BOX_COLUMNS], layout)


def forward(q, k, v, out, lse, table, table_geometry, band, mask, lengths, holes, radius, qk_scale,
            dropout=None) -> None:
    """The Triton forward's launch, here: ``out`` and ``lse`` are written. ``band``: the forward's bias band
    arguments (`bias_band.build_band` with 128-row tiles) when ``table`` is given; ``dropout``: (seed tensor,
    drop_below, drop_scale) of the 16-bit paired draws, or None."""
    batch, heads, query_len, head_dim = q.shape
    dummy = lse
    seed, drop_below, drop_scale = dropout if dropout is not None else (dummy, 0, 1.0)
    t5_ws_fwd[(triton.cdiv(query_len, 2 * ROWS), batch * heads)](
        rows_descriptor(q, ROWS), rows_descriptor(k, BLOCK_N), rows_descriptor(v, BLOCK_N), out, lse,
        table if table is not None else dummy, band["BAND"] if band else dummy,
        mask if mask is not None else dummy, lengths if lengths is not None else dummy,
        holes if holes is not None else dummy, seed, out.stride(0), out.stride(1), out.stride(2),
        mask.stride(0) if mask is not None else 0, heads, query_len, k.shape[2], radius, *table_geometry,
        band["band_head"] if band else 0, band["band_w"] if band else 0, qk_scale, drop_below, drop_scale,
        HEAD_DIM=head_dim, BLOCK_N=BLOCK_N, STAGES=STAGES, HAS_BIAS=table is not None,
        HAS_KEY_MASK=mask is not None, DROPOUT=dropout is not None,
        LEAN_FAR=LEAN_FAR_TILES and qk_scale > 0,  # a row's largest product must be its largest score
        CONSUMER_REGS=CONSUMER_REGISTERS, num_warps=4, maxnreg=LAUNCH_REGISTERS)


_SIGNATURE = dict(O="*bf16", LSE="*fp32", TABLE="*fp32", BAND="*fp32", KMASK="*i8", KV_LEN="*i32", HOLES="*i8",
                  SEED="*i64", qk_scale="fp32", drop_scale="fp32")


def compile_for_sm90(block_n: int | None = None, stages: int | None = None, head_dim: int = 128, **flags):
    """triton.compile for sm_90 on any machine (no GPU), specialised as a T5 launch would be (pointers and strides
    divisible by 16); ``flags`` override HAS_BIAS / HAS_KEY_MASK (on), LEAN_FAR, DROPOUT (off)."""
    block_n, stages = block_n or BLOCK_N, stages or STAGES
    constexprs = {**dict(HEAD_DIM=head_dim, BLOCK_N=block_n, STAGES=stages, HAS_BIAS=True, HAS_KEY_MASK=True,
                         LEAN_FAR=LEAN_FAR_TILES, DROPOUT=False, CONSUMER_REGS=CONSUMER_REGISTERS, num_warps=4),
                  **flags}
    layout = "NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=16, rank=2)"
    types = dict(_SIGNATURE, q_desc=f"tensordesc<bf16[{ROWS}, {BOX_COLUMNS}],{layout}>",
                 k_desc=f"tensordesc<bf16[{block_n}, {BOX_COLUMNS}],{layout}>",
                 v_desc=f"tensordesc<bf16[{block_n}, {BOX_COLUMNS}],{layout}>")
    return compile_gluon(t5_ws_fwd, types, constexprs, LAUNCH_REGISTERS)


def compile_gluon(kernel, types: dict, constexprs: dict, maxnreg: int | None = None, arch: int = 90):
    """triton.compile a Gluon kernel for ``sm_<arch>`` on any machine: ``types`` maps runtime arguments to their
    types (others are "i32"); pointers and strides are marked divisible by 16, as a T5 launch specialises them."""
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource

    names = kernel.arg_names
    signature = {n: ("constexpr" if n in constexprs else types.get(n, "i32")) for n in names}
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(names)
             if n not in constexprs and (types.get(n, "").startswith("*") or n.startswith("stride_"))}
    source = GluonASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs)
    options = dict(num_warps=constexprs.get("num_warps", 4), **({"maxnreg": maxnreg} if maxnreg else {}))
    return triton.compile(source, target=GPUTarget("cuda", arch, 32), options=options)


# A launch that raised (Gluon's API moves between Triton releases): the Triton forward runs from then on. Kept apart
# for the builds with dropout (training), so that one of theirs does not turn off the no-gradient forward.
failure: str | None = None
training_failure: str | None = None


def run_if_covered(q, k, v, causal, out, lse, table, table_geometry, radius_given, radius, band_max_radius, mask,
                   lengths, holes, qk_scale, dropout=None) -> bool:
    """This kernel for a forward it covers (bf16, HEAD_DIMS, TMA-readable rows, T5's bias with a radius the band
    holds: up to ``band_max_radius``; ``dropout`` as `forward` takes it); whether it ran. The first launch that
    raises turns it off for the process, with one warning."""
    global failure, training_failure
    if (training_failure if dropout else failure) is not None or not covers(q, k, v, causal) \
            or (table is None and q.shape[-1] not in WITHOUT_BIAS_HEAD_DIMS):
        return False
    band = None
    if table is not None:
        from sumtune.fast_t5 import bias_band

        if not 0 < radius_given <= band_max_radius:
            return False
        band = bias_band.build_band(table, radius, q.shape[2], k.shape[2], table_geometry[1], 2 * ROWS,
                                    transposed=False)
    try:
        forward(q, k, v, out, lse, table, table_geometry, band, mask, lengths, holes, radius, qk_scale, dropout)
    except Exception as error:  # noqa: BLE001 - any launch failure: the Triton forward, said once
        if dropout:
            training_failure = said_once(error, "forward with dropout", "the Triton forward runs")
        else:
            failure = said_once(error, "forward", "the Triton forward runs")
        return False
    return True


def said_once(error: Exception, kernel: str, instead: str) -> str:
    """Warn, once for the process, that the warp-specialized attention ``kernel`` cannot run here and what runs
    ``instead``; the failure as the module records it."""
    import warnings

    failure = f"{type(error).__name__}: {error}"
    warnings.warn(f"sumtune: the warp-specialized attention {kernel} cannot run here ({failure}); {instead} instead",
                  RuntimeWarning, stacklevel=4)
    return failure
