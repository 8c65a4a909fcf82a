"""Run plots: which PNGs a run gets, and that they are real images with something drawn on them."""

from __future__ import annotations

import json
import math

import pytest

from sumtune.metrics import MetricsLogger
from sumtune.plots import memory_label, plot_specs, series, write_plots

ALL_PLOTS = {"loss", "lr", "rouge", "grad_norm", "throughput", "step_time", "memory"}


def train_values(step: int) -> dict:
    return {"epoch": step / 10, "loss": 3.0 / (1 + step), "lr": 1e-3 * min(1, step / 3), "grad_norm": 1.0 + step,
            "tokens_per_s": 1000.0 + 10 * step, "samples_per_s": 20.0, "step_time_s": 0.5 - 0.01 * step,
            "peak_mem_gib": 1.5 + 0.01 * step}


def eval_values(step: int) -> dict:
    return {"epoch": step / 10, "loss": 2.0 / (1 + step), "rouge1": 10.0 + step, "rouge2": 2.0 + step,
            "rougeL": 8.0 + step, "rougeLsum": 8.5 + step, "gen_len": 20.0}


def write_run(run_dir, train_steps, eval_steps, *, drop=(), device="cpu"):
    """A run directory's metrics.jsonl written by the real MetricsLogger (no TensorBoard: not needed here)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(f"device: {device}\nmodel: tiny\n")
    logger = MetricsLogger(run_dir, report_to=[])
    for step in sorted(set(train_steps) | set(eval_steps)):
        if step in train_steps:
            logger.log("train", step, {k: v for k, v in train_values(step).items() if k not in drop})
        if step in eval_steps:
            logger.log("eval", step, eval_values(step))
    logger.close()
    return run_dir


def decoded(path):
    """The PNG decoded by matplotlib: (height, width, channels) floats."""
    from matplotlib.image import imread

    return imread(path)


def test_full_run_gets_every_plot_as_a_real_png(tmp_path):
    run = write_run(tmp_path / "run", train_steps=range(1, 41), eval_steps=[0, 20, 40])
    written = write_plots(run)
    assert {p.stem for p in written} == ALL_PLOTS
    for path in written:
        assert path.parent == run / "plots" and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        image = decoded(path)
        assert image.shape[0] > 200 and image.shape[1] > 400
        rgb = image[..., :3]
        coloured = (rgb.max(axis=-1) - rgb.min(axis=-1)) > 0.2  # data lines; axes, text and grid are grey
        assert coloured.mean() > 1e-3, f"{path.name} draws no data"


def test_few_points_cpu_run_without_memory_or_evals(tmp_path):
    run = write_run(tmp_path / "run", train_steps=[5], eval_steps=[], drop={"peak_mem_gib"})
    names = {p.stem for p in write_plots(run)}
    assert names == {"loss", "lr", "grad_norm", "throughput", "step_time"}  # no ROUGE, no memory: no data
    assert not (run / "plots" / "rouge.png").exists()


def test_run_without_metrics_writes_nothing(tmp_path):
    (tmp_path / "run").mkdir()
    assert write_plots(tmp_path / "run") == []
    assert not (tmp_path / "run" / "plots").exists()


def test_non_finite_values_and_repeated_steps(tmp_path):
    records = [{"split": "train", "step": 1, "loss": float("nan")}, {"split": "train", "step": 2, "loss": 2.0},
               {"split": "train", "step": 2, "loss": 1.5}, {"split": "eval", "step": 2, "loss": 9.0},
               {"split": "train", "step": 3, "loss": True}]
    s = series(records, "train", "loss")
    assert (s.steps, s.values) == ([2], [1.5])  # NaN and bool dropped; the later line for a step wins
    assert [spec.name for spec in plot_specs(records)] == ["loss"]


def test_out_dir_and_memory_labels(tmp_path):
    run = write_run(tmp_path / "run", train_steps=[1, 2], eval_steps=[2], device="cuda")
    written = write_plots(run, tmp_path / "elsewhere")
    assert all(p.parent == tmp_path / "elsewhere" for p in written) and not (run / "plots").exists()
    memory = next(spec for spec in plot_specs(json_lines(run)) if spec.name == "memory")
    assert memory.ylabel == memory_label(None)  # device unknown to plot_specs unless told
    assert "GPU" in memory_label("cuda") and "RSS" in memory_label("cpu")


def test_log_axis_only_for_wide_ranges():
    narrow = [{"split": "train", "step": s, "grad_norm": 1.0 + s / 10} for s in range(5)]
    wide = [{"split": "train", "step": s, "grad_norm": 10.0 ** s} for s in range(5)]
    assert not next(p for p in plot_specs(narrow) if p.name == "grad_norm").log_y
    assert next(p for p in plot_specs(wide) if p.name == "grad_norm").log_y


def json_lines(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("bad", [math.inf, -math.inf])
def test_infinite_values_never_reach_matplotlib(tmp_path, bad):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text(json.dumps({"split": "train", "step": 1, "loss": 1.0, "lr": bad}) + "\n")
    assert {p.stem for p in write_plots(run)} == {"loss"}
