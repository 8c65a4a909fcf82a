"""Pure functions over the chrome-trace JSON that `torch.profiler.tensorboard_trace_handler` writes.

Kineto traces hold one "X" (complete) event per CPU op / annotation / GPU kernel with `ts` and `dur`
in microseconds. The profiler's own `ProfilerStep#N` annotations mark the recorded steps, so every
GPU number here is measured against those windows (trace clock vs trace clock).
"""

from __future__ import annotations

import gzip
import json
import re
from collections import defaultdict
from pathlib import Path
from typing import Any, Iterable

TRACE_GLOB = "*.pt.trace.json*"  # what the TensorBoard profiler plugin looks for (plain or .gz)
PHASE_PREFIX = "sumtune/"

# Name heuristics for kernels that run on tensor cores (cuBLAS/cuBLASLt/CUTLASS/cuDNN/flash naming).
_TENSOR_CORE_RE = re.compile(
    r"hmma|wgmma|xmma|imma|tensorop|mma_|_mma|s16816|s1688|h1688|h16816|i8816|884gemm|1688gemm|16816gemm"
    r"|nvjet|flash|fmha|sm(?:75|80|86|89|90|100|120)_|cutlass.*(?:bf16|f16|fp16|tf32|e4m3|e5m2)",
    re.IGNORECASE,
)
# SIMT fp32/fp64 GEMM/conv kernels: look like matmuls but do not use tensor cores.
_SIMT_RE = re.compile(r"simt|sgemm(?!.*tf32)|dgemm|implicit_convolve_sgemm|gemv", re.IGNORECASE)
_GEMM_RE = re.compile(r"gemm|gemv|matmul|conv|fprop|dgrad|wgrad|nvjet|cutlass|xmma|wgmma|hmma", re.IGNORECASE)
# Where the kernel time goes, by family: the first pattern that matches a kernel's name names its family.
KERNEL_FAMILIES: tuple[tuple[str, re.Pattern], ...] = (
    ("attention", re.compile(r"flash|fmha|attention|attn", re.IGNORECASE)),
    ("matmul", re.compile(_GEMM_RE.pattern + r"|splitkreduce", re.IGNORECASE)),
    ("dropout", re.compile(r"dropout|masked_scale|philox", re.IGNORECASE)),
    ("dequantize", re.compile(r"dequantiz", re.IGNORECASE)),
    ("normalization", re.compile(r"norm", re.IGNORECASE)),
    ("optimizer", re.compile(r"adam|multi_tensor|foreach", re.IGNORECASE)),
    ("copy", re.compile(r"copy|catarray|memcpy|memset|fillfunctor", re.IGNORECASE)),
)
OTHER_FAMILY = "other"


def find_trace_files(out_dir: str | Path) -> list[Path]:
    """Trace files in `out_dir`, oldest first."""
    return sorted(Path(out_dir).glob(TRACE_GLOB), key=lambda p: p.stat().st_mtime_ns)


def load_trace(path: str | Path) -> dict[str, Any]:
    """Parse a (possibly gzipped) chrome-trace JSON file."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        return json.load(f)


def complete_events(trace: dict[str, Any]) -> list[dict[str, Any]]:
    """All "X" events that carry a duration."""
    return [e for e in trace.get("traceEvents", []) if e.get("ph") == "X" and "dur" in e and "ts" in e]


def span_us(event: dict[str, Any]) -> tuple[float, float]:
    """(start, end) of one complete event, in microseconds."""
    start = float(event["ts"])
    return start, start + float(event["dur"])


def step_windows_us(events: Iterable[dict[str, Any]]) -> list[tuple[float, float]]:
    """(start, end) of each `ProfilerStep#N` annotation, in trace microseconds, in time order."""
    return sorted(span_us(e) for e in events
                  if str(e.get("name", "")).startswith("ProfilerStep#") and e.get("cat") != "gpu_user_annotation")


def kernel_events(events: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    return [e for e in events if e.get("cat") == "kernel"]


def memcpy_events(events: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    return [e for e in events if e.get("cat") in ("gpu_memcpy", "gpu_memset")]


def union_length(intervals: Iterable[tuple[float, float]]) -> float:
    """Total length covered by possibly overlapping intervals (kernels on several streams overlap)."""
    total, cur_start, cur_end = 0.0, None, None
    for start, end in sorted(intervals):
        if cur_end is None or start > cur_end:
            if cur_end is not None:
                total += cur_end - cur_start
            cur_start, cur_end = start, end
        else:
            cur_end = max(cur_end, end)
    if cur_end is not None:
        total += cur_end - cur_start
    return total


def clip_to_windows(
    intervals: Iterable[tuple[float, float]], windows: list[tuple[float, float]]
) -> list[tuple[float, float]]:
    """Parts of `intervals` that fall inside any window (windows do not overlap)."""
    out = []
    for start, end in intervals:
        for w_start, w_end in windows:
            lo, hi = max(start, w_start), min(end, w_end)
            if hi > lo:
                out.append((lo, hi))
    return out


def events_in_windows(events: Iterable[dict[str, Any]], windows: list[tuple[float, float]]) -> list[dict[str, Any]]:
    """The events that overlap any window (e.g. the kernels of the recorded steps)."""
    return [e for e in events if clip_to_windows([span_us(e)], windows)]


def is_tensor_core_kernel(name: str) -> bool:
    return bool(_TENSOR_CORE_RE.search(name)) and not _SIMT_RE.search(name)


def is_fp32_gemm_kernel(name: str) -> bool:
    """A matmul/conv kernel that does not use tensor cores (SIMT fp32)."""
    return bool(_GEMM_RE.search(name)) and not is_tensor_core_kernel(name)


def kernel_family(name: str) -> str:
    """The KERNEL_FAMILIES family of a kernel's name (first match), else "other"."""
    return next((family for family, pattern in KERNEL_FAMILIES if pattern.search(name)), OTHER_FAMILY)


def family_shares(by_name: list[dict[str, Any]]) -> dict[str, float]:
    """Percent of the kernels' summed time per family, largest first, from every kernel's `top_by_name` row."""
    shares: dict[str, float] = defaultdict(float)
    for row in by_name:
        shares[kernel_family(row["name"])] += row["pct"]
    return dict(sorted(shares.items(), key=lambda kv: -kv[1]))


def top_by_name(events: Iterable[dict[str, Any]], limit: int | None = 10) -> list[dict[str, Any]]:
    """Group events by name: calls, total/mean time, share of the grouped total (the `limit` largest; None: all)."""
    total_us: dict[str, float] = defaultdict(float)
    calls: dict[str, int] = defaultdict(int)
    for e in events:
        total_us[e["name"]] += float(e["dur"])
        calls[e["name"]] += 1
    grand_us = sum(total_us.values()) or 1.0
    ranked = sorted(total_us.items(), key=lambda kv: kv[1], reverse=True)[:limit]
    return [
        {
            "name": name,
            "calls": calls[name],
            "total_ms": us / 1e3,
            "mean_us": us / calls[name],
            "pct": 100.0 * us / grand_us,
            "tensor_core": is_tensor_core_kernel(name),
        }
        for name, us in ranked
    ]


def _weighted_arg_pct(kernels: list[dict[str, Any]], key: str, cap: float, scale: float, denom_us: float):
    """Duration-weighted mean of a numeric kernel arg (capped), as % of `denom_us`; None if absent."""
    weighted, seen = 0.0, False
    for e in kernels:
        value = e.get("args", {}).get(key)
        if isinstance(value, (int, float)):
            seen = True
            weighted += min(float(value) * scale, cap) * float(e["dur"])
    return 100.0 * weighted / denom_us if seen and denom_us > 0 else None


def gpu_stats(trace: dict[str, Any], top_k: int = 10) -> dict[str, Any] | None:
    """GPU utilization, tensor-core share, SM efficiency and top kernels; None if the trace has no kernels.

    utilization_pct: union of kernel intervals inside the ProfilerStep windows / total window time.
    est_sm_efficiency_pct: like the TensorBoard plugin, sum(dur * min(blocks_per_SM, 1)) / window time.
    """
    events = complete_events(trace)
    kernels = kernel_events(events)
    if not kernels:
        return None
    windows = step_windows_us(events)
    if not windows:  # no step marks (should not happen with a schedule): use the kernels' own span
        windows = [(min(span_us(k)[0] for k in kernels), max(span_us(k)[1] for k in kernels))]
    window_us = sum(end - start for start, end in windows)
    in_window = events_in_windows(kernels, windows)
    busy_us = union_length(clip_to_windows((span_us(k) for k in in_window), windows))
    kernel_us = sum(float(k["dur"]) for k in in_window) or 1.0
    tc_us = sum(float(k["dur"]) for k in in_window if is_tensor_core_kernel(k["name"]))
    fp32_gemm_us = sum(float(k["dur"]) for k in in_window if is_fp32_gemm_kernel(k["name"]))
    copies = events_in_windows(memcpy_events(events), windows)
    by_name = top_by_name(in_window, limit=None)  # every kernel, grouped once: the top rows and the family shares
    return {
        "steps_in_trace": len(windows),
        "trace_step_time_mean_s": window_us / len(windows) / 1e6,
        "utilization_pct": 100.0 * busy_us / window_us if window_us > 0 else None,
        "kernel_time_per_step_s": kernel_us / len(windows) / 1e6,
        "kernels_per_step": len(in_window) / len(windows),
        "mean_kernel_us": kernel_us / max(len(in_window), 1),
        "tensor_core_pct": 100.0 * tc_us / kernel_us,
        "fp32_gemm_pct": 100.0 * fp32_gemm_us / kernel_us,
        "memcpy_pct": 100.0 * union_length(span_us(c) for c in copies) / window_us
        if window_us > 0
        else None,
        "est_sm_efficiency_pct": _weighted_arg_pct(in_window, "blocks per SM", 1.0, 1.0, window_us),
        "est_achieved_occupancy_pct": _weighted_arg_pct(in_window, "est. achieved occupancy %", 100.0, 1.0, kernel_us)
        if in_window
        else None,
        "top_kernels": by_name[:top_k],
        "kernel_families_pct": family_shares(by_name),
    }


def phase_times_from_trace(trace: dict[str, Any]) -> dict[str, float]:
    """Mean seconds per recorded step of each `sumtune/<phase>` annotation (CPU side), for cross-checks."""
    events = complete_events(trace)
    steps = max(len(step_windows_us(events)), 1)
    totals: dict[str, float] = defaultdict(float)
    for e in events:
        name = str(e.get("name", ""))
        if e.get("cat") == "user_annotation" and name.startswith(PHASE_PREFIX):
            totals[name[len(PHASE_PREFIX):]] += float(e["dur"]) / 1e6
    return {k: v / steps for k, v in totals.items()}


# -- host stalls: device syncs and kernel launches, and where the syncs come from -------------------------
# CUDA runtime/driver calls that block the host until the GPU has caught up (`.item()`, `.tolist()`,
# `torch.cuda.synchronize()`, a synchronous copy). Each one empties the GPU's queue of work.
SYNC_CALLS = frozenset({
    "cudaDeviceSynchronize", "cudaStreamSynchronize", "cudaEventSynchronize", "cudaMemcpy", "cudaMemcpy2D",
    "cuCtxSynchronize", "cuStreamSynchronize", "cuEventSynchronize", "cuMemcpyDtoH", "cuMemcpyDtoH_v2",
})
LAUNCH_CALLS = frozenset({
    "cudaLaunchKernel", "cudaLaunchKernelExC", "cudaLaunchCooperativeKernel", "cuLaunchKernel", "cuLaunchKernelEx",
    "cudaGraphLaunch",
})
PROFILER_SYNC_LABEL = PHASE_PREFIX + "profiler_sync"  # the profiler's own timing syncs: not the step's
_CONTAINER_CATS = ("cpu_op", "user_annotation", "python_function")


def runtime_events(events: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    return [e for e in events if e.get("cat") in ("cuda_runtime", "cuda_driver")]


def _enclosing_names(events: list[dict[str, Any]], targets: list[dict[str, Any]]) -> dict[int, list[str]]:
    """For each target event (by id), the names of the CPU ops/annotations on its thread that contain it,
    outermost first: one sweep per thread with a stack, O(n log n)."""
    by_thread: dict[tuple, list[tuple[float, float, int, dict[str, Any]]]] = defaultdict(list)
    for e in events:
        if e.get("cat") in _CONTAINER_CATS:
            start, end = span_us(e)
            by_thread[(e.get("pid"), e.get("tid"))].append((start, -end, 0, e))
    for e in targets:
        start, end = span_us(e)
        by_thread[(e.get("pid"), e.get("tid"))].append((start, -end, 1, e))
    found: dict[int, list[str]] = {}
    for items in by_thread.values():
        items.sort(key=lambda item: (item[0], item[1], item[2]))  # by start, longer first, containers first
        stack: list[tuple[float, str]] = []
        for start, neg_end, is_target, event in items:
            while stack and stack[-1][0] < start:  # ended before this one starts
                stack.pop()
            if is_target:
                found[id(event)] = [name for _, name in stack]
            else:
                stack.append((-neg_end, str(event.get("name", ""))))
    return found


def sync_site(names: list[str]) -> str:
    """A readable place for one sync: the outermost operation that is not a step/phase mark, and the innermost op."""
    inner = [n for n in names if not n.startswith(("ProfilerStep#", PHASE_PREFIX))]
    phase = next((n[len(PHASE_PREFIX):] for n in names if n.startswith(PHASE_PREFIX)), None)
    if not inner:
        return f"{phase}: (no operator)" if phase else "(outside any operator)"
    where = inner[0] if inner[0] == inner[-1] else f"{inner[0]} > {inner[-1]}"
    return f"{phase}: {where}" if phase else where


def host_stalls(trace: dict[str, Any], top_k: int = 5) -> dict[str, Any] | None:
    """Device syncs and kernel launches per recorded step, and the operations the syncs happen in.

    The profiler's own timing syncs (inside `sumtune/profiler_sync`) are not counted: they are not the step's.
    None when the trace holds no CUDA runtime calls (a CPU trace).
    """
    events = complete_events(trace)
    windows = step_windows_us(events)
    runtime = runtime_events(events)
    if not runtime or not windows:
        return None
    runtime = events_in_windows(runtime, windows)
    own = [span_us(e) for e in events if e.get("name") == PROFILER_SYNC_LABEL]
    syncs = [e for e in runtime if e.get("name") in SYNC_CALLS
             and not any(lo <= span_us(e)[0] and span_us(e)[1] <= hi for lo, hi in own)]
    launches = [e for e in runtime if e.get("name") in LAUNCH_CALLS]
    steps = len(windows)
    enclosing = _enclosing_names(events, syncs)
    sites: dict[str, list[float]] = defaultdict(list)
    for event in syncs:
        sites[sync_site(enclosing[id(event)])].append(float(event["dur"]))
    ranked = sorted(sites.items(), key=lambda kv: (len(kv[1]), sum(kv[1])), reverse=True)[:top_k]
    step_us = sum(end - start for start, end in windows) / steps
    return {
        "syncs_per_step": len(syncs) / steps,
        "launches_per_step": len(launches) / steps,
        "sync_wait_pct": 100.0 * sum(float(e["dur"]) for e in syncs) / steps / step_us if step_us > 0 else None,
        "launch_host_pct": 100.0 * sum(float(e["dur"]) for e in launches) / steps / step_us if step_us > 0 else None,
        "sync_sites": [{"site": site, "per_step": len(durs) / steps, "wait_ms_per_step": sum(durs) / steps / 1e3}
                       for site, durs in ranked],
    }
