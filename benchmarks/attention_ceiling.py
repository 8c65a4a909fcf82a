"""How far sumtune's attention forward is from what Triton itself reaches: the same inputs through a bare FA2 forward.

    python benchmarks/attention_ceiling.py                 # GPU: 32x32x1024x128 and 4x32x4096x128
    python benchmarks/attention_ceiling.py --cpu-check     # the yardstick kernel against torch, in the interpreter

Why: in session 22's attention_kernels run (H200, results/attention_kernels-2026-12-03-h200-gluon.json) sumtune's
forward without bias, padding mask or dropout took 2.20 ms at 32x32x1024x128 (~250 TFLOP/s) against cuDNN's 0.97 ms
(~570), while its backward was 1.23x cuDNN's. A forward in Gluon with asynchronous MMAs was no faster (session 22), so
the question is whether the gap is Triton's code generation (then only a kernel outside Triton closes it) or
something in sumtune's forward (its loop splits, masks, loads), which a Triton kernel can drop.

Rows (forward only, `triton.testing.do_bench`, median; the same (B, L, H, D) bf16 memory seen as (B, H, L, D), as
the fast path has it, softmax scale 1.0 as T5's):
  cudnn           SDPA's cuDNN kernel, no mask
  yardstick       `_yardstick_fwd` below: the Triton tutorial's FA2 forward loop and nothing else (no bias, no masks,
                  lengths multiples of the tiles), autotuned over a few tiles
  yardstick tma   the same loop with K, V, Q, O moved by TMA descriptors (the tutorial's sm_90 form), best of the tiles
  sumtune bare    sumtune.fast_t5.flash_attention with no bias, no key padding, no dropout
  sumtune +bias   the same with T5's bias (its table, near tiles from the band)
  sumtune +bias+padding   and a quarter of the rows right-padded by 10%
  sumtune t5      and dropout 0.1: the forward as T5 trains it
Writes benchmarks/results/attention_ceiling-<date>-<gpu>.json.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402
import triton.testing  # noqa: E402

import bench_common as bc  # noqa: E402

YARDSTICK_TILES = [(128, 64, 8, 3), (128, 128, 8, 3), (128, 64, 4, 3), (64, 64, 4, 3), (128, 128, 8, 2),
                   (64, 128, 4, 3)]  # (BLOCK_M, BLOCK_N, num_warps, num_stages)


@triton.jit
def _yardstick_fwd(Q, K, V, O, stride_b, stride_h, stride_m, H, L, qk_scale, HEAD_DIM: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    start_m = tl.program_id(0) * BLOCK_M
    bh = tl.program_id(1)
    base = (bh // H).to(tl.int64) * stride_b + (bh % H) * stride_h
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    q = tl.load(Q + base + offs_m[:, None] * stride_m + offs_d[None, :])
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    for start_n in range(0, L, BLOCK_N):
        rows = start_n + offs_n
        k_t = tl.load(K + base + rows[None, :] * stride_m + offs_d[:, None])
        s = tl.dot(q, k_t) * qk_scale
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.math.exp2(s - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        v = tl.load(V + base + rows[:, None] * stride_m + offs_d[None, :])
        acc = tl.dot(p.to(v.dtype), v, acc)
        m_i = m_new
    acc = acc / l_i[:, None]
    tl.store(O + base + offs_m[:, None] * stride_m + offs_d[None, :], acc.to(O.dtype.element_ty))


@triton.jit
def _yardstick_tma_fwd(desc_q, desc_k, desc_v, desc_o, H, L, qk_scale, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
                       BLOCK_N: tl.constexpr):
    """The same loop with K, V (and Q, O) moved by TMA, as the Triton tutorial does on sm_90+: (B*L, H*D) 2-D views,
    a (rows, HEAD_DIM) box at column h*HEAD_DIM."""
    start_m = tl.program_id(0) * BLOCK_M
    bh = tl.program_id(1)
    row0 = (bh // H) * L
    col = (bh % H) * HEAD_DIM
    q = desc_q.load([row0 + start_m, col])
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    for start_n in tl.range(0, L, BLOCK_N):
        k = desc_k.load([row0 + start_n, col])
        s = tl.dot(q, k.T) * qk_scale
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.math.exp2(s - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        v = desc_v.load([row0 + start_n, col])
        acc = tl.dot(p.to(v.dtype), v, acc)
        m_i = m_new
    acc = acc / l_i[:, None]
    desc_o.store([row0 + start_m, col], acc.to(desc_o.dtype))


def yardstick_tma(q, k, v, tiles):
    """The TMA yardstick at one tile config (host-side descriptors carry the box, so no autotuner here)."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    batch, heads, length, head_dim = q.shape
    block_m, block_n, warps, stages = tiles
    out = torch.empty((batch, length, heads, head_dim), device=q.device, dtype=q.dtype)

    def descriptor(t, rows):  # (B, H, L, D) view of (B, L, H, D) memory -> (B*L, H*D) rows, a view
        flat = t.transpose(1, 2).view(batch * length, heads * head_dim)
        return TensorDescriptor(flat, list(flat.shape), list(flat.stride()), [rows, head_dim])

    out = out.transpose(1, 2)
    _yardstick_tma_fwd[(length // block_m, batch * heads)](
        descriptor(q, block_m), descriptor(k, block_n), descriptor(v, block_n), descriptor(out, block_m), heads,
        length, 1.4426950408889634, HEAD_DIM=head_dim, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps,
        num_stages=stages)
    return out


def best_yardstick_tma(q, k, v, rep_ms: int):
    """Each of YARDSTICK_TILES timed; returns (ms, tiles) of the fastest."""
    timings = []
    for tiles in YARDSTICK_TILES:
        try:
            timings.append((triton.testing.do_bench(lambda: yardstick_tma(q, k, v, tiles), rep=rep_ms,
                                                    return_mode="median"), tiles))
        except Exception as error:  # a tile that does not fit shared memory: say so, try the next
            print(f"yardstick tma {tiles}: {type(error).__name__}: {str(error)[:120]}", flush=True)
    return min(timings)


_tuned_yardstick = None


def yardstick(q, k, v, tiles=None):
    """softmax(q kᵀ) v for (B, H, L, D) views of (B, L, H, D) memory; L a multiple of the tiles."""
    global _tuned_yardstick
    batch, heads, length, head_dim = q.shape
    out = torch.empty((batch, length, heads, head_dim), device=q.device, dtype=q.dtype).transpose(1, 2)
    args = (q, k, v, out, q.stride(0), q.stride(1), q.stride(2), heads, length, 1.4426950408889634)
    if tiles is not None:  # one config (the CPU check)
        block_m, block_n, warps, stages = tiles
        _yardstick_fwd[(length // block_m, batch * heads)](*args, HEAD_DIM=head_dim, BLOCK_M=block_m, BLOCK_N=block_n,
                                                             num_warps=warps, num_stages=stages)
        return out
    if _tuned_yardstick is None:
        configs = [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s)
                   for m, n, w, s in YARDSTICK_TILES]
        _tuned_yardstick = triton.autotune(configs, key=["L", "HEAD_DIM"])(_yardstick_fwd)
    _tuned_yardstick[lambda meta: (length // meta["BLOCK_M"], batch * heads)](*args, HEAD_DIM=head_dim)
    return out


def run_shape(shape, rep_ms: int) -> list[dict]:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from attention_kernels import kernel_inputs
    from sumtune.fast_t5 import flash_attention as fa

    batch, heads, length, head_dim = shape
    q, k, v, _, _, _, table, padding = kernel_inputs(shape, torch.device("cuda"))
    q, k, v = (t.detach() for t in (q, k, v))
    table = fa.bias_table_log2(table)
    flops = 4 * batch * heads * length * length * head_dim

    def cudnn():
        with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=1.0)

    rows = []
    with torch.no_grad():
        reference = cudnn()
        for name, fn in (("cudnn", cudnn), ("yardstick", lambda: yardstick(q, k, v)),
                         ("sumtune bare", lambda: fa.t5_flash_attention(q, k, v, None, 0, None, False, 1.0, 0.0)),
                         ("sumtune +bias", lambda: fa.t5_flash_attention(q, k, v, table, 128, None, False, 1.0, 0.0)),
                         ("sumtune +bias+padding",
                          lambda: fa.t5_flash_attention(q, k, v, table, 128, padding, False, 1.0, 0.0)),
                         ("sumtune t5", lambda: fa.t5_flash_attention(q, k, v, table, 128, padding, False, 1.0, 0.1))):
            ms = triton.testing.do_bench(fn, rep=rep_ms, return_mode="median")  # compiles and autotunes first
            row = dict(shape="x".join(map(str, shape)), kernel=name, fwd_ms=ms, tflops=flops / ms / 1e9)
            if name in ("yardstick", "sumtune bare"):  # same maths as cuDNN's row: the outputs must agree
                row["max_diff_vs_cudnn"] = (fn().float() - reference.float()).abs().max().item()
            if name.startswith("sumtune"):  # the autotuner's tile for this variant (its key differs per row)
                row["tiles"] = str(fa.best_configs().get("fwd"))
            rows.append(row)
            print(row, flush=True)
        ms, tiles = best_yardstick_tma(q, k, v, rep_ms)
        row = dict(shape="x".join(map(str, shape)), kernel="yardstick tma", fwd_ms=ms, tflops=flops / ms / 1e9,
                   tiles=str(tiles), max_diff_vs_cudnn=(yardstick_tma(q, k, v, tiles).float()
                                                        - reference.float()).abs().max().item())
        rows.append(row)
        print(row, flush=True)
    if _tuned_yardstick is not None and getattr(_tuned_yardstick, "best_config", None) is not None:
        rows[1]["tiles"] = str(_tuned_yardstick.best_config)
    return rows


def cpu_check() -> int:
    """The yardstick against torch in Triton's interpreter (small float32 shapes: the interpreter's bf16 dot is not
    the GPU's; the loop, the online softmax and the strides are what this checks)."""
    from sumtune.triton_compat import fix_interpreter_for_numpy_2_4

    fix_interpreter_for_numpy_2_4()
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 64, 3, 16).transpose(1, 2) for _ in range(3))
    out = yardstick(q, k, v, tiles=(16, 16, 4, 1))
    want = torch.softmax(q @ k.transpose(-1, -2), dim=-1) @ v
    error = (out - want).abs().max().item()
    print(f"yardstick vs torch: max abs error {error:.2e} -> {'ok' if error < 1e-4 else 'FAILED'}")
    out_tma = yardstick_tma(q, k, v, tiles=(16, 16, 4, 1))
    error_tma = (out_tma - want).abs().max().item()
    print(f"yardstick tma vs torch: max abs error {error_tma:.2e} -> {'ok' if error_tma < 1e-4 else 'FAILED'}")
    return 0 if max(error, error_tma) < 1e-4 else 1


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=["32x32x1024x128", "4x32x4096x128"])
    parser.add_argument("--rep-ms", type=int, default=200, help="milliseconds of timed calls per row")
    parser.add_argument("--cpu-check", action="store_true")
    parser.add_argument("--no-save", action="store_true")
    args = parser.parse_args(argv)
    if args.cpu_check:
        if os.environ.get("TRITON_INTERPRET") != "1":  # must be set before triton is first imported: start afresh
            return subprocess.call([sys.executable, __file__, "--cpu-check"],
                                   env=dict(os.environ, TRITON_INTERPRET="1"))
        return cpu_check()
    if not torch.cuda.is_available():
        print("attention_ceiling.py needs a CUDA GPU (or --cpu-check).", file=sys.stderr)
        return 2
    rows = []
    for text in args.shapes:
        rows += run_shape(tuple(int(x) for x in text.split("x")), args.rep_ms)
        bc.free_gpu_memory()
    bc.print_table(rows, ["shape", "kernel", "fwd_ms", "tflops", "max_diff_vs_cudnn", "tiles"])
    if not args.no_save:
        payload = dict(what="attention forward: cuDNN, a bare Triton FA2 forward, sumtune's forward bare and as T5 "
                            "trains it", rows=rows)
        print(f"saved {bc.save_result('attention_ceiling', payload)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
