"""NaN/inf losses or gradients are skipped and counted, and N in a row stop the run with the likely cause (CPU, tiny
T5 in real NF4, real PEFT/bnb: the run of tests/_reliability_helpers.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from _reliability_helpers import config
from safetensors.torch import load_file

from sumtune import checkpoint, faults
from sumtune.errors import SumtuneError
from sumtune.metrics import read_metrics
from sumtune.recipe import TrainRecipe


class NanGradient(torch.autograd.Function):
    """Identity forward, NaN backward: a finite loss with a non-finite gradient."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float("nan")


def run_with_faults(config_path: Path, out: Path, bad_calls: set[int], kind: str, **overrides) -> TrainRecipe:
    """Train with the step's forward_loss returning a NaN loss (or a NaN gradient) on the given micro-batch calls."""
    recipe = TrainRecipe(config(config_path, out, **overrides))
    recipe.setup()
    forward, calls = recipe.step.forward_loss, [0]

    def faulty(batch):
        loss = forward(batch)
        calls[0] += 1
        if calls[0] in bad_calls:
            return loss * float("nan") if kind == "loss" else NanGradient.apply(loss)
        return loss

    recipe.step.forward_loss = faulty
    step, recipe.optimizer_steps_taken = recipe.optimizer.step, []

    def counted_step(*args, **kwargs):
        recipe.optimizer_steps_taken.append(recipe.global_step)
        return step(*args, **kwargs)

    recipe.optimizer.step = counted_step
    try:
        recipe.train()
    finally:
        recipe.cleanup()
    return recipe


@pytest.mark.parametrize("kind", ["loss", "gradient"])
def test_nonfinite_steps_are_skipped_and_counted(kind, config_path, tmp_path):
    recipe = run_with_faults(config_path, tmp_path / "run", {2, 4}, kind, max_steps=4, checkpoint_every_steps=100)
    assert recipe.global_step == 4 and recipe.guard.skipped_total == 2
    # 6 batches, 2 of them bad: the optimizer stepped once per counted step and never for a skipped one
    assert recipe.optimizer_steps_taken == [0, 1, 2, 3]
    train = [r for r in read_metrics(tmp_path / "run") if r["split"] == "train"]
    assert [r["step"] for r in train] == [1, 2, 3, 4]
    assert all(torch.isfinite(torch.tensor([r["loss"], r["grad_norm"]])).all() for r in train)
    assert all(torch.isfinite(p).all() for p in recipe.model.parameters() if p.requires_grad)
    state = json.loads((tmp_path / "run" / "checkpoints" / "step-4" / checkpoint.STATE_FILE).read_text())
    assert state["nonfinite_skipped"] == 2 and state["samples_seen"] == 6 * 4  # skipped batches are consumed


def test_nonfinite_in_a_row_stops_with_cause_and_keeps_last_good_checkpoint(config_path, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(SumtuneError) as stopped:
        run_with_faults(config_path, out, set(range(3, 100)), "loss", checkpoint_every_steps=2,
                        max_nonfinite_steps=3)
    message = str(stopped.value)
    assert "NaN/inf in 3 optimizer steps in a row" in message and "learning rate" in message
    assert str(out / "checkpoints" / "step-2") in message
    adapter = load_file(str(out / "checkpoints" / "step-2" / checkpoint.ADAPTER_FILE))
    assert all(torch.isfinite(t).all() for t in adapter.values())
    assert [p.name for p in checkpoint.step_checkpoints(out / "checkpoints")] == ["step-2"]


def test_nonfinite_message_names_fp16_overflow():
    message = faults.nonfinite_message(steps_in_a_row=5, compute_dtype="fp16", lr=2e-4, last_checkpoint=None)
    assert "fp16 overflow" in message and "--compute-dtype bf16" in message and message.count(".") <= 3
