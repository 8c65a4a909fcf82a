"""sumtune.generation.cross_attention: the fused decoding kernel (Triton's interpreter on CPU, compiled in bf16 on a
GPU) against the float64 masked softmax, with key splits combined in one kernel (sumtune.generation.cross_kernels,
also compiled for sm_90 on the CPU), a per-head bias over broadcast lengths, and what it refuses; and
benchmarks/decode_attention.py's formulation against the decoder's own.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from _generation_helpers import PAD, START

from sumtune.errors import SumtuneError
from sumtune.generation.t5_decode import DecoderWeights

pytestmark = pytest.mark.usefixtures("one_thread")


def _fused_kernel_device():
    """(device, dtype, tolerance against float64) where the fused decoding kernel runs: a GPU in bf16, else Triton's
    interpreter in float32; skips the test where neither can."""
    from sumtune.generation import cross_attention

    device, dtype, tolerance = ("cuda", torch.bfloat16, 3e-2) if torch.cuda.is_available() else \
        ("cpu", torch.float32, 1e-5)
    if cross_attention.kernel_available(torch.zeros(1, 64, device=device)) is not None:
        pytest.skip("the kernel cannot run here (no CUDA and Triton's interpreter is off)")
    return device, dtype, tolerance


def test_fused_kernel_adds_a_per_head_bias_over_broadcast_lengths():
    """The fused kernel with `bias` (one row a head, as the decoder's self-attention passes it) and lengths as a
    broadcast view (stride 0) against the float64 reference, with key splits; a bias of the wrong shape is refused."""
    pytest.importorskip("triton")
    from sumtune.generation import cross_attention

    device, dtype, tolerance = _fused_kernel_device()
    gen = torch.Generator().manual_seed(8)
    memory = torch.randn(3, 90, 32, generator=gen)
    q_mem = torch.randn(3, 20, 32, generator=gen)
    bias = torch.randn(20, 96, generator=gen) * 3
    bias[:, 50:] = torch.finfo(torch.float32).min  # the decoder's table: future positions masked
    for written in (1, 37, 50):
        lengths = torch.tensor([written], dtype=torch.int32).expand(3)
        expected = cross_attention.reference_hidden_attention(q_mem, memory, lengths, bias=bias)
        unbiased = cross_attention.reference_hidden_attention(q_mem, memory, lengths)
        assert written == 1 or (expected - unbiased).abs().max() > 0.1  # the bias matters
        for splits in (1, 2):
            got = cross_attention.fused_hidden_attention(q_mem.to(device, dtype), memory.to(device, dtype),
                                                         lengths.to(device), splits=splits,
                                                         bias=bias.to(device, dtype)).cpu()
            assert (got.double() - expected).abs().max().item() < tolerance, (written, splits)
    with pytest.raises(ValueError, match="bias must be"):
        cross_attention.fused_hidden_attention(q_mem, memory, lengths, bias=bias[:4])


def test_the_key_splits_combine_in_one_kernel_as_torch_combines_them(monkeypatch):
    """FUSED_COMBINE: cross_kernels.combine_splits against combine_in_torch on partial results with an empty split
    (running max -inf) and a row with no keys at all (zeros, not NaN), then through the whole op with key splits
    against the float64 reference, the head count not a power of two."""
    pytest.importorskip("triton")
    from sumtune.generation import cross_attention

    device, dtype, tolerance = _fused_kernel_device()
    gen = torch.Generator().manual_seed(8)
    batch, splits, padded, heads, d_model = 3, 5, 16, 12, 512
    acc = torch.randn(batch, splits, padded, d_model, generator=gen)
    running_max = torch.randn(batch, splits, padded, generator=gen) * 4
    total = torch.rand(batch, splits, padded, generator=gen) + 0.5
    running_max[0, 2] = -math.inf  # a split that met no key
    acc[0, 2], total[0, 2] = 0.0, 0.0
    running_max[1] = -math.inf  # a row with no keys
    acc[1], total[1] = 0.0, 0.0
    partials = [t.to(device) for t in (acc, running_max, total)]
    expected = cross_attention.combine_in_torch(*partials, heads, torch.float32).cpu()
    out = torch.full((batch, heads, d_model), math.nan, device=device)
    cross_attention._kernels().combine_splits[(heads, batch)](
        *partials, out, out.stride(0), out.stride(1), padded, SPLITS=splits, BLOCK_S=8, D=d_model, BLOCK_D=256)
    assert torch.allclose(out.cpu(), expected, rtol=1e-5, atol=1e-6) and not out[1].any()
    monkeypatch.setattr(cross_attention, "FUSED_COMBINE", True)
    memory = torch.randn(4, 300, 64, generator=gen).to(device, dtype)
    q_mem = torch.randn(4, 20, 64, generator=gen).to(device, dtype) / 4
    lengths = torch.tensor([300, 77, 0, 130], dtype=torch.int32)
    reference = cross_attention.reference_hidden_attention(q_mem.cpu(), memory.cpu(), lengths)
    for splits in (2, 3):
        got = cross_attention.fused_hidden_attention(q_mem, memory, lengths.to(device), splits=splits).cpu()
        assert (got.double() - reference).abs().max().item() < tolerance, splits
        assert not got[2].any()


def test_a_tile_too_big_for_shared_memory_is_halved_and_torch_takes_over_where_none_fits(monkeypatch):
    """A launch that raises Triton's OutOfResources (FLAN-T5-XL's d_model 2048 at 64 keys a tile on an H100, or a
    card with less shared memory) is retried with half the keys a tile, the tile that launched is remembered (the next
    call launches it at once), and where not even MIN_BLOCK_N keys fit, torch's ops give the result, said once: every
    result equals the float64 reference."""
    pytest.importorskip("triton")
    from triton.runtime.errors import OutOfResources

    from sumtune.generation import cross_attention

    device, dtype, tolerance = _fused_kernel_device()
    kernels = cross_attention._kernels()
    real = kernels.hidden_cross_attention
    tried, limit = [], {"keys": 32}

    class SharedMemoryBound:  # the real kernel behind a shared-memory budget counted in keys a tile
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                tried.append(kwargs["BLOCK_N"])
                if kwargs["BLOCK_N"] > limit["keys"]:
                    raise OutOfResources(kwargs["BLOCK_N"] * 1024, limit["keys"] * 1024, "shared memory")
                return real[grid](*args, **kwargs)
            return launch

    monkeypatch.setattr(kernels, "hidden_cross_attention", SharedMemoryBound())
    monkeypatch.setattr(cross_attention, "fitted_block_n", {})
    gen = torch.Generator().manual_seed(9)
    memory = torch.randn(2, 150, 64, generator=gen)
    q_mem = torch.randn(2, 20, 64, generator=gen) / 4
    lengths = torch.tensor([150, 61], dtype=torch.int32)
    expected = cross_attention.reference_hidden_attention(q_mem, memory, lengths)

    def fused():
        return cross_attention.fused_hidden_attention(q_mem.to(device, dtype), memory.to(device, dtype),
                                                      lengths.to(device), splits=1).cpu().double()

    first = cross_attention.INTERPRETER_BLOCK_N if device == "cpu" else cross_attention.tiles_for(2, 150)[0]
    assert (fused() - expected).abs().max().item() < tolerance
    assert first == 64 and tried == [64, 32]
    tried.clear()
    assert (fused() - expected).abs().max().item() < tolerance and tried == [32]  # remembered
    monkeypatch.setattr(cross_attention, "fitted_block_n", {})
    limit["keys"] = 8
    tried.clear()
    with pytest.warns(RuntimeWarning, match="does not fit this GPU's shared memory at d_model 64"):
        got = fused()
    assert (got - expected).abs().max().item() < tolerance and tried[-1] == cross_attention.MIN_BLOCK_N
    tried.clear()
    assert (fused() - expected).abs().max().item() < tolerance and tried == []  # torch's ops at once, no warning


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_fused_kernel_runs_at_flan_t5_xl_width(monkeypatch):
    """FLAN-T5-XL's cross-attention (d_model 2048, 32 heads) at 2 rows x 4096 keys in bf16, whose first tile (64 keys
    x 8 warps, 330 KB of shared memory in the sm_90 build) an H100 cannot hold: it runs in a smaller tile and matches
    float64 as closely as the same maths in bf16 GEMMs."""
    from sumtune.generation import cross_attention

    monkeypatch.setattr(cross_attention, "fitted_block_n", {})
    gen = torch.Generator(device="cuda").manual_seed(10)
    memory = torch.randn(2, 4096, 2048, device="cuda", generator=gen, dtype=torch.bfloat16)
    q_mem = torch.randn(2, 32, 2048, device="cuda", generator=gen, dtype=torch.bfloat16) / 45
    lengths = torch.tensor([4096, 2500], dtype=torch.int32, device="cuda")
    expected = cross_attention.reference_hidden_attention(q_mem, memory, lengths)
    got = cross_attention.fused_hidden_attention(q_mem, memory, lengths).double()
    in_torch = cross_attention.attend_in_torch(q_mem, memory, lengths).double()
    error, torch_error = ((x - expected).norm() / expected.norm() for x in (got, in_torch))
    assert error < max(1.5 * torch_error, 1e-3), (error, torch_error, cross_attention.fitted_block_n)


COMBINE_FOR_HOPPER = """
import json
from sumtune.generation import cross_kernels as k
from sumtune.fast_t5.flash_compile import compile_source, resources
t = dict(ACC="*fp32", MAX="*fp32", SUM="*fp32", OUT="*bf16", stride_ob="i32", stride_oh="i32", padded_heads="i32")
for splits in (2, 16):
    c = compile_source(k.combine_splits, t, dict(SPLITS=splits, BLOCK_S=splits, D=1024, BLOCK_D=256), 4, 1)
    print(json.dumps(dict(splits=splits, **resources(c))))
"""


def test_the_split_combine_kernel_builds_for_hopper_without_spilling(compiled_for_hopper):
    """cross_kernels.combine_splits compiled for sm_90 on the CPU at T5-3b's d_model, 2 and 16 splits."""
    pytest.importorskip("triton")
    rows, stderr = compiled_for_hopper(COMBINE_FOR_HOPPER)
    assert [row["splits"] for row in rows] == [2, 16], stderr
    assert all(row["spill_bytes"] == 0 for row in rows), rows


def test_fused_cross_attention_kernel_matches_float64_and_refuses_what_it_cannot_run(merged32):
    """The fused mode's kernel (Triton's interpreter on CPU, compiled on a GPU in bfloat16) against a float64 masked
    softmax, with key splits and rows of different lengths (one empty); a non-power-of-two d_model and left padding
    are refused in one sentence."""
    pytest.importorskip("triton")
    from sumtune.generation import cross_attention
    from sumtune.generation.t5_decode import load_batch, new_state

    device, dtype, tolerance = _fused_kernel_device()
    gen = torch.Generator().manual_seed(3)

    def check(q_mem, larger, lengths, splits_to_try, label):
        # every other row of a larger buffer, sliced where the kernel runs (a strided CPU view's .to("cuda") copy
        # would be contiguous)
        q_mem, memory = q_mem.to(device, dtype), larger.to(device, dtype)[::2]
        assert not memory.is_contiguous()
        expected = cross_attention.reference_hidden_attention(q_mem.cpu(), memory.cpu(), lengths)
        # the queries as t5_decode hands them over: [H, B, D] GEMM output seen as [B, H, D] (read in place)
        q_heads_first = q_mem.transpose(0, 1).contiguous().transpose(0, 1)
        for splits in splits_to_try:
            got = cross_attention.fused_hidden_attention(q_mem, memory, lengths.to(device), splits=splits).cpu()
            assert (got.double() - expected).abs().max().item() < tolerance, (label, splits)
            again = cross_attention.fused_hidden_attention(q_heads_first, memory, lengths.to(device), splits=splits)
            assert torch.equal(again.cpu(), got), (label, splits)
        return got

    memory = torch.randn(8, 70, 32, generator=gen)  # the kernel reads its rows 0, 2, 4, 6 (strided rows)
    lengths = torch.tensor([70, 33, 1, 0], dtype=torch.int32)
    got = check(torch.randn(4, 5, 32, generator=gen), memory, lengths, (1, 2, 5), "5 heads, padded to 16 rows")
    assert not got[3].any()  # no keys: zeros, not NaN
    q_mem = torch.randn(4, 20, 32, generator=gen)  # 20 heads in groups of 16: a second, partly empty group
    for per_program in (32, 16):
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(cross_attention, "HEADS_PER_PROGRAM", per_program)
            assert cross_attention.head_blocks(20, per_program) == ((32, 1) if per_program == 32 else (16, 2))
            check(q_mem, memory, lengths, (1, 3), f"{per_program} heads a program")
    shapes = ((1, 70), (64, 4096), (256, 1024), (256, 4096), (512, 1024))  # (rows, source tokens)
    assert [cross_attention.tiles_for(*shape) for shape in shapes] == [(64, 8)] * 3 + [(32, 4)] * 2
    for least, block_n, warps in cross_attention.TILES_BY_STATES:  # each shipped tile (compiled: on a GPU)
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(cross_attention, "TILES_BY_STATES", ((0, block_n, warps),))
            check(q_mem, memory, lengths, (1, 3), f"{block_n} keys x {warps} warps (from {least} states)")

    weights = DecoderWeights.from_model(merged32)
    with pytest.raises(SumtuneError, match="d_model 48 is not a power of two"):
        dataclasses.replace(weights, embed=torch.zeros(2, 48, device=device)).resolve_attention("fused")
    on = weights.embed.device  # the merged model's (a GPU machine's tests put it there)
    state = new_state(weights, 2, 6, 4, "fused", on)
    encoder_out = torch.zeros(2, 6, weights.d_model, device=on)
    left_padded = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]], device=on)
    with pytest.raises(SumtuneError, match="right-padded"):
        load_batch(state, weights, encoder_out, left_padded, START, PAD, 0)
    load_batch(state, weights, encoder_out, torch.tensor([[1, 1, 1, 0, 0, 0], [1] * 6], device=on), START, PAD, 0)
    assert state.cross_lengths.tolist() == [3, 6]


def test_the_decode_attention_benchmark_times_the_same_maths_as_the_decoder():
    """benchmarks/decode_attention.py times an SDPA formulation of the decoder's hidden-state cross-attention
    against the decoder's own; its CPU check (float32, padded rows) must find them equal."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "decode_attention.py"
    result = subprocess.run([sys.executable, str(script), "--cpu-check"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and "formulations agree" in result.stdout, result.stdout + result.stderr
