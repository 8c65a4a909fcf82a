"""T5 attention's forward in Gluon for calls no gradient reaches (generation's encoder, evaluation), on Hopper.

`sumtune.fast_t5.flash_attention.GLUON_NO_GRAD_FORWARD` sends the forwards this kernel covers (`covers`) here instead
of to the Triton forward (`flash_kernels.t5_flash_attention_fwd`); the result is the same op's (output, log-sum-exp).

Why a second try (session 22's Gluon forward, commit 2fa495d, was no faster than Triton's): that one was measured on
the training forward, whose dropout draws and precise P·V keep the ALUs busy whatever the tensor cores do. The
no-gradient forward has neither: bf16 P·V and no Philox, so it is the plain FlashAttention forward plus T5's bias,
where FlashAttention-3's overlap matters. Triton's forward reaches ~350 TFLOP/s there against cuDNN's ~650 without
a bias (16x32x4096x128 on an H200, results/attention_kernels-2026-12-04-h200-encoder-nograd-s30.json), and it is ~55%
of the encoder's time in whole generation at 4096 tokens. Here:

* K and V tiles come by TMA (no address registers, no per-thread copies) into rings of STAGES, one mbarrier a slot,
  from 2-D descriptors over the [B * L, H * D] projections (dense or strided rows, as the fused QKV projection gives).
  Loads past a row's keys are predicated off; a tile's rows past the row's length (the next row's keys) are masked.
* The next tile's Q·Kᵀ is issued before this tile's softmax, and this tile's P·V is left in flight while the next
  scores are awaited, with P in registers as the MMA's A operand (FlashAttention-3's intra-warpgroup overlap).
* T5's bias: one value for a tile whose offsets all lie beyond ±R (far left or far right), the table otherwise.

Gluon has no interpreter: nothing runs this kernel on a CPU. `compile_for_sm90` builds it for Hopper on any machine
(a CPU test checks it fits and does not spill); a GPU test compares it with the Triton forward and float64.
"""

from __future__ import annotations

import functools

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (
    fence_async_shared, mbarrier, tma, warpgroup_mma, warpgroup_mma_init, warpgroup_mma_wait)

# (BLOCK_M, BLOCK_N, num_warps, STAGES): 128 queries in two warpgroups of 64, 64 keys a tile, rings of three.
BLOCKS = (128, 64, 8, 3)
TMA_BOX = 64  # 128 bytes of bf16: the swizzle's width, so a head_dim-128 tile lands as two boxes
_barrier = getattr(gl, "barrier", None) or gl.thread_barrier  # names that moved between Triton 3.6 and 3.9
_tma_load = getattr(tma, "async_load", None) or tma.async_copy_global_to_shared


@gluon.jit
def _issue(ring, bars, tile, n_tiles, DESC, row0, col, STAGES: gl.constexpr, BLOCK_N: gl.constexpr,
           HEAD_DIM: gl.constexpr, BOX: gl.constexpr):
    """K or V tile ``tile`` into slot tile % STAGES by TMA, if the row has it (else nothing: no wait will ask)."""
    slot = tile % STAGES
    needed = tile < n_tiles
    mbarrier.expect(bars.index(slot), BLOCK_N * HEAD_DIM * 2, pred=needed)
    for j in gl.static_range(HEAD_DIM // BOX):
        _tma_load(DESC, [row0 + tile * BLOCK_N, col + j * BOX], bars.index(slot),
                  ring.index(slot).slice(j * BOX, BOX, dim=1), pred=needed)


@gluon.jit
def _landed(bars, tile, n_tiles, STAGES: gl.constexpr):
    """Wait for tile ``tile`` (when it was issued), then make it visible to every warp's MMAs."""
    mbarrier.wait(bars.index(tile % STAGES), (tile // STAGES) & 1, pred=tile < n_tiles)
    _barrier()
    fence_async_shared()


@gluon.jit
def t5_gluon_fwd_no_grad(Q, K_DESC, V_DESC, O, LSE, TABLE, KMASK, KV_LEN, HOLES,
                         stride_qb, stride_qh, stride_qm, stride_ob, stride_oh, stride_om, stride_mask_b,
                         H, Lq, Lk, R, table_row, table_zero, qk_scale,
                         HEAD_DIM: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr,
                         HAS_BIAS: gl.constexpr, HAS_KEY_MASK: gl.constexpr, BOX: gl.constexpr,
                         num_warps: gl.constexpr):
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                       instr_shape=[16, BLOCK_N, 16])
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                       instr_shape=[16, HEAD_DIM, 16])
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    load_layout: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [num_warps, 1], [1, 0])
    tile_smem: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=16, rank=2)
    dtype: gl.constexpr = Q.dtype.element_ty

    start_m = gl.program_id(0) * BLOCK_M
    bh = gl.program_id(1)
    b = bh // H
    h = bh % H
    kv_len = Lk
    read_mask = False
    if HAS_KEY_MASK:
        kv_len = gl.load(KV_LEN + b)
        read_mask = gl.load(HOLES + b) != 0  # a row padded only at its end needs its length alone
        KMASK += b.to(gl.int64) * stride_mask_b

    offs_d = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, load_layout))
    offs_ml = start_m + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, load_layout))
    q = gl.load(Q + b.to(gl.int64) * stride_qb + h * stride_qh + offs_ml[:, None] * stride_qm + offs_d[None, :],
                mask=(offs_ml < Lq)[:, None], other=0.0)
    q_smem = gl.allocate_shared_memory(dtype, [BLOCK_M, HEAD_DIM], tile_smem, q)
    k_ring = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, HEAD_DIM], tile_smem)
    v_ring = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, HEAD_DIM], tile_smem)
    k_bars = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    v_bars = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(STAGES):
        mbarrier.init(k_bars.index(i), count=1)
        mbarrier.init(v_bars.index(i), count=1)
    fence_async_shared()

    # At least one tile, even for a row without keys (all masked: zeros out, lse +inf), so the loop's shape holds.
    n_tiles = gl.maximum(gl.cdiv(kv_len, BLOCK_N), 1)
    row0 = b * Lk  # the row's first key in the [B * Lk, H * D] descriptors
    col = h * HEAD_DIM
    for t in gl.static_range(STAGES):
        _issue(k_ring, k_bars, t, n_tiles, K_DESC, row0, col, STAGES, BLOCK_N, HEAD_DIM, BOX)
        _issue(v_ring, v_bars, t, n_tiles, V_DESC, row0, col, STAGES, BLOCK_N, HEAD_DIM, BOX)

    offs_m = start_m + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, s_layout))
    cols_n = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s_layout))
    far_left = 0.0
    far_right = 0.0
    if HAS_BIAS:
        TABLE += h * table_row + table_zero  # TABLE[d]: the bias (log2 units) at offset d = j - i
        far_left = gl.load(TABLE + gl.maximum(-R, 1 - Lq))  # every offset <= -R
        far_right = gl.load(TABLE + gl.minimum(R, Lk - 1))  # every offset >= +R

    zero_s = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, layout=s_layout)
    _landed(k_bars, 0, n_tiles, STAGES)
    s_raw = warpgroup_mma(q_smem, k_ring.index(0).permute((1, 0)), zero_s, use_acc=False, is_async=True)
    s_raw = warpgroup_mma_wait(num_outstanding=0, deps=(s_raw,))
    m_i = gl.full([BLOCK_M], float("-inf"), gl.float32, layout=gl.SliceLayout(1, s_layout))
    l_i = gl.zeros([BLOCK_M], gl.float32, layout=gl.SliceLayout(1, s_layout))
    acc = warpgroup_mma_init(gl.zeros([BLOCK_M, HEAD_DIM], gl.float32, layout=o_layout))  # loop-carried as async
    p_prev = gl.zeros([BLOCK_M, BLOCK_N], dtype, layout=p_layout)  # kept alive until its P·V is done
    for j in range(0, n_tiles):
        start_n = j * BLOCK_N
        # S(j+1) to the tensor cores (K(j+1) has landed), beside P(j-1)·V(j-1)
        _landed(k_bars, j + 1, n_tiles, STAGES)
        s_next = warpgroup_mma(q_smem, k_ring.index((j + 1) % STAGES).permute((1, 0)), zero_s, use_acc=False,
                               is_async=True)

        # this tile's softmax on the ALUs meanwhile
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
        p_op = gl.convert_layout(p.to(dtype), p_layout)

        # P(j-1)·V(j-1) done (S(j+1) may run on): every warp is past K(j) and V(j-1), so their slots take the
        # tiles STAGES further on
        acc, p_prev = warpgroup_mma_wait(num_outstanding=1, deps=(acc, p_prev))
        _barrier()
        _issue(k_ring, k_bars, j + STAGES, n_tiles, K_DESC, row0, col, STAGES, BLOCK_N, HEAD_DIM, BOX)
        if j > 0:
            _issue(v_ring, v_bars, j - 1 + STAGES, n_tiles, V_DESC, row0, col, STAGES, BLOCK_N, HEAD_DIM, BOX)
        _landed(v_bars, j, n_tiles, STAGES)
        acc = acc * gl.convert_layout(alpha, gl.SliceLayout(1, o_layout))[:, None]
        acc = warpgroup_mma(p_op, v_ring.index(j % STAGES), acc, is_async=True)
        p_prev = p_op
        s_raw = warpgroup_mma_wait(num_outstanding=1, deps=(s_next,))
    acc, p_prev = warpgroup_mma_wait(num_outstanding=0, deps=(acc, p_prev))

    empty = l_i == 0.0  # no key to attend to: output 0, and lse = +inf (as the Triton forward writes it)
    l_safe = gl.where(empty, 1.0, l_i)
    out = acc * gl.convert_layout(1.0 / l_safe, gl.SliceLayout(1, o_layout))[:, None]
    offs_mo = start_m + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, o_layout))
    offs_do = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, o_layout))
    gl.store(O + b.to(gl.int64) * stride_ob + h * stride_oh + offs_mo[:, None] * stride_om + offs_do[None, :],
             out.to(O.dtype.element_ty), mask=(offs_mo < Lq)[:, None])
    gl.store(LSE + bh.to(gl.int64) * Lq + offs_m, gl.where(empty, float("inf"), m_i + gl.log2(l_safe)),
             mask=offs_m < Lq)


@functools.cache
def _hopper(device_index: int) -> bool:
    return torch.cuda.get_device_capability(device_index)[0] == 9


def _rows_stride(x: torch.Tensor) -> int | None:
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
            and q.dtype == k.dtype == v.dtype == torch.bfloat16 and q.shape[-1] == 128 and q.stride(-1) == 1
            and _rows_stride(k) is not None and _rows_stride(v) is not None)


def _descriptor(x: torch.Tensor, block_n: int):
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    batch, heads, length, head_dim = x.shape
    layout = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=16, rank=2)
    return TensorDescriptor(x, [batch * length, heads * head_dim], [_rows_stride(x), 1], [block_n, TMA_BOX], layout)


def forward(q, k, v, out, lse, table, table_geometry, radius, mask, lengths, holes, qk_scale) -> None:
    """The Triton forward's launch for a no-gradient call, here: ``out`` and ``lse`` are written."""
    batch, heads, query_len, head_dim = q.shape
    block_m, block_n, num_warps, stages = BLOCKS
    dummy = lse
    t5_gluon_fwd_no_grad[(triton.cdiv(query_len, block_m), batch * heads)](
        q, _descriptor(k, block_n), _descriptor(v, block_n), out, lse, table if table is not None else dummy,
        mask if mask is not None else dummy, lengths if lengths is not None else dummy,
        holes if holes is not None else dummy, q.stride(0), q.stride(1), q.stride(2), out.stride(0), out.stride(1),
        out.stride(2), mask.stride(0) if mask is not None else 0, heads, query_len, k.shape[2], radius,
        *table_geometry, qk_scale, HEAD_DIM=head_dim, BLOCK_M=block_m, BLOCK_N=block_n, STAGES=stages,
        HAS_BIAS=table is not None, HAS_KEY_MASK=mask is not None, BOX=TMA_BOX, num_warps=num_warps)


_SIGNATURE = dict(Q="*bf16", O="*bf16", LSE="*fp32", TABLE="*fp32", KMASK="*i8", KV_LEN="*i32", HOLES="*i8",
                  qk_scale="fp32")


def compile_for_sm90(block_m: int | None = None, block_n: int | None = None, num_warps: int | None = None,
                     stages: int | None = None, head_dim: int = 128, **flags):
    """triton.compile for sm_90 on any machine (no GPU), specialised as a T5 launch would be (pointers and strides
    divisible by 16); ``flags`` override HAS_BIAS / HAS_KEY_MASK (on)."""
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource

    default_m, default_n, default_warps, default_stages = BLOCKS
    block_m, block_n = block_m or default_m, block_n or default_n
    num_warps, stages = num_warps or default_warps, stages or default_stages
    constexprs = {**dict(HEAD_DIM=head_dim, BLOCK_M=block_m, BLOCK_N=block_n, STAGES=stages, HAS_BIAS=True,
                         HAS_KEY_MASK=True, BOX=TMA_BOX, num_warps=num_warps), **flags}
    names = t5_gluon_fwd_no_grad.arg_names
    desc = (f"tensordesc<bf16[{block_n}, {TMA_BOX}],NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=16, "
            "rank=2)>")
    types = dict(_SIGNATURE, K_DESC=desc, V_DESC=desc)
    signature = {n: ("constexpr" if n in constexprs else types.get(n, "i32")) for n in names}
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(names)
             if n not in constexprs and (types.get(n, "").startswith("*") or n.startswith("stride_"))}
    source = GluonASTSource(fn=t5_gluon_fwd_no_grad, signature=signature, constexprs=constexprs, attrs=attrs)
    return triton.compile(source, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=num_warps))
