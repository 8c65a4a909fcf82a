"""Model loading and quantization: real bitsandbytes layers, T5's `wo` in NF4 for bf16, hub path on a local dir."""

from __future__ import annotations

from dataclasses import replace

import bitsandbytes as bnb
import pytest
import torch
from transformers import T5ForConditionalGeneration

from sumtune.config import TrainConfig
from sumtune.errors import SumtuneError
from sumtune.lora import apply_lora, linear_layer_names
from sumtune.memory import measured_footprint_bytes, memory_report
from sumtune.modeling import load_model, t5_config

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def local_t5(tmp_path_factory):
    path = tmp_path_factory.mktemp("t5") / "model"
    torch.manual_seed(0)
    T5ForConditionalGeneration(t5_config("tiny", vocab_size=300)).save_pretrained(path)
    return path


def layers(model, cls):
    return {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, cls)}


@pytest.mark.parametrize("quantization, cls", [("nf4", bnb.nn.Linear4bit), ("fp4", bnb.nn.Linear4bit),
                                               ("int8", bnb.nn.Linear8bitLt)])
def test_local_directory_loads_quantized_with_wo_quantized_in_bf16(local_t5, quantization, cls):
    model = load_model(TrainConfig(model=str(local_t5), quantization=quantization), 300, CPU)
    assert layers(model, cls) == {"q", "k", "v", "o", "wi", "wo"}
    assert type(model.lm_head) is torch.nn.Linear  # tied to the embeddings: never quantized
    assert not any(p.requires_grad for p in model.parameters())


def test_fp16_compute_keeps_wo_unquantized_in_fp32(local_t5):
    model = load_model(TrainConfig(model=str(local_t5), compute_dtype="fp16"), 300, CPU)
    wo = model.encoder.block[0].layer[1].DenseReluDense.wo
    assert type(wo) is torch.nn.Linear and wo.weight.dtype == torch.float32
    assert "wo" not in layers(model, bnb.nn.Linear4bit)


def test_quantized_wo_runs_the_ffn_in_the_compute_dtype(local_t5):
    """transformers' T5 FFN casts to wo.weight.dtype (uint8 storage for 4-bit): sumtune must not let it."""
    q = load_model(TrainConfig(model=str(local_t5), compute_dtype="fp32"), 300, CPU)
    plain = load_model(TrainConfig(model=str(local_t5), compute_dtype="fp32", quantization="none"), 300, CPU)
    ids = torch.randint(2, 300, (2, 9))
    with torch.no_grad():
        lq = q(input_ids=ids, labels=ids).loss
        lp = plain(input_ids=ids, labels=ids).loss
    assert abs(float(lq - lp)) < 0.05 * float(lp)  # NF4 noise, not truncated activations


def test_training_after_an_eval_forward_keeps_every_gradient(local_t5):
    """bnb repacks 4-bit weights on an eval forward on AVX512-BF16 CPUs, and training on the packed layout
    loses the gradient; sumtune's loader turns the repacking off (on other CPUs this checks the same result)."""
    model = apply_lora(load_model(TrainConfig(model=str(local_t5), compute_dtype="fp32"), 300, CPU),
                       TrainConfig(model=str(local_t5), lora_targets=["q", "v", "o"], lora_dropout=0.0))
    assert all(not m.support_avx512bf16_for_cpu for m in model.modules() if isinstance(m, bnb.nn.Linear4bit))
    ids = torch.randint(2, 300, (2, 9))

    def lora_grads():
        model.train()
        model.zero_grad(set_to_none=True)
        model(input_ids=ids, labels=ids).loss.backward()
        # lora_B: PEFT starts B at zero, so lora_A gradients are zero anyway; B's carry what flows back
        return {n: p.grad for n, p in model.named_parameters() if p.requires_grad and "lora_B" in n}

    before = lora_grads()
    model.eval()
    with torch.no_grad():
        model(input_ids=ids, labels=ids)
    after = lora_grads()
    assert before and all(g is not None and g.abs().sum() > 0 for g in before.values())
    assert all(after[n] is not None and torch.allclose(after[n], before[n]) for n in before)


def test_dequantize_reads_the_bnb_cpu_packed_layout():
    """A weight bnb repacked for its CPU kernel (any CPU can hold that layout) dequantizes to the same matrix."""
    from bitsandbytes.functional import _convert_weight_packed_for_cpu

    from sumtune.fast_t5.extras import dequantize_4bit_weight

    torch.manual_seed(0)
    dense = torch.randn(96, 128)
    layer = bnb.nn.Linear4bit(128, 96, bias=False, compute_dtype=torch.bfloat16, quant_type="nf4")
    layer.weight = bnb.nn.Params4bit(dense, requires_grad=False, quant_type="nf4", compress_statistics=True)
    layer = layer.to(CPU)
    standard = dequantize_4bit_weight(layer, torch.float32)
    assert (standard - dense).abs().max() < 0.2 * dense.abs().max()  # NF4 rounding, not garbage
    layer.weight.data, layer.weight.quant_state = _convert_weight_packed_for_cpu(layer.weight.data,
                                                                                 layer.weight.quant_state)
    packed = dequantize_4bit_weight(layer, torch.float32)
    assert packed.shape == standard.shape
    assert (packed - standard).abs().max() <= 1e-2 * standard.abs().max()  # absmax rounded to bf16 when packed


def test_model_dropout_sets_every_base_dropout_and_none_keeps_the_models(local_t5):
    def rates(model):
        attention = {m.dropout for m in model.modules() if hasattr(m, "has_relative_attention_bias")}
        return {m.p for m in model.modules() if isinstance(m, torch.nn.Dropout)} | attention

    kept = load_model(TrainConfig(model=str(local_t5)), 300, CPU)
    assert rates(kept) == {kept.config.dropout_rate}
    released_like = local_t5.parent / "dropout-0.1"  # as released T5 checkpoints: None must keep 0.1, not zero it
    T5ForConditionalGeneration(t5_config("tiny", vocab_size=300, dropout_rate=0.1)).save_pretrained(released_like)
    kept = load_model(TrainConfig(model=str(released_like)), 300, CPU)
    assert rates(kept) == {0.1} and kept.config.dropout_rate == 0.1
    off = load_model(TrainConfig(model=str(local_t5), model_dropout=0.0), 300, CPU)
    assert rates(off) == {0.0} and off.config.dropout_rate == 0.0
    raised = load_model(TrainConfig(model="tiny", model_dropout=0.2), 300, CPU)
    assert rates(raised) == {0.2}
    with pytest.raises(SumtuneError, match="model_dropout"):
        TrainConfig(model_dropout=1.0)


def test_random_models_are_quantized_in_place_like_loaded_ones():
    model = load_model(TrainConfig(model="tiny", quantization="nf4"), 300, CPU)
    assert layers(model, bnb.nn.Linear4bit) == {"q", "k", "v", "o", "wi", "wo"}


def test_missing_model_dir_and_dir_without_weights_are_refused(tmp_path):
    with pytest.raises(SumtuneError, match="does not exist"):
        load_model(TrainConfig(model=str(tmp_path / "nope")), 300, CPU)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "config.json").write_text("{}")
    with pytest.raises(SumtuneError, match="has no weights"):
        load_model(TrainConfig(model=str(tmp_path / "empty")), 300, CPU)


def test_hub_id_offline_is_one_clear_sentence():
    with pytest.raises(SumtuneError, match="hub is switched off"):
        load_model(TrainConfig(model="google-t5/t5-small"), 300, CPU)


def test_lora_targets_all_linear_and_names_and_unknown_names(local_t5):
    base = load_model(TrainConfig(model=str(local_t5)), 300, CPU)
    assert linear_layer_names(base) == ["k", "lm_head", "o", "q", "v", "wi", "wo"]
    with pytest.raises(SumtuneError, match="'qkv'.*linear layers are: k, lm_head, o, q, v, wi, wo"):
        apply_lora(base, TrainConfig(lora_targets=["qkv"]))
    peft_model = apply_lora(base, TrainConfig(lora_targets=["all-linear"], lora_r=4))
    adapted = {n.split(".lora_A")[0].rsplit(".", 1)[-1] for n, _ in peft_model.named_parameters() if "lora_A" in n}
    assert adapted == {"q", "k", "v", "o", "wi", "wo"}


def test_memory_report_for_t5_3b_from_shapes_alone():
    report = memory_report(TrainConfig(model="t5-3b", lora_r=32, lora_alpha=16, lora_targets=["v", "o"],
                                       modules_to_save=["lm_head"]))
    assert round(report.fp32_bytes / 1e9, 1) == 11.4            # the reference's fp32 figure
    assert 56.0e6 < report.trainable_params < 57.0e6            # the reference's 56.5M trainable ...
    assert round(report.trainable_pct, 2) == 1.94               # ... and 1.94%
    assert 4.0e9 < report.transformers_default_bytes < 4.6e9     # ~4.29 GB with T5's wo kept unquantized
    assert report.quantized_bytes / 2**30 <= 1.6                 # every linear layer in NF4


def test_memory_report_matches_a_really_quantized_model():
    cfg = TrainConfig(model="tiny", lora_targets=["v", "o"], lora_r=4)
    report = memory_report(cfg)
    real = load_model(replace(cfg, model="tiny"), 32128, CPU)
    # Measured 2 KiB apart (0.02%); leaving out the 4-bit layers' quantization constants would be 0.6%.
    assert abs(report.quantized_bytes - measured_footprint_bytes(real)) <= 0.001 * report.quantized_bytes


def test_model_source_decides_what_a_model_name_is(tmp_path):
    from sumtune.modeling import model_source

    tiny, random_3b = model_source("tiny"), model_source("random:t5-3b")
    assert (tiny.kind, tiny.shape, tiny.random, tiny.saved_in_run, tiny.full_vocab) == ("tiny", "tiny", True, True, False)
    assert (random_3b.kind, random_3b.shape, random_3b.saved_in_run, random_3b.full_vocab) == ("random", "t5-3b", False, True)
    assert random_3b.vocab_size(300) == 32128 and tiny.vocab_size(300) == 300
    hub = model_source("google-t5/t5-base")
    assert (hub.kind, hub.shape, hub.hub_id, hub.random) == ("hub", "t5-base", "google-t5/t5-base", False)
    local = model_source(str(tmp_path))
    assert local.kind == "local" and local.hub_id is None and model_source("./models/t5").kind == "local"
    with pytest.raises(SumtuneError, match="Unknown random model"):
        model_source("random:t5-huge")
