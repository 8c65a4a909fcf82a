"""Workarounds for Triton versions sumtune supports (imported only where Triton is)."""

from __future__ import annotations


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
