"""One decoding step's cross-attention over cached encoder states, warp-specialized: a row's 32 heads in one program.

`sumtune.generation.gluon_decode` runs a row as two programs of 16 heads, each reading the row's states (the second
mostly from L2): Nsight Compute put L2 at 93-95% busy and DRAM at 67% on an H200 (session 33). Its one-program,
32-head forms (sessions 33 and 41) ran slower: one warpgroup pair in one program shares its registers (255, with
spills) and Triton's block barriers tie both warpgroups to every chunk. Here, as in `fast_t5.ws_forward`
(`gl.warp_specialize`): a producer warp loads each chunk of a row's states once by TMA into a ring, and two consumer
warpgroups of 16 heads each read it from shared memory, each with its own registers and barriers; a slot is free again
when both have multiplied it (an mbarrier counting two). Keys first, as gluon_decode:

    scores^T [64 keys, 16 heads]  = states [64, D] . q_mem^T [D, 16]          (A: the states tile as loaded)
    out^T    [D, 16 heads]       += states^T [D, 64] . P^T [64, 16]           (A: the same tile, transposed view)

d_model 1024 (T5-3b) in eight 128-wide chunks (two TMA boxes each), a ring of nine (one chunk of the next tile in
flight beside a whole tile; each consumer's queries take 32 KiB); out^T as eight accumulators of [128, 16]. Arguments,
outputs and split combine are gluon_decode's (`launch`), with 32 heads a program, aimed at one program an SM
(`cross_attention.WS_MIN_PROGRAMS`). On since session 45 (`cross_attention.GLUON_WARP_SPECIALIZED`, token
`nodecodews32`: off): on an H100, 0.772 vs 0.815 ms at 256 rows x 4096 keys and 2.90 vs 3.18 at 1024, whole
generation at 256 rows 12.99 vs 12.48 summaries/s (cross_attention's note has the files).
"""

from __future__ import annotations

import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (
    fence_async_shared, mbarrier, warpgroup_mma, warpgroup_mma_wait)

from sumtune.fast_t5.ws_forward import CONSUMER_REGISTERS, LAUNCH_REGISTERS, compile_gluon
from sumtune.generation.gluon_decode import TMA_BOX, _barrier, _states_descriptor, _tma_load, keys_first_softmax

BLOCK_N = 64  # keys a tile: a warpgroup MMA's rows
BLOCK_H = 32  # heads a program: two consumer warpgroups of 16
WARP_SPECIALIZED = True  # what cross_attention tells this kernel from gluon_decode by (a failure hands over to it)
D_MODEL = 1024  # the one width it takes (eight accumulators below)
CHUNK = 128  # d_model a chunk: two 64-wide TMA boxes
SLOTS = 9  # a tile's eight chunks and one of the next: 144 KiB beside 64 KiB of queries and 4 KiB of P
_BOX = gl.constexpr(TMA_BOX)
_CHUNK = gl.constexpr(CHUNK)


@gluon.jit
def _producer(DESC, q_bufs, ring, ready, empty, row_base, n_tiles):
    """Every chunk of the split's tiles, in order, into slot g % SLOTS once both consumers have freed it."""
    slots: gl.constexpr = ring.type.shape[0]
    block_n: gl.constexpr = ring.type.shape[1]
    chunk: gl.constexpr = ring.type.shape[2]
    chunks: gl.constexpr = q_bufs.type.shape[2] // chunk
    for g in range(n_tiles * chunks):
        slot = g % slots
        mbarrier.wait(empty.index(slot), ((g // slots) & 1) ^ 1)  # a fresh barrier's previous phase counts as done
        mbarrier.expect(ready.index(slot), block_n * chunk * 2)
        for j in gl.static_range(chunk // _BOX):
            _tma_load(DESC, [row_base + (g // chunks) * block_n, (g % chunks) * chunk + j * _BOX], ready.index(slot),
                      ring.index(slot).slice(j * _BOX, _BOX, dim=1))


@gluon.jit
def _pv(ring, g, slots: gl.constexpr, p_smem, acc, alpha):
    return warpgroup_mma(ring.index(g % slots).permute((1, 0)), p_smem, acc * alpha[None, :], is_async=True)


@gluon.jit
def _free_after(acc, outstanding: gl.constexpr, empty, g, slots: gl.constexpr):
    """Once ``acc``'s P.V is done (``outstanding`` later ones may run on), chunk g's slot is free for this consumer."""
    acc = warpgroup_mma_wait(num_outstanding=outstanding, deps=(acc,))
    mbarrier.arrive(empty.index(g % slots), count=1)
    return acc


@gluon.jit
def _consumer(which: gl.constexpr, Q, q_bufs, ring, p_bufs, ready, empty, OUT, ACC, MAX, SUM, stride_qb,
              stride_qh, stride_ob, stride_oh, heads, row, split, splits, start, stop, n_tiles, SPLIT: gl.constexpr):
    slots: gl.constexpr = ring.type.shape[0]
    block_n: gl.constexpr = ring.type.shape[1]
    chunk: gl.constexpr = ring.type.shape[2]
    block_h: gl.constexpr = q_bufs.type.shape[1]
    d: gl.constexpr = q_bufs.type.shape[2]
    chunks: gl.constexpr = d // chunk
    gl.static_assert(chunks == 8, "eight accumulators: d_model is eight chunks")
    gl.static_assert(slots >= chunks, "a tile's chunks must fit the ring (each consumer holds them all): else a hang")
    mma_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                         instr_shape=[16, block_h, 16])
    load_layout: gl.constexpr = gl.BlockedLayout([1, 8], [2, 16], [4, 1], [1, 0])
    dtype: gl.constexpr = q_bufs.dtype
    q_smem = q_bufs.index(which)
    p_smem = p_bufs.index(which)
    head0 = which * block_h
    offs_hq = head0 + gl.arange(0, block_h, layout=gl.SliceLayout(1, load_layout))
    offs_dq = gl.arange(0, chunk, layout=gl.SliceLayout(0, load_layout))
    for c in gl.static_range(chunks):  # this consumer's queries, a chunk at a time
        q = gl.load(Q + row.to(gl.int64) * stride_qb + offs_hq[:, None] * stride_qh + (c * chunk + offs_dq)[None, :],
                    mask=(offs_hq < heads)[:, None], other=0.0)
        q_smem.slice(c * chunk, chunk, dim=1).store(q)
    _barrier()  # inside a partition: its own warps only
    fence_async_shared()

    m_i = gl.full([block_h], float("-inf"), gl.float32, layout=gl.SliceLayout(0, mma_layout))
    l_i = gl.zeros([block_h], gl.float32, layout=gl.SliceLayout(0, mma_layout))
    acc0 = gl.zeros([chunk, block_h], gl.float32, layout=mma_layout)
    acc1 = gl.zeros([chunk, block_h], gl.float32, layout=mma_layout)
    acc2 = gl.zeros([chunk, block_h], gl.float32, layout=mma_layout)
    acc3 = gl.zeros([chunk, block_h], gl.float32, layout=mma_layout)
    acc4 = gl.zeros([chunk, block_h], gl.float32, layout=mma_layout)
    acc5 = gl.zeros([chunk, block_h], gl.float32, layout=mma_layout)
    acc6 = gl.zeros([chunk, block_h], gl.float32, layout=mma_layout)
    acc7 = gl.zeros([chunk, block_h], gl.float32, layout=mma_layout)
    zero_s = gl.zeros([block_n, block_h], gl.float32, layout=mma_layout)
    keys = gl.arange(0, block_n, layout=gl.SliceLayout(1, mma_layout))
    offs_heads = head0 + gl.arange(0, block_h, layout=gl.SliceLayout(0, mma_layout))
    for t in range(0, n_tiles):
        g0 = t * chunks
        s = zero_s
        for c in gl.static_range(chunks):  # each chunk's product as soon as it has landed
            g = g0 + c
            mbarrier.wait(ready.index(g % slots), (g // slots) & 1)
            s = warpgroup_mma(ring.index(g % slots), q_smem.slice(c * chunk, chunk, dim=1).permute((1, 0)), s,
                              is_async=True)
        p, alpha, m_i, l_i = keys_first_softmax(s, start + t * block_n + keys, stop, m_i, l_i, Q, offs_heads, 0,
                                                 heads, False)  # cross-attention: no bias
        p_smem.store(p.to(dtype))  # the previous tile's P.V are done: waited for below
        _barrier()
        fence_async_shared()
        acc0 = _pv(ring, g0 + 0, slots, p_smem, acc0, alpha)
        acc1 = _pv(ring, g0 + 1, slots, p_smem, acc1, alpha)
        acc2 = _pv(ring, g0 + 2, slots, p_smem, acc2, alpha)
        acc3 = _pv(ring, g0 + 3, slots, p_smem, acc3, alpha)
        acc4 = _pv(ring, g0 + 4, slots, p_smem, acc4, alpha)
        acc5 = _pv(ring, g0 + 5, slots, p_smem, acc5, alpha)
        acc6 = _pv(ring, g0 + 6, slots, p_smem, acc6, alpha)
        acc7 = _pv(ring, g0 + 7, slots, p_smem, acc7, alpha)
        acc0 = _free_after(acc0, 7, empty, g0 + 0, slots)
        acc1 = _free_after(acc1, 6, empty, g0 + 1, slots)
        acc2 = _free_after(acc2, 5, empty, g0 + 2, slots)
        acc3 = _free_after(acc3, 4, empty, g0 + 3, slots)
        acc4 = _free_after(acc4, 3, empty, g0 + 4, slots)
        acc5 = _free_after(acc5, 2, empty, g0 + 5, slots)
        acc6 = _free_after(acc6, 1, empty, g0 + 6, slots)
        acc7 = _free_after(acc7, 0, empty, g0 + 7, slots)

    offs_h = head0 + gl.arange(0, block_h, layout=gl.SliceLayout(0, mma_layout))
    offs_do = gl.arange(0, chunk, layout=gl.SliceLayout(1, mma_layout))
    if SPLIT:  # partial results of this split, combined by the caller: [B, splits, 2 * block_h, D] and so on
        base_h = (row.to(gl.int64) * splits + split) * (2 * block_h)
        acc_ptr = ACC + (base_h + offs_h[None, :]) * d + offs_do[:, None]
        gl.store(acc_ptr, acc0)
        gl.store(acc_ptr + chunk, acc1)
        gl.store(acc_ptr + 2 * chunk, acc2)
        gl.store(acc_ptr + 3 * chunk, acc3)
        gl.store(acc_ptr + 4 * chunk, acc4)
        gl.store(acc_ptr + 5 * chunk, acc5)
        gl.store(acc_ptr + 6 * chunk, acc6)
        gl.store(acc_ptr + 7 * chunk, acc7)
        gl.store(MAX + base_h + offs_h, m_i)
        gl.store(SUM + base_h + offs_h, l_i)
    else:
        scale = 1.0 / gl.where(l_i > 0, l_i, 1.0)  # a row without keys: zeros
        out_ptr = OUT + row.to(gl.int64) * stride_ob + offs_h[None, :] * stride_oh + offs_do[:, None]
        in_h = (offs_h < heads)[None, :]
        out_dtype: gl.constexpr = OUT.dtype.element_ty
        gl.store(out_ptr, (acc0 * scale[None, :]).to(out_dtype), mask=in_h)
        gl.store(out_ptr + chunk, (acc1 * scale[None, :]).to(out_dtype), mask=in_h)
        gl.store(out_ptr + 2 * chunk, (acc2 * scale[None, :]).to(out_dtype), mask=in_h)
        gl.store(out_ptr + 3 * chunk, (acc3 * scale[None, :]).to(out_dtype), mask=in_h)
        gl.store(out_ptr + 4 * chunk, (acc4 * scale[None, :]).to(out_dtype), mask=in_h)
        gl.store(out_ptr + 5 * chunk, (acc5 * scale[None, :]).to(out_dtype), mask=in_h)
        gl.store(out_ptr + 6 * chunk, (acc6 * scale[None, :]).to(out_dtype), mask=in_h)
        gl.store(out_ptr + 7 * chunk, (acc7 * scale[None, :]).to(out_dtype), mask=in_h)


@gluon.jit
def _consumer0(Q, q_bufs, ring, p_bufs, ready, empty, OUT, ACC, MAX, SUM, stride_qb, stride_qh, stride_ob, stride_oh,
               heads, row, split, splits, start, stop, n_tiles, flags):
    _consumer(0, Q, q_bufs, ring, p_bufs, ready, empty, OUT, ACC, MAX, SUM, stride_qb, stride_qh, stride_ob, stride_oh,
              heads, row, split, splits, start, stop, n_tiles, flags.type.shape[0] > 1)


@gluon.jit
def _consumer1(Q, q_bufs, ring, p_bufs, ready, empty, OUT, ACC, MAX, SUM, stride_qb, stride_qh, stride_ob, stride_oh,
               heads, row, split, splits, start, stop, n_tiles, flags):
    _consumer(1, Q, q_bufs, ring, p_bufs, ready, empty, OUT, ACC, MAX, SUM, stride_qb, stride_qh, stride_ob, stride_oh,
              heads, row, split, splits, start, stop, n_tiles, flags.type.shape[0] > 1)


@gluon.jit
def gluon_ws_hidden_cross_attention(Q, DESC, LENGTHS, OUT, ACC, MAX, SUM, stride_qb, stride_qh, src_len, stride_ob,
                                    stride_oh, heads, keys_per_split, D: gl.constexpr, BLOCK_N: gl.constexpr,
                                    SPLIT: gl.constexpr, SLOTS: gl.constexpr, CONSUMER_REGS: gl.constexpr,
                                    num_warps: gl.constexpr):
    tile_smem: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=16, rank=2)
    p_smem_layout: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=32, element_bitwidth=16, rank=2)
    dtype: gl.constexpr = Q.dtype.element_ty
    half_h: gl.constexpr = 16
    row = gl.program_id(1)
    split = gl.program_id(2)
    splits = gl.num_programs(2)
    start = split * keys_per_split
    stop = gl.minimum(start + keys_per_split, gl.load(LENGTHS + row))
    n_tiles = gl.cdiv(gl.maximum(stop - start, 0), BLOCK_N)
    row_base = row * src_len + start  # the row's first key in the [B * L, D] descriptor

    q_bufs = gl.allocate_shared_memory(dtype, [2, half_h, D], tile_smem)
    ring = gl.allocate_shared_memory(dtype, [SLOTS, BLOCK_N, _CHUNK], tile_smem)
    p_bufs = gl.allocate_shared_memory(dtype, [2, BLOCK_N, half_h], p_smem_layout)
    ready = gl.allocate_shared_memory(gl.int64, [SLOTS, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [SLOTS, 1], mbarrier.MBarrierLayout())
    # SPLIT as a tiny buffer's shape: a partition's constexpr arguments arrive as tensors in Triton 3.6
    flags = gl.allocate_shared_memory(gl.int8, [1 + SPLIT, 1], gl.SwizzledSharedLayout(1, 1, 1, [1, 0]))
    for i in gl.static_range(SLOTS):
        mbarrier.init(ready.index(i), count=1)
        mbarrier.init(empty.index(i), count=2)  # both consumers free a slot
    fence_async_shared()
    consumer_args = (Q, q_bufs, ring, p_bufs, ready, empty, OUT, ACC, MAX, SUM, stride_qb, stride_qh, stride_ob,
                     stride_oh, heads, row, split, splits, start, stop, n_tiles, flags)
    gl.warp_specialize([(_consumer0, consumer_args), (_consumer1, consumer_args),
                        (_producer, (DESC, q_bufs, ring, ready, empty, row_base, n_tiles))],
                       [4, 1], [CONSUMER_REGS, 24])


def supported(heads: int, d_model: int) -> str | None:
    """Why this kernel cannot take a launch of these heads and width, or None."""
    if d_model != D_MODEL:
        return f"d_model {d_model} is not {D_MODEL}"
    if not 16 < heads <= BLOCK_H:
        return f"{heads} heads: it takes 17 to {BLOCK_H} (two warpgroups of 16)"
    return None


def launch(grid, q_mem, memory, lengths, out, acc, running_max, total, heads, keys_per_split, block_h, split,
           bias=None):
    """gluon_decode.launch's arguments for cross-attention (no ``bias``: the decoder's self-attention keeps
    gluon_decode), with ``block_h`` BLOCK_H and ``grid`` (1, batch, splits); contiguous ``lengths``."""
    batch, src_len, d_model = memory.shape
    assert bias is None and block_h == BLOCK_H and grid[0] == 1 and lengths.stride(0) == 1, (block_h, grid)
    gluon_ws_hidden_cross_attention[grid](
        q_mem, _states_descriptor(memory), lengths, out, acc, running_max, total, q_mem.stride(0), q_mem.stride(1),
        src_len, out.stride(0), out.stride(1), heads, keys_per_split, D=d_model, BLOCK_N=BLOCK_N, SPLIT=split,
        SLOTS=SLOTS, CONSUMER_REGS=CONSUMER_REGISTERS, num_warps=4, maxnreg=LAUNCH_REGISTERS)


_SIGNATURE = dict(Q="*bf16", LENGTHS="*i32", OUT="*bf16", ACC="*fp32", MAX="*fp32", SUM="*fp32",
                  DESC=(f"tensordesc<bf16[{BLOCK_N}, {TMA_BOX}],NVMMASharedLayout(swizzle_byte_width=128, "
                        "element_bitwidth=16, rank=2)>"))


def compile_for_sm90(split: bool = False, slots: int | None = None):
    """triton.compile for sm_90 on any machine (no GPU), specialised as a T5-3b launch would be."""
    constexprs = dict(D=D_MODEL, BLOCK_N=BLOCK_N, SPLIT=split, SLOTS=slots or SLOTS,
                      CONSUMER_REGS=CONSUMER_REGISTERS, num_warps=4)
    return compile_gluon(gluon_ws_hidden_cross_attention, _SIGNATURE, constexprs, LAUNCH_REGISTERS)
