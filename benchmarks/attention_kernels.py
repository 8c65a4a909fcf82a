"""T5 self-attention forward + backward in every kernel sumtune could use, with T5's bias, padding and dropout.

    python benchmarks/attention_kernels.py               # GPU, one run: T5-3b and FLAN-T5-XL shapes, 1024 and 4096
                                                         # (~2-3 min on an H200, mostly compiling: see wall_s)
    python benchmarks/attention_kernels.py --shapes 32x32x1024x128
    python benchmarks/attention_kernels.py --shapes 16x32x4096x128 --inference --kernels cudnn,flex+bias,triton+bias
                                                         # forwards alone under no_grad: generation's encoder
    python benchmarks/attention_kernels.py --cpu-check   # no GPU: sumtune's Triton kernels in Triton's interpreter

Shapes are batch x heads x length x head_dim; a quarter of the rows are right-padded by 10% (as BillSum batches are).
Rows, each timed forward + backward (CUDA events, median) with its peak memory above the inputs:
  cudnn                     SDPA cuDNN, no bias, no dropout: the speed of attention (the issue's yardstick)
  cudnn+dropout             the same with dropout 0.1: what dropout costs cuDNN itself
  cudnn|efficient +bias     SDPA with the (B, H, L, L) bias, padding folded in, as sumtune's SDPA route builds it
  cudnn+bias1h[+dropout]    cuDNN with the (1, H, L, L) bias broadcast over the batch and no padding: what a route
                            for unpadded batches (most at 1024, where 94% of bills are cut) could take
  triton+bias+dropout+nopad sumtune's kernels on the same unpadded inputs (the fair twin of the row above)
  ... +dropout              the same with dropout 0.1 on the probabilities
  flex +bias                FlexAttention (compiled), bias from the table in score_mod, padding as a block mask
  triton +bias(+dropout)    sumtune's kernels (sumtune.fast_t5.flash_attention): table + key padding, no L x L
  ... +dropout8             the same with 8-bit dropout draws (flash_attention.DROPOUT_DRAW_BITS = 8)
  ... +dropout+nopairs      the same with the Philox-4x32 draws before DROPOUT_PAIRS (flash_attention)
  ... +dropout+noholes      the key mask read in every row, not only in rows with a hole (MASK_ONLY_WITH_HOLES off)
  ... +dropout+nowidemul    the Philox products as mul.lo + mul.hi, not one mul.wide.u32 (PHILOX_WIDE_MUL off)
  triton                    the same kernels with key padding only (no bias, no dropout): the bare kernel
Forward and backward are also timed apart (fwd_ms, bwd_ms) in the same runs.
The bias tensors come from a real frozen T5Attention through sumtune.fast_t5.bias, as the fast stack makes them.
In the same run, sumtune's kernels are checked against a float32 reference on the first rows (with dropout: the
kernels' own mask), next to SDPA's error against the same reference. Writes JSON under benchmarks/results/.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import NamedTuple

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import bench_common as bc  # noqa: E402

DEFAULT_SHAPES = ("32x32x1024x128", "4x32x4096x128", "32x32x1024x64", "4x32x4096x64")  # T5-3b, FLAN-T5-XL heads
DROPOUT_P = 0.1
BIAS_RADIUS = 128  # T5's relative_attention_max_distance


def parse_shape(text: str) -> tuple[int, int, int, int]:
    try:
        batch, heads, length, head_dim = (int(part) for part in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"shape must be BxHxLxD, e.g. 32x32x1024x128, not {text!r}") from None
    return batch, heads, length, head_dim


# ----------------------------------------------------------------------------- inputs, as sumtune builds them
def t5_attention_module(heads: int, head_dim: int, device) -> torch.nn.Module:
    """A frozen T5 encoder self-attention with its relative position bias (random weights, T5-3b's buckets)."""
    from transformers import T5Config
    from transformers.models.t5.modeling_t5 import T5Attention

    config = T5Config(d_model=heads * head_dim, d_kv=head_dim, num_heads=heads, relative_attention_num_buckets=32,
                      relative_attention_max_distance=BIAS_RADIUS)
    torch.manual_seed(0)
    module = T5Attention(config, has_relative_attention_bias=True).to(device)
    with torch.no_grad():
        module.relative_attention_bias.weight.normal_(0.0, 2.0)  # trained T5 biases span a few units
    return module.requires_grad_(False)


def make_inputs(shape, device, dtype=torch.bfloat16):
    batch, heads, length, head_dim = shape
    gen = torch.Generator(device=device).manual_seed(1)
    q, k, v = (torch.randn(batch, length, heads, head_dim, device=device, dtype=dtype, generator=gen)
               .transpose(1, 2).requires_grad_() for _ in range(3))  # (B, H, L, D) views, as the fast path has
    keep = torch.ones(batch, length, dtype=torch.bool, device=device)
    keep[: max(batch // 4, 1), length - length // 10:] = False
    return q, k, v, keep


class KernelInputs(NamedTuple):
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    keep: torch.Tensor  # (B, L) key mask: a quarter of the rows right-padded by 10%
    grad_out: torch.Tensor
    module: torch.nn.Module  # the frozen T5 attention the bias comes from
    table: torch.Tensor  # (H, 2L - 1) float32 bias by offset j - i, as the fast stack makes it
    padding: object  # flash_attention.key_padding(keep)


def kernel_inputs(shape, device) -> KernelInputs:
    """Everything one attention call on ``shape`` needs, built as sumtune's fast stack builds it."""
    from sumtune.fast_t5 import bias as bias_lib
    from sumtune.fast_t5 import flash_attention as fa

    batch, heads, length, head_dim = shape
    q, k, v, keep = make_inputs(shape, device)
    grad_out = torch.randn_like(q)  # before the module's initialisation: the draws the benchmarks always made
    module = t5_attention_module(heads, head_dim, device)
    table = bias_lib.relative_position_bias_by_offset(module, length, length, torch.bfloat16)
    return KernelInputs(q, k, v, keep, grad_out, module, table, fa.key_padding(keep))


# ----------------------------------------------------------------------------- timing
def time_fwd_bwd(fn, tensors, grad_out, repeats: int) -> tuple[float, float, float]:
    """(median seconds of forward + backward, of the forward alone, peak GiB allocated above the inputs, gradients
    included)."""
    def step(marks=None):
        for t in tensors:
            t.grad = None
        out = fn(*tensors)
        if marks is not None:
            marks.record()
        out.backward(grad_out)

    bc.free_gpu_memory()
    for _ in range(2):  # compile, autotune (its timing buffers would count as peak), cuDNN plans
        step()
    torch.cuda.synchronize()
    for t in tensors:
        t.grad = None
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    totals, forwards = [], []
    for _ in range(repeats):
        start, middle, end = (torch.cuda.Event(enable_timing=True) for _ in range(3))
        start.record()
        step(middle)
        end.record()
        torch.cuda.synchronize()
        totals.append(start.elapsed_time(end) / 1e3)
        forwards.append(start.elapsed_time(middle) / 1e3)
    peak = (torch.cuda.max_memory_allocated() - base) / 2**30
    return statistics.median(totals), statistics.median(forwards), peak


def time_fwd_bwd_in_graphs(fn, tensors, grad_out, repeats: int) -> tuple[float, float, float]:
    """As `time_fwd_bwd`, each figure the replays of one CUDA graph back to back (`bench_common.cuda_graph_ms`: forward
    + backward in one graph, the forward alone in another): the GPU's time as a training step that CUDA graphs replay
    spends it, without the host's launch path that a sync after each eager call puts in front of the first kernel."""
    def step():
        for t in tensors:
            t.grad = None
        fn(*tensors).backward(grad_out)

    bc.free_gpu_memory()
    base = torch.cuda.memory_allocated()
    total_ms = bc.cuda_graph_ms(step, repeats)
    forward_ms = bc.cuda_graph_ms(lambda: fn(*tensors), repeats)
    return total_ms / 1e3, forward_ms / 1e3, (torch.cuda.max_memory_allocated() - base) / 2**30


def time_forward(fn, tensors, repeats: int) -> tuple[float, float]:
    """(median seconds of the forward under torch.no_grad, as an encoder in generation runs it, peak GiB above the
    inputs)."""
    with torch.no_grad():
        bc.free_gpu_memory()
        for _ in range(2):
            fn(*tensors)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        seconds = bc.cuda_event_ms(lambda: fn(*tensors), repeats) / 1e3
    return seconds, (torch.cuda.max_memory_allocated() - base) / 2**30


def sdpa_row(backend):
    from torch.nn.attention import sdpa_kernel

    def attend(q, k, v, bias, dropout_p):
        with sdpa_kernel([backend]):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=dropout_p, scale=1.0)

    return attend


def flex_attend_factory(table, lengths, batch, heads, length):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    def score_mod(score, b, h, q_idx, kv_idx):
        return score + table[h, kv_idx - q_idx + (length - 1)]

    def key_padding(b, h, q_idx, kv_idx):
        return kv_idx < lengths[b]

    block_mask = create_block_mask(key_padding, batch, None, length, length, device=table.device)
    compiled = torch.compile(flex_attention, dynamic=False)
    return lambda q, k, v: compiled(q, k, v, score_mod=score_mod, block_mask=block_mask, scale=1.0)


# ----------------------------------------------------------------------------- correctness in the same run
def forward_error(fa, attend, q, k, v, table, keep, rows: int) -> float:
    """Relative error of the no-grad forward at the real queries of the first ``rows`` rows against float32."""
    with torch.no_grad():
        sliced = [t[:rows].float() for t in (q, k, v)]
        reference = fa.reference_t5_attention(*sliced, table, keep[:rows], dtype=torch.float32)
        real = keep[:rows, None, :, None].expand_as(reference)
        out = attend(q, k, v)[:rows].float()
    return float((out[real] - reference[real]).norm() / reference[real].norm())


def error_vs_float32(fa, attend_ours, attend_sdpa, q, k, v, table, keep, grad_out, rows: int):
    """Relative errors of out/dq/dk/dv vs a float32 reference on the first ``rows`` batch rows (padded ones),
    for sumtune's kernels with dropout (checked with the mask they draw) and for SDPA without."""
    from sumtune.fast_t5.flash_attention import draw_seed

    def grads_of(fn):
        for t in (q, k, v):
            t.grad = None
        out = fn(q, k, v)
        out.backward(grad_out)
        return [x[:rows].detach().float() for x in (out, q.grad, k.grad, v.grad)]

    sliced = [t[:rows].detach().clone().float().requires_grad_() for t in (q, k, v)]

    def reference(keep_mask=None, keep_scale=1.0):
        for t in sliced:
            t.grad = None
        out = fa.reference_t5_attention(*sliced, table, keep[:rows], keep_mask=keep_mask, keep_scale=keep_scale,
                                        dtype=torch.float32)
        out.backward(grad_out[:rows].float())
        return [out.detach()] + [t.grad for t in sliced]

    def relative(values, refs):
        return {name: float((a - b).norm() / b.norm()) for name, a, b in zip(("out", "dq", "dk", "dv"), values, refs)}

    batch, heads, length, _ = q.shape
    torch.manual_seed(123)
    seed = draw_seed(q.device)
    torch.manual_seed(123)
    ours = grads_of(attend_ours)
    keep_mask = fa.dropout_keep_mask(seed, rows, heads, length, length, DROPOUT_P, device=q.device)
    ours_error = relative(ours, reference(keep_mask, fa.dropout_scale(DROPOUT_P)))
    sdpa_error = relative(grads_of(attend_sdpa), reference())
    return ours_error, sdpa_error


# ----------------------------------------------------------------------------- one shape
def run_shape(shape, repeats: int, with_flex: bool, only: tuple[str, ...] = (), inference: bool = False,
              fwd_tiles: tuple[tuple[int, int, int, int], ...] = (), patches: tuple[str, ...] = (),
              timing: str = "events") -> tuple[list[dict], dict]:
    from torch.nn.attention import SDPBackend

    from sumtune.fast_t5 import bias as bias_lib
    from sumtune.fast_t5 import flash_attention as fa

    batch, heads, length, head_dim = shape
    device = torch.device("cuda")
    q, k, v, keep, grad_out, module, table, padding = kernel_inputs(shape, device)
    position = bias_lib.relative_position_bias(module, length, length, device, torch.bfloat16)
    dense = bias_lib.encoder_self_bias(position, keep)  # (B, H, L, L): what the SDPA route holds per stack
    dense_gib = dense.numel() * dense.element_size() / 2**30
    flops = 4 * batch * heads * length * length * head_dim * 3.5  # fwd 2 GEMMs, bwd 2.5x fwd (nominal)
    name = "x".join(map(str, shape))
    rows = []

    def record(kernel, fn, tensors, bias_gib, **extra):
        if only and kernel not in only and "@" not in kernel:  # pinned-tile rows: asked for by --fwd-tiles
            return
        started = time.time()
        try:
            if inference:
                forward, peak = time_forward(fn, tensors, repeats)
                row = dict(shape=name, kernel=kernel, no_grad_fwd_ms=forward * 1e3,
                           tflops=flops / 3.5 / forward / 1e12, peak_gib=peak, bias_gib=bias_gib, **extra)
            else:
                timer = time_fwd_bwd_in_graphs if timing == "graph" else time_fwd_bwd
                seconds, forward, peak = timer(fn, tensors, grad_out, repeats)
                row = dict(shape=name, kernel=kernel, fwd_bwd_ms=seconds * 1e3, fwd_ms=forward * 1e3,
                           bwd_ms=(seconds - forward) * 1e3, tflops=flops / seconds / 1e12, peak_gib=peak,
                           bias_gib=bias_gib, **extra)
        except Exception as error:  # noqa: BLE001 - a kernel that cannot take this input is a row, not a crash
            row = dict(shape=name, kernel=kernel, note=str(error).splitlines()[0][:70])
        row["wall_s"] = time.time() - started  # compile / autotune included: what the run spent on the row
        rows.append(row)
        print(row, flush=True)

    cudnn, efficient = sdpa_row(SDPBackend.CUDNN_ATTENTION), sdpa_row(SDPBackend.EFFICIENT_ATTENTION)
    record("cudnn", lambda *t: cudnn(*t, None, 0.0), (q, k, v), 0.0)
    # cuDNN's own dropout, without any bias: what dropout costs the field's fastest kernel (the yardstick's twin)
    record("cudnn+dropout", lambda *t: cudnn(*t, None, DROPOUT_P), (q, k, v), 0.0)
    for label, attend in (("cudnn", cudnn), ("efficient", efficient)):
        record(f"{label}+bias", lambda *t, a=attend: a(*t, dense, 0.0), (q, k, v), dense_gib)
        record(f"{label}+bias+dropout", lambda *t, a=attend: a(*t, dense, DROPOUT_P), (q, k, v), dense_gib)
    # no padding, the bias once per head (64 MiB at 32 heads x 1024): cuDNN reads it for every sample from L2/HBM
    position_1h = position.contiguous()
    bias_1h_gib = position_1h.numel() * position_1h.element_size() / 2**30
    record("cudnn+bias1h", lambda *t: cudnn(*t, position_1h, 0.0), (q, k, v), bias_1h_gib)
    record("cudnn+bias1h+dropout", lambda *t: cudnn(*t, position_1h, DROPOUT_P), (q, k, v), bias_1h_gib)
    if with_flex:
        flex = flex_attend_factory(table, padding.lengths, batch, heads, length)
        record("flex+bias", flex, (q, k, v), table.numel() * 4 / 2**30)
    table_log2 = fa.bias_table_log2(table)

    def ours(*t, p=DROPOUT_P):
        return fa.t5_flash_attention(*t, table_log2, BIAS_RADIUS, padding, False, 1.0, p)

    record("triton+bias+dropout", ours, (q, k, v), table.numel() * 4 / 2**30)  # dQ from the stored dS (DS_GEMM)
    tuned = fa.best_configs()  # this row's tiles, before a patched row (fwd128) tunes the forward over other lists
    for patch in () if inference else patches:  # the same under each --patches setting (e.g. fwdtma, bwdtma)
        with bc.patched(patch):
            record(f"triton+bias+dropout@{patch}", ours, (q, k, v), table.numel() * 4 / 2**30)
    record("triton+bias+dropout+nopad",
           lambda *t: fa.t5_flash_attention(*t, table_log2, BIAS_RADIUS, None, False, 1.0, DROPOUT_P), (q, k, v),
           table.numel() * 4 / 2**30)
    with bc.patched("nodsgemm"):  # the dQ kernel instead (the route above DS_GEMM_MAX_GIB)
        record("triton+bias+dropout+dqkernel", ours, (q, k, v), table.numel() * 4 / 2**30)
    with bc.patched("drop8"):  # 16 draws per Philox call instead of 8 (autotuned anew)
        record("triton+bias+dropout8", ours, (q, k, v), table.numel() * 4 / 2**30)
    with bc.patched("nopairs"):  # Philox-4x32 per 2 x 4 elements: the dK/dV kernel transposes its mask
        record("triton+bias+dropout+nopairs", ours, (q, k, v), table.numel() * 4 / 2**30)
    with bc.patched("noholes"):  # these rows are right-padded only: by default they read no key mask at all
        record("triton+bias+dropout+noholes", ours, (q, k, v), table.numel() * 4 / 2**30)
    with bc.patched("nowidemul"):  # Philox products from mul.lo + mul.hi (two instructions) instead of mul.wide
        record("triton+bias+dropout+nowidemul", ours, (q, k, v), table.numel() * 4 / 2**30)
    pinned = {kernel: config for kernel, config in tuned.items() if config is not None}
    with fa.block_sizes(**pinned):  # the dropout variant's tiles: one compile instead of another autotune
        record("triton+bias", lambda *t: ours(*t, p=0.0), (q, k, v), table.numel() * 4 / 2**30)
        for patch in patches if inference else ():  # the same op's no-gradient forward under each --patches setting
            with bc.patched(patch):
                record(f"triton+bias@{patch}", lambda *t: ours(*t, p=0.0), (q, k, v), table.numel() * 4 / 2**30)
        # the bare kernel (key padding only) against cuDNN without bias: what the bias and dropout cost on top
        bare = lambda *t: fa.t5_flash_attention(*t, None, 0, padding, False, 1.0, 0.0)  # noqa: E731
        record("triton", bare, (q, k, v), 0.0)
        # and under each --patches setting (nowsnobias: calls without a bias in Triton), where the bare row is asked for
        for patch in patches if inference and (not only or "triton" in only) else ():
            with bc.patched(patch):
                record(f"triton@{patch}", bare, (q, k, v), 0.0)
    for tile, patch in ((tile, patch) for tile in fwd_tiles for patch in ("", *patches)):
        # the forward pinned at each tile (BLOCK_M, BLOCK_N, warps, stages), bias, no dropout; under each --patches
        with fa.block_sizes(fwd=tile), bc.patched(patch):
            record("triton+bias@" + "x".join(map(str, tile)) + (f"[{patch}]" if patch else ""),
                   lambda *t: ours(*t, p=0.0), (q, k, v), table.numel() * 4 / 2**30)
    timed = "no_grad_fwd_ms" if inference else "fwd_bwd_ms"
    baseline = next((r[timed] for r in rows if r["kernel"] == "cudnn" and timed in r), None)
    for row in rows:
        if baseline and timed in row:
            row["vs_cudnn_no_bias"] = row[timed] / baseline
    ours_error, sdpa_error = error_vs_float32(fa, ours, lambda *t: cudnn(*t, dense, 0.0), q, k, v, table, keep,
                                              grad_out, rows=2)
    check = dict(shape=name, rows_checked=2, triton_dropout_vs_fp32=ours_error, cudnn_bias_vs_fp32=sdpa_error,
                 triton_configs=tuned)
    if inference:
        check["no_grad_out_vs_fp32"] = forward_error(fa, lambda *t: ours(*t, p=0.0), q, k, v, table, keep, rows=2)
    print(check, flush=True)
    del dense, position
    return rows, check


# ----------------------------------------------------------------------------- CPU check (Triton's interpreter)
def cpu_check() -> int:
    """sumtune's kernels vs float64 on tiny shapes, in Triton's interpreter (fp32 and bf16, with dropout)."""
    from sumtune.fast_t5 import flash_attention as fa

    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        for kind in ("encoder", "decoder", "cross"):
            gen = torch.Generator().manual_seed(0)
            query_len, key_len = (20, 45) if kind == "cross" else (45, 45)
            q = torch.randn(2, query_len, 2, 16, generator=gen).to(dtype).transpose(1, 2).requires_grad_()
            k, v = (torch.randn(2, key_len, 2, 16, generator=gen).to(dtype).transpose(1, 2).requires_grad_()
                    for _ in range(2))
            table = None if kind == "cross" else torch.randn(2, 4, generator=gen)[:, torch.arange(
                1 - query_len, key_len).clamp(-1, 2) + 1]  # constant beyond offsets -1 / +2, like T5's
            keep = torch.ones(2, key_len, dtype=torch.bool)
            keep[1, 30:] = False
            causal = kind == "decoder"
            grad_out = torch.randn(2, 2, query_len, 16, generator=gen)
            torch.manual_seed(7)
            seed = fa.draw_seed("cpu")
            torch.manual_seed(7)
            with fa.block_sizes(fwd=(16, 16), dkdv=(16, 32), dq=(32, 16)):  # many tiles: far and near bias regions
                out = fa.flash_t5_attention(q, k, v, table, keep, causal, dropout_p=0.2, bias_radius=2)
            out.backward(grad_out.to(dtype))
            ours = [out.detach(), q.grad, k.grad, v.grad]
            for t in (q, k, v):
                t.grad = None
            mask = fa.dropout_keep_mask(seed, 2, 2, query_len, key_len, 0.2, device="cpu")
            ref = fa.reference_t5_attention(q, k, v, table, keep, causal, keep_mask=mask,
                                            keep_scale=fa.dropout_scale(0.2))
            ref.backward(grad_out.double())
            refs = [ref.detach(), q.grad, k.grad, v.grad]
            errors = {n: float((a.double() - b).norm() / b.norm()) for n, a, b in zip(("out", "dq", "dk", "dv"),
                                                                                    ours, refs)}
            rows.append(dict(dtype=str(dtype).replace("torch.", ""), case=kind, **errors))
    bc.print_table(rows, ["dtype", "case", "out", "dq", "dk", "dv"])
    worst = {row["dtype"]: max(row[n] for n in ("out", "dq", "dk", "dv")) for row in rows}
    ok = worst["float32"] < 1e-4 and worst["bfloat16"] < 5e-2
    print(f"relative error vs float64: float32 worst {worst['float32']:.1e}, bf16 worst {worst['bfloat16']:.1e}"
          f" -> {'ok' if ok else 'FAILED'}")
    return 0 if ok else 1


# ----------------------------------------------------------------------------- main
def launch_only(shape) -> None:
    """sumtune's kernels with bias, padding and dropout, forward + backward: three warm-up runs (autotuning), then
    one between cudaProfilerStart and Stop, for a profiler started with its range off (ncu --profile-from-start off)."""
    from sumtune.fast_t5 import flash_attention as fa

    q, k, v, _, grad_out, _, table, padding = kernel_inputs(shape, torch.device("cuda"))
    table_log2 = fa.bias_table_log2(table)
    for run in range(4):
        if run == 3:
            torch.cuda.synchronize()
            torch.cuda.cudart().cudaProfilerStart()
        fa.t5_flash_attention(q, k, v, table_log2, BIAS_RADIUS, padding, False, 1.0, DROPOUT_P).backward(grad_out)
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStop()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", type=parse_shape, default=[parse_shape(s) for s in DEFAULT_SHAPES],
                        metavar="BxHxLxD", help=f"default: {' '.join(DEFAULT_SHAPES)}")
    parser.add_argument("--repeats", type=int, default=10, help="timed runs per row (median), after 2 warm-ups")
    parser.add_argument("--no-flex", action="store_true", help="skip FlexAttention (its compile takes ~30 s a shape)")
    parser.add_argument("--cpu-check", action="store_true",
                        help="no GPU needed: check sumtune's Triton kernels in Triton's interpreter on tiny shapes")
    parser.add_argument("--tag", default=None, help="suffix of the result file name (e.g. run2)")
    parser.add_argument("--kernels", default="",
                        help="only these rows, comma-separated (e.g. cudnn,triton+bias+dropout); default: all")
    parser.add_argument("--inference", action="store_true",
                        help="time the forward alone under torch.no_grad, as generation's encoder runs it (no "
                             "gradient: the Triton kernels keep bf16's P.V, flash_attention.PRECISE_PV_WITHOUT_GRAD); "
                             "pick rows without dropout with --kernels")
    parser.add_argument("--fwd-tiles", default="",
                        help="also rows of the forward (bias, no dropout) pinned at these tiles, comma-separated "
                             "BLOCK_MxBLOCK_NxWARPSxSTAGES (e.g. 64x64x4x3), whatever --kernels says")
    parser.add_argument("--patches", default="",
                        help="also the --fwd-tiles rows, and the triton+bias+dropout row (with --inference: the "
                             "triton+bias row), under "
                             "these settings: comma-separated strings of bench_common.PATCH_TOKENS joined by ':' "
                             "(e.g. noband, fwdtma:bwdtma)")
    parser.add_argument("--timing", choices=("events", "graph"), default="events",
                        help="forward + backward rows: events around eager calls with a sync after each (the "
                             "host's launch path included), or replays of a CUDA graph (GPU time, as a training step "
                             "that CUDA graphs replay)")
    parser.add_argument("--launch-only", action="store_true",
                        help="time nothing: run sumtune's kernels (bias, padding, dropout) at each shape, the last "
                             "run inside a profiler range (ncu --profile-from-start off --set full ...)")
    args = parser.parse_args(argv)
    if args.cpu_check:
        if os.environ.get("TRITON_INTERPRET") != "1":  # must be set before triton is first imported: start afresh
            env = dict(os.environ, TRITON_INTERPRET="1")
            return subprocess.call([sys.executable, __file__, "--cpu-check"], env=env)
        return cpu_check()
    if not torch.cuda.is_available():
        print("attention_kernels.py needs a CUDA GPU (or --cpu-check).", file=sys.stderr)
        return 2
    if args.launch_only:
        for shape in args.shapes:
            launch_only(shape)
        return 0
    import triton

    fwd_tiles = tuple(tuple(int(v) for v in tile.split("x")) for tile in args.fwd_tiles.split(",") if tile)
    if any(len(tile) != 4 for tile in fwd_tiles):
        raise SystemExit(f"--fwd-tiles takes BLOCK_MxBLOCK_NxWARPSxSTAGES specs, not {args.fwd_tiles!r}")
    started = time.time()
    rows, checks = [], []
    for shape in args.shapes:
        shape_rows, check = run_shape(shape, args.repeats, with_flex=not args.no_flex,
                                      only=tuple(k for k in args.kernels.split(",") if k), inference=args.inference,
                                      fwd_tiles=fwd_tiles, patches=tuple(bc.patch_strings(args.patches)),
                                      timing=args.timing)
        rows += shape_rows
        checks.append(check)
        bc.free_gpu_memory()
    print()
    bc.print_table(rows, ["shape", "kernel", "fwd_bwd_ms", "fwd_ms", "bwd_ms", "no_grad_fwd_ms", "vs_cudnn_no_bias",
                          "tflops", "peak_gib", "bias_gib", "wall_s", "note"])
    print()
    for check in checks:
        worst = {k: max(v.values()) if isinstance(v, dict) else v  # no_grad_out_vs_fp32: the output's alone
                 for k, v in check.items() if k.endswith("_vs_fp32")}
        print(f"{check['shape']}: worst relative error vs float32 (out/dq/dk/dv) "
              + ", ".join(f"{k} {v:.2e}" for k, v in worst.items()))
    versions = {**bc.library_versions(), "triton": triton.__version__}
    slug = bc.gpu_slug() + (f"-{args.tag}" if args.tag else "")
    result = dict(versions=versions, dropout_p=DROPOUT_P, timing=args.timing, rows=rows, correctness=checks,
                  total_s=time.time() - started)
    path = bc.save_result("attention_kernels", result, slug=slug)
    print(f"saved {path} ({time.time() - started:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
