"""A first epoch of real bills through sumtune's own step, new batch shapes and all, per padding scheme.

    python benchmarks/first_epoch.py                                       # GPU: long config, 400 bills
    python benchmarks/first_epoch.py --settings "config:b4,config:b4:src256:tgt64,config:b4"
    python benchmarks/first_epoch.py --quick                               # CPU plumbing check (tiny model)

Why: the steady-step benchmarks (`long_documents.py`, `train_throughput.py`) time steps after their shapes are
known. A real first epoch at 4096/512 meets a new (micro-batch, source width, target width) every few steps, and
with CUDA graphs each one is run eagerly and captured before it replays (`sumtune train`, session 21: 35 new shapes
in the first 20 steps of 160 bills, at 3-9% MFU; `bucket_shapes.py` counts ~197 in an epoch of the 18,949 US bills).
This times every step of one pass over `--rows` real BillSum rows (the 200 of `../shared/data`, resampled; real
lengths, unlike `long_documents.py`'s joined full-length rows), built and stepped through the product
(`sumtune.training.build_training`, `TrainStep`, the step `sumtune train` runs), with the draw on the clock.

Settings: `config` (the config file as it is) plus bench_common tokens; the padding-width tokens patch
`sumtune.batching`'s widths for the row: `tgtcap` (targets always padded to max_target_tokens), `src256` /
`tgt64` (source / target widths in steps of 256 / 64 instead of 128 / 32); `noclasswarm` warms up every new shape,
also one a warmed shape covers (`sumtune.cuda_graphs.warm_up_covers`; skipped by default since 2026-12-03).
Triton's autotuner keeps its choices for the process, so the first row also pays the autotuning of every length
class: list `config` first and last.

Writes benchmarks/results/first_epoch-<date>-<gpu>.json: per row the epoch's seconds, its samples/s, the steady
step (median of the steps that met no new shape), new shapes and the seconds their warm-ups and captures took.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

import bench_common as bc  # noqa: E402

COLUMNS = ["setting", "steps", "epoch_s", "samples_per_s", "steady_step_s", "new_shapes", "warm_up_s", "record_s",
           "peak_mem_gib", "vs_first"]


def resampled_rows(count: int, seed: int, quick: bool) -> list[dict]:
    """`count` rows drawn with replacement from the real BillSum rows (the demo corpus for --quick)."""
    if quick:
        from long_documents import demo_rows

        source = demo_rows()
    else:
        source = bc.load_billsum_texts()
    draw = random.Random(seed)
    return [source[draw.randrange(len(source))] for _ in range(count)]


def run_setting(setting: str, args, dataset: Path) -> dict:
    from sumtune import argparsing
    from sumtune.config import TrainConfig
    from sumtune.training import build_training

    cfg = argparsing.resolve(TrainConfig, args.config, {})
    cfg = replace(cfg, model=f"random:{args.model}" if args.model != "tiny" else "tiny", dataset=str(dataset),
                  tokenizer=None if args.model == "tiny" else str(bc.shared_data_dir() / "t5-tokenizer"),
                  eval_ratio=0.02, progress=False, output_dir=tempfile.mkdtemp(),
                  device="auto", **bc.setting_fields(setting))
    if args.quick:
        cfg = replace(cfg, max_source_tokens=256, max_target_tokens=64, batch_size=2, samples_per_step=None,
                      grad_accum_steps=1, compute_dtype="fp32", cache_dequantized_weights=False)
    with bc.patched(setting):
        parts = build_training(cfg)
        bc.free_gpu_memory()
        graphed = parts.step.graphed
        steps = parts.batches.batches_per_epoch() // parts.cfg.grad_accum_steps
        times_s, steady_s, samples, seen = [], [], 0, 0
        for _, result, seconds in bc.timed_steps(parts.step, parts.batches.stream(), parts.cfg.grad_accum_steps,
                                                 parts.cfg.lr, steps):
            captures = graphed.captures if graphed is not None else 0
            times_s.append(seconds)
            if captures == seen:  # a step that met no new shape
                steady_s.append(seconds)
            seen = captures
            samples += result.samples
    row = dict(setting=setting, steps=steps, epoch_s=round(sum(times_s), 2),
               samples_per_s=round(samples / sum(times_s), 3),
               steady_step_s=round(statistics.median(steady_s), 4) if steady_s else None, new_shapes=seen,
               warm_up_s=round(graphed.warm_up_s, 2) if graphed is not None else None,
               record_s=round(graphed.record_s, 2) if graphed is not None else None,
               peak_mem_gib=round(torch.cuda.max_memory_allocated() / 2**30, 1) if torch.cuda.is_available() else None,
               step_times_s=[round(t, 4) for t in times_s])
    parts.step.release_graphs()  # the graphs' pool (~55 GiB at 4096/512) and the model go before the next row
    del parts, graphed
    bc.free_gpu_memory()
    return row


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="t5-3b")
    parser.add_argument("--config", default=str(bc.REPO_ROOT / "configs" / "t5-3b-billsum-long.yaml"))
    parser.add_argument("--settings", default="config:b4,config:b4:noclasswarm,config:b4:tgtcap,config:b4")
    parser.add_argument("--rows", type=int, default=400, help="real bills in the epoch (resampled)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="tiny model on CPU, a few seconds")
    parser.add_argument("--no-save", action="store_true")
    args = parser.parse_args(argv)
    if args.quick:
        args.model, args.rows, args.settings = "tiny", 12, "config,config:tgtcap"
    device = bc.benchmark_device("first_epoch", args.quick)
    if device is None:
        return 2
    rows = []
    with tempfile.TemporaryDirectory() as work:
        dataset = Path(work) / "bills.jsonl"
        dataset.write_text("".join(json.dumps(r) + "\n" for r in resampled_rows(args.rows, args.seed, args.quick)),
                           encoding="utf-8")
        for setting in (s.strip() for s in args.settings.split(",") if s.strip()):
            rows.append(run_setting(setting, args, dataset))
            print(json.dumps({k: v for k, v in rows[-1].items() if k != "step_times_s"}), flush=True)
    for row in rows:
        row["vs_first"] = round(rows[0]["epoch_s"] / row["epoch_s"], 3)
    print()
    bc.print_table(rows, COLUMNS)
    if not args.no_save:
        payload = dict(model=args.model, config=args.config, rows_in_epoch=args.rows, seed=args.seed, rows=rows)
        print(f"saved {bc.save_result('first_epoch' + ('-quick' if args.quick else ''), payload)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
