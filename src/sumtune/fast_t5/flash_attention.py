"""T5 attention in sumtune's Triton kernels (``flash_kernels``): launchers, autotuning, autograd, references.

Public:
    flash_t5_attention(query, key, value, bias_table=None, key_mask=None, causal=False, scale=1.0, dropout_p=0.0,
                       bias_radius=None)
    key_padding(key_mask) -> KeyPadding                (per-row key mask, lengths, holes; once per stack)
    dropout_keep_mask(seed, batch, heads, query_len, key_len, dropout_p) -> (B, H, Lq, Lk) bool
    dropout_threshold(dropout_p, draw_range) -> (drop_below, scale)   (also for ffn_dropout's 31-bit draws)
    draw_seed(device) / dropout_seed(like, dropout_p) -> (1,) int64   (a kernel call's dropout seed)
    reference_t5_attention(...)                        (plain PyTorch, same math; from attention_reference)
    block_sizes(fwd=..., dkdv=..., dq=...)             (pin tile sizes instead of autotuning)
    DROPOUT_DRAW_BITS = 16 | 8                          (dropout draw width; 8: half the Philox work, p in 1/256ths)
    DROPOUT_PAIRS = True | False                        (16-bit draws per 2 x 2 elements, built in each kernel's layout)
    MASK_ONLY_WITH_HOLES = True | False                 (the key mask read only in rows with a hole before their length)

Tensors are (batch, heads, length, head_dim) in any strides; the output is a (B, H, L, D) view of a (B, L, H, D)
buffer, so merging heads afterwards is free. The forward and backward are ``torch.library`` custom ops, so
``torch.compile`` keeps them as opaque calls. The dropout seed is drawn inside the forward op by torch's generator
of the tensors' device (the CUDA one on a GPU), as a device tensor the kernels read: no host sync, CUDA graphs draw
a new one on every replay, ``torch.manual_seed`` reproduces it, and checkpointing's RNG-state restore makes a
recomputed forward draw the same mask. It is saved for the backward, which regenerates the same mask.
"""

from __future__ import annotations

import contextlib
import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from sumtune.fast_t5.attention_inputs import (KeyPadding, draw_seed, dropout_seed,  # noqa: F401 (re-exported)
                                              dropout_threshold, key_padding)
from sumtune.fast_t5.attention_reference import reference_t5_attention  # noqa: F401 (the yardstick, re-exported)
from sumtune.fast_t5.flash_descriptors import key_blocks, query_blocks, row_descriptors
from sumtune.fast_t5.flash_tiles import (AUTOTUNE_CONFIGS, FWD_DESCRIPTOR_CONFIGS,  # noqa: F401 (re-exported)
                                         PREVIOUS_AUTOTUNE_CONFIGS, TABLE_MARGIN, _fixed_blocks, _launch, best_configs,
                                         block_sizes, lean_backward_default, near_stages)

LOG2E = 1.4426950408889634
SUPPORTED_DTYPES = (torch.bfloat16, torch.float16)
SUPPORTED_HEAD_DIMS = (16, 32, 64, 128)
# The flags below are read per call (benchmarks flip them by token); their history: docs/speed-history.md, NOTES.
# Bits per dropout draw: 16 (p rounded to 1/65536) or 8 (1/256, half the Philox work, as FlashAttention-2). 8 lost in
# the whole step (H200, 39.0 vs 39.8 samples/s at 1024/128; results/*_loragemm_drop8-*). The backward uses the
# forward's.
DROPOUT_DRAW_BITS = 16
# 16-bit draws in pairs (dropout_draws): one Philox-2x32 call per 2 x 2 elements that one thread holds in the forward's
# and the dK/dV kernel's layouts alike, so no transpose through shared memory (the Philox-4x32 grouping, False, needs
# one): forward + backward 8.83 vs 9.03 ms at 32x32x1024 (H200; results/attention_kernels_pairs-*). Token `nopairs`.
DROPOUT_PAIRS = True
# Pairs' Philox products from one mul.wide.u32 each instead of mul.lo + mul.hi (the same draws), from
# PHILOX_WIDE_MUL_MIN_KEYS keys: 13.79 vs 14.15 ms at 4x32x4096x128 (H200; results/attention_kernels-2026-12-03-h200-
# widemul.json). Compiled kernels only (the interpreter runs no inline PTX). Token `nowidemul`.
PHILOX_WIDE_MUL = True
PHILOX_WIDE_MUL_MIN_KEYS = 2048
# dQ from the stored dS: the dK/dV kernel writes dS (bf16, as the dQ kernel would round it) into a (B, H, Lk, Lq)
# buffer and dQ = dS K runs as cuBLAS GEMMs, instead of a dQ kernel recomputing S, P, dP and the draws. A transient
# L x L buffer per call (2 GiB for 32 x 32 heads at 1024). The shipped step 45.3 vs 43.6 samples/s (H200;
# results/*_dsgemm-2026-12-02-*). Token `nodsgemm`. Read at every backward.
DS_GEMM = True
# A training run whose micro-batch fits only without the dS buffer holds DS_GEMM off (sumtune.training's micro-batch
# search); every run sets it, so none inherits another's.
_ds_gemm_held_off = False
ds_buffers_made = 0  # counted, so a memory probe can tell whether the dS buffer was in play
DS_GEMM_MAX_GIB = 8.0  # a larger dS buffer (long inputs at a large fixed batch) takes the dQ kernel instead
DS_TILE = 128  # the dS buffer's rows and columns are padded to whole tiles, so the kernel stores without masks
# (dK = dSᵀ Q by cuBLAS too measured slower, 44.6 vs 45.3 samples/s: removed, commit 737b9c9 has it.)
# The forward's P·V in more than bf16's precision from PRECISE_PV_MIN_KEYS keys, where bf16's rounding of P moved the
# 4096-key gradients away from float32 (results/attention_numerics_cpu-2026-12-02-cpu.json): PV_FP16 takes V as a
# float16 copy scaled by a power of two (exact; P with 11 bits, sumtune.fast_t5.fp16_values), PV_SPLIT adds a GEMM
# over P's remainder. Both: LoRA gradients 1.089e-2 from float32 against stock SDPA's 1.094e-2 (H200, 4096/512;
# results/fast_t5_numerics_4096_pv16_*); the long step 6.54 -> 6.30 samples/s. Tokens `nopv16`, `nopvsplit`.
PV_FP16 = True
PV_SPLIT = True
# A forward no gradient reaches (generation's encoder, evaluation's loss) keeps bf16's P·V, as stock SDPA and eager T5
# do. True: precise there too (token `pvnograd`).
PRECISE_PV_WITHOUT_GRAD = False
# (Measured slower and removed, in docs/speed-history.md: the far-left keys from cuDNN's causal kernel, session 31,
# commit 6aa3184; the remainder GEMM in float8, PV_LOW8, session 18, commit b74dbf9.)
# The forward and dQ kernels read the key mask only in rows with a masked key before their length (KeyPadding.holes):
# same bits; the long step 6.34 vs 6.26 samples/s (H200; results/long_documents_holes-*); a form with two copies of
# each loop doubled the shared memory (results/*_holes_two_loops-*). Token `noholes`.
MASK_ONLY_WITH_HOLES = True
PRECISE_PV_MIN_KEYS = 2048
# The warp-specialized Gluon kernels (fast_t5.ws_forward, ws_backward: FlashAttention-3's producer warp and two
# consumer warpgroups; their docstrings have the measurements): forwards no gradient reaches, on since 2026-12-05
# (token `nowsenc`); training forwards (`wstrain`) and the dK/dV kernel (`wsbwd`) pass their GPU tests but are off:
# slower at 32x32x1024x128 (H100, 2026-12-06: 2.79 vs 2.71 ms, 5.04 vs 4.69). (One-warpgroup Gluon forwards: none.)
WS_NO_GRAD_FORWARD = True
WS_TRAINING_FORWARD = False
WS_BACKWARD = False
# The forward reads K and V by TMA from descriptors over the projections' (B * L, H * D) rows (the same sums),
# autotuned over FWD_DESCRIPTOR_CONFIGS: Triton's tutorial forward by TMA ran 8.53 ms at 16x32x4096x128 where this one
# with T5's extras ran 11.62 (H200; results/attention_tutorial_ceiling-2026-12-04-h200.json). Off until measured in
# sumtune's forward (token `fwdtma`).
FWD_DESCRIPTORS = False
# LEAN_FORWARD: key tiles wholly inside a row without masked keys before its length run in loops of their own without
# masks, far tiles' scale and bias in the exponent's one multiply-add (flash_kernels' LEAN_TILES; not causal): about
# half the instructions a tile in the sm_90 build (results/attention_lean_compile-2026-12-04-cpu-sm90.json); forward
# 2.74 vs 3.30 ms in training at 32x32x1024x128 with dropout (H200; results/attention_kernels-2026-12-05-h200-lean-
# train.json). Token `nofwdlean`. (Its forerunner WHOLE_TILES, whole tiles without bounds but a select per score,
# measured 0% at the step: NOTES, session 20.)
LEAN_FORWARD = True
# LEAN_BACKWARD: the same for the dK/dV kernel, dropout's 1 / (1 - p) applied once to dK, dV and the dQ GEMM: backward
# 4.71 vs 5.54 ms at 32x32x1024x128 with bias and dropout (H100; results/attention_kernels-2026-12-05-h100-80gb-hbm3-
# new-flags-train.json). On with the Triton releases it was measured on (flash_tiles.lean_backward_default); token
# `nobwdlean`.
LEAN_BACKWARD = lean_backward_default()
# The dK/dV kernel's Q and dO by TMA descriptors. Off until measured (token `bwdtma`).
BWD_DESCRIPTORS = False
# The near tiles (offsets within +-bias_radius) read the bias from a per-call band (sumtune.fast_t5.bias_band) at
# aligned addresses instead of gathering from the table; same values. Forward + backward 8.49 -> 8.18 ms at
# 32x32x1024x128 (H200; results/attention_bias_cost-2026-12-03-h200-band.json). Only with a known radius up to
# BAND_MAX_RADIUS. Token `noband`.
BIAS_BAND = True
BAND_MAX_RADIUS = 512


def _kernels():
    from sumtune.fast_t5 import flash_kernels

    return flash_kernels


# ----------------------------------------------------------------------------- inputs
def _length_key(length: int) -> int:
    return 1 << max(length - 1, 1).bit_length()  # autotune once per power-of-two length bucket


def _check_device(*tensors: Tensor) -> None:
    if tensors[0].device.type != "cuda" and not _kernels().INTERPRET:
        raise RuntimeError("the Triton T5 attention kernels need CUDA tensors (or TRITON_INTERPRET=1 on CPU)")


# ----------------------------------------------------------------------------- launchers
def _table_geometry(table: Tensor | None, query_len: int) -> tuple[int, int]:
    """(row length, column of offset 0) of a margined table from :func:`bias_table_log2`."""
    return (table.shape[1], TABLE_MARGIN + query_len - 1) if table is not None else (0, 0)


def _radius(radius: int, query_len: int, key_len: int) -> int:
    return radius if radius > 0 else query_len + key_len  # 0: no saturation known, every tile reads the table


def _band_tile_limit(name: str) -> int:
    """The largest tile side kernel ``name`` may run with in this call (the band must hold its tiles): its fixed
    tiles' larger side, or TABLE_MARGIN (the bound `_launch` holds every tile to) when the autotuner chooses."""
    blocks = _fixed_blocks(name)
    return max(blocks[:2]) if blocks else TABLE_MARGIN


def _band_args(table: Tensor | None, radius: int, query_len: int, key_len: int, name: str) -> dict:
    """Kernel ``name``'s BIAS_BAND arguments for this call (sumtune.fast_t5.bias_band; one small launch), or none;
    the dK/dV kernel's (keys, queries) tiles read a transposed band."""
    if not BIAS_BAND or table is None or not 0 < radius <= BAND_MAX_RADIUS:
        return {}
    from sumtune.fast_t5 import bias_band

    band = bias_band.build_band(table, radius, query_len, key_len, _table_geometry(table, query_len)[1],
                                _band_tile_limit(name), transposed=name == "dkdv")
    return dict(band, USE_BAND=True)


def _fp16_values(v: Tensor) -> tuple[Tensor, Tensor]:
    """V times 2^e as float16, e from the exponent of max |V| (which comes back too, for the forward's epilogue):
    exact, with max |V| 2^e in [2^14, 2^15); one read for the max and one pass for the copy, on the device."""
    batch, heads, length, head_dim = v.shape
    largest = torch.linalg.vector_norm(v, ord=math.inf)  # max |V|, one pass, no |V| temporary; exact in bf16
    out = torch.empty((batch, length, heads, head_dim), device=v.device, dtype=torch.float16).transpose(1, 2)
    block = 64
    _kernels().t5_values_to_fp16[(_cdiv(length, block), batch * heads)](
        v, out, largest, *v.stride(), *out.stride(), heads, length, HEAD_DIM=head_dim, BLOCK=block)
    return out, largest


def _forward(q, k, v, table, radius, mask, lengths, holes, causal, scale, dropout_p, seed, draw_bits, pairs,
             precise_pv):
    kernels = _kernels()
    batch, heads, query_len, head_dim = q.shape
    key_len = k.shape[2]
    no_gradient = not precise_pv  # the op's flag: no gradient reaches this call (and not PRECISE_PV_WITHOUT_GRAD)
    precise_pv = precise_pv and key_len >= PRECISE_PV_MIN_KEYS
    pv_fp16 = PV_FP16 and precise_pv and v.dtype == torch.bfloat16  # the kernel's P·V in float16 (P cast to V's dtype)
    largest = None
    if pv_fp16:
        v, largest = _fp16_values(v)
    out = torch.empty((batch, query_len, heads, head_dim), device=q.device, dtype=q.dtype).transpose(1, 2)
    lse = torch.empty((batch, heads, query_len), device=q.device, dtype=torch.float32)
    drop_below, drop_scale = dropout_threshold(dropout_p, 1 << draw_bits)
    radius_given, radius = radius, _radius(radius, query_len, key_len)
    if (WS_NO_GRAD_FORWARD and no_gradient and dropout_p == 0 or WS_TRAINING_FORWARD and not precise_pv) \
            and _ws_asked(q, mask, dropout_p, draw_bits, pairs):
        from sumtune.fast_t5 import ws_forward

        dropout = (seed, drop_below, drop_scale) if dropout_p > 0 else None
        if ws_forward.run_if_covered(q, k, v, causal, out, lse, table, _table_geometry(table, query_len),
                                     radius_given, radius, BAND_MAX_RADIUS, mask, lengths, holes, scale * LOG2E,
                                     dropout):
            return out, lse
    dummy = lse
    descriptors = row_descriptors(k, v) if FWD_DESCRIPTORS else None
    _launch("fwd", kernels.t5_flash_attention_fwd,
            lambda bm, bn: (_cdiv(query_len, bm), batch * heads),
            q, *(descriptors or (k, v)), out, lse, table if table is not None else dummy,
            mask if mask is not None else dummy, lengths if lengths is not None else dummy,
            largest if pv_fp16 else dummy,
            *q.stride(), *k.stride(), *v.stride(), *out.stride(), mask.stride(0) if mask is not None else 0,
            heads, query_len, key_len, radius, *_table_geometry(table, query_len), scale * LOG2E, seed, drop_below,
            drop_scale, _length_key(max(query_len, key_len)),
            HEAD_DIM=head_dim, CAUSAL=causal, HAS_BIAS=table is not None, HAS_KEY_MASK=mask is not None,
            DROPOUT=dropout_p > 0, UPCAST=kernels.INTERPRET, DRAW8=draw_bits == 8,
            PV_SPLIT=PV_SPLIT and precise_pv, PV_FP16=pv_fp16, PAIRS=_pairs_mode(pairs, key_len),
            LEAN_TILES=LEAN_FORWARD and not causal and scale > 0,  # a row's largest product: its largest score
            **_holes_args(mask, holes), **_band_args(table, radius_given, query_len, key_len, "fwd"),
            **(dict(DESC=True, tune_as="fwd_desc", pre_hook=key_blocks) if descriptors else {}))
    return out, lse


def _ws_asked(q: Tensor, mask: Tensor | None, dropout_p: float, draw_bits: int, pairs: bool) -> bool:
    """A warp-specialized kernel may take the call: on CUDA (not the interpreter), with the key mask, if any, read
    only in rows with holes (the forward's only way of reading it), and dropout, if any, in the 16-bit paired draws
    (the only ones its kernels make)."""
    return (q.is_cuda and not _kernels().INTERPRET and (mask is None or MASK_ONLY_WITH_HOLES)
            and (dropout_p == 0 or (draw_bits == 16 and pairs)))


def _backward(grad_out, q, k, v, out, lse, table, radius, mask, lengths, holes, causal, scale, dropout_p, seed,
              draw_bits, pairs):
    kernels = _kernels()
    batch, heads, query_len, head_dim = q.shape
    key_len = k.shape[2]
    delta = torch.empty_like(lse)
    block = 64
    kernels.t5_attention_bwd_delta[(_cdiv(query_len, block), batch * heads)](
        out, grad_out, delta, *out.stride(), *grad_out.stride(), heads, query_len, HEAD_DIM=head_dim, BLOCK_M=block)
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    drop_below, drop_scale = dropout_threshold(dropout_p, 1 << draw_bits)
    radius_given, radius = radius, _radius(radius, query_len, key_len)
    common = dict(HEAD_DIM=head_dim, CAUSAL=causal, HAS_BIAS=table is not None, HAS_KEY_MASK=mask is not None,
                  DROPOUT=dropout_p > 0, UPCAST=kernels.INTERPRET, DRAW8=draw_bits == 8,
                  PAIRS=_pairs_mode(pairs, key_len))
    table_arg = table if table is not None else delta
    mask_arg = mask if mask is not None else delta
    lengths_arg = lengths if lengths is not None else delta
    mask_stride = mask.stride(0) if mask is not None else 0
    length_key = _length_key(max(query_len, key_len))
    geometry = _table_geometry(table, query_len)
    store_ds = ds_gemm_active() and (
        _ds_buffer_gib(batch, heads, key_len, query_len, q.element_size()) <= DS_GEMM_MAX_GIB)
    ds = _ds_buffer(batch, heads, key_len, query_len, q) if store_ds else delta
    if WS_BACKWARD and _ws_asked(q, mask, dropout_p, draw_bits, pairs):
        from sumtune.fast_t5 import ws_backward

        if ws_backward.run_if_covered(q, k, v, grad_out, dk, dv, ds, lse, delta, causal, table, geometry,
                                      radius_given, radius, BAND_MAX_RADIUS, store_ds, mask, lengths, scale * LOG2E,
                                      scale, seed, dropout_p, drop_below, drop_scale):
            return _dq_from_ds(ds, k, dq, query_len, key_len, scale * drop_scale), dk, dv  # dS without dropout's scale
    ds_strides = ds.stride()[:3] if store_ds else (0, 0, 0)
    descriptors = row_descriptors(q, grad_out) if BWD_DESCRIPTORS else None
    q_arg, do_arg = descriptors or (q, grad_out)
    lean = LEAN_BACKWARD and not causal  # with dropout, the lean build leaves its scale to dK, dV and the dQ GEMM
    _launch("dkdv", kernels.t5_flash_attention_bwd_dkdv,
            lambda bm, bn: (_cdiv(key_len, bn), batch * heads),
            q_arg, k, v, do_arg, dk, dv, lse, delta, table_arg, mask_arg, lengths_arg, ds,
            *q.stride(), *k.stride(), *v.stride(), *grad_out.stride(), *dk.stride(), *dv.stride(), *ds_strides,
            mask_stride, heads, query_len, key_len, radius, *geometry, scale * LOG2E, scale, seed, drop_below,
            drop_scale, length_key, STORE_DS=store_ds, LEAN_TILES=lean, **common,
            **_band_args(table, radius_given, query_len, key_len, "dkdv"),
            **(dict(DESC=True, tune_as="dkdv_desc", pre_hook=query_blocks) if descriptors else {}))
    if store_ds:  # the lean build's dS lacks dropout's scale (flash_kernels_bwd FOLD_DROP)
        ds_scale = scale * (drop_scale if lean and dropout_p > 0 else 1.0)
        return _dq_from_ds(ds, k, dq, query_len, key_len, ds_scale), dk, dv
    _launch("dq", kernels.t5_flash_attention_bwd_dq,
            lambda bm, bn: (_cdiv(query_len, bm), batch * heads),
            q, k, v, grad_out, dq, lse, delta, table_arg, mask_arg, lengths_arg,
            *q.stride(), *k.stride(), *v.stride(), *grad_out.stride(), *dq.stride(), mask_stride,
            heads, query_len, key_len, radius, *geometry, scale * LOG2E, scale, seed, drop_below, drop_scale,
            length_key, **common, **_holes_args(mask, holes),
            **_band_args(table, radius_given, query_len, key_len, "dq"))
    return dq, dk, dv


def _holes_args(mask, holes) -> dict:
    """The forward's and dQ kernel's MASK_ONLY_WITH_HOLES arguments (none when off or without a key mask)."""
    return dict(CHECK_HOLES=True, HOLES=holes) if MASK_ONLY_WITH_HOLES and mask is not None else {}


def ds_gemm_active() -> bool:
    """Whether a backward now takes dQ from the stored dS (buffer size cap aside)."""
    return DS_GEMM and not _ds_gemm_held_off


def ds_gemm_held_off_for_run() -> bool:
    return _ds_gemm_held_off


def hold_off_ds_gemm(held_off: bool) -> None:
    """For the run that follows: the dQ kernel instead of the stored dS (its micro-batch fits only so), or not."""
    global _ds_gemm_held_off
    _ds_gemm_held_off = bool(held_off)


@contextlib.contextmanager
def holding_off_ds_gemm():
    """The block runs with the dQ kernel (a memory probe's leaner variant); the setting before comes back after."""
    before = _ds_gemm_held_off
    hold_off_ds_gemm(True)
    try:
        yield
    finally:
        hold_off_ds_gemm(before)


def _ds_buffer_shape(batch: int, heads: int, key_len: int, query_len: int) -> tuple[int, int, int, int]:
    return batch, heads, _round_up(key_len, DS_TILE), _round_up(query_len, DS_TILE)


def _ds_buffer_gib(batch: int, heads: int, key_len: int, query_len: int, element_bytes: int) -> float:
    return math.prod(_ds_buffer_shape(batch, heads, key_len, query_len)) * element_bytes / 2**30


def _ds_buffer(batch: int, heads: int, key_len: int, query_len: int, like: Tensor) -> Tensor:
    """Uninitialised (B, H, Lk, Lq) dSᵀ buffer padded to whole tiles: the dK/dV kernel writes every entry of it
    that the GEMM reads, zeros included (tests fill it with NaN to check)."""
    global ds_buffers_made
    ds_buffers_made += 1
    return torch.empty(_ds_buffer_shape(batch, heads, key_len, query_len), device=like.device, dtype=like.dtype)


def _dq_from_ds(ds: Tensor, k: Tensor, dq: Tensor, query_len: int, key_len: int, scale: float) -> Tensor:
    """dQ = scale · dS K, with dSᵀ in the padded (B, H, Lk_pad, Lq_pad) buffer the dK/dV kernel wrote."""
    ds_used = ds[:, :, :key_len, :query_len].transpose(-1, -2)  # (B, H, Lq, Lk), a view: cuBLAS reads it transposed
    # One GEMM batch per sample: K and dQ are (B, L, H, D) seen as (B, H, L, D), so a sample's heads are evenly strided
    # (cuBLAS-batchable in place) while (B, H) together are not (one batched matmul copied K and dQ, ~1 GB a call).
    for sample in range(ds.shape[0]):
        if scale == 1.0:
            torch.bmm(ds_used[sample], k[sample], out=dq[sample])
        else:  # the scale as the GEMM's alpha (beta 0: dq's uninitialised values are not read)
            dq[sample].baddbmm_(ds_used[sample], k[sample], beta=0.0, alpha=scale)
    return dq


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _round_up(a: int, b: int) -> int:
    return _cdiv(a, b) * b


# ----------------------------------------------------------------------------- custom ops + autograd
@torch.library.custom_op("sumtune::t5_flash_attention", mutates_args=())
def _attention_op(q: Tensor, k: Tensor, v: Tensor, table: Optional[Tensor], radius: int, mask: Optional[Tensor],
                  lengths: Optional[Tensor], holes: Optional[Tensor], causal: bool, scale: float, dropout_p: float,
                  draw_bits: int, pairs: bool, precise_pv: bool) -> tuple[Tensor, Tensor, Tensor]:
    # draw_bits and pairs without defaults: a caller that left them out drew another mask than dropout_keep_mask's
    seed = dropout_seed(q, dropout_p)
    out, lse = _forward(q, k, v, table, radius, mask, lengths, holes, causal, scale, dropout_p, seed, draw_bits,
                        pairs, precise_pv)
    return out, lse, seed


@_attention_op.register_fake
def _(q, k, v, table, radius, mask, lengths, holes, causal, scale, dropout_p, draw_bits, pairs, precise_pv):
    batch, heads, query_len, head_dim = q.shape
    out = q.new_empty((batch, query_len, heads, head_dim)).transpose(1, 2)
    return out, q.new_empty((batch, heads, query_len), dtype=torch.float32), q.new_empty((1,), dtype=torch.int64)


@torch.library.custom_op("sumtune::t5_flash_attention_backward", mutates_args=())
def _attention_backward_op(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                           seed: Tensor, table: Optional[Tensor], radius: int, mask: Optional[Tensor],
                           lengths: Optional[Tensor], holes: Optional[Tensor], causal: bool, scale: float,
                           dropout_p: float, draw_bits: int, pairs: bool) -> tuple[Tensor, Tensor, Tensor]:
    return _backward(grad_out, q, k, v, out, lse, table, radius, mask, lengths, holes, causal, scale, dropout_p, seed,
                     draw_bits, pairs)


@_attention_backward_op.register_fake
def _(grad_out, q, k, v, out, lse, seed, table, radius, mask, lengths, holes, causal, scale, dropout_p,
      draw_bits, pairs):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output):
    q, k, v, table, radius, mask, lengths, holes, causal, scale, dropout_p, draw_bits, pairs, _precise_pv = inputs
    out, lse, seed = output
    ctx.save_for_backward(q, k, v, out, lse, seed, table, mask, lengths, holes)
    ctx.radius, ctx.causal, ctx.scale, ctx.dropout_p = radius, causal, scale, dropout_p
    ctx.draw_bits, ctx.pairs = draw_bits, pairs


def _backward_rule(ctx, grad_out, _grad_lse, _grad_seed):
    q, k, v, out, lse, seed, table, mask, lengths, holes = ctx.saved_tensors
    dq, dk, dv = _attention_backward_op(grad_out, q, k, v, out, lse, seed, table, ctx.radius, mask, lengths, holes,
                                        ctx.causal, ctx.scale, ctx.dropout_p, ctx.draw_bits, ctx.pairs)
    return dq, dk, dv, None, None, None, None, None, None, None, None, None, None, None


_attention_op.register_autograd(_backward_rule, setup_context=_setup_context)


# ----------------------------------------------------------------------------- public API
def bias_table_log2(bias_by_offset: Tensor) -> Tensor:
    """A (H, Lq + Lk - 1) bias table as the kernels take it: fp32, times log2(e) (they work with exp2), with
    TABLE_MARGIN zero columns each side (tiles that overhang the sequences read there, in bounds)."""
    margined = F.pad(bias_by_offset.float() * LOG2E, (TABLE_MARGIN, TABLE_MARGIN))
    return margined.contiguous()


def t5_flash_attention(query: Tensor, key: Tensor, value: Tensor, table_log2: Tensor | None, bias_radius: int,
                       padding: KeyPadding | None, causal: bool, scale: float, dropout_p: float) -> Tensor:
    """The kernels on prepared inputs (what the fast T5 stack calls once per layer): ``table_log2`` from
    :func:`bias_table_log2`, ``padding`` from :func:`key_padding`; ``bias_radius`` 0: none."""
    if table_log2 is not None and table_log2.shape[1] != query.shape[2] + key.shape[2] - 1 + 2 * TABLE_MARGIN:
        raise ValueError(f"table_log2 has {table_log2.shape[1]} columns: not a bias_table_log2 table for these lengths")
    mask, lengths, holes = padding if padding is not None else (None, None, None)
    gradient = torch.is_grad_enabled() and (query.requires_grad or key.requires_grad or value.requires_grad)
    return _attention_op(query, key, value, table_log2, int(bias_radius), mask, lengths, holes, causal, float(scale),
                         float(dropout_p), _draw_bits(), _pairs(), bool(gradient or PRECISE_PV_WITHOUT_GRAD))[0]


def _pairs() -> bool:
    return bool(DROPOUT_PAIRS) and _draw_bits() == 16  # 8-bit draws have their own grouping


def _pairs_mode(pairs: bool, key_len: int) -> int:
    """The kernels' PAIRS constexpr: 0 (quads), 1 (pairs), 2 (pairs, products from mul.wide: PHILOX_WIDE_MUL)."""
    if not pairs:
        return 0
    wide = PHILOX_WIDE_MUL and key_len >= PHILOX_WIDE_MUL_MIN_KEYS and not _kernels().INTERPRET
    return 2 if wide else 1


def _draw_bits() -> int:
    if DROPOUT_DRAW_BITS not in (8, 16):
        raise ValueError(f"DROPOUT_DRAW_BITS must be 8 or 16, not {DROPOUT_DRAW_BITS}")
    return DROPOUT_DRAW_BITS


def flash_t5_attention(query: Tensor, key: Tensor, value: Tensor, bias_table: Tensor | None = None,
                       key_mask: Tensor | KeyPadding | None = None, causal: bool = False, scale: float = 1.0,
                       dropout_p: float = 0.0, bias_radius: int | None = None) -> Tensor:
    """softmax(q.k^T * scale + bias + mask) with dropout, times v; (B, H, L, D) inputs in bf16 or fp16.

    ``bias_table``: (H, Lq + Lk - 1), ``bias_table[h, (j - i) + (Lq - 1)]`` is the bias of query i and key j
    (:func:`sumtune.fast_t5.bias.relative_position_bias_by_offset` builds T5's); no gradient flows to it.
    ``bias_radius``: every offset with j - i >= R has the bias of +R and every one <= -R that of -R (T5:
    ``relative_attention_max_distance``), so tiles that far away use one value instead of reading the table;
    None: no such promise. ``key_mask``: (B, Lk), true/1 where a key may be attended. ``causal``: key j only for
    queries i >= j. Dropout (on the probabilities, kept ones scaled up) draws its seed from torch's CPU generator.
    """
    _check_inputs(query, key, value, bias_table, causal)
    padding = key_padding(key_mask) if isinstance(key_mask, Tensor) else key_mask
    table = bias_table_log2(bias_table.detach()) if bias_table is not None else None
    return t5_flash_attention(query, key, value, table, bias_radius or 0, padding, causal, scale, dropout_p)


def _check_inputs(query, key, value, bias_table, causal) -> None:
    if query.dim() != 4 or key.shape != value.shape or query.shape[:2] != key.shape[:2]:
        raise ValueError(f"expected (B, H, L, D) query/key/value, got {tuple(query.shape)}, {tuple(key.shape)}, "
                         f"{tuple(value.shape)}")
    if query.shape[-1] != key.shape[-1] or query.shape[-1] not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"head_dim must be one of {SUPPORTED_HEAD_DIMS}, got {query.shape[-1]}")
    dtypes = SUPPORTED_DTYPES + ((torch.float32,) if _kernels().INTERPRET else ())  # fp32: exact CPU tests only
    if not query.dtype == key.dtype == value.dtype or query.dtype not in dtypes:
        raise ValueError(f"query/key/value must all be bfloat16 or float16, got {query.dtype}")
    if causal and query.shape[2] != key.shape[2]:
        raise ValueError("causal attention needs as many queries as keys")
    expected = (query.shape[1], query.shape[2] + key.shape[2] - 1)
    if bias_table is not None and tuple(bias_table.shape) != expected:
        raise ValueError(f"bias_table must be (heads, Lq + Lk - 1) = {expected}, got {tuple(bias_table.shape)}")
    _check_device(query)


def dropout_keep_mask(seed: Tensor | int, batch: int, heads: int, query_len: int, key_len: int, dropout_p: float,
                      device: torch.device | str = "cuda", block: tuple[int, int] = (16, 32)) -> Tensor:
    """(B, H, Lq, Lk) bool: True where the kernels keep a probability for this seed (False: dropped), with the
    draw width of ``DROPOUT_DRAW_BITS`` and the grouping of ``DROPOUT_PAIRS``.

    A call's seed is what :func:`draw_seed` returns first after the caller's RNG state (see the tests)."""
    kernels = _kernels()
    bits = _draw_bits()
    drop_below, _ = dropout_threshold(dropout_p, 1 << bits)
    seed = torch.as_tensor(seed, dtype=torch.int64).reshape(1).to(device)
    mask = torch.empty((batch, heads, query_len, key_len), dtype=torch.int8, device=device)
    block_m, block_n = block
    grid = (_cdiv(query_len, block_m), _cdiv(key_len, block_n), batch * heads)
    kernels.t5_attention_dropout_mask[grid](mask, heads, query_len, key_len, seed, drop_below,
                                            BLOCK_M=block_m, BLOCK_N=block_n, DRAW8=bits == 8,
                                            PAIRS=_pairs_mode(_pairs(), key_len))
    return mask.bool()


def dropout_scale(dropout_p: float) -> float:
    """What the kernels multiply kept probabilities by (1 / exact keep probability, ``DROPOUT_DRAW_BITS`` draws)."""
    return dropout_threshold(dropout_p, 1 << _draw_bits())[1]
