"""`batch_size: auto`: the largest micro-batch that divides the samples per step and fits on the GPU.

Each candidate is measured with a real forward and backward (`loss_fn(make_batch(m)).backward()`) on the batch
the caller makes for it (the recipe: copies of the data's longest source and target); it fits when it raises no
out-of-memory error and its peak stays under `AUTO_BATCH_HEADROOM` of the GPU. Gradient accumulation then keeps
the samples per optimizer step exact. Nothing here knows about recipes or configs.
"""

from __future__ import annotations

import contextlib
import gc
from dataclasses import dataclass
from typing import Callable

import torch

from sumtune.errors import SumtuneError

AUTO_BATCH_HEADROOM = 0.90  # a probe must peak under this share of the GPU: room for fragmentation and eval

Fits = Callable[[int], tuple[bool, dict]]


@dataclass(frozen=True)
class LeanerMode:
    """A memory-saving switch tried at the same micro-batch before a smaller one is (a halved micro-batch costs more
    speed than the switch does)."""

    name: str  # the trial record's key for probes made under it
    held: Callable[[], contextlib.AbstractContextManager]  # the probe runs inside held()
    applies: Callable[[], bool]  # asked after a probe that did not fit: would the switch change anything there?


def micro_batch_candidates(samples_per_step: int, max_micro_batch: int | None = None) -> list[int]:
    """Divisors of `samples_per_step`, largest first: accumulation then keeps the samples per step exact."""
    limit = min(samples_per_step, max_micro_batch or samples_per_step)
    return [m for m in range(limit, 0, -1) if samples_per_step % m == 0]


def choose_micro_batch(candidates: list[int], fits: Fits, leaner: LeanerMode | None = None) -> tuple[int, list[dict]]:
    """The first (largest) candidate that fits, as it is or under `leaner`, and the record of every try (the last
    is the one chosen; `leaner.name` is true in a record made under it)."""
    trials: list[dict] = []
    for micro_batch in candidates:
        ok, info = fits(micro_batch)
        trials.append({"micro_batch": micro_batch, "fits": ok, **info})
        if not ok and leaner is not None and leaner.applies():
            with leaner.held():
                ok, info = fits(micro_batch)
            trials.append({"micro_batch": micro_batch, "fits": ok, leaner.name: True, **info})
        if ok:
            return micro_batch, trials
    raise SumtuneError(f"Not even a micro-batch of {candidates[-1]} fits in GPU memory at the data's longest "
                       f"shapes ({trials[-1].get('detail', 'out of memory')}); lower --max-source-tokens, turn "
                       f"on --gradient-checkpointing, or use a GPU with more memory.")


def memory_budget_bytes(device: torch.device, max_memory_gib: float | None = None) -> int:
    """The GPU memory a run may use: the device's, or `max_memory_gib` when that is smaller."""
    total = torch.cuda.get_device_properties(device).total_memory
    return total if max_memory_gib is None else min(total, int(max_memory_gib * 2**30))


def cap_gpu_memory(device: torch.device, max_memory_gib: float | None) -> None:
    """Make PyTorch's allocator refuse memory beyond `max_memory_gib` on `device` (None: the whole GPU; the cap is
    per process, so a run without one lifts an earlier run's). No-op on a CPU."""
    if device.type != "cuda":
        return
    index = device.index if device.index is not None else torch.cuda.current_device()
    total = torch.cuda.get_device_properties(index).total_memory
    fraction = 1.0 if max_memory_gib is None else min(1.0, max_memory_gib * 2**30 / total)
    torch.cuda.set_per_process_memory_fraction(fraction, index)


def gpu_fits(loss_fn: Callable[[dict], torch.Tensor], model: torch.nn.Module, make_batch: Callable[[int], dict],
             device: torch.device, headroom: float = AUTO_BATCH_HEADROOM,
             max_memory_gib: float | None = None) -> Fits:
    """A `fits(micro_batch)` test: one forward and backward at that size; fits if no OOM and the peak is in budget.

    The probe leaves no gradients behind; `find_micro_batch` saves and restores the RNG states around the search.
    """
    total = memory_budget_bytes(device, max_memory_gib)

    def fits(micro_batch: int) -> tuple[bool, dict]:
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        peak = None
        try:
            batch = make_batch(micro_batch)
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


def find_micro_batch(*, loss_fn: Callable[[dict], torch.Tensor], make_batch: Callable[[int], dict],
                     model: torch.nn.Module, device: torch.device, samples_per_step: int,
                     max_micro_batch: int | None = None, max_memory_gib: float | None = None,
                     leaner: LeanerMode | None = None) -> tuple[int, list[dict]]:
    """Try the divisors of `samples_per_step` (largest first, at most `max_micro_batch`) on the GPU.

    `make_batch(m)` returns a device batch of `m` rows for `loss_fn`; the probes run in training mode and leave
    the RNG states (which dropout draws from) as they found them. `leaner`: a memory-saving switch tried at a
    micro-batch that does not fit, before the next smaller one.
    """
    fits = gpu_fits(loss_fn, model, make_batch, device, max_memory_gib=max_memory_gib)
    with _probing(model, device):
        return choose_micro_batch(micro_batch_candidates(samples_per_step, max_micro_batch), fits, leaner)


def measure_peak_bytes(*, loss_fn: Callable[[dict], torch.Tensor], make_batch: Callable[[int], dict],
                       model: torch.nn.Module, device: torch.device, micro_batch: int) -> float:
    """Peak reserved GPU memory of one forward and backward at `micro_batch` (inf when it runs out of memory);
    like the search, it runs in training mode and leaves the RNG states as it found them."""
    fits = gpu_fits(loss_fn, model, make_batch, device, headroom=float("inf"))
    with _probing(model, device):
        peak_gib = fits(micro_batch)[1]["peak_reserved_gib"]
    return float("inf") if peak_gib is None else peak_gib * 2**30


@contextlib.contextmanager
def _probing(model: torch.nn.Module, device: torch.device):
    rng = (torch.get_rng_state(), torch.cuda.get_rng_state(device))  # probes must not shift dropout
    was_training = model.training
    model.train()
    try:
        yield
    finally:
        model.train(was_training)
        torch.set_rng_state(rng[0])
        torch.cuda.set_rng_state(rng[1], device)
