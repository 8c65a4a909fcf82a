"""Triton kernels for PV_FP16 (sumtune.fast_t5.flash_attention): V as float16, scaled by a power of two that puts
its largest magnitude in [2^14, 2^15), for the attention forward's P·V in float16 (P with 11 bits instead of bf16's 8).

The power comes from the exponent bits of V's largest magnitude (read on the device: no host sync, and exact, where
``exp2(floor(log2(.)))`` can land one power off next to a power of two); the forward kernel divides its output by the
same power in its epilogue, so the float16 copy is the only extra pass beside the max. Imported lazily with the
attention kernels."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def fp16_power(largest):
    """2^e (float32) with ``largest * 2^e`` in [2^14, 2^15); an all-zero V (largest 0) gets a finite power."""
    bits = tl.maximum(largest, 2.0**-100).to(tl.int32, bitcast=True)
    exponent = ((bits >> 23) & 0xFF) - 127  # floor(log2(largest)) of a normal float32
    return ((127 + 14 - exponent) << 23).to(tl.float32, bitcast=True)


@triton.jit
def t5_values_to_fp16(V, OUT, LARGEST, stride_vb, stride_vh, stride_vn, stride_vd, stride_ob, stride_oh, stride_on,
                      stride_od, H, L, HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr):
    """OUT = V * fp16_power(max |V|) as float16, for a (B, H, L, HEAD_DIM) view of any strides."""
    start = tl.program_id(0) * BLOCK
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = bh % H
    offs_n = start + tl.arange(0, BLOCK)
    offs_d = tl.arange(0, HEAD_DIM)
    inside = (offs_n < L)[:, None]
    values = tl.load(V + b * stride_vb + h * stride_vh + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd,
                     mask=inside, other=0.0)
    power = fp16_power(tl.load(LARGEST).to(tl.float32))
    tl.store(OUT + b * stride_ob + h * stride_oh + offs_n[:, None] * stride_on + offs_d[None, :] * stride_od,
             (values.to(tl.float32) * power).to(tl.float16), mask=inside)
