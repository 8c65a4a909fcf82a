"""The Gluon decoding cross-attention with all 32 heads of a row in one program: each row's states go from L2 to one
SM once (off until measured: `cross_attention.GLUON_WIDE`, token `decodewide`).

Why: `gluon_decode` runs 16 heads a program, so two programs read each row's states, the second mostly from L2, and
Nsight Compute put L2 at 93-95% of its peak with DRAM at 67% (H200, 256 and 1024 rows x 4096 keys: results/
decode_kernel_ncu-2026-12-04-h200-gluon.json). Session 33's 32-head form (two warpgroups over the same tiles) cut L2
to 75% but held its states in d_model / 4-wide chunks: 64 KiB of queries left room for four of them, one 64-key tile
and nothing of the next in flight, and it ran slower (1.25 against 0.92 ms at 256 rows). Here the chunks are 64 wide
(one TMA box, 8 KiB): queries (64 KiB) + P (4 KiB) leave room for a ring of 19, a tile's 16 chunks and 3 of the next
in flight, and a chunk's slot is refilled as soon as its P.V is done, so the next tile's loads run during this
tile's products (session 35 estimated ~70% of DRAM on paper for a one-chunk lookahead; this is a measurement to make).

Same maths as `gluon_decode` (keys first: scores^T [64 keys, 32 heads] = states [64, D] . q_mem^T, out^T [D, 32] +=
states^T . P^T; online softmax in fp32, P rounded to the states' dtype), two warpgroups (8 warps) each the MMAs of
16 heads, out^T held as D / 64 accumulators of [64, 32] (8 registers a thread each). No position bias: the decoder's
self-attention stays with `gluon_decode`.

Gluon has no interpreter: `compile_for_sm90` builds it for Hopper on any machine (the CPU tests check its shared
memory and spill), the GPU test compares it with the float64 reference.
"""

from __future__ import annotations

import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (
    fence_async_shared, mbarrier, tma, warpgroup_mma, warpgroup_mma_wait)

BLOCK_N = 64  # keys a tile: a warpgroup MMA's rows
BLOCK_H = 32  # heads a program: T5-3b's all
WARPS = 8  # two warpgroups, 16 heads each
CHUNK = 64  # d_model a chunk: one 64 x 64 TMA box (128 bytes of bf16, the swizzle's width)
MAX_SLOTS = 19  # T5-3b (d_model 1024): 64 KiB of queries + 19 x 8 KiB + 4 KiB of P = 220 KiB of Hopper's 227
HOPPER_SHARED_BYTES = 232448
_barrier = getattr(gl, "barrier", None) or gl.thread_barrier
_tma_load = getattr(tma, "async_load", None) or tma.async_copy_global_to_shared


@gluon.jit
def _issue(ring, bars, g, SLOTS: gl.constexpr, NC: gl.constexpr, DESC, row_base, BLOCK_N: gl.constexpr,
           CHUNK: gl.constexpr):
    """Chunk g (tile g // NC, d_model chunk g % NC) into slot g % SLOTS by TMA; the slot's mbarrier counts its bytes."""
    slot = g % SLOTS
    mbarrier.expect(bars.index(slot), BLOCK_N * CHUNK * 2)
    _tma_load(DESC, [row_base + (g // NC) * BLOCK_N, (g % NC) * CHUNK], bars.index(slot), ring.index(slot))


@gluon.jit
def _landed(bars, g, SLOTS: gl.constexpr):
    """Wait until chunk g is in shared memory."""
    mbarrier.wait(bars.index(g % SLOTS), (g // SLOTS) & 1)


@gluon.jit
def gluon_wide_cross_attention(Q, DESC, LENGTHS, OUT, ACC, MAX, SUM, stride_qb, stride_qh, src_len, stride_ob,
                               stride_oh, heads, keys_per_split, BLOCK_H: gl.constexpr, D: gl.constexpr,
                               BLOCK_N: gl.constexpr, CHUNK: gl.constexpr, SPLIT: gl.constexpr,
                               SLOTS: gl.constexpr, num_warps: gl.constexpr):
    NC: gl.constexpr = D // CHUNK  # chunks a tile
    GROUPS: gl.constexpr = num_warps // 4  # warpgroups, each the MMA columns of BLOCK_H // GROUPS heads
    mma_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, GROUPS],
                                                         instr_shape=[16, BLOCK_H // GROUPS, 16])
    load_layout: gl.constexpr = gl.BlockedLayout([1, 8], [32 // (CHUNK // 8), CHUNK // 8], [num_warps, 1], [1, 0])
    tile_smem: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=16, rank=2)
    p_smem_layout: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=min(128, 2 * BLOCK_H), element_bitwidth=16,
                                                       rank=2)
    dtype: gl.constexpr = Q.dtype.element_ty

    row = gl.program_id(1)
    split = gl.program_id(2)
    offs_hq = gl.arange(0, BLOCK_H, layout=gl.SliceLayout(1, load_layout))
    offs_dq = gl.arange(0, CHUNK, layout=gl.SliceLayout(0, load_layout))
    q_smem = gl.allocate_shared_memory(dtype, [BLOCK_H, D], tile_smem)
    for c in gl.static_range(NC):  # a chunk at a time: few registers live
        q = gl.load(Q + row.to(gl.int64) * stride_qb + offs_hq[:, None] * stride_qh + (c * CHUNK + offs_dq)[None, :],
                    mask=(offs_hq < heads)[:, None], other=0.0)
        q_smem.slice(c * CHUNK, CHUNK, dim=1).store(q)
    ring = gl.allocate_shared_memory(dtype, [SLOTS, BLOCK_N, CHUNK], tile_smem)
    p_smem = gl.allocate_shared_memory(dtype, [BLOCK_N, BLOCK_H], p_smem_layout)
    bars = gl.allocate_shared_memory(gl.int64, [SLOTS, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(SLOTS):
        mbarrier.init(bars.index(i), count=1)
    fence_async_shared()  # the queries' stores and the barriers' inits, before any MMA or TMA reads or signals them
    _barrier()

    start = split * keys_per_split
    stop = gl.minimum(start + keys_per_split, gl.load(LENGTHS + row))
    n_tiles = gl.cdiv(gl.maximum(stop - start, 0), BLOCK_N)
    row_base = row * src_len + start  # the row's first key in the [B * L, D] descriptor
    for g in gl.static_range(SLOTS):  # prologue: tile 0's NC chunks, then the next tile's first SLOTS - NC
        _issue(ring, bars, g, SLOTS, NC, DESC, row_base, BLOCK_N, CHUNK)

    m_i = gl.full([BLOCK_H], float("-inf"), gl.float32, layout=gl.SliceLayout(0, mma_layout))
    l_i = gl.zeros([BLOCK_H], gl.float32, layout=gl.SliceLayout(0, mma_layout))
    accs = (gl.zeros([CHUNK, BLOCK_H], gl.float32, layout=mma_layout),) * NC
    zero_s = gl.zeros([BLOCK_N, BLOCK_H], gl.float32, layout=mma_layout)
    keys = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, mma_layout))
    for t in range(0, n_tiles):
        # Chunk NC t + c sits in slot (NC t + c) % SLOTS; scores: each chunk's product once it has landed.
        base = (NC * t) % SLOTS
        s = zero_s
        for c in gl.static_range(NC):
            _landed(bars, NC * t + c, SLOTS)
            s = warpgroup_mma(ring.index((base + c) % SLOTS), q_smem.slice(c * CHUNK, CHUNK, dim=1).permute((1, 0)),
                              s, is_async=True)
        s = warpgroup_mma_wait(num_outstanding=0, deps=(s,))
        offs_n = start + t * BLOCK_N + keys
        s = gl.where((offs_n < stop)[:, None], s, float("-inf"))  # T5: no scaling
        m_new = gl.maximum(m_i, gl.max(s, 0))
        m_use = gl.where(m_new == float("-inf"), 0.0, m_new)
        p = gl.exp(s - m_use[None, :])
        alpha = gl.exp(m_i - m_use)
        l_i = l_i * alpha + gl.sum(p, 0)
        m_i = m_new
        p_smem.store(p.to(dtype))  # the previous tile's P.V are done: they were waited for below
        _barrier()
        fence_async_shared()
        issued = ()
        for c in gl.static_range(NC):
            issued = issued + (warpgroup_mma(ring.index((base + c) % SLOTS).permute((1, 0)), p_smem,
                                             accs[c] * alpha[None, :], is_async=True),)
        # As chunk NC t + c's P.V completes (in both warpgroups: the barrier), its slot takes chunk NC t + c + SLOTS;
        # chunks past the split's keys load too (and are waited for after the loop).
        done = ()
        for c in gl.static_range(NC):
            acc = warpgroup_mma_wait(num_outstanding=NC - 1 - c, deps=(issued[c],))
            _barrier()
            _issue(ring, bars, NC * t + c + SLOTS, SLOTS, NC, DESC, row_base, BLOCK_N, CHUNK)
            done = done + (acc,)
        accs = done
    for i in gl.static_range(SLOTS):  # every chunk issued was waited for but the last SLOTS: those too
        _landed(bars, NC * n_tiles + i, SLOTS)

    offs_h = gl.arange(0, BLOCK_H, layout=gl.SliceLayout(0, mma_layout))
    offs_do = gl.arange(0, CHUNK, layout=gl.SliceLayout(1, mma_layout))
    if SPLIT:  # partial results of this split, combined by the caller: [B, splits, BLOCK_H, D] and so on
        base_h = (row.to(gl.int64) * gl.num_programs(2) + split) * BLOCK_H
        for c in gl.static_range(NC):
            gl.store(ACC + (base_h + offs_h[None, :]) * D + c * CHUNK + offs_do[:, None], accs[c])
        gl.store(MAX + base_h + offs_h, m_i)
        gl.store(SUM + base_h + offs_h, l_i)
    else:
        scale = 1.0 / gl.where(l_i > 0, l_i, 1.0)  # a row without keys: zeros
        in_h = (offs_h < heads)[None, :]
        for c in gl.static_range(NC):
            gl.store(OUT + row.to(gl.int64) * stride_ob + offs_h[None, :] * stride_oh + c * CHUNK + offs_do[:, None],
                     (accs[c] * scale[None, :]).to(OUT.dtype.element_ty), mask=in_h)


def slots_for(d_model: int) -> int:
    """The ring's chunks: as many as fit beside the queries and P, at most MAX_SLOTS (and at least a tile's)."""
    fixed = 2 * (BLOCK_H * d_model + BLOCK_N * BLOCK_H)
    return min(MAX_SLOTS, (HOPPER_SHARED_BYTES - fixed - 1024) // (2 * BLOCK_N * CHUNK + 8))


def shared_bytes(d_model: int, slots: int) -> int:
    """The kernel's shared memory: queries, the ring of 64-wide chunks, P, one mbarrier a slot."""
    return 2 * (BLOCK_H * d_model + slots * BLOCK_N * CHUNK + BLOCK_N * BLOCK_H) + 8 * slots


def supported(d_model: int, heads: int) -> str | None:
    """Why this kernel cannot take this launch, or None."""
    if heads > BLOCK_H:
        return f"{heads} heads are more than one program's {BLOCK_H}"
    if d_model % CHUNK or not 2 * CHUNK <= d_model <= 1024:
        return f"d_model {d_model} is not 2 to 16 chunks of {CHUNK}"
    if slots_for(d_model) < d_model // CHUNK + 1:
        return f"d_model {d_model} leaves no room for a tile and a chunk of the next"
    return None


def launch(grid, q_mem, memory, lengths, out, acc, running_max, total, heads, keys_per_split, split):
    """This kernel over dense [B, L, D] states (from cross_attention.fused_hidden_attention, one program a row and
    split: grid (1, B, splits))."""
    from sumtune.generation.gluon_decode import _states_descriptor

    batch, src_len, d_model = memory.shape
    gluon_wide_cross_attention[grid](
        q_mem, _states_descriptor(memory), lengths, out, acc, running_max, total, q_mem.stride(0), q_mem.stride(1),
        src_len, out.stride(0), out.stride(1), heads, keys_per_split, BLOCK_H=BLOCK_H, D=d_model, BLOCK_N=BLOCK_N,
        CHUNK=CHUNK, SPLIT=split, SLOTS=slots_for(d_model), num_warps=WARPS)


_SIGNATURE = dict(Q="*bf16", LENGTHS="*i32", OUT="*bf16", ACC="*fp32", MAX="*fp32", SUM="*fp32",
                  DESC=(f"tensordesc<bf16[{BLOCK_N}, {CHUNK}],NVMMASharedLayout(swizzle_byte_width=128, "
                        "element_bitwidth=16, rank=2)>"))


def compile_for_sm90(d_model: int = 1024, split: bool = False, slots: int | None = None):
    """triton.compile for sm_90 on any machine (no GPU), specialised as a T5-3b launch would be (pointers and ints
    divisible by 16, contiguous lengths)."""
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource

    constexprs = dict(BLOCK_H=BLOCK_H, D=d_model, BLOCK_N=BLOCK_N, CHUNK=CHUNK, SPLIT=split,
                      SLOTS=slots or slots_for(d_model), num_warps=WARPS)
    names = gluon_wide_cross_attention.arg_names
    signature = {n: ("constexpr" if n in constexprs else _SIGNATURE.get(n, "i32")) for n in names}
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(names) if n not in constexprs and n != "DESC"}
    source = GluonASTSource(fn=gluon_wide_cross_attention, signature=signature, constexprs=constexprs, attrs=attrs)
    return triton.compile(source, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=WARPS))
