"""Triton kernels for T5's feed-forward activation followed by dropout, one pass each way
(sumtune.fast_t5.ffn_dropout): ReLU (T5), and the tanh-approximated GELU gate of T5 v1.1 / FLAN-T5.

Imported lazily: importing it decorates the kernels (under ``TRITON_INTERPRET=1`` they run on CPU tensors).

* Forward: ``y = relu(x) * keep / (1 - p)`` in fp32, stored in x's dtype. ``keep`` is a 31-bit draw >= drop_below
  from Philox-4x32 (Triton's ``randint4x``, 10 rounds) keyed by a seed drawn on the device (no host sync, a new one
  on every CUDA graph replay), counter = element index // 4, word = element index % 4: the draw of an element
  depends only on (seed, index), not on the block size.
* Backward: ``dx = dy * (1 / (1 - p) where y > 0 else 0)``. y > 0 exactly where x > 0 and the element was kept, so
  the backward needs neither x nor the mask, only y, which the next layer (``wo``) keeps anyway.
* Gated GELU (T5 v1.1 / FLAN-T5, ``gelu_new``): ``y = gelu(a) * b * keep / (1 - p)`` with the same draws, and
  ``gelu(a) = a * sigmoid(2u)``, ``u = sqrt(2/pi) * (a + 0.044715 a^3)`` (= 0.5 a (1 + tanh u)), all in fp32. The
  backward recomputes gelu and the mask from a, b and the seed: ``da = dy' * b * gelu'(a)``, ``db = dy' * gelu(a)``.
Multiplications, not selects, so a NaN stays a NaN as in torch's relu + dropout.
"""

from __future__ import annotations

import triton
import triton.language as tl

INTERPRET = bool(triton.knobs.runtime.interpret)


@triton.jit
def _draws(seed, start, BLOCK: tl.constexpr):
    """31-bit draws for elements start .. start + BLOCK (start a multiple of 4): 4 per Philox call."""
    counters = start // 4 + tl.arange(0, BLOCK // 4)
    r0, r1, r2, r3 = tl.randint4x(seed, counters)
    words = tl.reshape(tl.join(tl.join(r0, r2), tl.join(r1, r3)), (BLOCK,))  # element 4c + w <- word w
    return (words >> 1).to(tl.int32)


@triton.jit
def relu_dropout_fwd(X, Y, SEED, n, drop_below, scale, BLOCK: tl.constexpr, DROPOUT: tl.constexpr):
    start = tl.program_id(0).to(tl.int64) * BLOCK
    offsets = start + tl.arange(0, BLOCK)
    in_bounds = offsets < n
    x = tl.load(X + offsets, mask=in_bounds, other=0.0).to(tl.float32)
    y = tl.maximum(x, 0.0, propagate_nan=tl.PropagateNan.ALL)
    if DROPOUT:
        keep = _draws(tl.load(SEED), start, BLOCK) >= drop_below
        y = y * tl.where(keep, scale, 0.0)
    tl.store(Y + offsets, y.to(Y.dtype.element_ty), mask=in_bounds)


@triton.jit
def relu_dropout_bwd(DY, Y, DX, n, scale, BLOCK: tl.constexpr):
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    in_bounds = offsets < n
    dy = tl.load(DY + offsets, mask=in_bounds, other=0.0).to(tl.float32)
    y = tl.load(Y + offsets, mask=in_bounds, other=0.0)
    dx = dy * tl.where(y > 0, scale, 0.0)
    tl.store(DX + offsets, dx.to(DX.dtype.element_ty), mask=in_bounds)


@triton.jit
def relu_dropout_keep(KEEP, SEED, n, drop_below, BLOCK: tl.constexpr):
    """KEEP[i] = 1 where the forward keeps element i for this seed (tests)."""
    start = tl.program_id(0).to(tl.int64) * BLOCK
    offsets = start + tl.arange(0, BLOCK)
    keep = _draws(tl.load(SEED), start, BLOCK) >= drop_below
    tl.store(KEEP + offsets, keep.to(tl.int8), mask=offsets < n)


@triton.jit
def _gelu_tanh(a):
    """(gelu(a), gelu'(a)) in fp32 for the tanh approximation."""
    c: tl.constexpr = 0.7978845608028654  # sqrt(2 / pi)
    k: tl.constexpr = 0.044715
    s = tl.sigmoid(2.0 * c * (a + k * a * a * a))
    return a * s, s + a * s * (1.0 - s) * 2.0 * c * (1.0 + 3.0 * k * a * a)


@triton.jit
def gated_gelu_dropout_fwd(A, B, Y, SEED, n, drop_below, scale, BLOCK: tl.constexpr, DROPOUT: tl.constexpr):
    start = tl.program_id(0).to(tl.int64) * BLOCK
    offsets = start + tl.arange(0, BLOCK)
    in_bounds = offsets < n
    a = tl.load(A + offsets, mask=in_bounds, other=0.0).to(tl.float32)
    b = tl.load(B + offsets, mask=in_bounds, other=0.0).to(tl.float32)
    gelu, _ = _gelu_tanh(a)
    y = gelu * b
    if DROPOUT:
        keep = _draws(tl.load(SEED), start, BLOCK) >= drop_below
        y = y * tl.where(keep, scale, 0.0)
    tl.store(Y + offsets, y.to(Y.dtype.element_ty), mask=in_bounds)


@triton.jit
def gated_gelu_dropout_bwd(DY, A, B, SEED, DA, DB, n, drop_below, scale, BLOCK: tl.constexpr,
                           DROPOUT: tl.constexpr):
    start = tl.program_id(0).to(tl.int64) * BLOCK
    offsets = start + tl.arange(0, BLOCK)
    in_bounds = offsets < n
    dy = tl.load(DY + offsets, mask=in_bounds, other=0.0).to(tl.float32)
    a = tl.load(A + offsets, mask=in_bounds, other=0.0).to(tl.float32)
    b = tl.load(B + offsets, mask=in_bounds, other=0.0).to(tl.float32)
    if DROPOUT:
        keep = _draws(tl.load(SEED), start, BLOCK) >= drop_below
        dy = dy * tl.where(keep, scale, 0.0)
    gelu, slope = _gelu_tanh(a)
    tl.store(DA + offsets, (dy * b * slope).to(DA.dtype.element_ty), mask=in_bounds)
    tl.store(DB + offsets, (dy * gelu).to(DB.dtype.element_ty), mask=in_bounds)
