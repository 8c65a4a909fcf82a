"""One decoding step's cross-attention over cached encoder states in Gluon (Hopper), keys first.

`sumtune.generation.cross_attention` sends the fused mode's launches here instead of to the Triton kernel
(`cross_kernels.hidden_cross_attention`) on a Hopper GPU in bf16, for sources over 1024 tokens whose states are dense
(`cross_attention.GLUON_KERNEL`, `GLUON_FROM_KEYS`; token `nodecodegluon` turns it off); arguments, outputs and the
split combine are the same. Measured on an H200 on 2026-12-04 (session 33), T5-3b shapes, 4096 keys: 1.11 against
1.29 ms and 0.92 against 1.14 at 256 rows, 3.38 against 4.23 and 3.28 against 4.19 at 1024 rows in two runs
(results/decode_attention-2026-12-04-h200-gluon{,32}.json); whole generation with every input 4096 tokens, batch 256,
11.61 against 10.36 and 11.65 against 10.39 summaries/s, tokens equal to transformers' (results/generate_throughput-
2026-12-04-h200-full-gluon{tma,32}.json), 11.47 against 10.26 after its clean-up (session 34, …-full-s34.json); real
bills cut at 4096, batch 256, both rows warm on every timed input, 19.94 against 17.81 (…-bills-warm-gluon.json).

Why: the Triton kernel is latency-bound (session 26's counters: two 4-warp programs an SM, an instruction issued
every 4.5 cycles a scheduler, stalls on shared-memory loads and on each MMA's result), because its score product
is a 16-head x 32-key tile with a 1024-long reduction: a chain of 64 dependent `mma.sync` a warp, each operand
fetched from shared memory by `ldmatrix`. Here both products run on Hopper's warpgroup MMAs with their operands in
shared memory (no `ldmatrix`, the chain pipelined inside the tensor cores), keys first so that the MMA's 64 rows are
keys and its columns the group's 16 heads:

    scores^T [64 keys, 16 heads]  = states [64, D] . q_mem^T [D, 16]          (A: the states tile as loaded)
    out^T    [D, 16 heads]       += states^T [D, 64] . P^T [64, 16]           (A: the same tile, transposed view)

The states tile comes in D/4-wide chunks by TMA (64 x 64 boxes of a 2-D descriptor over dense [B * L, D] states,
one mbarrier a slot) into a ring of SLOTS (SLOTS - 4 chunks of the next tile in flight while this tile's are
multiplied); a chunk's slot is refilled once its P.V has read it. Rows past a row's keys read the next row's states
(finite) or zeros past the end, and their scores are masked. out^T is held as four accumulators (one a chunk, 32
registers a thread each). Same maths as the Triton kernel (online softmax, P rounded to the states' dtype for its
product), different order of the sums.

Gluon has no interpreter: nothing runs this kernel on a CPU. `compile_for_sm90` builds it for Hopper on any machine
(the CPU tests check that it fits in shared memory; Triton 3.6 builds it without spilling); the GPU tests compare it
with the float64 reference.
"""

from __future__ import annotations

import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (
    fence_async_shared, mbarrier, tma, warpgroup_mma, warpgroup_mma_wait)

BLOCK_N = 64  # keys a tile: a warpgroup MMA's rows
# Chunks in the shared-memory ring: a tile's four and SLOTS - 4 of the next one's in flight. 6 is the most at T5-3b's
# shapes (226 KiB of Hopper's 227); 5 leaves 194 KiB (token `gluon5`; measured only in the cp.async form, 1.78 against
# 1.78 ms at 256 rows, results/decode_attention-2026-12-04-h200-gluon.json).
SLOTS = 6
# Heads a program: one warpgroup's MMA columns. Two programs read each row's states, the second mostly from L2, and
# Nsight Compute put L2 at 93-95% of its peak with DRAM at 67% (256 and 1024 rows x 4096 keys: results/decode_kernel_
# ncu-2026-12-04-h200-gluon.json). 32 heads a program in two warpgroups over the same tiles (each row's states from L2
# once) left room for a ring of four only, spilled, and ran 1.25 against 0.92 ms at 256 rows, whole generation 10.33
# against 11.65 summaries/s (results/…-gluon32.json; with a ring of four 16 heads spill too: results/gluon_decode_
# compile-2026-12-04-cpu-sm90-s33.json). The chunks by cp.async instead of TMA ran 1.78 against the Triton kernel's
# 1.29 ms at 256 rows and whole generation 8.23 against 10.39 (results/…-gluon.json). Both went after session 34's GPU
# test passed them once more (commit f21cad8 has them).
BLOCK_H = 16
WARPS = 4
TMA_BOX = 64  # 128 bytes of bf16: the swizzle's width
CHUNKS = 4  # the states tile's d_model in four chunks: the kernel holds one accumulator a chunk, so not a knob
# Names that moved between Triton 3.6 (the GPU image's) and 3.9: the block barrier, the TMA load
_barrier = getattr(gl, "barrier", None) or gl.thread_barrier
_tma_load = getattr(tma, "async_load", None) or tma.async_copy_global_to_shared


@gluon.jit
def _issue(ring, bars, g, SLOTS: gl.constexpr, DESC, row_base, BLOCK_N: gl.constexpr, CHUNK: gl.constexpr,
           BOX: gl.constexpr):
    """Chunk g (tile g // 4, d_model chunk g % 4) into slot g % SLOTS by TMA; the slot's mbarrier counts its bytes."""
    slot = g % SLOTS
    tile = g // 4
    d0 = (g % 4) * CHUNK
    mbarrier.expect(bars.index(slot), BLOCK_N * CHUNK * 2)
    for j in gl.static_range(CHUNK // BOX):
        _tma_load(DESC, [row_base + tile * BLOCK_N, d0 + j * BOX], bars.index(slot),
                  ring.index(slot).slice(j * BOX, BOX, dim=1))


@gluon.jit
def _landed(bars, g, SLOTS: gl.constexpr):
    """Wait until chunk g is in shared memory."""
    mbarrier.wait(bars.index(g % SLOTS), (g // SLOTS) & 1)


@gluon.jit
def _refill_after(acc, outstanding: gl.constexpr, g, ring, bars, SLOTS: gl.constexpr, DESC, row_base,
                  BLOCK_N: gl.constexpr, CHUNK: gl.constexpr, BOX: gl.constexpr):
    """Once ``acc``'s P.V is done (``outstanding`` later ones may run on), its chunk's slot takes chunk g."""
    acc = warpgroup_mma_wait(num_outstanding=outstanding, deps=(acc,))
    _barrier()
    _issue(ring, bars, g, SLOTS, DESC, row_base, BLOCK_N, CHUNK, BOX)
    return acc


@gluon.jit
def keys_first_softmax(s, offs_n, stop, m_i, l_i, BIAS, bias_heads, stride_bh, heads, HAS_BIAS: gl.constexpr):
    """A [keys, heads] tile's online softmax over its keys: the bias (one value a head and key) loaded while the
    score products ``s`` still run, then waited for; keys at or past ``stop`` masked (T5: no scaling). Returns
    (P, the rescale of what came before, the new running maximum and sum)."""
    if HAS_BIAS:  # issued while the products run: one value a head and key, [keys, heads] as the scores
        bias = gl.load(BIAS + bias_heads[None, :] * stride_bh + offs_n[:, None],
                       mask=(offs_n < stop)[:, None] & (bias_heads < heads)[None, :], other=0.0)
    s = warpgroup_mma_wait(num_outstanding=0, deps=(s,))
    if HAS_BIAS:
        s = s + bias.to(gl.float32)
    s = gl.where((offs_n < stop)[:, None], s, float("-inf"))
    m_new = gl.maximum(m_i, gl.max(s, 0))
    m_use = gl.where(m_new == float("-inf"), 0.0, m_new)
    p = gl.exp(s - m_use[None, :])
    alpha = gl.exp(m_i - m_use)
    return p, alpha, m_new, l_i * alpha + gl.sum(p, 0)


@gluon.jit
def _chunk_pv(ring, slot, p_smem, acc):
    return warpgroup_mma(ring.index(slot).permute((1, 0)), p_smem, acc, is_async=True)


@gluon.jit
def gluon_hidden_cross_attention(Q, DESC, LENGTHS, OUT, ACC, MAX, SUM, BIAS, stride_qb, stride_qh, src_len,
                                 stride_ob, stride_oh, stride_lb, stride_bh, heads, keys_per_split,
                                 BLOCK_H: gl.constexpr, D: gl.constexpr, BLOCK_N: gl.constexpr, SPLIT: gl.constexpr,
                                 LOAD_TPW_D: gl.constexpr, SLOTS: gl.constexpr, BOX: gl.constexpr,
                                 HAS_BIAS: gl.constexpr, num_warps: gl.constexpr):
    CHUNK: gl.constexpr = D // 4
    mma_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                         instr_shape=[16, BLOCK_H, 16])
    load_layout: gl.constexpr = gl.BlockedLayout([1, 8], [32 // LOAD_TPW_D, LOAD_TPW_D], [num_warps, 1], [1, 0])
    tile_smem: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=16, rank=2)
    p_smem_layout: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=min(128, 2 * BLOCK_H), element_bitwidth=16,
                                                       rank=2)
    dtype: gl.constexpr = Q.dtype.element_ty

    group = gl.program_id(0)
    row = gl.program_id(1)
    split = gl.program_id(2)
    offs_hq = group * BLOCK_H + gl.arange(0, BLOCK_H, layout=gl.SliceLayout(1, load_layout))
    offs_dq = gl.arange(0, CHUNK, layout=gl.SliceLayout(0, load_layout))
    q_smem = gl.allocate_shared_memory(dtype, [BLOCK_H, D], tile_smem)
    for c in gl.static_range(4):  # a chunk at a time: fewer registers live than the whole (BLOCK_H, D) block
        q = gl.load(Q + row.to(gl.int64) * stride_qb + offs_hq[:, None] * stride_qh + (c * CHUNK + offs_dq)[None, :],
                    mask=(offs_hq < heads)[:, None], other=0.0)
        q_smem.slice(c * CHUNK, CHUNK, dim=1).store(q)
    ring = gl.allocate_shared_memory(dtype, [SLOTS, BLOCK_N, CHUNK], tile_smem)
    p_smem = gl.allocate_shared_memory(dtype, [BLOCK_N, BLOCK_H], p_smem_layout)
    bars = gl.allocate_shared_memory(gl.int64, [SLOTS, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(SLOTS):
        mbarrier.init(bars.index(i), count=1)
    fence_async_shared()

    start = split * keys_per_split
    stop = gl.minimum(start + keys_per_split, gl.load(LENGTHS + row * stride_lb))
    n_tiles = gl.cdiv(gl.maximum(stop - start, 0), BLOCK_N)
    row_base = row * src_len + start  # the row's first key in the [B * L, D] descriptor
    # Prologue: chunks 0 .. SLOTS - 1 (tile 0's four, then the next tile's first ones); chunk g (tile g // 4, d_model
    # chunk g % 4) always goes to slot g % SLOTS.
    for g in gl.static_range(SLOTS):
        _issue(ring, bars, g, SLOTS, DESC, row_base, BLOCK_N, CHUNK, BOX)

    m_i = gl.full([BLOCK_H], float("-inf"), gl.float32, layout=gl.SliceLayout(0, mma_layout))
    l_i = gl.zeros([BLOCK_H], gl.float32, layout=gl.SliceLayout(0, mma_layout))
    acc0 = gl.zeros([CHUNK, BLOCK_H], gl.float32, layout=mma_layout)
    acc1 = gl.zeros([CHUNK, BLOCK_H], gl.float32, layout=mma_layout)
    acc2 = gl.zeros([CHUNK, BLOCK_H], gl.float32, layout=mma_layout)
    acc3 = gl.zeros([CHUNK, BLOCK_H], gl.float32, layout=mma_layout)
    zero_s = gl.zeros([BLOCK_N, BLOCK_H], gl.float32, layout=mma_layout)
    keys = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, mma_layout))
    bias_heads = group * BLOCK_H + gl.arange(0, BLOCK_H, layout=gl.SliceLayout(0, mma_layout))
    for t in range(0, n_tiles):
        # Chunks 4t .. 4t + SLOTS - 1 are issued (the first four are this tile's); chunk 4t + c sits in slot
        # (4t + c) % SLOTS. Scores: each chunk's product as soon as that chunk has landed.
        base = (4 * t) % SLOTS
        s = zero_s
        for c in gl.static_range(4):
            _landed(bars, 4 * t + c, SLOTS)
            _barrier()
            fence_async_shared()
            slot = (base + c) % SLOTS
            s = warpgroup_mma(ring.index(slot), q_smem.slice(c * CHUNK, CHUNK, dim=1).permute((1, 0)), s,
                              is_async=True)
        p, alpha, m_i, l_i = keys_first_softmax(s, start + t * BLOCK_N + keys, stop, m_i, l_i, BIAS, bias_heads,
                                                 stride_bh, heads, HAS_BIAS)
        p_smem.store(p.to(dtype))  # the previous tile's P.V are done: they were waited for below
        _barrier()
        fence_async_shared()
        acc0 = _chunk_pv(ring, base % SLOTS, p_smem, acc0 * alpha[None, :])
        acc1 = _chunk_pv(ring, (base + 1) % SLOTS, p_smem, acc1 * alpha[None, :])
        acc2 = _chunk_pv(ring, (base + 2) % SLOTS, p_smem, acc2 * alpha[None, :])
        acc3 = _chunk_pv(ring, (base + 3) % SLOTS, p_smem, acc3 * alpha[None, :])
        # As chunk 4t + c's P.V completes, its slot takes chunk 4t + c + SLOTS (tile t + (c + SLOTS) // 4, d_model
        # chunk (c + SLOTS) % 4); chunks past the split's keys load too (and are waited for below).
        acc0 = _refill_after(acc0, 3, 4 * t + 0 + SLOTS, ring, bars, SLOTS, DESC, row_base, BLOCK_N, CHUNK,
                              BOX)
        acc1 = _refill_after(acc1, 2, 4 * t + 1 + SLOTS, ring, bars, SLOTS, DESC, row_base, BLOCK_N, CHUNK,
                              BOX)
        acc2 = _refill_after(acc2, 1, 4 * t + 2 + SLOTS, ring, bars, SLOTS, DESC, row_base, BLOCK_N, CHUNK,
                              BOX)
        acc3 = _refill_after(acc3, 0, 4 * t + 3 + SLOTS, ring, bars, SLOTS, DESC, row_base, BLOCK_N, CHUNK,
                              BOX)
    for i in gl.static_range(SLOTS):  # every chunk issued was waited for but the last SLOTS: those too
        _landed(bars, 4 * n_tiles + i, SLOTS)

    offs_h = group * BLOCK_H + gl.arange(0, BLOCK_H, layout=gl.SliceLayout(0, mma_layout))
    offs_do = gl.arange(0, CHUNK, layout=gl.SliceLayout(1, mma_layout))
    if SPLIT:  # partial results of this split, combined by the caller: [B, splits, groups * BLOCK_H, D] and so on
        base_h = (row.to(gl.int64) * gl.num_programs(2) + split) * gl.num_programs(0) * BLOCK_H
        ACC += (base_h + offs_h[None, :]) * D + offs_do[:, None]
        gl.store(ACC, acc0)
        gl.store(ACC + CHUNK, acc1)
        gl.store(ACC + 2 * CHUNK, acc2)
        gl.store(ACC + 3 * CHUNK, acc3)
        gl.store(MAX + base_h + offs_h, m_i)
        gl.store(SUM + base_h + offs_h, l_i)
    else:
        scale = 1.0 / gl.where(l_i > 0, l_i, 1.0)  # a row without keys: zeros
        OUT += row.to(gl.int64) * stride_ob + offs_h[None, :] * stride_oh + offs_do[:, None]
        in_h = (offs_h < heads)[None, :]
        gl.store(OUT, (acc0 * scale[None, :]).to(OUT.dtype.element_ty), mask=in_h)
        gl.store(OUT + CHUNK, (acc1 * scale[None, :]).to(OUT.dtype.element_ty), mask=in_h)
        gl.store(OUT + 2 * CHUNK, (acc2 * scale[None, :]).to(OUT.dtype.element_ty), mask=in_h)
        gl.store(OUT + 3 * CHUNK, (acc3 * scale[None, :]).to(OUT.dtype.element_ty), mask=in_h)


def load_threads_along_d(d_model: int) -> int:
    """Threads of a warp along d_model in the chunk loads (8 bf16 = 16 bytes a thread): up to 32."""
    return min(32, d_model // CHUNKS // 8)


def shared_bytes(d_model: int, slots: int) -> int:
    """The kernel's shared memory: queries, the ring of d_model / 4-wide chunks, P, one mbarrier a slot."""
    return 2 * (BLOCK_H * d_model + slots * BLOCK_N * (d_model // CHUNKS) + BLOCK_N * BLOCK_H) + 8 * slots


def supported(d_model: int) -> str | None:
    """Why this kernel cannot take states of this width, or None."""
    if d_model % (CHUNKS * 64) or d_model // CHUNKS > 256:
        return f"d_model {d_model} is not 4 chunks of 64 to 256"
    return None


def dense(memory) -> bool:
    """Whether [B, L, D] states are one dense block that a TMA descriptor can cover."""
    batch, src_len, d_model = memory.shape
    return memory.stride() == (src_len * d_model, d_model, 1) and memory.data_ptr() % 16 == 0


def _states_descriptor(memory):
    """A TMA descriptor of dense [B, L, D] states seen as [B * L, D] in 64 x 64 boxes, or None (not dense)."""
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    batch, src_len, d_model = memory.shape
    if not dense(memory):
        return None
    layout = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=16, rank=2)
    return TensorDescriptor(memory, [batch * src_len, d_model], [d_model, 1], [BLOCK_N, TMA_BOX], layout)


def launch(grid, q_mem, memory, lengths, out, acc, running_max, total, heads, keys_per_split, block_h, split,
           bias=None):
    """This kernel launched with the Triton kernel's arguments (from cross_attention.fused_hidden_attention) over
    dense states; ``bias`` [heads, >= keys] (keys contiguous) or None."""
    batch, src_len, d_model = memory.shape
    gluon_hidden_cross_attention[grid](
        q_mem, _states_descriptor(memory), lengths, out, acc, running_max, total, q_mem if bias is None else bias,
        q_mem.stride(0), q_mem.stride(1), src_len, out.stride(0), out.stride(1), lengths.stride(0),
        0 if bias is None else bias.stride(0), heads, keys_per_split, BLOCK_H=block_h, D=d_model, BLOCK_N=BLOCK_N,
        SPLIT=split, LOAD_TPW_D=load_threads_along_d(d_model), SLOTS=SLOTS, BOX=TMA_BOX, HAS_BIAS=bias is not None,
        num_warps=WARPS)


_SIGNATURE = dict(Q="*bf16", LENGTHS="*i32", OUT="*bf16", ACC="*fp32", MAX="*fp32", SUM="*fp32", BIAS="*bf16",
                  DESC=(f"tensordesc<bf16[{BLOCK_N}, {TMA_BOX}],NVMMASharedLayout(swizzle_byte_width=128, "
                        "element_bitwidth=16, rank=2)>"))


def compile_for_sm90(d_model: int = 1024, split: bool = False, slots: int | None = None, bias: bool = False):
    """triton.compile for sm_90 on any machine (no GPU), specialised as a T5-3b launch would be (pointers and ints
    divisible by 16; with ``bias``, the decoder's self-attention: its lengths a broadcast view, stride 0)."""
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource

    constexprs = dict(BLOCK_H=BLOCK_H, D=d_model, BLOCK_N=BLOCK_N, SPLIT=split,
                      LOAD_TPW_D=load_threads_along_d(d_model), SLOTS=slots or SLOTS, BOX=TMA_BOX, HAS_BIAS=bias,
                      num_warps=WARPS)
    if not bias:  # cross-attention's lengths are contiguous: the JIT makes a stride of 1 a constant
        constexprs["stride_lb"] = 1
    names = gluon_hidden_cross_attention.arg_names
    signature = {n: ("constexpr" if n in constexprs else _SIGNATURE.get(n, "i32")) for n in names}
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(names)
             if n not in constexprs and n != "DESC"}
    source = GluonASTSource(fn=gluon_hidden_cross_attention, signature=signature, constexprs=constexprs, attrs=attrs)
    return triton.compile(source, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=WARPS))
