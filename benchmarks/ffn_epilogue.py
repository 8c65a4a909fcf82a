"""T5's feed-forward ReLU-dropout in the GEMMs' epilogues (`sumtune.fast_t5.ffn_gemm`, a candidate) against what the
fast path runs today: cuBLAS for `wi` and `wo`, and the one-pass ReLU-dropout kernels (`sumtune.fast_t5.ffn_dropout`).

    python benchmarks/ffn_epilogue.py                 # GPU: T5-3b's wi / wo shapes at 32 x 1024 and 32 x 128 tokens
    python benchmarks/ffn_epilogue.py --cpu-check     # no GPU: the kernels agree with the product path (interpreter)

Why: in the seed's best step (`results/logs/profile_seed_best-2026-12-03-h200.log`) the ReLU-dropout kernels are
5.8% of kernel time (37 ms of a 672 ms step): each moves the 16,384-wide intermediate through memory once more each
way. In a GEMM's epilogue the forward writes it once and the backward reads only the forward's output. The question
is whether a Triton GEMM at these shapes runs close enough to cuBLAS to keep that saving.

Rows (median ms of CUDA-event timings; TFLOP/s counts the GEMM's FLOPs): forward `cuBLAS wi`, `relu_dropout kernel`,
`today: cuBLAS + kernel`, `epilogue <tiles>` (and `epilogue <tiles>, no dropout`: the GEMM's own speed); backward
`cuBLAS g.wo`, `relu_dropout backward kernel`, `today: cuBLAS + kernel`, `epilogue <tiles>`. Agreement: the keep
decisions of the fused forward against the product kernel's for the same seed, and the outputs' largest difference.
Writes benchmarks/results/ffn_epilogue-<date>-<gpu>.json; nothing here changes what `sumtune` runs.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import bench_common as bc  # noqa: E402

D_MODEL, D_FF, DROPOUT = 1024, 16384, 0.1  # T5-3b
# (BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, num_warps, num_stages); the first is ffn_gemm's default
TILES = [(128, 128, 64, 8, 8, 3), (128, 128, 64, 8, 8, 4), (128, 256, 64, 8, 8, 3), (256, 128, 64, 8, 8, 3),
         (128, 128, 64, 8, 4, 4)]


def make_inputs(tokens: int, device, dtype=torch.bfloat16, d_model: int = D_MODEL, d_ff: int = D_FF, seed: int = 0):
    """x [tokens, d_model], wi [d_ff, d_model], wo [d_model, d_ff], the gradient at wo's output [tokens, d_model]."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    x = torch.randn(tokens, d_model, generator=gen).to(device, dtype)
    wi = (torch.randn(d_ff, d_model, generator=gen) / d_model ** 0.5).to(device, dtype)
    wo = (torch.randn(d_model, d_ff, generator=gen) / d_ff ** 0.5).to(device, dtype)
    grad_out = torch.randn(tokens, d_model, generator=gen).to(device, dtype)
    return x, wi, wo, grad_out


def agreement(x, wi, wo, grad_out, tiles=None) -> dict:
    """The fused kernels against today's path on the same seed: keep decisions (where the pre-activation is not
    zero) and the largest output differences relative to the outputs' largest magnitude."""
    from sumtune.fast_t5 import ffn_dropout, ffn_gemm

    pre = F.linear(x, wi)
    today, seed = ffn_dropout._relu_dropout_op(pre, DROPOUT)
    fused, _ = ffn_gemm.linear_relu_dropout(x, wi, DROPOUT, seed=seed, tiles=tiles)
    decided = pre != 0
    grad_today = ffn_dropout._relu_dropout_backward_op(grad_out @ wo, today, DROPOUT)
    grad_fused = ffn_gemm.relu_dropout_grad_input(grad_out, wo, today, DROPOUT, tiles=tiles)
    return dict(kept_equal=float(((today > 0) == (fused > 0))[decided & (pre.abs() > 1e-2)].float().mean()),
                forward_max_diff=float((today.float() - fused.float()).abs().max() / today.float().abs().max()),
                backward_max_diff=float((grad_today.float() - grad_fused.float()).abs().max()
                                        / grad_today.float().abs().max()))


def cpu_check() -> int:
    import os

    if not os.environ.get("TRITON_INTERPRET"):
        print("--cpu-check runs the kernels in Triton's interpreter: set TRITON_INTERPRET=1", file=sys.stderr)
        return 2
    from sumtune.fast_t5 import ffn_dropout

    x, wi, wo, grad_out = make_inputs(40, "cpu", torch.float32, d_model=48, d_ff=96)
    pre = F.linear(x, wi)
    seed = torch.tensor([7], dtype=torch.int64)
    keep = ffn_dropout.relu_dropout_keep_mask(seed, pre.numel(), DROPOUT, device="cpu").view(pre.shape)
    from sumtune.fast_t5 import ffn_gemm

    fused, _ = ffn_gemm.linear_relu_dropout(x, wi, DROPOUT, seed=seed)
    expected = pre.double().clamp_min(0) * keep * ffn_dropout.dropout_scale(DROPOUT)
    grad = ffn_gemm.relu_dropout_grad_input(grad_out, wo, fused, DROPOUT)
    expected_grad = (grad_out.double() @ wo.double()) * (fused > 0) * ffn_dropout.dropout_scale(DROPOUT)
    worst = max(float((fused - expected).abs().max()), float((grad - expected_grad).abs().max()))
    print(f"cpu check: fused forward and backward agree with the product path's draws within {worst:.2e}")
    return 0 if worst < 1e-4 else 1


def rows_for(tokens: int, repeats: int) -> list[dict]:
    from sumtune.fast_t5 import ffn_dropout, ffn_gemm

    x, wi, wo, grad_out = make_inputs(tokens, "cuda")
    gemm_tflop = 2 * tokens * D_MODEL * D_FF / 1e12
    pre = F.linear(x, wi)
    y, _ = ffn_dropout._relu_dropout_op(pre, DROPOUT)
    grad_mid = grad_out @ wo
    forward = [("cuBLAS wi", lambda: F.linear(x, wi), True),
               ("relu_dropout kernel", lambda: ffn_dropout._relu_dropout_op(pre, DROPOUT), False),
               ("today: cuBLAS + kernel", lambda: ffn_dropout._relu_dropout_op(F.linear(x, wi), DROPOUT), True)]
    backward = [("cuBLAS g.wo", lambda: grad_out @ wo, True),
                ("relu_dropout backward kernel",
                 lambda: ffn_dropout._relu_dropout_backward_op(grad_mid, y, DROPOUT), False),
                ("today: cuBLAS + kernel",
                 lambda: ffn_dropout._relu_dropout_backward_op(grad_out @ wo, y, DROPOUT), True)]
    for tiles in TILES:
        forward.append((f"epilogue {tiles}", lambda t=tiles: ffn_gemm.linear_relu_dropout(x, wi, DROPOUT, tiles=t),
                        True))
        backward.append((f"epilogue {tiles}", lambda t=tiles: ffn_gemm.relu_dropout_grad_input(grad_out, wo, y,
                                                                                               DROPOUT, tiles=t),
                         True))
    forward.append((f"epilogue {TILES[0]}, no dropout", lambda: ffn_gemm.linear_relu_dropout(x, wi, 0.0), True))
    rows = []
    for direction, cases in (("forward", forward), ("backward", backward)):
        for name, fn, counts_gemm in cases:
            row = dict(tokens=tokens, direction=direction, path=name)
            try:
                row["ms"] = bc.cuda_event_ms(fn, repeats)
                if counts_gemm:
                    row["gemm_tflop_per_s"] = gemm_tflop / row["ms"] * 1e3
            except Exception as error:  # noqa: BLE001 - a tile that does not build or fit is the finding
                row["note"] = f"{type(error).__name__}: {str(error).splitlines()[0][:100]}"
            rows.append(row)
            print(row, flush=True)
    for tiles in TILES[:1]:
        rows.append(dict(tokens=tokens, direction="agreement", path=f"epilogue {tiles}", **agreement(x, wi, wo,
                                                                                                      grad_out, tiles)))
        print(rows[-1], flush=True)
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", default="32768,4096", help="rows of the GEMMs (32 x 1024 encoder, 32 x 128)")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--cpu-check", action="store_true")
    args = parser.parse_args(argv)
    if args.cpu_check:
        return cpu_check()
    if not torch.cuda.is_available():
        print("ffn_epilogue.py times GPU kernels and needs a CUDA GPU; use --cpu-check.", file=sys.stderr)
        return 2
    rows = [row for tokens in args.tokens.split(",") for row in rows_for(int(tokens), args.repeats)]
    bc.print_table(rows, ["tokens", "direction", "path", "ms", "gemm_tflop_per_s", "kept_equal", "forward_max_diff",
                          "backward_max_diff", "note"])
    path = bc.save_result("ffn_epilogue", dict(d_model=D_MODEL, d_ff=D_FF, dropout=DROPOUT, rows=rows))
    print(f"saved {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
