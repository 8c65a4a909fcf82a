"""Where numbers go: `metrics.jsonl` (one JSON object per line, always) and the trackers `report_to` names.

- `tensorboard` (the default): scalars in RUN_DIR/tb, and the run's hyper-parameters in TensorBoard's HParams tab
  (linked to the eval ROUGE and loss scalars);
- `wandb`: Weights & Biases, project from WANDB_PROJECT (default "sumtune"), run named after the run directory,
  its files under RUN_DIR/wandb (WANDB_MODE=offline needs no account or network);
- `mlflow`: MLflow, where MLFLOW_TRACKING_URI points (MLflow's own default otherwise), experiment from
  MLFLOW_EXPERIMENT_NAME, run named after the run directory.
Each gets the same scalars and the hyper-parameters (the run's resolved config). wandb and mlflow are imported only
when named, and sumtune depends on neither: one that is missing or fails is warned about once, and the run goes on.
"""

from __future__ import annotations

import json
import math
import os
import time
import warnings
from pathlib import Path
from typing import Any

TRACKERS = ("tensorboard", "wandb", "mlflow")
DEFAULT_REPORT_TO = ("tensorboard",)
HPARAM_METRICS = ("eval/rougeL", "eval/rouge1", "eval/rouge2", "eval/loss")  # what TensorBoard's HParams tab shows
_warned: set[str] = set()


def warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


def requested_trackers(report_to: list[str] | tuple[str, ...] | str | None = DEFAULT_REPORT_TO) -> list[str]:
    """The trackers `report_to` names ("wandb,mlflow" or a list; "none" or empty: none), in order, once each."""
    if report_to is None:
        return []
    names = report_to.split(",") if isinstance(report_to, str) else list(report_to)
    out = []
    for name in (str(n).strip().lower() for n in names):
        if not name or name == "none" or name in out:
            continue
        if name not in TRACKERS:
            warn_once(f"unknown:{name}", f"report_to: unknown tracker {name!r} ignored (known: {', '.join(TRACKERS)}).")
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


def flat_hparams(hparams: dict[str, Any]) -> dict[str, int | float | str | bool]:
    """Hyper-parameters as trackers that take only scalars store them: lists joined, None as "none"."""
    out: dict[str, int | float | str | bool] = {}
    for key, value in hparams.items():
        if isinstance(value, (list, tuple)):
            value = ",".join(map(str, value))
        elif value is None:
            value = "none"
        elif not isinstance(value, (int, float, str, bool)):
            value = str(value)
        out[key] = value
    return out


class TensorBoardTracker:
    """TensorBoard: scalars, and the hyper-parameters for the HParams tab, in RUN_DIR/tb."""

    def __init__(self, run_dir: Path, hparams: dict[str, Any], purge_step: int | None = None):
        from torch.utils.tensorboard import SummaryWriter

        self._writer = SummaryWriter(log_dir=str(run_dir / "tb"), purge_step=purge_step)
        if hparams:
            self._write_hparams(hparams)

    def _write_hparams(self, hparams: dict[str, Any]) -> None:
        from torch.utils.tensorboard.summary import hparams as hparams_summary

        # The session's metrics are the eval scalars this writer logs under the same tags (no extra values).
        experiment, session_start, session_end = hparams_summary(flat_hparams(hparams),
                                                                 dict.fromkeys(HPARAM_METRICS, 0.0))
        for summary in (experiment, session_start, session_end):
            self._writer.file_writer.add_summary(summary)

    def log(self, split: str, step: int, values: dict[str, Any]) -> None:
        for key, value in _scalars(split, values).items():
            self._writer.add_scalar(key, value, step)
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()


class WandbTracker:
    """Weights & Biases: project from WANDB_PROJECT (default "sumtune"), run named after the run dir."""

    def __init__(self, run_dir: Path, hparams: dict[str, Any], purge_step: int | None = None):
        import wandb

        self._wandb = wandb
        self._run = wandb.init(project=os.environ.get("WANDB_PROJECT", "sumtune"), name=run_dir.name,
                               dir=str(run_dir), config=hparams)

    def log(self, split: str, step: int, values: dict[str, Any]) -> None:
        self._run.log(_scalars(split, values), step=step)

    def close(self) -> None:
        self._run.finish()
        # finish() returns before wandb's service has written the run file (offline: seen empty for ~1 s after, in
        # 3 of 8 runs); teardown waits for the service, so the run's files are complete when close() returns.
        self._wandb.teardown()


class MlflowTracker:
    """MLflow: experiment from MLFLOW_EXPERIMENT_NAME (MLflow's own default otherwise), run named after the dir."""

    def __init__(self, run_dir: Path, hparams: dict[str, Any], purge_step: int | None = None):
        import mlflow

        self._mlflow = mlflow
        self._run = mlflow.start_run(run_name=run_dir.name)
        params = {k: str(v)[:500] for k, v in flat_hparams(hparams).items()}  # MLflow caps param values
        if params:
            mlflow.log_params(params)

    def log(self, split: str, step: int, values: dict[str, Any]) -> None:
        self._mlflow.log_metrics(_scalars(split, values), step=step)

    def close(self) -> None:
        self._mlflow.end_run()


TRACKER_CLASSES = {"tensorboard": TensorBoardTracker, "wandb": WandbTracker, "mlflow": MlflowTracker}
TRACKER_PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}


def start_tracker(name: str, run_dir: Path, hparams: dict[str, Any], purge_step: int | None = None):
    """The tracker, or None (warned once) when its package is missing or it fails to start."""
    import importlib.util

    package = TRACKER_PACKAGES[name]
    if importlib.util.find_spec(package) is None:
        warn_once(f"missing:{name}", f"report_to asks for {name}, but it is not installed (pip install {package}); "
                                     f"going on without it.")
        return None
    try:
        return TRACKER_CLASSES[name](run_dir, hparams, purge_step)
    except Exception as err:  # noqa: BLE001 - a tracker outage must not cost the training run
        warn_once(f"failed:{name}", f"{name} did not start ({type(err).__name__}: {err}); going on without it.")
    return None


class MetricsLogger:
    """`log(split, step, values)` → metrics.jsonl and every tracker. Trackers start at the first log line, with
    `hparams` (default: RUN_DIR/config.yaml as written by then)."""

    def __init__(self, run_dir: str | Path, *, enabled: bool = True,
                 report_to: list[str] | tuple[str, ...] | str | None = DEFAULT_REPORT_TO,
                 hparams: dict[str, Any] | None = None):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / "metrics.jsonl"
        self.enabled = enabled
        self.hparams = hparams
        self._pending = requested_trackers(report_to) if enabled else []
        self._purge_step: int | None = None
        self.trackers: dict[str, Any] = {}
        self._start = time.perf_counter()

    def log(self, split: str, step: int, values: dict[str, Any]) -> dict[str, Any]:
        record = {"split": split, "step": step, **values, "time_s": round(time.perf_counter() - self._start, 3)}
        if not self.enabled:
            return record
        with self.path.open("a", encoding="utf-8") as fh:
            fh.write(json.dumps(record) + "\n")
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
        self._purge_step = step + 1
        tensorboard = self.trackers.pop("tensorboard", None)
        if tensorboard is not None:  # started already: reopen it with the purge step
            tensorboard.close()
            self._pending.insert(0, "tensorboard")

    def _start_pending(self) -> None:
        hparams = self.hparams if self.hparams is not None else run_config_mapping(self.run_dir)
        while self._pending:
            name = self._pending.pop(0)
            tracker = start_tracker(name, self.run_dir, hparams, self._purge_step)
            if tracker is not None:
                self.trackers[name] = tracker

    def _log_trackers(self, split: str, step: int, values: dict[str, Any]) -> None:
        if self._pending:
            self._start_pending()
        for name, tracker in list(self.trackers.items()):
            try:
                tracker.log(split, step, values)
            except Exception as err:  # noqa: BLE001 - drop a failing tracker, keep training
                warn_once(f"log:{name}", f"{name} failed to log ({type(err).__name__}: {err}); dropped.")
                del self.trackers[name]

    def close(self) -> None:
        for name, tracker in self.trackers.items():
            try:
                tracker.close()
            except Exception as err:  # noqa: BLE001
                warn_once(f"close:{name}", f"{name} failed to finish ({type(err).__name__}: {err}).")
        self.trackers.clear()
        self._pending.clear()


def read_metrics(run_dir: str | Path, damaged: list[int] | None = None) -> list[dict[str, Any]]:
    """The records of RUN_DIR/metrics.jsonl. A line that is not a JSON object (what a kill in the middle of a
    write leaves) is left out; its line number is appended to `damaged` when given."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    records = []
    for number, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            record = None
        if isinstance(record, dict):
            records.append(record)
        elif damaged is not None:
            damaged.append(number)
    return records
