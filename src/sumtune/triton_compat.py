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
