"""Where metrics go besides metrics.jsonl: TensorBoard always, W&B / MLflow only when asked for and installed."""

from __future__ import annotations

import importlib.util
import json
import sys
import textwrap
import warnings

import pytest

from sumtune import metrics as metrics_mod
from sumtune.metrics import MetricsLogger, read_metrics, requested_trackers


@pytest.fixture(autouse=True)
def fresh_warnings(monkeypatch):
    monkeypatch.setattr(metrics_mod, "_warned", set())
    monkeypatch.delenv("SUMTUNE_REPORT_TO", raising=False)


def test_tensorboard_scalars_match_metrics_jsonl(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logger = MetricsLogger(tmp_path)
    for step in (1, 2, 3):
        logger.log("train", step, {"loss": 1.0 / step, "tokens_per_s": 100.0 * step, "peak_mem_gib": 0.5,
                                   "flag": True, "bad": float("nan")})
    logger.log("eval", 3, {"rougeL": 12.5})
    logger.close()
    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert tags == {"train/loss", "train/tokens_per_s", "train/peak_mem_gib", "eval/rougeL"}
    assert [e.value for e in acc.Scalars("train/loss")] == pytest.approx([r["loss"] for r in read_metrics(tmp_path)
                                                                          if r["split"] == "train"])
    assert [(e.step, e.value) for e in acc.Scalars("eval/rougeL")] == [(3, 12.5)]


def test_requested_trackers_from_env_and_argument(monkeypatch):
    assert requested_trackers() == []
    monkeypatch.setenv("SUMTUNE_REPORT_TO", " WandB, mlflow,wandb ")
    assert requested_trackers() == ["wandb", "mlflow"]
    assert requested_trackers([]) == [] and requested_trackers("none") == []
    with pytest.warns(RuntimeWarning, match="unknown tracker 'comet'"):
        assert requested_trackers("comet,mlflow") == ["mlflow"]


@pytest.mark.skipif(importlib.util.find_spec("wandb") is not None or importlib.util.find_spec("mlflow") is not None,
                    reason="wandb or mlflow is installed here; this checks the not-installed path")
def test_missing_tracker_warns_once_and_the_run_goes_on(tmp_path, monkeypatch):
    monkeypatch.setenv("SUMTUNE_REPORT_TO", "wandb,mlflow")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        logger = MetricsLogger(tmp_path, tensorboard=False)
        for step in range(3):
            logger.log("train", step, {"loss": 1.0})
        logger.close()
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert sorted(messages) == [
        "SUMTUNE_REPORT_TO asks for mlflow, but it is not installed (pip install mlflow); going on without it.",
        "SUMTUNE_REPORT_TO asks for wandb, but it is not installed (pip install wandb); going on without it."]
    assert len(read_metrics(tmp_path)) == 3


@pytest.fixture
def stand_in_wandb(tmp_path, monkeypatch):
    """An importable `wandb` that records calls: checks sumtune's plumbing, not W&B itself (not installed here)."""
    pkg = tmp_path / "site"
    pkg.mkdir()
    (pkg / "wandb.py").write_text(textwrap.dedent("""
        calls = []
        class Run:
            def log(self, data, step=None):
                if data.get("train/loss") == 666.0:
                    raise ConnectionError("tracker outage")
                calls.append(("log", data, step))
            def finish(self):
                calls.append(("finish",))
        def init(**kwargs):
            calls.append(("init", kwargs))
            return Run()
    """))
    monkeypatch.syspath_prepend(str(pkg))
    monkeypatch.delitem(sys.modules, "wandb", raising=False)
    yield
    sys.modules.pop("wandb", None)


def test_tracker_gets_the_same_scalars_and_the_run_config(tmp_path, stand_in_wandb, monkeypatch):
    monkeypatch.setenv("SUMTUNE_REPORT_TO", "wandb")
    run = tmp_path / "my-run"
    run.mkdir()
    logger = MetricsLogger(run, tensorboard=False)
    (run / "config.yaml").write_text("model: tiny\nlr: 0.001\n")  # written after the logger, as the recipe does
    logger.log("train", 5, {"loss": 2.0, "lr": 1e-3, "flag": True, "bad": float("inf")})
    logger.log("eval", 5, {"rougeL": 10.0})
    logger.close()
    import wandb

    init = wandb.calls[0]
    assert init[0] == "init" and init[1]["name"] == "my-run" and init[1]["config"] == {"model": "tiny", "lr": 0.001}
    assert wandb.calls[1:] == [("log", {"train/loss": 2.0, "train/lr": 1e-3}, 5),
                               ("log", {"eval/rougeL": 10.0}, 5), ("finish",)]
    assert [json.loads(line)["split"] for line in (run / "metrics.jsonl").read_text().splitlines()] == ["train", "eval"]


def test_failing_tracker_is_dropped_not_fatal(tmp_path, stand_in_wandb):
    logger = MetricsLogger(tmp_path, tensorboard=False, report_to=["wandb"])
    with pytest.warns(RuntimeWarning, match="wandb failed to log .*tracker outage.*dropped"):
        logger.log("train", 1, {"loss": 666.0})
    logger.log("train", 2, {"loss": 1.0})
    logger.close()
    assert logger.trackers == {} and len(read_metrics(tmp_path)) == 2
