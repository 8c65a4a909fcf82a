"""Workarounds for Triton versions sumtune supports, and for its CPU interpreter (imported only by kernel modules:
it imports triton)."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def interpreter_safe_dot(a, b, UPCAST: tl.constexpr, acc=None):
    """tl.dot (plus ``acc``); with UPCAST (Triton's CPU interpreter, which multiplies bf16/fp16 operands as raw
    integers) in fp32: products of bf16/fp16 values are exact in fp32, so this is the tensor cores' arithmetic."""
    if UPCAST:
        out = tl.dot(a.to(tl.float32), b.to(tl.float32), acc)
    else:
        out = tl.dot(a, b, acc)
    return out


@triton.jit
def float8e4_rounded(x, EMULATE: tl.constexpr):
    """float32 ``x`` as float8 e4m3 (round to nearest even, saturating at +-448, as the GPU's ``cvt.rn.satfinite``).
    With EMULATE (Triton 3.6's interpreter, whose cast mis-rounds some values: 1.96 -> 1.0) the rounding is done in
    float32 arithmetic first, so the cast only meets values it holds exactly."""
    if EMULATE:
        x = tl.minimum(tl.maximum(x, -448.0), 448.0)
        magnitude = tl.abs(x)
        bits = magnitude.to(tl.int32, bitcast=True)  # keep 3 of float32's 23 mantissa bits, ties to even
        normal = ((bits + 0x7FFFF + ((bits >> 20) & 1)) & ~0xFFFFF).to(tl.float32, bitcast=True)
        scaled = magnitude * 512.0  # below 2^-6: multiples of 2^-9 (e4m3's subnormals), ties to even
        whole = tl.floor(scaled)
        rest = scaled - whole
        up = (rest > 0.5) | ((rest == 0.5) & ((whole.to(tl.int32) & 1) == 1))
        subnormal = (whole + tl.where(up, 1.0, 0.0)) * (1.0 / 512.0)
        rounded = tl.where(magnitude < 2.0**-6, subnormal, normal)
        x = tl.where(x < 0, -rounded, rounded)
    return x.to(tl.float8e4nv)


def fix_interpreter_for_numpy_2_4() -> None:
    """Triton 3.6's interpreter turns a runtime loop bound into an int with ``int(array_of_shape_1)``, which numpy
    2.4 refuses (triton-lang/triton#9171, fixed upstream with ``.squeeze()``); apply that fix. Interpreter only."""
    from triton.runtime import interpreter

    original = interpreter._patch_lang_tensor
    if getattr(original, "_sumtune_numpy_fix", False):
        return

    def patched(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

    patched._sumtune_numpy_fix = True
    interpreter._patch_lang_tensor = patched
