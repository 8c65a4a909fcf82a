"""The run's checkpoints: write one at a step boundary, keep the last N and the best by ROUGE-L.

The file format and its safety (atomic writes, loading, pruning) are `sumtune.checkpoint`'s; this part only
decides what to write and remembers what it wrote. Data-parallel: every rank keeps the bookkeeping (the same
numbers everywhere), rank 0 alone writes files (every rank holds the same adapter and optimizer state).
"""

from __future__ import annotations

from pathlib import Path

import torch

from sumtune import checkpoint


class CheckpointKeeper:
    def __init__(self, root: Path, *, keep_last: int, writes: bool = True):
        self.root = Path(root)
        self.keep_last = keep_last
        self.writes = writes
        self.last: Path | None = None  # the newest checkpoint written or resumed from
        self._saved_at: tuple[int, int] | None = None  # (step, samples seen) of the newest
        self.best_score: float | None = None
        self.best_step: int | None = None

    def resumed(self, path: Path, state: checkpoint.TrainerState) -> None:
        """Note the checkpoint a run continues from (its best score too)."""
        self.last, self._saved_at = Path(path), (state.step, state.samples_seen)
        self.best_score, self.best_step = state.best_score, state.best_step

    def is_current(self, step: int, samples_seen: int) -> bool:
        """Whether the newest checkpoint is of exactly this step and data position (nothing to write again)."""
        return self._saved_at == (step, samples_seen)

    def note_score(self, score: float, step: int) -> bool:
        """Record an evaluation's ROUGE-L; True when it is the best so far."""
        improved = self.best_score is None or score > self.best_score
        if improved:
            self.best_score, self.best_step = score, step
        return improved

    def save(self, *, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
             state: checkpoint.TrainerState) -> Path | None:
        """The full training state → ROOT/step-N (atomically), older ones pruned; None on ranks that do not write."""
        self._saved_at = (state.step, state.samples_seen)
        if not self.writes:
            return None
        path = checkpoint.save_checkpoint(self.root / f"step-{state.step}", model=model, optimizer=optimizer,
                                          state=state)
        checkpoint.prune_checkpoints(self.root, self.keep_last)
        self.last = path
        return path

    def keep_as_best(self, path: Path, extra: dict) -> None:
        """Make ROOT/best a copy of checkpoint `path` (with `extra`, e.g. its step and metrics, beside it)."""
        if self.writes and (Path(path) / checkpoint.STATE_FILE).is_file():
            checkpoint.copy_checkpoint(Path(path), self.root / "best", extra=extra)
