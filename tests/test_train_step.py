"""THE training step (`sumtune.train_step.TrainStep`) on a tiny NF4 T5 with LoRA built by the product: gradient
accumulation, the skipped non-finite step, what it reports, and (GPU) its one host sync."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch

from sumtune.batching import collate
from sumtune.config import TrainConfig
from sumtune.data import tokenize_rows
from sumtune.demo_data import build_word_tokenizer, demo_records
from sumtune.train_step import BatchFlops, StepResult, TrainStep, count_tokens
from sumtune.training import build_model

# Every demo text is longer than 16 tokens and every summary longer than 6: all rows get the same length, so two
# micro-batches of 2 hold exactly the label tokens of one batch of 4 (the token-mean losses then combine exactly).
CFG = TrainConfig(model="tiny", compute_dtype="fp32", device="cpu", lora_dropout=0.0, max_source_tokens=16,
                  max_target_tokens=6, lora_r=4, seed=3)


@pytest.fixture(scope="module")
def data():
    rows = demo_records(8)
    tokenizer = build_word_tokenizer([r["text"] + " " + r["summary"] for r in rows])
    examples = tokenize_rows(tokenizer, rows, prefix=CFG.source_prefix, max_source_tokens=16, max_target_tokens=6)
    assert len({(len(e.input_ids), len(e.labels)) for e in examples}) == 1
    return tokenizer, examples


def sgd_step(tokenizer, device="cpu", cfg: TrainConfig = CFG, **kwargs) -> TrainStep:
    """A fresh product-built model (same seed: same weights) with plain SGD, whose update is lr × gradient."""
    model = build_model(cfg, tokenizer, torch.device(device)).train()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    lora_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return TrainStep(model, optimizer, device=torch.device(device), compute_dtype="fp32", max_grad_norm=None,
                     flops=BatchFlops(model.config, lora_params), **kwargs)


def trainable(step: TrainStep) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in step.model.named_parameters() if p.requires_grad}


def test_two_micro_batches_make_the_step_of_one_batch(data):
    tokenizer, examples = data
    whole, split = sgd_step(tokenizer), sgd_step(tokenizer)
    before = trainable(whole)
    assert all(torch.equal(before[n], p) for n, p in trainable(split).items())
    one = whole([collate(examples[:4], tokenizer.pad_token_id)], lr=0.5)
    two = split([collate(examples[:2], tokenizer.pad_token_id), collate(examples[2:4], tokenizer.pad_token_id)],
                lr=0.5)
    assert two.loss == pytest.approx(one.loss, rel=1e-5) and two.grad_norm == pytest.approx(one.grad_norm, rel=1e-4)
    after_one, after_two = trainable(whole), trainable(split)
    moved = torch.cat([(after_one[n] - before[n]).flatten() for n in before]).norm()
    assert moved > 1e-3  # the step really updated the adapter
    diff = torch.cat([(after_two[n] - after_one[n]).flatten() for n in before]).norm()
    assert diff / moved < 1e-4
    assert (one.samples, two.samples) == (4, 4) and one.tokens == two.tokens and one.flops == pytest.approx(two.flops)


def test_a_nonfinite_loss_skips_the_update(data):
    tokenizer, examples = data
    step = sgd_step(tokenizer)
    before = trainable(step)
    real = step.forward_loss
    step.forward_loss = lambda batch: real(batch) * float("nan")
    result = step([collate(examples[:4], tokenizer.pad_token_id)], lr=0.5)
    assert result.grad_norm is None and math.isnan(result.loss)
    assert all(torch.equal(before[n], p) for n, p in trainable(step).items())  # no update at all
    assert all(p.grad is None for p in step.params)  # and no gradient left for the next step
    step.forward_loss = real
    ok = step([collate(examples[4:8], tokenizer.pad_token_id)], lr=0.5)
    assert ok.grad_norm is not None and math.isfinite(ok.loss)


def adamw_step(tokenizer, fused: bool, device: str = "cpu") -> TrainStep:
    model = build_model(replace(CFG, device=device), tokenizer, torch.device(device)).train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, fused=fused)
    return TrainStep(model, optimizer, device=torch.device(device), compute_dtype="fp32", max_grad_norm=1.0)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU")])])
def test_a_fused_adamw_skips_a_nonfinite_step_on_the_device_and_trains_as_the_unfused_one(data, device):
    """With a fused Adam/AdamW the finite-or-skip decision is the optimizer's `found_inf` flag, queued before the
    host reads the loss: a NaN step between two steps changes nothing (bitwise, step counters included), and the
    steps move the weights as the unfused AdamW (decided on the host) does."""
    tokenizer, examples = data
    skipping, fused, plain = (adamw_step(tokenizer, fused=f, device=device) for f in (True, True, False))
    assert skipping.update_on_device and not plain.update_on_device
    batches = [collate(examples[i:i + 4], tokenizer.pad_token_id) for i in (0, 4)]
    for step in (skipping, fused, plain):
        step(batches[:1], lr=1e-2)
    before = trainable(skipping)
    real = skipping.forward_loss
    skipping.forward_loss = lambda batch: real(batch) * float("nan")
    skipped = skipping(batches[1:], lr=1e-2)
    assert skipped.grad_norm is None and math.isnan(skipped.loss)
    assert all(torch.equal(before[n], p) for n, p in trainable(skipping).items())
    assert {float(s["step"]) for s in skipping.optimizer.state.values()} == {1.0}  # the skipped step not counted
    assert not hasattr(skipping.optimizer, "found_inf")
    skipping.forward_loss = real
    results = [step(batches[1:], lr=1e-2) for step in (skipping, fused, plain)]
    assert results[0] == results[1] and results[1].loss == pytest.approx(results[2].loss, rel=1e-5)
    after = [trainable(step) for step in (skipping, fused, plain)]
    assert all(torch.equal(after[0][n], after[1][n]) for n in after[0])
    assert torch.cat([(after[1][n] - before[n]).flatten() for n in before]).norm() > 1e-3  # the steps moved
    for name in after[2]:  # fused and unfused kernels round differently
        assert torch.allclose(after[1][name], after[2][name], rtol=1e-4, atol=1e-5), name


def test_the_result_counts_what_the_step_processed(data):
    tokenizer, examples = data
    step = sgd_step(tokenizer)
    batches = [collate(examples[:3], tokenizer.pad_token_id), collate(examples[3:5], tokenizer.pad_token_id)]
    result = step(batches, lr=0.1)
    assert isinstance(result, StepResult) and result.samples == 5
    assert result.tokens == sum(count_tokens(b) for b in batches) == 5 * (16 + 6)
    assert result.flops == pytest.approx(sum(step.flops.of_batch(b) for b in batches)) and result.flops > 0
    assert step.last_batch_shape == (2, 16, 6) and result.stop_signum is None


def test_a_full_source_mask_is_left_out_and_the_step_is_the_same(data, monkeypatch):
    """OMIT_FULL_SOURCE_MASK: a micro-batch of unpadded sources reaches the model without its all-ones mask (the
    model then masks no key, as with it), one with a padded row keeps its mask; the step's loss, update and counts
    are those of the step with the mask."""
    from sumtune import train_step

    tokenizer, examples = data
    full = collate(examples[:4], tokenizer.pad_token_id)
    padded = dict(full, attention_mask=full["attention_mask"].clone())
    padded["attention_mask"][1, -3:] = 0
    assert "attention_mask" not in train_step.without_full_source_mask(full)
    assert train_step.without_full_source_mask(padded) is padded
    results, updates, seen = {}, {}, {}
    for omit in (False, True):
        monkeypatch.setattr(train_step, "OMIT_FULL_SOURCE_MASK", omit)
        step = sgd_step(tokenizer)
        before = trainable(step)
        real = step.forward_loss
        seen[omit] = []
        step.forward_loss = lambda batch, real=real, log=seen[omit]: log.append("attention_mask" in batch) or real(
            batch)
        results[omit] = step([full, padded], lr=0.5)
        updates[omit] = torch.cat([(p - before[n]).flatten() for n, p in trainable(step).items()])
    assert seen == {False: [True, True], True: [False, True]}
    assert results[True].loss == pytest.approx(results[False].loss, rel=1e-6)
    assert (results[True].tokens, results[True].samples) == (results[False].tokens, results[False].samples)
    assert (updates[True] - updates[False]).norm() <= 1e-5 * updates[False].norm()


def test_draw_takes_the_steps_micro_batches_from_a_stream(data):
    tokenizer, examples = data
    step = sgd_step(tokenizer)
    stream = iter([{"n": 1}, {"n": 2}, {"n": 3}])
    assert step.draw(stream, 2) == [{"n": 1}, {"n": 2}] and next(stream) == {"n": 3}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("fused_adamw", [False, True])
def test_one_host_sync_per_step_on_the_gpu(data, fused_adamw):
    """CUDA's sync debug mode warns on every synchronizing call: the step makes exactly one (the loss and norm
    read), with pinned host batches (as the product's batching pins them on CUDA); with a fused AdamW (the shipped
    optimizer), whose skip decision is made on the GPU, too."""
    import warnings

    tokenizer, examples = data
    step = sgd_step(tokenizer, device="cuda")
    if fused_adamw:
        step = TrainStep(step.model, torch.optim.AdamW(step.params, lr=1e-3, fused=True), device=step.device,
                         compute_dtype="fp32", max_grad_norm=1.0)
        assert step.update_on_device
    batches = [{k: v.pin_memory() for k, v in collate(examples[i:i + 2], tokenizer.pad_token_id).items()}
               for i in (0, 2)]
    step(batches, lr=0.1)  # warm-up: allocator, kernels
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            step(batches, lr=0.1)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    syncs = [w for w in caught if "synchroniz" in str(w.message).lower()]
    assert len(syncs) == 1, [str(w.message) for w in syncs]


@pytest.mark.parametrize("checkpointing", [False, True])
def test_fused_lora_steps_train_as_peft_layers_do(data, monkeypatch, checkpointing):
    """`fused_lora` (one autograd node per LoRA-on-NF4 layer) in THE step, with and without activation checkpointing
    (which runs each block's forward twice), and with `lora_in_base_gemm` (the LoRA term inside the base GEMM on the
    tiny T5's wide sides, wi's output and wo's input): two SGD steps move every adapter weight as PEFT's own
    layers do."""

    from sumtune.fast_t5 import lora4bit

    tokenizer, examples = data
    calls, sides = [], []
    real_apply, real_side = lora4bit.FusedLora4bit.apply, lora4bit.wide_side
    monkeypatch.setattr(lora4bit.FusedLora4bit, "apply", lambda *args: calls.append(1) or real_apply(*args))
    monkeypatch.setattr(lora4bit, "wide_side", lambda n_in, n_out: sides.append(real_side(n_in, n_out)) or sides[-1])
    batches = [collate(examples[:4], tokenizer.pad_token_id), collate(examples[4:8], tokenizer.pad_token_id)]
    moved = {}
    for fused, in_gemm in ((False, False), (True, False), (True, True)):
        step = sgd_step(tokenizer, cfg=replace(CFG, lora_targets=["all-linear"], fused_lora=fused,
                                               lora_in_base_gemm=in_gemm, gradient_checkpointing=checkpointing))
        before = trainable(step)
        for batch in batches:
            step([batch], lr=0.5)
        moved[fused, in_gemm] = {n: p - before[n] for n, p in trainable(step).items()}
    assert calls, "the fused node never ran"
    assert "in" in sides and "out" in sides, sides
    total = torch.cat([d.flatten() for d in moved[False, False].values()]).norm()
    assert total > 1e-3
    for name, delta in moved[False, False].items():
        for variant in ((True, False), (True, True)):
            assert torch.allclose(moved[variant][name], delta, rtol=1e-4, atol=1e-5 * float(total)), (variant, name)


def test_checkpointing_is_on_through_transformers_current_name_without_its_deprecation_warning(data):
    """`gradient_checkpointing: true` checkpoints every T5 block; newer transformers (5.24) warn that
    `gradient_checkpointing_enable` goes in v6, so sumtune calls `activation_checkpointing_enable` where it exists.
    The checkpointed step moves the adapter as the plain step does."""
    import warnings

    tokenizer, examples = data
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*gradient_checkpointing_enable.*", category=FutureWarning)
        checkpointed = sgd_step(tokenizer, cfg=replace(CFG, gradient_checkpointing=True))
    stacks = [m for m in checkpointed.model.modules() if type(m).__name__ == "T5Stack"]
    assert stacks and all(getattr(m, "gradient_checkpointing", False) for m in stacks)
    plain = sgd_step(tokenizer)
    batch = collate(examples[:4], tokenizer.pad_token_id)
    before = trainable(plain)
    results = [step([batch], lr=0.5) for step in (plain, checkpointed)]
    assert results[1].loss == pytest.approx(results[0].loss, rel=1e-5)
    moved = {n: p - before[n] for n, p in trainable(plain).items()}
    assert torch.cat([d.flatten() for d in moved.values()]).norm() > 1e-3
    for name, p in trainable(checkpointed).items():
        assert torch.allclose(p - before[name], moved[name], rtol=1e-4, atol=1e-6), name
