"""Where numbers go: `metrics.jsonl` (one JSON object per line) and TensorBoard scalars, in one call.

Weights & Biases and MLflow get the same scalars when asked for with `SUMTUNE_REPORT_TO=wandb,mlflow` (or
`report_to=[...]`) and their package is installed; sumtune depends on neither. A requested one that is missing
or fails to start is warned about once, and the run goes on without it.
"""

from __future__ import annotations

import json
import math
import os
import time
import warnings
from pathlib import Path
from typing import Any

REPORT_TO_ENV = "SUMTUNE_REPORT_TO"
TRACKERS = ("wandb", "mlflow")
_warned: set[str] = set()


def warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


def requested_trackers(report_to: list[str] | str | None = None) -> list[str]:
    """Trackers asked for by `report_to` or, when it is None, by SUMTUNE_REPORT_TO ("wandb,mlflow"; "none")."""
    if report_to is None:
        report_to = os.environ.get(REPORT_TO_ENV, "")
    names = report_to.split(",") if isinstance(report_to, str) else list(report_to)
    out = []
    for name in (n.strip().lower() for n in names):
        if not name or name == "none" or name in out:
            continue
        if name not in TRACKERS:
            warn_once(f"unknown:{name}", f"{REPORT_TO_ENV}: unknown tracker {name!r} ignored "
                                         f"(known: {', '.join(TRACKERS)}).")
            continue
        out.append(name)
    return out


def finite_number(value: Any) -> bool:
    """A real, finite int or float (not a bool, NaN, inf, None or text): what a plot, a table or a tracker can show."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _scalars(split: str, values: dict[str, Any]) -> dict[str, float]:
    return {f"{split}/{k}": float(v) for k, v in values.items() if finite_number(v)}


def run_config_mapping(run_dir: str | Path) -> dict:
    """RUN_DIR/config.yaml as a plain mapping, or {} when missing or unreadable: for the trackers, plots and
    report, which show it as a courtesy and never fail for it (`inference.read_run_config` is the strict reader)."""
    import yaml

    try:
        cfg = yaml.safe_load((Path(run_dir) / "config.yaml").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, yaml.YAMLError):
        return {}
    return cfg if isinstance(cfg, dict) else {}


class WandbTracker:
    """Weights & Biases: project from WANDB_PROJECT (default "sumtune"), run named after the run dir."""

    def __init__(self, run_dir: Path):
        import wandb

        self._wandb = wandb
        self._run = wandb.init(project=os.environ.get("WANDB_PROJECT", "sumtune"), name=run_dir.name,
                               dir=str(run_dir), config=run_config_mapping(run_dir))

    def log(self, split: str, step: int, values: dict[str, Any]) -> None:
        self._run.log(_scalars(split, values), step=step)

    def close(self) -> None:
        self._run.finish()


class MlflowTracker:
    """MLflow: experiment from MLFLOW_EXPERIMENT_NAME (MLflow's own default otherwise), run named after the dir."""

    def __init__(self, run_dir: Path):
        import mlflow

        self._mlflow = mlflow
        self._run = mlflow.start_run(run_name=run_dir.name)
        params = {k: str(v)[:500] for k, v in run_config_mapping(run_dir).items()}  # MLflow caps param values
        if params:
            mlflow.log_params(params)

    def log(self, split: str, step: int, values: dict[str, Any]) -> None:
        self._mlflow.log_metrics(_scalars(split, values), step=step)

    def close(self) -> None:
        self._mlflow.end_run()


TRACKER_CLASSES = {"wandb": WandbTracker, "mlflow": MlflowTracker}


def start_tracker(name: str, run_dir: Path):
    """The tracker, or None (warned once) when its package is missing or it fails to start."""
    import importlib.util

    if importlib.util.find_spec(name) is None:
        warn_once(f"missing:{name}", f"{REPORT_TO_ENV} asks for {name}, but it is not installed "
                                     f"(pip install {name}); going on without it.")
        return None
    try:
        return TRACKER_CLASSES[name](run_dir)
    except Exception as err:  # noqa: BLE001 - a tracker outage must not cost the training run
        warn_once(f"failed:{name}", f"{name} did not start ({type(err).__name__}: {err}); going on without it.")
    return None


class MetricsLogger:
    def __init__(self, run_dir: str | Path, *, tensorboard: bool = True, enabled: bool = True,
                 report_to: list[str] | str | None = None):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / "metrics.jsonl"
        self.enabled = enabled
        self._writer = None
        # Trackers start at the first log line, when config.yaml (their run config) has been written.
        self._pending = requested_trackers(report_to) if enabled else []
        self.trackers: dict[str, Any] = {}
        self._start = time.perf_counter()
        if enabled and tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(log_dir=str(Path(run_dir) / "tb"))

    def log(self, split: str, step: int, values: dict[str, Any]) -> dict[str, Any]:
        record = {"split": split, "step": step, **values, "time_s": round(time.perf_counter() - self._start, 3)}
        if not self.enabled:
            return record
        with self.path.open("a", encoding="utf-8") as fh:
            fh.write(json.dumps(record) + "\n")
        if self._writer is not None:
            for key, value in values.items():
                if finite_number(value):
                    self._writer.add_scalar(f"{split}/{key}", value, step)
            self._writer.flush()
        self._log_trackers(split, step, values)
        return record

    def rewind(self, metrics_bytes: int, step: int) -> None:
        """A resumed run redoes what followed its checkpoint: cut metrics.jsonl back to `metrics_bytes` (its length
        at the checkpoint) and have TensorBoard drop the events after `step`."""
        if not self.enabled:
            return
        if self.path.is_file():
            with self.path.open("r+b") as fh:
                fh.truncate(metrics_bytes)
        if self._writer is not None:
            from torch.utils.tensorboard import SummaryWriter

            log_dir = self._writer.log_dir
            self._writer.close()
            self._writer = SummaryWriter(log_dir=log_dir, purge_step=step + 1)

    def _log_trackers(self, split: str, step: int, values: dict[str, Any]) -> None:
        while self._pending:
            name = self._pending.pop(0)
            tracker = start_tracker(name, self.run_dir)
            if tracker is not None:
                self.trackers[name] = tracker
        for name, tracker in list(self.trackers.items()):
            try:
                tracker.log(split, step, values)
            except Exception as err:  # noqa: BLE001 - drop a failing tracker, keep training
                warn_once(f"log:{name}", f"{name} failed to log ({type(err).__name__}: {err}); dropped.")
                del self.trackers[name]

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        for name, tracker in self.trackers.items():
            try:
                tracker.close()
            except Exception as err:  # noqa: BLE001
                warn_once(f"close:{name}", f"{name} failed to finish ({type(err).__name__}: {err}).")
        self.trackers.clear()


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
