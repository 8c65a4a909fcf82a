"""Checkpoints: the keeper (what is written, kept and pruned, which one is the best, what a non-writing rank knows)
and the metrics rewind a resumed run starts with. (Kill/resume equality and atomic writes: test_reliability_resume.)"""

from __future__ import annotations

import json

import pytest
import torch

from sumtune import checkpoint
from sumtune.checkpoint_keeper import CheckpointKeeper
from sumtune.config import TrainConfig
from sumtune.demo_data import build_word_tokenizer, demo_records
from sumtune.metrics import MetricsLogger, read_metrics


@pytest.fixture(scope="module")
def model_and_optimizer():
    from sumtune.training import build_model

    rows = demo_records(4)
    tokenizer = build_word_tokenizer([r["text"] + " " + r["summary"] for r in rows])
    model = build_model(TrainConfig(model="tiny", compute_dtype="fp32", lora_r=2), tokenizer, torch.device("cpu"))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    return model, optimizer


def state(step: int, **kwargs) -> checkpoint.TrainerState:
    return checkpoint.TrainerState(step=step, samples_seen=4 * step, micro_batch_size=4, grad_accum_steps=1, **kwargs)


def test_keeper_writes_prunes_and_keeps_the_best(tmp_path, model_and_optimizer):
    model, optimizer = model_and_optimizer
    keeper = CheckpointKeeper(tmp_path / "checkpoints", keep_last=2)
    for step, score in ((1, 10.0), (2, 30.0), (3, 20.0)):
        path = keeper.save(model=model, optimizer=optimizer, state=state(step))
        assert path == tmp_path / "checkpoints" / f"step-{step}" and keeper.last == path
        assert keeper.is_current(step, 4 * step) and not keeper.is_current(step, 4 * step + 1)
        if keeper.note_score(score, step):
            keeper.keep_as_best(path, {"step": step, "rougeL": score})
    assert [p.name for p in checkpoint.step_checkpoints(tmp_path / "checkpoints")] == ["step-2", "step-3"]
    assert (keeper.best_score, keeper.best_step) == (30.0, 2)
    assert json.loads((tmp_path / "checkpoints" / "best" / "checkpoint.json").read_text())["step"] == 2
    checkpoint.read_state(tmp_path / "checkpoints" / "best")  # a complete checkpoint, not just a marker
    keeper.keep_as_best(tmp_path / "checkpoints" / "step-9", {"step": 9})  # no such checkpoint: nothing happens
    assert json.loads((tmp_path / "checkpoints" / "best" / "checkpoint.json").read_text())["step"] == 2


def test_a_rank_that_does_not_write_keeps_the_same_bookkeeping(tmp_path, model_and_optimizer):
    model, optimizer = model_and_optimizer
    keeper = CheckpointKeeper(tmp_path / "checkpoints", keep_last=2, writes=False)
    assert keeper.save(model=model, optimizer=optimizer, state=state(5)) is None
    assert keeper.is_current(5, 20) and not (tmp_path / "checkpoints").exists()
    assert keeper.note_score(1.0, 5) and not keeper.note_score(0.5, 6)


def test_resumed_keeper_knows_its_checkpoint_and_best(tmp_path, model_and_optimizer):
    model, optimizer = model_and_optimizer
    path = CheckpointKeeper(tmp_path / "c", keep_last=1).save(model=model, optimizer=optimizer,
                                                              state=state(7, best_score=12.5, best_step=5))
    loaded = checkpoint.load_checkpoint(path, model=model, optimizer=optimizer, restore_random=False)
    keeper = CheckpointKeeper(tmp_path / "c", keep_last=1)
    keeper.resumed(path, loaded)
    assert keeper.last == path and keeper.is_current(7, 28) and (keeper.best_score, keeper.best_step) == (12.5, 5)
    assert not keeper.note_score(12.0, 8)


def test_metrics_rewind_cuts_the_log_back_to_the_checkpoint(tmp_path):
    logger = MetricsLogger(tmp_path)
    logger.log("train", 1, {"loss": 3.0})
    logger.log("train", 2, {"loss": 2.0})
    at_checkpoint = logger.path.stat().st_size
    logger.log("train", 3, {"loss": 1.0})
    logger.rewind(at_checkpoint, step=2)
    logger.log("train", 3, {"loss": 0.5})  # the resumed run redoes step 3
    logger.close()
    assert [(r["step"], r["loss"]) for r in read_metrics(tmp_path)] == [(1, 3.0), (2, 2.0), (3, 0.5)]
    MetricsLogger(tmp_path / "silent", enabled=False).rewind(0, step=1)  # other ranks: nothing to cut
