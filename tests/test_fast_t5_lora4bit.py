"""sumtune.fast_t5.lora4bit: the fused LoRA-on-NF4 layer against PEFT's own forward, on real bnb + PEFT layers.

In float32 both compute the same sums in a different order, so they agree to float rounding; the bf16 model-level
comparison with stock T5 is in test_fast_t5.py (enable_fast_t5 fuses the LoRA layers too).
"""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
bnb = pytest.importorskip("bitsandbytes")
pytest.importorskip("peft")

from sumtune.fast_t5 import cache_dequantized_weights, uncache_dequantized_weights  # noqa: E402
from sumtune.fast_t5 import lora4bit  # noqa: E402
from sumtune.fast_t5.lora4bit import FusedLora4bit, fuse_lora_4bit, unfuse_lora_4bit  # noqa: E402
from sumtune.modeling import keep_4bit_layout  # noqa: E402

IN, OUT, RANK = 48, 40, 4


class TwoLayers(torch.nn.Module):
    """Two NF4 linears in a row, so the second one's input gradient flows through the first one's output."""

    def __init__(self, compute_dtype: torch.dtype, device: str, widths: tuple[int, int] = (IN, OUT)):
        super().__init__()
        self.first = self._nf4(widths[0], widths[1], compute_dtype, device)
        self.second = self._nf4(widths[1], widths[0], compute_dtype, device)

    @staticmethod
    def _nf4(n_in: int, n_out: int, compute_dtype: torch.dtype, device: str) -> torch.nn.Module:
        layer = bnb.nn.Linear4bit(n_in, n_out, bias=False, compute_dtype=compute_dtype, quant_type="nf4")
        layer.weight = bnb.nn.Params4bit(torch.randn(n_out, n_in) * 0.1, requires_grad=False, quant_type="nf4")
        return layer.to(device)  # moving a Params4bit quantizes it

    def forward(self, x):
        return self.second(torch.relu(self.first(x)))


def lora_model(dropout: float, compute_dtype: torch.dtype = torch.float32, seed: int = 0, device: str = "cpu",
               widths: tuple[int, int] = (IN, OUT)):
    torch.manual_seed(seed)
    return with_lora(TwoLayers(compute_dtype, device, widths), dropout, ["first", "second"])


def with_lora(base: torch.nn.Module, dropout: float, targets: list[str]):
    """PEFT LoRA (r=RANK) on ``targets`` of a model of NF4 linears, with random B, in training mode."""
    from peft import LoraConfig, get_peft_model

    keep_4bit_layout(base)
    base.is_loaded_in_4bit = True  # what PEFT reads to dispatch its bnb LoRA layer (as sumtune's loader sets)
    model = get_peft_model(base, LoraConfig(r=RANK, lora_alpha=8, lora_dropout=dropout, target_modules=targets))
    with torch.no_grad():  # B starts at zero in PEFT; random B makes every gradient non-trivial
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.1)
    return model.train()


def lora_layers(model):
    from peft.tuners.lora.bnb import Linear4bit

    return [m for m in model.modules() if isinstance(m, Linear4bit)]


def output_and_grads(model, x: torch.Tensor, seed: int = 7):
    """Output, input gradient and every LoRA gradient of one forward/backward (dropout drawn from `seed`)."""
    model.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_(True)
    torch.manual_seed(seed)
    out = model(x)
    (out.float() ** 2).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return out.detach(), x.grad.clone(), grads


def assert_close(expected, got, rtol: float, lora_grads: int = 4):
    (out_e, gx_e, grads_e), (out_g, gx_g, grads_g) = expected, got
    torch.testing.assert_close(out_g, out_e, rtol=rtol, atol=rtol * float(out_e.abs().max()))
    torch.testing.assert_close(gx_g, gx_e, rtol=rtol, atol=rtol * float(gx_e.abs().max()))
    assert grads_g.keys() == grads_e.keys() and len(grads_e) == lora_grads
    for name, grad in grads_e.items():
        torch.testing.assert_close(grads_g[name], grad, rtol=rtol, atol=rtol * float(grad.abs().max()), msg=name)


def relative_error(result, reference) -> float:
    """Largest relative L2 error over output, input gradient and LoRA gradients."""
    return max(float((a.float() - b.float()).norm() / b.float().norm())
               for a, b in zip([result[0], result[1], *result[2].values()],
                               [reference[0], reference[1], *reference[2].values()]))


def test_fused_layer_matches_peft_in_float32_without_dropout():
    model = lora_model(dropout=0.0)
    x = torch.randn(2, 5, IN)
    expected = output_and_grads(model, x)
    calls = []
    real_apply = FusedLora4bit.apply
    FusedLora4bit.apply = lambda *args: calls.append(1) or real_apply(*args)
    try:
        assert fuse_lora_4bit(model) == 2
        got = output_and_grads(model, x)
    finally:
        FusedLora4bit.apply = real_apply
        unfuse_lora_4bit(model)
    assert len(calls) == 2, "the fused layer did not run"
    assert_close(expected, got, rtol=1e-5)
    assert not any("forward" in vars(m) for m in lora_layers(model))


def test_compiled_models_run_the_fused_node_eagerly_between_graphs_and_train_the_same():
    """Traced by dynamo the node lost its LoRA gradients on CUDA (lora4bit.py says where), so it is kept out of
    compiled graphs: each fused layer is a graph break, and the compiled model's gradients are the eager ones."""
    model = lora_model(dropout=0.0)
    fuse_lora_4bit(model)
    x = torch.randn(2, 5, IN)
    expected = output_and_grads(model, x)
    torch._dynamo.reset()
    try:
        explained = torch._dynamo.explain(model)(x)
        assert any("torch.compiler.disable" in r.reason for r in explained.break_reasons), explained.break_reasons
        model.compile(backend="aot_eager")  # in place, as sumtune compiles T5 blocks
        got = output_and_grads(model, x)
    finally:
        torch._dynamo.reset()
        unfuse_lora_4bit(model)
    assert_close(expected, got, rtol=1e-5)


def test_fused_layer_with_dropout_matches_the_same_masks_applied_by_hand():
    """PEFT's CPU dropout draws its mask differently from `native_dropout` (the CUDA kernel both use), so the
    reference is PEFT's layer with its dropout module replaced by `native_dropout` under the same seed."""

    class NativeDropout(torch.nn.Module):
        def __init__(self, p: float):
            super().__init__()
            self.p = p

        def forward(self, x):
            return torch.native_dropout(x, self.p, True)[0]

    model = lora_model(dropout=0.25)
    x = torch.randn(3, 4, IN)
    fuse_lora_4bit(model)
    got = output_and_grads(model, x)
    unfuse_lora_4bit(model)
    for layer in lora_layers(model):
        layer.lora_dropout["default"] = NativeDropout(0.25)
    expected = output_and_grads(model, x)
    assert_close(expected, got, rtol=1e-5)
    no_dropout = output_and_grads(lora_model(dropout=0.0), x)
    assert not torch.allclose(got[0], no_dropout[0]), "dropout had no effect"


def test_the_wide_side_is_the_one_at_least_twice_the_other():
    assert lora4bit.wide_side(1024, 16384) == lora4bit.wide_side(1024, 2048) == "out"  # T5-3b wi; q/k/v are 4x
    assert lora4bit.wide_side(16384, 1024) == lora4bit.wide_side(4096, 1024) == "in"  # wo, o
    assert lora4bit.wide_side(1024, 2047) is None and lora4bit.wide_side(IN, OUT) is None


WIDE = (16, 64)  # the first layer's output and the second layer's input are the wide sides


@pytest.mark.parametrize("dropout", [0.0, 0.25])
def test_lora_in_base_gemm_trains_as_the_plain_fused_node_in_float32(monkeypatch, dropout):
    """`concat_gemms` computes the same sums through concatenated GEMMs: output, input gradient and every LoRA
    gradient agree with the plain fused node (same dropout masks: both draw them with native_dropout) and, without
    dropout, with PEFT's own layers; the spy shows both wide sides took the concatenated route."""
    x = torch.randn(2, 5, WIDE[0])
    model = lora_model(dropout=dropout, widths=WIDE)
    peft = output_and_grads(model, x)
    fuse_lora_4bit(model)
    plain = output_and_grads(model, x)
    unfuse_lora_4bit(model)
    sides = []
    real = lora4bit.wide_side
    monkeypatch.setattr(lora4bit, "wide_side", lambda n_in, n_out: sides.append(real(n_in, n_out)) or sides[-1])
    fuse_lora_4bit(model, concat_gemms=True)
    concat = output_and_grads(model, x)
    unfuse_lora_4bit(model)
    assert sides == ["out", "in"]
    assert_close(plain, concat, rtol=1e-5)
    if dropout == 0.0:
        assert_close(peft, concat, rtol=1e-5)


def test_lora_in_base_gemm_under_bf16_autocast_is_as_close_to_float32_as_peft_is():
    x = torch.randn(4, 6, WIDE[0])
    exact = output_and_grads(lora_model(dropout=0.0, compute_dtype=torch.float32, widths=WIDE), x)
    model = lora_model(dropout=0.0, compute_dtype=torch.bfloat16, widths=WIDE)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        peft = output_and_grads(model, x)
        fuse_lora_4bit(model, concat_gemms=True)
        concat = output_and_grads(model, x)
    unfuse_lora_4bit(model)
    assert relative_error(concat, exact) <= 1.1 * relative_error(peft, exact)


def test_eval_and_no_grad_take_peft_forward_unchanged():
    model = lora_model(dropout=0.25)
    x = torch.randn(2, 3, IN)
    model.eval()
    with torch.no_grad():
        expected = model(x)
        fuse_lora_4bit(model)
        got = model(x)
    unfuse_lora_4bit(model)
    assert torch.equal(got, expected)


def test_fused_layer_uses_the_dequantized_weight_cache():
    model = lora_model(dropout=0.0)
    x = torch.randn(2, 5, IN)
    expected = output_and_grads(model, x)
    fuse_lora_4bit(model)
    assert cache_dequantized_weights(model) > 0
    got = output_and_grads(model, x)
    uncache_dequantized_weights(model)
    unfuse_lora_4bit(model)
    assert_close(expected, got, rtol=1e-5)


def test_lora_in_base_gemm_with_the_cache_keeps_w_beside_the_low_rank_weight():
    """With the weight cache, `concat_gemms` keeps W in one buffer beside the low-rank weight's r columns (rows) and
    the cache becomes a view of it: no per-call copy of W. Two updates of the LoRA weights later it still computes
    what PEFT does (the low-rank part is written in afresh each call); uncaching drops the buffer."""
    from sumtune.fast_t5.extras import _CACHE_ATTR, _JOINED_ATTR

    x = torch.randn(2, 5, WIDE[0])
    model = lora_model(dropout=0.0, widths=WIDE)
    fuse_lora_4bit(model, concat_gemms=True)
    cache_dequantized_weights(model)
    bases = [layer.get_base_layer() for layer in lora_layers(model)]
    for _ in range(2):
        got = output_and_grads(model, x)
        for base in bases:  # built at the first call, with the cache a view of it
            joined, cached = getattr(base, _JOINED_ATTR), getattr(base, _CACHE_ATTR)
            assert joined.data_ptr() == cached.data_ptr() and joined.numel() == cached.numel() + RANK * 64
        unfuse_lora_4bit(model)
        expected = output_and_grads(model, x)  # PEFT's layers (through the cached base forward)
        assert_close(expected, got, rtol=1e-5)
        fuse_lora_4bit(model, concat_gemms=True)
        with torch.no_grad():  # a training update: the next call must see the new A and B
            for param in model.parameters():
                if param.requires_grad:
                    param.add_(torch.randn_like(param) * 0.1)
    assert [getattr(base, _JOINED_ATTR).shape for base in bases] == [(64, 16 + RANK), (16 + RANK, 64)]
    uncache_dequantized_weights(model)
    unfuse_lora_4bit(model)
    assert not any(hasattr(base, _JOINED_ATTR) or hasattr(base, _CACHE_ATTR) for base in bases)


def test_bf16_autocast_is_as_close_to_float32_as_peft_is():
    """Under bf16 autocast the fused layer rounds once per GEMM where PEFT rounds after each step: against the
    float32 result it must be no further off than PEFT's own bf16 forward (with 10% slack)."""
    x = torch.randn(4, 6, IN)
    exact = output_and_grads(lora_model(dropout=0.0, compute_dtype=torch.float32), x)
    model = lora_model(dropout=0.0, compute_dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        peft = output_and_grads(model, x)
        fuse_lora_4bit(model)
        fused = output_and_grads(model, x)
    unfuse_lora_4bit(model)
    assert relative_error(fused, exact) <= 1.1 * relative_error(peft, exact)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("widths, dropout, concat", [((IN, OUT), 0.1, False), (WIDE, 0.1, True), (WIDE, 0.0, True)])
def test_fused_layer_matches_peft_with_its_own_dropout_on_gpu(widths, dropout, concat):
    """On CUDA, PEFT's nn.Dropout runs the same fused dropout kernel (`native_dropout`) as the fused layer, so
    with the same seed both draw the same masks: float32 results agree to rounding, dropout included (also with
    the LoRA term inside the base GEMM, `concat_gemms`)."""
    model = lora_model(dropout=dropout, device="cuda", widths=widths)
    x = torch.randn(4, 64, widths[0], device="cuda")
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        expected = output_and_grads(model, x)
        fuse_lora_4bit(model, concat_gemms=concat)
        got = output_and_grads(model, x)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
        unfuse_lora_4bit(model)
    assert_close(expected, got, rtol=1e-4)
