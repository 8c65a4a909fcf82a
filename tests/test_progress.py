"""Progress: bars with rate and ETA when on, nothing drawn in quiet mode (logs, CI)."""

from __future__ import annotations

import io
import os

from sumtune.progress import Progress


def test_bars_show_count_rate_and_eta():
    stream = io.StringIO()
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
    with Progress(enabled=True, stream=stream).task("reading data") as bar:
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
