"""sumtune.flops against counts made here from the architecture, independently of the code.

Linear FLOPs are summed over the real module tree (a T5 built on the meta device: every nn.Linear, times the
tokens that pass through it); attention FLOPs are written out by hand per attention kind. Dropping or doubling
any term (a layer kind, the head, cross-attention, the causal triangle, the backward factors) fails a test.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from sumtune import flops
from sumtune.modeling import t5_config

LENGTHS = [(1024, 128), (4096, 512)]


def meta_t5(name: str):
    from transformers import T5ForConditionalGeneration

    with torch.device("meta"):
        return T5ForConditionalGeneration(t5_config(name))


def linear_flops_from_modules(model, src_len: int, tgt_len: int) -> int:
    """2·in·out per token for every nn.Linear: encoder layers and cross-attention k/v see the source tokens,
    every other decoder layer and the output head the target tokens."""
    total = 0
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        sees_source = name.startswith("encoder.") or (".EncDecAttention." in name and name[-1] in "kv")
        total += 2 * module.in_features * module.out_features * (src_len if sees_source else tgt_len)
    return total


def attention_flops_by_hand(layers: int, heads: int, d_kv: int, src_len: int, tgt_len: int) -> int:
    """QKᵀ and PV: 2 products × 2 FLOPs per multiply-add × d_kv per (query, key) pair and head."""
    per_pair = 2 * 2 * heads * d_kv
    encoder = layers * per_pair * src_len * src_len
    decoder_self = layers * per_pair * (tgt_len * (tgt_len + 1) // 2)  # causal: token t sees keys 0..t
    cross = layers * per_pair * tgt_len * src_len
    return encoder + decoder_self + cross


@pytest.mark.parametrize("src_len,tgt_len", LENGTHS)
def test_t5_small_forward_matches_hand_count(src_len, tgt_len):
    fwd = flops.t5_forward_flops(t5_config("t5-small"), src_len, tgt_len)
    # T5-small: d_model 512, d_ff 2048 (relu), 8 heads of 64, 6 + 6 layers, vocab 32128.
    d, ff, inner, n, vocab = 512, 2048, 512, 6, 32128
    per_token_encoder_layer = 4 * 2 * d * inner + 2 * 2 * d * ff              # q k v o + wi wo
    per_token_decoder_layer = 4 * 2 * d * inner + 2 * 2 * d * inner + 2 * 2 * d * ff  # self qkvo, cross q o, FFN
    linear = (n * src_len * per_token_encoder_layer + n * tgt_len * per_token_decoder_layer
              + n * src_len * 2 * 2 * d * inner                              # cross k v on the source
              + tgt_len * 2 * d * vocab)                                      # lm_head
    assert fwd.linear == linear
    assert fwd.linear == linear_flops_from_modules(meta_t5("t5-small"), src_len, tgt_len)
    assert fwd.attention == attention_flops_by_hand(6, 8, 64, src_len, tgt_len)


@pytest.mark.parametrize("src_len,tgt_len", LENGTHS)
def test_t5_3b_forward_matches_hand_count(src_len, tgt_len):
    fwd = flops.t5_forward_flops(t5_config("t5-3b"), src_len, tgt_len)
    assert fwd.linear == linear_flops_from_modules(meta_t5("t5-3b"), src_len, tgt_len)
    assert fwd.attention == attention_flops_by_hand(24, 32, 128, src_len, tgt_len)


def test_t5_3b_figures_written_out():
    """The same counts as plain numbers, for a reader checking MFU by hand (T5-3b, per sample)."""
    fwd = flops.t5_forward_flops(t5_config("t5-3b"), 4096, 512)
    # 24 layers × 4 FLOPs (2 products, multiply-add) × 4096 (32 heads × 128) per (query, key) pair; pairs:
    # encoder 4096², decoder self 512·513/2 = 131,328, cross 512·4096
    assert fwd.attention == 24 * 4 * 4096 * (4096 * 4096 + 131_328 + 512 * 4096) == 7_473_343_758_336
    # encoder 24·4096·(33,554,432 + 67,108,864) + decoder 24·512·(33,554,432 + 16,777,216 + 67,108,864)
    # + cross k, v 24·4096·16,777,216 + lm_head 512·2·1024·32128
    assert fwd.linear == 9_895_604_649_984 + 1_443_109_011_456 + 1_649_267_441_664 + 33_688_649_728
    fwd_1k = flops.t5_forward_flops(t5_config("t5-3b"), 1024, 128)
    assert fwd_1k.attention == 24 * 4 * 4096 * (1024 * 1024 + 8_256 + 128 * 1024)


def test_attention_share_grows_with_length():
    """At 4096/512 attention is a large part of T5-3b's step; leaving it out would understate MFU badly."""
    config = t5_config("t5-3b")
    short, long = flops.t5_forward_flops(config, 1024, 128), flops.t5_forward_flops(config, 4096, 512)
    assert short.attention / short.total < 0.2 < long.attention / long.total


@pytest.mark.parametrize("src_len,tgt_len", LENGTHS)
def test_training_counts_backward_of_attention_twice_and_of_linears_once(src_len, tgt_len):
    config = t5_config("t5-3b")
    fwd = flops.t5_forward_flops(config, src_len, tgt_len)
    lora_params = 7_077_888
    lora_forward = 2 * lora_params * (src_len + tgt_len) / 2
    expected = 2 * fwd.linear + 3 * fwd.attention + 3 * lora_forward
    assert flops.train_flops_per_sample(config, src_len, tgt_len, lora_params=lora_params) == expected
    recompute = flops.train_flops_per_sample(config, src_len, tgt_len, lora_params=lora_params, recompute=True)
    assert recompute == expected + fwd.linear + fwd.attention


def test_gated_feed_forward_counts_both_input_projections():
    relu = flops.t5_forward_flops(t5_config("t5-base"), 1024, 128)
    gated_config = t5_config("t5-base", feed_forward_proj="gated-gelu")
    gated = flops.t5_forward_flops(gated_config, 1024, 128)
    # one more d_model × d_ff matrix per layer: 12 encoder layers on the source, 12 decoder layers on the target
    assert gated.linear - relu.linear == 2 * 768 * 3072 * (12 * 1024 + 12 * 128)
    from transformers import T5ForConditionalGeneration

    with torch.device("meta"):
        model = T5ForConditionalGeneration(gated_config)
    assert gated.linear == linear_flops_from_modules(model, 1024, 128)


def test_mfu_figures_say_attention_is_counted():
    assert flops.ATTENTION_COUNTED and "attention counted" in flops.FLOPS_COUNTED
    assert flops.mfu(1e15, 2.0, 1000.0) == 0.5
    assert flops.mfu(1e15, 2.0, None) is None


def test_the_mfu_basis_line_names_both_divisors_and_only_those_known():
    both = flops.mfu_basis("NVIDIA H200", 989.0, 786.4)
    assert both == ("sumtune: MFU counts the step's matrix products (attention included; see sumtune.flops) against "
                    "the datasheet bf16 peak of the NVIDIA H200 (989 TFLOP/s); in brackets, the bf16 matmul rate "
                    "measured on it now (786 TFLOP/s).")
    assert "measured" not in flops.mfu_basis("NVIDIA H200", 989.0, None)
    only_measured = flops.mfu_basis("Some New GPU", None, 500.0)
    assert "datasheet" not in only_measured and "in brackets" not in only_measured and "(500 TFLOP/s)" in only_measured
    assert flops.mfu_basis(None, None, None) is None  # CPU: no MFU figure, so no line about one


def test_the_matmul_rate_is_not_made_up_off_cuda():
    assert flops.measure_bf16_matmul_tflops(torch.device("cpu")) is None


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_the_measured_matmul_rate_is_a_plausible_share_of_the_datasheet_peak():
    """The second MFU divisor is a real measurement: above 30% of the datasheet (any GEMM this size gets there) and
    not above it (a rate past the datasheet would mean a timing bug)."""
    device = torch.device("cuda")
    measured = flops.measure_bf16_matmul_tflops(device, size=4096, iters=10)
    peak = flops.peak_tflops(device)
    assert measured is not None and measured > 0
    if peak:
        assert 0.3 * peak < measured <= 1.05 * peak
