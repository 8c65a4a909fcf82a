"""Tests for sumtune.profiling.advice: each rule on a summary built to trip it (or not)."""

from __future__ import annotations

from sumtune.profiling import advice


def base_summary(**over):
    s = {"device": "cuda", "cpu_count": 16, "step_time_median_s": 0.1, "step_time_max_s": 0.11,
         "breakdown_pct": {"data": 2, "h2d": 1, "forward": 30, "backward": 50, "optimizer": 10, "other": 7},
         "peak_mem_gib": 60.0, "device_mem_total_gib": 80.0,
         "gpu": {"utilization_pct": 95.0, "tensor_core_pct": 80.0, "fp32_gemm_pct": 0.0, "mean_kernel_us": 200.0},
         "context": {"batch_size": 8, "num_workers": 0, "pin_memory": False, "compute_dtype": "bf16",
                     "gradient_checkpointing": False}}
    s.update(over)
    return s


def test_healthy_summary_gets_no_advice():
    assert advice.advise(base_summary()) == []


def test_data_loading_rule():
    s = base_summary(breakdown_pct={"data": 31, "other": 0})
    text = advice.data_loading(s)
    assert "31%" in text and "num_workers=4" in text and "pin_memory" in text
    assert advice.data_loading(base_summary()) is None
    more = base_summary(breakdown_pct={"data": 20}, context={"num_workers": 4, "pin_memory": True})
    assert "num_workers=8" in advice.data_loading(more) and "pin_memory" not in advice.data_loading(more)


def test_h2d_rule():
    assert "non_blocking" in advice.host_to_device(base_summary(breakdown_pct={"h2d": 12}))
    pinned = base_summary(breakdown_pct={"h2d": 12}, context={"pin_memory": True})
    assert "uint8" in advice.host_to_device(pinned)
    assert advice.host_to_device(base_summary(breakdown_pct={"h2d": 3})) is None
    assert advice.host_to_device(base_summary(device="cpu", breakdown_pct={"h2d": 30})) is None


def test_low_utilization_rule():
    roomy = base_summary(peak_mem_gib=10.0, gpu={"utilization_pct": 55.0, "mean_kernel_us": 200.0})
    assert "batch_size (now 8)" in advice.low_gpu_utilization(roomy)
    tiny_kernels = base_summary(gpu={"utilization_pct": 55.0, "mean_kernel_us": 5.0})
    assert "compile" in advice.low_gpu_utilization(tiny_kernels)
    assert advice.low_gpu_utilization(base_summary()) is None


def test_tensor_core_rule():
    fp32 = base_summary(gpu={"tensor_core_pct": 10.0, "fp32_gemm_pct": 60.0})
    assert "bf16" in advice.tensor_cores(fp32)
    low_tc = base_summary(gpu={"tensor_core_pct": 10.0, "fp32_gemm_pct": 0.0}, context={"compute_dtype": "fp32"})
    assert "compute_dtype=bf16" in advice.tensor_cores(low_tc)
    assert advice.tensor_cores(base_summary()) is None


def test_memory_rules():
    headroom = base_summary(peak_mem_gib=20.0, context={"gradient_checkpointing": True})
    assert "gradient_checkpointing off" in advice.memory_headroom(headroom)
    assert "raise batch_size" in advice.memory_headroom(base_summary(peak_mem_gib=20.0))
    idle = base_summary(peak_mem_gib=20.0, gpu={"utilization_pct": 50.0, "mean_kernel_us": 200.0})
    assert advice.memory_headroom(idle) is None and "batch_size" in advice.low_gpu_utilization(idle)
    assert advice.memory_headroom(base_summary()) is None
    assert "gradient_checkpointing" in advice.memory_full(base_summary(peak_mem_gib=78.0))
    assert advice.memory_full(base_summary()) is None
    assert advice.memory_headroom(base_summary(device="cpu", peak_mem_gib=1.0)) is None


def test_optimizer_other_jitter_and_cpu_rules():
    assert "fused" in advice.optimizer_share(base_summary(breakdown_pct={"optimizer": 35}))
    assert ".item()" in advice.unaccounted(base_summary(breakdown_pct={"other": 40}))
    assert "group_by_length" in advice.step_jitter(base_summary(step_time_max_s=0.3))
    assert "CPU" in advice.cpu_only(base_summary(device="cpu"))
    assert advice.cpu_only(base_summary()) is None


def test_launch_bound_advice_only_without_syncs():
    host = {"syncs_per_step": 1.0, "launches_per_step": 11700.0, "sync_sites": []}
    text = advice.launch_bound(base_summary(host=host, gpu={"utilization_pct": 52.0}))
    assert "11,700 kernels per step" in text and "idle 48%" in text
    assert advice.launch_bound(base_summary(host=dict(host, syncs_per_step=770), gpu={"utilization_pct": 52.0})) is None
    assert advice.launch_bound(base_summary(host=host, gpu={"utilization_pct": 95.0})) is None


def test_kernel_bound_rule_names_where_the_kernel_time_goes():
    families = {"matmul": 47.0, "attention": 38.0, "dropout": 6.0, "copy": 4.0}
    busy = base_summary(gpu={"utilization_pct": 93.0, "kernel_families_pct": families},
                        context={"attention_backend": "auto"})
    text = advice.kernel_bound(busy)
    assert "busy 93%" in text and "matmul 47%, attention 38%, dropout 6%" in text and "copy" not in text
    assert "model's own FLOPs" in text
    stock = base_summary(gpu={"utilization_pct": 95.0, "kernel_families_pct": {"attention": 60.0, "matmul": 40.0}},
                         context={"attention_backend": "sdpa"})
    assert "attention_backend: auto" in advice.kernel_bound(stock)
    idle = base_summary(gpu={"utilization_pct": 70.0, "kernel_families_pct": families})
    assert advice.kernel_bound(idle) is None
    assert advice.kernel_bound(base_summary()) is None  # no family shares (an older summary)
