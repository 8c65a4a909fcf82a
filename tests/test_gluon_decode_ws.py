"""sumtune.generation.gluon_decode_ws: a decoding step's cross-attention with a row's 32 heads in one warp-specialized
program (cross_attention.GLUON_WARP_SPECIALIZED).

On CPU: it builds for sm_90 (a process without Triton's interpreter) within Hopper's shared memory, without spills,
as a producer warp with few registers and two consumer warpgroups with many, loading by TMA only; the routing takes
only what it covers. On a Hopper GPU (``-m gpu``): the same maths as float64 with key splits, rows not whole tiles,
a row without keys and a partly empty second warpgroup, one program a row.
"""

from __future__ import annotations


import pytest
import torch

DECODE_WS_FOR_HOPPER = r"""
import json, re
from sumtune.fast_t5.flash_compile import resources, _sass
from sumtune.generation import gluon_decode_ws
for split in (False, True):
    compiled = gluon_decode_ws.compile_for_sm90(split=split)
    ptx, sass = compiled.asm["ptx"], _sass(compiled)
    print(json.dumps(dict(split=split, hgmma=sass.count("HGMMA"), ldmatrix=ptx.count("ldmatrix"),
                          bulk=ptx.count("cp.async.bulk.tensor"),
                          setmaxnreg=re.findall(r"setmaxnreg\.(\w+)\.sync\.aligned\.u32\s+(\d+)", ptx),
                          **resources(compiled))))
"""


def test_the_warp_specialized_decode_kernel_builds_for_hopper(compiled_for_hopper):
    """At T5-3b's shapes, with and without key splits: within Hopper's shared memory, little spill (none with Triton
    3.6, the GPU image's; 20 bytes with 3.9), chunks by TMA only (two boxes a chunk), no ldmatrix; the producer's
    registers cut to 24 and the consumers' raised to 240; each consumer's 128 warpgroup MMAs a tile (scores: 8
    chunks x 8 steps of 16; P.V: 8 chunks x 2 halves of 64 rows x 4 steps)."""
    pytest.importorskip("triton.experimental.gluon")
    from sumtune.fast_t5.flash_compile import HOPPER_SHARED_BYTES

    rows, stderr = compiled_for_hopper(DECODE_WS_FOR_HOPPER)
    assert len(rows) == 2, stderr
    for row in rows:
        assert row["shared_bytes"] <= HOPPER_SHARED_BYTES, row
        assert row["spill_bytes"] <= 64, row
        assert row["async_copies"] == 0 and row["bulk"] == 2 and row["ldmatrix"] == 0, row
        assert ["dec", "24"] in row["setmaxnreg"] and ["inc", "240"] in row["setmaxnreg"], row
        assert row["hgmma"] == 2 * (8 * 8 + 8 * 2 * 4), row


def test_the_warp_specialized_decode_kernel_takes_only_what_it_covers():
    """d_model 1024 with 17 to 32 heads (two warpgroups of 16, the second possibly partly empty); one program a row:
    32 heads in one head group."""
    pytest.importorskip("triton.experimental.gluon")
    from sumtune.generation import cross_attention, gluon_decode_ws

    assert gluon_decode_ws.supported(32, 1024) is None and gluon_decode_ws.supported(20, 1024) is None
    assert "16 heads" in gluon_decode_ws.supported(16, 1024) and "33 heads" in gluon_decode_ws.supported(33, 1024)
    assert "d_model 2048" in gluon_decode_ws.supported(32, 2048)
    assert cross_attention.head_blocks(32, gluon_decode_ws.BLOCK_H) == (32, 1)
    assert cross_attention.head_blocks(20, gluon_decode_ws.BLOCK_H) == (32, 1)
    assert cross_attention.GLUON_WARP_SPECIALIZED  # on: measured faster in generation (session 45)


def test_the_warp_specialized_decode_kernel_aims_at_one_program_an_sm():
    """Its programs fill an SM each: 256 rows x 4096 keys run unsplit (no combine pass over a [B, splits, 32, D]
    buffer), where gluon_decode's two head groups already give 512 programs; few rows still split their keys."""
    from sumtune.generation import cross_attention

    ws = cross_attention.WS_MIN_PROGRAMS
    assert cross_attention.choose_splits(256, 4096, 64, 1, ws) == 1
    assert cross_attention.choose_splits(256, 4096, 64, 1) == 2  # the shared target would split them
    assert cross_attention.choose_splits(256, 4096, 64, 2) == 1  # gluon_decode at 256 rows
    assert cross_attention.choose_splits(32, 4096, 64, 1, ws) == 5


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] != 9,
                    reason="needs a Hopper GPU")
def test_gpu_warp_specialized_decode_kernel_matches_float64(monkeypatch):
    """GLUON_WARP_SPECIALIZED on a Hopper GPU, bf16: the same maths as the float64 masked softmax (the bar of the
    other decode kernels' tests), with key splits, rows of lengths that are not whole tiles (one empty), 32 heads and
    20; it is this kernel that ran, one program a row and split."""
    from sumtune.generation import cross_attention, gluon_decode_ws

    monkeypatch.setattr(cross_attention, "GLUON_KERNEL", True)
    monkeypatch.setattr(cross_attention, "GLUON_WARP_SPECIALIZED", True)
    monkeypatch.setattr(cross_attention, "GLUON_FROM_KEYS", 1)  # these 700 keys too
    launched = []
    launch = gluon_decode_ws.launch
    monkeypatch.setattr(gluon_decode_ws, "launch", lambda *a, **k: launched.append(a[0]) or launch(*a, **k))
    gen = torch.Generator().manual_seed(4)
    for heads in (32, 20):
        memory = torch.randn(3, 700, 1024, generator=gen)
        q_mem = torch.randn(3, heads, 1024, generator=gen) / 1024 ** 0.5 * 4
        lengths = torch.tensor([131, 0, 700], dtype=torch.int32)  # the last row's tiles read past the states' end
        expected = cross_attention.reference_hidden_attention(q_mem.bfloat16(), memory.bfloat16(), lengths)
        for splits in (1, 3):
            got = cross_attention.fused_hidden_attention(q_mem.cuda().bfloat16(), memory.cuda().bfloat16(),
                                                         lengths.cuda(), splits=splits).cpu()
            error = (got.double() - expected).abs().max().item()
            assert error < 3e-2, (heads, splits, error)
            assert not got[1].any() and torch.isfinite(got).all()  # no keys: zeros, not NaN
        # t5_decode hands over the queries as an [H, B, D] GEMM output seen as [B, H, D]: any row and head strides
        heads_first = q_mem.transpose(0, 1).contiguous().transpose(0, 1).cuda().bfloat16()
        assert torch.equal(cross_attention.fused_hidden_attention(heads_first, memory.cuda().bfloat16(),
                                                                  lengths.cuda(), splits=1),
                           cross_attention.fused_hidden_attention(q_mem.cuda().bfloat16(), memory.cuda().bfloat16(),
                                                                  lengths.cuda(), splits=1))
    assert cross_attention.gluon_failure is None and cross_attention.ws_failure is None  # no hand-over
    assert len(launched) == 8 and {grid[0] for grid in launched} == {1}  # one program of 32 heads a row
    # a generation-sized launch (64 rows x 4096 keys, random lengths, the splits the router picks) against gluon_decode
    memory = torch.randn(64, 4096, 1024, generator=gen).cuda().bfloat16()
    q_mem = (torch.randn(64, 32, 1024, generator=gen) / 1024 ** 0.5 * 4).cuda().bfloat16()
    lengths = torch.randint(1, 4097, (64,), generator=gen, dtype=torch.int32).cuda()
    got = cross_attention.fused_hidden_attention(q_mem, memory, lengths)
    monkeypatch.setattr(cross_attention, "GLUON_WARP_SPECIALIZED", False)
    shipped = cross_attention.fused_hidden_attention(q_mem, memory, lengths)
    assert len(launched) == 9
    error = (got.double() - shipped.double()).abs().max().item()
    assert error < 2e-2, error
