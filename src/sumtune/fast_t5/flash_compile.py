"""Compile sumtune's Triton attention kernels for a GPU architecture without a GPU: registers, spills, shared memory.

    python -m sumtune.fast_t5.flash_compile                 # every autotune config, head_dim 64 and 128, sm_90
    python -m sumtune.fast_t5.flash_compile --json          # the same as JSON lines (what the tests read)
    python -m sumtune.fast_t5.flash_compile --sass --first-only --head-dims 128   # + each kernel's SASS opcodes

The arguments mirror what a launch on T5-3b shapes specialises (strides equal to 1 become constants, ints and
pointers divisible by 16 are marked so), so the code is what the GPU would run; ptxas, bundled with Triton, reports
registers and spills. Needs compiled kernels: run without TRITON_INTERPRET.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import subprocess
import sys
import tempfile
import time

HOPPER_SHARED_BYTES = 232448  # H100/H200: 227 KiB of shared memory per block
KERNELS = {"fwd": "t5_flash_attention_fwd", "dkdv": "t5_flash_attention_bwd_dkdv",
           "dq": "t5_flash_attention_bwd_dq"}
T5_FLAGS = dict(CAUSAL=False, HAS_BIAS=True, HAS_KEY_MASK=True, DROPOUT=True)  # encoder self-attention, training


def example_arguments(kernel, batch: int = 32, heads: int = 32, length: int = 1024, head_dim: int = 128,
                      dtype: str = "bf16") -> dict:
    """Runtime arguments of ``kernel`` for (B, L, H, D) tensors seen as (B, H, L, D), as the fast path has them."""
    strides = {"b": length * heads * head_dim, "h": head_dim, "m": heads * head_dim, "n": heads * head_dim, "d": 1}
    pointers = {"LSE": "*fp32", "DELTA": "*fp32", "TABLE": "*fp32", "KMASK": "*i8", "KV_LEN": "*i32", "HOLES": "*i8",
                "SEED": "*i64", "V_LARGEST": f"*{dtype}", "BAND": "*fp32"}
    values = dict(H=heads, Lq=length, Lk=length, R=128, table_row=2 * length - 1 + 256, table_zero=length - 1 + 128,
                  stride_dsb=heads * length * length, stride_dsh=length * length, stride_dsn=length,
                  qk_scale=1.4427, scale=1.0, drop_scale=1.11, drop_below=6554, len_key=length,
                  stride_mask_b=length, band_w=640, band_head=128 * 640)
    arguments = {}
    for name in kernel.arg_names:
        if name in pointers:
            arguments[name] = pointers[name]
        elif name in ("Q", "K", "V", "O", "DO", "DK", "DV", "DQ", "DS"):
            arguments[name] = f"*{dtype}"
        elif name in values:
            arguments[name] = values[name]
        elif name.startswith("stride_"):
            arguments[name] = strides[name[-1]]
    return arguments


def compile_kernel(name: str, block_m: int, block_n: int, num_warps: int, num_stages: int, head_dim: int = 128,
                   dtype: str = "bf16", arch: int = 90, **flags):
    """triton.compile one kernel for ``sm_<arch>`` with the specialisation a launch would give it."""
    from sumtune.fast_t5 import flash_kernels

    if flash_kernels.INTERPRET:
        raise RuntimeError("TRITON_INTERPRET=1 decorates interpreted kernels, which do not compile: unset it")
    from sumtune.fast_t5.flash_attention import (BIAS_BAND, BWD_DESCRIPTORS, DROPOUT_PAIRS,
                                                 FWD_DESCRIPTORS, LEAN_BACKWARD, LEAN_FORWARD,
                                                 MASK_ONLY_WITH_HOLES, _pairs_mode, near_stages)

    kernel = getattr(flash_kernels, KERNELS[name])
    pairs = _pairs_mode(DROPOUT_PAIRS, 1024)  # at the 1024 keys example_arguments specialises for (flags may differ)
    shipped = {"DRAW8": False, "STORE_DS": False, "PV_SPLIT": False, "PV_FP16": False, "PAIRS": pairs,
               "CHECK_HOLES": MASK_ONLY_WITH_HOLES, "USE_BAND": BIAS_BAND,
               "DESC": FWD_DESCRIPTORS if name == "fwd" else BWD_DESCRIPTORS,
               "NEAR_STAGES": near_stages(name, block_m, block_n, num_stages).get("NEAR_STAGES"),
               "LEAN_TILES": (LEAN_FORWARD if name == "fwd" else LEAN_BACKWARD)  # as flash_attention
               and not flags.get("CAUSAL", T5_FLAGS["CAUSAL"])}
    constexprs = dict(HEAD_DIM=head_dim, BLOCK_M=block_m, BLOCK_N=block_n, UPCAST=False,
                      **{**shipped, **T5_FLAGS, **flags})
    # STORE_DS: dK/dV only; PV_*: forward only
    constexprs = {k: v for k, v in constexprs.items() if k in kernel.arg_names}
    examples = example_arguments(kernel, head_dim=head_dim, dtype=dtype)
    if constexprs.get("PV_FP16"):  # the forward then reads V as its float16 copy (sumtune.fast_t5.fp16_values)
        examples["V"] = "*fp16"
    if constexprs.get("DESC"):  # TMA descriptors: the forward's K and V (BLOCK_N rows), dK/dV's Q and dO (BLOCK_M)
        rows, names = (block_n, ("K", "V")) if name == "fwd" else (block_m, ("Q", "DO"))
        examples.update({n: f"tensordesc<{dtype}[{rows}, {head_dim}]>" for n in names})
    signature, attrs = {}, {}
    for index, arg in enumerate(kernel.arg_names):
        if arg in constexprs:
            signature[arg] = "constexpr"
            continue
        value = examples[arg]
        specialise = arg not in kernel.do_not_specialize
        if isinstance(value, str):
            signature[arg], attrs[(index,)] = value, [["tt.divisibility", 16]]
        elif isinstance(value, float):
            signature[arg] = "fp32"
        elif value == 1 and specialise:
            signature[arg], constexprs[arg] = "constexpr", 1
        else:
            signature[arg] = "i32"
            if value % 16 == 0 and specialise:
                attrs[(index,)] = [["tt.divisibility", 16]]
    return _compile(kernel, signature, constexprs, attrs, num_warps, num_stages, arch)


def compile_source(kernel, arg_types: dict, constexprs: dict, num_warps: int, num_stages: int = 2, arch: int = 90):
    """triton.compile any kernel for ``sm_<arch>``: ``arg_types`` maps each runtime argument to its Triton type
    ("*bf16", "i32", "fp32" ...); pointers and ints are marked divisible by 16, as launches on T5 shapes specialise
    them (for the feed-forward and decoding kernels, whose arguments are simpler than the attention kernels')."""
    signature, attrs = {}, {}
    for index, name in enumerate(kernel.arg_names):
        if name in constexprs:
            signature[name] = "constexpr"
            continue
        signature[name] = arg_types[name]
        if arg_types[name].startswith("*") or arg_types[name].startswith("i"):
            attrs[(index,)] = [["tt.divisibility", 16]]
    return _compile(kernel, signature, constexprs, attrs, num_warps, num_stages, arch)


def _compile(kernel, signature: dict, constexprs: dict, attrs: dict, num_warps: int, num_stages: int, arch: int):
    import triton
    from triton.backends.compiler import GPUTarget

    source = triton.compiler.ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs)
    return triton.compile(source, target=GPUTarget("cuda", arch, 32),
                          options=dict(num_warps=num_warps, num_stages=num_stages))


def resources(compiled, arch: int = 90) -> dict:
    """Registers and spilled bytes (ptxas -v on the PTX), shared memory, and whether loads were pipelined."""
    from triton.backends.nvidia.compiler import get_ptxas

    ptxas = get_ptxas(arch).path  # the assembler Triton itself uses for this arch (3.9 emits PTX its old one refuses)
    with tempfile.NamedTemporaryFile("w", suffix=".ptx") as handle:
        handle.write(compiled.asm["ptx"])
        handle.flush()
        log = subprocess.run([ptxas, f"-arch=sm_{arch}a", "-v", handle.name, "-o", "/dev/null"],
                             capture_output=True, text=True, check=True).stderr
    return dict(registers=max(int(r) for r in re.findall(r"Used (\d+) registers", log)),
                spill_bytes=sum(int(s) for s in re.findall(r"(\d+) bytes spill stores", log)),
                shared_bytes=compiled.metadata.shared,
                async_copies=compiled.asm["ttgir"].count("async_copy_global_to_local"))


def sass_opcodes(compiled, arch: int = 90) -> dict[str, int]:
    """How often each SASS opcode (``FMUL``, ``HGMMA``, ``LDS`` ...; modifiers dropped) occurs in the machine code,
    disassembled by the nvdisasm that ships beside Triton's ptxas: a static count (loops once, all branches), which
    tells what a kernel variant adds or removes before a GPU times it."""
    found = re.findall(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)", _sass(compiled, arch))
    return dict(collections.Counter(found).most_common())


def _sass(compiled, arch: int = 90) -> str:
    """The sm_<arch> cubin disassembled by the nvdisasm that ships beside Triton's ptxas."""
    from triton.backends.nvidia.compiler import get_ptxas

    nvdisasm = os.path.join(os.path.dirname(get_ptxas(arch).path), "nvdisasm")
    with tempfile.NamedTemporaryFile("wb", suffix=".cubin") as handle:
        handle.write(compiled.asm["cubin"])
        handle.flush()
        return subprocess.run([nvdisasm, "-c", handle.name], capture_output=True, text=True, check=True).stdout


def loop_bodies(compiled, arch: int = 90) -> list[dict[str, int]]:
    """Each loop of the machine code (a branch back to a label), in code order: its instruction count ("total") and
    opcode counts. A loop body's instructions are what every warp issues per iteration: beside its tensor-core
    instructions (HGMMA), the issue slots the tile's masks, softmax and dropout take."""
    labels, instructions = {}, []
    for line in _sass(compiled, arch).splitlines():
        label = re.match(r"\s*\.(L_x_\d+):", line)
        if label:
            labels[label.group(1)] = len(instructions)
            continue
        found = re.match(r"\s*/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)([^;]*);", line)
        if found:
            instructions.append((found.group(1), found.group(2)))
    bodies = []
    for index, (opcode, operands) in enumerate(instructions):
        target = re.search(r"`\(\.(L_x_\d+)\)", operands)
        if opcode == "BRA" and target and labels.get(target.group(1), index) < index:
            body = collections.Counter(op for op, _ in instructions[labels[target.group(1)]: index + 1])
            bodies.append(dict(body, total=sum(body.values())))
    return bodies


def loops_off_and_on(kernel: str, flag: str, builds, head_dim: int = 128, arch: int = 90) -> list[dict]:
    """For each (tile, build flags) of ``builds``, ``kernel`` compiled for sm_<arch> with ``flash_attention.<flag>``
    off, then on: its resources and its main loop bodies in code order (`loop_bodies`' loops with tensor-core
    instructions: not a pipeline epilogue or the dS zeroing loop). The flag is put back as it was."""
    from sumtune.fast_t5 import flash_attention

    before, rows = getattr(flash_attention, flag), []
    try:
        for config, flags in builds:
            for on in (False, True):
                setattr(flash_attention, flag, on)
                compiled = compile_kernel(kernel, *config, head_dim=head_dim, arch=arch, **flags)
                loops = [loop for loop in loop_bodies(compiled, arch) if loop.get("HGMMA")]
                rows.append(dict(kernel=kernel, config=list(config), **flags, **{flag: on},
                                 **resources(compiled, arch), loops=loops))
    finally:
        setattr(flash_attention, flag, before)
    return rows


def report(head_dims=(64, 128), arch: int = 90, first_only: bool = False, sass: bool = False, **flags):
    """One dict per (kernel, autotune config, head_dim) with its compile time and resources."""
    from sumtune.fast_t5.flash_tiles import AUTOTUNE_CONFIGS

    for head_dim in head_dims:
        for name, configs in AUTOTUNE_CONFIGS.items():
            for config in configs[:1] if first_only else configs:
                started = time.time()
                row = dict(kernel=name, config=list(config), head_dim=head_dim, **{**T5_FLAGS, **flags})
                try:
                    compiled = compile_kernel(name, *config, head_dim=head_dim, arch=arch, **flags)
                    row.update(resources(compiled, arch))
                    if sass:
                        row["sass"] = sass_opcodes(compiled, arch)
                except Exception as error:  # noqa: BLE001 - a config that does not compile is the finding
                    row["error"] = f"{type(error).__name__}: {str(error).splitlines()[0][:200]}"
                row["compile_s"] = round(time.time() - started, 1)
                yield row


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--head-dims", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--arch", type=int, default=90, help="compute capability x10 (90: H100/H200)")
    parser.add_argument("--causal", action="store_true", help="the decoder's variant instead of the encoder's")
    parser.add_argument("--draw8", action="store_true", help="dropout from 8-bit draws (DROPOUT_DRAW_BITS = 8)")
    parser.add_argument("--first-only", action="store_true", help="each kernel's first autotune config only")
    parser.add_argument("--json", action="store_true", help="JSON lines instead of a table")
    parser.add_argument("--sass", action="store_true", help="also count each kernel's SASS opcodes (nvdisasm)")
    args = parser.parse_args(argv)
    failed = False
    for row in report(tuple(args.head_dims), args.arch, args.first_only, args.sass, CAUSAL=args.causal,
                      DRAW8=args.draw8):
        failed |= "error" in row
        if args.json:
            print(json.dumps(row), flush=True)
        else:
            print(f"{row['kernel']:5} D={row['head_dim']:<4} {str(tuple(row['config'])):18} "
                  + (row.get("error") or f"regs {row['registers']:3}  spill {row['spill_bytes']:5} B  "
                     f"smem {row['shared_bytes'] / 1024:6.1f} KiB  async copies {row['async_copies']:2}")
                  + f"  ({row['compile_s']} s)", flush=True)
            if "sass" in row:
                print("      " + "  ".join(f"{op} {count}" for op, count in list(row["sass"].items())[:16]))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
