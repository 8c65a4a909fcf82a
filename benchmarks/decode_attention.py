"""Cross-attention of one decoding step over long inputs: the generation path's `hidden_attention` (two batched
GEMMs, each reading the cached encoder states) against SDPA with keys = values = the states (one kernel, which can
read each tile of the states once for scores and values) and against sumtune's fused kernel (the decoder's
attention="fused" mode: one read of each row's real states) at a few tile/warp settings.

    python benchmarks/decode_attention.py                 # GPU: B x 32 heads x 128, d_model 1024 (T5-3b), 4096 keys
    python benchmarks/decode_attention.py --cpu-check     # no GPU: the formulations agree (small shapes)

Why: at 4096/512 the decoder reads the document's states (8 MiB) twice per layer and step (README, "Generation at
4096/512"); if SDPA reads them once, generation's cross-attention costs up to half. Rows: median ms per call (CUDA
events), GB/s counting one read of the states, and each formulation's error against float32 on the same inputs.
Writes benchmarks/results/decode_attention-<date>-<gpu>.json; nothing here changes what `sumtune` runs.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import bench_common as bc  # noqa: E402

HEADS, D_KV, D_MODEL = 32, 128, 1024  # T5-3b


def make_inputs(batch: int, keys: int, device, dtype=torch.bfloat16, seed: int = 0):
    """Query [B,H,dk], projections wk, wv [H*dk, D], states [B,L,D], padding bias [B,1,L] (last 10% of a quarter of
    the rows padded, as BillSum batches are)."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    q = torch.randn(batch, HEADS, D_KV, generator=gen).to(device, dtype)
    wk = (torch.randn(HEADS * D_KV, D_MODEL, generator=gen) / D_MODEL ** 0.5).to(device, dtype)
    wv = (torch.randn(HEADS * D_KV, D_MODEL, generator=gen) / D_MODEL ** 0.5).to(device, dtype)
    states = torch.randn(batch, keys, D_MODEL, generator=gen).to(device, dtype)
    bias = torch.zeros(batch, 1, keys, dtype=dtype)
    bias[: max(1, batch // 4), :, int(keys * 0.9):] = torch.finfo(dtype).min
    return q, wk, wv, states, bias.to(device)


def hidden_gemms(q, wk, wv, states, bias):
    """What sumtune's decoder runs (`sumtune.generation.t5_decode.hidden_attention`)."""
    from sumtune.generation.t5_decode import hidden_attention

    return hidden_attention(q, wk, wv, states, bias)


def hidden_sdpa(q, wk, wv, states, bias):
    """The same maths with the score and value passes in one SDPA call: the H heads' projected queries are H query
    rows over one shared key = value sequence (the states)."""
    batch, heads, d_kv = q.shape
    q_mem = torch.bmm(q.transpose(0, 1), wk.view(heads, d_kv, -1)).transpose(0, 1)  # [B,H,D]
    ctx_mem = F.scaled_dot_product_attention(q_mem[:, None], states[:, None], states[:, None],
                                             attn_mask=bias[:, None], scale=1.0)[:, 0]  # [B,H,D]
    ctx = torch.bmm(ctx_mem.transpose(0, 1), wv.view(heads, d_kv, -1).transpose(1, 2))  # [H,B,dk]
    return ctx.transpose(0, 1).reshape(batch, heads * d_kv)


def hidden_fused(q, wk, wv, states, bias):
    """sumtune's fused kernel (attention="fused"): each row's real states read once, per-row lengths."""
    from sumtune.generation.t5_decode import hidden_attention

    lengths = (bias[:, 0] == 0).sum(dim=-1).to(torch.int32)
    return hidden_attention(q, wk, wv, states, bias, lengths=lengths)


def reference_fp32(q, wk, wv, states, bias):
    return hidden_gemms(q.float(), wk.float(), wv.float(), states.float(), bias.float())


def relative_error(got, ref) -> float:
    return float((got.float() - ref).norm() / ref.norm())


def formulations(device, configs=None, patches=()):
    rows = [("hidden: two GEMMs (sumtune today)", hidden_gemms, None),
            ("hidden: SDPA, PyTorch's choice", hidden_sdpa, None)]
    if device.type == "cuda":
        from torch.nn.attention import SDPBackend

        rows.append(("hidden: SDPA, memory-efficient kernel", hidden_sdpa, SDPBackend.EFFICIENT_ATTENTION))
        for config in configs or FUSED_CONFIGS:
            block_n, warps, heads, stages = config[:4]
            name = f"hidden: sumtune fused kernel {block_n} keys x {warps} warps x {heads} heads x {stages} stages"
            name += f" x {config[4]} programs" if len(config) > 4 else ""
            rows.append((name, lambda *a, c=config: _with_fused_config(c, hidden_fused, *a), None))
            rows += [(f"{name} [{patch}]",
                      lambda *a, c=config, t=patch: _with_fused_config(c, hidden_fused, *a, patch=t), None)
                     for patch in patches]
    return rows


# (BLOCK_N, NUM_WARPS, HEADS_PER_PROGRAM, NUM_STAGES) of sumtune.generation.cross_attention; the first two are its
# defaults (TILES_BY_STATES: the second from 2^19 states, rows x keys).
# 16 heads a program: half the accumulator in registers, two programs a row reading its states (the second from L2).
# Two other forms of the kernel were measured here on 2026-12-03 and went (cross_attention says where they are).
FUSED_CONFIGS = [(64, 8, 16, 2), (32, 4, 16, 2), (32, 8, 16, 3), (32, 4, 16, 3)]


def _with_fused_config(config, fn, *args, patch=""):
    with bc.fused_tiles(config), bc.patched(patch):
        return fn(*args)


def run(fn, backend, args):
    import contextlib

    from torch.nn.attention import sdpa_kernel

    with sdpa_kernel([backend]) if backend is not None else contextlib.nullcontext():
        return fn(*args)


def cpu_check() -> int:
    device = torch.device("cpu")
    args = make_inputs(3, 40, device, dtype=torch.float32)
    ref = reference_fp32(*args)
    worst = max(relative_error(run(fn, backend, args), ref) for _, fn, backend in formulations(device))
    print(f"cpu check: formulations agree with float32 within {worst:.2e}")
    return 0 if worst < 1e-5 else 1


def timed_ms(call, repeats: int, timing: str) -> tuple[float, str]:
    """(median ms, how it was timed): in a CUDA graph unless asked for events or the capture fails (then eager
    events, the row saying why)."""
    if timing == "graph":
        try:
            return bc.cuda_graph_ms(call, repeats), "graph"
        except RuntimeError as error:  # a formulation that cannot be captured: timed eagerly, and said so
            torch.cuda.synchronize()
            return bc.cuda_event_ms(call, repeats), f"events (capture failed: {str(error).splitlines()[0][:80]})"
    return bc.cuda_event_ms(call, repeats), "events"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", default="64,256")
    parser.add_argument("--keys", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--tiles", default="",
                        help=f"the fused kernel's tiles instead of FUSED_CONFIGS: {bc.FUSED_TILES_HELP}")
    parser.add_argument("--patches", default="",
                        help="also time each fused tile under these settings: comma-separated strings of "
                             "bench_common.PATCH_TOKENS joined by ':' (e.g. nolinearrelu)")
    parser.add_argument("--launch-only", action="store_true",
                        help="only launch the fused kernel 4 times (first batch, first of --tiles or the shipped "
                             "tiles, under the first of --patches if any) and time nothing: for a profiler, e.g. ncu "
                             "--kernel-name hidden_cross_attention --launch-skip 2 --launch-count 1 --set full")
    parser.add_argument("--timing", choices=("graph", "events"), default="graph",
                        help="graph (default): each formulation captured in a CUDA graph and replayed, as generation "
                             "runs it; events: eager calls back to back (the figures before 2026-12-06, which carry "
                             "the host's launch path where it outlasts the GPU's work: small batches)")
    parser.add_argument("--cpu-check", action="store_true")
    args = parser.parse_args(argv)
    configs = bc.parse_fused_tiles(args.tiles)
    patches = bc.patch_strings(args.patches)
    if args.cpu_check:
        return cpu_check()
    if not torch.cuda.is_available():
        print("decode_attention.py times GPU kernels and needs a CUDA GPU; use --cpu-check.", file=sys.stderr)
        return 2
    device = torch.device("cuda")
    if args.launch_only:
        inputs = make_inputs(int(args.batches.split(",")[0]), args.keys, device)
        for _ in range(4):
            _with_fused_config(configs[0] if configs else FUSED_CONFIGS[0], hidden_fused, *inputs,
                               patch=patches[0] if patches else "")
        torch.cuda.synchronize()
        return 0
    rows = []
    for batch in (int(b) for b in args.batches.split(",")):
        inputs = make_inputs(batch, args.keys, device)
        ref = reference_fp32(*inputs)
        states_gb = inputs[3].numel() * inputs[3].element_size() / 1e9
        for name, fn, backend in formulations(device, configs, patches):
            try:
                ms, timing = timed_ms(lambda: run(fn, backend, inputs), args.repeats, args.timing)
                row = dict(batch=batch, keys=args.keys, formulation=name, ms=ms, states_gb_per_s=states_gb / ms * 1e3,
                           error_vs_fp32=relative_error(run(fn, backend, inputs), ref), timing=timing)
            except Exception as error:  # noqa: BLE001 - e.g. tiles beyond shared memory (OutOfResources): a row
                row = dict(batch=batch, keys=args.keys, formulation=name, note=str(error).splitlines()[0][:100])
            rows.append(row)
            print(row, flush=True)
    bc.print_table(rows, ["batch", "keys", "formulation", "ms", "states_gb_per_s", "error_vs_fp32", "timing", "note"])
    path = bc.save_result("decode_attention", dict(heads=HEADS, d_kv=D_KV, d_model=D_MODEL, rows=rows))
    print(f"saved {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
