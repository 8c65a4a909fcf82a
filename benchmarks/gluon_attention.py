"""The attention forward in Gluon (async warpgroup MMAs) against sumtune's Triton forward, through the product's call.

    python benchmarks/gluon_attention.py --compile-only        # any machine: compile for sm_90, report waits/registers
    python benchmarks/gluon_attention.py                       # GPU: outputs of both, then their times

Both rows call `sumtune.fast_t5.flash_attention._forward` (what every fast T5 attention layer runs), with
`GLUON_FORWARD` off and on: encoder self-attention inputs as the fast path has them ((B, L, H, D) bf16 memory seen as
(B, H, L, D), T5's table bias saturating beyond 128, right padding on one row), dropout 0 then 0.1 with the same
seed, P·V as the product sets it for the length (float16 V and the remainder GEMM from 2048 keys). It prints the
largest differences of the outputs and log-sum-exps (the backward reads both) and the forward's time each way.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path
from unittest import mock

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

import bench_common as bc  # noqa: E402


def compile_report() -> list[dict]:
    """The Gluon forward and, beside it, the Triton forward (its first autotune config), compiled for sm_90."""
    from sumtune.fast_t5 import flash_compile, gluon_attention
    from sumtune.fast_t5.flash_attention import AUTOTUNE_CONFIGS

    rows = []
    for head_dim in (128, 64):
        for flags in ({}, {"PV_FP16": True, "PV_SPLIT": True}):
            for kernel in ("gluon", "triton"):
                compiled = (gluon_attention.compile_for_sm90(head_dim=head_dim, **flags) if kernel == "gluon" else
                            flash_compile.compile_kernel("fwd", *AUTOTUNE_CONFIGS["fwd"][0], head_dim=head_dim,
                                                         **flags))
                ops = flash_compile.sass_opcodes(compiled)
                rows.append(dict(kernel=kernel, head_dim=head_dim, flags=flags, **flash_compile.resources(compiled),
                                 wgmma_waits=re.findall(r"wgmma.wait_group.sync.aligned\s+(\d+)",
                                                        compiled.asm["ptx"]),
                                 sass_instructions=sum(ops.values()), hgmma=ops.get("HGMMA", 0)))
                print(rows[-1], flush=True)
    return rows


def inputs(batch: int, heads: int, length: int, head_dim: int, radius: int = 128, seed: int = 0):
    from sumtune.fast_t5.attention_inputs import key_padding
    from sumtune.fast_t5.flash_attention import bias_table_log2

    gen = torch.Generator(device="cuda").manual_seed(seed)
    q, k, v = (torch.randn(batch, length, heads, head_dim, device="cuda", dtype=torch.bfloat16, generator=gen)
               .transpose(1, 2) for _ in range(3))
    offsets = torch.arange(-(length - 1), length, device="cuda").clamp(-radius, radius) + radius
    table = bias_table_log2(torch.randn(heads, 2 * radius + 1, device="cuda", generator=gen)[:, offsets])
    mask = torch.ones(batch, length, dtype=torch.bool, device="cuda")
    mask[0, length - length // 3:] = False  # right padding on one row, no holes
    return q, k, v, table, radius, key_padding(mask)


def forward(gluon: bool, q, k, v, table, radius, padding, dropout_p, seed):
    from sumtune.fast_t5 import flash_attention as fa

    with mock.patch.object(fa, "GLUON_FORWARD", gluon):
        return fa._forward(q, k, v, table, radius, padding.mask, padding.lengths, padding.holes, False, 1.0,
                           dropout_p, seed, 16, True)


def compare(shapes, block_configs) -> list[dict]:
    import triton

    from sumtune.fast_t5 import flash_attention as fa
    from sumtune.fast_t5 import gluon_attention

    rows = []
    for batch, heads, length, head_dim in shapes:
        q, k, v, table, radius, padding = inputs(batch, heads, length, head_dim)
        seed = torch.tensor([1234], device="cuda", dtype=torch.int64)
        row = dict(shape=f"{batch}x{heads}x{length}x{head_dim}")
        with mock.patch.object(fa, "GLUON_FORWARD", True):
            row["gluon_covers"] = fa._gluon_covers(q, k, v, False, 16, True, 0.1)
        for p, tag in ((0.0, "nodrop"), (0.1, "drop")):  # without dropout first: a wrong mask shows apart
            ref, ref_lse = forward(False, q, k, v, table, radius, padding, p, seed)
            out, lse = forward(True, q, k, v, table, radius, padding, p, seed)
            finite = torch.isfinite(ref_lse)
            row[f"{tag}_out_max_diff"] = (out.float() - ref.float()).abs().max().item()
            row[f"{tag}_lse_max_diff"] = (lse - ref_lse)[finite].abs().max().item()
        row["out_max_abs"] = ref.float().abs().max().item()
        flops = 4 * batch * heads * length * length * head_dim  # QK^T and PV
        row["triton_ms"] = triton.testing.do_bench(
            lambda: forward(False, q, k, v, table, radius, padding, 0.1, seed), warmup=25, rep=200)
        row["triton_tflops"] = flops / row["triton_ms"] / 1e9
        for blocks in block_configs:  # (BLOCK_M, BLOCK_N, num_warps) of the Gluon kernel
            tag = "x".join(map(str, blocks))
            with mock.patch.object(gluon_attention, "BLOCKS", blocks):
                out, _ = forward(True, q, k, v, table, radius, padding, 0.1, seed)
                row[f"gluon_{tag}_drop_out_max_diff"] = (out.float() - ref.float()).abs().max().item()
                ms = triton.testing.do_bench(lambda: forward(True, q, k, v, table, radius, padding, 0.1, seed),
                                             warmup=25, rep=200)
            row[f"gluon_{tag}_ms"], row[f"gluon_{tag}_tflops"] = ms, flops / ms / 1e9
        print(row, flush=True)
        rows.append(row)
    bc.print_table(rows, list(rows[0]))
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--compile-only", action="store_true")
    parser.add_argument("--shapes", default="32x32x1024x128,4x32x4096x128,16x32x1024x64")
    parser.add_argument("--blocks", default="64x64x4,128x64x8", help="Gluon tiles BLOCK_MxBLOCK_Nxnum_warps to time")
    parser.add_argument("--no-save", action="store_true")
    args = parser.parse_args(argv)
    if args.compile_only or not torch.cuda.is_available():
        rows = compile_report()
        if not args.no_save:
            payload = dict(what="attention forward compiled for sm_90 on a CPU: Gluon (async wgmma) vs Triton "
                                "(its first autotune config)", rows=rows)
            print(f"saved {bc.save_result('gluon_attention_compile', payload, slug='cpu-sm90')}")
        return 0
    parse = lambda text: [tuple(int(x) for x in s.split("x")) for s in text.split(",") if s.strip()]
    rows = compare(parse(args.shapes), parse(args.blocks))
    if not args.no_save:
        payload = dict(what="attention forward: Gluon (async wgmma) vs Triton, through flash_attention._forward",
                       rows=rows)
        print(f"saved {bc.save_result('gluon_attention', payload)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
