"""The warp-specialized Gluon kernels' sm_90 builds on this machine (no GPU): registers, spill, shared memory and a
few instruction counts for each setting the code, the tests and the notes speak of. Counts, not times: a GPU decides.

    python benchmarks/ws_kernels_compile.py                 # Triton of this environment
    .venv-latest/bin/python benchmarks/ws_kernels_compile.py --tag latest

Writes benchmarks/results/ws_kernels_compile-<date>-cpu-sm90[-tag].json (bench_common.save_result: never over an
earlier file). Needs compiled kernels: run without TRITON_INTERPRET.
"""

from __future__ import annotations

import argparse
import re
import sys

import bench_common as bc

# (kernel, module, compile_for_sm90's keyword arguments): the shipped builds and the ones the notes compare
BUILDS = [
    ("ws_forward", "sumtune.fast_t5.ws_forward", {}),
    ("ws_forward", "sumtune.fast_t5.ws_forward", {"stages": 3}),
    ("ws_forward", "sumtune.fast_t5.ws_forward", {"HAS_BIAS": False, "HAS_KEY_MASK": False}),
    ("ws_forward", "sumtune.fast_t5.ws_forward", {"LEAN_FAR": True}),
    ("ws_forward", "sumtune.fast_t5.ws_forward", {"DROPOUT": True}),
    ("ws_forward", "sumtune.fast_t5.ws_forward", {"DROPOUT": True, "HAS_BIAS": False}),
    ("ws_forward", "sumtune.fast_t5.ws_forward", {"head_dim": 64, "stages": 3}),
    ("ws_backward", "sumtune.fast_t5.ws_backward", {}),
    ("ws_backward", "sumtune.fast_t5.ws_backward", {"DROPOUT": False}),
    ("ws_backward", "sumtune.fast_t5.ws_backward", {"block_m": 64}),
    ("ws_backward", "sumtune.fast_t5.ws_backward", {"block_m": 64, "DROPOUT": False}),
    ("gluon_decode_ws", "sumtune.generation.gluon_decode_ws", {}),
    ("gluon_decode_ws", "sumtune.generation.gluon_decode_ws", {"split": True}),
]


def measure() -> list[dict]:
    import importlib

    import triton

    from sumtune.fast_t5 import flash_compile

    rows = []
    for kernel, module, settings in BUILDS:
        compiled = importlib.import_module(module).compile_for_sm90(**settings)
        ptx, sass = compiled.asm["ptx"], flash_compile._sass(compiled)
        rows.append(dict(kernel=kernel, settings=settings, triton=triton.__version__,
                         **flash_compile.resources(compiled), hgmma=sass.count("HGMMA"),
                         mul_hi=len(re.findall(r"\bmul\.hi\.u32\b", ptx)),
                         # each mbarrier.arrive is a warpgroup bar.sync and one thread's arrive in Triton 3.6
                         mbarrier_arrives=ptx.count("mbarrier.arrive.shared"), bar_syncs=ptx.count("bar.sync"),
                         setmaxnreg=re.findall(r"setmaxnreg\.(\w+)\.sync\.aligned\.u32\s+(\d+)", ptx)))
        print(rows[-1], flush=True)
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tag", default="", help="suffix of the result file name")
    args = parser.parse_args(argv)
    rows = measure()
    path = bc.save_result("ws_kernels_compile", dict(what=__doc__.splitlines()[0], rows=rows),
                          slug="cpu-sm90" + (f"-{args.tag}" if args.tag else ""))
    print(f"saved {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
