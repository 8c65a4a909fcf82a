"""One LoRA layer with input dropout, forward + backward, as `sumtune train` runs it (the fused node of
`sumtune.fast_t5.lora4bit` on a real bitsandbytes NF4 linear and a PEFT adapter, the weight cache and the
concatenated GEMMs on): `native_dropout` (the dropped copy and its mask kept) against the kernels of
`sumtune.fast_t5.lora_dropout` (the mask regenerated from a seed), at the seed config's layers of T5-3b.

    python benchmarks/lora_dropout.py                      # GPU: v (1024 -> 4096) and o (4096 -> 1024), 16 x 1024 rows
    python benchmarks/lora_dropout.py --quick              # CPU plumbing check (Triton's interpreter), tiny shapes

Rows: median ms of forward + backward (CUDA events, back to back), the bytes the node keeps for its backward, and
each route's output and gradients against a float64 recomputation with the same mask. Backward tiles are given as
BLOCK_MxBLOCK_KxWARPSxSTAGES. Writes benchmarks/results/lora_dropout-<date>-<gpu>.json.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
if "--quick" in sys.argv[1:]:  # before anything imports Triton: its language is patched for the interpreter only so
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402

import bench_common as bc  # noqa: E402


class OneLayer(torch.nn.Module):
    def __init__(self, n_in: int, n_out: int):
        super().__init__()
        self.proj = torch.nn.Linear(n_in, n_out, bias=False)

    def forward(self, x):
        return self.proj(x)


def lora_layer(n_in: int, n_out: int, rank: int, dropout: float, device: torch.device, cache: bool):
    """PEFT LoRA (r=rank, alpha 16, B random) on an NF4 linear, fused as sumtune's fast T5 fuses it."""
    from peft import LoraConfig, get_peft_model

    from sumtune.fast_t5 import cache_dequantized_weights
    from sumtune.fast_t5.lora4bit import fuse_lora_4bit
    from sumtune.modeling import keep_4bit_layout

    torch.manual_seed(0)
    base = OneLayer(n_in, n_out)
    with torch.no_grad():
        base.proj.weight.normal_(0.0, n_in ** -0.5)
    base = bc.quantize_linear4bit(base.to(torch.bfloat16), device=device, skip=())
    keep_4bit_layout(base)
    base.is_loaded_in_4bit = True
    model = get_peft_model(base, LoraConfig(r=rank, lora_alpha=16, lora_dropout=dropout, target_modules=["proj"]))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.normal_(0.0, 0.02)
    model = model.to(device).train()
    if cache:
        cache_dequantized_weights(model)
    fuse_lora_4bit(model, concat_gemms=True)
    return model


def fused_node(out: torch.Tensor):
    """The FusedLora4bit node behind ``out`` (a view or a cast may sit on top of it)."""
    stack = [out.grad_fn]
    while stack:
        node = stack.pop()
        if node is not None and "FusedLora4bit" in type(node).__name__:
            return node
        stack += [] if node is None else [n for n, _ in node.next_functions]
    raise RuntimeError("the layer did not take sumtune's fused LoRA node")


def saved_bytes(node, x: torch.Tensor) -> int:
    """Bytes of the tensors the node keeps for its backward, but its input (the caller holds that anyway)."""
    return sum(t.numel() * t.element_size() for t in node.saved_tensors
               if t is not None and t.data_ptr() != x.data_ptr())


def forward(model, x):
    x.grad = None
    model.zero_grad(set_to_none=True)
    with torch.autocast(x.device.type, dtype=torch.bfloat16):  # as sumtune trains: float32 adapters, bf16 compute
        return model(x)


def run_once(model, x, grad_out):
    out = forward(model, x)
    out.backward(grad_out)
    return out


def reference(model, x, grad_out, keep, scale):
    """Output, dx, dA and dB in float64 with the given mask (the layer's weights dequantized)."""
    from sumtune.fast_t5.extras import dequantize_4bit_weight

    layer = next(m for m in model.modules() if hasattr(m, "lora_A"))
    base = layer.get_base_layer()
    w = dequantize_4bit_weight(base, torch.bfloat16).double()
    a = layer.lora_A["default"].weight.detach().double().requires_grad_(True)
    b = layer.lora_B["default"].weight.detach().double().requires_grad_(True)
    x64 = x.detach().double().requires_grad_(True)
    dropped = (x64 * keep.double() * scale)
    out = x64 @ w.t() + layer.scaling["default"] * (dropped @ a.t()) @ b.t()
    out.backward(grad_out.double())
    return out.detach(), x64.grad, a.grad, b.grad


def errors(model, x, got_out, ref) -> dict:
    layer = next(m for m in model.modules() if hasattr(m, "lora_A"))
    got = [got_out, x.grad, layer.lora_A["default"].weight.grad, layer.lora_B["default"].weight.grad]
    names = ["out", "dx", "dA", "dB"]
    return {f"{n}_rel_err": float((g.double() - r).norm() / r.norm()) for n, g, r in zip(names, got, ref)}


def measure(shape, route: str, tile, rows: int, device, repeats: int, quick: bool, patch: str = "") -> dict:
    from unittest import mock

    from sumtune.fast_t5 import lora_dropout

    n_in, n_out = shape
    model = lora_layer(n_in, n_out, 32, 0.05, device, cache=not quick)
    x = torch.randn(rows, n_in, device=device, dtype=torch.bfloat16).requires_grad_(True)
    grad_out = torch.randn(rows, n_out, device=device, dtype=torch.bfloat16)
    # the route, v's layer too (this script measures each layer both ways), the tile: as they were afterwards
    settings = dict(LORA_DROPOUT_KERNEL=route == "kernels", NARROW_INPUTS=True)
    if tile is not None:
        settings["BACKWARD_TILE"] = tile
    with mock.patch.multiple(lora_dropout, **settings), bc.patched(patch):
        torch.manual_seed(1)
        seed = torch.randint(0, 2**31 - 1, (1,), dtype=torch.int64, device=device)  # what the node draws first
        torch.manual_seed(1)
        out = forward(model, x)
        node = fused_node(out)
        if route == "kernels":
            keep = lora_dropout.keep_mask(seed, rows, n_in, 0.05, device=device)
        else:
            keep = node.saved_tensors[1].view(rows, n_in)  # native_dropout's mask
        row = dict(layer=f"{n_in}->{n_out}", rows=rows, route=route + (f" [{patch}]" if patch else ""),
                   backward_tile="x".join(map(str, lora_dropout.BACKWARD_TILE)) if route == "kernels" else None,
                   saved_mib=saved_bytes(node, x) / 2**20)
        out.backward(grad_out)
        row.update(errors(model, x, out.detach(), reference(model, x, grad_out, keep,
                                                            lora_dropout.dropout_threshold(0.05, 1 << 31)[1]
                                                            if route == "kernels" else 1 / 0.95)))
        del out
        if device.type == "cuda":
            bc.free_gpu_memory()
            row["fwd_bwd_ms"] = bc.cuda_event_ms(lambda: run_once(model, x, grad_out), repeats)
        return row


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=16 * 1024, help="input rows (micro-batch x source tokens)")
    parser.add_argument("--tiles", default="64x64x8x3,64x128x8x3,32x64x4x3",
                        help="backward tiles to time, BLOCK_MxBLOCK_KxWARPSxSTAGES, comma-separated")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--patches", default="",
                        help="also time the kernels (first tile) under each of these settings (bench_common tokens, "
                             "':'-joined; comma-separated), e.g. noldscratch")
    parser.add_argument("--quick", action="store_true", help="CPU plumbing check in Triton's interpreter")
    args = parser.parse_args(argv)
    device = bc.benchmark_device("lora_dropout.py", args.quick)
    if device is None:
        return 1
    from sumtune.fast_t5 import lora_dropout

    if args.quick:  # TRITON_INTERPRET: set at the top, before Triton's import
        lora_dropout.ON_CPU_IN_INTERPRETER = True
    shapes = [(64, 32), (32, 64)] if args.quick else [(1024, 4096), (4096, 1024)]
    rows_count = 96 if args.quick else args.rows
    tiles = [tuple(int(v) for v in t.split("x")) for t in args.tiles.split(",") if t]
    results = []
    for shape in shapes:
        base = measure(shape, "native_dropout", None, rows_count, device, args.repeats, args.quick)
        results.append(base)
        runs = [(tile, "") for tile in tiles] + [(tiles[0], patch) for patch in bc.patch_strings(args.patches)]
        for tile, patch in runs:
            row = measure(shape, "kernels", tile, rows_count, device, args.repeats, args.quick, patch)
            if "fwd_bwd_ms" in row:
                row["speedup"] = base["fwd_bwd_ms"] / row["fwd_bwd_ms"]
            results.append(row)
    bc.print_table(results, ["layer", "route", "backward_tile", "fwd_bwd_ms", "speedup", "saved_mib", "out_rel_err",
                             "dx_rel_err", "dA_rel_err", "dB_rel_err"])
    if not args.quick:
        path = bc.save_result("lora_dropout", {"rows": results, "what": "one fused LoRA layer (r=32, dropout 0.05, "
                                               "NF4 base, weight cache, concatenated GEMMs) forward + backward: "
                                               "native_dropout against the seed-regenerated mask kernels"})
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
