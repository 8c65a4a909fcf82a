"""What a long run does when something goes wrong: signals, NaN/inf steps, GPU memory.

- `StopRequest`: SIGTERM (preemption) and SIGINT (Ctrl-C) only set a flag; the loop finishes its step, writes
  a checkpoint and raises `TrainingInterrupted` (exit status 143 / 130). A second signal stops at once.
- `nonfinite_message`: the sentence for a run stopped by NaN/inf steps, naming the likely cause.
- `oom_message`: the sentence for a CUDA out-of-memory error, with the shapes that failed and what to change.
- `choose_micro_batch` / `gpu_fits`: `batch_size: auto`, the largest micro-batch that divides the samples per
  step and fits on the GPU (measured with a real forward and backward at the data's longest shapes).
"""

from __future__ import annotations

import gc
import signal
import threading
from pathlib import Path
from typing import Callable

import torch

from sumtune.errors import SumtuneError

SIGNAL_NAMES = {signal.SIGTERM: "SIGTERM", signal.SIGINT: "SIGINT"}
AUTO_BATCH_HEADROOM = 0.90  # a probe must peak under this share of the GPU: room for fragmentation and eval


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


def oom_message(*, where: str, micro_batch: int, source_tokens: int, target_tokens: int, grad_accum_steps: int,
                device: torch.device) -> str:
    """One sentence for a CUDA out-of-memory error in training: the shape that failed and what to change."""
    return (f"CUDA ran out of memory{_gpu_size(device)} {where} on a micro-batch of {micro_batch} documents × "
            f"{source_tokens} source / {target_tokens} target tokens (batch_size {micro_batch}, grad_accum_steps "
            f"{grad_accum_steps}); use --batch-size auto, or a smaller --batch-size with more --grad-accum-steps "
            f"(same samples per step), --gradient-checkpointing, or a lower --max-source-tokens.")


def eval_oom_message(*, eval_batch_size: int, num_beams: int, max_new_tokens: int, source_tokens: int,
                     device: torch.device) -> str:
    return (f"CUDA ran out of memory{_gpu_size(device)} while generating evaluation summaries ({eval_batch_size} "
            f"documents × {source_tokens} source tokens, {num_beams} beam(s), up to {max_new_tokens} new tokens); "
            f"lower --eval-batch-size or --num-beams.")


def _gpu_size(device: torch.device) -> str:
    if device.type != "cuda" or not torch.cuda.is_available():
        return ""
    return f" ({torch.cuda.get_device_properties(device).total_memory / 2**30:.0f} GiB GPU)"


# ---- batch_size: auto ------------------------------------------------------------------------------------------

def micro_batch_candidates(samples_per_step: int, max_micro_batch: int | None = None) -> list[int]:
    """Divisors of `samples_per_step`, largest first: accumulation then keeps the samples per step exact."""
    limit = min(samples_per_step, max_micro_batch or samples_per_step)
    return [m for m in range(limit, 0, -1) if samples_per_step % m == 0]


def choose_micro_batch(candidates: list[int], fits: Callable[[int], tuple[bool, dict]]) -> tuple[int, list[dict]]:
    """The first (largest) candidate that fits, and the record of every try."""
    trials: list[dict] = []
    for micro_batch in candidates:
        ok, info = fits(micro_batch)
        trials.append({"micro_batch": micro_batch, "fits": ok, **info})
        if ok:
            return micro_batch, trials
    raise SumtuneError(f"Not even a micro-batch of {candidates[-1]} fits in GPU memory at the data's longest "
                       f"shapes ({trials[-1].get('detail', 'out of memory')}); lower --max-source-tokens, turn "
                       f"on --gradient-checkpointing, or use a GPU with more memory.")


def gpu_fits(loss_fn: Callable[[dict], torch.Tensor], model: torch.nn.Module, batch_for: Callable[[int], dict],
             device: torch.device, headroom: float = AUTO_BATCH_HEADROOM) -> Callable[[int], tuple[bool, dict]]:
    """A `fits(micro_batch)` test: one forward and backward at that size; fits if no OOM and the peak is in budget.

    The probe leaves no gradients behind; the caller saves and restores the RNG states around the search.
    """
    total = torch.cuda.get_device_properties(device).total_memory

    def fits(micro_batch: int) -> tuple[bool, dict]:
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        peak = None
        try:
            batch = batch_for(micro_batch)
            loss_fn(batch).backward()
            torch.cuda.synchronize(device)
            peak = torch.cuda.max_memory_reserved(device)
        except torch.cuda.OutOfMemoryError:
            pass  # leave the except block at once: its traceback holds the activations
        model.zero_grad(set_to_none=True)
        batch = None
        gc.collect()
        torch.cuda.empty_cache()
        if peak is None:
            return False, {"detail": "out of memory", "peak_reserved_gib": None}
        info = {"peak_reserved_gib": round(peak / 2**30, 2), "gpu_total_gib": round(total / 2**30, 2)}
        if peak > headroom * total:
            return False, {**info, "detail": f"peak {peak / 2**30:.1f} GiB is over {headroom:.0%} of the GPU"}
        return True, info

    return fits


def find_micro_batch(recipe, samples: int, examples: list) -> tuple[int, list[dict]]:
    """Try micro-batches (divisors of `samples`, largest first) at the data's longest shapes on the recipe's GPU."""
    from sumtune.data import TokenizedExample, collate

    longest_source = max(examples, key=lambda e: len(e.input_ids)).input_ids
    longest_target = max(examples, key=lambda e: len(e.labels)).labels
    worst = TokenizedExample(longest_source, longest_target)
    pad_id = recipe.tokenizer.pad_token_id
    fits = gpu_fits(lambda batch: recipe.forward_loss(batch), recipe.model,
                    lambda m: recipe.to_device(collate([worst] * m, pad_id)), recipe.device)
    rng = (torch.get_rng_state(), torch.cuda.get_rng_state(recipe.device))  # probes must not shift dropout
    recipe.model.train()
    try:
        with recipe.progress.task(f"finding the largest micro-batch for {len(longest_source)} source / "
                                  f"{len(longest_target)} target tokens"):
            return choose_micro_batch(micro_batch_candidates(samples, len(examples)), fits)
    finally:
        torch.set_rng_state(rng[0])
        torch.cuda.set_rng_state(rng[1], recipe.device)
