"""Hand-built torch profiler traces shared by the tests of sumtune.profiling (tests/test_profiling_*.py)."""

from __future__ import annotations

from sumtune.profiling import trace_analysis


def _x(name, ts, dur, cat="kernel", **args):
    return {"ph": "X", "cat": cat, "name": name, "ts": ts, "dur": dur, "pid": 0, "tid": 7, "args": args}


def gpu_trace():
    return {"traceEvents": [
        _x("ProfilerStep#2", 0, 100, cat="user_annotation"),
        _x("ProfilerStep#3", 100, 100, cat="user_annotation"),
        _x("ProfilerStep#2", 0, 90, cat="gpu_user_annotation"),  # GPU-side copy of the mark: not a window
        _x("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n", 10, 40,
           **{"blocks per SM": 2.0, "est. achieved occupancy %": 50}),
        _x("vectorized_elementwise_kernel", 30, 30,
           **{"blocks per SM": 0.5, "est. achieved occupancy %": 100}),  # overlaps
        _x("ampere_sgemm_128x64_tn", 110, 20, **{"blocks per SM": 1.0}),
        _x("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n", 150, 10),
        _x("late_kernel_outside_steps", 500, 50),
        _x("Memcpy HtoD (Pageable -> Device)", 100, 10, cat="gpu_memcpy"),
        {"ph": "i", "name": "instant", "ts": 5},
    ]}


def stall_trace():
    """Two steps: a bitsandbytes-like optimizer syncing per parameter, one .tolist(), the profiler's own syncs."""
    events = [_x("ProfilerStep#5", 0, 1000, cat="user_annotation"),
              _x("ProfilerStep#6", 1000, 1000, cat="user_annotation"),
              _x("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n", 0, 300),
              _x("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n", 1000, 300)]
    for step_start in (0, 1000):
        events += [_x("sumtune/forward", step_start + 10, 300, cat="user_annotation"),
                   *(_x("cudaLaunchKernel", step_start + 20 + 10 * i, 2, cat="cuda_runtime") for i in range(25)),
                   _x("sumtune/optimizer", step_start + 400, 500, cat="user_annotation"),
                   _x("Optimizer.step#PagedAdamW8bit.step", step_start + 410, 400, cat="user_annotation")]
        for i in range(3):  # three parameters, a sync each
            t = step_start + 420 + 100 * i
            events += [_x("aten::_local_scalar_dense", t, 50, cat="cpu_op"),
                       _x("cudaStreamSynchronize", t + 5, 30, cat="cuda_runtime")]
        events += [_x("aten::_local_scalar_dense", step_start + 850, 20, cat="cpu_op"),  # the step's one read
                   _x("cudaMemcpyAsync", step_start + 852, 4, cat="cuda_runtime"),
                   _x("cudaStreamSynchronize", step_start + 860, 10, cat="cuda_runtime"),
                   _x(trace_analysis.PROFILER_SYNC_LABEL, step_start + 950, 40, cat="user_annotation"),
                   _x("cudaDeviceSynchronize", step_start + 951, 38, cat="cuda_runtime")]
    return {"traceEvents": events}
