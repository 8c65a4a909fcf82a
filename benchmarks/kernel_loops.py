"""Static instruction counts of sumtune's Triton attention kernels with one `flash_attention` flag off and on: each
autotune tile compiled for sm_90 on this machine (no GPU), each main loop body's SASS instructions (what a warp issues
per tile: `sumtune.fast_t5.flash_compile.loop_bodies`), registers and spill. Counts, not times: a GPU decides.

    python benchmarks/kernel_loops.py --kernel dkdv --flag LEAN_BACKWARD --set STORE_DS=1
    python benchmarks/kernel_loops.py --kernel fwd --flag LEAN_FORWARD --no-dropout

Writes benchmarks/results/kernel_loops-<date>-cpu-sm90[-tag].json. Needs compiled kernels: run without
TRITON_INTERPRET.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def parse_setting(text: str) -> tuple[str, bool]:
    name, _, value = text.partition("=")
    return name, value not in ("0", "false", "False")


def measure(kernel: str, flag: str, dropout: bool, settings: dict) -> list[dict]:
    from sumtune.fast_t5 import flash_compile
    from sumtune.fast_t5.flash_tiles import AUTOTUNE_CONFIGS

    builds = [(config, dict(settings, DROPOUT=dropout)) for config in AUTOTUNE_CONFIGS[kernel]]
    rows = []
    for row in flash_compile.loops_off_and_on(kernel, flag, builds):
        loops = row.pop("loops")
        for name in settings:
            del row[name]  # the file's settings, once, in `what`
        row["dropout"] = row.pop("DROPOUT")
        rows.append(dict(row, loop_instructions=[loop["total"] for loop in loops],
                         loop_hgmma=[loop["HGMMA"] for loop in loops]))
        print(rows[-1], flush=True)
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kernel", choices=["fwd", "dkdv", "dq"], required=True)
    parser.add_argument("--flag", required=True, help="a boolean of sumtune.fast_t5.flash_attention, off then on")
    parser.add_argument("--set", nargs="*", action="extend", default=[], metavar="NAME=0|1",
                        help="build flags passed to flash_compile.compile_kernel (e.g. STORE_DS=1)")
    parser.add_argument("--no-dropout", action="store_true", help="only the build without dropout")
    parser.add_argument("--tag", default="")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET"):
        parser.error("unset TRITON_INTERPRET: the interpreter's kernels do not compile")
    import triton

    settings = dict(parse_setting(s) for s in args.set)
    rows = [row for dropout in ((False,) if args.no_dropout else (True, False))
            for row in measure(args.kernel, args.flag, dropout, settings)]
    summary = "; ".join(
        f"{tuple(off['config'])}{' dropout' if off['dropout'] else ''}: on {on['loop_instructions']} against off "
        f"{off['loop_instructions']}, spill {on['spill_bytes']} vs {off['spill_bytes']} B"
        for off, on in zip(rows[::2], rows[1::2]))
    date = datetime.date.today().isoformat()
    out = dict(name="kernel_loops", date=date, gpu="none (CPU compile for sm_90)",
               versions=dict(triton=triton.__version__), command="python " + " ".join([__file__.split("/")[-2] + "/"
                                                                                       + Path(__file__).name,
                                                                                       *sys.argv[1:]]),
               what=f"{args.kernel} kernel at every autotune tile, T5 encoder build (bias band, key padding, "
                    f"head_dim 128), flash_attention.{args.flag} off and on, settings {settings}: each main loop "
                    f"body's SASS instruction count (what a warp issues per tile) in code order.",
               rows=rows, result=summary + ". Static counts, not times.")
    path = RESULTS / f"kernel_loops-{date}-cpu-sm90{'-' + args.tag if args.tag else ''}.json"
    path.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
