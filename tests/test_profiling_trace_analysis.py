"""Tests for sumtune.profiling.trace_analysis on hand-built GPU traces (tests/_profiling_helpers.py): GPU busy time,
kernel classes and families, host syncs and launches."""

from __future__ import annotations

import pytest
from _profiling_helpers import _x, gpu_trace, stall_trace

from sumtune.profiling import trace_analysis


def test_union_length_merges_overlaps():
    assert trace_analysis.union_length([(0, 10), (5, 15), (20, 25)]) == 20
    assert trace_analysis.union_length([]) == 0


def test_gpu_stats_from_trace():
    stats = trace_analysis.gpu_stats(gpu_trace())
    assert stats["steps_in_trace"] == 2
    assert stats["trace_step_time_mean_s"] == pytest.approx(100e-6)
    # busy: [10,60) + [110,130) + [150,160) = 80 of 200 us; the kernel at 500 is outside the steps
    assert stats["utilization_pct"] == pytest.approx(40.0)
    assert stats["kernels_per_step"] == 2.0
    # kernel time 100 us: tensor-core gemms 50, SIMT sgemm 20
    assert stats["tensor_core_pct"] == pytest.approx(50.0)
    assert stats["fp32_gemm_pct"] == pytest.approx(20.0)
    # SM efficiency: (40*1 + 30*0.5 + 20*1) / 200 window us
    assert stats["est_sm_efficiency_pct"] == pytest.approx(100 * 75 / 200)
    assert stats["memcpy_pct"] == pytest.approx(5.0)
    top = stats["top_kernels"]
    assert top[0]["name"].startswith("sm90_xmma") and top[0]["calls"] == 2 and top[0]["tensor_core"]
    assert sum(k["pct"] for k in top) == pytest.approx(100.0)


def test_host_stalls_counts_syncs_and_launches_per_step_and_names_where():
    host = trace_analysis.host_stalls(stall_trace())
    assert host["syncs_per_step"] == 4.0  # 3 in the optimizer + the read; the profiler's own sync not counted
    assert host["launches_per_step"] == 25.0
    assert host["sync_wait_pct"] == pytest.approx(100 * (3 * 30 + 10) / 1000)
    top, second = host["sync_sites"]
    assert top == {"site": "optimizer: Optimizer.step#PagedAdamW8bit.step > aten::_local_scalar_dense",
                   "per_step": 3.0, "wait_ms_per_step": pytest.approx(0.09)}
    assert second["site"] == "optimizer: aten::_local_scalar_dense" and second["per_step"] == 1.0


def test_host_stalls_absent_in_a_cpu_trace():
    assert trace_analysis.host_stalls(gpu_trace()) is None


def test_gpu_stats_absent_without_kernels():
    assert trace_analysis.gpu_stats({"traceEvents": [_x("ProfilerStep#1", 0, 10, cat="user_annotation")]}) is None


@pytest.mark.parametrize("name,tensor_core", [
    ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64", True),
    ("ampere_bf16_s16816gemm_bf16_128x128_ldg8_f2f_stages_32x5_tn", True),
    ("nvjet_hsh_128x256_64x4_2x1_v_bz_coopA_TNT", True),
    ("void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<64>>", True),
    ("cutlass_80_tensorop_bf16_s16816gemm_relu_bf16_64x64_64x4_tn_align8", True),
    ("ampere_sgemm_128x64_tn", False),
    ("cutlass_80_simt_sgemm_128x128_8x4_nn_align1", False),
    ("void at::native::vectorized_elementwise_kernel<4, at::native::CUDAFunctor_add<float>>", False),
])
def test_tensor_core_kernel_names(name, tensor_core):
    assert trace_analysis.is_tensor_core_kernel(name) is tensor_core


def test_kernel_families_first_match():
    family = trace_analysis.kernel_family
    assert family("t5_flash_attention_bwd_dkdv") == family("t5_attention_bwd_delta") == "attention"
    assert family("nvjet_sm90_tst_192x192_64x3_1x2_h_bz_coopB_NNN") == "matmul"
    assert family("void cublasLt::splitKreduce_kernel<32, 16, int, float>") == "matmul"
    assert family("relu_dropout_bwd") == family("void at::native::masked_scale_kernel<bool>") == "dropout"
    assert family("void kDequantizeBlockwise<__nv_bfloat16, 512, 64, 8, 2>") == "dequantize"
    assert family("void at::native::layer_norm_grad_input_kernel_vectorized<c10::BFloat16>") == "normalization"
    assert family("void at::native::CatArrayBatchedCopy_vectorized<OpaqueType<2>>") == "copy"
    assert family("void at::native::vectorized_elementwise_kernel<8, CUDAFunctor_add<c10::BFloat16>>") == "other"
    shares = trace_analysis.gpu_stats(gpu_trace())["kernel_families_pct"]
    assert shares == pytest.approx({"matmul": 70.0, "other": 30.0})  # 50 + 20 us of gemms, 30 of other kernels
    assert list(shares) == ["matmul", "other"]  # largest first


def test_fp32_gemm_names():
    assert trace_analysis.is_fp32_gemm_kernel("ampere_sgemm_128x64_tn")
    assert trace_analysis.is_fp32_gemm_kernel("void implicit_convolve_sgemm<float, float>")
    assert not trace_analysis.is_fp32_gemm_kernel("sm80_xmma_gemm_bf16bf16_bf16f32_f32_tn_n")
    assert not trace_analysis.is_fp32_gemm_kernel("vectorized_elementwise_kernel")
