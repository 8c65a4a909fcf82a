"""The backward kernels of sumtune's Triton T5 attention (``flash_kernels`` has the design, the shared helpers and the
forward, and re-exports these): delta = rowsum(dO * O), dK/dV a key block per program (optionally storing dS for
the dQ GEMM), dQ a query block per program; and the dropout mask as the kernels draw it (a debugging aid).
"""

from __future__ import annotations

import triton
import triton.language as tl

from sumtune.fast_t5.bias_band import _band_tile
from sumtune.fast_t5.dropout_draws import PAIRS_WIDE_MUL, _counter_cols, _keep_pairs, _keep_tile
from sumtune.fast_t5.flash_common import (BIAS_BAND, BIAS_CONST, BIAS_GATHER, BIAS_NONE, _bias_tile,
                                         _biased_scores, _head_rows, _program_head, _row_keys)
from sumtune.triton_compat import interpreter_safe_dot as _dot


# ----------------------------------------------------------------------------- backward
@triton.jit
def t5_attention_bwd_delta(O, DO, DELTA, stride_ob, stride_oh, stride_om, stride_od,
                           stride_dob, stride_doh, stride_dom, stride_dod, H, Lq,
                           HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr):
    """delta[b, h, i] = sum_d O * dO (fp32): the row term of softmax's backward."""
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = bh % H
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    in_q = offs_m[:, None] < Lq
    o = tl.load(O + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :] * stride_od,
                mask=in_q, other=0.0).to(tl.float32)
    do = tl.load(DO + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_dom + offs_d[None, :] * stride_dod,
                 mask=in_q, other=0.0).to(tl.float32)
    tl.store(DELTA + bh.to(tl.int64) * Lq + offs_m, tl.sum(o * do, 1), mask=offs_m < Lq)


@triton.jit
def _dkdv_tiles(dk, dv, k, v, Q, DO, LSE, DELTA, TABLE, DS, start, stop, const, start_n, key_ok,
                stride_qm, stride_qd, stride_dom, stride_dod, stride_dsn, Lq, R, qk_scale, band_w,
                seed, stream, n_cols, drop_below, drop_scale,
                HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BIAS_MODE: tl.constexpr,
                CAUSAL: tl.constexpr, DROPOUT: tl.constexpr, UPCAST: tl.constexpr, DRAW8: tl.constexpr,
                STORE_DS: tl.constexpr, PAIRS: tl.constexpr, q_row0=0, q_col=0, DESC: tl.constexpr = False,
                lean_stop=0, LEAN_TILES: tl.constexpr = False):
    """The query tiles [start, stop) of one bias region: with LEAN_TILES those below ``lean_stop`` first, in a loop
    without masks (`_dkdv_loop`'s LEAN), then the rest with masks; the same tiles in the same order."""
    if LEAN_TILES:
        mid = tl.minimum(tl.maximum(lean_stop, start), stop)
        dk, dv = _dkdv_loop(dk, dv, k, v, Q, DO, LSE, DELTA, TABLE, DS, start, mid, const, start_n, key_ok,
                            stride_qm, stride_qd, stride_dom, stride_dod, stride_dsn, Lq, R, qk_scale, band_w,
                            seed, stream, n_cols, drop_below, drop_scale, HEAD_DIM, BLOCK_M, BLOCK_N, BIAS_MODE,
                            CAUSAL, DROPOUT, UPCAST, DRAW8, STORE_DS, PAIRS, q_row0, q_col, DESC, True, True)
        start = mid
    dk, dv = _dkdv_loop(dk, dv, k, v, Q, DO, LSE, DELTA, TABLE, DS, start, stop, const, start_n, key_ok,
                        stride_qm, stride_qd, stride_dom, stride_dod, stride_dsn, Lq, R, qk_scale, band_w,
                        seed, stream, n_cols, drop_below, drop_scale, HEAD_DIM, BLOCK_M, BLOCK_N, BIAS_MODE,
                        CAUSAL, DROPOUT, UPCAST, DRAW8, STORE_DS, PAIRS, q_row0, q_col, DESC, False,
                        LEAN_TILES)
    return dk, dv


@triton.jit
def _dkdv_loop(dk, dv, k, v, Q, DO, LSE, DELTA, TABLE, DS, start, stop, const, start_n, key_ok,
               stride_qm, stride_qd, stride_dom, stride_dod, stride_dsn, Lq, R, qk_scale, band_w,
               seed, stream, n_cols, drop_below, drop_scale,
               HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BIAS_MODE: tl.constexpr,
               CAUSAL: tl.constexpr, DROPOUT: tl.constexpr, UPCAST: tl.constexpr, DRAW8: tl.constexpr,
               STORE_DS: tl.constexpr, PAIRS: tl.constexpr, q_row0, q_col, DESC: tl.constexpr,
               LEAN: tl.constexpr, FOLD_DROP: tl.constexpr):
    """LEAN: every query of every tile is below Lq and every key of the block is kept (not causal): no mask and no
    select; with one bias value (or none) the scale, the bias and the row's log-sum-exp in the exponent's one
    multiply-add. FOLD_DROP (the kernel's LEAN_TILES, every loop of it): dropout's 1 / (1 - p) is left out of P and
    dP (delta divided by it instead), and the kernel applies it once to dK and dV, the dQ GEMM to its dS."""
    offs_d = tl.arange(0, HEAD_DIM)
    if DROPOUT and FOLD_DROP:
        delta_scale = 1.0 / drop_scale
    offs_n = start_n + tl.arange(0, BLOCK_N)
    for start_m in range(start, stop, BLOCK_M):
        start_m = tl.multiple_of(start_m, BLOCK_M)
        offs_m = start_m + tl.arange(0, BLOCK_M)
        in_q = offs_m < Lq
        if LEAN:
            lse = tl.load(LSE + offs_m)
            delta = tl.load(DELTA + offs_m)
        else:
            lse = tl.load(LSE + offs_m, mask=in_q, other=float("inf"))  # small loads and draws before the dots
            delta = tl.load(DELTA + offs_m, mask=in_q, other=0.0)
        if DROPOUT and FOLD_DROP:
            delta = delta * delta_scale
        if DROPOUT:
            if PAIRS:  # the same draws, built in this (keys, queries) layout: no exchange between threads
                kept = _keep_pairs(seed, stream, start_m, start_n, n_cols, drop_below, BLOCK_M, BLOCK_N, True,
                                   PAIRS == PAIRS_WIDE_MUL)
            else:  # transposed through shared memory; drawing it in this layout (2x the Philox work) was no faster
                kept = tl.trans(_keep_tile(seed, stream, start_m, start_n, n_cols, drop_below, BLOCK_M, BLOCK_N,
                                           DRAW8))
        if DESC:  # TMA: rows past Lq are the next row's queries (finite) or zeros; `keep` drops them below
            q_t = Q.load([q_row0 + start_m, q_col]).T
        elif LEAN:
            q_t = tl.load(Q + offs_m[None, :] * stride_qm + offs_d[:, None] * stride_qd)
        else:
            q_t = tl.load(Q + offs_m[None, :] * stride_qm + offs_d[:, None] * stride_qd, mask=in_q[None, :],
                          other=0.0)
        if LEAN and (BIAS_MODE == BIAS_CONST or BIAS_MODE == BIAS_NONE):
            p_t = tl.math.exp2(_dot(k, q_t, UPCAST) * qk_scale + (const - lse)[None, :])  # (keys, queries)
        else:
            s_t = _dot(k, q_t, UPCAST) * qk_scale  # (keys, queries)
            if BIAS_MODE == BIAS_BAND:
                s_t += _band_tile(TABLE, start_m - start_n, band_w, BLOCK_N, BLOCK_M)
            else:
                s_t += _bias_tile(TABLE, offs_n[:, None] - offs_m[None, :], const, BIAS_MODE)
            if LEAN:
                p_t = tl.math.exp2(s_t - lse[None, :])
            else:
                keep = key_ok[:, None] & in_q[None, :]  # rows past Lq (whose bias reads the margin) count nowhere
                if CAUSAL:
                    keep = keep & (offs_m[None, :] >= offs_n[:, None])
                p_t = tl.math.exp2(tl.where(keep, s_t, float("-inf")) - lse[None, :])
        if DESC:
            do = DO.load([q_row0 + start_m, q_col])
        elif LEAN:
            do = tl.load(DO + offs_m[:, None] * stride_dom + offs_d[None, :] * stride_dod)
        else:
            do = tl.load(DO + offs_m[:, None] * stride_dom + offs_d[None, :] * stride_dod, mask=in_q[:, None],
                         other=0.0)
        dp_t = _dot(v, tl.trans(do), UPCAST)
        if DROPOUT and FOLD_DROP:
            pd_t = tl.where(kept, p_t, 0.0)
            dp_t = tl.where(kept, dp_t, 0.0)
        elif DROPOUT:
            pd_t = tl.where(kept, p_t * drop_scale, 0.0)
            dp_t = tl.where(kept, dp_t * drop_scale, 0.0)
        else:
            pd_t = p_t
        dv = _dot(pd_t.to(do.dtype), do, UPCAST, dv)
        ds_t = (p_t * (dp_t - delta[None, :])).to(q_t.dtype)
        dk = _dot(ds_t, tl.trans(q_t), UPCAST, dk)
        if STORE_DS:  # (keys, queries) rows of dSᵀ, whose buffer is padded to whole tiles: no mask
            tl.store(DS + offs_n[:, None] * stride_dsn + offs_m[None, :], ds_t)
    return dk, dv


@triton.jit
def _zero_ds(DS, start, stop, start_n, stride_dsn, dtype: tl.constexpr, BLOCK_M: tl.constexpr,
             BLOCK_N: tl.constexpr):
    """Zeros into dSᵀ for these keys and the query blocks in [start, stop) that no tile visits (all masked)."""
    offs_n = start_n + tl.arange(0, BLOCK_N)
    zeros = tl.zeros([BLOCK_N, BLOCK_M], dtype=dtype)
    for start_m in range(start, stop, BLOCK_M):
        tl.store(DS + offs_n[:, None] * stride_dsn + (start_m + tl.arange(0, BLOCK_M))[None, :], zeros)


@triton.jit
def t5_flash_attention_bwd_dkdv(Q, K, V, DO, DK, DV, LSE, DELTA, TABLE, KMASK, KV_LEN, DS, stride_qb, stride_qh,
                                stride_qm, stride_qd, stride_kb, stride_kh, stride_kn, stride_kd, stride_vb,
                                stride_vh, stride_vn, stride_vd, stride_dob, stride_doh, stride_dom, stride_dod,
                                stride_dkb, stride_dkh, stride_dkn, stride_dkd, stride_dvb, stride_dvh, stride_dvn,
                                stride_dvd, stride_dsb, stride_dsh, stride_dsn, stride_mask_b, H, Lq, Lk, R,
                                table_row, table_zero, qk_scale, scale,
                                SEED, drop_below, drop_scale, len_key, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
                                BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, HAS_BIAS: tl.constexpr,
                                HAS_KEY_MASK: tl.constexpr, DROPOUT: tl.constexpr, UPCAST: tl.constexpr,
                                DRAW8: tl.constexpr = False, STORE_DS: tl.constexpr = False,
                                PAIRS: tl.constexpr = False, BAND=0, band_w=0, band_head=0,
                                USE_BAND: tl.constexpr = False, DESC: tl.constexpr = False,
                                LEAN_TILES: tl.constexpr = False):
    """With DESC, Q and DO are TMA descriptors over the (B * Lq, H * HEAD_DIM) rows of the queries and the output's
    gradient instead of pointers; the same sums in the same order. With LEAN_TILES (not causal), a key block whose
    every key is kept runs its whole query tiles (all but a last partial one) in loops without masks, and dropout's
    scale multiplies dK and dV once (the stored dS leaves it to the dQ GEMM: `flash_attention._dq_from_ds`)."""
    start_n = tl.program_id(0) * BLOCK_N
    bh, b, h, seed = _program_head(SEED, H, DROPOUT)
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    in_k = offs_n < Lk
    k = _head_rows(K, b, h, offs_n, offs_d, stride_kb, stride_kh, stride_kn, stride_kd, in_k)
    v = _head_rows(V, b, h, offs_n, offs_d, stride_vb, stride_vh, stride_vn, stride_vd, in_k)
    if HAS_KEY_MASK:
        kv_len = tl.load(KV_LEN + b)
        key_ok = (offs_n < kv_len) & (tl.load(KMASK + b * stride_mask_b + offs_n, mask=in_k, other=0) != 0)
    else:
        kv_len = Lk
        key_ok = in_k
    q_row0 = (b * Lq).to(tl.int32)  # DESC: the row's first query, and the head's first column
    q_col = h * HEAD_DIM
    if not DESC:
        Q += b * stride_qb + h * stride_qh
        DO += b * stride_dob + h * stride_doh
    LSE += bh.to(tl.int64) * Lq
    DELTA += bh.to(tl.int64) * Lq
    if STORE_DS:
        DS += b * stride_dsb + h.to(tl.int64) * stride_dsh
    start = 0
    if CAUSAL:
        start = (start_n // BLOCK_M) * BLOCK_M  # query blocks entirely above the diagonal see none of these keys
    stop = tl.where(start_n < kv_len, Lq, start)  # keys past the row's length: zero gradient, no work
    n_cols = _counter_cols(Lk, DRAW8, PAIRS)
    dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    lean_stop = 0  # LEAN_TILES: query tiles [0, lean_stop) lie below Lq, and none of this block's keys is masked
    if LEAN_TILES:
        tl.static_assert(not CAUSAL, "lean tiles assume every query sees every key of the block")
        lean_stop = tl.where(tl.min(key_ok.to(tl.int32), 0) > 0, (Lq // BLOCK_M) * BLOCK_M, 0)
    if HAS_BIAS:
        TABLE += h * table_row + table_zero  # TABLE[d]: bias at offset d = j - i
        far_left = tl.load(TABLE + tl.maximum(-R, 1 - Lq))  # the bias of every offset <= -R
        far_right = tl.load(TABLE + tl.minimum(R, Lk - 1))  # the bias of every offset >= +R
        # query tiles that see these keys at offsets all >= +R (first) or all <= -R (last) share one bias value
        hi_end = tl.maximum(tl.minimum((tl.maximum(start_n - R + 1, 0) // BLOCK_M) * BLOCK_M, stop), start)
        lo_start = tl.maximum(tl.minimum(tl.cdiv(start_n + BLOCK_N - 1 + R, BLOCK_M) * BLOCK_M, stop), hi_end)
        dk, dv = _dkdv_tiles(dk, dv, k, v, Q, DO, LSE, DELTA, TABLE, DS, start, hi_end, far_right, start_n,
                             key_ok, stride_qm, stride_qd, stride_dom, stride_dod, stride_dsn, Lq, R, qk_scale, band_w,
                             seed, bh, n_cols, drop_below, drop_scale, HEAD_DIM, BLOCK_M, BLOCK_N, BIAS_CONST, CAUSAL,
                             DROPOUT, UPCAST, DRAW8, STORE_DS, PAIRS, q_row0, q_col, DESC, lean_stop,
                             LEAN_TILES)
        dk, dv = _dkdv_tiles(dk, dv, k, v, Q, DO, LSE, DELTA, BAND + h * band_head if USE_BAND else TABLE, DS,
                             hi_end, lo_start, 0.0, start_n,
                             key_ok, stride_qm, stride_qd, stride_dom, stride_dod, stride_dsn, Lq, R, qk_scale, band_w,
                             seed, bh, n_cols, drop_below, drop_scale, HEAD_DIM, BLOCK_M, BLOCK_N,
                             BIAS_BAND if USE_BAND else BIAS_GATHER, CAUSAL,
                             DROPOUT, UPCAST, DRAW8, STORE_DS, PAIRS, q_row0, q_col, DESC, lean_stop,
                             LEAN_TILES)
        dk, dv = _dkdv_tiles(dk, dv, k, v, Q, DO, LSE, DELTA, TABLE, DS, lo_start, stop, far_left, start_n,
                             key_ok, stride_qm, stride_qd, stride_dom, stride_dod, stride_dsn, Lq, R, qk_scale, band_w,
                             seed, bh, n_cols, drop_below, drop_scale, HEAD_DIM, BLOCK_M, BLOCK_N, BIAS_CONST, False,
                             DROPOUT, UPCAST, DRAW8, STORE_DS, PAIRS, q_row0, q_col, DESC, lean_stop,
                             LEAN_TILES)
    else:
        dk, dv = _dkdv_tiles(dk, dv, k, v, Q, DO, LSE, DELTA, TABLE, DS, start, stop, 0.0, start_n,
                             key_ok, stride_qm, stride_qd, stride_dom, stride_dod, stride_dsn, Lq, R, qk_scale, band_w,
                             seed, bh, n_cols, drop_below, drop_scale, HEAD_DIM, BLOCK_M, BLOCK_N, BIAS_NONE, CAUSAL,
                             DROPOUT, UPCAST, DRAW8, STORE_DS, PAIRS, q_row0, q_col, DESC, lean_stop,
                             LEAN_TILES)
    if STORE_DS:  # query blocks no tile visited: above the diagonal, or every query of keys past the row's length
        _zero_ds(DS, 0, start, start_n, stride_dsn, DS.dtype.element_ty, BLOCK_M, BLOCK_N)
        _zero_ds(DS, stop, Lq, start_n, stride_dsn, DS.dtype.element_ty, BLOCK_M, BLOCK_N)
    if DROPOUT and LEAN_TILES:  # the loops left dropout's scale out (FOLD_DROP)
        dk = dk * (scale * drop_scale)
        dv = dv * drop_scale
    else:
        dk = dk * scale
    tl.store(DK + b * stride_dkb + h * stride_dkh + offs_n[:, None] * stride_dkn + offs_d[None, :] * stride_dkd,
             dk.to(DK.dtype.element_ty), mask=in_k[:, None])
    tl.store(DV + b * stride_dvb + h * stride_dvh + offs_n[:, None] * stride_dvn + offs_d[None, :] * stride_dvd,
             dv.to(DV.dtype.element_ty), mask=in_k[:, None])


@triton.jit
def _dq_tiles(dq, q, do, lse, delta, K, V, TABLE, KMASK, read_mask, start, stop, const, start_m,
              stride_kn, stride_kd, stride_vn, stride_vd, Lk, kv_len, R, qk_scale, band_w,
              seed, stream, n_cols, drop_below, drop_scale,
              HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BIAS_MODE: tl.constexpr,
              CAUSAL: tl.constexpr, HAS_KEY_MASK: tl.constexpr, DROPOUT: tl.constexpr, UPCAST: tl.constexpr,
              DRAW8: tl.constexpr, PAIRS: tl.constexpr):
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    for start_n in range(start, stop, BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        offs_n = start_n + tl.arange(0, BLOCK_N)
        in_k = offs_n < Lk
        key_ok = offs_n < kv_len  # mask and draws before the dots, as in the forward
        if HAS_KEY_MASK:
            if read_mask:
                key_ok = key_ok & (tl.load(KMASK + offs_n, mask=in_k, other=0) != 0)
        if DROPOUT:
            kept = _keep_tile(seed, stream, start_m, start_n, n_cols, drop_below, BLOCK_M, BLOCK_N, DRAW8, PAIRS)
        k_t = tl.load(K + offs_n[None, :] * stride_kn + offs_d[:, None] * stride_kd, mask=in_k[None, :], other=0.0)
        v_t = tl.load(V + offs_n[None, :] * stride_vn + offs_d[:, None] * stride_vd, mask=in_k[None, :], other=0.0)
        s = _biased_scores(q, k_t, TABLE, const, start_m, start_n, offs_m, offs_n, qk_scale, band_w, BIAS_MODE,
                           BLOCK_M, BLOCK_N, UPCAST)
        keep = key_ok[None, :]
        if CAUSAL:
            keep = keep & (offs_n[None, :] <= offs_m[:, None])
        p = tl.math.exp2(tl.where(keep, s, float("-inf")) - lse[:, None])
        dp = _dot(do, v_t, UPCAST)
        if DROPOUT:
            dp = tl.where(kept, dp * drop_scale, 0.0)
        ds = p * (dp - delta[:, None])
        dq = _dot(ds.to(k_t.dtype), tl.trans(k_t), UPCAST, dq)
    return dq


@triton.jit
def t5_flash_attention_bwd_dq(Q, K, V, DO, DQ, LSE, DELTA, TABLE, KMASK, KV_LEN, stride_qb, stride_qh, stride_qm,
                              stride_qd, stride_kb, stride_kh, stride_kn, stride_kd, stride_vb, stride_vh, stride_vn,
                              stride_vd, stride_dob, stride_doh, stride_dom, stride_dod, stride_dqb, stride_dqh,
                              stride_dqm, stride_dqd, stride_mask_b, H, Lq, Lk, R, table_row, table_zero, qk_scale,
                              scale, SEED, drop_below, drop_scale, len_key, HEAD_DIM: tl.constexpr,
                              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr,
                              HAS_BIAS: tl.constexpr, HAS_KEY_MASK: tl.constexpr, DROPOUT: tl.constexpr,
                              UPCAST: tl.constexpr, DRAW8: tl.constexpr = False, PAIRS: tl.constexpr = False,
                              CHECK_HOLES: tl.constexpr = False, HOLES=0, BAND=0, band_w=0, band_head=0,
                              USE_BAND: tl.constexpr = False):
    start_m = tl.program_id(0) * BLOCK_M
    bh, b, h, seed = _program_head(SEED, H, DROPOUT)
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    in_q = offs_m < Lq
    q = _head_rows(Q, b, h, offs_m, offs_d, stride_qb, stride_qh, stride_qm, stride_qd, in_q)
    do = _head_rows(DO, b, h, offs_m, offs_d, stride_dob, stride_doh, stride_dom, stride_dod, in_q)
    lse = tl.load(LSE + bh.to(tl.int64) * Lq + offs_m, mask=in_q, other=float("inf"))
    delta = tl.load(DELTA + bh.to(tl.int64) * Lq + offs_m, mask=in_q, other=0.0)
    K += b * stride_kb + h * stride_kh
    V += b * stride_vb + h * stride_vh
    kv_len, KMASK, stop = _row_keys(KV_LEN, KMASK, b, stride_mask_b, Lk, start_m, HAS_KEY_MASK, CAUSAL, BLOCK_M)
    n_cols = _counter_cols(Lk, DRAW8, PAIRS)
    dq = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    read_mask = True  # as the forward: with CHECK_HOLES, no mask read in a row padded only at its end
    if CHECK_HOLES:
        read_mask = tl.load(HOLES + b) != 0
    if HAS_BIAS:
        TABLE += h * table_row + table_zero  # TABLE[d]: bias at offset d = j - i
        far_left = tl.load(TABLE + tl.maximum(-R, 1 - Lq))  # the bias of every offset <= -R
        far_right = tl.load(TABLE + tl.minimum(R, Lk - 1))  # the bias of every offset >= +R
        lo_end = tl.minimum((tl.maximum(start_m - R + 1, 0) // BLOCK_N) * BLOCK_N, stop)
        hi_start = tl.maximum(tl.minimum(tl.cdiv(start_m + BLOCK_M - 1 + R, BLOCK_N) * BLOCK_N, stop), lo_end)
        dq = _dq_tiles(dq, q, do, lse, delta, K, V, TABLE, KMASK, read_mask, 0, lo_end, far_left, start_m,
                       stride_kn, stride_kd, stride_vn, stride_vd, Lk, kv_len, R, qk_scale, band_w, seed, bh, n_cols,
                       drop_below, drop_scale, HEAD_DIM, BLOCK_M, BLOCK_N, BIAS_CONST, False, HAS_KEY_MASK,
                       DROPOUT, UPCAST, DRAW8, PAIRS)
        dq = _dq_tiles(dq, q, do, lse, delta, K, V, BAND + h * band_head if USE_BAND else TABLE, KMASK, read_mask,
                       lo_end, hi_start, 0.0, start_m,
                       stride_kn, stride_kd, stride_vn, stride_vd, Lk, kv_len, R, qk_scale, band_w, seed, bh, n_cols,
                       drop_below, drop_scale, HEAD_DIM, BLOCK_M, BLOCK_N,
                       BIAS_BAND if USE_BAND else BIAS_GATHER, CAUSAL, HAS_KEY_MASK,
                       DROPOUT, UPCAST, DRAW8, PAIRS)
        dq = _dq_tiles(dq, q, do, lse, delta, K, V, TABLE, KMASK, read_mask, hi_start, stop, far_right, start_m,
                       stride_kn, stride_kd, stride_vn, stride_vd, Lk, kv_len, R, qk_scale, band_w, seed, bh, n_cols,
                       drop_below, drop_scale, HEAD_DIM, BLOCK_M, BLOCK_N, BIAS_CONST, CAUSAL, HAS_KEY_MASK,
                       DROPOUT, UPCAST, DRAW8, PAIRS)
    else:
        dq = _dq_tiles(dq, q, do, lse, delta, K, V, TABLE, KMASK, read_mask, 0, stop, 0.0, start_m,
                       stride_kn, stride_kd, stride_vn, stride_vd, Lk, kv_len, R, qk_scale, band_w, seed, bh, n_cols,
                       drop_below, drop_scale, HEAD_DIM, BLOCK_M, BLOCK_N, BIAS_NONE, CAUSAL, HAS_KEY_MASK,
                       DROPOUT, UPCAST, DRAW8, PAIRS)
    tl.store(DQ + b * stride_dqb + h * stride_dqh + offs_m[:, None] * stride_dqm + offs_d[None, :] * stride_dqd,
             (dq * scale).to(DQ.dtype.element_ty), mask=in_q[:, None])


# ----------------------------------------------------------------------------- debugging aid
@triton.jit
def t5_attention_dropout_mask(MASK, H, Lq, Lk, SEED, drop_below, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                              DRAW8: tl.constexpr = False, PAIRS: tl.constexpr = False):
    """MASK[b, h, i, j] = 1 where the attention kernels keep element (i, j), 0 where they drop it."""
    start_m = tl.program_id(0) * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    start_n = tl.program_id(1) * BLOCK_N
    bh = tl.program_id(2)
    offs_n = start_n + tl.arange(0, BLOCK_N)
    keep = _keep_tile(tl.load(SEED), bh, start_m, start_n, _counter_cols(Lk, DRAW8, PAIRS), drop_below, BLOCK_M,
                      BLOCK_N, DRAW8, PAIRS)
    tl.store(MASK + bh.to(tl.int64) * Lq * Lk + offs_m[:, None] * Lk + offs_n[None, :], keep.to(tl.int8),
             mask=(offs_m[:, None] < Lq) & (offs_n[None, :] < Lk))
