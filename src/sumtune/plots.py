"""Run plots (PNG, matplotlib): placeholder module; the full version is being written."""

from __future__ import annotations

from pathlib import Path


def write_plots(run_dir: str | Path) -> list[Path]:
    """Write RUN_DIR/plots/*.png from metrics.jsonl; returns the files written."""
    return []
