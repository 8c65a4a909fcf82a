"""The q/k/v LoRA group node (sumtune.fast_t5.lora_group) against PEFT's layers and the single fused nodes, with
real bitsandbytes NF4 layers and real PEFT on the CPU."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
bnb = pytest.importorskip("bitsandbytes")

from sumtune.fast_t5 import cache_dequantized_weights, uncache_dequantized_weights  # noqa: E402
from sumtune.fast_t5 import lora_group  # noqa: E402
from sumtune.fast_t5.lora4bit import fuse_lora_4bit, unfuse_lora_4bit  # noqa: E402
from test_fast_t5_lora4bit import RANK, TwoLayers, output_and_grads, with_lora  # noqa: E402
from test_fast_t5_lora4bit import assert_close as assert_close_with  # noqa: E402

IN, OUT = 16, 64  # output >= 2x input: the wide-output route the group is for


class SharedInput(torch.nn.Module):
    """Three NF4 linears reading one input, as T5's q/k/v, mixed so each output gets its own gradient."""

    def __init__(self):
        super().__init__()
        self.q, self.k, self.v = (TwoLayers._nf4(IN, OUT, torch.float32, "cpu") for _ in range(3))

    def forward(self, x):
        q, k, v = lora_group.grouped_projections((self.q, self.k, self.v), x) or (self.q(x), self.k(x), self.v(x))
        return q * torch.sigmoid(k) + v


def group_model(seed: int = 0):
    torch.manual_seed(seed)
    return with_lora(SharedInput(), 0.0, ["q", "k", "v"])


def assert_close(expected, got, rtol=1e-5):
    assert_close_with(expected, got, rtol, lora_grads=6)


def test_group_node_matches_peft_and_the_single_nodes(monkeypatch):
    """Output, input gradient and all six LoRA gradients of the group equal PEFT's layers' and the single fused
    nodes'; a spy shows the group node ran (and that with GROUP_PROJECTIONS off it does not)."""
    x = torch.randn(2, 5, IN)
    model = group_model()
    peft = output_and_grads(model, x)
    fuse_lora_4bit(model, concat_gemms=True)
    calls = []
    real = lora_group.FusedLoraGroup4bit.apply
    monkeypatch.setattr(lora_group.FusedLoraGroup4bit, "apply", lambda *a: calls.append(1) or real(*a))
    monkeypatch.setattr(lora_group, "GROUP_PROJECTIONS", False)  # on by default: the single nodes only when off
    singles = output_and_grads(model, x)
    assert calls == []
    monkeypatch.setattr(lora_group, "GROUP_PROJECTIONS", True)
    grouped = output_and_grads(model, x)
    assert calls == [1]
    assert_close(peft, grouped)
    assert_close(singles, grouped)
    monkeypatch.setattr(lora_group, "GROUP_PROJECTIONS", False)
    output_and_grads(model, x)
    assert calls == [1]


def test_group_with_the_weight_cache_keeps_each_b_in_its_own_columns(monkeypatch):
    """With the dequantized-weight cache, each base's joined buffer holds W, zeros, its B in its group columns and
    zeros; after an update of every LoRA weight the group still computes what PEFT does."""
    from sumtune.fast_t5.extras import _JOINED_ATTR, _JOINED_LAYOUT_ATTR

    monkeypatch.setattr(lora_group, "GROUP_PROJECTIONS", True)
    x = torch.randn(3, 4, IN)
    model = group_model(seed=1)
    fuse_lora_4bit(model, concat_gemms=True)
    cache_dequantized_weights(model)
    for _ in range(2):
        got = output_and_grads(model, x)
        for index, name in enumerate("qkv"):
            base = getattr(model.base_model.model, name).get_base_layer()
            joined = getattr(base, _JOINED_ATTR)
            assert joined.shape == (OUT, IN + 3 * RANK)
            others = [c for c in range(IN, IN + 3 * RANK) if not IN + index * RANK <= c < IN + (index + 1) * RANK]
            assert joined[:, others].abs().sum() == 0
        unfuse_lora_4bit(model)
        expected = output_and_grads(model, x)
        assert_close(expected, got)
        fuse_lora_4bit(model, concat_gemms=True)
        with torch.no_grad():
            for param in model.parameters():
                if param.requires_grad:
                    param.add_(torch.randn_like(param) * 0.1)
    uncache_dequantized_weights(model)
    unfuse_lora_4bit(model)
    bases = [getattr(model.base_model.model, name).get_base_layer() for name in "qkv"]
    assert not any(hasattr(base, _JOINED_ATTR) or hasattr(base, _JOINED_LAYOUT_ATTR) for base in bases)


def test_group_declines_what_it_does_not_cover(monkeypatch):
    """Unfused layers, eval mode and LoRA dropout get None (the caller runs each layer)."""
    monkeypatch.setattr(lora_group, "GROUP_PROJECTIONS", True)
    x = torch.randn(2, 3, IN)
    model = group_model()
    layers = (model.base_model.model.q, model.base_model.model.k, model.base_model.model.v)
    assert lora_group.grouped_projections(layers, x) is None  # not fused
    fuse_lora_4bit(model, concat_gemms=True)
    assert lora_group.grouped_projections(layers, x) is not None
    model.eval()
    assert lora_group.grouped_projections(layers, x) is None
    model.train()
    layers[1].lora_dropout["default"] = torch.nn.Dropout(0.1)
    assert lora_group.grouped_projections(layers, x) is None


def test_t5_training_step_with_the_group_matches_it_without(monkeypatch):
    """The product's model (fast T5 path, fused LoRA with the LoRA term in the base GEMM, all-linear LoRA) on a tiny
    T5 widened so q/k/v's output is twice d_model: the group node runs for every self-attention's q/k/v and every
    cross-attention's k/v, and loss and every LoRA gradient equal those of the single nodes."""
    from sumtune import modeling
    from sumtune.batching import collate
    from sumtune.config import TrainConfig
    from sumtune.data import tokenize_rows
    from sumtune.demo_data import build_word_tokenizer, demo_records
    from sumtune.training import build_model

    monkeypatch.setitem(modeling.T5_SHAPES, "tiny", dict(modeling.T5_SHAPES["tiny"], d_kv=64))
    rows = demo_records(4)
    tokenizer = build_word_tokenizer([r["text"] + " " + r["summary"] for r in rows])
    cfg = TrainConfig(model="tiny", compute_dtype="fp32", device="cpu", lora_dropout=0.0, max_source_tokens=16,
                      max_target_tokens=6, lora_r=4, seed=3, fused_lora=True, lora_in_base_gemm=True,
                      lora_targets=["all-linear"])
    examples = tokenize_rows(tokenizer, rows, prefix=cfg.source_prefix, max_source_tokens=16, max_target_tokens=6)
    batch = collate(examples, tokenizer.pad_token_id)
    model = build_model(cfg, tokenizer, torch.device("cpu")).train()
    calls = []
    real = lora_group.FusedLoraGroup4bit.apply
    monkeypatch.setattr(lora_group.FusedLoraGroup4bit, "apply", lambda *a: calls.append(len(a) - 4) or real(*a))

    def loss_and_grads(grouped: bool):
        monkeypatch.setattr(lora_group, "GROUP_PROJECTIONS", grouped)
        model.zero_grad(set_to_none=True)
        loss = model(**{k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "labels")}).loss
        loss.backward()
        return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    single_loss, single = loss_and_grads(False)
    assert calls == []
    group_loss, group = loss_and_grads(True)
    layers = modeling.T5_SHAPES["tiny"]["num_layers"]
    assert sorted(calls) == sorted([6] * (2 * layers) + [4] * layers)  # q/k/v of both stacks, cross k/v
    assert group_loss == pytest.approx(single_loss, rel=1e-6)
    assert group.keys() == single.keys()
    for name, grad in single.items():
        torch.testing.assert_close(group[name], grad, rtol=1e-5, atol=1e-5 * float(grad.abs().max()), msg=name)
