"""Static counts of kernels compiled for sm_90 on this machine (no GPU): the LoRA dropout backward
(`sumtune.fast_t5.lora_dropout_kernels.low_rank_bwd`, shipped tile, r = 32, dx update) without and with
MASK_SCRATCH (its Philox rounds: `tt.mulhiui` in the TTGIR; the loop body's SASS instructions, registers,
cp.async), the decoding split combine (`sumtune.generation.cross_kernels.combine_splits`, FUSED_COMBINE) at
d_model 1024, and the Triton decoding kernel's shared memory per tile at d_model 1024 and 2048 (which tiles an
SM holds: `cross_attention.fitted_block_n`). Counts, not times: a GPU decides.

    python benchmarks/kernel_builds.py      # run without TRITON_INTERPRET

Writes benchmarks/results/kernel_builds-<date>-cpu-sm90.json.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_common as bc  # noqa: E402

LORA_TYPES = dict(X="*bf16", A="*bf16", LOW="*bf16", G="*bf16", DX="*bf16", DA_PART="*fp32", SEED="*i64", n_rows="i32",
                  n_cols="i32", rank="i32", stride_xm="i32", stride_ar="i32", stride_lm="i32", stride_gm="i32",
                  stride_dm="i32", drop_below="i32", scale="fp32", SCRATCH="*i8")
COMBINE_TYPES = dict(ACC="*fp32", MAX="*fp32", SUM="*fp32", OUT="*bf16", stride_ob="i32", stride_oh="i32",
                     padded_heads="i32")


def lora_backward_rows() -> list[dict]:
    from sumtune.fast_t5 import lora_dropout
    from sumtune.fast_t5 import lora_dropout_kernels as k
    from sumtune.fast_t5.flash_compile import compile_source, loop_bodies, resources

    unit = {n: 1 for n in ("stride_xk", "stride_ak", "stride_gr", "stride_dk") if n in k.low_rank_bwd.arg_names}
    bm, bk, warps, stages = lora_dropout.BACKWARD_TILE
    rows = []
    for scratch in (False, True):
        compiled = compile_source(k.low_rank_bwd, LORA_TYPES, dict(
            TILES_PER_SPLIT=4, RANK=32, BLOCK_M=bm, BLOCK_K=bk, UPDATE_DX=True, UPCAST=False, INDEX_64=False,
            MASK_SCRATCH=scratch, **unit), warps, stages)
        rows.append(dict(kernel="lora_dropout.low_rank_bwd", tile=f"{bm}x{bk}x{warps}x{stages}", rank=32,
                         mask_scratch=scratch, tt_mulhiui=compiled.asm["ttgir"].count("tt.mulhiui"),
                         loop_instructions=[loop["total"] for loop in loop_bodies(compiled)], **resources(compiled)))
    return rows


def combine_rows() -> list[dict]:
    from sumtune.fast_t5.flash_compile import compile_source, resources
    from sumtune.generation import cross_kernels
    from sumtune.generation.cross_attention import combine_constexprs

    rows = []
    for splits in (2, 5, 16):
        compiled = compile_source(cross_kernels.combine_splits, COMBINE_TYPES, combine_constexprs(splits, 1024), 4, 1)
        rows.append(dict(kernel="cross_kernels.combine_splits", splits=splits, d_model=1024, **resources(compiled)))
    return rows


DECODE_TYPES = dict(Q="*bf16", MEM="*bf16", LENGTHS="*i32", OUT="*bf16", ACC="*fp32", MAX="*fp32", SUM="*fp32",
                    BIAS="*bf16", stride_qb="i32", stride_qh="i32", stride_mb="i32", stride_mn="i32", stride_ob="i32",
                    stride_oh="i32", stride_lb="i32", stride_bh="i32", heads="i32", keys_per_split="i32")


def decode_tile_rows() -> list[dict]:
    """The Triton decoding kernel's shared memory at T5-3b's d_model 1024 and FLAN-T5-XL's 2048, per tile (keys,
    warps) at 16 heads a program: which tiles an SM's 227 KiB holds (cross_attention.fitted_block_n)."""
    from sumtune.fast_t5.flash_compile import compile_source
    from sumtune.generation import cross_attention, cross_kernels

    rows = []
    for d_model in (1024, 2048):
        for block_n, warps in ((64, 8), (32, 4), (16, 4)):
            compiled = compile_source(cross_kernels.hidden_cross_attention, DECODE_TYPES, dict(
                BLOCK_H=cross_attention.HEADS_PER_PROGRAM, D=d_model, BLOCK_N=block_n, SPLIT=True, UPCAST=False,
                HAS_BIAS=False), warps, cross_attention.NUM_STAGES)
            rows.append(dict(kernel="cross_kernels.hidden_cross_attention", d_model=d_model, block_n=block_n,
                             warps=warps, shared_bytes=compiled.metadata.shared))
    return rows


def summary(lora: list[dict], combine: list[dict]) -> str:
    drawn, scratch = lora
    registers = [row["registers"] for row in combine]
    return (f"MASK_SCRATCH: {scratch['tt_mulhiui']} vs {drawn['tt_mulhiui']} tt.mulhiui, "
            f"{scratch['loop_instructions']} vs {drawn['loop_instructions']} loop instructions, "
            f"{scratch['registers']} vs {drawn['registers']} registers, cp.async {scratch['async_copies']} vs "
            f"{drawn['async_copies']}. combine_splits: {min(registers)}-{max(registers)} registers, spill "
            f"{max(row['spill_bytes'] for row in combine)} bytes. Instruction counts, not timings.")


def main() -> int:
    import triton

    lora, combine, decode = lora_backward_rows(), combine_rows(), decode_tile_rows()
    for row in lora + combine + decode:
        print(row)
    result = summary(lora, combine) + " hidden_cross_attention shared memory: " + ", ".join(
        f"{row['block_n']} keys x {row['warps']} warps at d_model {row['d_model']} {row['shared_bytes']:,} bytes"
        for row in decode) + "."
    print(result)
    path = bc.save_result("kernel_builds", dict(
        gpu="none (compiled for sm_90 on a CPU)", triton=triton.__version__, rows=lora + combine + decode,
        result=result,
        what="sm_90 builds by triton.compile on the CPU (no GPU ran them): lora_dropout's backward at the shipped "
             "tile and r=32 with the dx update, without and with MASK_SCRATCH (on by default since session 46), and "
             "cross_kernels.combine_splits (FUSED_COMBINE) at d_model 1024 and 2, 5, 16 splits, and the Triton "
             "decoding kernel's shared memory per tile at d_model 1024 and 2048. Command: python "
             "benchmarks/kernel_builds.py"), slug="cpu-sm90")
    print(f"saved {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
