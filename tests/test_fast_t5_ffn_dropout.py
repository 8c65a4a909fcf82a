"""sumtune.fast_t5.ffn_dropout: T5's feed-forward ReLU + dropout in one Triton kernel each way, against torch.

On CPU the kernels run in Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1 without a GPU); GPU tests
(``-m gpu``) run the compiled kernels."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from _fast_t5_attention_helpers import seed_of_next_call

from sumtune.fast_t5 import flash_attention


@pytest.fixture()
def ffn():
    pytest.importorskip("triton")
    from sumtune.fast_t5 import ffn_dropout, ffn_kernels

    if not ffn_kernels.INTERPRET:
        pytest.skip("Triton's interpreter is off (a CUDA machine: run with TRITON_INTERPRET=1, or -m gpu)")
    return ffn_dropout


def assert_same(got, expected):
    """Bitwise in float32. In bf16 the same zeros and values within one bf16 step: Triton's CPU interpreter rounds
    float32 -> bf16 toward zero where GPUs round to nearest (the GPU test below asks for bitwise equality)."""
    if got.dtype == torch.float32:
        assert torch.equal(got, expected)
        return
    assert torch.equal(got == 0, expected == 0)
    assert torch.allclose(got.float(), expected.float(), rtol=2 ** -7, atol=0)


def output_and_grad(fn, x):
    """fn(x) and the gradient of its squares' sum with respect to x (a fresh one each call)."""
    x.grad = None
    y = fn(x)
    y.square().sum().backward()
    return y.detach(), x.grad.clone()


def reference(x, keep, scale):
    """torch's relu then dropout with the kernels' mask: x * mask * scale, computed in float32."""
    return (torch.relu(x.float()) * keep.view(x.shape).float() * scale).to(x.dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_forward_and_backward_are_relu_then_dropout_with_the_kernels_mask(ffn, dtype):
    """Output and input gradient equal torch's relu + dropout given the mask the seed draws (bitwise), over more
    than one program's block and a ragged end."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, 1000, generator=gen).to(dtype).requires_grad_()  # 15,000 elements: 4 blocks, ragged
    grad_y = torch.randn(x.shape, generator=gen).to(dtype)
    p = 0.3
    seed = seed_of_next_call(flash_attention, 11)  # the op draws its seed first thing, as the attention kernels
    y = ffn.relu_dropout(x, p)
    y.backward(grad_y)
    keep = ffn.relu_dropout_keep_mask(seed, x.numel(), p, device="cpu")
    scale = ffn.dropout_scale(p)
    expected_grad = (grad_y.float() * ((x.detach() > 0) & keep.view(x.shape)).float() * scale).to(dtype)
    assert_same(y, reference(x.detach(), keep, scale))
    assert_same(x.grad, expected_grad)
    drop_rate = 1 - keep.float().mean().item()
    assert abs(drop_rate - p) < 4 * (p * (1 - p) / keep.numel()) ** 0.5
    assert abs(scale * (1 - p) - 1) < 1e-6


def test_zero_dropout_is_relu_and_nan_stays_nan(ffn):
    x = torch.tensor([-2.0, -0.0, 0.0, 1.5, float("nan"), float("inf")]).requires_grad_()
    y = ffn.relu_dropout(x, 0.0)
    assert torch.equal(y[:4], torch.relu(x.detach())[:4]) and torch.isnan(y[4]) and y[5] == float("inf")
    y[:4].sum().backward()
    assert torch.equal(x.grad[:4], torch.tensor([0.0, 0.0, 0.0, 1.0]))


def test_mask_depends_on_seed_and_element_only(ffn):
    first = ffn.relu_dropout_keep_mask(5, 9000, 0.1, device="cpu")
    assert torch.equal(first, ffn.relu_dropout_keep_mask(5, 9000, 0.1, device="cpu"))
    assert not torch.equal(first, ffn.relu_dropout_keep_mask(6, 9000, 0.1, device="cpu"))
    assert torch.equal(first[:5000], ffn.relu_dropout_keep_mask(5, 5000, 0.1, device="cpu"))  # not the length
    original = ffn.BLOCK
    try:
        ffn.BLOCK = 1024  # another tiling: the same draws
        assert torch.equal(first, ffn.relu_dropout_keep_mask(5, 9000, 0.1, device="cpu"))
    finally:
        ffn.BLOCK = original


def test_reproducible_under_manual_seed_and_checkpointing(ffn):
    from torch.utils.checkpoint import checkpoint

    x = torch.randn(4, 700, generator=torch.Generator().manual_seed(1)).requires_grad_()

    def run(fn):
        return output_and_grad(fn, x)

    torch.manual_seed(3)
    y, grad = run(lambda t: ffn.relu_dropout(t, 0.2))
    torch.manual_seed(3)
    again, _ = run(lambda t: ffn.relu_dropout(t, 0.2))
    torch.manual_seed(4)
    other, _ = run(lambda t: ffn.relu_dropout(t, 0.2))
    assert torch.equal(y, again) and not torch.equal(y, other)
    torch.manual_seed(3)
    recomputed, recomputed_grad = run(lambda t: checkpoint(ffn.relu_dropout, t, 0.2, use_reentrant=False))
    assert torch.equal(recomputed, y) and torch.equal(recomputed_grad, grad)


def test_custom_ops_pass_opcheck(ffn):
    x = torch.randn(6, 40)
    torch.library.opcheck(torch.ops.sumtune.relu_dropout.default, (x, 0.0),
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))
    torch.library.opcheck(torch.ops.sumtune.relu_dropout_backward.default, (x, torch.relu(x), 0.1),
                          test_utils=("test_schema", "test_faketensor"))


def test_the_fast_t5_feed_forward_runs_the_fused_kernels_only_when_asked(ffn, monkeypatch):
    """enable_fast_t5(fused_ffn_dropout=True) routes the ReLU feed-forwards of a training step through the fused op
    (stock ops otherwise, and in eval); with T5's dropout 0 the loss and LoRA gradients equal the stock ops'."""
    from test_fast_t5 import TINY, VOCAB, build_qlora_t5, loss_and_lora_grads, padded_batch

    from sumtune.fast_t5 import disable_fast_t5, enable_fast_t5, ffn_dropout

    model = build_qlora_t5(dict(TINY, num_layers=1, num_decoder_layers=1), seed=5)
    model.train()
    batch = padded_batch(2, 16, 6, VOCAB, seed=6)
    calls, original = [], ffn_dropout.relu_dropout

    def spy(x, p):
        calls.append(p)
        return original(x, p)

    monkeypatch.setattr(ffn_dropout, "relu_dropout", spy)
    monkeypatch.setattr(ffn_dropout, "fuses_in_model", ffn_dropout.can_fuse)  # the interpreter stands in for CUDA
    results = {}
    for fused in (False, True):
        enable_fast_t5(model, attention_backend="sdpa", fused_ffn_dropout=fused)
        calls.clear()
        results[fused] = loss_and_lora_grads(model, batch)
        assert calls == ([0.0, 0.0] if fused else [])  # encoder and decoder feed-forward, T5's dropout_rate 0
        model.eval()
        with torch.no_grad():
            model(**batch)
        model.train()
        assert len(calls) == (2 if fused else 0)  # eval keeps the stock ops
        disable_fast_t5(model)
    (loss, grads), (fused_loss, fused_grads) = results[False], results[True]
    assert torch.equal(loss, fused_loss)
    assert all(torch.equal(grads[name], fused_grads[name]) for name in grads)


def test_on_a_cpu_the_model_keeps_the_stock_ops(ffn, monkeypatch):
    """The kernels are for CUDA: on a CPU (even with Triton's interpreter on, as in these tests and the
    subprocesses they start) the fast feed-forward runs torch's ops."""
    from test_fast_t5 import TINY, VOCAB, build_qlora_t5, padded_batch

    from sumtune.fast_t5 import enable_fast_t5

    calls = []
    monkeypatch.setattr(ffn, "relu_dropout", lambda x, p: calls.append(p))
    model = build_qlora_t5(dict(TINY, num_layers=1, num_decoder_layers=1), seed=5).train()
    enable_fast_t5(model, attention_backend="sdpa", fused_ffn_dropout=True)
    model(**padded_batch(2, 16, 6, VOCAB, seed=6))
    assert calls == [] and not ffn.fuses_in_model(torch.zeros(2)) and ffn.can_fuse(torch.zeros(2))


# ----------------------------------------------------------------------------- gated GELU (T5 v1.1 / FLAN-T5)
def gated_reference(a, b, keep, scale):
    """float64 dropout(gelu_new(a) * b) with the kernels' mask (transformers' NewGELUActivation formula)."""
    from transformers.activations import NewGELUActivation

    return NewGELUActivation()(a.double()) * b.double() * keep.view(a.shape).double() * scale


def test_gated_forward_and_backward_are_gelu_new_gate_dropout_with_the_kernels_mask(ffn):
    """float32: output and both gradients within float32 rounding of float64 transformers maths with the mask the
    seed draws, over several blocks and a ragged end."""
    gen = torch.Generator().manual_seed(2)
    a = (3 * torch.randn(3, 5, 1000, generator=gen)).requires_grad_()
    b = torch.randn(3, 5, 1000, generator=gen).requires_grad_()
    grad_y = torch.randn(a.shape, generator=gen)
    p = 0.3
    seed = seed_of_next_call(flash_attention, 12)
    y = ffn.gated_gelu_dropout(a, b, p)
    y.backward(grad_y)
    keep = ffn.relu_dropout_keep_mask(seed, a.numel(), p, device="cpu")  # the same draws as the ReLU form
    a64, b64 = a.detach().double().requires_grad_(), b.detach().double().requires_grad_()
    expected = gated_reference(a64, b64, keep, ffn.dropout_scale(p))
    expected.backward(grad_y.double())
    for got, want in ((y, expected), (a.grad, a64.grad), (b.grad, b64.grad)):
        assert torch.allclose(got.double(), want.detach(), rtol=1e-5, atol=1e-6)
    assert torch.all(y[~keep.view(a.shape)] == 0) and (y != 0).float().mean() > 0.6  # dropped, and the rest kept


def gated_bf16_against_float64(ffn_dropout, device: str):
    """(kernel output, stock output, float64 result) for bf16 inputs, with the kernel's mask."""
    from transformers.activations import NewGELUActivation

    gen = torch.Generator().manual_seed(3)
    a = (2 * torch.randn(64, 512, generator=gen)).bfloat16().to(device)
    b = torch.randn(64, 512, generator=gen).bfloat16().to(device)
    seed = seed_of_next_call(flash_attention, 13, device=device)
    y = ffn_dropout.gated_gelu_dropout(a, b, 0.1)
    keep = ffn_dropout.relu_dropout_keep_mask(seed, a.numel(), 0.1, device=device).view(a.shape)
    scale = ffn_dropout.dropout_scale(0.1)
    stock = NewGELUActivation()(a) * b * keep.bfloat16() * scale
    return y.double(), stock.double(), gated_reference(a, b, keep, scale)


def test_gated_bf16_is_within_a_bf16_step_of_float64(ffn):
    """bf16 in and out: one bf16 step of the float64 result (Triton's interpreter rounds toward zero; the GPU test
    asks for at least stock's closeness)."""
    y, _, exact = gated_bf16_against_float64(ffn, "cpu")
    assert torch.allclose(y, exact, rtol=2 ** -7, atol=1e-6)


def test_gated_reproducible_under_checkpointing_and_passes_opcheck(ffn):
    from torch.utils.checkpoint import checkpoint

    a = torch.randn(4, 700, generator=torch.Generator().manual_seed(1)).requires_grad_()
    b = torch.randn(4, 700, generator=torch.Generator().manual_seed(2))

    def run(fn):
        return output_and_grad(fn, a)

    torch.manual_seed(3)
    y, grad = run(lambda t: ffn.gated_gelu_dropout(t, b, 0.2))
    torch.manual_seed(3)
    recomputed, recomputed_grad = run(lambda t: checkpoint(ffn.gated_gelu_dropout, t, b, 0.2, use_reentrant=False))
    assert torch.equal(recomputed, y) and torch.equal(recomputed_grad, grad)
    x = torch.randn(6, 40)
    torch.library.opcheck(torch.ops.sumtune.gated_gelu_dropout.default, (x, x.flip(0), 0.0),
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))
    torch.library.opcheck(torch.ops.sumtune.gated_gelu_dropout_backward.default,
                          (x, x, x, torch.zeros(1, dtype=torch.int64), 0.1), test_utils=("test_schema", "test_faketensor"))


def test_the_gated_feed_forward_runs_the_fused_kernels_only_when_asked(ffn, monkeypatch):
    """enable_fast_t5(fused_gated_ffn=True) routes a FLAN-T5-style (gated-GELU) model's feed-forwards through the
    fused op in training (stock ops otherwise, in eval, and for the ReLU flag); with dropout 0 the loss and LoRA
    gradients are the stock ops' within float32 rounding."""
    from test_fast_t5 import TINY, VOCAB, build_qlora_t5, loss_and_lora_grads, padded_batch

    from sumtune.fast_t5 import disable_fast_t5, enable_fast_t5

    model = build_qlora_t5(dict(TINY, num_layers=1, num_decoder_layers=1, feed_forward_proj="gated-gelu"), seed=5)
    model.train()
    batch = padded_batch(2, 16, 6, VOCAB, seed=6)
    calls, original = [], ffn.gated_gelu_dropout

    def spy(a, b, p):
        calls.append(p)
        return original(a, b, p)

    monkeypatch.setattr(ffn, "gated_gelu_dropout", spy)
    monkeypatch.setattr(ffn, "fuses_in_model", ffn.can_fuse)  # the interpreter stands in for CUDA
    results = {}
    for fused in (False, True):
        enable_fast_t5(model, attention_backend="sdpa", fused_ffn_dropout=True, fused_gated_ffn=fused)
        calls.clear()
        results[fused] = loss_and_lora_grads(model, batch)
        assert calls == ([0.0, 0.0] if fused else [])
        model.eval()
        with torch.no_grad():
            model(**batch)
        model.train()
        assert len(calls) == (2 if fused else 0)
        disable_fast_t5(model)
    (loss, grads), (fused_loss, fused_grads) = results[False], results[True]
    # bf16 compute: stock rounds each of gelu_new's five ops to bf16, the kernel rounds once (a few bf16 steps apart)
    differences = {n: float((grads[n] - fused_grads[n]).norm() / grads[n].norm()) for n in grads if grads[n].norm() > 0}
    assert len(differences) > len(grads) // 2 and max(differences.values()) < 2e-2, differences
    assert torch.allclose(loss, fused_loss, rtol=1e-3)


COMPILE_FOR_HOPPER = """
import itertools
import json
from sumtune.fast_t5 import ffn_kernels
from sumtune.fast_t5.flash_compile import compile_source, resources
from sumtune.generation import cross_attention, cross_kernels
ffn = dict(X="*bf16", Y="*bf16", DY="*bf16", DX="*bf16", SEED="*i64", n="i64", drop_below="i32", scale="fp32",
           A="*bf16", B="*bf16", DA="*bf16", DB="*bf16")
builds = {
    "relu_dropout_fwd": compile_source(ffn_kernels.relu_dropout_fwd, ffn, dict(BLOCK=4096, DROPOUT=True), 4),
    "relu_dropout_bwd": compile_source(ffn_kernels.relu_dropout_bwd, ffn, dict(BLOCK=4096), 4),
    "gated_gelu_dropout_fwd": compile_source(ffn_kernels.gated_gelu_dropout_fwd, ffn, dict(BLOCK=4096, DROPOUT=True), 4),
    "gated_gelu_dropout_bwd": compile_source(ffn_kernels.gated_gelu_dropout_bwd, ffn, dict(BLOCK=4096, DROPOUT=True), 4),
}
types = dict(Q="*bf16", MEM="*bf16", OUT="*bf16", ACC="*fp32", MAX="*fp32", SUM="*fp32", LENGTHS="*i32", BIAS="*bf16")
types.update({name: "i32" for name in cross_kernels.hidden_cross_attention.arg_names if name not in types})
for (_, block_n, warps), split in itertools.product(cross_attention.TILES_BY_STATES, (False, True)):
    builds[f"hidden_cross_attention {block_n}x{warps} split={split}"] = compile_source(
        cross_kernels.hidden_cross_attention, types, dict(BLOCK_H=cross_attention.head_blocks(32,
        cross_attention.HEADS_PER_PROGRAM)[0], D=1024, BLOCK_N=block_n, SPLIT=split, UPCAST=False, HAS_BIAS=False,
        stride_lb=1),
        warps, cross_attention.NUM_STAGES)
for name, compiled in builds.items():
    print(json.dumps(dict(kernel=name, vectorized="v4.b32" in compiled.asm["ptx"], **resources(compiled))))
"""


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
def test_the_new_kernels_build_for_hopper_without_spilling(compiled_for_hopper):
    """triton.compile for sm_90 on CPU (in a process without the interpreter): the feed-forward kernels load and
    store 16 bytes at a time and spill nothing; the decoding kernel at T5-3b's shapes and each shipped tile spills
    at most a few words (the 32-key tile runs at 255 registers: 4 bytes, 24 with key splits, on Triton 3.6)."""
    from sumtune.fast_t5.flash_compile import HOPPER_SHARED_BYTES
    from sumtune.generation import cross_attention

    rows, stderr = compiled_for_hopper(COMPILE_FOR_HOPPER)
    assert len(rows) == 4 + 2 * len(cross_attention.TILES_BY_STATES), stderr
    for row in rows:
        assert row["spill_bytes"] <= (32 if "cross" in row["kernel"] else 0), row
        assert row["shared_bytes"] <= HOPPER_SHARED_BYTES, row
        assert row["vectorized"], row
    assert all(row["async_copies"] > 0 for row in rows if "cross" in row["kernel"])  # state loads pipelined


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_kernels_match_torch_with_their_mask_and_redraw_under_cuda_graphs():
    from sumtune.fast_t5 import ffn_dropout

    x = torch.randn(16, 1024, 512, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    grad_y = torch.randn_like(x)
    seed = seed_of_next_call(flash_attention, 7, device="cuda")
    y = ffn_dropout.relu_dropout(x, 0.1)
    keep = ffn_dropout.relu_dropout_keep_mask(seed, x.numel(), 0.1)
    assert torch.equal(y, reference(x.detach(), keep, ffn_dropout.dropout_scale(0.1)))
    y.backward(grad_y)
    expected = (grad_y.float() * ((x.detach() > 0) & keep.view(x.shape)).float() * ffn_dropout.dropout_scale(0.1))
    assert torch.equal(x.grad, expected.to(torch.bfloat16))
    static = x.detach().clone()
    graph = torch.cuda.CUDAGraph()
    ffn_dropout.relu_dropout(static, 0.1)
    torch.cuda.synchronize()
    with torch.cuda.graph(graph):
        out = ffn_dropout.relu_dropout(static, 0.1)
    graph.replay()
    first = out.clone()
    graph.replay()
    assert not torch.equal(first, out)  # a new seed per replay


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_gated_kernels_are_at_least_as_close_to_float64_as_stock():
    """Compiled, bf16: the kernel's fp32 GELU is at least as close to float64 as stock's bf16 ops (max and mean)."""
    from sumtune.fast_t5 import ffn_dropout

    y, stock, exact = gated_bf16_against_float64(ffn_dropout, "cuda")
    for reduce in (torch.max, torch.mean):
        assert reduce((y - exact).abs()) <= reduce((stock - exact).abs())
