"""Concrete advice from a profile summary: each rule is a pure function `summary -> str | None`.

Thresholds are rules of thumb: a phase above them is worth a look, below them it rarely pays off.
`summary["context"]` carries the run's settings (batch_size, num_workers, pin_memory, compute_dtype,
gradient_checkpointing, ...) so the advice can name the setting to change and its current value.
"""

from __future__ import annotations

from typing import Any, Callable

DATA_PCT = 10.0
H2D_PCT = 5.0
GPU_UTIL_PCT = 80.0
TENSOR_CORE_PCT = 50.0
FP32_GEMM_PCT = 10.0
OPTIMIZER_PCT = 20.0
OTHER_PCT = 15.0
HEADROOM_FRACTION = 0.5  # peak below half the device memory: room for a larger batch
FULL_FRACTION = 0.9
JITTER_RATIO = 1.5
SMALL_KERNEL_US = 20.0
KERNEL_BOUND_PCT = 90.0  # GPU busy at least this much of the step: the kernels, not the host, set the pace


CONTEXT_KEYS = ("batch_size", "grad_accum_steps", "num_workers", "pin_memory", "compute_dtype", "quantization",
                "gradient_checkpointing", "compile", "fast_kernels", "max_source_tokens", "max_target_tokens",
                "lora_r", "pad_to_buckets", "max_memory_gib", "cuda_graphs", "attention_backend",
                "cache_dequantized_weights", "model_dropout")


def advice_context(settings: Any) -> dict[str, Any]:
    """The training settings (a TrainConfig or any object with those fields) the advice rules refer to."""
    return {k: getattr(settings, k) for k in CONTEXT_KEYS if hasattr(settings, k)}


def _pct(summary: dict[str, Any], phase: str) -> float:
    return float(summary.get("breakdown_pct", {}).get(phase, 0.0))


def _ctx(summary: dict[str, Any]) -> dict[str, Any]:
    return summary.get("context") or {}


def _gpu(summary: dict[str, Any]) -> dict[str, Any]:
    return summary.get("gpu") or {}


def _mem_limit_gib(summary: dict[str, Any]) -> float | None:
    """What the run may use: the device's memory, or `max_memory_gib` when that caps it lower."""
    total, cap = summary.get("device_mem_total_gib"), _ctx(summary).get("max_memory_gib")
    return min(total, cap) if total and cap else total


def _mem_fraction(summary: dict[str, Any]) -> float | None:
    peak, total = summary.get("peak_mem_gib"), _mem_limit_gib(summary)
    if summary.get("device") != "cuda" or not peak or not total:
        return None
    return peak / total


def data_loading(summary: dict[str, Any]) -> str | None:
    pct = _pct(summary, "data")
    if pct <= DATA_PCT:
        return None
    ctx = _ctx(summary)
    workers_now = int(ctx.get("num_workers") or 0)
    cpus = int(summary.get("cpu_count") or 4)
    suggested = max(2, min(cpus, 4 if workers_now == 0 else 2 * workers_now))
    text = f"data loading is {pct:.0f}% of the step: set num_workers={suggested} (now {workers_now})"
    if summary.get("device") == "cuda" and not ctx.get("pin_memory"):
        text += " and pin_memory=True"
    return text + "."


def host_to_device(summary: dict[str, Any]) -> str | None:
    pct = _pct(summary, "h2d")
    if pct <= H2D_PCT or summary.get("device") != "cuda":
        return None
    if not _ctx(summary).get("pin_memory"):
        return f"host-to-device copies are {pct:.0f}% of the step: set pin_memory=True and copy with .to(device, non_blocking=True)."
    return (f"host-to-device copies are {pct:.0f}% of the step even with pinned memory: copy compact dtypes "
            "(uint8 / int32) and convert or normalize on the GPU.")


def low_gpu_utilization(summary: dict[str, Any]) -> str | None:
    util = _gpu(summary).get("utilization_pct")
    if util is None or util >= GPU_UTIL_PCT or host_syncs(summary) or launch_bound(summary):
        return None  # the host rules already name the cause
    frac = _mem_fraction(summary)
    batch = _ctx(summary).get("batch_size")
    if frac is not None and frac < HEADROOM_FRACTION:
        now = f" (now {batch})" if batch else ""
        return (f"the GPU runs kernels only {util:.0f}% of the step and memory is {100 * frac:.0f}% used: "
                f"raise batch_size{now} so each launch does more work.")
    if (_gpu(summary).get("mean_kernel_us") or 1e9) < SMALL_KERNEL_US:
        return (f"the GPU runs kernels only {util:.0f}% of the step and kernels are tiny "
                f"({_gpu(summary)['mean_kernel_us']:.0f} us on average): the step is launch-bound, try compile=True.")
    return f"the GPU is idle {100 - util:.0f}% of the step: see the breakdown for the host-side phase that stalls it."


# What to do about syncs in a given place: first match on the sync site wins.
SYNC_REMEDIES: tuple[tuple[str, str], ...] = (
    ("8bit", "set optimizer: adamw (torch's fused AdamW steps all adapter tensors in a few kernels, no syncs; "
             "the adapter's fp32 state is small)"),
    ("Optimizer.step", "use a fused or foreach optimizer (optimizer: adamw)"),
    ("_local_scalar_dense", "a Python read of a GPU value (.item(), int(), bool(), float()) there: keep the value "
                            "on the GPU or read it once per logging window"),
    ("aten::nonzero", "a data-dependent shape (nonzero, boolean-mask indexing) there: use torch.where or fixed shapes"),
    ("aten::is_nonzero", "a tensor used as a Python bool there: keep the decision on the GPU (torch.where)"),
)
MAX_SYNCS_PER_STEP = 2.0
LAUNCH_BOUND_KERNELS = 2000  # kernels per step above which host launch cost shows on the GPU's idle time


def _remedy(site: str) -> str:
    return next((fix for pattern, fix in SYNC_REMEDIES if pattern in site),
                "avoid reading GPU values on the host inside the step")


def host_syncs(summary: dict[str, Any]) -> str | None:
    """Device syncs inside the step, named by the operation that issues most of them (from the trace)."""
    host = summary.get("host") or {}
    per_step = host.get("syncs_per_step")
    if per_step is None or per_step <= MAX_SYNCS_PER_STEP or not host.get("sync_sites"):
        return None
    top = host["sync_sites"][0]
    wait = host.get("sync_wait_pct")
    waited = f", the host waits {wait:.0f}% of the step in them" if wait is not None else ""
    return (f"{per_step:.0f} device syncs per step stall the GPU{waited}; {top['per_step']:.0f} of them in "
            f"{top['site']}: {_remedy(top['site'])}.")


def launch_bound(summary: dict[str, Any]) -> str | None:
    """Many small kernels and an idle GPU: the host cannot launch fast enough."""
    host, gpu = summary.get("host") or {}, _gpu(summary)
    launches, util = host.get("launches_per_step"), gpu.get("utilization_pct")
    if launches is None or util is None or util >= GPU_UTIL_PCT or launches < LAUNCH_BOUND_KERNELS:
        return None
    if (host.get("syncs_per_step") or 0) > MAX_SYNCS_PER_STEP:
        return None  # the syncs come first: host_syncs says so
    return (f"the GPU is idle {100 - util:.0f}% of the step while the host launches {launches:,.0f} kernels per "
            f"step: fewer, larger kernels help (compile: true, cache_dequantized_weights: true, a larger micro-batch).")


def tensor_cores(summary: dict[str, Any]) -> str | None:
    gpu = _gpu(summary)
    tc, fp32 = gpu.get("tensor_core_pct"), gpu.get("fp32_gemm_pct")
    if tc is None:
        return None
    if (fp32 or 0.0) > FP32_GEMM_PCT:
        return (f"{fp32:.0f}% of GPU time is in fp32 matmul/conv kernels without tensor cores: train under bf16 "
                "autocast (compute_dtype=bf16) or at least enable TF32 (torch.backends.cuda.matmul.allow_tf32).")
    if tc < TENSOR_CORE_PCT and _ctx(summary).get("compute_dtype") in ("fp32", "float32"):
        return f"only {tc:.0f}% of GPU time uses tensor cores with fp32 compute: use compute_dtype=bf16."
    return None


def _family_hint(family: str, ctx: dict[str, Any]) -> str | None:
    """What can shrink the largest kernel family's time, given the run's settings (None: nothing to say)."""
    if family == "attention":
        if ctx.get("attention_backend") in ("auto", "triton"):
            return "its time grows with the square of max_source_tokens"
        return "attention_backend: auto runs sumtune's Triton kernels for T5 (bias and dropout inside the kernel)"
    if family == "dequantize" and not ctx.get("cache_dequantized_weights"):
        return "cache_dequantized_weights: true skips the NF4 dequantization where memory allows"
    if family == "dropout" and ctx.get("model_dropout") != 0:
        return "model_dropout: 0 removes T5's dropout kernels (a modelling choice)"
    if family == "matmul":
        return "those are the model's own FLOPs (MFU says how close to the GPU's rate they run)"
    return None


def kernel_bound(summary: dict[str, Any]) -> str | None:
    """A busy GPU: nothing on the host stalls it, so say which kernel families the time goes to."""
    util, families = _gpu(summary).get("utilization_pct"), _gpu(summary).get("kernel_families_pct")
    if util is None or util < KERNEL_BOUND_PCT or not families:
        return None
    top = list(families.items())[:3]
    shares = ", ".join(f"{family} {pct:.0f}%" for family, pct in top)
    hint = _family_hint(top[0][0], _ctx(summary))
    text = (f"the GPU is busy {util:.0f}% of the step, so its kernels set the pace ({shares} of kernel time): "
            "speed now comes from fewer FLOPs or faster kernels, not from the host")
    return text + (f"; {top[0][0]}: {hint}." if hint else ".")


def memory_headroom(summary: dict[str, Any]) -> str | None:
    frac = _mem_fraction(summary)
    if frac is None or frac >= HEADROOM_FRACTION:
        return None
    used = f"peak memory is {summary['peak_mem_gib']:.1f} of {_mem_limit_gib(summary):.0f} GiB ({100 * frac:.0f}%)"
    if _ctx(summary).get("gradient_checkpointing"):
        return f"{used}: turn gradient_checkpointing off (saves ~25-30% of the compute) or raise batch_size."
    if (_gpu(summary).get("utilization_pct") or 100.0) < GPU_UTIL_PCT:
        return None  # low_gpu_utilization already asks for a larger batch
    return f"{used}: raise batch_size to use the headroom."


def memory_full(summary: dict[str, Any]) -> str | None:
    frac = _mem_fraction(summary)
    if frac is None or frac < FULL_FRACTION:
        return None
    fix = "lower batch_size" if _ctx(summary).get("gradient_checkpointing") else "enable gradient_checkpointing"
    return f"peak memory is {100 * frac:.0f}% of what the run may use: one longer batch can run out of memory; {fix} or cap max_source_tokens."


def optimizer_share(summary: dict[str, Any]) -> str | None:
    pct = _pct(summary, "optimizer")
    if pct <= OPTIMIZER_PCT:
        return None
    return f"the optimizer step is {pct:.0f}% of the step: use a fused/foreach AdamW, or fewer trainable parameters (lower lora_r)."


def unaccounted(summary: dict[str, Any]) -> str | None:
    pct = _pct(summary, "other")
    if pct <= OTHER_PCT:
        return None
    return (f"{pct:.0f}% of the step is outside data/h2d/forward/backward/optimizer (logging, .item() syncs, "
            "evaluation, Python overhead): log less often and avoid per-step host syncs.")


def step_jitter(summary: dict[str, Any]) -> str | None:
    median, worst = summary.get("step_time_median_s"), summary.get("step_time_max_s")
    if not median or not worst or worst / median < JITTER_RATIO:
        return None
    return (f"the slowest step took {worst / median:.1f}x the median: uneven batch lengths (try group_by_length), "
            "loader stalls or allocator churn; profile more active steps to tell them apart.")


def cpu_only(summary: dict[str, Any]) -> str | None:
    if summary.get("device") != "cpu":
        return None
    return "profiled on CPU: step time and breakdown are real, GPU numbers (utilization, MFU, tensor cores) need a CUDA GPU."


RULES: tuple[Callable[[dict[str, Any]], str | None], ...] = (
    host_syncs, launch_bound, data_loading, host_to_device, low_gpu_utilization, tensor_cores, memory_headroom, memory_full,
    optimizer_share, unaccounted, step_jitter, kernel_bound, cpu_only,
)


def advise(summary: dict[str, Any]) -> list[str]:
    """All advice lines that apply, most impactful rules first."""
    return [text for rule in RULES if (text := rule(summary))]
