"""Step profilers used by the training loop.

`NULL_PROFILER` is what the loop gets when profiling is off: `phase()` hands back one shared
`nullcontext` and `step()` does nothing, so the hot path has no branches and no allocations.
`StepProfiler` wraps `torch.profiler.profile` with a wait/warmup/active schedule, writes a trace the
TensorBoard profiler plugin opens, and times the loop's phases on the host for the summary.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from sumtune.errors import SumtuneError
from sumtune.profiling import trace_analysis

PHASES = ("data", "h2d", "forward", "backward", "optimizer")
GIB = 1024**3
_NULL_CTX = contextlib.nullcontext()

class NullProfiler:
    """Profiler that does nothing; the loop's default when profiling is off."""

    __slots__ = ()
    done = False
    is_recording = False

    def phase(self, name: str) -> contextlib.nullcontext:
        return _NULL_CTX

    def step(self, samples: int | None = None, tokens: int | None = None, flops: float | None = None) -> None:
        return None

    def describe_run(self, **run: Any) -> None:
        return None

    def __enter__(self) -> "NullProfiler":
        return self

    def __exit__(self, *exc: object) -> bool:
        return False


NULL_PROFILER = NullProfiler()


def _profiler_sync() -> None:
    """The profiler's own timing sync, marked so the trace analysis does not count it as the step's."""
    with torch.profiler.record_function(trace_analysis.PROFILER_SYNC_LABEL):
        torch.cuda.synchronize()


@dataclass
class StepRecord:
    """What one recorded (active) step cost."""

    step_time_s: float
    phases_s: dict[str, float]
    peak_mem_bytes: int
    end_mem_bytes: int
    reserved_peak_bytes: int | None = None
    graph_pool_bytes: int = 0
    """Memory that captured CUDA graphs hold for their replays (cached in their private pools, so not "allocated"
    between replays; included in `peak_mem_bytes`)."""
    samples: int | None = None
    tokens: int | None = None
    flops: float | None = None
    nvml_util_pct: float | None = None


@dataclass
class _PhaseTimer:
    """Context manager for one phase: a `record_function` range plus honest host wall time."""

    owner: "StepProfiler"
    name: str
    _range: Any = field(default=None, init=False)
    _t0: float = field(default=0.0, init=False)

    def __enter__(self) -> "_PhaseTimer":
        self.owner._ensure_started()
        self._range = torch.profiler.record_function(f"{trace_analysis.PHASE_PREFIX}{self.name}")
        self._range.__enter__()
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> bool:
        owner = self.owner
        recording = owner.is_recording
        if recording and owner._sync:  # wait for queued kernels so the phase owns its GPU time
            _profiler_sync()
        elapsed_s = time.perf_counter() - self._t0
        self._range.__exit__(None, None, None)
        if recording:  # += so repeated phases (gradient accumulation) add up
            owner._phases_s[self.name] = owner._phases_s.get(self.name, 0.0) + elapsed_s
        return False


class StepProfiler:
    """`torch.profiler` over `wait + warmup + active` loop steps, plus a summary a person can act on.

    Use as a context manager around the loop (or let the first `phase()` start it); call `phase(name)`
    around each part of the step and `step()` at its end. After the last active step the torch profiler
    is stopped and `phase()` returns a shared nullcontext, so a long run continues at full speed.
    """

    def __init__(
        self,
        out_dir: str | Path,
        *,
        wait: int = 1,
        warmup: int = 1,
        active: int = 3,
        record_shapes: bool = True,
        profile_memory: bool = True,
        with_stack: bool = False,
        device: str = "cuda",
        samples_per_step: int | None = None,
        tokens_per_step: int | None = None,
        flops_per_step: float | None = None,
        peak_tflops: float | None = None,
        context: dict[str, Any] | None = None,
        sync_phases: bool = True,
    ) -> None:
        if wait < 0 or warmup < 0 or active < 1:
            raise SumtuneError(f"profiler schedule needs wait>=0, warmup>=0, active>=1 (got {wait}, {warmup}, {active}).")
        self.out_dir = Path(out_dir)
        self.wait, self.warmup, self.active = int(wait), int(warmup), int(active)
        self.record_shapes, self.profile_memory, self.with_stack = record_shapes, profile_memory, with_stack
        self.device = device
        self.samples_per_step = samples_per_step
        self.tokens_per_step = tokens_per_step
        self.flops_per_step = flops_per_step
        self.peak_tflops = peak_tflops
        self.matmul_tflops: float | None = None
        self.context = dict(context or {})
        self.sync_phases = sync_phases
        self.records: list[StepRecord] = []
        self.trace_path: Path | None = None
        self.top_ops: list[dict[str, Any]] = []
        self._prof: torch.profiler.profile | None = None
        self._stopped = False
        self._step_index = 0  # index of the loop step in progress
        self._phases_s: dict[str, float] = {}
        self._step_t0 = 0.0
        self._sync = False
        self._cuda = False

    # -- state -------------------------------------------------------------------------------------
    @property
    def total_steps(self) -> int:
        return self.wait + self.warmup + self.active

    @property
    def is_recording(self) -> bool:
        """True while the step in progress is one of the active (measured) steps."""
        return self._prof is not None and self.wait + self.warmup <= self._step_index < self.total_steps

    @property
    def done(self) -> bool:
        """All active steps are recorded (or the profiler was stopped early)."""
        return self._stopped

    def describe_run(self, *, device: str, peak_tflops: float | None = None, samples_per_step: int | None = None,
                     context: dict[str, Any] | None = None, matmul_tflops: float | None = None) -> None:
        """What the training run is, once it is built (device, resolved batch, settings for the advice).

        The recipe calls this at the end of its setup, for `sumtune profile` and `train --profile-steps` alike;
        FLOPs, samples and tokens come with each `step()`."""
        self.device = device
        if peak_tflops is not None:
            self.peak_tflops = peak_tflops
        if matmul_tflops is not None:  # this GPU's measured bf16 matmul rate: the second MFU figure's divisor
            self.matmul_tflops = matmul_tflops
        if samples_per_step is not None:
            self.samples_per_step = samples_per_step
        if context is not None:
            self.context = dict(context)

    # -- lifecycle ---------------------------------------------------------------------------------
    def __enter__(self) -> "StepProfiler":
        self._ensure_started()
        return self

    def __exit__(self, *exc: object) -> bool:
        self._stop()
        return False

    def _ensure_started(self) -> None:
        if self._prof is not None or self._stopped:
            return
        if self.device not in ("cuda", "cpu"):
            raise SumtuneError(f"profiler device must be 'cuda' or 'cpu', not {self.device!r}.")
        if self.device == "cuda" and not torch.cuda.is_available():
            raise SumtuneError("profiling on 'cuda' was requested but no CUDA GPU is available.")
        self._cuda = self.device == "cuda"
        self._sync = self._cuda and self.sync_phases
        self.out_dir.mkdir(parents=True, exist_ok=True)
        activities = [torch.profiler.ProfilerActivity.CPU]
        if self._cuda:
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        self._handler = torch.profiler.tensorboard_trace_handler(str(self.out_dir))
        self._prof = torch.profiler.profile(
            activities=activities,
            schedule=torch.profiler.schedule(wait=self.wait, warmup=self.warmup, active=self.active, repeat=1),
            on_trace_ready=self._on_trace_ready,
            record_shapes=self.record_shapes,
            profile_memory=self.profile_memory,
            with_stack=self.with_stack,
        )
        self._prof.__enter__()
        self._begin_step()

    def _stop(self) -> None:
        if self._prof is not None and not self._stopped:
            self._stopped = True  # before __exit__: a partial trace may be flushed from there
            self._prof.__exit__(None, None, None)
        self._stopped = True

    def _on_trace_ready(self, prof: torch.profiler.profile) -> None:
        before = set(trace_analysis.find_trace_files(self.out_dir))
        self._handler(prof)
        new = [p for p in trace_analysis.find_trace_files(self.out_dir) if p not in before]
        self.trace_path = new[-1] if new else None
        self.top_ops = top_cpu_ops(prof, cuda=self._cuda)

    # -- per step ----------------------------------------------------------------------------------
    def phase(self, name: str):
        """Context manager timing one phase of the step (data, h2d, forward, backward, optimizer)."""
        if self._stopped:
            return _NULL_CTX
        return _PhaseTimer(self, name)

    def _begin_step(self) -> None:
        self._phases_s = {}
        if self._cuda and self.is_recording:
            torch.cuda.reset_peak_memory_stats()
        elif not self._cuda and self.is_recording:
            _reset_rss_peak()
        self._step_t0 = time.perf_counter()

    def step(self, samples: int | None = None, tokens: int | None = None, flops: float | None = None) -> None:
        """End of one loop step: record it if active, then advance the torch profiler's schedule."""
        if self._stopped:
            return
        self._ensure_started()
        if self.is_recording:
            if self._cuda:
                _profiler_sync()
            step_time_s = time.perf_counter() - self._step_t0
            self.records.append(self._record(step_time_s, samples, tokens, flops))
        self._prof.step()
        self._step_index += 1
        if self._step_index >= self.total_steps:
            self._stop()
        else:
            self._begin_step()

    def _record(self, step_time_s: float, samples: int | None, tokens: int | None, flops: float | None) -> StepRecord:
        graph_held = 0
        if self._cuda:
            peak, end = torch.cuda.max_memory_allocated(), torch.cuda.memory_allocated()
            reserved = torch.cuda.max_memory_reserved()
            graph_held = graph_pool_cached_bytes(torch.cuda.memory_snapshot())
        else:
            peak, end, reserved = _rss_peak_bytes(), _rss_bytes(), None
        return StepRecord(
            step_time_s=step_time_s,
            phases_s=dict(self._phases_s),
            peak_mem_bytes=peak + graph_held,
            end_mem_bytes=end + graph_held,
            reserved_peak_bytes=reserved,
            graph_pool_bytes=graph_held,
            samples=samples if samples is not None else self.samples_per_step,
            tokens=tokens if tokens is not None else self.tokens_per_step,
            flops=flops if flops is not None else self.flops_per_step,
            nvml_util_pct=_nvml_utilization() if self._cuda else None,
        )

    # -- results -----------------------------------------------------------------------------------
    def summary(self) -> dict[str, Any]:
        """All numbers of the report as a JSON-ready dict (see `build_summary`)."""
        trace = trace_analysis.load_trace(self.trace_path) if self.trace_path else None
        return build_summary(self, trace)

    def write_summary(self, path: str | Path) -> dict[str, Any]:
        summary = self.summary()
        write_json(summary, path)
        return summary


def build_summary(prof: StepProfiler, trace: dict[str, Any] | None) -> dict[str, Any]:
    """Step time, throughput, MFU, breakdown, memory, GPU stats and advice from the recorded steps."""
    from sumtune.profiling.advice import advise

    recs = prof.records
    summary: dict[str, Any] = {
        "device": prof.device,
        "device_name": _device_name(prof.device),
        "torch_version": torch.__version__,
        "cpu_count": os.cpu_count(),
        "schedule": {"wait": prof.wait, "warmup": prof.warmup, "active": prof.active},
        "steps_recorded": len(recs),
        "trace_file": str(prof.trace_path) if prof.trace_path else None,
        "context": prof.context,
    }
    if not recs:
        summary["error"] = "no active step was recorded (the loop ended before the profiler's active steps)."
        summary["advice"] = []
        return summary
    times = [r.step_time_s for r in recs]
    mean_s = statistics.fmean(times)
    summary.update(
        step_time_mean_s=mean_s,
        step_time_median_s=statistics.median(times),
        step_time_min_s=min(times),
        step_time_max_s=max(times),
        step_times_s=times,
    )
    summary.update(_throughput(recs, mean_s, prof.peak_tflops, summary["device_name"], prof.matmul_tflops))
    summary.update(breakdown(recs))
    summary.update(_memory(recs, prof.device))
    gpu = trace_analysis.gpu_stats(trace) if trace is not None else None
    if gpu is not None:
        nvml = [r.nvml_util_pct for r in recs if r.nvml_util_pct is not None]
        gpu["nvml_utilization_pct"] = statistics.fmean(nvml) if nvml else None
        summary["top_kernels"] = gpu.pop("top_kernels")
    summary["gpu"] = gpu
    summary["host"] = trace_analysis.host_stalls(trace) if trace is not None else None
    summary["top_ops"] = prof.top_ops
    if trace is not None:
        summary["trace_phase_mean_s"] = trace_analysis.phase_times_from_trace(trace)
        summary["trace_steps"] = len(trace_analysis.step_windows_us(trace_analysis.complete_events(trace)))
    summary["advice"] = advise(summary)
    return summary


def breakdown(recs: list[StepRecord]) -> dict[str, Any]:
    """Mean seconds per phase; `other` = step time - measured phases, so the parts sum to the step."""
    mean_step_s = statistics.fmean(r.step_time_s for r in recs)
    names = list(PHASES) + sorted({k for r in recs for k in r.phases_s} - set(PHASES))
    parts = {name: statistics.fmean(r.phases_s.get(name, 0.0) for r in recs) for name in names}
    parts["other"] = mean_step_s - sum(parts.values())
    pct = {name: 100.0 * s / mean_step_s if mean_step_s > 0 else 0.0 for name, s in parts.items()}
    return {"breakdown_s": parts, "breakdown_pct": pct}


def _throughput(recs, mean_s: float, peak_tflops, device_name: str | None,
                matmul_tflops: float | None = None) -> dict[str, Any]:
    samples = [r.samples for r in recs if r.samples is not None]
    tokens = [r.tokens for r in recs if r.tokens is not None]
    flops = [r.flops for r in recs if r.flops]
    total_s = sum(r.step_time_s for r in recs)
    out: dict[str, Any] = {
        "samples_per_step": statistics.fmean(samples) if samples else None,
        "samples_per_s": sum(samples) / total_s if len(samples) == len(recs) and total_s > 0 else None,
        "tokens_per_step": statistics.fmean(tokens) if tokens else None,
        "tokens_per_s": sum(tokens) / total_s if len(tokens) == len(recs) and total_s > 0 else None,
        "flops_per_step": statistics.fmean(flops) if len(flops) == len(recs) else None,
    }
    peak = peak_tflops if peak_tflops is not None else datasheet_peak_tflops(device_name)
    out["peak_tflops"] = peak
    out["peak_tflops_source"] = "given" if peak_tflops is not None else ("datasheet dense bf16" if peak else None)
    achieved = sum(flops) / total_s if out["flops_per_step"] and total_s > 0 else None
    out["mfu_pct"] = 100.0 * achieved / (peak * 1e12) if achieved and peak else None
    out["matmul_tflops"] = matmul_tflops
    out["mfu_measured_pct"] = 100.0 * achieved / (matmul_tflops * 1e12) if achieved and matmul_tflops else None
    if out["mfu_pct"] is not None:
        from sumtune.flops import FLOPS_COUNTED

        out["mfu_flops_counted"] = FLOPS_COUNTED  # whether attention is in the count, next to the figure
    return out


def graph_pool_cached_bytes(segments: list[dict[str, Any]]) -> int:
    """Bytes cached but not allocated in private memory pools (`torch.cuda.memory_snapshot()` segments).

    A replayed CUDA graph's activations live in its pool: allocated during the capture, then freed to the pool and
    reused by every replay, so `max_memory_allocated` never sees them again (a T5-3b step at 16 x 2 that needs
    ~60 GiB showed a 2.3 GiB peak, H200, 2026-12-01). The default pool's id is (0, 0)."""
    held = 0
    for segment in segments:
        pool = tuple(segment.get("segment_pool_id") or (0, 0))
        if pool != (0, 0):
            held += segment["total_size"] - segment["allocated_size"]
    return held


def _memory(recs: list[StepRecord], device: str) -> dict[str, Any]:
    out: dict[str, Any] = {
        "mem_kind": "cuda_allocated" if device == "cuda" else "cpu_rss",
        "peak_mem_gib": max(r.peak_mem_bytes for r in recs) / GIB,
        "mean_step_peak_mem_gib": statistics.fmean(r.peak_mem_bytes for r in recs) / GIB,
        "mean_mem_gib": statistics.fmean(r.end_mem_bytes for r in recs) / GIB,
        "graph_pool_gib": max(r.graph_pool_bytes for r in recs) / GIB,
    }
    reserved = [r.reserved_peak_bytes for r in recs if r.reserved_peak_bytes is not None]
    out["reserved_peak_mem_gib"] = max(reserved) / GIB if reserved else None
    out["device_mem_total_gib"] = _device_total_gib(device)
    return out


def top_cpu_ops(prof: torch.profiler.profile, *, cuda: bool, limit: int = 10) -> list[dict[str, Any]]:
    """Top operators by self CPU time from `key_averages()` (our phase ranges and step marks left out)."""
    try:
        averages = prof.key_averages()
    except Exception:  # no events (e.g. stopped before any active step)
        return []
    rows = [a for a in averages if not a.key.startswith(trace_analysis.PHASE_PREFIX) and not a.key.startswith("ProfilerStep")]
    total_us = sum(a.self_cpu_time_total for a in rows) or 1.0
    rows.sort(key=lambda a: a.self_cpu_time_total, reverse=True)
    out = []
    for a in rows[:limit]:
        row = {"name": a.key, "calls": a.count, "self_cpu_ms": a.self_cpu_time_total / 1e3,
               "pct": 100.0 * a.self_cpu_time_total / total_us}
        if cuda:
            row["self_device_ms"] = getattr(a, "self_device_time_total", getattr(a, "self_cuda_time_total", 0.0)) / 1e3
        out.append(row)
    return out


def datasheet_peak_tflops(device_name: str | None) -> float | None:
    """Dense bf16 peak from `sumtune.flops` (one table for the whole project); None when unknown."""
    from sumtune.flops import peak_tflops_for_name

    return peak_tflops_for_name(device_name)


def write_json(data: dict[str, Any], path: str | Path) -> Path:
    path = Path(path)
    from sumtune.safe_io import atomic_write_text

    return atomic_write_text(path, json.dumps(data, indent=2, default=str) + "\n")


# -- host / device readings --------------------------------------------------------------------------
def _proc_status_kib(field_name: str) -> int | None:
    try:
        text = Path("/proc/self/status").read_text()
    except OSError:
        return None
    match = re.search(rf"^{field_name}:\s+(\d+)\s+kB", text, re.MULTILINE)
    return int(match.group(1)) if match else None


def _rss_bytes() -> int:
    kib = _proc_status_kib("VmRSS")
    if kib is None:  # not Linux: fall back to the lifetime peak
        return _rss_peak_bytes()
    return kib * 1024


def _rss_peak_bytes() -> int:
    kib = _proc_status_kib("VmHWM")
    if kib is None:
        import resource

        kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return kib * 1024


def _reset_rss_peak() -> None:
    """Reset VmHWM so the next reading is this step's peak (Linux >= 4.0; silently a lifetime peak elsewhere)."""
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


def _nvml_utilization() -> float | None:
    """NVML's GPU utilization (%) over its last sample period; None without pynvml."""
    try:
        return float(torch.cuda.utilization())
    except Exception:  # pynvml missing or NVML unavailable
        return None


def _device_name(device: str) -> str | None:
    if device == "cuda" and torch.cuda.is_available():
        return torch.cuda.get_device_name()
    import platform

    return platform.processor() or platform.machine() or None


def _device_total_gib(device: str) -> float | None:
    if device == "cuda" and torch.cuda.is_available():
        return torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory / GIB
    pages, page_size = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
    return pages * page_size / GIB if pages > 0 else None
