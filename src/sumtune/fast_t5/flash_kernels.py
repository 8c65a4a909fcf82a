"""Triton kernels for T5 attention: FlashAttention-2 forward and backward with T5's relative position bias,
key padding, causal masking and dropout computed inside the kernel.

Imported lazily (only when the Triton route runs): importing it decorates the kernels, and under
``TRITON_INTERPRET=1`` they run on CPU tensors in Triton's interpreter.

Design (scores are kept in log2 units, as in Triton's fused-attention tutorial: s = (q.k * scale + bias) * log2 e):

* **Bias from a table, no L x L tensor.** ``TABLE[h, table_zero + j - i]`` holds the bias (times log2 e) of query i
  and key j: an (H, Lq + Lk - 1) table with zero margins (a tile's rows past Lq and keys past Lk read in bounds),
  read at addresses affine in (i, j) (L1/L2-resident, no per-element index arithmetic). T5 maps every
  |j - i| >= max_distance = R to one bucket per direction, so a tile whose offsets all lie beyond +-R gets one
  scalar instead: each query block's key range is split into far-left (constant), near (table) and far-right
  (constant) tiles; at 4096 tokens ~90% of the tiles read no bias at all. Three loops (three copies of the body)
  measured faster than one loop branching per tile, though that one had half the code and fewer registers: with
  dropout 10.31 vs 10.75 ms at 32x32x1024, 16.48 vs 18.54 at 4x32x4096 (H200, results/attention_kernels_onebias-*).
  Again with the band on 2026-12-04 (one loop, the band or a far constant chosen per tile, commit 34a8ef0): the
  no-gradient forward at 16x32x4096x128 18.4 vs 12.1 ms at 64x64x4x2, 19.1 vs 12.3 at 128x64x8x3, 17.9 vs 13.6 at
  128x128x8x2; 128x128x8x3 fits neither way (262 vs 360 KiB of shared memory: the band tile's layout change takes
  64 KiB) (results/attention_kernels-2026-12-04-h200-oneloop-nograd-s32.json).
* **Bias band** (``USE_BAND``): the near tiles read their bias from a small per-call band instead of the table, with
  aligned 16-byte loads (``sumtune.fast_t5.bias_band``). Same values, so the same results bit for bit.
* **Key padding** from a per-row key mask (B, Lk) plus the row's key length (last kept key + 1), which bounds the
  loops; a masked key gets -inf, hence exactly zero probability. A row with no key at all returns zeros (no NaN).
  With ``CHECK_HOLES`` the forward and dQ kernels read the mask only in rows that ``HOLES`` flags (a masked key
  before the row's length): a branch around the load inside the loop, since two copies of a loop would each hold
  their own pipeline buffers (twice the shared memory).
* **Dropout** from Philox (7 rounds, as FlashAttention-2) keyed by a seed that torch's generator draws on the device
  (read from SEED: no host sync, and CUDA graphs redraw it per replay). Which elements one call draws for, and how
  each kernel lays the draws out in its own tile, is ``sumtune.fast_t5.dropout_draws``: a draw depends only on
  (seed, b, h, i, j), never on the block sizes, so the backward kernels regenerate exactly the forward's mask.
* **Backward** (``flash_kernels_bwd``, re-exported here): delta = rowsum(dO * O), then one kernel for dK/dV (a key
  block per program, looping over query blocks) and one for dQ (a query block per program, looping over key
  blocks); both recompute P from the saved log-sum-exp. No atomics, so gradients are deterministic.
* **Lean tiles** (``LEAN_TILES``, on by default since 2026-12-05): key tiles wholly inside a row without masked keys
  before its length run in loops of their own without masks, the far tiles' scale and bias in the exponent's one
  multiply-add: about half the instructions a tile in the sm_90 build (``flash_attention.LEAN_FORWARD``).
* **P·V precision** (forward only): ``PV_FP16`` takes V as a float16 copy scaled by a power of two (``V_LARGEST``
  holds max |V|; sumtune.fast_t5.fp16_values), so P goes into the GEMM with 11 bits instead of bf16's 8, and divides
  the output by that power; ``PV_SPLIT`` adds a second GEMM over P's remainder in V's dtype (in float8 e4m3 it
  measured slower on an H200: commit b74dbf9 has it).
* The tensor-core kernels are named t5_flash_attention_*: sumtune's profiler counts "flash" kernels as tensor-core
  work.
"""

from __future__ import annotations

import triton
import triton.language as tl

from sumtune.fast_t5.bias_band import t5_bias_band  # noqa: F401 (for flash_attention)
from sumtune.fast_t5.dropout_draws import _counter_cols, _keep_tile
from sumtune.fast_t5.flash_common import (BIAS_BAND, BIAS_CONST, BIAS_GATHER, BIAS_NONE, _biased_scores, _head_rows,
                                         _program_head, _row_keys)
from sumtune.fast_t5.fp16_values import fp16_power, t5_values_to_fp16  # noqa: F401 (the latter: for flash_attention)
from sumtune.triton_compat import fix_interpreter_for_numpy_2_4
from sumtune.triton_compat import interpreter_safe_dot as _dot

INTERPRET = bool(triton.knobs.runtime.interpret)

if INTERPRET:
    fix_interpreter_for_numpy_2_4()


# ----------------------------------------------------------------------------- forward
@triton.jit
def _fwd_tiles(acc, l_i, m_i, q, K, V, TABLE, KMASK, read_mask, start, stop, const, start_m,
               stride_kn, stride_kd, stride_vn, stride_vd, Lk, kv_len, R, qk_scale, band_w,
               seed, stream, n_cols, drop_below,
               HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BIAS_MODE: tl.constexpr,
               CAUSAL: tl.constexpr, HAS_KEY_MASK: tl.constexpr, DROPOUT: tl.constexpr, UPCAST: tl.constexpr,
               DRAW8: tl.constexpr, PV_SPLIT: tl.constexpr, PAIRS: tl.constexpr, kv_row0=0, kv_col=0,
               DESC: tl.constexpr = False, LOOP_STAGES: tl.constexpr = None, LEAN: tl.constexpr = False):
    """Key tiles start, start + BLOCK_N, ... < stop, software-pipelined over LOOP_STAGES (None: the launch's).

    LEAN: every tile lies wholly inside the row's keys with no masked key among them: no mask; with one bias value
    (or none) the scale and the constant go into the exponent's one multiply-add, as Triton's tutorial does
    (qk_scale > 0, so the row maximum of the raw products gives the scores' maximum)."""
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    for start_n in tl.range(start, stop, BLOCK_N, num_stages=LOOP_STAGES):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        offs_n = start_n + tl.arange(0, BLOCK_N)
        in_k = offs_n < Lk
        # Key mask and dropout draws first: integer work and a small load that overlap the previous tile's P.V on
        # the tensor cores (the Q.K^T below is waited for at once).
        key_ok = offs_n < kv_len
        if HAS_KEY_MASK and not LEAN:
            if read_mask:
                key_ok = key_ok & (tl.load(KMASK + offs_n, mask=in_k, other=0) != 0)
        if DROPOUT:
            kept = _keep_tile(seed, stream, start_m, start_n, n_cols, drop_below, BLOCK_M, BLOCK_N, DRAW8, PAIRS)
        if DESC:  # TMA: rows past the row's keys are the next row's (finite) or zeros, masked below like padding
            k_t = K.load([kv_row0 + start_n, kv_col]).T
        elif LEAN:
            k_t = tl.load(K + offs_n[None, :] * stride_kn + offs_d[:, None] * stride_kd)
        else:
            k_t = tl.load(K + offs_n[None, :] * stride_kn + offs_d[:, None] * stride_kd, mask=in_k[None, :],
                          other=0.0)
        if LEAN and (BIAS_MODE == BIAS_CONST or BIAS_MODE == BIAS_NONE):
            raw = _dot(q, k_t, UPCAST)
            m_new = tl.maximum(m_i, tl.max(raw, 1) * qk_scale + const)  # finite: every key of the tile counts
            p = tl.math.exp2(raw * qk_scale + (const - m_new)[:, None])
            alpha = tl.math.exp2(m_i - m_new)
        elif LEAN:  # a bias a key: added, no mask
            s = _biased_scores(q, k_t, TABLE, const, start_m, start_n, offs_m, offs_n, qk_scale, band_w, BIAS_MODE,
                               BLOCK_M, BLOCK_N, UPCAST)
            m_new = tl.maximum(m_i, tl.max(s, 1))
            p = tl.math.exp2(s - m_new[:, None])
            alpha = tl.math.exp2(m_i - m_new)
        else:
            s = _biased_scores(q, k_t, TABLE, const, start_m, start_n, offs_m, offs_n, qk_scale, band_w, BIAS_MODE,
                               BLOCK_M, BLOCK_N, UPCAST)
            keep = key_ok[None, :]
            if CAUSAL:
                keep = keep & (offs_n[None, :] <= offs_m[:, None])
            s = tl.where(keep, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row masked so far: exp2(-inf - 0) = 0, no NaN
            p = tl.math.exp2(s - m_use[:, None])
            alpha = tl.math.exp2(m_i - m_use)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        if DROPOUT:  # the softmax denominator counts every key; dropout acts on the normalised probabilities
            p = tl.where(kept, p, 0.0)
        if DESC:
            v = V.load([kv_row0 + start_n, kv_col])
        elif LEAN:
            v = tl.load(V + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd)
        else:
            v = tl.load(V + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd, mask=in_k[:, None], other=0.0)
        p_high = p.to(v.dtype)
        acc = _dot(p_high, v, UPCAST, acc)
        if PV_SPLIT:  # P = high + low, each in V's dtype: P·V with ~16 bits of P for one more GEMM
            acc = _dot((p - p_high.to(tl.float32)).to(v.dtype), v, UPCAST, acc)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _fwd_region(acc, l_i, m_i, q, K, V, TABLE, KMASK, read_mask, start, stop, lean_end, const, start_m,
                stride_kn, stride_kd, stride_vn, stride_vd, Lk, kv_len, R, qk_scale, band_w,
                seed, stream, n_cols, drop_below,
                HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BIAS_MODE: tl.constexpr,
                CAUSAL: tl.constexpr, HAS_KEY_MASK: tl.constexpr, DROPOUT: tl.constexpr, UPCAST: tl.constexpr,
                DRAW8: tl.constexpr, PV_SPLIT: tl.constexpr, PAIRS: tl.constexpr, kv_row0, kv_col,
                DESC: tl.constexpr, LOOP_STAGES: tl.constexpr, LEAN_TILES: tl.constexpr):
    """The key tiles [start, stop) of one bias region: with LEAN_TILES those below ``lean_end`` first, in a lean loop
    (`_fwd_tiles`' LEAN), then the rest with masks."""
    masked_from = start
    if LEAN_TILES:
        masked_from = tl.maximum(start, tl.minimum(stop, lean_end))
        acc, l_i, m_i = _fwd_tiles(acc, l_i, m_i, q, K, V, TABLE, KMASK, read_mask, start, masked_from, const, start_m,
                                   stride_kn, stride_kd, stride_vn, stride_vd, Lk, kv_len, R, qk_scale, band_w, seed,
                                   stream, n_cols, drop_below, HEAD_DIM, BLOCK_M, BLOCK_N, BIAS_MODE, False,
                                   HAS_KEY_MASK, DROPOUT, UPCAST, DRAW8, PV_SPLIT, PAIRS, kv_row0, kv_col, DESC,
                                   LOOP_STAGES, True)
    return _fwd_tiles(acc, l_i, m_i, q, K, V, TABLE, KMASK, read_mask, masked_from, stop, const, start_m,
                      stride_kn, stride_kd, stride_vn, stride_vd, Lk, kv_len, R, qk_scale, band_w, seed, stream,
                      n_cols, drop_below, HEAD_DIM, BLOCK_M, BLOCK_N, BIAS_MODE, CAUSAL, HAS_KEY_MASK, DROPOUT,
                      UPCAST, DRAW8, PV_SPLIT, PAIRS, kv_row0, kv_col, DESC, LOOP_STAGES)


@triton.jit
def t5_flash_attention_fwd(Q, K, V, O, LSE, TABLE, KMASK, KV_LEN, V_LARGEST, stride_qb, stride_qh, stride_qm,
                           stride_qd, stride_kb, stride_kh, stride_kn, stride_kd, stride_vb, stride_vh, stride_vn,
                           stride_vd, stride_ob, stride_oh, stride_om, stride_od, stride_mask_b, H, Lq, Lk, R,
                           table_row, table_zero, qk_scale, SEED, drop_below, drop_scale, len_key,
                           HEAD_DIM: tl.constexpr,
                           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr,
                           HAS_BIAS: tl.constexpr, HAS_KEY_MASK: tl.constexpr, DROPOUT: tl.constexpr,
                           UPCAST: tl.constexpr, DRAW8: tl.constexpr = False, PV_SPLIT: tl.constexpr = False,
                           PV_FP16: tl.constexpr = False, PAIRS: tl.constexpr = False,
                           CHECK_HOLES: tl.constexpr = False, HOLES=0, BAND=0, band_w=0, band_head=0,
                           USE_BAND: tl.constexpr = False, DESC: tl.constexpr = False,
                           NEAR_STAGES: tl.constexpr = None, LEAN_TILES: tl.constexpr = False):
    """With DESC, K and V are TMA descriptors over the (B * Lk, H * HEAD_DIM) rows of the keys and values (the
    projections' layout) instead of pointers; the same sums in the same order. With LEAN_TILES (not causal, a
    positive qk_scale), the key tiles that lie wholly inside a row without masked keys before its length run in
    loops of their own without masks (`_fwd_tiles`' LEAN): the same maths, far tiles' scale and bias added in
    another order."""
    start_m = tl.program_id(0) * BLOCK_M
    bh, b, h, seed = _program_head(SEED, H, DROPOUT)
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    in_q = offs_m < Lq
    q = _head_rows(Q, b, h, offs_m, offs_d, stride_qb, stride_qh, stride_qm, stride_qd, in_q)
    kv_row0 = (b * Lk).to(tl.int32)  # DESC: the row's first key, and the head's first column
    kv_col = h * HEAD_DIM
    if not DESC:
        K += b * stride_kb + h * stride_kh
        V += b * stride_vb + h * stride_vh
    kv_len, KMASK, stop = _row_keys(KV_LEN, KMASK, b, stride_mask_b, Lk, start_m, HAS_KEY_MASK, CAUSAL, BLOCK_M)
    n_cols = _counter_cols(Lk, DRAW8, PAIRS)
    m_i = tl.zeros([BLOCK_M], dtype=tl.float32) - float("inf")
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    read_mask = True  # with CHECK_HOLES, a row padded only at its end reads no mask: kv_len bounds its keys
    if CHECK_HOLES:
        read_mask = tl.load(HOLES + b) != 0
    # LEAN_TILES: key tiles [0, lean_end) lie inside the row's keys (a row with holes reads its mask everywhere)
    lean_end = 0
    if LEAN_TILES:
        tl.static_assert(not CAUSAL, "lean tiles: not causal")
        lean_end = (kv_len // BLOCK_N) * BLOCK_N
        if HAS_KEY_MASK:
            if CHECK_HOLES:
                lean_end = tl.where(read_mask, 0, lean_end)
            else:
                lean_end = 0
    if HAS_BIAS:
        TABLE += h * table_row + table_zero  # TABLE[d]: bias at offset d = j - i
        far_left = tl.load(TABLE + tl.maximum(-R, 1 - Lq))  # the bias of every offset <= -R
        far_right = tl.load(TABLE + tl.minimum(R, Lk - 1))  # the bias of every offset >= +R
        # key tiles whose offsets j - i are all <= -R (far left) or all >= +R (far right) share one bias value
        lo_end = tl.minimum((tl.maximum(start_m - R + 1, 0) // BLOCK_N) * BLOCK_N, stop)
        hi_start = tl.maximum(tl.minimum(tl.cdiv(start_m + BLOCK_M - 1 + R, BLOCK_N) * BLOCK_N, stop), lo_end)
        acc, l_i, m_i = _fwd_region(acc, l_i, m_i, q, K, V, TABLE, KMASK, read_mask, 0, lo_end, lean_end, far_left,
                                    start_m, stride_kn, stride_kd, stride_vn, stride_vd, Lk, kv_len, R, qk_scale,
                                    band_w, seed, bh, n_cols, drop_below, HEAD_DIM, BLOCK_M, BLOCK_N, BIAS_CONST,
                                    False, HAS_KEY_MASK, DROPOUT, UPCAST, DRAW8, PV_SPLIT, PAIRS, kv_row0, kv_col, DESC,
                                    None, LEAN_TILES)
        acc, l_i, m_i = _fwd_region(acc, l_i, m_i, q, K, V, BAND + h * band_head if USE_BAND else TABLE, KMASK,
                                    read_mask, lo_end, hi_start, lean_end, 0.0, start_m, stride_kn, stride_kd,
                                    stride_vn, stride_vd, Lk, kv_len, R, qk_scale, band_w, seed, bh, n_cols, drop_below,
                                    HEAD_DIM, BLOCK_M, BLOCK_N, BIAS_BAND if USE_BAND else BIAS_GATHER, CAUSAL,
                                    HAS_KEY_MASK, DROPOUT, UPCAST, DRAW8, PV_SPLIT, PAIRS, kv_row0, kv_col, DESC,
                                    NEAR_STAGES, LEAN_TILES)
        acc, l_i, m_i = _fwd_region(acc, l_i, m_i, q, K, V, TABLE, KMASK, read_mask, hi_start, stop, lean_end,
                                    far_right, start_m, stride_kn, stride_kd, stride_vn, stride_vd, Lk, kv_len, R,
                                    qk_scale, band_w, seed, bh, n_cols, drop_below, HEAD_DIM, BLOCK_M, BLOCK_N,
                                    BIAS_CONST, CAUSAL, HAS_KEY_MASK, DROPOUT, UPCAST, DRAW8, PV_SPLIT, PAIRS, kv_row0,
                                    kv_col, DESC, None, LEAN_TILES)
    else:
        acc, l_i, m_i = _fwd_region(acc, l_i, m_i, q, K, V, TABLE, KMASK, read_mask, 0, stop, lean_end, 0.0, start_m,
                                    stride_kn, stride_kd, stride_vn, stride_vd, Lk, kv_len, R, qk_scale, band_w,
                                    seed, bh, n_cols, drop_below, HEAD_DIM, BLOCK_M, BLOCK_N, BIAS_NONE,
                                    CAUSAL, HAS_KEY_MASK, DROPOUT, UPCAST, DRAW8, PV_SPLIT, PAIRS, kv_row0, kv_col,
                                    DESC, None, LEAN_TILES)
    empty = l_i == 0.0  # no key to attend to: output 0, and lse = +inf makes the backward's P exactly 0
    l_safe = tl.where(empty, 1.0, l_i)
    out_scale = drop_scale / l_safe
    if PV_FP16:  # V came in times fp16_power(max |V|) (sumtune.fast_t5.fp16_values): divide it out, exactly
        out_scale = out_scale / fp16_power(tl.load(V_LARGEST).to(tl.float32))
    out = acc * out_scale[:, None]
    tl.store(O + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :] * stride_od,
             out.to(O.dtype.element_ty), mask=in_q[:, None])
    tl.store(LSE + bh.to(tl.int64) * Lq + offs_m, tl.where(empty, float("inf"), m_i + tl.math.log2(l_safe)),
             mask=in_q)


# The backward kernels live in flash_kernels_bwd: re-exported here, so that callers (flash_attention, flash_compile)
# find every kernel in this module.
from sumtune.fast_t5.flash_kernels_bwd import (  # noqa: E402,F401
    _dkdv_tiles, _dq_tiles, t5_attention_bwd_delta, t5_attention_dropout_mask, t5_flash_attention_bwd_dkdv,
    t5_flash_attention_bwd_dq)
