"""CUDA graphs for the training step: a micro-batch's forward and backward captured once per batch shape, then
replayed for every later micro-batch of that shape.

Why: with LoRA on every linear layer the T5-3b step launches ~12,000 kernels per micro-batch (measured on an H200,
benchmarks/NOTES.md), and the host cannot launch them as fast as the GPU runs them. A replayed graph launches them
all at once; the host is then free after a few microseconds.

How (the rules of `torch.cuda.graph`):
- inputs live in static device buffers, one set per shape; each micro-batch is copied into its shape's buffers
  (padding to `pad_to_buckets` widths keeps the number of shapes small);
- gradients accumulate into the parameters' `.grad` tensors, which must exist before the capture and are zeroed
  in place between steps (`zero_grad(set_to_none=False)`), so every replay adds into the same memory;
- all graphs share one memory pool (they never run at the same time), which holds the activations of the largest
  shape captured; memory outside it stays free for little more than the weights. So a new shape is not first run
  eagerly at full size, which would need a second set of activations beside the pool (2026-12-01, H200: the shipped
  config's pool held 59.6 GiB, and the eager pass of a shape first met in step 10 ran out of its 75 GiB cap).
  Instead one row of it runs eagerly (its gradients put back as they were), which warms up Triton's autotuner and
  every lazy initialisation at a fraction of the memory, and the micro-batch itself is captured at once and
  replayed; a shape whose widths a warmed shape covers (`warm_up_covers`) skips even that row. `warm_up_rows=None`
  (torch.compile, whose compiled code is specialised to the batch size) keeps a full-size eager pass, after freeing
  the captured graphs so that it has the memory. When even the one row does not fit beside the pool (a tight
  `max_memory_gib`), the graphs are freed and the shapes captured again as they come;
- nothing in the forward or backward may wait for the GPU or draw randomness on the host: dropout draws from
  the CUDA generator, which graphs advance on every replay. If a capture fails anyway, the step says so once and
  stays eager: a graph is a speed-up, never a requirement.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import torch

from sumtune.batching import to_device

BatchKey = tuple[tuple[str, tuple[int, ...]], ...]


def graph_blocker(*, device: torch.device, distributed: bool, gradient_checkpointing: bool) -> str | None:
    """The first reason the step cannot be captured in CUDA graphs, or None when it can."""
    if device.type != "cuda":
        return f"CUDA graphs need a CUDA device, not {device.type}"
    if distributed:
        return "data-parallel steps all-reduce gradients inside the backward (not captured yet)"
    if gradient_checkpointing:
        return "activation checkpointing saves and restores the RNG state on the host"
    return None


def warm_up_rows_for(model: torch.nn.Module) -> int | None:
    """Rows of a new shape to run eagerly before its capture: 1, or None (all of them) when any part of ``model`` is
    torch.compile'd in place (``nn.Module.compile``): its code is specialised to the batch size, and a recompile
    cannot run inside a capture."""
    compiled = any(getattr(module, "_compiled_call_impl", None) is not None for module in model.modules())
    return None if compiled else 1


def batch_key(batch: dict[str, torch.Tensor]) -> BatchKey:
    return tuple((name, tuple(tensor.shape)) for name, tensor in sorted(batch.items()))


# A new shape skips its one-row warm-up when a shape already warmed up covers it. Why: a first epoch of whole bills
# meets ~200 shapes (benchmarks/NOTES.md, session 21), and the autotuner and Triton's specialisations, what the
# warm-up is for, only see each width's power-of-two class and its divisibility by 16. Measured through the product's
# step (benchmarks/first_epoch.py, H200, long config, 200 real bills, 45 new shapes in 49 steps): the first epoch
# 54.5 s -> 38.1 s, warm-ups 22.6 s -> 8.0 s, every shape captured, the same steady step (0.191 / 0.190 s).
# Benchmark token `noclasswarm` turns it off.
WARM_UP_ONLY_UNCOVERED_SHAPES = True


def _width_class(width: int) -> tuple[int, bool]:
    return 1 << max(width - 1, 1).bit_length(), width % 16 == 0


def warm_up_covers(warmed: tuple[BatchKey, int], new: tuple[BatchKey, int]) -> bool:
    """Whether a shape warmed up (`(batch_key, accum)`) makes the warm-up of `new` redundant: the same tensors and
    accumulation, one row or more alike, each width in the same class (power of two above it, divisible by 16 or
    not), and no dimension larger than the warmed one's, so that the capture needs no memory the warm-up has not
    proven free (the warm-up runs one row: this is a proxy, as the captured batch's own memory never was)."""
    (warmed_batch, warmed_accum), (new_batch, new_accum) = warmed, new
    if warmed_accum != new_accum or [n for n, _ in warmed_batch] != [n for n, _ in new_batch]:
        return False
    for (_, had), (_, has) in zip(warmed_batch, new_batch):
        if len(had) != len(has) or (had[0] == 1) != (has[0] == 1):
            return False
        if has[0] > had[0] or any(_width_class(a) != _width_class(b) or b > a for a, b in zip(had[1:], has[1:])):
            return False
    return True


@dataclass
class CapturedMicroStep:
    graph: torch.cuda.CUDAGraph
    inputs: dict[str, torch.Tensor]
    loss: torch.Tensor


class GraphedMicroSteps:
    """`run(host_batch, accum) -> loss`: forward and backward of one micro-batch (its loss scaled by 1/`accum`),
    replayed from a graph when it can be.

    `forward_backward(device_batch, accum) -> loss` does the work (forward, `.backward()`, returns the detached
    loss); `params` are the trained weights whose `.grad` the backward accumulates into. A graph is captured per
    batch shape and `accum`, which it holds as constants. The `.grad` tensors a capture wrote into must stay the
    parameters' own: between steps they are zeroed in place, never set to None.
    """

    def __init__(self, forward_backward: Callable[[dict[str, torch.Tensor], int], torch.Tensor],
                 params: list[torch.Tensor], device: torch.device, notify: Callable[[str], None] = print,
                 warm_up_rows: int | None = 1):
        self.forward_backward = forward_backward
        self.warm_up_rows = warm_up_rows
        self.params = params
        self.device = device
        self.notify = notify
        self.graphs: dict[tuple[BatchKey, int], CapturedMicroStep] = {}
        self.seen: set[tuple[BatchKey, int]] = set()
        self.warmed: list[tuple[BatchKey, int]] = []  # shapes whose one-row warm-up ran
        self.failed: str | None = None
        self.pool = None
        self.pool_freed_for_warm_up = 0  # times a warm-up found no room beside the pool (`_warm_up_beside_the_pool`)
        self.captures = 0  # graphs captured so far, those freed since included
        # Host seconds new shapes cost so far: the eager warm-up until its work is done (the capture's sync), and
        # the capture's recording. The train log shows them per window, the cause of a slow first epoch.
        self.warm_up_s = 0.0
        self.record_s = 0.0

    def release(self) -> None:
        """Forget every captured graph and free its memory pool; the next micro-batch of a shape captures again."""
        if not self.graphs and self.pool is None:
            return
        self.graphs.clear()
        self.pool = None
        torch.cuda.synchronize(self.device)
        torch.cuda.empty_cache()

    def ensure_grads(self) -> None:
        """Give every trained weight a `.grad` buffer (zeros) so backward accumulates in place, captured or not."""
        for param in self.params:
            if param.grad is None:
                param.grad = torch.zeros_like(param)

    def __call__(self, host_batch: dict[str, torch.Tensor], accum: int = 1) -> torch.Tensor:
        key = (batch_key(host_batch), accum)
        captured = self.graphs.get(key)
        first = key not in self.seen
        self.seen.add(key)
        if captured is None and self.failed is None:
            if first and self.warm_up_rows is None:  # a full-size eager warm-up: its activations must not sit
                self.release()                       # beside the graphs' pool; captured at the shape's next batch
                return self._eager(host_batch, accum)
            if self.device.type == "cuda":  # once per new shape: the clock then counts only the warm-up's work
                torch.cuda.synchronize(self.device)
            started = time.perf_counter()
            if first and not (WARM_UP_ONLY_UNCOVERED_SHAPES
                              and any(warm_up_covers(warmed, key) for warmed in self.warmed)):
                self._warm_up_beside_the_pool(host_batch, accum)
                self.warmed.append(key)
            captured = self._capture(key, host_batch, started)
        if captured is None:  # graphs off after a failed capture
            return self._eager(host_batch, accum)
        for name, buffer in captured.inputs.items():
            buffer.copy_(host_batch[name], non_blocking=True)
        captured.graph.replay()
        return captured.loss.clone()  # the buffer is rewritten by the next replay of any graph in the pool

    def _eager(self, host_batch: dict[str, torch.Tensor], accum: int) -> torch.Tensor:
        self.ensure_grads()  # a later capture adds into these very tensors
        return self.forward_backward(to_device(host_batch, self.device), accum)

    def _warm_up_beside_the_pool(self, host_batch: dict[str, torch.Tensor], accum: int) -> None:
        """`_warm_up`, and when its one row does not fit beside the graphs' pool, free the graphs and warm up again.

        Under a tight memory cap the pool may hold all but the room a warm-up needs (2026-12-01, H200: the
        reference's LoRA at micro-batch 4 under 15.3 GiB, 11.8 GiB of pool beside 3.4 GiB of weights). The freed
        shapes are captured again, without a warm-up, when next met; a second out-of-memory error is the run's."""
        try:
            self._warm_up(host_batch, accum)
            return
        except torch.cuda.OutOfMemoryError:
            if self.pool is None:  # nothing to free: the step itself does not fit
                raise
        # outside the except block, so that its traceback (and the tensors it holds) is gone
        if not self.pool_freed_for_warm_up:
            self.notify("sumtune: a new batch shape's warm-up did not fit beside the CUDA graphs' memory; the graphs "
                        "are freed and captured again as their shapes come back (said once).")
        self.pool_freed_for_warm_up += 1
        self.release()
        self._warm_up(host_batch, accum)

    def _warm_up(self, host_batch: dict[str, torch.Tensor], accum: int) -> None:
        """Forward and backward of the first `warm_up_rows` rows of `host_batch`, eagerly, leaving every `.grad` as
        it was: the autotuner, compilers and lazy buffers meet this shape's widths before the capture."""
        self.ensure_grads()
        rows = {name: tensor[: self.warm_up_rows] for name, tensor in host_batch.items()}
        saved = [param.grad.clone() for param in self.params]
        try:
            self.forward_backward(to_device(rows, self.device), accum)
        finally:  # also after an out-of-memory error part-way through the backward
            torch._foreach_copy_([param.grad for param in self.params], saved)

    def _capture(self, key: tuple[BatchKey, int], host_batch: dict[str, torch.Tensor],
                 started: float | None = None) -> CapturedMicroStep | None:
        self.ensure_grads()
        inputs = {k: torch.empty(v.shape, dtype=v.dtype, device=self.device) for k, v in host_batch.items()}
        graph = torch.cuda.CUDAGraph()
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        torch.cuda.synchronize(self.device)  # once per shape: the capture must not see earlier work in flight
        recording = time.perf_counter()
        if started is not None:
            self.warm_up_s += recording - started
        try:
            with torch.cuda.graph(graph, pool=self.pool):
                loss = self.forward_backward(inputs, key[1])
        except Exception as error:  # noqa: BLE001 - any capture failure means: stay eager, and say why once
            self.failed = f"{type(error).__name__}: {str(error).splitlines()[0][:160]}" if str(error) else \
                type(error).__name__
            torch.cuda.synchronize(self.device)
            self.release()  # eager steps from here on need the memory the graphs held
            self.notify(f"sumtune: CUDA graph capture failed ({self.failed}); the step runs eagerly.")
            return None
        captured = CapturedMicroStep(graph=graph, inputs=inputs, loss=loss)
        self.graphs[key] = captured
        self.captures += 1
        self.record_s += time.perf_counter() - recording
        return captured
