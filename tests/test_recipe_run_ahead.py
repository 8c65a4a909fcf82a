"""The training loop runs one step ahead (`sumtune.recipe.RUN_AHEAD`): it launches the next step before reading the
pending one's loss, so the host's data, copies and launches overlap the GPU's work. It must change no bit: the same
losses, adapters and checkpoints as one step at a time, nothing in flight when a checkpoint or an evaluation reads
the weights, and a stop request or a non-finite step handled as before (CPU, tiny T5 in real NF4, real PEFT).

A fused AdamW (the shipped optimizer on a GPU, whose update is skipped on the device) is what lets a step run ahead;
sumtune builds it fused only on CUDA, so these tests build it fused on the CPU.
"""

from __future__ import annotations

import os
import signal

import pytest
import torch
from safetensors.torch import load_file

from sumtune import argparsing, checkpoint, faults, recipe as recipe_module
from sumtune.config import TrainConfig
from sumtune.metrics import MetricsLogger, read_metrics
from sumtune.recipe import TrainRecipe
from sumtune.train_step import TrainStep

CONFIG = dict(
    model="tiny", dataset="demo", max_samples=40, eval_ratio=0.1, quantization="nf4", compute_dtype="fp32",
    lora_r=8, lora_dropout=0.1, max_source_tokens=32, max_target_tokens=8, batch_size=4, grad_accum_steps=2,
    max_steps=7, checkpoint_every_steps=3, keep_last_checkpoints=10, eval_every_steps=4, eval_max_samples=2,
    eval_batch_size=2, max_new_tokens=4, log_every_steps=1, lr=3e-3, warmup_steps=2, optimizer="adamw",
    device="cpu", progress=False, seed=1,
)
VOLATILE = {"tokens_per_s", "samples_per_s", "step_time_s", "peak_mem_gib", "time_s", "mfu"}


class FusedAdamW(torch.optim.AdamW):
    def __init__(self, params, **kwargs):
        kwargs["fused"] = True
        super().__init__(params, **kwargs)


class InFlight:
    """Records, at each launch, checkpoint and evaluation, how many launched steps were still unread."""

    def __init__(self, monkeypatch):
        self.pending, self.at_launch, self.at_reads_of_weights = [], [], []
        launch = TrainStep.launch
        spy = self

        def counted_launch(step, *args, **kwargs):
            spy.at_launch.append(spy.unread())
            pending = launch(step, *args, **kwargs)
            spy.pending.append(pending)
            return pending

        monkeypatch.setattr(TrainStep, "launch", counted_launch)
        for name in ("save_checkpoint", "evaluate"):
            method = getattr(TrainRecipe, name)

            def checked(recipe, *args, _method=method, **kwargs):
                spy.at_reads_of_weights.append(spy.unread())
                return _method(recipe, *args, **kwargs)

            monkeypatch.setattr(TrainRecipe, name, checked)

    def unread(self) -> int:
        return sum(not pending.done for pending in self.pending)


def run(tmp_path, monkeypatch, name: str, run_ahead: bool, bad_calls=frozenset(), **overrides) -> tuple:
    monkeypatch.setattr(torch.optim, "AdamW", FusedAdamW)
    monkeypatch.setattr(recipe_module, "RUN_AHEAD", run_ahead)
    spy = InFlight(monkeypatch)
    cfg = argparsing.resolve(TrainConfig, None, {**CONFIG, "output_dir": str(tmp_path / name), **overrides})
    recipe = TrainRecipe(cfg)
    recipe.setup()
    assert recipe.step.update_on_device and recipe.step.can_run_ahead
    forward, calls = recipe.step.forward_loss, [0]

    def faulty(batch):  # a NaN loss on the given micro-batch calls
        loss = forward(batch)
        calls[0] += 1
        return loss * float("nan") if calls[0] in bad_calls else loss

    recipe.step.forward_loss = faulty
    try:
        recipe.train()
        recipe.finish()
    finally:
        recipe.cleanup()
    monkeypatch.undo()
    return recipe, spy


def logged(run_dir) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in VOLATILE} for r in read_metrics(run_dir)]


def adapters(run_dir) -> dict[str, dict[str, torch.Tensor]]:
    found = {"final": load_file(str(run_dir / "adapter_model.safetensors"))}
    for path in checkpoint.step_checkpoints(run_dir / "checkpoints"):
        found[path.name] = load_file(str(path / checkpoint.ADAPTER_FILE))
    return found


def assert_same(run_dir, reference_dir) -> None:
    got, want = adapters(run_dir), adapters(reference_dir)
    assert got.keys() == want.keys()
    for name in want:
        assert want[name].keys() == got[name].keys()
        assert all(torch.equal(got[name][k], want[name][k]) for k in want[name]), name
    assert logged(run_dir) == logged(reference_dir)


@pytest.mark.parametrize("bad_calls", [frozenset(), frozenset({5})], ids=["finite", "a-nan-step"])
def test_running_ahead_changes_no_bit_and_reads_no_weights_in_flight(tmp_path, monkeypatch, bad_calls):
    """Seven steps with checkpoints at 3, 6 and 7 and an evaluation at 4: the same losses, gradient norms, adapters
    and checkpoints one step ahead as one step at a time; steps were launched ahead, never two, and no checkpoint or
    evaluation ran with a step in flight. With a NaN loss in step 3's micro-batches (skipped, not counted), the
    next step was already launched: it runs as it would have, at the learning rate of its place had the bad step
    counted, so only that one step's rate may differ — here, with warm-up over by then, it does not."""
    ahead, spy = run(tmp_path, monkeypatch, "ahead", True, bad_calls)
    one_by_one, spy_off = run(tmp_path, monkeypatch, "one_by_one", False, bad_calls)
    assert ahead.global_step == one_by_one.global_step == 7
    assert ahead.guard.skipped_total == one_by_one.guard.skipped_total == len(bad_calls)
    assert_same(tmp_path / "ahead", tmp_path / "one_by_one")
    assert max(spy_off.at_launch) == 0 and max(spy.at_launch) == 1 and spy.at_launch.count(1) >= 2
    assert spy.at_reads_of_weights and not any(spy.at_reads_of_weights)


def test_a_stop_request_reads_the_step_in_flight_before_its_checkpoint(tmp_path, monkeypatch):
    """SIGINT during step 2's bookkeeping, while step 3 is already launched: step 3 is read and counted, the
    checkpoint is step 3's and holds its weights (those of an uninterrupted run's step 3), status 130."""
    log = MetricsLogger.log

    def log_then_interrupt(self, split, step, values):
        record = log(self, split, step, values)
        if split == "train" and step == 2:
            os.kill(os.getpid(), signal.SIGINT)
        return record

    monkeypatch.setattr(MetricsLogger, "log", log_then_interrupt)
    with pytest.raises(faults.TrainingInterrupted) as stopped:
        run(tmp_path, monkeypatch, "stopped", True, checkpoint_every_steps=100, eval_every_steps=100)
    monkeypatch.undo()
    assert stopped.value.code == 130
    saved = checkpoint.step_checkpoints(tmp_path / "stopped" / "checkpoints")
    assert [p.name for p in saved] == ["step-3"]
    run(tmp_path, monkeypatch, "three", False, max_steps=3, checkpoint_every_steps=100, eval_every_steps=100)
    want = load_file(str(tmp_path / "three" / "checkpoints" / "step-3" / checkpoint.ADAPTER_FILE))
    got = load_file(str(saved[0] / checkpoint.ADAPTER_FILE))
    assert all(torch.equal(got[k], want[k]) for k in want)
