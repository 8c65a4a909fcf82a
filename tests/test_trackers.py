"""Where metrics go besides metrics.jsonl (`report_to`): TensorBoard (scalars and the HParams tab), Weights & Biases
and MLflow, each in its own offline / local mode and read back with the library's own formats. wandb and mlflow
are test dependencies (requirements.txt, `.[test]`); where they are not installed their tests skip and the
not-installed path is tested instead."""

from __future__ import annotations

import importlib.util
import json
import struct
import warnings
from pathlib import Path

import pytest

from sumtune import metrics as metrics_mod
from sumtune.metrics import MetricsLogger, read_metrics, requested_trackers

HPARAMS = {"model": "tiny", "lr": 0.001, "lora_targets": ["q", "v"], "max_steps": None, "compile": False}
has_wandb = importlib.util.find_spec("wandb") is not None
has_mlflow = importlib.util.find_spec("mlflow") is not None


@pytest.fixture(autouse=True)
def fresh_warnings(monkeypatch):
    monkeypatch.setattr(metrics_mod, "_warned", set())


def log_a_run(run: Path, report_to, hparams=HPARAMS) -> MetricsLogger:
    logger = MetricsLogger(run, report_to=report_to, hparams=hparams)
    for step in (1, 2, 3):
        logger.log("train", step, {"loss": 1.0 / step, "tokens_per_s": 100.0 * step, "flag": True,
                                   "bad": float("nan")})
    logger.log("eval", 3, {"rougeL": 12.5})
    logger.close()
    return logger


def test_tensorboard_scalars_match_metrics_jsonl_and_hparams_are_in_the_hparams_tab(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    log_a_run(tmp_path, ["tensorboard"])
    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    assert set(acc.Tags()["scalars"]) == {"train/loss", "train/tokens_per_s", "eval/rougeL"}
    assert [e.value for e in acc.Scalars("train/loss")] == pytest.approx([r["loss"] for r in read_metrics(tmp_path)
                                                                          if r["split"] == "train"])
    assert [(e.step, e.value) for e in acc.Scalars("eval/rougeL")] == [(3, 12.5)]

    content = acc.PluginTagToContent("hparams")  # what TensorBoard's HParams tab reads
    data = {tag: plugin_data_pb2.HParamsPluginData.FromString(raw) for tag, raw in content.items()}
    session = next(d.session_start_info for d in data.values() if d.HasField("session_start_info"))
    values = {k: v.WhichOneof("kind") and getattr(v, v.WhichOneof("kind")) for k, v in session.hparams.items()}
    assert values == {"model": "tiny", "lr": 0.001, "lora_targets": "q,v", "max_steps": "none", "compile": False}
    experiment = next(d.experiment for d in data.values() if d.HasField("experiment"))
    assert "eval/rougeL" in {m.name.tag for m in experiment.metric_infos}


def test_requested_trackers():
    assert requested_trackers() == ["tensorboard"]  # the default
    assert requested_trackers(" WandB, mlflow,wandb ") == ["wandb", "mlflow"]
    assert requested_trackers([]) == [] and requested_trackers("none") == [] and requested_trackers(["none"]) == []
    with pytest.warns(RuntimeWarning, match="unknown tracker 'comet'"):
        assert requested_trackers("comet,mlflow") == ["mlflow"]


def test_report_to_none_writes_only_metrics_jsonl(tmp_path):
    log_a_run(tmp_path, ["none"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl"]


def test_missing_tracker_warns_once_and_the_run_goes_on(tmp_path, monkeypatch):
    import importlib.util

    from sumtune import metrics

    real_find_spec = importlib.util.find_spec  # the CI set installs both: hide them as a machine without them would
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name in ("wandb", "mlflow") else real_find_spec(name, *a))
    monkeypatch.setattr(metrics, "_warned", set())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        log_a_run(tmp_path, ["wandb", "mlflow"])
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert sorted(messages) == [
        "report_to asks for mlflow, but it is not installed (pip install mlflow); going on without it.",
        "report_to asks for wandb, but it is not installed (pip install wandb); going on without it."]
    assert len(read_metrics(tmp_path)) == 4


# ---- Weights & Biases, offline --------------------------------------------------------------------------------

def wandb_records(run_file: Path) -> list:
    """The records of a W&B run file (.wandb): a 7-byte W&B header, then LevelDB-log blocks of 32 KiB whose
    records (7-byte header: checksum, length, type FULL/FIRST/MIDDLE/LAST) carry protobuf `Record`s."""
    from wandb.proto import wandb_internal_pb2

    data = run_file.read_bytes()
    assert data[:4] == b":W&B"
    pos, block, pending, records = 7, 32768, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        pos += 7
        if kind == 0:
            continue
        pending += data[pos:pos + length]
        pos += length
        if kind in (1, 4):  # FULL, LAST
            records.append(wandb_internal_pb2.Record.FromString(pending))
            pending = b""
    return records


@pytest.mark.skipif(not has_wandb, reason="wandb is not installed (pip install -e .[test])")
def test_wandb_offline_gets_the_scalars_and_the_hparams(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_PROJECT", "sumtune-test")
    run = tmp_path / "my-run"
    run.mkdir()
    log_a_run(run, ["wandb"])
    (run_file,) = run.glob("wandb/offline-run-*/run-*.wandb")
    records = wandb_records(run_file)
    started = next(r.run for r in records if r.WhichOneof("record_type") == "run")
    assert started.project == "sumtune-test" and started.display_name == "my-run"
    config = {u.key: json.loads(u.value_json) for u in started.config.update if u.key != "_wandb"}
    assert config == HPARAMS
    history = [{i.nested_key[0] if i.nested_key else i.key: json.loads(i.value_json) for i in r.history.item}
               for r in records if r.WhichOneof("record_type") == "history"]
    assert [(h["_step"], h["train/loss"]) for h in history if "train/loss" in h] == [(1, 1.0), (2, 0.5), (3, 1 / 3)]
    assert [h["eval/rougeL"] for h in history if "eval/rougeL" in h] == [12.5]
    assert all("train/flag" not in h and "train/bad" not in h for h in history)  # scalars only


# ---- MLflow, local file store ---------------------------------------------------------------------------------

@pytest.fixture
def mlflow_store(tmp_path, monkeypatch) -> str:
    uri = (tmp_path / "mlruns").as_uri()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 keeps the file store for local use, on request
    return uri


@pytest.mark.skipif(not has_mlflow, reason="mlflow is not installed (pip install -e .[test])")
def test_mlflow_gets_the_scalars_and_the_hparams(tmp_path, mlflow_store):
    from mlflow.tracking import MlflowClient

    run = tmp_path / "my-run"
    run.mkdir()
    log_a_run(run, ["mlflow"])
    client = MlflowClient(mlflow_store)
    (found,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert found.info.run_name == "my-run" and found.info.status == "FINISHED"
    assert found.data.params == {"model": "tiny", "lr": "0.001", "lora_targets": "q,v", "max_steps": "none",
                                 "compile": "False"}
    history = client.get_metric_history(found.info.run_id, "train/loss")
    assert sorted((m.step, m.value) for m in history) == [(1, 1.0), (2, 0.5), (3, pytest.approx(1 / 3))]
    assert set(found.data.metrics) == {"train/loss", "train/tokens_per_s", "eval/rougeL"}


@pytest.mark.skipif(not has_mlflow, reason="mlflow is not installed (pip install -e .[test])")
def test_a_tracker_that_fails_is_dropped_and_the_run_goes_on(tmp_path, mlflow_store):
    """MLflow's store vanishes mid-run (a full disk, an unmounted share): warned once, dropped, metrics.jsonl and
    TensorBoard go on."""
    import shutil

    logger = MetricsLogger(tmp_path, report_to=["tensorboard", "mlflow"], hparams=HPARAMS)
    logger.log("train", 1, {"loss": 1.0})
    shutil.rmtree(tmp_path / "mlruns")
    with pytest.warns(RuntimeWarning, match="mlflow failed to log .*dropped"):
        logger.log("train", 2, {"loss": 0.5})
    logger.log("train", 3, {"loss": 0.25})
    assert set(logger.trackers) == {"tensorboard"}
    logger.close()
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3]
