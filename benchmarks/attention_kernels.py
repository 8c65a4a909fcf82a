"""T5-3b encoder self-attention, forward + backward, in each SDPA kernel: what the bias and dropout cost.

    python benchmarks/attention_kernels.py            # GPU: batch 32, 32 heads, 1024 tokens, head dim 128

Bias layouts: none; the relative position bias broadcast over the batch (1, H, L, L), which is what an
unpadded batch gives; and one (B, H, L, L) bias per row, which is what a padded batch gives (padding
folded in). Writes JSON under benchmarks/results/ with the GPU name.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import bench_common as bc  # noqa: E402


def time_attention(q, k, v, bias, dropout_p: float, backend, repeats: int) -> float:
    from torch.nn.attention import sdpa_kernel

    times = []
    with sdpa_kernel([backend]):
        for i in range(repeats + 2):
            for t in (q, k, v):
                t.grad = None
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=dropout_p, scale=1.0)
            out.backward(torch.ones_like(out))
            end.record()
            torch.cuda.synchronize()
            if i >= 2:
                times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("attention_kernels.py needs a CUDA GPU.", file=sys.stderr)
        return 2
    from torch.nn.attention import SDPBackend

    B, H, L, D = args.batch, args.heads, args.seq, args.head_dim
    shape = (B, H, L, D)
    q, k, v = (torch.randn(shape, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    position = torch.randn(1, H, L, L, device="cuda", dtype=torch.bfloat16)
    keep = torch.ones(B, L, dtype=torch.bool, device="cuda")
    keep[: B // 4, L - 100:] = False  # a quarter of the rows padded, as in BillSum batches
    per_row = torch.where(keep[:, None, None, :], position, torch.finfo(torch.bfloat16).min).contiguous()
    flops = 4 * B * H * L * L * D * 3.5  # fwd 2 GEMMs; bwd recomputes scores (2.5x fwd)
    backends = {"cudnn": SDPBackend.CUDNN_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
                "flash": SDPBackend.FLASH_ATTENTION}
    rows = []
    for bias_name, bias in (("none", None), ("broadcast", position), ("per-row", per_row)):
        for dropout_p in (0.0, 0.1):
            for name, backend in backends.items():
                try:
                    seconds = time_attention(q, k, v, bias, dropout_p, backend, args.repeats)
                    row = dict(bias=bias_name, dropout=dropout_p, kernel=name, fwd_bwd_ms=seconds * 1e3,
                               tflops=flops / seconds / 1e12)
                except RuntimeError as error:
                    row = dict(bias=bias_name, dropout=dropout_p, kernel=name, note=str(error).splitlines()[0][:60])
                rows.append(row)
                print(row, flush=True)
    bc.print_table(rows, ["bias", "dropout", "kernel", "fwd_bwd_ms", "tflops", "note"])
    path = bc.save_result("attention_kernels", dict(batch=B, heads=H, seq=L, head_dim=D, rows=rows))
    print(f"saved {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
