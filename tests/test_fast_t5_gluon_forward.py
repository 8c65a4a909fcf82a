"""sumtune.fast_t5.gluon_forward: the no-gradient attention forward in Gluon (flash_attention.GLUON_NO_GRAD_FORWARD).

On CPU: it compiles for sm_90 (a process without Triton's interpreter) within Hopper's shared memory, without spills,
by TMA, waiting in its loop with an MMA still in flight; it takes only the layouts its descriptors can read; a launch
that raises hands the call to the Triton forward once and for good. On a Hopper GPU (``-m gpu``): its outputs match
float64 and the Triton forward, with T5's bias (near and far tiles), padding with a hole, a row without keys,
cross-attention lengths and the fused projection's strided layout.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch

HAS_TRITON = importlib.util.find_spec("triton") is not None

GLUON_FORWARD_FOR_HOPPER = r"""
import json, re
from sumtune.fast_t5.flash_compile import resources
from sumtune.fast_t5 import gluon_forward
for blocks, flags in (((128, 64, 8, 3), {}), ((128, 64, 8, 2), {}), ((64, 64, 4, 3), {}),
                      ((128, 64, 8, 3), {"HAS_BIAS": False, "HAS_KEY_MASK": False})):
    compiled = gluon_forward.compile_for_sm90(*blocks, **flags)
    ptx = compiled.asm["ptx"]
    waits = [int(w) for w in re.findall(r"wgmma.wait_group.sync.aligned\s+(\d+)", ptx)]
    print(json.dumps(dict(blocks=blocks, flags=flags, waits=waits, bulk=ptx.count("cp.async.bulk.tensor"),
                          ldmatrix=ptx.count("ldmatrix"), **resources(compiled))))
"""


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
def test_the_gluon_forward_builds_for_hopper_with_tma_and_an_mma_in_flight():
    """The shipped tiles and the benchmark's others build for sm_90: no spill, within Hopper's shared memory, K and V
    by TMA (two 64-wide boxes a tile at three issue sites each: the prologue's STAGES and the loop's refill), and the
    loop waits with a warpgroup MMA still in flight (the next scores beside this tile's P·V)."""
    pytest.importorskip("triton.experimental.gluon")
    from sumtune.fast_t5.flash_compile import HOPPER_SHARED_BYTES

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", GLUON_FORWARD_FOR_HOPPER], env=env, capture_output=True,
                            text=True, timeout=600)
    rows = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert len(rows) == 4, result.stderr[-2000:]
    for row in rows:
        assert row["spill_bytes"] == 0 and row["shared_bytes"] <= HOPPER_SHARED_BYTES, row
        assert row["async_copies"] == 0 and row["bulk"] > 0, row  # TMA only
        assert 1 in row["waits"], row  # an MMA group left in flight at a wait


def test_the_gluon_forward_takes_only_what_its_descriptors_can_read():
    """[B, L, H, D] projections seen as (B, H, L, D), fused or not, are rows of a 2-D TMA descriptor; a contiguous
    (B, H, L, D) tensor or an odd row stride is not; off CUDA nothing is covered."""
    pytest.importorskip("triton.experimental.gluon")
    from sumtune.fast_t5 import gluon_forward

    rows = gluon_forward._rows_stride
    separate = torch.zeros(2, 48, 4, 128, dtype=torch.bfloat16).transpose(1, 2)
    fused = torch.zeros(2, 48, 3, 4, 128, dtype=torch.bfloat16)[:, :, 1].transpose(1, 2)
    assert rows(separate) == 4 * 128 and rows(fused) == 3 * 4 * 128
    assert rows(torch.zeros(2, 4, 48, 128, dtype=torch.bfloat16)) is None  # heads outermost: not rows of B * L
    assert rows(torch.zeros(2, 48, 4, 129, dtype=torch.bfloat16)[..., :128].transpose(1, 2)) is None  # 258-byte rows
    assert not gluon_forward.covers(separate, separate, separate, causal=False)  # a CPU tensor


def test_a_gluon_forward_that_fails_to_launch_hands_over_to_the_triton_forward_once(monkeypatch):
    """If the Gluon launch raises (a Triton release whose Gluon API moved), one warning names the error, the Triton
    forward computes that call and every later one, and the Gluon kernel is not tried again."""
    pytest.importorskip("triton")
    from sumtune.fast_t5 import flash_attention as fa
    from sumtune.fast_t5 import flash_kernels, gluon_forward

    if not flash_kernels.INTERPRET:
        pytest.skip("a CUDA machine: the GPU test below runs the kernel itself")
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 40, 2, 32, generator=gen).transpose(1, 2) for _ in range(3))
    table = torch.randn(2, 79, generator=gen)
    mask = torch.ones(2, 40, dtype=torch.bool)
    mask[1, 25:] = False
    with fa.block_sizes(fwd=(16, 16)), torch.no_grad():
        expected = fa.flash_t5_attention(q, k, v, table, mask, bias_radius=8)
        tries = []

        def broken(*args):
            tries.append(args)
            raise TypeError("async_copy_global_to_shared() got an unexpected keyword argument 'pred'")

        monkeypatch.setattr(fa, "GLUON_NO_GRAD_FORWARD", True)
        monkeypatch.setattr(fa, "gluon_forward_failure", None)
        monkeypatch.setattr(fa, "_gluon_forward_asked",
                            lambda q, mask: fa.GLUON_NO_GRAD_FORWARD and fa.gluon_forward_failure is None)
        monkeypatch.setattr(gluon_forward, "covers", lambda *args: True)
        monkeypatch.setattr(gluon_forward, "forward", broken)
        with pytest.warns(RuntimeWarning, match="Gluon attention forward cannot run here .TypeError: async_copy"):
            got = fa.flash_t5_attention(q, k, v, table, mask, bias_radius=8)
        assert torch.equal(got, expected) and len(tries) == 1
        assert fa.gluon_forward_failure.startswith("TypeError: async_copy_global_to_shared()")
        assert torch.equal(fa.flash_t5_attention(q, k, v, table, mask, bias_radius=8), expected) and len(tries) == 1
        # a forward a gradient reaches never asks for it (precise P·V and the backward's log-sum-exp are Triton's)
        monkeypatch.setattr(fa, "gluon_forward_failure", None)
    with fa.block_sizes(fwd=(16, 16)):
        fa.flash_t5_attention(q.requires_grad_(), k, v, table, mask, bias_radius=8)
    assert len(tries) == 1


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] != 9,
                    reason="needs a Hopper GPU")
def test_gpu_gluon_forward_matches_float64_and_the_triton_forward(monkeypatch):
    """GLUON_NO_GRAD_FORWARD on a Hopper GPU, bf16, no gradient: as close to float64 as the Triton forward (and near
    it), at lengths that are not whole tiles, T5's bias with a radius that gives far and near tiles, rows padded at
    the end, with a hole, and without keys, cross-attention lengths, the fused projection's strided layout and each
    tile setting; the Gluon kernel is what ran."""
    from sumtune.fast_t5 import flash_attention as fa
    from sumtune.fast_t5 import gluon_forward

    launched = []
    launch = gluon_forward.forward
    monkeypatch.setattr(gluon_forward, "forward", lambda *a, **k: launched.append(a[0].shape) or launch(*a, **k))
    gen = torch.Generator(device="cuda").manual_seed(3)
    heads, head_dim = 4, 128
    cases = 0
    for query_len, key_len, fused in ((700, 700, False), (700, 700, True), (300, 1000, False), (64, 64, False)):
        batch = 4
        if fused:  # q, k, v slices of one [B, L, 3, H, D] projection, as a fused QKV GEMM gives them
            qkv = torch.randn(batch, key_len, 3, heads, head_dim, device="cuda", generator=gen, dtype=torch.bfloat16)
            q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))
        else:
            q = torch.randn(batch, query_len, heads, head_dim, device="cuda", generator=gen,
                            dtype=torch.bfloat16).transpose(1, 2)
            k, v = (torch.randn(batch, key_len, heads, head_dim, device="cuda", generator=gen,
                                dtype=torch.bfloat16).transpose(1, 2) for _ in range(2))
        q = q / 4  # scores of a few units, as T5's are
        mask = torch.ones(batch, key_len, dtype=torch.bool, device="cuda")
        mask[1, key_len * 2 // 3:] = False  # right padding
        mask[2, key_len // 3:] = False
        mask[2, 5] = False  # a hole: the mask is read in this row
        mask[3] = False  # no keys at all: zeros
        for radius, blocks in ((128, (128, 64, 8, 3)), (8, (128, 64, 8, 2)), (128, (64, 64, 4, 3))):
            # T5's table: one value for every offset at or beyond +-radius
            offsets = torch.arange(1 - query_len, key_len, device="cuda").clamp(-radius, radius) + radius
            table = (torch.randn(heads, 2 * radius + 1, device="cuda", generator=gen) * 2)[:, offsets]
            expected = fa.reference_t5_attention(q, k, v, table, mask)
            monkeypatch.setattr(gluon_forward, "BLOCKS", blocks)
            with torch.no_grad():
                monkeypatch.setattr(fa, "GLUON_NO_GRAD_FORWARD", False)
                triton_out = fa.flash_t5_attention(q, k, v, table, mask, bias_radius=radius)
                monkeypatch.setattr(fa, "GLUON_NO_GRAD_FORWARD", True)
                before = len(launched)
                got = fa.flash_t5_attention(q, k, v, table, mask, bias_radius=radius)
            assert len(launched) == before + 1, (query_len, key_len, fused, radius, blocks)  # Gluon's own launch
            gluon_error = relative_error(got[:3], expected[:3])
            triton_error = relative_error(triton_out[:3], expected[:3])
            assert gluon_error < max(1.5 * triton_error, 1e-3), (query_len, key_len, fused, radius, blocks,
                                                                 gluon_error, triton_error)
            assert not got[3].any() and torch.isfinite(got).all()
            cases += 1
    assert fa.gluon_forward_failure is None and cases == 12


def relative_error(value, reference) -> float:
    value, reference = value.detach().double(), reference.detach().double()
    return float((value - reference).norm() / reference.norm().clamp_min(1e-30))
