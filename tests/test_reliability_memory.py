"""`batch_size: auto` selection logic, the dequantized-weight cache's `auto` rule, and out-of-memory messages (CPU,
and on a GPU with ``-m gpu``; tiny T5 in real NF4: the run of tests/_reliability_helpers.py)."""

from __future__ import annotations

import contextlib

import pytest
import torch
from _reliability_helpers import config

from sumtune import argparsing, batch_search, faults
from sumtune.config import TrainConfig
from sumtune.errors import SumtuneError
from sumtune.metrics import read_metrics
from sumtune.recipe import TrainRecipe


def test_auto_batch_picks_largest_fitting_divisor():
    assert batch_search.micro_batch_candidates(24) == [24, 12, 8, 6, 4, 3, 2, 1]
    assert batch_search.micro_batch_candidates(16, max_micro_batch=10) == [8, 4, 2, 1]
    tried = []

    def fits(m):
        tried.append(m)
        return m <= 5, {"peak_reserved_gib": m * 1.0}

    micro, trials = batch_search.choose_micro_batch(batch_search.micro_batch_candidates(24), fits)
    assert micro == 4 and tried == [24, 12, 8, 6, 4] and [t["fits"] for t in trials] == [False] * 4 + [True]
    with pytest.raises(SumtuneError, match="Not even a micro-batch of 1 fits"):
        batch_search.choose_micro_batch([2, 1], lambda m: (False, {"detail": "out of memory"}))


def test_auto_batch_tries_a_leaner_mode_before_a_smaller_micro_batch():
    """A micro-batch that does not fit is tried again under the leaner mode (when it applies) before the next
    smaller one; the last trial is the one chosen and says whether it was lean."""
    held = []

    @contextlib.contextmanager
    def lean():
        held.append(True)
        try:
            yield
        finally:
            held.pop()

    def fits(m):
        return m <= (4 if held else 2), {"peak_reserved_gib": m * 1.0}

    leaner = batch_search.LeanerMode("lean", lean, lambda: True)
    micro, trials = batch_search.choose_micro_batch([8, 4, 2, 1], fits, leaner)
    assert micro == 4 and [(t["micro_batch"], t["fits"], t.get("lean", False)) for t in trials] == [
        (8, False, False), (8, False, True), (4, False, False), (4, True, True)]
    never = batch_search.LeanerMode("lean", lean, lambda: False)  # nothing the switch would change: not tried
    micro, trials = batch_search.choose_micro_batch([8, 4, 2, 1], fits, never)
    assert micro == 2 and not any(t.get("lean") for t in trials) and len(trials) == 3


def test_auto_batch_keeps_samples_per_step():
    cfg = TrainConfig(batch_size="auto", samples_per_step=32)
    assert cfg.effective_batch_size == 32
    assert TrainConfig(batch_size="auto", grad_accum_steps=2).effective_batch_size == 32  # 16 × accumulation
    cli_cfg = argparsing.resolve(TrainConfig, None, {"batch_size": "auto"})
    assert cli_cfg.batch_size == "auto"


def test_weight_cache_auto_takes_the_cache_only_beside_the_micro_batchs_peak(config_path, tmp_path, monkeypatch):
    """`cache_dequantized_weights: auto` (the default): off on a CPU; on a GPU on when the copy fits beside the
    chosen micro-batch's measured peak (and, with CUDA graphs, one row's warm-up) within 90% of the budget, else off
    (the budget here is set around that line; the rule and the cache are the product's, only the card's size is
    stood in for)."""
    from dataclasses import replace

    from sumtune import fast_t5, memory, training

    recipe = TrainRecipe(config(config_path, tmp_path / "run"))
    recipe.setup()
    try:
        assert recipe.cfg.cache_dequantized_weights is False  # resolved: no GPU
        model = recipe.model
        assert not any(hasattr(m, "_sumtune_dequantized_weight") for m in model.modules())
        size = fast_t5.dequantized_weight_bytes(model)
        assert size > 0
        peak_gib = 1.0
        trials = [{"micro_batch": recipe.cfg.batch_size, "fits": True, "peak_reserved_gib": peak_gib}]
        monkeypatch.setattr(batch_search, "memory_budget_bytes", lambda device, cap: int(cap * 2**30))
        auto = replace(recipe.cfg, cache_dequantized_weights="auto")
        lines = []

        class Lines:
            def write(self, line):
                lines.append(line)

        # with CUDA graphs a new shape's one-row warm-up must fit beside them too: one row of the peak less the model
        warm_up = (peak_gib * 2**30 - memory.measured_footprint_bytes(model)) / recipe.cfg.batch_size
        assert 0 < warm_up < peak_gib * 2**30 / recipe.cfg.batch_size
        for graphs, extra_bytes, expected in ((False, size / 2, False), (False, 2 * size, True),
                                              (True, 2 * size, False), (True, 2 * size + warm_up, True)):
            cap_gib = (peak_gib * 2**30 + extra_bytes) / batch_search.AUTO_BATCH_HEADROOM / 2**30
            resolved = training.resolve_weight_cache(replace(auto, max_memory_gib=cap_gib), model=model, trials=trials,
                                                     examples=[], collator=None, device=torch.device("cuda"),
                                                     graphs=graphs, progress=Lines())
            assert resolved.cache_dequantized_weights is expected, (graphs, extra_bytes)
            assert any(hasattr(m, "_sumtune_dequantized_weight") for m in model.modules()) is expected
            assert lines[-1].startswith(f"sumtune: cache_dequantized_weights auto → {'on' if expected else 'off'}")
            assert ("warm-up beside the CUDA graphs" in lines[-1]) is graphs
            fast_t5.uncache_dequantized_weights(model)
        forced = training.resolve_weight_cache(replace(auto, cache_dequantized_weights=False), model=model,
                                               trials=trials, examples=[], collator=None,
                                               device=torch.device("cuda"), graphs=True)
        assert forced.cache_dequantized_weights is False and len(lines) == 4  # forced: nothing decided, no line
    finally:
        fast_t5.uncache_dequantized_weights(recipe.model)
        recipe.cleanup()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_weight_cache_auto_on_gpu_measures_a_numeric_micro_batch(config_path, tmp_path):
    """With a numeric batch size there is no search: one probe measures the micro-batch's peak (a tiny model fits)."""
    recipe = TrainRecipe(config(config_path, tmp_path / "run", batch_size=4, device="cuda"))
    recipe.setup()
    try:
        assert recipe.cfg.cache_dequantized_weights is True
        assert any(hasattr(m, "_sumtune_dequantized_weight") for m in recipe.model.modules())
    finally:
        recipe.cleanup()


def test_oom_message_is_one_actionable_sentence():
    message = faults.oom_message(where="in training step 7", micro_batch=16, source_tokens=1024, target_tokens=128,
                                 grad_accum_steps=1, device=torch.device("cpu"))
    assert "16 documents × 1024 source / 128 target tokens" in message and "--batch-size auto" in message
    assert "\n" not in message


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_auto_batch_on_gpu(config_path, tmp_path):
    recipe = TrainRecipe(config(config_path, tmp_path / "run", batch_size="auto", samples_per_step=8, device="cuda"))
    recipe.setup()
    try:
        assert recipe.cfg.batch_size * recipe.cfg.grad_accum_steps == 8
        assert recipe.auto_batch_trials and recipe.auto_batch_trials[-1]["fits"]
    finally:
        recipe.cleanup()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_train_log_on_gpu_counts_new_graph_shapes_and_both_mfu_figures(config_path, tmp_path):
    """On a GPU every train line carries MFU against the datasheet (when the card is known) and against the matmul
    rate measured at the start, and `graph_captures` adds up to the shapes the step captured."""
    recipe = TrainRecipe(config(config_path, tmp_path / "run", batch_size=4, device="cuda", cuda_graphs=True,
                                log_every_steps=1, max_steps=6))
    recipe.setup()
    try:
        recipe.train()
        lines = [r for r in read_metrics(recipe.run_dir) if r["split"] == "train"]
        assert recipe.matmul_tflops and recipe.step.graphed is not None and recipe.step.graphed.captures >= 1
        assert sum(r["graph_captures"] for r in lines) == recipe.step.graphed.captures
        assert lines[0]["graph_captures"] >= 1  # the first step's shape is always new
        assert lines[0]["graph_warm_up_s"] > 0 and lines[0]["graph_record_s"] > 0
        assert sum(r["graph_record_s"] for r in lines) == pytest.approx(recipe.step.graphed.record_s)
        assert all(r["mfu_measured"] > 0 for r in lines)
        if recipe.peak_tflops:
            assert all(r["mfu"] < r["mfu_measured"] for r in lines)  # no GEMM reaches the datasheet
    finally:
        recipe.cleanup()
