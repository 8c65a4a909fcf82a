"""sumtune.fast_t5.lora_dropout: a LoRA layer's input dropout regenerated from a seed in Triton kernels, against
float64 with the kernels' own mask, and inside the fused LoRA node on real bnb + PEFT layers.

On CPU the kernels run in Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1 without a GPU); GPU tests
(``-m gpu``) run the compiled kernels."""

from __future__ import annotations

import importlib.util

import pytest
import torch

pytest.importorskip("triton")
pytest.importorskip("bitsandbytes")
pytest.importorskip("peft")

from test_fast_t5_lora4bit import IN, OUT, WIDE, lora_layers, lora_model, output_and_grads  # noqa: E402

from sumtune.fast_t5 import lora_dropout  # noqa: E402
from sumtune.fast_t5.attention_inputs import draw_seed  # noqa: E402
from sumtune.fast_t5.lora4bit import fuse_lora_4bit, unfuse_lora_4bit  # noqa: E402


@pytest.fixture()
def kernels(monkeypatch):
    from sumtune.fast_t5 import lora_dropout_kernels

    if not lora_dropout_kernels.INTERPRET:
        pytest.skip("Triton's interpreter is off (a CUDA machine: run with TRITON_INTERPRET=1, or -m gpu)")
    monkeypatch.setattr(lora_dropout, "LORA_DROPOUT_KERNEL", True)
    monkeypatch.setattr(lora_dropout, "ON_CPU_IN_INTERPRETER", True)
    return lora_dropout


def scale_of(p: float) -> float:
    return lora_dropout.dropout_threshold(p, lora_dropout.DRAW_RANGE)[1]


def float64_reference(x, a, g, dx0, keep, p):
    """low = (x ∘ keep · scale) Aᵀ, dA = gᵀ (x ∘ keep · scale) (the dropped input rounded to x's dtype, as the
    kernels and native_dropout round it), dx = dx0 + (g A) ∘ keep · scale: all in float64."""
    dropped = (x.double() * keep.double() * scale_of(p)).to(x.dtype).double()
    low = dropped @ a.double().t()
    return low, g.double().t() @ dropped, dx0.double() + (g.double() @ a.double()) * keep.double() * scale_of(p)


def rel(got, expected) -> float:
    return float((got.double() - expected).norm() / expected.norm())


@pytest.mark.parametrize("dtype, bound", [(torch.float32, 1e-6), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("rows, cols, rank", [(70, 48, 4), (130, 260, 32), (64, 128, 16)])
def test_kernels_compute_the_low_rank_product_and_its_gradients_with_their_mask(kernels, dtype, bound, rows, cols,
                                                                                rank):
    """Rows and columns that are not whole tiles, ranks below tl.dot's 16, and dx a strided view (the concatenated
    GEMM's [dx | dy B] output): forward, dA and the in-place dx update match float64 under the kernels' mask."""
    gen = torch.Generator().manual_seed(rows + cols)
    x = torch.randn(rows, cols, generator=gen).to(dtype)
    a = (torch.randn(rank, cols, generator=gen) * 0.1).to(dtype)
    g = torch.randn(rows, rank, generator=gen).to(dtype)
    both = torch.randn(rows, cols + rank, generator=gen).to(dtype)
    dx0 = both[:, :cols].clone()
    seed, p = torch.tensor([1234]), 0.25
    keep = kernels.keep_mask(seed, rows, cols, p, device="cpu")
    low_ref, da_ref, dx_ref = float64_reference(x, a, g, dx0, keep, p)
    low = kernels.low_rank(x, a, seed, p)
    grad_x = both[:, :cols]
    da = kernels.low_rank_backward(x, a, g, seed, p, grad_x)
    assert low.dtype == dtype and da.dtype == torch.float32 and da.shape == (rank, cols)
    assert rel(low, low_ref) < bound and rel(da, da_ref) < bound and rel(both[:, :cols], dx_ref) < bound
    assert torch.equal(kernels.low_rank_backward(x, a, g, seed, p, None), da)  # without dx: the same dA


def test_mask_keeps_one_minus_p_and_depends_on_seed_row_and_column(kernels):
    keep = kernels.keep_mask(torch.tensor([7]), 256, 512, 0.25, device="cpu")
    assert abs(keep.float().mean().item() - 0.75) < 0.01
    assert not torch.equal(keep, kernels.keep_mask(torch.tensor([8]), 256, 512, 0.25, device="cpu"))
    assert not torch.equal(keep[0], keep[1]) and not torch.equal(keep[:, 0], keep[:, 1])


def test_the_kernels_draw_the_same_with_int64_counters(kernels, monkeypatch):
    """Inputs of 2^31 elements or more count their draws in int64 (INDEX_64): the same masks, so the same results."""
    gen = torch.Generator().manual_seed(3)
    x, a, g = torch.randn(70, 48, generator=gen), torch.randn(4, 48, generator=gen), torch.randn(70, 4, generator=gen)
    seed = torch.tensor([11])

    def run():
        dx = torch.zeros(70, 48)
        return kernels.low_rank(x, a, seed, 0.25), kernels.low_rank_backward(x, a, g, seed, 0.25, dx), dx

    int32 = run()
    monkeypatch.setattr(lora_dropout, "_index_64", lambda x2d: True)
    for got, expected in zip(run(), int32):
        assert torch.equal(got, expected)


def test_the_backward_with_its_flags_through_scratch_gives_the_same_gradients(kernels, monkeypatch):
    """MASK_SCRATCH: the dx update's keep flags stored and loaded back instead of drawn again; the same dA and dx,
    bit for bit, over several row tiles a program (tiles cut at both edges)."""
    gen = torch.Generator().manual_seed(5)
    x, a, g = torch.randn(150, 72, generator=gen), torch.randn(4, 72, generator=gen), torch.randn(150, 4, generator=gen)
    dx0, seed = torch.randn(150, 72, generator=gen), torch.tensor([21])

    def run():
        dx = dx0.clone()
        return kernels.low_rank_backward(x, a, g, seed, 0.25, dx), dx

    monkeypatch.setattr(lora_dropout, "MASK_SCRATCH", False)
    drawn = run()
    monkeypatch.setattr(lora_dropout, "MASK_SCRATCH", True)
    scratch = run()
    assert not torch.equal(drawn[1], dx0)  # the update happened
    for got, expected in zip(scratch, drawn):
        assert torch.equal(got, expected)


def layer_seeds(seed: int) -> list[torch.Tensor]:
    """The kernels' seeds of the two LoRA layers in one forward after ``torch.manual_seed(seed)``: each fused node
    draws one, in order (first, then second), and nothing else draws in between."""
    torch.manual_seed(seed)
    return [draw_seed("cpu"), draw_seed("cpu")]


def fused_node(out: torch.Tensor):
    """The last FusedLora4bit node behind ``out`` (a view sits on top of it)."""
    node = out.grad_fn
    while "FusedLora" not in type(node).__name__:
        node = node.next_functions[0][0]
    return node


@pytest.mark.parametrize("widths, concat", [((IN, OUT), False), (WIDE, True)])
def test_fused_node_with_the_kernels_trains_as_the_same_masks_applied_by_hand(kernels, widths, concat, monkeypatch):
    """Output, input gradient and every LoRA gradient in float32 equal PEFT's layers whose dropout applies the
    kernels' mask of each layer's seed (both wide sides with ``concat``; narrow inputs too, NARROW_INPUTS), and the
    node keeps no mask or copy."""
    from test_fast_t5_lora4bit import assert_close

    monkeypatch.setattr(lora_dropout, "NARROW_INPUTS", True)

    model = lora_model(dropout=0.25, widths=widths)
    x = torch.randn(6, 10, widths[0])
    seeds = iter(layer_seeds(7))

    class KernelMaskDropout(torch.nn.Module):
        def forward(self, inp):
            flat = inp.reshape(-1, inp.shape[-1])
            keep = kernels.keep_mask(next(seeds), flat.shape[0], flat.shape[1], 0.25, device="cpu")
            return (flat * keep * scale_of(0.25)).view_as(inp)

    originals = [layer.lora_dropout["default"] for layer in lora_layers(model)]
    for layer in lora_layers(model):
        layer.lora_dropout["default"] = KernelMaskDropout()
    expected = output_and_grads(model, x)
    for layer, original in zip(lora_layers(model), originals):
        layer.lora_dropout["default"] = original
    fuse_lora_4bit(model, concat_gemms=concat)
    try:
        got = output_and_grads(model, x)
        torch.manual_seed(7)
        saved = [t for t in fused_node(model(x.requires_grad_(True))).saved_tensors if t is not None]
    finally:
        unfuse_lora_4bit(model)
    assert_close(expected, got, rtol=1e-5)
    assert saved and not any(t.dtype in (torch.bool, torch.uint8, torch.int8) for t in saved)  # no mask kept
    assert sum(t.dtype == torch.int64 and t.numel() == 1 for t in saved) == 1  # the seed instead


def test_lora_dropout_from_a_seed_is_on_by_default_with_its_scratch_form():
    """On since session 45 (as fast in less memory, faster where memory binds); MASK_SCRATCH since session 46 (one
    layer's backward ~11% faster on an H100, the seed's step ~1%)."""
    assert lora_dropout.LORA_DROPOUT_KERNEL and lora_dropout.MASK_SCRATCH


def test_the_node_keeps_native_dropout_when_the_lever_is_off_or_the_width_is_not_a_multiple_of_4(kernels,
                                                                                               monkeypatch):
    x = torch.randn(5, 48)
    a = torch.randn(4, 48)
    assert kernels.can_run(x, a, 0.1, 40) and not kernels.can_run(x, a, 0.0, 40)
    assert not kernels.can_run(torch.randn(5, 46), torch.randn(4, 46), 0.1, 40)
    assert not kernels.can_run(x.bfloat16(), a, 0.1, 40)  # adapter and input of different dtypes
    assert not kernels.can_run(x, a, 0.1, 64)  # an input narrower than the output (v, wi): native_dropout
    monkeypatch.setattr(lora_dropout, "NARROW_INPUTS", True)
    assert kernels.can_run(x, a, 0.1, 64)
    monkeypatch.setattr(lora_dropout, "ON_CPU_IN_INTERPRETER", False)
    assert not kernels.can_run(x, a, 0.1, 40)  # on a CPU without the test's switch: torch's ops
    monkeypatch.setattr(lora_dropout, "ON_CPU_IN_INTERPRETER", True)
    monkeypatch.setattr(lora_dropout, "LORA_DROPOUT_KERNEL", False)
    assert not kernels.can_run(x, a, 0.1, 40)


COMPILE_FOR_HOPPER = """
import json
from sumtune.fast_t5 import lora_dropout, lora_dropout_kernels as k
from sumtune.fast_t5.flash_compile import compile_source, resources
t = dict(X="*bf16", A="*bf16", LOW="*bf16", G="*bf16", DX="*bf16", DA_PART="*fp32", SEED="*i64", n_rows="i32",
         n_cols="i32", rank="i32", stride_xm="i32", stride_ar="i32", stride_lm="i32", stride_gm="i32",
         stride_dm="i32", drop_below="i32", scale="fp32")
ones = dict(stride_xk=1, stride_ak=1, stride_lr=1, stride_gr=1, stride_dk=1)
def unit(kernel):
    return {name: 1 for name in ones if name in kernel.arg_names}
bm, bk, warps, stages = lora_dropout.FORWARD_TILE
for n_cols in (1024, 4096):
    c = compile_source(k.low_rank_fwd, t, dict(n_cols=n_cols, RANK=32, BLOCK_M=bm, BLOCK_K=bk, UPCAST=False,
                                               INDEX_64=False, **unit(k.low_rank_fwd)), warps, stages)
    print(json.dumps(dict(kernel=f"low_rank_fwd {n_cols}", **resources(c))))
bm, bk, warps, stages = lora_dropout.BACKWARD_TILE
for update, scratch in ((True, False), (False, False), (True, True)):
    c = compile_source(k.low_rank_bwd, dict(t, SCRATCH="*i8"), dict(
        TILES_PER_SPLIT=4, RANK=32, BLOCK_M=bm, BLOCK_K=bk, UPDATE_DX=update, UPCAST=False, INDEX_64=False,
        MASK_SCRATCH=scratch, **unit(k.low_rank_bwd)), warps, stages)
    print(json.dumps(dict(kernel=f"low_rank_bwd update_dx={update} scratch={scratch}",
                          mulhi=c.asm["ttgir"].count("tt.mulhiui"), **resources(c))))
"""


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
def test_the_kernels_build_for_hopper_without_spilling(compiled_for_hopper):
    """triton.compile for sm_90 on CPU (in a process without the interpreter), at the shipped tiles and r=32."""
    from sumtune.fast_t5.flash_compile import HOPPER_SHARED_BYTES

    rows, stderr = compiled_for_hopper(COMPILE_FOR_HOPPER)
    assert len(rows) == 5, stderr
    for row in rows:
        assert row["spill_bytes"] == 0 and row["shared_bytes"] <= HOPPER_SHARED_BYTES, row
        assert row["async_copies"] > 0 or "scratch=True" in row["kernel"], row  # x (and dx) tiles pipelined
    drawn, scratch = (row["mulhi"] for row in rows if row["kernel"].startswith("low_rank_bwd update_dx=True"))
    assert scratch * 2 - 2 <= drawn, (drawn, scratch)  # MASK_SCRATCH: the Philox rounds in one layout, not two


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("rows, cols, scratch", [(16 * 1024, 4096, False), (2048 + 40, 1024, False),
                                                (16 * 1024, 4096, True)])
def test_gpu_kernels_match_float64_with_their_mask_and_redraw_under_cuda_graphs(rows, cols, scratch, monkeypatch):
    """T5-3b's o and v inputs, bf16: forward, dA and dx within bf16 rounding of float64 under the kernels' mask (as
    close as native_dropout and cuBLAS with the same mask), and a new mask on each CUDA graph replay; also with the
    backward's keep flags through scratch (MASK_SCRATCH)."""
    monkeypatch.setattr(lora_dropout, "MASK_SCRATCH", scratch)
    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(rows, cols, device="cuda", generator=gen).bfloat16()
    a = (torch.randn(32, cols, device="cuda", generator=gen) * 0.02).bfloat16()
    g = torch.randn(rows, 32, device="cuda", generator=gen).bfloat16()
    dx0 = torch.randn(rows, cols, device="cuda", generator=gen).bfloat16()
    seed, p = torch.tensor([99], device="cuda"), 0.05
    keep = lora_dropout.keep_mask(seed, rows, cols, p)
    assert abs(keep.float().mean().item() - 0.95) < 0.002
    low_ref, da_ref, dx_ref = float64_reference(x, a, g, dx0, keep, p)
    dx = dx0.clone()
    low = lora_dropout.low_rank(x, a, seed, p)
    da = lora_dropout.low_rank_backward(x, a, g, seed, p, dx)
    dropped = (x.float() * keep * scale_of(p)).bfloat16()  # what native_dropout + cuBLAS compute
    stock = [dropped @ a.t(), (g.t() @ dropped).float(), dx0 + ((g @ a) * keep * scale_of(p)).bfloat16()]
    for got, base, ref in zip([low, da, dx], stock, [low_ref, da_ref, dx_ref]):
        assert rel(got, ref) <= max(1.05 * rel(base, ref), 1e-3), (rel(got, ref), rel(base, ref))
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        from sumtune.fast_t5.attention_inputs import dropout_seed

        out = lora_dropout.low_rank(x, a, dropout_seed(x, p), p)
    graph.replay()
    first = out.clone()
    graph.replay()
    assert not torch.equal(first, out)


def test_backward_grid_fills_the_gpu_with_a_power_of_two_of_row_tiles(monkeypatch):
    """T5-3b at micro-batch 16 on a 132-SM card: o's 4096-wide input (64 column blocks) and v's 1024 (16) get
    at least 4 programs an SM; the decoder's 2048 rows one tile each; the interpreter one program a column block."""
    monkeypatch.setattr(lora_dropout, "_sm_count", lambda index: 132)
    cuda = torch.device("cuda", 0)
    for row_tiles, col_blocks in [(256, 64), (256, 16), (32, 64), (1, 16)]:
        tiles = lora_dropout.split_tiles(row_tiles, col_blocks, cuda)
        assert tiles & (tiles - 1) == 0 and 1 <= tiles <= row_tiles
        programs = col_blocks * -(-row_tiles // tiles)
        assert programs >= min(4 * 132, col_blocks * row_tiles), (row_tiles, col_blocks, tiles)
    assert lora_dropout.split_tiles(256, 64, cuda) == 16 and lora_dropout.split_tiles(32, 64, cuda) == 2
    assert lora_dropout.split_tiles(5, 3, torch.device("cpu")) == 8  # every row tile in one program


def test_by_default_only_layers_with_an_input_at_least_as_wide_as_the_output_take_the_kernels(kernels, monkeypatch):
    """WIDE (16 -> 64, then 64 -> 16): the first layer draws with native_dropout (keeps its mask), the second with
    the kernels (keeps a seed)."""
    model = lora_model(dropout=0.25, widths=WIDE)
    fuse_lora_4bit(model, concat_gemms=True)
    try:
        out = model(torch.randn(3, 5, WIDE[0], requires_grad=True))
    finally:
        unfuse_lora_4bit(model)
    nodes, stack = [], [out.grad_fn]
    while stack:
        node = stack.pop()
        if node is None:
            continue
        if "FusedLora" in type(node).__name__:
            nodes.append(node)
        stack += [n for n, _ in node.next_functions]
    masks = [any(t is not None and t.dtype == torch.bool for t in n.saved_tensors) for n in nodes]
    assert len(nodes) == 2 and sorted(masks) == [False, True]
