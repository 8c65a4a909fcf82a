"""Which of the Triton attention kernels' bf16 roundings moves a T5's LoRA gradients away from float32 (CPU study).

    python benchmarks/attention_numerics_cpu.py --src-len 2048 --tgt-len 256 --draws 2 --variants base,fwd,dv,ds,fwd16

A small T5 (d_model 256, 4 heads of 64, 2+2 layers, NF4 + LoRA on every linear, dropout off) on real BillSum rows,
the gradients of stock SDPA, stock eager, the fast path with SDPA attention and the fast path with sumtune's kernels in
Triton's CPU interpreter, each against the float32 recomputation (as `train_throughput.py --numerics` on a GPU).
Triton's interpreter truncates float32 to bf16 (a -2.7e-3 mean relative error: a bias), while the GPU rounds to
nearest (`cvt.rn.bf16.f32` in the sm_90 PTX), so every variant runs on a copy of the kernels whose bf16 casts round to
nearest first; a variant then leaves one rounding out: `fwd` P in the forward's P·V, `dv` P in dV, `ds` dS in dK and
dQ (the dQ kernel), `fwd16` P and V in float16 in the forward, `fwdsum` the softmax's row sum taken over the
rounded P, `pv16` the product's PV_FP16 switch (V scaled into float16's range, P cast to float16), `pvsplit` with
PV_SPLIT too (the default from 2048 keys), `pv16all` PV_FP16 below 2048 keys as well (session 16 ran `pv16` before
the threshold existed; `pvlow8`, PV_LOW8 on top, results/attention_numerics_cpu_pvlow8-*, was removed with PV_LOW8:
commit b74dbf9 has it). The copy lives in a temporary directory; sumtune itself is not changed. Writes
benchmarks/results/attention_numerics_cpu-<date>-cpu.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROUND_TO_NEAREST = '''

@triton.jit
def _rn(x):
    """float32 rounded to the nearest bf16, ties to even (what the GPU's cvt.rn does; the interpreter truncates)"""
    bits = x.to(tl.uint32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return bits.to(tl.float32, bitcast=True)

'''
# The kernels' float32 -> bf16 casts, each as it is and rounded to nearest; variants then rewrite the rounded text.
PV_DOT = "\n        acc = _dot(p_high, v, UPCAST, acc)"
PV = "p_high = p.to(v.dtype)" + PV_DOT  # the forward's P·V (P cast to V's dtype)
ROUNDED_PV = "p_high = _rn(p).to(v.dtype)" + PV_DOT
DS = "ds_t = (p_t * (dp_t - delta[None, :])).to(q_t.dtype)"
ROUNDED_DS = "ds_t = _rn(p_t * (dp_t - delta[None, :])).to(q_t.dtype)"
CASTS = [(PV, ROUNDED_PV),
         ("out.to(O.dtype.element_ty)", "_rn(out).to(O.dtype.element_ty)"),
         ("dv = _dot(pd_t.to(do.dtype), do, UPCAST, dv)", "dv = _dot(_rn(pd_t).to(do.dtype), do, UPCAST, dv)"),
         (DS, ROUNDED_DS),
         ("(dk * scale).to(DK.dtype.element_ty)", "_rn(dk * scale).to(DK.dtype.element_ty)"),
         ("dv.to(DV.dtype.element_ty)", "_rn(dv).to(DV.dtype.element_ty)"),
         ("dq = _dot(ds.to(k_t.dtype), tl.trans(k_t), UPCAST, dq)",
          "dq = _dot(_rn(ds).to(k_t.dtype), tl.trans(k_t), UPCAST, dq)"),
         ("(dq * scale).to(DQ.dtype.element_ty)", "_rn(dq * scale).to(DQ.dtype.element_ty)")]
VARIANTS = {
    "base": [],
    "fwd": [(ROUNDED_PV, "p_high = p.to(v.dtype)\n        acc = _dot(p, v.to(tl.float32), UPCAST, acc)")],
    "dv": [("dv = _dot(_rn(pd_t).to(do.dtype), do, UPCAST, dv)", "dv = _dot(pd_t, do.to(tl.float32), UPCAST, dv)")],
    "ds": [(ROUNDED_DS + "\n        dk = _dot(ds_t, tl.trans(q_t), UPCAST, dk)",
            "ds_t = p_t * (dp_t - delta[None, :])\n        dk = _dot(ds_t, tl.trans(q_t.to(tl.float32)), UPCAST, dk)"),
           ("dq = _dot(_rn(ds).to(k_t.dtype), tl.trans(k_t), UPCAST, dq)",
            "dq = _dot(ds, tl.trans(k_t.to(tl.float32)), UPCAST, dq)")],
    "fwd16": [(ROUNDED_PV,
               "p_high = p.to(v.dtype)\n        acc = _dot(p.to(tl.float16), v.to(tl.float16), UPCAST, acc)")],
    # the product's own P·V switches (PRODUCT_PV below): P cast to V's float16 as the kernels do, not first to bf16
    **{name: [(ROUNDED_PV, PV)] for name in ("pv16", "pvsplit", "pv16all")},
    # the row sum over the rounded P (dropout off here; with dropout it would have to be taken before the mask)
    "fwdsum": [("        l_i = l_i * alpha + tl.sum(p, 1)\n", ""),
               ("        " + ROUNDED_PV,
                "        p_high = _rn(p).to(v.dtype)\n        l_i = l_i * alpha + tl.sum(p_high.to(tl.float32), 1)"
                + PV_DOT)],
}


# Benchmark tokens (bench_common.PATCH_TOKENS) each variant runs under: the dQ kernel (its dS cast is the one `ds`
# leaves out; the stored dS rounds the same) and, but for the product's own switches, the bf16 P·V the text patches
# start from. `pv16all`: PV_FP16 in every call, the decoder's 256-key self-attention too (no 2048-key threshold).
BF16_PV = "nopv16:nopvsplit"
PRODUCT_PV = {"pv16": "nopvsplit", "pvsplit": "", "pv16all": "nopvsplit:pvall"}


def variant_tokens(variant: str) -> str:
    return "nodsgemm:" + PRODUCT_PV.get(variant, BF16_PV)


def patched_kernels(source: str, variant: str) -> str:
    first = source.index("@triton.jit")
    source = source[:first] + ROUND_TO_NEAREST.lstrip("\n") + "\n" + source[first:]
    for old, new in CASTS + VARIANTS[variant]:
        if old not in source:
            raise SystemExit(f"the kernels no longer contain {old!r}: update this study's patterns")
        source = source.replace(old, new)
    return source


def run_draws(args) -> list[dict]:
    """One variant, in this process (its own copy of sumtune first on sys.path, the interpreter on)."""
    import sumtune  # the patched copy (PYTHONPATH), before bench_common puts this checkout's src first

    if not sumtune.__file__.startswith(os.environ["PYTHONPATH"]):
        raise SystemExit(f"sumtune came from {sumtune.__file__}, not the patched copy")
    import torch

    import bench_common as bc
    import fast_numerics as fn
    from sumtune.fast_t5 import disable_fast_t5, enable_fast_t5, flash_attention as fa
    from sumtune.fast_t5.numerics import fp32_reference_grads, vector_relative_error

    torch.set_num_threads(2)
    config = bc.t5_config("tiny", num_layers=2, dropout_rate=0.0, d_model=256, num_heads=4, d_kv=64, d_ff=1024)
    data = bc.tokenize_rows(bc.load_t5_tokenizer(), bc.load_billsum_texts(), args.src_len, args.tgt_len)
    device, rows = torch.device("cpu"), []
    for seed in range(args.draws):
        model = fn.build_numerics_model(config, device, seed)
        batch = bc.batch_at(data, seed, 1)
        grads = {"stock_sdpa": fn.loss_and_grads(model, batch, device)[1]}
        fn.set_attn_implementation(model, "eager")
        grads["stock_eager"] = fn.loss_and_grads(model, batch, device)[1]
        fn.set_attn_implementation(model, "sdpa")
        for backend in ("sdpa", "triton"):
            enable_fast_t5(model, attention_backend=backend)
            with fa.block_sizes(fwd=(64, 64), dkdv=(64, 64), dq=(64, 64)), bc.patched(variant_tokens(args.run_one)):
                grads[f"fast_{backend}"] = fn.loss_and_grads(model, batch, device)[1]
            disable_fast_t5(model)
        reference = fp32_reference_grads(model, batch)[1]
        rows.append({"seed": seed, **{f"{k}_vs_fp32": vector_relative_error(g, reference) for k, g in grads.items()}})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--src-len", type=int, default=2048)
    parser.add_argument("--tgt-len", type=int, default=256)
    parser.add_argument("--draws", type=int, default=2)
    parser.add_argument("--variants", default="base,fwd,dv,ds,fwd16")
    parser.add_argument("--tag", default=None, help="suffix of the result file name")
    parser.add_argument("--run-one", default=None, help=argparse.SUPPRESS)  # internal: a variant's own process
    args = parser.parse_args()
    import bench_common as bc

    if args.run_one:
        print("ROWS " + json.dumps(run_draws(args)))
        return
    results = {}
    for variant in args.variants.split(","):
        with tempfile.TemporaryDirectory() as tmp:
            shutil.copytree(bc.REPO_ROOT / "src", Path(tmp) / "src")
            kernels = Path(tmp) / "src" / "sumtune" / "fast_t5" / "flash_kernels.py"
            kernels.write_text(patched_kernels(kernels.read_text(), variant))
            env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(Path(tmp) / "src"), "HF_HUB_OFFLINE": "1"}
            out = subprocess.run([sys.executable, __file__, "--run-one", variant, "--src-len", str(args.src_len),
                                  "--tgt-len", str(args.tgt_len), "--draws", str(args.draws)],
                                 env=env, capture_output=True, text=True, check=True).stdout
        rows = json.loads(next(line for line in out.splitlines() if line.startswith("ROWS "))[5:])
        means = {k: statistics.fmean(r[k] for r in rows) for k in rows[0] if k.endswith("_vs_fp32")}
        results[variant] = {"draws": rows, "mean": means}
        print(f"{variant}: " + ", ".join(f"{k} {v:.4e}" for k, v in means.items()), flush=True)
    name = "attention_numerics_cpu" + (f"_{args.tag}" if args.tag else "")
    payload = dict(src_len=args.src_len, tgt_len=args.tgt_len, draws=args.draws, variants=results)
    path = bc.save_result(name, payload, slug="cpu")
    print(f"saved {path}")


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    main()
