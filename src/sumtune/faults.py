"""What a long run does when something goes wrong: signals, NaN/inf steps, GPU memory.

- `StopRequest`: SIGTERM (preemption) and SIGINT (Ctrl-C) only set a flag; the loop finishes its step, writes
  a checkpoint and raises `TrainingInterrupted` (exit status 143 / 130). A second signal stops at once.
- `nonfinite_message`: the sentence for a run stopped by NaN/inf steps, naming the likely cause.
- `NonFiniteGuard`: counts the optimizer steps skipped for a NaN/inf loss or gradient (the step itself never
  applies one, see `sumtune.train_step`) and stops the run after `max_nonfinite_steps` in a row.
- `oom_message`: the sentence for a CUDA out-of-memory error, with the shapes that failed and what to change.
(`batch_size: auto`, which avoids out-of-memory errors up front, is `sumtune.batch_search`.)
"""

from __future__ import annotations

import signal
import threading
from pathlib import Path
from typing import Callable

import torch

from sumtune.errors import SumtuneError

SIGNAL_NAMES = {signal.SIGTERM: "SIGTERM", signal.SIGINT: "SIGINT"}


class TrainingInterrupted(SystemExit):
    """Raised after the checkpoint written on SIGTERM/SIGINT; exits with 128 + the signal number."""

    def __init__(self, signum: int, checkpoint: Path | None):
        super().__init__(128 + signum)
        self.signum = signum
        self.checkpoint = checkpoint

    def __str__(self) -> str:
        return f"stopped by {SIGNAL_NAMES.get(self.signum, self.signum)} (exit status {self.code})"


class StopRequest:
    """Turn SIGTERM/SIGINT into a flag the training loop reads between steps (main thread only)."""

    def __init__(self, notify: Callable[[str], None] | None = None):
        self.signum: int | None = None
        self.notify = notify
        self._previous: dict[int, object] = {}

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():
            for signum in SIGNAL_NAMES:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        self.restore()

    def restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame) -> None:
        if self.signum is not None:  # asked twice: stop now, the last checkpoint on disk stays
            self.restore()
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            signal.raise_signal(signum)
            return
        self.signum = signum
        if self.notify is not None:
            self.notify(f"sumtune: {SIGNAL_NAMES[signum]} received: finishing this step and writing a checkpoint "
                        f"(send it again to stop at once).")


def interrupted_message(signum: int, checkpoint: Path | None, step: int) -> str:
    where = f"checkpoint {checkpoint}" if checkpoint else "no checkpoint"
    return (f"sumtune: stopped by {SIGNAL_NAMES.get(signum, signum)} after step {step}; {where} written; "
            f"continue with the same command plus --resume.")


def nonfinite_message(*, steps_in_a_row: int, compute_dtype: str, lr: float, last_checkpoint: Path | None) -> str:
    if compute_dtype == "fp16":
        cause = ("most likely fp16 overflow in T5's activations (T5 was trained in bf16): use --compute-dtype "
                 "bf16, or fp32 on a GPU without bf16")
    else:
        cause = (f"most likely a learning rate too high for this run (lr {lr:g}; lower --lr or add "
                 f"--warmup-steps) or broken rows in the data")
    kept = f"the last good checkpoint is {last_checkpoint}" if last_checkpoint else "no checkpoint had been written yet"
    return (f"Training stopped: the loss or gradient was NaN/inf in {steps_in_a_row} optimizer steps in a row, "
            f"{cause}; {kept}.")


class NonFiniteGuard:
    """Counts skipped (NaN/inf) optimizer steps; `max_in_a_row` of them in a row stop the run with the likely cause."""

    def __init__(self, *, max_in_a_row: int, compute_dtype: str, lr: float,
                 notify: Callable[[str], None] = print, skipped_total: int = 0):
        self.max_in_a_row = max_in_a_row
        self.compute_dtype, self.lr = compute_dtype, lr
        self.notify = notify
        self.in_a_row = 0
        self.skipped_total = skipped_total  # restored from a checkpoint on resume

    def check(self, step: int, loss: float, grad_norm: float | None, last_checkpoint: Path | None) -> None:
        """After optimizer step `step` (1-based): `grad_norm` None means the step was skipped."""
        if grad_norm is not None:
            self.in_a_row = 0
            return
        self.in_a_row += 1
        self.skipped_total += 1
        self.notify(f"step {step}: loss {loss:g}: the loss or its gradient is NaN/inf, update skipped "
                    f"({self.in_a_row} in a row, {self.skipped_total} in total).")
        if self.in_a_row >= self.max_in_a_row:
            raise SumtuneError(nonfinite_message(steps_in_a_row=self.in_a_row, compute_dtype=self.compute_dtype,
                                                 lr=self.lr, last_checkpoint=last_checkpoint))


def oom_message(*, where: str, micro_batch: int, source_tokens: int, target_tokens: int, grad_accum_steps: int,
                device: torch.device) -> str:
    """One sentence for a CUDA out-of-memory error in training: the shape that failed and what to change."""
    return (f"CUDA ran out of memory{_gpu_size(device)} {where} on a micro-batch of {micro_batch} documents × "
            f"{source_tokens} source / {target_tokens} target tokens (batch_size {micro_batch}, grad_accum_steps "
            f"{grad_accum_steps}); use --batch-size auto, or a smaller --batch-size with more --grad-accum-steps "
            f"(same samples per step), --gradient-checkpointing, or a lower --max-source-tokens.")


def eval_oom_message(*, eval_batch_size: int, num_beams: int, max_new_tokens: int, source_tokens: int,
                     device: torch.device, what: str = "evaluation summaries",
                     batch_option: str = "--eval-batch-size") -> str:
    return (f"CUDA ran out of memory{_gpu_size(device)} while generating {what} ({eval_batch_size} "
            f"documents × {source_tokens} source tokens, {num_beams} beam(s), up to {max_new_tokens} new tokens); "
            f"lower {batch_option} or --num-beams.")


def _gpu_size(device: torch.device) -> str:
    if device.type != "cuda" or not torch.cuda.is_available():
        return ""
    return f" ({torch.cuda.get_device_properties(device).total_memory / 2**30:.0f} GiB GPU)"
