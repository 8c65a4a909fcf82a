"""Progress: bars with rate and ETA on a terminal; elsewhere (logs, CI) and in quiet mode no bars, and one plain
line per logging window."""

from __future__ import annotations

import io
import os

import pytest

from sumtune.progress import Progress


class Terminal(io.StringIO):
    """A stream that says it is a terminal (what tqdm's `disable=None` asks)."""

    def isatty(self) -> bool:
        return True


def test_bars_show_count_rate_and_eta():
    stream = Terminal()
    progress = Progress(enabled=True, stream=stream)
    out = progress.map_chunks(lambda chunk: [x * 2 for x in chunk], list(range(2500)), "tokenizing", chunk_size=1000)
    assert out == [x * 2 for x in range(2500)]
    assert list(progress.iter(iter("abc"), total=3, desc="evaluating", unit="batch")) == ["a", "b", "c"]
    with progress.task("loading", total=4, unit="shard") as bar:
        bar.update(4)
    text = stream.getvalue()
    assert "tokenizing: 100%" in text and "2500/2500" in text and "doc/s" in text
    assert "evaluating: 100%" in text and "3/3" in text and "batch/s" in text
    assert "loading: 100%" in text and "<00:00" in text  # elapsed<remaining: the ETA field


def test_task_without_a_count_reports_its_duration():
    stream = io.StringIO()
    with Progress(enabled=True, stream=stream).task("reading data") as bar:  # announced in logs too
        bar.update(1)  # harmless without a count
    assert stream.getvalue().startswith("reading data …\nreading data: done in ")


def test_quiet_mode_draws_nothing_and_silences_library_bars(monkeypatch):
    monkeypatch.delenv("HF_HUB_DISABLE_PROGRESS_BARS", raising=False)
    stream = io.StringIO()
    progress = Progress(enabled=False, stream=stream)
    assert progress.map_chunks(lambda c: list(c), [1, 2, 3], "tokenizing") == [1, 2, 3]
    assert list(progress.iter(range(3), desc="x")) == [0, 1, 2]
    with progress.task("loading"):
        pass
    bar = progress.bar(10, "training")
    bar.update(1), bar.set_postfix(loss="1.0"), bar.close()
    progress.write("a log line")
    assert stream.getvalue() == "a log line\n"
    assert os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] == "1"


RECORD = {"step": 40, "epoch": 0.6667, "loss": 2.31414, "lr": 2.95e-3, "grad_norm": 1.0234, "tokens_per_s": 18210.4,
          "mfu": 0.3124}


def test_the_log_line_holds_every_field():
    from sumtune.progress import format_train_line

    assert format_train_line(RECORD, 240, eta_s=72.4) == ("step 40/240  epoch 0.67  loss 2.3141  lr 2.95e-03  "
                                                          "grad_norm 1.02  tokens/s 18,210  MFU 31.2%  ETA 0:01:12")
    measured = dict(RECORD, mfu_measured=0.3937)  # the second divisor: the matmul rate measured on the GPU
    assert "  MFU 31.2% (39.4% of measured)  " in format_train_line(measured, 240, eta_s=72.4)
    # a window that captured 4 new batch shapes (4.75 s of warm-ups and captures): said, as its cause
    captures = dict(measured, graph_captures=4, graph_warm_up_s=3.25, graph_record_s=1.5)
    line = format_train_line(captures, 240, 72.4)
    assert "  MFU 31.2% (39.4% of measured)  new shapes 4 (4.8 s)  ETA 0:01:12" in line
    assert "new shapes" not in format_train_line(dict(measured, graph_captures=0), 240)
    cpu = {k: v for k, v in RECORD.items() if k != "mfu"}  # no known peak: no MFU, rather than a made-up one
    assert format_train_line(cpu, 240) == "step 40/240  epoch 0.67  loss 2.3141  lr 2.95e-03  grad_norm 1.02  " \
                                          "tokens/s 18,210"


def test_no_bars_without_a_terminal_but_a_line_per_window():
    """CI, Slurm, nohup, a pipe: no carriage-return bars, and every logging window still says its numbers."""
    stream = io.StringIO()
    progress = Progress(enabled=True, stream=stream)
    assert not progress.bars
    bar = progress.bar(total=240, desc="training")
    for _ in range(40):
        bar.update(1)
    progress.train_log(RECORD, bar, 240, eta_s=72.4)
    bar.close()
    assert list(progress.iter(range(3), desc="evaluating")) == [0, 1, 2]
    assert stream.getvalue() == "step 40/240  epoch 0.67  loss 2.3141  lr 2.95e-03  grad_norm 1.02  " \
                                "tokens/s 18,210  MFU 31.2%  ETA 0:01:12\n"
    assert "\r" not in stream.getvalue()


def test_on_a_terminal_the_bar_shows_the_same_fields():
    stream = Terminal()
    progress = Progress(enabled=True, stream=stream)
    assert progress.bars
    bar = progress.bar(total=240, desc="training")
    bar.update(40)
    progress.train_log(RECORD, bar, 240, eta_s=72.4)
    bar.close()
    text = stream.getvalue()
    assert "training:" in text and "40/240" in text
    last = text.split("\r")[-1]
    for field in ("epoch=0.67", "loss=2.3141", "lr=2.95e-03", "grad_norm=1.02", "tokens/s=18,210", "MFU=31.2%",
                  "ETA=0:01:12"):
        assert field in last, (field, last)
    assert "step 40/240  epoch" not in text  # the line is for logs, not for a terminal that has the bar


def test_no_progress_still_logs_the_loss():
    stream = io.StringIO()
    progress = Progress(enabled=False, stream=stream)
    progress.train_log(RECORD, progress.bar(240, "training"), 240)
    assert stream.getvalue().startswith("step 40/240  epoch 0.67  loss 2.3141")


def test_the_eta_leaves_out_the_seconds_new_shapes_took():
    """A window of 4 steps at 2.5 s a step, 8 of its 10 s spent warming up and capturing new batch shapes: the
    ETA counts 0.5 s a step, the steps' own time (the shapes are not captured again)."""
    from sumtune.progress import eta_step_s

    window = {"step_time_s": 2.5, "graph_captures": 8, "graph_warm_up_s": 5.0, "graph_record_s": 3.0}
    assert eta_step_s(window, 4) == pytest.approx(0.5)
    assert eta_step_s({"step_time_s": 2.5}, 4) == 2.5  # no graphs, or no new shape: the window's own step time
    assert eta_step_s(dict(window, graph_warm_up_s=50.0), 4) == 0.0  # never negative
