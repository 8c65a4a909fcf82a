"""`sumtune report`: the HTML page, checked as text and rendered in a real headless Chromium.

Chromium comes from Debian's `chromium` package (`apt-get install -y chromium`); without /usr/bin/chromium
the browser tests skip. Screenshots go to $SUMTUNE_SCREENSHOT_DIR when set, else to pytest's tmp dir.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import tempfile
from pathlib import Path

import pytest

from sumtune.errors import SumtuneError
from sumtune.report import render_report

from test_plots import write_run

CHROMIUM = Path("/usr/bin/chromium")
needs_chromium = pytest.mark.skipif(not CHROMIUM.exists(), reason="headless browser test needs Debian's chromium "
                                                                   "(/usr/bin/chromium; apt-get install -y chromium)")
HOSTILE = '<script>alert("x")</script> & <img src=x onerror="alert(1)"> "quotes"'


# ---- a run directory built from real sumtune code paths, without training ---------------------------------

def make_run(root: Path, *, profile: bool = True, plots: bool = True) -> Path:
    from sumtune import argparsing
    from sumtune.config import TrainConfig
    from sumtune.evaluation import rouge_scores, write_eval
    from sumtune.plots import write_plots

    run = write_run(root / "run", train_steps=range(1, 31), eval_steps=[0, 15, 30])
    argparsing.write_yaml(TrainConfig(model="tiny", dataset="demo", device="cpu", output_dir=str(run),
                                      source_prefix=HOSTILE), run / "config.yaml")
    references = ["the hawks beat the tigers in oakdale .", "storm closes schools in millbrook on thursday .",
                  HOSTILE]
    predictions = ["the hawks beat the tigers .", "storm closes schools .", "nothing to see"]
    metrics = {**rouge_scores(predictions, references), "gen_len": 5.0, "num_samples": 3, "loss": 2.5}
    write_eval(run / "eval", metrics, [{"index": i, "reference": r, "prediction": p}
                                       for i, (r, p) in enumerate(zip(references, predictions))])
    if plots:
        write_plots(run)
    if profile:
        write_real_profile(run / "profile")
    return run


def write_real_profile(out: Path) -> None:
    """A real StepProfiler summary of a few CPU steps (what `sumtune profile` writes)."""
    import torch

    from sumtune.profiling.profiler import StepProfiler

    prof = StepProfiler(out, wait=0, warmup=1, active=2, device="cpu", samples_per_step=8, tokens_per_step=64)
    model = torch.nn.Linear(32, 4)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with prof:
        for _ in range(3):
            with prof.phase("data"):
                x = torch.randn(8, 32)
            with prof.phase("forward"):
                loss = model(x).square().mean()
            with prof.phase("backward"):
                loss.backward()
            with prof.phase("optimizer"):
                opt.step()
                opt.zero_grad()
            prof.step(samples=8, tokens=64)
    prof.write_summary(out / "summary.json")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    return make_run(tmp_path_factory.mktemp("report"))


# ---- the page as text ---------------------------------------------------------------------------------------

def test_page_is_self_contained_and_complete(run_dir):
    html = render_report(run_dir).read_text(encoding="utf-8")
    assert (run_dir / "report.html").is_file()
    srcs = re.findall(r'\s(?:src|href)="([^"]*)"', html)
    assert srcs and all(s.startswith("data:image/png;base64,") for s in srcs), "only embedded images"
    assert "Content-Security-Policy" in html and "default-src 'none'" in html
    assert html.count('<img src="data:image/png;base64,') == len(list((run_dir / "plots").glob("*.png"))) == 7
    for table in ("evals", "samples", "train", "config"):
        assert f'<table class="{table}">' in html
    assert "step breakdown" in html and "forward" in html  # the profiler summary, as `sumtune profile` prints it
    assert "the hawks beat the tigers in oakdale ." in html and "storm closes schools ." in html


def test_all_run_text_is_escaped(run_dir):
    html = render_report(run_dir).read_text(encoding="utf-8")
    assert "<script>alert" not in html and "<img src=x" not in html
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt; &amp; &lt;img src=x" in html
    assert html.count("<script>") == 1  # ours


def test_config_shows_the_settings_that_differ_from_the_defaults_and_all_behind_a_fold(run_dir):
    from sumtune import argparsing
    from sumtune.config import TrainConfig

    html = render_report(run_dir).read_text(encoding="utf-8")
    config = html.split("<h2>Config</h2>")[1]
    shown = config.split('<table class="config">')[1].split("</table>")[0]
    differing = {"device", "model", "dataset", "output_dir", "source_prefix"}  # what make_run set
    assert re.findall(r"<tr><td>([\w]+)</td>", shown) == sorted(differing)
    assert f"{len(differing)} of {len(argparsing.field_types(TrainConfig))} settings differ" in config
    fold = config.split("<details>")[1].split("</details>")[0]
    assert fold.startswith("<summary>All ") and fold.count("<tr><td>") == len(argparsing.field_types(TrainConfig))


def test_a_collapsed_run_is_said_before_any_score(tmp_path):
    """One summary for every document, one token long: the page warns at the top; a healthy run has no warning."""
    from sumtune.evaluation import rouge_scores, write_eval
    from sumtune.report import collapse_reasons

    run = make_run(tmp_path, profile=False, plots=False)
    assert 'data-collapsed="true"' not in render_report(run).read_text(encoding="utf-8")
    references = ["the hawks beat the tigers in oakdale .", "storm closes schools in millbrook on thursday ."]
    predictions = ["the", "the"]
    metrics = {**rouge_scores(predictions, references), "gen_len": 1.0, "num_samples": 2}
    write_eval(run / "eval", metrics, [{"id": i, "text": "t", "reference": r, "prediction": p}
                                       for i, (r, p) in enumerate(zip(references, predictions))])
    html = render_report(run).read_text(encoding="utf-8")
    warning = html.split('<div class="warn" data-collapsed="true">')[1].split("</div>")[0]
    assert html.index("data-collapsed") < html.index("<h2>Numbers</h2>")
    assert "one token long or empty (mean length 1.00 tokens)" in warning
    assert "every document got the same summary (&#x27;the&#x27;)" in warning
    assert collapse_reasons({"rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0, "rougeLsum": 0.0, "gen_len": 9.0},
                            [{"prediction": "a b c"}, {"prediction": "d e f"}]) == [
        "ROUGE is 0: no summary shares a word with its reference"]


def test_a_final_score_on_a_subset_says_so(tmp_path):
    from sumtune.evaluation import write_eval

    run = make_run(tmp_path, profile=False, plots=False)
    metrics = json.loads((run / "eval" / "metrics.json").read_text())
    write_eval(run / "eval", {**metrics, "heldout_rows": 30}, [])
    html = render_report(run).read_text(encoding="utf-8")
    assert "Final evaluation of the training run on 3 of the 30 held-out documents (a subset: eval_max_samples)" \
        in html


def test_eval_table_has_every_evaluation(run_dir):
    html = render_report(run_dir).read_text(encoding="utf-8")
    evals = html.split('<table class="evals">')[1].split("</table>")[0]
    assert evals.count("<tr>") == 1 + 3  # header + steps 0, 15, 30


def test_missing_plots_are_drawn_in_memory_and_no_profile_is_said(tmp_path):
    run = make_run(tmp_path, profile=False, plots=False)
    out = render_report(run, tmp_path / "elsewhere" / "page.html")
    html = out.read_text(encoding="utf-8")
    assert html.count("data:image/png;base64,") == 7 and not (run / "plots").exists()
    assert "No profile" in html and not (run / "report.html").exists()


def test_user_errors(tmp_path):
    with pytest.raises(SumtuneError, match="does not exist"):
        render_report(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(SumtuneError, match="not a sumtune run directory"):
        render_report(tmp_path / "empty")


def test_cli_report(run_dir, tmp_path, capsys):
    from sumtune.cli import main

    assert main(["report", str(run_dir), "--output", str(tmp_path / "r.html")]) == 0
    assert str(tmp_path / "r.html") in capsys.readouterr().out and (tmp_path / "r.html").is_file()
    assert main(["report", str(tmp_path / "missing")]) == 2
    assert "sumtune: error: Run directory" in capsys.readouterr().err


def test_damaged_metrics_line_is_left_out_and_said(tmp_path, capsys):
    """A kill in the middle of a metrics.jsonl write leaves half a line: the report skips it and says so."""
    from sumtune.cli import main

    run = make_run(tmp_path, profile=False)
    lines = (run / "metrics.jsonl").read_text().splitlines()
    (run / "metrics.jsonl").write_text("\n".join([*lines[:5], lines[5][: len(lines[5]) // 2], *lines[6:], '{"split": "tr'])
                                       + "\n")
    before = (run / "metrics.jsonl").read_bytes()
    assert main(["report", str(run)]) == 0
    err = capsys.readouterr().err
    note = f"metrics.jsonl has 2 damaged line(s) (line 6, {len(lines) + 1}; what a kill in the middle of a write " \
           f"leaves); the report leaves them out."
    assert err.strip() == f"sumtune: {note}"
    html = (run / "report.html").read_text(encoding="utf-8")
    assert note in html and html.count("<tr>") > 10  # the intact lines are all there
    assert (run / "metrics.jsonl").read_bytes() == before  # reported, never repaired in place


# ---- the page in a real browser -----------------------------------------------------------------------------

def chromium(*args: str, timeout_s: float = 90) -> subprocess.CompletedProcess:
    """Headless Chromium with a fresh profile and nothing that reaches the network on its own."""
    with tempfile.TemporaryDirectory(prefix="sumtune-chromium-") as profile:
        cmd = [str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
               "--disable-background-networking", "--disable-component-update", "--disable-sync",
               f"--user-data-dir={profile}", "--enable-logging=stderr", "--v=0", "--hide-scrollbars",
               "--virtual-time-budget=5000", *args]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)


def console_problems(stderr: str) -> list[str]:
    """Page errors Chromium logs: uncaught exceptions, blocked (CSP) loads, failed resources."""
    return [line for line in stderr.splitlines()
            if "Uncaught" in line or "Refused to" in line or ("CONSOLE" in line and "Failed to load" in line)]


def screenshot_dir(tmp_path: Path) -> Path:
    out = Path(os.environ.get("SUMTUNE_SCREENSHOT_DIR") or tmp_path)
    out.mkdir(parents=True, exist_ok=True)
    return out


def check_in_browser(page: Path, expected_images: int, shot: Path) -> str:
    dom = chromium("--dump-dom", page.resolve().as_uri())
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert not console_problems(dom.stderr), console_problems(dom.stderr)
    body = re.search(r"<body([^>]*)>", dom.stdout)
    assert body, "no <body> in the rendered DOM"
    attrs = dict(re.findall(r'([\w-]+)="([^"]*)"', body.group(1)))
    assert attrs.get("data-images-total") == str(expected_images), attrs
    assert attrs.get("data-images-loaded") == str(expected_images), "some plots did not decode"
    for table in ("evals", "samples", "train", "config"):
        assert f'<table class="{table}">' in dom.stdout, f"{table} table not in the rendered page"
    assert "<script>alert" not in dom.stdout  # the hostile sample stayed text after parsing

    shot_run = chromium(f"--screenshot={shot}", "--window-size=1280,2000", page.resolve().as_uri())
    assert shot_run.returncode == 0 and shot.is_file(), shot_run.stderr[-2000:]
    from matplotlib.image import imread

    image = imread(shot)
    assert image.shape[:2] == (2000, 1280)
    assert image[..., :3].std() > 0.05, "the screenshot is blank"
    print(f"report screenshot: {shot}")
    return dom.stdout


@needs_chromium
def test_report_renders_in_headless_chromium(run_dir, tmp_path):
    page = render_report(run_dir)
    dom = check_in_browser(page, 7, screenshot_dir(tmp_path) / "report-fixture.png")
    assert "step breakdown" in dom


@needs_chromium
def test_browser_check_catches_a_broken_page(tmp_path):
    """The checks above can fail: a script error is caught, and the report's own image counter (the script the
    check relies on) counts a broken image as not loaded."""
    import base64

    from sumtune.report import SCRIPT

    page = tmp_path / "broken.html"
    page.write_text('<!DOCTYPE html><html><body><img src="data:image/png;base64,AAAA">'
                    "<script>throw new Error('boom')</script></body></html>")
    result = chromium("--dump-dom", page.as_uri())
    assert any("Uncaught" in line for line in console_problems(result.stderr))

    import io

    from matplotlib.figure import Figure

    buf = io.BytesIO()
    Figure(figsize=(0.1, 0.1), dpi=10).savefig(buf, format="png")  # a real 1x1 PNG
    good_png = base64.b64encode(buf.getvalue()).decode()
    counted = tmp_path / "counted.html"
    counted.write_text(f'<!DOCTYPE html><html><body><img src="data:image/png;base64,{good_png}">'
                       f'<img src="data:image/png;base64,AAAA"><script>{SCRIPT}</script></body></html>')
    dom = chromium("--dump-dom", counted.as_uri())
    attrs = dict(re.findall(r'([\w-]+)="([^"]*)"', re.search(r"<body([^>]*)>", dom.stdout).group(1)))
    assert (attrs.get("data-images-total"), attrs.get("data-images-loaded")) == ("2", "1"), attrs


# ---- a real (short) training run -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def trained_run(tmp_path_factory) -> Path:
    """A real QLoRA run on the shipped demo corpus (tiny T5, NF4), short, with a profile: ~45 s on 2 cores."""
    import sumtune

    out = tmp_path_factory.mktemp("trained") / "run"
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sumtune.train(dict(model="tiny", dataset="demo", compute_dtype="fp32", device="cpu", output_dir=str(out),
                       max_steps=6, batch_size=8, log_every_steps=2, eval_every_steps=3, eval_max_samples=8,
                       eval_batch_size=8, max_new_tokens=8, max_source_tokens=64, max_target_tokens=16,
                       progress=False, profile_steps=2, lr=3e-3, warmup_steps=2, optimizer="adamw"))
    return out


@pytest.mark.slow
def test_trained_run_has_plots_and_its_report_renders(trained_run, tmp_path):
    plots = sorted(p.name for p in (trained_run / "plots").glob("*.png"))
    print("plots written by the recipe:", plots)
    assert {"loss.png", "lr.png", "rouge.png", "step_time.png", "memory.png"} <= set(plots)
    assert (trained_run / "profile" / "summary.json").is_file()
    page = render_report(trained_run)
    html = page.read_text(encoding="utf-8")
    assert "step breakdown" in html and '<table class="samples">' in html
    if CHROMIUM.exists():
        check_in_browser(page, len(plots), screenshot_dir(tmp_path) / "report-trained-run.png")


@pytest.mark.slow
def test_trained_run_is_a_peft_adapter_with_a_hub_model_card(trained_run):
    from huggingface_hub import ModelCard
    from peft import PeftConfig

    adapter = PeftConfig.from_pretrained(str(trained_run))
    assert adapter.peft_type.value == "LORA" and adapter.r > 0
    card = ModelCard.load(trained_run / "README.md")
    # `tiny` is sumtune's random T5: no hub repository to credit as base_model, and no known license
    assert card.data.library_name == "peft" and card.data.base_model is None and card.data.license == "other"
    assert "t5" in card.data.tags and "sumtune's `tiny` T5" in card.text
    assert "rouge" in card.data.metrics
    results = card.data.eval_results  # parsed from model-index
    assert results and {r.metric_type for r in results} >= {"rouge1", "rougeL"}
    expected = json.loads((trained_run / "eval" / "metrics.json").read_text())["rougeL"]
    assert next(r.metric_value for r in results if r.metric_type == "rougeL") == pytest.approx(expected, abs=1e-3)
