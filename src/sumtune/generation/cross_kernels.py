"""Triton kernel for one decoding step's cross-attention over cached encoder states (sumtune.generation.cross_attention).

Imported lazily: importing it decorates the kernel (under ``TRITON_INTERPRET=1`` it runs on CPU tensors).

A program takes one group of BLOCK_H heads, one row of the batch and one split of its keys: the group's projected
queries (W_k,h^T q_h, d_model wide) against the row's encoder states, which serve as keys and values both, so each
tile of states is read once for the scores and the weighted sum together (the two batched GEMMs it replaces each read
all of them). Keys at or past the row's source length are never read. Online softmax as in FlashAttention; with
several splits the program writes its unnormalised sum, running max and denominator for a combine step, else the
normalised output. The head groups of a row and split are neighbouring programs, so all but the first read the row's
states from L2: a group of 16 heads holds half the accumulator of 32 (d_model floats a head) in registers.
HAS_BIAS adds one value a head and key before the softmax (the decoder's self-attention: its relative position bias
at one step, the same for every row; LENGTHS then a broadcast view, stride_lb 0).
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
def hidden_cross_attention(Q, MEM, LENGTHS, OUT, ACC, MAX, SUM, BIAS, stride_qb, stride_qh, stride_mb, stride_mn,
                           stride_ob, stride_oh, stride_lb, stride_bh, heads, keys_per_split, BLOCK_H: tl.constexpr,
                           D: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT: tl.constexpr, UPCAST: tl.constexpr,
                           HAS_BIAS: tl.constexpr = False):
    group = tl.program_id(0)
    row = tl.program_id(1).to(tl.int64)
    split = tl.program_id(2)
    offs_h = group * BLOCK_H + tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, D)
    in_h = offs_h < heads
    q = tl.load(Q + row * stride_qb + offs_h[:, None] * stride_qh + offs_d[None, :], mask=in_h[:, None], other=0.0)
    start = split * keys_per_split
    stop = tl.minimum(start + keys_per_split, tl.load(LENGTHS + row * stride_lb))
    MEM += row * stride_mb
    m_i = tl.zeros([BLOCK_H], dtype=tl.float32) - float("inf")
    l_i = tl.zeros([BLOCK_H], dtype=tl.float32)
    acc = tl.zeros([BLOCK_H, D], dtype=tl.float32)
    for start_n in range(start, stop, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        in_n = offs_n < stop
        states = tl.load(MEM + offs_n[:, None] * stride_mn + offs_d[None, :], mask=in_n[:, None], other=0.0)
        scores = _dot(q, tl.trans(states), UPCAST)  # T5: no scaling
        if HAS_BIAS:  # one value a head and key (the decoder's relative position bias at this step)
            bias = tl.load(BIAS + offs_h[:, None] * stride_bh + offs_n[None, :], mask=in_h[:, None] & in_n[None, :],
                           other=0.0)
            scores += bias.to(tl.float32)
        scores = tl.where(in_n[None, :], scores, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, 1))
        p = tl.exp(scores - m_new[:, None])
        alpha = tl.exp(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + _dot(p.to(states.dtype), states, UPCAST)
        m_i = m_new
    if SPLIT:  # partial results of this split, combined by the caller
        base = (row * tl.num_programs(2) + split) * tl.num_programs(0) * BLOCK_H  # [B, splits, groups * BLOCK_H]
        tl.store(ACC + (base + offs_h[:, None]) * D + offs_d[None, :], acc)
        tl.store(MAX + base + offs_h, m_i)
        tl.store(SUM + base + offs_h, l_i)
    else:
        out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]  # a row without keys: zeros
        tl.store(OUT + row * stride_ob + offs_h[:, None] * stride_oh + offs_d[None, :], out.to(OUT.dtype.element_ty),
                 mask=in_h[:, None])


@triton.jit
def combine_splits(ACC, MAX, SUM, OUT, stride_ob, stride_oh, padded_heads, SPLITS: tl.constexpr,
                   BLOCK_S: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr):
    """One (head, row) of the key splits' partial results combined: ``out = Σ_s w_s acc_s / Σ_s w_s l_s`` with
    ``w_s = exp(m_s - max_s m_s)``; splits that met no key (m_s = -inf) weigh nothing, and a row without keys gives
    zeros, as the unsplit kernels write them. ACC [B, SPLITS, padded_heads, D] fp32, MAX and SUM [B, SPLITS,
    padded_heads]: what the decoding kernels store with SPLIT. One read of ACC, in place of the ~10 torch launches
    (and an [B, SPLITS, heads, D] product written and read back) of `cross_attention.combine_in_torch`."""
    head = tl.program_id(0)
    row = tl.program_id(1).to(tl.int64)
    offs_s = tl.arange(0, BLOCK_S)
    in_s = offs_s < SPLITS
    base = (row * SPLITS + offs_s) * padded_heads + head  # [B, SPLITS, padded_heads] index of each split's head
    m = tl.load(MAX + base, mask=in_s, other=float("-inf"))
    top = tl.max(m, 0)
    top = tl.where(top > float("-inf"), top, 0.0)  # a row without keys: every weight exp(-inf) = 0, no -inf - -inf
    weights = tl.exp(m - top)
    total = tl.sum(weights * tl.load(SUM + base, mask=in_s, other=0.0), 0)
    scale = tl.where(total > 0, 1.0, 0.0) / tl.where(total > 0, total, 1.0)  # no keys: zeros
    for d0 in tl.static_range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        acc = tl.load(ACC + base[:, None] * D + offs_d[None, :], mask=in_s[:, None], other=0.0)
        out = tl.sum(acc * weights[:, None], 0) * scale
        tl.store(OUT + row * stride_ob + head * stride_oh + offs_d, out.to(OUT.dtype.element_ty))
