"""How sumtune's fast T5 reaches its Triton attention (sumtune.fast_t5.attention): the backend choice, the custom op
as torch.compile relies on it, and the fast T5 stack on this route against stock.

On CPU in Triton's interpreter (tests/conftest.py); the compiled kernels: tests/test_fast_t5_attention_gpu.py.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch
from _fast_t5_attention_helpers import make_qkv, padding_mask, t5_like_table

from sumtune.fast_t5 import attention as attention_lib


HAS_TRITON = importlib.util.find_spec("triton") is not None


def test_dispatch_first_match(monkeypatch):
    from sumtune.errors import SumtuneError

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert attention_lib.choose_backend("auto", cpu, torch.bfloat16, 64, None) == "sdpa"
    assert attention_lib.choose_backend("sdpa", cuda, torch.bfloat16, 64, None) == "sdpa"
    assert attention_lib.triton_blocker(cuda, torch.bfloat16, 128, None) == (None if HAS_TRITON else
                                                                              "triton is not installed")
    assert "float32" in attention_lib.triton_blocker(cuda, torch.float32, 64, None)
    assert "head_dim" in attention_lib.triton_blocker(cuda, torch.bfloat16, 80, None)
    assert "CUDA" in attention_lib.triton_blocker(cpu, torch.bfloat16, 64, None)
    with pytest.raises(SumtuneError, match="CUDA"):
        attention_lib.choose_backend("triton", cpu, torch.bfloat16, 64, None)
    with pytest.raises(SumtuneError, match="one of auto, triton, sdpa"):
        attention_lib.choose_backend("flash", cuda, torch.bfloat16, 64, None)


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
def test_dispatch_keeps_sdpa_for_a_trainable_bias():
    from transformers import T5Config
    from transformers.models.t5.modeling_t5 import T5Attention

    attention = T5Attention(T5Config(d_model=32, d_kv=8, num_heads=4), has_relative_attention_bias=True)
    cuda = torch.device("cuda")
    assert "trainable" in attention_lib.triton_blocker(cuda, torch.bfloat16, 64, attention)
    with torch.no_grad():  # no gradient asked for: the frozen-table kernels are exact
        assert attention_lib.triton_blocker(cuda, torch.bfloat16, 64, attention) is None
    attention.requires_grad_(False)  # QLoRA freezes it
    assert attention_lib.choose_backend("auto", cuda, torch.bfloat16, 64, attention) == "triton"


def test_custom_op_registration_passes_opcheck(fa):
    """Schema, fake tensors and autograd registration as torch.compile relies on (torch.library.opcheck)."""
    q, k, v = make_qkv(2, 2, 20, 20, 16, torch.float32)
    padding = fa.key_padding(padding_mask(2, 20))
    table = fa.bias_table_log2(t5_like_table(2, 20, 20, 4))
    op = torch.ops.sumtune.t5_flash_attention.default
    torch.library.opcheck(op, (q, k, v, table, 4, *padding, False, 1.0, 0.0, 16, True, True),
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


def test_compiled_graph_keeps_the_custom_ops_and_their_dropout(fa):
    """torch.compile (dynamo + AOTAutograd, eager kernels) traces the fast path's call with its FlashInputs in one
    graph, and the compiled backward regenerates the forward's dropout mask: bit-identical to eager at one seed."""
    q, k, v = make_qkv(2, 2, 24, 24, 16, torch.float32)
    inputs = attention_lib.FlashInputs(fa.bias_table_log2(t5_like_table(2, 24, 24, 4)), 4,
                                       fa.key_padding(padding_mask(2, 24)), False)

    def loss(q, k, v, inputs):
        return attention_lib.flash_attend(q, k, v, inputs, dropout_p=0.2).square().sum()

    compiled = torch.compile(loss, backend="aot_eager", fullgraph=True)
    results = []
    for fn in (loss, compiled):
        torch.manual_seed(1)
        value = fn(q, k, v, inputs)
        results.append((value, torch.autograd.grad(value, (q, k, v))))
    (eager, eager_grads), (traced, traced_grads) = results
    assert torch.equal(eager, traced)
    assert all(torch.equal(a, b) for a, b in zip(eager_grads, traced_grads))


@pytest.mark.slow
def test_fast_t5_on_the_triton_route_matches_stock(fa):
    """Tiny QLoRA T5 (padded source and target, position biases of a few units as trained T5s have) through
    enable_fast_t5(attention_backend="triton") in the interpreter: loss as stock, padding exact, LoRA gradients
    near a float32 recomputation. This checks the wiring (which table, masks, causality, cross-attention inputs);
    the kernels' arithmetic is pinned to ~1e-6 above.

    The bar is 3x stock's distance from float32: measured 1.8x (all gradients as one vector; 0.96x for the worst
    tensor), because the kernels round P and dS to bf16 before their GEMMs as GPU flash kernels do and CPU SDPA
    does not (the GPU test holds them to 1.1x of stock's GPU kernels). Mis-wiring is far above it: a mirrored bias
    table measured 47x, no causal mask 40x."""
    from test_fast_t5 import LOSS_RTOL, TINY, VOCAB, build_qlora_t5, loss_and_lora_grads, padded_batch

    from sumtune.fast_t5 import disable_fast_t5, enable_fast_t5
    from sumtune.fast_t5.numerics import fp32_reference_grads, relative_errors, vector_relative_error

    model = build_qlora_t5(dict(TINY, num_layers=1, num_decoder_layers=1), seed=11)  # the interpreter is slow
    with torch.no_grad():
        for stack in (model.base_model.model.encoder, model.base_model.model.decoder):
            stack.block[0].layer[0].SelfAttention.relative_attention_bias.weight.normal_(0.0, 2.0)
    batch = padded_batch(3, 24, 10, VOCAB, seed=12)
    decoder_ids = model.base_model.model._shift_right(batch["labels"])
    decoder_mask = torch.ones_like(decoder_ids)
    decoder_mask[:, 1:] = (batch["labels"][:, :-1] != -100).long()
    batch = dict(batch, decoder_input_ids=decoder_ids, decoder_attention_mask=decoder_mask)
    stock_loss, stock_grads = loss_and_lora_grads(model, batch)
    enable_fast_t5(model, attention_backend="triton")
    try:
        loss, grads = loss_and_lora_grads(model, batch)
        garbage = dict(batch, input_ids=batch["input_ids"].masked_fill(batch["attention_mask"] == 0, 7),
                       decoder_input_ids=decoder_ids.masked_fill(decoder_mask == 0, 9))
        with torch.no_grad():
            garbage_loss = model(**garbage).loss
            clean_loss = model(**batch).loss
    finally:
        disable_fast_t5(model)
    assert abs(float(loss - stock_loss)) <= LOSS_RTOL * abs(float(stock_loss))
    assert torch.equal(clean_loss, garbage_loss)  # padded source and target tokens change nothing
    _, fp32_grads = fp32_reference_grads(model, batch)
    ours, stock = relative_errors(grads, fp32_grads), relative_errors(stock_grads, fp32_grads)
    assert max(ours.values()) <= 3 * max(stock.values())
    assert vector_relative_error(grads, fp32_grads) <= 3 * vector_relative_error(stock_grads, fp32_grads)
