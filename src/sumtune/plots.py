"""Run plots (PNG, matplotlib) drawn from RUN_DIR/metrics.jsonl.

`write_plots(run_dir)` writes RUN_DIR/plots/{loss,lr,rouge,grad_norm,throughput,step_time,memory}.png, each only
when metrics.jsonl has a finite value for it (a run of one logged step still gets its points; a run without
evaluations gets no ROUGE plot). Figures are built with `matplotlib.figure.Figure` on the Agg canvas: no pyplot
global state, no display needed.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

from sumtune.metrics import finite_number, read_metrics, run_config_mapping
from sumtune.safe_io import atomic_write_bytes

ROUGE_KEYS = ("rouge1", "rouge2", "rougeL", "rougeLsum")


@dataclass(frozen=True)
class Series:
    label: str
    steps: list[int]
    values: list[float]


@dataclass(frozen=True)
class PlotSpec:
    name: str       # file stem
    title: str
    ylabel: str
    series: list[Series]
    log_y: bool = False


def series(records: list[dict], split: str, key: str, label: str | None = None) -> Series:
    """The finite values of `key` on `split` lines, by step (a later line for the same step wins)."""
    by_step: dict[int, float] = {}
    for r in records:
        if r.get("split") == split and finite_number(r.get(key)) and finite_number(r.get("step")):
            by_step[int(r["step"])] = float(r[key])
    steps = sorted(by_step)
    return Series(label or key, steps, [by_step[s] for s in steps])


def memory_label(device: str | None) -> str:
    """What `peak_mem_gib` measures: the recipe logs CUDA allocations on a GPU and process RSS on a CPU."""
    if device == "cpu":
        return "peak process RSS (GiB)"
    if device == "cuda":
        return "peak GPU memory allocated (GiB)"
    return "peak memory (GiB; GPU allocated on CUDA, process RSS on CPU)"


def plot_specs(records: list[dict], device: str | None = None) -> list[PlotSpec]:
    """What to draw; series without any point are left out, and plots left with no series are dropped."""
    window = "(mean over each logging window)"
    specs = [
        PlotSpec("loss", "Loss", "cross-entropy loss",
                 [series(records, "train", "loss", "train"), series(records, "eval", "loss", "eval")]),
        PlotSpec("lr", "Learning rate", "learning rate", [series(records, "train", "lr")]),
        PlotSpec("rouge", "ROUGE on the held-out split", "ROUGE F1 (0-100)",
                 [series(records, "eval", k, k) for k in ROUGE_KEYS]),
        PlotSpec("grad_norm", "Gradient norm (before clipping)", "L2 norm",
                 [series(records, "train", "grad_norm")], log_y=True),
        PlotSpec("throughput", f"Training throughput {window}", "tokens / s",
                 [series(records, "train", "tokens_per_s", "tokens/s")]),
        PlotSpec("step_time", f"Step time {window}", "seconds per optimizer step",
                 [series(records, "train", "step_time_s", "step time")]),
        PlotSpec("memory", "Peak memory", memory_label(device),
                 [series(records, "train", "peak_mem_gib", "peak memory")]),
    ]
    out = []
    for spec in specs:
        kept = [s for s in spec.series if s.steps]
        if kept:
            values = [v for s in kept for v in s.values]
            # a log axis only pays off over a wide range (spikes); on a narrow one its labels are unreadable
            log_y = spec.log_y and min(values) > 0 and max(values) / min(values) > 20
            out.append(PlotSpec(spec.name, spec.title, spec.ylabel, kept, log_y))
    return out


def render_png(spec: PlotSpec, dpi: int = 110) -> bytes:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 3.6), dpi=dpi)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for s in spec.series:
        few = len(s.steps) <= 30  # show the points themselves when there are few of them
        ax.plot(s.steps, s.values, marker="o" if few else None, markersize=4, linewidth=1.5, label=s.label)
    ax.set_title(spec.title)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(spec.ylabel)
    if spec.log_y:
        ax.set_yscale("log")
    ax.grid(True, alpha=0.3)
    if len(spec.series) > 1:
        ax.legend()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def run_device(run_dir: Path) -> str | None:
    """The `device` of the run's config.yaml ("cpu", "cuda", "auto"), or None without a readable config."""
    device = run_config_mapping(run_dir).get("device")  # none only costs the memory plot its precise label
    return None if device is None else str(device)


def render_plots(run_dir: str | Path) -> dict[str, bytes]:
    """PNG bytes per plot name, from RUN_DIR/metrics.jsonl (nothing is written)."""
    run = Path(run_dir)
    return {spec.name: render_png(spec) for spec in plot_specs(read_metrics(run), run_device(run))}


def write_plots(run_dir: str | Path, out_dir: str | Path | None = None) -> list[Path]:
    """Write RUN_DIR/plots/*.png (or OUT_DIR/*.png) from metrics.jsonl; returns the files written."""
    out = Path(out_dir) if out_dir is not None else Path(run_dir) / "plots"
    pngs = render_plots(run_dir)
    if not pngs:
        return []
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, data in pngs.items():
        path = out / f"{name}.png"
        atomic_write_bytes(path, data)
        written.append(path)
    return written
