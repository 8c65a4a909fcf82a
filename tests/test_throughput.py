"""The throughput window: clock and counters cover the same steps, so evaluations and checkpoints between two
log lines cannot inflate tokens/s, step time or MFU."""

from __future__ import annotations

import pytest

from sumtune.throughput import ThroughputWindow


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_window_leaves_paused_time_out_and_restarts_at_close():
    clock = FakeClock()
    window = ThroughputWindow(clock=clock)
    clock.now += 1.0
    window.add(samples=4, tokens=400, flops=2e12)
    with window.paused():  # an evaluation: 30 s that are not training
        clock.now += 30.0
    clock.now += 1.0
    window.add(samples=4, tokens=400, flops=2e12)
    totals = window.close()
    assert (totals.steps, totals.samples, totals.tokens, totals.seconds) == (2, 8, 800, 2.0)
    rates = totals.rates(peak_tflops=4.0)
    assert rates["tokens_per_s"] == 400 and rates["samples_per_s"] == 4 and rates["step_time_s"] == 1.0
    assert rates["mfu"] == pytest.approx(4e12 / 2.0 / 4e12)
    assert "mfu_measured" not in rates  # no measured rate given: no second figure
    both = totals.rates(peak_tflops=4.0, matmul_tflops=3.2)
    assert both["mfu"] == rates["mfu"] and both["mfu_measured"] == pytest.approx(4e12 / 2.0 / 3.2e12)
    clock.now += 0.5
    window.add(samples=2, tokens=100)
    after = window.close()  # the next window counts only its own step and time
    assert (after.steps, after.tokens, after.seconds) == (1, 100, 0.5) and "mfu" not in after.rates(None)


def test_tokens_per_s_right_after_an_evaluation_match_the_steady_value(tmp_path, monkeypatch):
    """A real tiny CPU run logging every 20 steps and evaluating (plus checkpointing) at step 50, in the middle of
    the window that ends at step 60: that window's tokens/s and step time must equal every other window's.

    The recipe's windows read a clock that moves only where the test says: 0.05 s with each training step the
    window counts, 100 s inside each evaluation. So the figures are exact and the test cannot flake (it timed real
    CPU seconds until 2026-12-06, and the steps right after an evaluation really do cost more on the 2-core box:
    it read 0.699 once and 1.72 once against bounds of 0.7-1.45). What it catches: evaluation time left in the window
    (step 60 would read ~0.01x), and the old bug of a window that counted the steps before an evaluation over the
    time after it (2x).
    """
    from sumtune import recipe as recipe_module
    from sumtune.api import train
    from sumtune.metrics import read_metrics

    clock = FakeClock()
    add, evaluate = recipe_module.ThroughputWindow.add, recipe_module.TrainRecipe.evaluate_and_checkpoint

    def add_step(window, *args, **kwargs):
        clock.now += 0.05
        return add(window, *args, **kwargs)

    def evaluate_slowly(recipe):
        clock.now += 100.0
        return evaluate(recipe)

    monkeypatch.setattr(recipe_module.ThroughputWindow, "for_device", classmethod(lambda cls, device: cls(clock=clock)))
    monkeypatch.setattr(recipe_module.ThroughputWindow, "add", add_step)
    monkeypatch.setattr(recipe_module.TrainRecipe, "evaluate_and_checkpoint", evaluate_slowly)
    train({"model": "tiny", "dataset": "demo", "max_samples": 200, "compute_dtype": "fp32", "device": "cpu",
           "batch_size": 4, "max_source_tokens": 32, "max_target_tokens": 8, "max_steps": 100,
           "log_every_steps": 20, "eval_every_steps": 50, "eval_max_samples": 4, "max_new_tokens": 4,
           "lora_r": 4, "output_dir": str(tmp_path / "run"), "progress": False})
    logged = {r["step"]: r for r in read_metrics(tmp_path / "run") if r["split"] == "train"}
    assert sorted(logged) == [20, 40, 60, 80, 100]
    assert [r["step"] for r in read_metrics(tmp_path / "run") if r["split"] == "eval"] == [50, 100]
    tokens_per_step = {round(r["tokens_per_s"] * r["step_time_s"]) for r in logged.values()}
    assert len(tokens_per_step) == 1  # every batch holds the same tokens (inputs truncated to 32/8 tokens)
    steady_tokens_per_s = tokens_per_step.pop() / 0.05
    for step in (20, 40, 60, 80, 100):
        assert logged[step]["step_time_s"] == pytest.approx(0.05), step
        assert logged[step]["tokens_per_s"] == pytest.approx(steady_tokens_per_s), step
