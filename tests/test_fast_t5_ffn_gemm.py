"""sumtune.fast_t5.ffn_gemm: T5's feed-forward GEMMs with the ReLU-dropout in their epilogues (used by the model where
``USE_IN_MODEL`` says so), against float64, the standalone ReLU-dropout kernel's draws and, in a model, the path with
the standalone kernel.

On CPU the kernels run in Triton's interpreter; the sm_90 build is checked with ptxas on any machine."""

from __future__ import annotations

import importlib.util

import pytest
import torch


@pytest.fixture()
def kernels():
    pytest.importorskip("triton")
    from sumtune.fast_t5 import ffn_dropout, ffn_gemm, ffn_gemm_kernels

    if not ffn_gemm_kernels.INTERPRET:
        pytest.skip("Triton's interpreter is off (a CUDA machine: run with TRITON_INTERPRET=1)")
    return ffn_gemm, ffn_dropout


@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
def test_forward_is_relu_dropout_of_the_product_with_the_standalone_kernels_draws(kernels, dropout_p):
    """Ragged edges on every axis (40 rows, 100 columns, depth 40 with tiles of 16 x 32 x 16): each element is
    relu(x . w) times the keep decision ``relu_dropout_keep_mask`` gives the same seed for its flat index."""
    ffn_gemm, ffn_dropout = kernels
    gen = torch.Generator().manual_seed(0)
    x, weight = torch.randn(40, 40, generator=gen), torch.randn(100, 40, generator=gen)
    seed = torch.tensor([2026], dtype=torch.int64)
    y, used_seed = ffn_gemm.linear_relu_dropout(x, weight, dropout_p, seed=seed)
    keep = ffn_dropout.relu_dropout_keep_mask(seed, y.numel(), dropout_p, device="cpu").view(y.shape)
    if dropout_p == 0:
        keep = torch.ones_like(keep)
    expected = (x.double() @ weight.double().T).clamp_min(0) * keep * ffn_dropout.dropout_scale(dropout_p)
    assert used_seed is seed
    assert (y.double() - expected).abs().max().item() < 1e-4
    if dropout_p:
        assert 0.6 < keep.float().mean().item() < 0.8  # the decisions are the kernel's, and they do drop


def test_backward_is_the_product_masked_by_the_forward_output(kernels):
    ffn_gemm, ffn_dropout = kernels
    gen = torch.Generator().manual_seed(1)
    x, wi = torch.randn(40, 40, generator=gen), torch.randn(100, 40, generator=gen)
    y, _ = ffn_gemm.linear_relu_dropout(x, wi, 0.3, seed=torch.tensor([5], dtype=torch.int64))
    grad_out, wo = torch.randn(40, 24, generator=gen), torch.randn(24, 100, generator=gen)
    grad = ffn_gemm.relu_dropout_grad_input(grad_out, wo, y, 0.3)
    expected = (grad_out.double() @ wo.double()) * (y > 0) * ffn_dropout.dropout_scale(0.3)
    assert (grad.double() - expected).abs().max().item() < 1e-4
    assert (grad[y == 0] == 0).all() and (grad[y > 0] != 0).any()


def test_shapes_that_do_not_fit_are_refused_in_one_sentence(kernels):
    ffn_gemm, _ = kernels
    with pytest.raises(ValueError, match="need weight"):
        ffn_gemm.linear_relu_dropout(torch.zeros(4, 8), torch.zeros(6, 8), 0.1)  # 6 columns: not a multiple of 4
    with pytest.raises(ValueError, match=r"need \[M, K\]"):
        ffn_gemm.relu_dropout_grad_input(torch.zeros(4, 8), torch.zeros(8, 12), torch.zeros(4, 8), 0.1)


COMPILE_FOR_HOPPER = """
import json
from sumtune.fast_t5 import ffn_gemm, ffn_gemm_kernels
from sumtune.fast_t5.flash_compile import compile_source, resources, sass_opcodes
types = dict(X="*bf16", W="*bf16", Y="*bf16", G="*bf16", DX="*bf16", SEED="*i64", scale="fp32", drop_below="i32")
for name, tiles in (("linear_relu_dropout", ffn_gemm.FORWARD_TILES),
                    ("matmul_relu_dropout_grad", ffn_gemm.BACKWARD_TILES)):
    kernel = getattr(ffn_gemm_kernels, name)
    arg_types = {**{n: "i32" for n in kernel.arg_names}, **types}
    block_m, block_n, block_k, group_m, warps, stages = tiles
    constexprs = dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, GROUP_M=group_m, UPCAST=False)
    if "DROPOUT" in kernel.arg_names:
        constexprs["DROPOUT"] = True
    compiled = compile_source(kernel, arg_types, constexprs, warps, stages)
    print(json.dumps(dict(kernel=name, wgmma=sass_opcodes(compiled).get("HGMMA", 0), **resources(compiled))))
"""


def test_the_model_takes_the_epilogue_gemms_where_asked_with_the_standalone_kernels_loss_and_gradients(
        kernels, monkeypatch):
    """With ``USE_IN_MODEL`` and frozen cached wi / wo (LoRA on attention's v and o, as the reference), a training
    step's ReLU feed-forwards run ``relu_feed_forward`` (not in eval, not without the cache); with T5's dropout 0.2 the
    loss and LoRA gradients are those of the standalone kernel's path for the same RNG state (same draws; the GEMMs
    round differently, so within bf16 steps)."""
    from test_fast_t5 import TINY, VOCAB, build_qlora_t5, loss_and_lora_grads, padded_batch

    from sumtune.fast_t5 import disable_fast_t5, enable_fast_t5
    from sumtune.fast_t5.extras import cache_dequantized_weights, uncache_dequantized_weights

    ffn_gemm, ffn_dropout = kernels
    model = build_qlora_t5(dict(TINY, num_layers=1, num_decoder_layers=1, dropout_rate=0.2), seed=5,
                           lora_targets=["v", "o"], quantize_wo=True)
    batch = padded_batch(2, 16, 6, VOCAB, seed=6)
    calls, original = [], ffn_gemm.relu_feed_forward

    def spy(x, wi, wo, p):
        calls.append(p)
        return original(x, wi, wo, p)

    monkeypatch.setattr(ffn_gemm, "relu_feed_forward", spy)
    for module in (ffn_dropout, ffn_gemm):  # the interpreter stands in for CUDA
        monkeypatch.setattr(module, "kernels_run_in_model" if module is ffn_gemm else "fuses_in_model",
                            ffn_dropout.can_fuse)
    assert ffn_gemm.USE_IN_MODEL is False  # off until measured faster on a GPU
    results = {}
    for cached, use in ((False, True), (True, False), (True, True)):
        if cached:
            cache_dequantized_weights(model)
        monkeypatch.setattr(ffn_gemm, "USE_IN_MODEL", use)
        enable_fast_t5(model, attention_backend="sdpa", fused_ffn_dropout=True)
        calls.clear()
        torch.manual_seed(11)
        results[cached, use] = loss_and_lora_grads(model, batch)
        assert calls == ([0.2, 0.2] if cached and use else [])  # encoder and decoder feed-forward
        model.eval()
        with torch.no_grad():
            model(**batch)
        model.train()
        assert len(calls) == (2 if cached and use else 0)  # eval keeps the stock ops
        disable_fast_t5(model)
        uncache_dequantized_weights(model)
    (loss, grads), (fused_loss, fused_grads) = results[True, False], results[True, True]
    assert torch.allclose(loss, fused_loss, rtol=5e-3), (loss, fused_loss)
    differences = {n: float((grads[n] - fused_grads[n]).norm() / grads[n].norm()) for n in grads if grads[n].norm() > 0}
    assert len(differences) == len(grads) and max(differences.values()) < 2e-2, differences
    # and the draws are the ones the step made: another RNG state gives another loss
    torch.manual_seed(12)
    monkeypatch.setattr(ffn_gemm, "USE_IN_MODEL", True)
    cache_dequantized_weights(model)
    enable_fast_t5(model, attention_backend="sdpa", fused_ffn_dropout=True)
    assert not torch.allclose(loss_and_lora_grads(model, batch)[0], fused_loss, rtol=1e-3)


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
def test_the_shipped_tiles_build_for_hopper_with_warpgroup_mma_and_no_spill(compiled_for_hopper):
    from sumtune.fast_t5.flash_compile import HOPPER_SHARED_BYTES

    rows, stderr = compiled_for_hopper(COMPILE_FOR_HOPPER)
    assert len(rows) == 2, stderr
    for row in rows:
        assert row["wgmma"] > 0 and row["spill_bytes"] == 0 and row["shared_bytes"] <= HOPPER_SHARED_BYTES, row
        assert row["async_copies"] > 0, row  # the K loop's loads pipelined
