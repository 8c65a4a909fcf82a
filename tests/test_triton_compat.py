"""sumtune.triton_compat in Triton's interpreter (CPU): float8e4_rounded rounds as the GPU's cast does."""

from __future__ import annotations

import pytest
import torch

triton = pytest.importorskip("triton")
tl = pytest.importorskip("triton.language")

from sumtune.fast_t5 import flash_kernels  # noqa: E402 (applies the interpreter's numpy fix)
from sumtune.triton_compat import float8e4_rounded  # noqa: E402


@triton.jit
def _round_kernel(X, Y, N: tl.constexpr, EMULATE: tl.constexpr):
    offsets = tl.arange(0, N)
    tl.store(Y + offsets, float8e4_rounded(tl.load(X + offsets), EMULATE))


def _rounded_by_kernel(x: torch.Tensor, emulate: bool) -> torch.Tensor:
    if not flash_kernels.INTERPRET:
        pytest.skip("Triton's interpreter is off (a CUDA machine)")
    out = torch.empty(x.numel(), dtype=torch.float8_e4m3fn)
    _round_kernel[(1,)](x, out, N=x.numel(), EMULATE=emulate)
    return out.float()


def test_float8e4_rounded_matches_torch_round_to_nearest_even():
    """Normals, subnormals (multiples of 2^-9), exact ties between e4m3 neighbours (both ways), +-448 saturation
    and zero: the emulated rounding is torch's (and the GPU's) to the bit; the interpreter's own cast is not."""
    representable = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    representable = representable[torch.isfinite(representable)].unique()
    ties = (representable[:-1] + representable[1:]) / 2  # halfway between neighbours: ties to even
    generator = torch.Generator().manual_seed(0)
    values = torch.cat([representable, ties, torch.randn(1024, generator=generator) * 4,
                        torch.randn(512, generator=generator) * 2.0**-8, torch.tensor([500.0, -1000.0, 449.0])])
    values = torch.cat([values, torch.zeros(4096 - values.numel())])
    expected = values.clamp(-448, 448).to(torch.float8_e4m3fn).float()
    assert torch.equal(_rounded_by_kernel(values, emulate=True), expected)
    assert not torch.equal(_rounded_by_kernel(values, emulate=False), expected)  # why the emulation exists
