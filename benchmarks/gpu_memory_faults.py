"""GPU memory faults on real shapes: `--batch-size auto` at T5-3b shapes, and the CUDA out-of-memory message.

    python benchmarks/gpu_memory_faults.py                      # GPU: random:t5-3b (NF4, bf16), real BillSum rows
    python benchmarks/gpu_memory_faults.py --variants plain     # only without gradient checkpointing
    python benchmarks/gpu_memory_faults.py --quick              # CPU plumbing check (tiny model, no OOM part)

1. `batch_size: auto`: sumtune's own TrainRecipe probes micro-batches (divisors of --samples-per-step, largest
   first) with a real forward and backward at the data's longest shapes, picks the largest that fits under 90%
   of the GPU, and keeps the samples per optimizer step with gradient accumulation; then trains a few steps at
   that size to show it really fits (step time, peak memory). Once without and once with gradient checkpointing.
2. Out of memory: a micro-batch far too large (--oom-batch); the run must end with one sentence naming the
   batch and sequence lengths that failed and what to change (what the CLI prints, exit status 2).
Results: printed, and saved as JSON under benchmarks/results/ (bench_common.save_result).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

import bench_common as bc  # noqa: E402


def base_config(args, out: Path, **overrides):
    from sumtune.config import TrainConfig

    shared = bc.shared_data_dir()
    values = dict(
        model=args.model, tokenizer=None if args.quick else str(shared / "t5-tokenizer"),
        dataset=str(shared / "billsum" / "us_train_subset200_cleantext.jsonl"), eval_ratio=0.05,
        quantization="nf4", compute_dtype="fp32" if args.quick else "bf16", lora_r=16, lora_alpha=32.0,
        lora_targets=["all-linear"], max_source_tokens=args.max_source_tokens, max_target_tokens=args.max_target_tokens,
        output_dir=str(out), max_steps=args.steps, batch_size="auto", samples_per_step=args.samples_per_step,
        optimizer="paged_adamw_8bit", eval_every_steps=10_000, checkpoint_every_steps=10_000, eval_max_samples=2,
        eval_batch_size=2, max_new_tokens=8, log_every_steps=1, progress=False,
        device="cpu" if args.quick else "cuda", seed=0)
    values.update(overrides)
    return TrainConfig(**values)


def auto_batch(args, variant: str, root: Path) -> dict:
    """Let `batch_size: auto` choose, then train a few steps at the chosen size."""
    from sumtune.metrics import read_metrics
    from sumtune.recipe import TrainRecipe

    cfg = base_config(args, root / f"auto-{variant}", gradient_checkpointing=variant == "gc")
    recipe = TrainRecipe(cfg)
    start = time.perf_counter()
    recipe.setup()
    setup_s = time.perf_counter() - start
    try:
        recipe.train()
        steps = [{k: r[k] for k in ("step", "loss", "step_time_s", "peak_mem_gib", "samples_per_s")}
                 for r in read_metrics(recipe.run_dir) if r["split"] == "train"]
        lengths = [len(e.input_ids) for e in recipe.batches.examples]
        return {"variant": variant, "gradient_checkpointing": cfg.gradient_checkpointing,
                "samples_per_step": cfg.effective_batch_size, "micro_batch": recipe.cfg.batch_size,
                "grad_accum_steps": recipe.cfg.grad_accum_steps, "longest_source_tokens": max(lengths),
                "max_target_tokens": cfg.max_target_tokens, "trials": recipe.auto_batch_trials,
                "setup_s": round(setup_s, 1), "train_steps": steps}
    finally:
        recipe.cleanup()
        del recipe
        bc.free_gpu_memory()


def out_of_memory(args, root: Path) -> dict:
    """A micro-batch that cannot fit: the one-sentence message the CLI prints (exit status 2)."""
    from sumtune.errors import SumtuneError
    from sumtune.recipe import TrainRecipe

    cfg = base_config(args, root / "oom", batch_size=args.oom_batch, samples_per_step=None, max_steps=1)
    recipe = TrainRecipe(cfg)
    recipe.setup()
    try:
        recipe.train()
        return {"batch_size": args.oom_batch, "message": None, "note": "no out-of-memory error: raise --oom-batch"}
    except SumtuneError as err:
        return {"batch_size": args.oom_batch, "cli_output": f"sumtune: error: {err}", "exit_status": 2}
    finally:
        recipe.cleanup()
        del recipe
        bc.free_gpu_memory()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="random:t5-3b")
    parser.add_argument("--samples-per-step", type=int, default=64)
    parser.add_argument("--max-source-tokens", type=int, default=1024)
    parser.add_argument("--max-target-tokens", type=int, default=128)
    parser.add_argument("--steps", type=int, default=3, help="training steps at the chosen micro-batch")
    parser.add_argument("--oom-batch", type=int, default=256)
    parser.add_argument("--variants", default="plain,gc", help="plain (no gradient checkpointing) and/or gc")
    parser.add_argument("--quick", action="store_true", help="CPU plumbing check: tiny model, short sequences")
    args = parser.parse_args()
    if args.quick:
        args.model, args.max_source_tokens, args.max_target_tokens, args.steps = "tiny", 64, 16, 2
        args.samples_per_step = 8
    elif not torch.cuda.is_available():
        sys.exit("gpu_memory_faults.py needs a CUDA GPU (or --quick for a CPU plumbing check).")
    results: dict = {"model": args.model, "config": vars(args), "auto_batch": [], "oom": None}
    with tempfile.TemporaryDirectory(prefix="sumtune-memfaults-") as tmp:
        for variant in [v for v in args.variants.split(",") if v]:
            row = auto_batch(args, variant, Path(tmp))
            results["auto_batch"].append(row)
            print(f"[auto/{variant}] {row['samples_per_step']} samples per step → micro-batch {row['micro_batch']} × "
                  f"{row['grad_accum_steps']} accumulation (longest source {row['longest_source_tokens']} tokens); "
                  f"tried: {[(t['micro_batch'], t['fits'], t.get('peak_reserved_gib')) for t in row['trials']]}",
                  flush=True)
            for step in row["train_steps"]:
                print(f"  step {step['step']}: loss {step['loss']:.3f}, {step['step_time_s']:.2f} s, "
                      f"peak {step['peak_mem_gib']:.1f} GiB", flush=True)
        if torch.cuda.is_available():
            results["oom"] = out_of_memory(args, Path(tmp))
            print(f"[oom] batch {args.oom_batch}: {results['oom'].get('cli_output') or results['oom']['note']}")
    if args.quick:
        print("(quick CPU check: nothing saved)")
        return
    path = bc.save_result("gpu_memory_faults", results)
    print(f"saved {path}")


if __name__ == "__main__":
    main()
