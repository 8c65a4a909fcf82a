"""Kernel time of a profiled run, summed per step: the figures `train_throughput.py --profile` and
`generate_profile.py` save next to their timings (what a step's GPU time went to, by family and by kernel)."""

from __future__ import annotations

import time

import torch

import bench_common as bc


def cuda_kernel_events(prof) -> list[dict]:
    """The GPU kernels a torch.profiler run recorded, as ``{"name", "dur"}`` (microseconds) for `kernel_breakdown`."""
    return [{"name": e.name, "dur": e.time_range.elapsed_us()} for e in prof.events()
            if e.device_type == torch.autograd.DeviceType.CUDA]


def kernel_breakdown(kernels: list[dict], steps: int, wall_s: float, top: int = 20) -> dict:
    """Per step: the kernels' summed time, their share of the wall time, ms by `trace_analysis.kernel_family` and the
    `top` kernels by name (from ``{"name", "dur"}`` events in microseconds, over `steps` steps)."""
    from sumtune.profiling.trace_analysis import family_shares, top_by_name

    kernel_us = sum(float(k["dur"]) for k in kernels)
    by_name = top_by_name(kernels, limit=None)  # every kernel, largest first: the families' shares and the top rows
    shares = family_shares(by_name)  # percent of the kernels' time, largest first
    return dict(steps=steps, wall_s_per_step=wall_s / steps, kernel_s_per_step=kernel_us / 1e6 / steps,
                busy_share=kernel_us / 1e6 / wall_s if wall_s > 0 else None,
                family_ms_per_step={family: pct / 100 * kernel_us / 1e3 / steps for family, pct in shares.items()},
                top_kernels=[dict(row, total_ms=row["total_ms"] / steps, calls=row["calls"] / steps)
                             for row in by_name[:top]])


def profiled(fn, steps: int, device: torch.device, cpu_ops: bool = False):
    """(`kernel_breakdown` of ``steps`` calls of ``fn``, the torch.profiler that recorded them): CUDA kernels on a GPU,
    CPU ops too with ``cpu_ops`` (and on a CPU, which runs no kernels: an empty breakdown). Wall time from the first
    call to the GPU's last kernel."""
    from torch.profiler import ProfilerActivity, profile

    on_gpu = device.type == "cuda"
    activities = ([ProfilerActivity.CPU] if cpu_ops or not on_gpu else []) + ([ProfilerActivity.CUDA] if on_gpu else [])
    start = time.perf_counter()
    with profile(activities=activities) as prof:
        for _ in range(steps):
            fn()
        bc.sync(device)
    return kernel_breakdown(cuda_kernel_events(prof), steps, time.perf_counter() - start), prof
