"""What the forward (``flash_kernels``) and backward (``flash_kernels_bwd``) attention kernels share: how a tile
gets T5's bias (the modes, the tile, the biased scores), a program's head, batch row and dropout seed, a query block's
key bounds, and a head's rows of a (B, H, L, D) view."""

from __future__ import annotations

import triton
import triton.language as tl

from sumtune.fast_t5.bias_band import _band_tile
from sumtune.triton_compat import interpreter_safe_dot as _dot

# Globals read inside kernels must be constexpr for Triton's compiler (the interpreter would not notice).
BIAS_NONE = tl.constexpr(0)  # _bias_tile modes
BIAS_CONST = tl.constexpr(1)
BIAS_GATHER = tl.constexpr(2)
BIAS_BAND = tl.constexpr(3)  # the near tiles from the band (see bias_band.t5_bias_band)


@triton.jit
def _bias_tile(TABLE, rel, const, BIAS_MODE: tl.constexpr):
    """Bias (log2 units) for relative positions ``rel = j - i``: loaded, one constant, or none.

    ``TABLE`` points at offset 0 of the head's row, so the address is affine in (i, j): no clamp, no gather
    indices held per element (a clamped index into a short table spilled registers on sm_90)."""
    if BIAS_MODE == BIAS_GATHER:
        out = tl.load(TABLE + rel)
    elif BIAS_MODE == BIAS_CONST:
        out = tl.zeros(rel.shape, tl.float32) + const
    else:
        out = tl.zeros(rel.shape, tl.float32)
    return out


@triton.jit
def _biased_scores(q, k_t, TABLE, const, start_m, start_n, offs_m, offs_n, qk_scale, band_w,
                   BIAS_MODE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, UPCAST: tl.constexpr):
    """A (queries, keys) tile's scores in log2 units with T5's bias: from the band, the table, one constant or none."""
    s = _dot(q, k_t, UPCAST) * qk_scale
    if BIAS_MODE == BIAS_BAND:
        s += _band_tile(TABLE, start_n - start_m, band_w, BLOCK_M, BLOCK_N)
    else:
        s += _bias_tile(TABLE, offs_n[None, :] - offs_m[:, None], const, BIAS_MODE)
    return s


@triton.jit
def _program_head(SEED, H, DROPOUT: tl.constexpr):
    """(batch * heads index, batch row as int64, head, dropout seed) of this program (grid axis 1 is batch * heads);
    the seed is drawn on the device by torch's generator: no host sync, new on every graph replay (0 without
    dropout)."""
    bh = tl.program_id(1)
    seed = 0
    if DROPOUT:
        seed = tl.load(SEED)
    return bh, (bh // H).to(tl.int64), bh % H, seed


@triton.jit
def _row_keys(KV_LEN, KMASK, b, stride_mask_b, Lk, start_m, HAS_KEY_MASK: tl.constexpr, CAUSAL: tl.constexpr,
              BLOCK_M: tl.constexpr):
    """(the row's key length, its key-mask row, the end of the keys that query block [start_m, start_m + BLOCK_M)
    attends to): the forward's and the dQ kernel's key loop bounds."""
    if HAS_KEY_MASK:
        kv_len = tl.load(KV_LEN + b)
        KMASK += b * stride_mask_b
    else:
        kv_len = Lk
    stop = kv_len
    if CAUSAL:
        stop = tl.minimum(stop, start_m + BLOCK_M)
    return kv_len, KMASK, stop


@triton.jit
def _head_rows(X, b, h, offs, offs_d, stride_b, stride_h, stride_row, stride_d, in_rows):
    """Rows ``offs`` of batch row ``b`` and head ``h`` of a (B, H, L, D) view, zeros where ``in_rows`` is False."""
    return tl.load(X + b * stride_b + h * stride_h + offs[:, None] * stride_row + offs_d[None, :] * stride_d,
                   mask=in_rows[:, None], other=0.0)
