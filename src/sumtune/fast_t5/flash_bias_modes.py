"""How a tile of sumtune's Triton attention kernels gets T5's bias (``flash_kernels``, ``flash_kernels_bwd``): the
modes and the helper both kernel modules use."""

from __future__ import annotations

import triton
import triton.language as tl

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
