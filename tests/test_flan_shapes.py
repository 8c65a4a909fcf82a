"""FLAN-T5 shapes (`random:flan-t5-base|large|xl`): the published configs, their parameter counts and memory,
and a tiny model of the same architecture (gated-GELU feed-forward, untied output head) training in NF4 + LoRA
on the fast path as it does on the stock transformers path."""

from __future__ import annotations

import pytest
import torch

from sumtune import cli
from sumtune.config import TrainConfig
from sumtune.memory import memory_report
from sumtune.modeling import T5_SHAPES, build_random_model, has_untied_head, t5_config

# google/flan-t5-{base,large,xl} config.json as published: (d_model, d_ff, d_kv, num_heads, num_layers), and the
# parameter counts transformers reports for those checkpoints (the untied lm_head included).
PUBLISHED = {
    "flan-t5-base": ((768, 2048, 64, 12, 12), 247_577_856),
    "flan-t5-large": ((1024, 2816, 64, 16, 24), 783_150_080),
    "flan-t5-xl": ((2048, 5120, 64, 32, 24), 2_849_757_184),
}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_config_is_the_published_one(name):
    config = t5_config(name)
    (d_model, d_ff, d_kv, heads, layers), _ = PUBLISHED[name]
    assert (config.d_model, config.d_ff, config.d_kv, config.num_heads) == (d_model, d_ff, d_kv, heads)
    assert config.num_layers == config.num_decoder_layers == layers
    assert config.vocab_size == 32128
    assert config.feed_forward_proj == "gated-gelu" and config.is_gated_act and config.dense_act_fn == "gelu_new"
    assert config.relative_attention_num_buckets == 32 and config.relative_attention_max_distance == 128
    assert config.layer_norm_epsilon == 1e-6 and config.dropout_rate == 0.1
    assert has_untied_head(config)  # tie_word_embeddings: false (T5 v1.1 neither ties nor scales the output)


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_memory_report_counts_the_published_parameters(name):
    report = memory_report(TrainConfig(model=f"random:{name}", lora_targets=["q", "v"], lora_r=8))
    base_params = report.total_params - report.trainable_params
    assert base_params == PUBLISHED[name][1]
    d_model, _, d_kv, heads, layers = PUBLISHED[name][0]
    assert report.trainable_params == 2 * 3 * layers * 2 * 8 * (d_model + heads * d_kv) // 2  # q, v: A and B
    # the untied head (32128 × d_model, kept in the compute dtype) is part of the quantized footprint
    assert report.quantized_bytes > 2 * 32128 * d_model * 2


def test_memory_command_on_flan_t5_xl(capsys):
    assert cli.main(["memory", "--model", "random:flan-t5-xl"]) == 0
    out = capsys.readouterr().out
    rows = dict(line.split("  ", 1) for line in out.splitlines())
    total = int(rows["total parameters (base + adapters)"].strip().replace(",", ""))
    trainable = int(rows["trainable parameters"].split()[0].replace(",", ""))
    assert rows["model"].strip() == "random:flan-t5-xl" and total - trainable == 2_849_757_184
    assert "GiB" in rows["quantized, sumtune"]


def test_flan_shapes_sit_beside_the_t5_shapes():
    assert {"t5-small", "t5-3b", "flan-t5-base", "flan-t5-large", "flan-t5-xl"} <= set(T5_SHAPES)
    assert not has_untied_head(t5_config("t5-3b")) and not t5_config("t5-3b").is_gated_act


# ----------------------------------------------------------------------------- a tiny FLAN-shaped model
TINY_FLAN = dict(vocab_size=512, d_model=64, d_ff=96, d_kv=16, num_heads=4, num_layers=2, dropout_rate=0.0)


def tiny_flan_qlora(tmp_path, seed: int = 0):
    """A tiny model of the FLAN-T5 architecture saved as a checkpoint (its head a tensor of its own, as in the
    released FLAN-T5 files), loaded by sumtune's loader in NF4 with LoRA on every linear layer; LoRA B gets small
    random values, as after some training."""
    from transformers import T5ForConditionalGeneration

    from sumtune.lora import apply_lora
    from sumtune.modeling import load_model, untie_head_if_untied

    torch.manual_seed(seed)
    path = tmp_path / f"tiny-flan-{seed}"
    untie_head_if_untied(T5ForConditionalGeneration(t5_config("flan-t5-base", **TINY_FLAN))).save_pretrained(path)
    cfg = TrainConfig(model=str(path), compute_dtype="bf16", lora_r=8, lora_alpha=16, lora_dropout=0.0, seed=seed)
    model = apply_lora(load_model(cfg, TINY_FLAN["vocab_size"], torch.device("cpu")), cfg)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.02)
    return model.train()


def test_tiny_flan_model_is_gated_and_untied_in_nf4(tmp_path):
    import bitsandbytes as bnb

    model = tiny_flan_qlora(tmp_path)
    t5 = model.base_model.model
    ffn = t5.encoder.block[0].layer[1].DenseReluDense
    assert isinstance(ffn.wi_0.base_layer, bnb.nn.Linear4bit) and isinstance(ffn.wi_1.base_layer, bnb.nn.Linear4bit)
    assert t5.lm_head.weight.data_ptr() != t5.shared.weight.data_ptr()


def test_tiny_flan_fast_path_matches_stock_with_nf4_and_lora(tmp_path):
    from test_fast_t5 import GRAD_RTOL, LOSS_RTOL, loss_and_lora_grads, padded_batch

    from sumtune.fast_t5 import disable_fast_t5, enable_fast_t5
    from sumtune.fast_t5.numerics import relative_errors

    model = tiny_flan_qlora(tmp_path)
    batch = padded_batch(3, 24, 10, TINY_FLAN["vocab_size"])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        stock_loss, stock_grads = loss_and_lora_grads(model, batch)
        enable_fast_t5(model)
        loss, grads = loss_and_lora_grads(model, batch)
    disable_fast_t5(model)
    assert torch.isfinite(loss)
    assert abs(float(loss - stock_loss)) <= LOSS_RTOL * abs(float(stock_loss))
    errors = relative_errors(grads, stock_grads)
    # LoRA A and B on every linear: 7 per encoder block (q k v o wi_0 wi_1 wo), 11 per decoder block
    assert len(errors) == 2 * (7 * 2 + 11 * 2)
    worst = max(errors, key=errors.get)
    assert errors[worst] <= GRAD_RTOL, f"{worst}: {errors[worst]:.4f}"


def test_tiny_flan_model_trains_on_the_fast_path(tmp_path):
    """A few optimizer steps on one batch with NF4 + LoRA and the fast kernels: the loss falls."""
    from test_fast_t5 import padded_batch

    from sumtune.fast_t5 import enable_fast_t5

    model = enable_fast_t5(tiny_flan_qlora(tmp_path, seed=1))
    batch = padded_batch(3, 24, 10, TINY_FLAN["vocab_size"], seed=2)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    losses = []
    for _ in range(6):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < 0.9 * losses[0], losses


def test_random_flan_model_builds_untied_and_quantized():
    """`random:flan-t5-base` through sumtune's loader: the head untied and unquantized, the rest in NF4."""
    import bitsandbytes as bnb

    model = build_random_model(TrainConfig(model="random:flan-t5-base", compute_dtype="bf16"), 100,
                               torch.device("cpu"))
    assert type(model.lm_head) is torch.nn.Linear
    assert model.lm_head.weight.data_ptr() != model.shared.weight.data_ptr()
    assert isinstance(model.decoder.block[0].layer[2].DenseReluDense.wi_1, bnb.nn.Linear4bit)
