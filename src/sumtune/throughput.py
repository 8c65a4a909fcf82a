"""Training speed between two log lines: one object owns the clock and the counters together.

The window counts what the steps did (optimizer steps, samples, tokens, FLOPs) and the training time they
took. Time spent outside the steps (an evaluation, a checkpoint) is paused out of the clock, while the counters
go on: both cover the same steps by construction. (Resetting only a timer after an evaluation inflated the next
log line's tokens/s, step time and MFU: the demo once reported 96,413 tokens/s against ~18,000.)
"""

from __future__ import annotations

import contextlib
import resource
import time
from dataclasses import dataclass
from typing import Callable, Iterator

import torch

from sumtune.flops import mfu


def peak_memory_gib(device: torch.device) -> float:
    """Peak memory of this process so far: GPU allocations on CUDA, resident set size on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


@dataclass(frozen=True)
class WindowTotals:
    """What one window's steps did and how long they trained (seconds, pauses left out)."""

    steps: int
    samples: int
    tokens: int
    flops: float
    seconds: float

    def rates(self, peak_tflops: float | None = None, matmul_tflops: float | None = None) -> dict[str, float]:
        """tokens_per_s, samples_per_s, step_time_s; `mfu` when the GPU's datasheet peak is known and
        `mfu_measured` when its measured matmul rate is (`sumtune.flops.measure_bf16_matmul_tflops`)."""
        seconds = max(self.seconds, 1e-12)
        out = {"tokens_per_s": self.tokens / seconds, "samples_per_s": self.samples / seconds,
               "step_time_s": self.seconds / max(1, self.steps)}
        for key, peak in (("mfu", peak_tflops), ("mfu_measured", matmul_tflops)):
            value = mfu(self.flops, seconds, peak) if self.flops else None
            if value is not None:
                out[key] = value
        return out


class ThroughputWindow:
    """`add()` each finished step; wrap non-training work in `paused()`; `close()` at a log line.

    `sync` waits for queued device work (CUDA) so the clock reads when the work is done, not when it was queued.
    """

    def __init__(self, sync: Callable[[], None] | None = None, clock: Callable[[], float] = time.perf_counter):
        self.sync = sync or (lambda: None)
        self.clock = clock
        self._start()

    def _start(self) -> None:
        self.steps = self.samples = self.tokens = 0
        self.flops = 0.0
        self._paused_s = 0.0
        self._t0 = self.clock()

    def add(self, samples: int, tokens: int, flops: float = 0.0) -> None:
        """Count one optimizer step that ran (a skipped non-finite step did the same work: it counts)."""
        self.steps += 1
        self.samples += samples
        self.tokens += tokens
        self.flops += flops

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Leave the time of the block (evaluation, checkpoint) out of the window. It waits for the device first:
        wrap rare work in it, never every step (the step keeps its one host sync)."""
        self.sync()  # the steps' queued work belongs to the window, not to the pause
        start = self.clock()
        try:
            yield
        finally:
            self._paused_s += self.clock() - start

    def close(self) -> WindowTotals:
        """The window's totals; the next window starts now."""
        self.sync()
        totals = WindowTotals(self.steps, self.samples, self.tokens, self.flops,
                              self.clock() - self._t0 - self._paused_s)
        self._start()
        return totals

    @classmethod
    def for_device(cls, device: torch.device) -> "ThroughputWindow":
        return cls(sync=(lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else None)
