"""Where T5's bias costs the attention backward its time: the near tiles' table reads, or the kernels' three loops.

    python benchmarks/attention_bias_cost.py                       # GPU: 32x32x1024x128, then 4x32x4096x128
    python benchmarks/attention_bias_cost.py --shapes 32x32x1024x128

Why: session 22's attention_kernels run (H200, results/attention_kernels-2026-12-03-h200-gluon.json) put the bias at
0.17 ms of the forward but 1.19 ms of the backward at 32x32x1024x128 (dropout off: 2.37 / 4.75 ms with the bias,
2.20 / 3.56 without). With the bias each kernel runs three loops (far-left tiles with one constant, near tiles that
read the (H, 2L-1) table, far-right tiles with another constant); without it, one loop. Compiled for sm_90 on a CPU,
the dK/dV kernel's 1024 config (32, 64, 4, 3) with bias and dropout spills 72 bytes, has 4,352 SASS instructions and
103 KiB of shared memory, against 1,784, no spill and 87 KiB without the bias
(results/attention_compile_bias_ceiling-2026-12-03-cpu-sm90.json).

This is a diagnostic, not a product path: each row runs sumtune's kernels (`flash_attention.t5_flash_attention`) in
its own process, with the same tiles pinned for every row (the ones the autotuner chose in that run), dropout 0.1:
  bias        the kernels with the near tiles reading the table (BIAS_BAND off)
  band        the near tiles reading the band instead (BIAS_BAND on: aligned, contiguous, 16-byte loads)
  nearconst   the same three loops, but the near tiles add a constant instead of reading the table (`_bias_tile`
              patched before the first compile: wrong numbers, right structure) -> the table reads' cost
  nobias      no bias at all (one loop) -> with `nearconst`, the cost of the loop structure itself
Writes benchmarks/results/attention_bias_cost-<date>-<gpu>.json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

import bench_common as bc  # noqa: E402

VARIANTS = ("bias", "band", "nearconst", "nobias")
# The autotuner's choices with bias and dropout in session 22 (H200): (BLOCK_M, BLOCK_N, num_warps, num_stages)
TUNED = {1024: dict(fwd=(128, 64, 8, 2), dkdv=(32, 64, 4, 3), dq=(128, 64, 8, 3)),
         4096: dict(fwd=(64, 64, 4, 2), dkdv=(32, 128, 8, 3), dq=(64, 32, 4, 3))}


@triton.jit
def _bias_tile_near_as_constant(TABLE, rel, const, BIAS_MODE: tl.constexpr):
    """`flash_kernels._bias_tile` with its table mode replaced by the tile's constant (timing only)."""
    if BIAS_MODE == 0:
        out = tl.zeros(rel.shape, tl.float32)
    else:
        out = tl.zeros(rel.shape, tl.float32) + const
    return out


def patch_near_tiles_to_a_constant() -> None:
    """Install `_bias_tile_near_as_constant` in the kernels' module (before any kernel compiles)."""
    from sumtune.fast_t5 import flash_kernels

    flash_kernels._bias_tile = _bias_tile_near_as_constant


def run_variant(variant: str, shape: tuple[int, ...], repeats: int) -> dict:
    from attention_kernels import kernel_inputs, time_fwd_bwd

    if variant == "nearconst":
        patch_near_tiles_to_a_constant()
    from sumtune.fast_t5 import flash_attention as fa

    length = shape[2]
    q, k, v, _, grad_out, _, table, padding = kernel_inputs(shape, torch.device("cuda"))
    table_log2 = fa.bias_table_log2(table) if variant != "nobias" else None
    fa.BIAS_BAND = variant == "band"
    tiles = TUNED.get(length, TUNED[4096])
    with fa.block_sizes(**tiles):
        seconds, forward, peak = time_fwd_bwd(
            lambda *t: fa.t5_flash_attention(*t, table_log2, 128 if table_log2 is not None else 0, padding, False,
                                             1.0, 0.1), (q, k, v), grad_out, repeats)
    return dict(shape="x".join(map(str, shape)), variant=variant, fwd_bwd_ms=seconds * 1e3, fwd_ms=forward * 1e3,
                bwd_ms=(seconds - forward) * 1e3, tiles={name: list(t) for name, t in tiles.items()})


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=["32x32x1024x128", "4x32x4096x128"])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)  # one row, in a process of its own
    parser.add_argument("--no-save", action="store_true")
    args = parser.parse_args(argv)
    shapes = [tuple(int(x) for x in s.split("x")) for s in args.shapes]
    if not torch.cuda.is_available():
        print("attention_bias_cost.py needs a CUDA GPU.", file=sys.stderr)
        return 2
    if args.variant:
        for shape in shapes:
            print(json.dumps(run_variant(args.variant, shape, args.repeats)), flush=True)
        return 0
    rows = []
    for variant in VARIANTS:  # a process each: Triton keys a compiled kernel on its helpers' source at first use
        done = subprocess.run([sys.executable, __file__, "--variant", variant, "--repeats", str(args.repeats),
                               "--shapes", *args.shapes], capture_output=True, text=True)
        found = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
        if done.returncode or not found:
            rows.append(dict(variant=variant, note=done.stderr.strip().splitlines()[-1][:120] if done.stderr else
                             f"exit {done.returncode}"))
        rows += found
        for row in found:
            print(row, flush=True)
    bc.print_table(rows, ["shape", "variant", "fwd_bwd_ms", "fwd_ms", "bwd_ms", "note"])
    if not args.no_save:
        payload = dict(what="the attention's bias cost split: table reads vs the three-loop structure (dropout 0.1), "
                            "and the near tiles from the band (BIAS_BAND)",
                       rows=rows)
        print(f"saved {bc.save_result('attention_bias_cost', payload)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
