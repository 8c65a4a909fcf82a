"""`sumtune report RUN_DIR`: one self-contained HTML page about a run.

The page holds a warning first when the run looks collapsed (ROUGE 0, one-token or identical summaries), the final
scores (the training's own final evaluation; later `sumtune evaluate` runs are listed apart), the evaluations over
training, a digest of the training log, the plots (PNG, base64-embedded), sample summaries next to their
references, the profiler summary when RUN_DIR/profile/summary.json exists, and the settings that differ from
sumtune's defaults (all of them behind a fold). Nothing is fetched: a Content-Security-Policy forbids any network
request, so the page reads the same offline, attached to an e-mail, or years later. All run text is escaped.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import math
import sys
from html import escape
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from sumtune.errors import SumtuneError
from sumtune.flops import FLOPS_COUNTED
from sumtune.metrics import finite_number, read_metrics, run_config_mapping

MAX_SAMPLES = 12        # sample summaries shown
MAX_TRAIN_ROWS = 40     # training-log rows shown (evenly spaced, always with the last)
EVAL_COLUMNS = ("step", "epoch", "loss", "rouge1", "rouge2", "rougeL", "rougeLsum", "gen_len")
TRAIN_COLUMNS = ("step", "epoch", "loss", "lr", "grad_norm", "tokens_per_s", "samples_per_s", "step_time_s",
                 "peak_mem_gib", "mfu", "mfu_measured", "time_s")
METRIC_LABELS = {"rouge1": "ROUGE-1", "rouge2": "ROUGE-2", "rougeL": "ROUGE-L", "rougeLsum": "ROUGE-Lsum",
                 "gen_len": "mean summary length (tokens)", "loss": "eval loss"}
PLOT_TITLES = {"loss": "Loss", "lr": "Learning rate", "rouge": "ROUGE over training", "grad_norm": "Gradient norm",
               "throughput": "Tokens per second", "step_time": "Step time", "memory": "Peak memory"}

CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'; script-src 'unsafe-inline'"
STYLE = """
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: #1d2330; margin: 0;
       background: #f6f7f9; }
main { max-width: 1240px; margin: 0 auto; padding: 24px 32px 48px; }
h1 { font-size: 24px; margin: 0 0 4px; } h2 { font-size: 18px; margin: 32px 0 10px; border-bottom: 1px solid #d8dce3;
padding-bottom: 4px; } .sub { color: #5b6475; margin: 0 0 16px; }
table { border-collapse: collapse; background: #fff; margin: 6px 0; }
th, td { border: 1px solid #d8dce3; padding: 4px 8px; text-align: left; vertical-align: top; }
th { background: #eef1f5; font-weight: 600; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
.cards { display: flex; flex-wrap: wrap; gap: 10px; }
.card { background: #fff; border: 1px solid #d8dce3; border-radius: 6px; padding: 8px 14px; min-width: 120px; }
.card .v { font-size: 20px; font-weight: 600; } .card .k { color: #5b6475; font-size: 12px; }
.plots { display: grid; grid-template-columns: repeat(auto-fill, minmax(560px, 1fr)); gap: 12px; }
figure { margin: 0; background: #fff; border: 1px solid #d8dce3; border-radius: 6px; padding: 6px; }
figure img { width: 100%; height: auto; display: block; } figcaption { color: #5b6475; font-size: 12px; }
table.samples td { max-width: 520px; white-space: pre-wrap; word-wrap: break-word; }
pre { background: #fff; border: 1px solid #d8dce3; padding: 10px; overflow-x: auto; font-size: 12px; }
.cols2 { display: grid; grid-template-columns: minmax(0, 1fr) minmax(0, 1fr); gap: 24px; }
.none { color: #5b6475; font-style: italic; }
.warn { background: #fff4e5; border: 1px solid #e8a33d; border-left: 6px solid #d9822b; border-radius: 6px;
        padding: 10px 14px; margin: 12px 0; } .warn b { color: #8a4b00; }
details { margin: 8px 0; } summary { cursor: pointer; color: #36507a; }
"""
# Marks <body> once every image has decoded, so a headless browser (and the test) can tell the page rendered.
SCRIPT = """
(function () {
  function check() {
    var imgs = Array.prototype.slice.call(document.images);
    if (!imgs.every(function (i) { return i.complete; })) { setTimeout(check, 25); return; }
    var ok = imgs.filter(function (i) { return i.naturalWidth > 0; }).length;
    document.body.setAttribute("data-images-total", String(imgs.length));
    document.body.setAttribute("data-images-loaded", String(ok));
  }
  if (document.readyState === "complete") { check(); } else { window.addEventListener("load", check); }
})();
"""


# ---- reading the run -------------------------------------------------------------------------------------

def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def read_predictions(run: Path, limit: int | None = MAX_SAMPLES) -> list[dict]:
    """The first `limit` records of RUN_DIR/eval/predictions.jsonl (all of them for None)."""
    path = run / "eval" / "predictions.jsonl"
    out: list[dict] = []
    if not path.is_file():
        return out
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict):
            out.append(record)
        if limit is not None and len(out) >= limit:
            break
    return out


def other_evaluations(run: Path) -> list[tuple[str, dict]]:
    """Evaluations run after training (`sumtune evaluate`: RUN_DIR/eval/NAME/metrics.json), by name."""
    root = run / "eval"
    found = []
    for path in sorted(root.glob("*/metrics.json")) if root.is_dir() else []:
        metrics = _read_json(path)
        if isinstance(metrics, dict):
            found.append((path.parent.name, metrics))
    return found


def collapse_reasons(metrics: dict, predictions: list[dict]) -> list[str]:
    """Why a run's output looks collapsed (what a reader must see before any score): ROUGE 0, summaries of one
    token or none, or one summary for every document. Empty when none of these holds."""
    reasons = []
    scores = [metrics.get(k) for k in ("rouge1", "rouge2", "rougeL", "rougeLsum") if finite_number(metrics.get(k))]
    if scores and max(scores) == 0:
        reasons.append("ROUGE is 0: no summary shares a word with its reference")
    texts = [str(p.get("prediction", "")).strip() for p in predictions]
    gen_len = metrics.get("gen_len")
    if (texts and all(len(t.split()) <= 1 for t in texts)) or (finite_number(gen_len) and gen_len <= 1):
        reasons.append("the summaries are one token long or empty"
                       + (f" (mean length {gen_len:.2f} tokens)" if finite_number(gen_len) else ""))
    if len(texts) > 1 and len(set(texts)) == 1:
        reasons.append(f"every document got the same summary ({texts[0][:120]!r})" if texts[0]
                       else "every document got the same, empty summary")
    return reasons


def section_collapse(reasons: list[str]) -> str:
    if not reasons:
        return ""
    return ('<div class="warn" data-collapsed="true"><b>This run looks collapsed:</b> '
            + escape("; ".join(reasons)) + ". The scores below describe a model that does not summarize yet "
            "(too few steps, too high a learning rate, or a broken dataset).</div>")


def config_differences(config: dict) -> list[tuple[str, Any, Any]]:
    """(setting, value, sumtune's default) for each setting that is not the default; settings this sumtune does
    not know are listed with no default."""
    from sumtune.argparsing import to_mapping
    from sumtune.config import TrainConfig

    defaults = to_mapping(TrainConfig())
    return [(k, v, defaults.get(k)) for k, v in sorted(config.items(), key=lambda kv: str(kv[0]))
            if k not in defaults or defaults[k] != v]


def section_config(config: dict) -> str:
    if not config:
        return _none("No config.yaml in the run directory.")
    differing = config_differences(config)
    html = (f'<p class="sub">{len(differing)} of {len(config)} settings differ from sumtune\'s defaults:</p>'
            + html_table(["setting", "value", "default"], differing, "config") if differing
            else _none("Every setting is sumtune's default."))
    return (html + f"<details><summary>All {len(config)} settings</summary>"
            + html_table(["setting", "value"], sorted(config.items(), key=lambda kv: str(kv[0])), "config-all")
            + "</details>")


def section_other_evaluations(evaluations: list[tuple[str, dict]]) -> str:
    if not evaluations:
        return ""
    rows = [(name, m.get("num_samples"), *(m.get(k) for k in ("rouge1", "rouge2", "rougeL", "rougeLsum", "gen_len")))
            for name, m in evaluations]
    return ("<h2>Other evaluations</h2>"
            '<p class="sub">Run with <code>sumtune evaluate</code> after training (RUN_DIR/eval/NAME/); the numbers '
            "above are the training's own final evaluation.</p>"
            + html_table(["eval/", "documents", "ROUGE-1", "ROUGE-2", "ROUGE-L", "ROUGE-Lsum", "gen_len"], rows,
                         "other-evals"))


def final_metrics(run: Path, records: list[dict]) -> dict:
    metrics = _read_json(run / "eval" / "metrics.json")
    if isinstance(metrics, dict):
        return metrics
    evals = [r for r in records if r.get("split") == "eval"]
    return evals[-1] if evals else {}


def run_plots(run: Path) -> dict[str, bytes]:
    """The run's PNGs from RUN_DIR/plots; drawn in memory from metrics.jsonl when the run has none."""
    files = sorted((run / "plots").glob("*.png")) if (run / "plots").is_dir() else []
    if files:
        order = list(PLOT_TITLES)
        files.sort(key=lambda p: (order.index(p.stem) if p.stem in order else len(order), p.stem))
        return {p.stem: p.read_bytes() for p in files}
    from sumtune.plots import render_plots

    return render_plots(run)


def training_summary(records: list[dict]) -> dict[str, float]:
    train = [r for r in records if r.get("split") == "train"]
    out: dict[str, float] = {}
    if not train:
        return out
    out["steps"] = max(int(r.get("step", 0)) for r in train)
    out["final train loss"] = train[-1].get("loss")
    rates = sorted(r["tokens_per_s"] for r in train if finite_number(r.get("tokens_per_s")))
    if rates:
        out["median tokens/s"] = rates[len(rates) // 2]
    mem = [r["peak_mem_gib"] for r in train if finite_number(r.get("peak_mem_gib"))]
    if mem:
        out["peak memory (GiB)"] = max(mem)
    times = [r["time_s"] for r in records if finite_number(r.get("time_s"))]
    if times:
        out["wall time (s)"] = max(times)
    stop = next((r for r in records if r.get("split") == "early_stop"), None)
    if stop is not None and finite_number(stop.get("step")):
        out["stopped early at step"] = stop["step"]
    return {k: v for k, v in out.items() if v is not None}


# ---- formatting ------------------------------------------------------------------------------------------

def fmt(value: Any) -> str:
    """A cell's text: numbers rounded for reading, lists and dicts as JSON, None as an empty cell."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, int):
        return f"{value:,}" if abs(value) >= 10_000 else str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        if value == 0:
            return "0"
        if abs(value) < 1e-3:
            return f"{value:.3e}"
        if abs(value) >= 1000:
            return f"{value:,.0f}"
        return f"{value:.4g}"
    if isinstance(value, (list, dict)):
        return json.dumps(value, ensure_ascii=False)
    return str(value)


def _cell(value: Any, tag: str = "td") -> str:
    cls = ' class="num"' if tag == "td" and (finite_number(value)) else ""
    return f"<{tag}{cls}>{escape(fmt(value))}</{tag}>"


def html_table(headers: Sequence[str], rows: Iterable[Sequence[Any]], css_class: str = "") -> str:
    cls = f' class="{escape(css_class)}"' if css_class else ""
    head = "".join(_cell(h, "th") for h in headers)
    body = "".join("<tr>" + "".join(_cell(v) for v in row) + "</tr>" for row in rows)
    return f"<table{cls}><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _spaced(rows: list[dict], limit: int) -> list[dict]:
    if len(rows) <= limit:
        return rows
    picks = {round(i * (len(rows) - 1) / (limit - 1)) for i in range(limit)}
    return [rows[i] for i in sorted(picks)]


def _none(text: str) -> str:
    return f'<p class="none">{escape(text)}</p>'


# ---- sections --------------------------------------------------------------------------------------------

def section_numbers(metrics: dict, summary: dict, best: dict | None) -> str:
    cards = [(label, metrics[k]) for k, label in METRIC_LABELS.items() if finite_number(metrics.get(k))]
    cards += list(summary.items())
    html = '<div class="cards">' + "".join(
        f'<div class="card"><div class="v">{escape(fmt(v))}</div><div class="k">{escape(k)}</div></div>'
        for k, v in cards) + "</div>"
    if not cards:
        html = _none("This run has no metrics yet.")
    if metrics:
        n, total = metrics.get("num_samples"), metrics.get("heldout_rows")
        if finite_number(n) and finite_number(total) and n < total:
            on = f" on {int(n)} of the {int(total)} held-out documents (a subset: eval_max_samples)"
        else:
            on = f" on {int(n)} held-out documents" if finite_number(n) else ""
        html += f'<p class="sub">Final evaluation of the training run{escape(on)} (ROUGE F1 ×100, Porter ' \
                "stemming).</p>"
    if best and finite_number(best.get("step")):
        html += f'<p class="sub">Best checkpoint (by ROUGE-L): step {escape(fmt(best["step"]))}, ROUGE-L ' \
                f'{escape(fmt(best.get("rougeL")))} — checkpoints/best.</p>'
    return html


def section_plots(pngs: dict[str, bytes]) -> str:
    if not pngs:
        return _none("No plots: metrics.jsonl holds no training or evaluation lines.")
    figures = []
    for name, data in pngs.items():
        title = PLOT_TITLES.get(name, name)
        src = "data:image/png;base64," + base64.b64encode(data).decode("ascii")
        figures.append(f'<figure><img src="{src}" alt="{escape(title)}" data-plot="{escape(name)}">'
                       f"<figcaption>{escape(name)}.png</figcaption></figure>")
    return '<div class="plots">' + "".join(figures) + "</div>"


def section_samples(predictions: list[dict]) -> str:
    if not predictions:
        return _none("No sample summaries (eval/predictions.jsonl is missing).")
    from sumtune.evaluation import rouge_scores

    rows = []
    for p in predictions:
        ref, pred = str(p.get("reference", "")), str(p.get("prediction", ""))
        rouge_l = rouge_scores([pred], [ref])["rougeL"] if ref.strip() else None
        rows.append((p.get("id", p.get("index")), ref, pred, rouge_l))
    return html_table(["id", "reference", "sumtune", "ROUGE-L"], rows, "samples")


def section_lengths(run: Path) -> str:
    """What the run's length limits cut (truncation.json, written when training starts)."""
    from sumtune import truncation

    report = truncation.load(run)
    if report is None:
        return _none(f"No length figures ({truncation.REPORT_FILE} is missing: a run from an older sumtune).")
    rows = [(label, s.limit, truncation.percent(s.over_limit, s.documents), truncation.percent(s.tokens_cut, s.tokens),
             s.median, s.p90, f"{s.longest}+" if s.at_count_limit else s.longest, s.keep_limit)
            for label, s in (("documents (source)", report.source), ("summaries (target)", report.target))]
    counted_with = report.tokenizer or "the run's tokenizer"
    return (f'<p class="sub" data-truncation>{escape(report.line())}</p>'
            + html_table(["training split", "limit (tokens)", "over the limit", "tokens cut", "median", "p90",
                          "longest", f"keeps {round(100 * truncation.KEEP_SHARE)}% whole"], rows, "lengths")
            + f'<p class="sub">Whole lengths in tokens, counted with {escape(counted_with)}, the source'
              f" with its prefix; the last column is the smallest limit, rounded up to a multiple of "
              f"{truncation.SOURCE_MULTIPLE} (source) or {truncation.TARGET_MULTIPLE} (target), that keeps "
              f"{round(100 * truncation.KEEP_SHARE)}% of them whole.</p>")


def section_profile(summary: Any) -> str:
    if not isinstance(summary, dict):
        return _none("No profile (run `sumtune profile` or `sumtune train --profile-steps N` to add one).")
    try:
        from sumtune.profiling.report import format_summary

        text = format_summary(summary)
    except (KeyError, TypeError, ValueError, ImportError):  # a summary from another version: show it raw
        text = json.dumps(summary, indent=2, default=str)
    return f"<pre>{escape(text)}</pre>"


# ---- the page --------------------------------------------------------------------------------------------

def damaged_lines_note(damaged: list[int]) -> str:
    shown = ", ".join(map(str, damaged[:5])) + (", ..." if len(damaged) > 5 else "")
    return (f"metrics.jsonl has {len(damaged)} damaged line(s) (line {shown}; what a kill in the middle of a write "
            f"leaves); the report leaves them out.")


def build_html(run: Path, damaged: list[int] | None = None) -> str:
    """The page; the line numbers of damaged metrics.jsonl lines are appended to `damaged` when given."""
    damaged = [] if damaged is None else damaged
    records = read_metrics(run, damaged)
    config = run_config_mapping(run)
    if not records and not config:
        raise SumtuneError(f"{str(run)!r} is not a sumtune run directory (no metrics.jsonl or config.yaml).")
    metrics = final_metrics(run, records)
    metrics = metrics if isinstance(metrics, dict) else {}
    collapse = collapse_reasons(metrics, read_predictions(run, limit=None))
    best = _read_json(run / "checkpoints" / "best" / "checkpoint.json")
    evals = [r for r in records if r.get("split") == "eval"]
    train = [r for r in records if r.get("split") == "train"]
    train_cols = [c for c in TRAIN_COLUMNS if any(c in r for r in train)]
    try:
        from sumtune.version import __version__ as version
    except ImportError:
        version = "?"
    title = f"sumtune run: {run.name}"
    model, dataset = config.get("model", "?"), config.get("dataset", "?")
    parts = [
        f"<h1>{escape(title)}</h1>",
        f'<p class="sub">model <b>{escape(str(model))}</b> on <b>{escape(str(dataset))}</b> — {escape(str(run))}</p>',
        f'<p class="none">{escape(damaged_lines_note(damaged))}</p>' if damaged else "",
        section_collapse(collapse),
        "<h2>Numbers</h2>", section_numbers(metrics, training_summary(records), best if isinstance(best, dict) else None),
        section_other_evaluations(other_evaluations(run)),
        "<h2>Document and summary lengths</h2>", section_lengths(run),
        "<h2>Plots</h2>", section_plots(run_plots(run)),
        "<h2>Evaluations over training</h2>",
        html_table(EVAL_COLUMNS, [[r.get(c) for c in EVAL_COLUMNS] for r in evals], "evals") if evals
        else _none("No evaluation lines in metrics.jsonl."),
        "<h2>Sample summaries (held-out documents)</h2>", section_samples(read_predictions(run)),
        "<h2>Training log</h2>",
        (f'<p class="sub">{len(_spaced(train, MAX_TRAIN_ROWS))} of {len(train)} logged windows; '
         "all of them are in metrics.jsonl and TensorBoard (tb/)."
         + (f" MFU: {escape(FLOPS_COUNTED)} (sumtune.flops)." if "mfu" in train_cols else "")
         + (" mfu against the GPU's datasheet bf16 peak, mfu_measured against the bf16 matmul rate measured on it"
            " when training started." if "mfu_measured" in train_cols else "") + "</p>"
         + html_table(train_cols, [[r.get(c) for c in train_cols] for r in _spaced(train, MAX_TRAIN_ROWS)], "train"))
        if train else _none("No training lines in metrics.jsonl."),
        "<h2>Profile</h2>", section_profile(_read_json(run / "profile" / "summary.json")),
        "<h2>Config</h2>", section_config(config),
        f'<p class="sub">Written by sumtune {escape(str(version))} on '
        f'{escape(dt.datetime.now().isoformat(timespec="seconds"))}.</p>',
    ]
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f'<meta http-equiv="Content-Security-Policy" content="{CSP}">'
            '<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{escape(title)}</title><style>{STYLE}</style></head>\n"
            f"<body><main>{''.join(parts)}</main><script>{SCRIPT}</script></body></html>\n")


def render_report(run_dir: str | Path, output: str | Path | None = None,
                  notify: Callable[[str], None] | None = None) -> Path:
    """Write the run's HTML report to OUTPUT (default RUN_DIR/report.html), whole or not at all; returns its path.
    `notify` (default: stderr) hears about damaged metrics.jsonl lines."""
    from sumtune.safe_io import atomic_write_text, check_output_location, require_dir

    run = require_dir(run_dir, "Run directory")
    out = check_output_location(run / "report.html" if output is None else output, "Report file", is_file=True)
    damaged: list[int] = []
    html = build_html(run, damaged)
    if damaged:
        (notify or (lambda line: print(line, file=sys.stderr)))(f"sumtune: {damaged_lines_note(damaged)}")
    try:
        atomic_write_text(out, html)
    except OSError as err:
        raise SumtuneError(f"Cannot write the report to {str(out)!r}: {err.strerror or err}.") from None
    return out
