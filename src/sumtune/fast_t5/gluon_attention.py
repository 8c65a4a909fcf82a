"""T5 attention's forward in Gluon, with asynchronous warpgroup MMAs (Hopper): measured, and off (no faster).

`sumtune.fast_t5.flash_attention.GLUON_FORWARD` (default False; benchmark token `gluonfwd`) sends the forwards this
kernel covers here instead of to the Triton forward (`flash_kernels.t5_flash_attention_fwd`); the backward stays
Triton's and reads this forward's output and log-sum-exp, so both must draw the same dropout (they do: the same
paired Philox draws, `dropout_draws._keep_pairs`, built here in the accumulator's own layout).

Why: the Triton kernels are bound by the ALU work of T5's bias, padding and dropout, and Triton 3.6 waits for every
`wgmma` as soon as it is issued (sm_90 PTX: `wgmma.wait_group 0` after each), so the tensor cores idle while the
softmax runs. Here, per query block, the next key tile's Q·Kᵀ is issued before this tile's softmax, and this tile's
P·V is left in flight while the next scores are awaited (FlashAttention-3's intra-warpgroup overlap); K and V come
by cp.async into rings of two. Compiled for sm_90 (on any machine, `compile_for_sm90`): the loop keeps one wgmma
group in flight, (64, 64, 4 warps) 213 registers and 80 KiB of shared memory, no spill.

Measured on an H200 (2026-12-03, benchmarks/gluon_attention.py and attention_kernels.py): the same outputs and
log-sum-exps as the Triton forward (bit for bit at head_dim 128), but 2.38 vs 2.51 ms at 32x32x1024x128 and 4.80 vs
4.19 ms at 4x32x4096x128, so the flag stays off: the MMAs' overlap with the softmax was not what held the forward.

Covered: bf16 Q/K (V bf16, or its float16 copy with PV_FP16/PV_SPLIT as the Triton forward takes it), head_dim 64
or 128, not causal, Lq and Lk free (cross-attention too), T5's bias table (one value for far tiles), key padding
(lengths; the mask read only in rows with holes), dropout with 16-bit paired draws. The rest goes to Triton
(`supports`). Gluon has no interpreter: nothing runs this kernel on a CPU; the GPU tests compare it with Triton's.
"""

from __future__ import annotations

import functools

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (
    async_copy, fence_async_shared, warpgroup_mma, warpgroup_mma_init, warpgroup_mma_wait)

PHILOX_M = gl.constexpr(0xD256D193)  # Random123's Philox-2x32, 7 rounds: dropout_draws' constants
PHILOX_W = gl.constexpr(0x9E3779B9)
PHILOX_ROUNDS = gl.constexpr(7)
BLOCKS = (64, 64, 4)  # (BLOCK_M, BLOCK_N, num_warps): not tuned yet
# Names that moved between Triton 3.6 (the GPU image's) and 3.9: cp.async into shared memory, the block barrier
_async_load = getattr(async_copy, "async_load", None) or async_copy.async_copy_global_to_shared
_barrier = getattr(gl, "barrier", None) or gl.thread_barrier


@gluon.jit
def _philox2x32(key, c0, c1):
    for _ in gl.static_range(PHILOX_ROUNDS):
        hi = gl.umulhi(c0, PHILOX_M)
        lo = c0 * PHILOX_M
        c0 = hi ^ c1 ^ key
        c1 = lo
        key = key + PHILOX_W
    return c0, c1


@gluon.jit
def _keep_pairs(seed, stream, start_i, start_j, n_cols, drop_below, BLOCK_I: gl.constexpr, BLOCK_J: gl.constexpr,
                pair_layout: gl.constexpr, s_layout: gl.constexpr):
    """`dropout_draws._keep_pairs` (queries first), on the (BLOCK_I/2, BLOCK_J/2) counter grid in the layout whose
    expansion is the score accumulator's: the conversion at the end moves nothing (asserted at compile time)."""
    rows = start_i // 2 + gl.arange(0, BLOCK_I // 2, layout=gl.SliceLayout(1, pair_layout))
    cols = start_j // 2 + gl.arange(0, BLOCK_J // 2, layout=gl.SliceLayout(0, pair_layout))
    counter = rows[:, None] * n_cols + cols[None, :]
    zero = gl.zeros([BLOCK_I // 2, BLOCK_J // 2], gl.uint32, layout=pair_layout)
    w0, w1 = _philox2x32(zero + seed.to(gl.uint32), counter.to(gl.uint32, bitcast=True),
                         zero + stream.to(gl.uint32, bitcast=True))
    near = (w0 & 0xFFFF).to(gl.int32) >= drop_below
    far_key = (w0 >> 16).to(gl.int32) >= drop_below
    far_query = (w1 & 0xFFFF).to(gl.int32) >= drop_below
    far_both = (w1 >> 16).to(gl.int32) >= drop_below
    keep = gl.join(gl.join(near, far_key), gl.join(far_query, far_both))  # (rows, cols, +8 key, +8 query)
    keep = gl.reshape(keep, (BLOCK_I // 16, 8, BLOCK_J // 16, 8, 2, 2))
    keep = gl.permute(keep, (0, 5, 1, 2, 4, 3))
    keep = gl.reshape(keep, (BLOCK_I, BLOCK_J))
    return gl.convert_layout(keep, s_layout, assert_trivial=True)


@gluon.jit
def _fp16_power(largest):
    """`fp16_values.fp16_power`: 2^e with largest * 2^e in [2^14, 2^15)."""
    bits = gl.maximum(largest, 2.0**-100).to(gl.int32, bitcast=True)
    exponent = ((bits >> 23) & 0xFF) - 127
    return ((127 + 14 - exponent) << 23).to(gl.float32, bitcast=True)


@gluon.jit
def _load_tile(buffer, BASE, offs, stride_n, offs_d, limit):
    """Rows `offs` of a (rows, HEAD_DIM) operand into `buffer` by cp.async (rows at or past `limit` zero): one group."""
    pointers = BASE + offs[:, None] * stride_n + offs_d[None, :]
    _async_load(buffer, pointers, mask=(offs < limit)[:, None])
    async_copy.commit_group()


@gluon.jit
def t5_gluon_attention_fwd(Q, K, V, O, LSE, TABLE, KMASK, KV_LEN, HOLES, V_LARGEST, SEED,
                           stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh,
                           stride_vn, stride_ob, stride_oh, stride_om, stride_mask_b, H, Lq, Lk, R, table_row,
                           table_zero, qk_scale, drop_below, drop_scale, n_cols,
                           HEAD_DIM: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
                           HAS_BIAS: gl.constexpr, HAS_KEY_MASK: gl.constexpr, DROPOUT: gl.constexpr,
                           PV_FP16: gl.constexpr, PV_SPLIT: gl.constexpr, num_warps: gl.constexpr):
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                       instr_shape=[16, BLOCK_N, 16])
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                       instr_shape=[16, HEAD_DIM, 16])
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    load_layout: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [num_warps, 1], [1, 0])
    pair_layout: gl.constexpr = gl.BlockedLayout([1, 2], [8, 4], [num_warps, 1], [1, 0])
    tile_smem: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=16, rank=2)
    v_dtype: gl.constexpr = V.dtype.element_ty

    start_m = gl.program_id(0) * BLOCK_M
    bh = gl.program_id(1)
    b = (bh // H).to(gl.int64)
    h = bh % H
    seed = 0
    if DROPOUT:
        seed = gl.load(SEED)  # drawn on the device by torch's generator, as for the Triton kernels
    kv_len = Lk
    read_mask = False
    if HAS_KEY_MASK:
        kv_len = gl.load(KV_LEN + b)
        read_mask = gl.load(HOLES + b) != 0  # a row padded only at its end needs its length alone
        KMASK += b * stride_mask_b

    offs_d = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, load_layout))
    offs_ml = start_m + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, load_layout))
    q = gl.load(Q + b * stride_qb + h * stride_qh + offs_ml[:, None] * stride_qm + offs_d[None, :],
                mask=(offs_ml < Lq)[:, None], other=0.0)
    q_smem = gl.allocate_shared_memory(gl.bfloat16, [BLOCK_M, HEAD_DIM], tile_smem, q)
    k_smem = gl.allocate_shared_memory(gl.bfloat16, [2, BLOCK_N, HEAD_DIM], tile_smem)
    v_smem = gl.allocate_shared_memory(v_dtype, [2, BLOCK_N, HEAD_DIM], tile_smem)
    K += b * stride_kb + h * stride_kh
    V += b * stride_vb + h * stride_vh
    rows_n = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, load_layout))

    offs_m = start_m + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, s_layout))
    cols_n = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s_layout))
    far_left = 0.0
    far_right = 0.0
    if HAS_BIAS:
        TABLE += h * table_row + table_zero  # TABLE[d]: the bias (log2 units) at offset d = j - i
        far_left = gl.load(TABLE + gl.maximum(-R, 1 - Lq))  # every offset <= -R
        far_right = gl.load(TABLE + gl.minimum(R, Lk - 1))  # every offset >= +R

    n_tiles = gl.cdiv(kv_len, BLOCK_N)
    # Prologue: K(0), K(1), V(0) in flight (three cp.async groups), S(0) = Q K(0)^T done.
    _load_tile(k_smem.index(0), K, rows_n, stride_kn, offs_d, kv_len)
    _load_tile(k_smem.index(1), K, BLOCK_N + rows_n, stride_kn, offs_d, kv_len)
    _load_tile(v_smem.index(0), V, rows_n, stride_vn, offs_d, kv_len)
    async_copy.wait_group(2)
    _barrier()
    fence_async_shared()
    zero_s = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, layout=s_layout)
    s_raw = warpgroup_mma(q_smem, k_smem.index(0).permute((1, 0)), zero_s, use_acc=False, is_async=True)
    s_raw = warpgroup_mma_wait(num_outstanding=0, deps=(s_raw,))

    m_i = gl.full([BLOCK_M], float("-inf"), gl.float32, layout=gl.SliceLayout(1, s_layout))
    l_i = gl.zeros([BLOCK_M], gl.float32, layout=gl.SliceLayout(1, s_layout))
    acc = warpgroup_mma_init(gl.zeros([BLOCK_M, HEAD_DIM], gl.float32, layout=o_layout))  # loop-carried as async
    # P's registers feed an asynchronous P·V: they stay alive (through the wait's deps) until that GEMM is done
    p_prev = gl.zeros([BLOCK_M, BLOCK_N], v_dtype, layout=p_layout)
    p_prev_low = gl.zeros([BLOCK_M, BLOCK_N], v_dtype, layout=p_layout)
    for j in range(0, n_tiles):
        start_n = j * BLOCK_N
        cur = j % 2
        nxt = 1 - cur
        # K(j+1) has landed (V(j) may not have): S(j+1) goes to the tensor cores; K(j+2) where K(j) was
        async_copy.wait_group(1)
        _barrier()
        fence_async_shared()
        s_next = warpgroup_mma(q_smem, k_smem.index(nxt).permute((1, 0)), zero_s, use_acc=False, is_async=True)
        _load_tile(k_smem.index(cur), K, start_n + 2 * BLOCK_N + rows_n, stride_kn, offs_d, kv_len)

        # this tile's softmax on the ALUs while S(j+1) and P(j-1)·V(j-1) run (as the Triton forward computes it)
        offs_n = start_n + cols_n
        s = s_raw * qk_scale
        if HAS_BIAS:
            if start_n + BLOCK_N - 1 - start_m <= -R:
                s = s + far_left
            elif start_n - (start_m + BLOCK_M - 1) >= R:
                s = s + far_right
            else:
                s = s + gl.load(TABLE + (offs_n[None, :] - offs_m[:, None]))
        key_ok = offs_n < kv_len
        if HAS_KEY_MASK:
            if read_mask:
                key_ok = key_ok & (gl.load(KMASK + offs_n, mask=offs_n < Lk, other=0) != 0)
        s = gl.where(key_ok[None, :], s, float("-inf"))
        m_new = gl.maximum(m_i, gl.max(s, 1))
        m_use = gl.where(m_new == float("-inf"), 0.0, m_new)  # a row masked so far: exp2(-inf - 0) = 0, no NaN
        p = gl.exp2(s - m_use[:, None])
        alpha = gl.exp2(m_i - m_use)
        l_i = l_i * alpha + gl.sum(p, 1)
        m_i = m_new
        if DROPOUT:  # the denominator counts every key; dropout acts on the normalised probabilities
            kept = _keep_pairs(seed, bh, start_m, start_n, n_cols, drop_below, BLOCK_M, BLOCK_N, pair_layout,
                               s_layout)
            p = gl.where(kept, p, 0.0)
        p_high = p.to(v_dtype)
        p_op = gl.convert_layout(p_high, p_layout)

        # P(j-1)·V(j-1) done (S(j+1) may run on): V(j+1) goes where V(j-1) was, once V(j) has landed
        acc, p_prev, p_prev_low = warpgroup_mma_wait(num_outstanding=1, deps=(acc, p_prev, p_prev_low))
        async_copy.wait_group(1)
        _barrier()
        fence_async_shared()
        _load_tile(v_smem.index(nxt), V, start_n + BLOCK_N + rows_n, stride_vn, offs_d, kv_len)
        acc = acc * gl.convert_layout(alpha, gl.SliceLayout(1, o_layout))[:, None]
        acc = warpgroup_mma(p_op, v_smem.index(cur), acc, is_async=True)
        p_prev = p_op
        if PV_SPLIT:  # P = high + low, each in V's dtype: ~22 bits of P with float16 V, for one more GEMM
            p_prev_low = gl.convert_layout((p - p_high.to(gl.float32)).to(v_dtype), p_layout)
            acc = warpgroup_mma(p_prev_low, v_smem.index(cur), acc, is_async=True)
            s_raw = warpgroup_mma_wait(num_outstanding=2, deps=(s_next,))
        else:
            s_raw = warpgroup_mma_wait(num_outstanding=1, deps=(s_next,))
    acc, p_prev, p_prev_low = warpgroup_mma_wait(num_outstanding=0, deps=(acc, p_prev, p_prev_low))
    async_copy.wait_group(0)

    empty = l_i == 0.0  # no key to attend to: output 0, and lse = +inf makes the backward's P exactly 0
    l_safe = gl.where(empty, 1.0, l_i)
    out_scale = drop_scale / l_safe
    if PV_FP16:  # V came in times fp16_power(max |V|): divide it out, exactly
        out_scale = out_scale / _fp16_power(gl.load(V_LARGEST).to(gl.float32))
    out = acc * gl.convert_layout(out_scale, gl.SliceLayout(1, o_layout))[:, None]
    offs_mo = start_m + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, o_layout))
    offs_do = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, o_layout))
    gl.store(O + b * stride_ob + h * stride_oh + offs_mo[:, None] * stride_om + offs_do[None, :],
             out.to(O.dtype.element_ty), mask=(offs_mo < Lq)[:, None])
    gl.store(LSE + bh.to(gl.int64) * Lq + offs_m, gl.where(empty, float("inf"), m_i + gl.log2(l_safe)),
             mask=offs_m < Lq)


@functools.cache
def _hopper(device_index: int) -> bool:
    return torch.cuda.get_device_capability(device_index)[0] == 9


def supports(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool, draw_bits: int, pairs: bool,
             dropout_p: float) -> bool:
    """Whether this kernel covers the call (first match: otherwise the Triton forward runs)."""
    return (q.is_cuda and _hopper(q.device.index or 0) and not causal and q.dtype == k.dtype == torch.bfloat16
            and q.shape[-1] in (64, 128) and q.stride(-1) == k.stride(-1) == v.stride(-1) == 1
            and (dropout_p == 0 or (draw_bits == 16 and pairs)))


def forward(q, k, v, out, lse, table, table_geometry, radius, mask, lengths, holes, qk_scale, seed, drop_below,
            drop_scale, largest, pv_fp16: bool, pv_split: bool, dropout: bool) -> None:
    """The Triton forward's launch, here: `out` and `lse` are written (v is the float16 copy with `pv_fp16`)."""
    batch, heads, query_len, head_dim = q.shape
    key_len = k.shape[2]
    block_m, block_n, num_warps = BLOCKS
    dummy = lse
    t5_gluon_attention_fwd[(triton.cdiv(query_len, block_m), batch * heads)](
        q, k, v, out, lse, table if table is not None else dummy, mask if mask is not None else dummy,
        lengths if lengths is not None else dummy, holes if holes is not None else dummy,
        largest if largest is not None else dummy, seed,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1),
        v.stride(2), out.stride(0), out.stride(1), out.stride(2), mask.stride(0) if mask is not None else 0,
        heads, query_len, key_len, radius, *table_geometry, qk_scale, drop_below, drop_scale,
        triton.cdiv(key_len, 16) * 8,  # dropout_draws._counter_cols with PAIRS
        HEAD_DIM=head_dim, BLOCK_M=block_m, BLOCK_N=block_n, HAS_BIAS=table is not None,
        HAS_KEY_MASK=mask is not None, DROPOUT=dropout, PV_FP16=pv_fp16, PV_SPLIT=pv_split, num_warps=num_warps)


_SIGNATURE = dict(Q="*bf16", K="*bf16", V="*bf16", O="*bf16", LSE="*fp32", TABLE="*fp32", KMASK="*i8",
                  KV_LEN="*i32", HOLES="*i8", V_LARGEST="*bf16", SEED="*i64", qk_scale="fp32", drop_scale="fp32")


def compile_for_sm90(block_m: int = 64, block_n: int = 64, num_warps: int = 4, head_dim: int = 128, **flags):
    """triton.compile for sm_90 on any machine (no GPU), specialised as a T5 launch would be (pointers and strides
    divisible by 16); `flags` override HAS_BIAS/HAS_KEY_MASK/DROPOUT (on) and PV_FP16/PV_SPLIT (off)."""
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource

    constexprs = {**dict(HEAD_DIM=head_dim, BLOCK_M=block_m, BLOCK_N=block_n, HAS_BIAS=True, HAS_KEY_MASK=True,
                         DROPOUT=True, PV_FP16=False, PV_SPLIT=False, num_warps=num_warps), **flags}
    names = t5_gluon_attention_fwd.arg_names
    types = dict(_SIGNATURE, V="*fp16" if constexprs["PV_FP16"] else "*bf16")
    signature = {n: ("constexpr" if n in constexprs else types.get(n, "i32")) for n in names}
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(names)
             if n not in constexprs and (types.get(n, "").startswith("*") or n.startswith("stride_"))}
    source = GluonASTSource(fn=t5_gluon_attention_fwd, signature=signature, constexprs=constexprs, attrs=attrs)
    return triton.compile(source, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=num_warps))
