"""Data-parallel scaling of sumtune's QLoRA training: samples/s on 1, 2 and 4 GPUs, and scaling efficiency.

    python benchmarks/scale_out.py                         # GPU: torchrun on 1, 2, 4 GPUs (as many as visible)
    python benchmarks/scale_out.py --gpus 1,2,4 --steps 20 --repeats 3   # medians of interleaved repeats
    python benchmarks/scale_out.py --quick                 # CPU plumbing check: tiny T5, gloo, 1 and 2 processes

Each N runs `torchrun --nproc-per-node N` on this file in worker mode, which trains with sumtune's own
`TrainRecipe` (DDP, sharded batches, fast T5 path on every rank) on the real BillSum rows that fill the source
length: T5-3b shapes with random weights (`random:t5-3b`), NF4 base, the real T5 tokenizer. Per-GPU micro-batch
is fixed (weak scaling), so the global batch grows with N. After `--warmup` steps, `--steps` steps are timed
between barriers; samples/s is the global samples of the timed steps over the slowest rank's time.
Efficiency = samples/s(N) / (N × samples/s(1)). `--runs-file` keeps each run as it ends (`--from-runs` summarizes
such a file later); `--trace-steps N` adds a per-rank profile after the timed steps.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

import bench_common as bc  # noqa: E402
from sumtune.profiling.profiler import NULL_PROFILER, NullProfiler  # noqa: E402

# NVLink SHARP / multicast stay off in every process this benchmark starts (the lent machines require it).
NO_MULTICAST_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
EVAL_RATIO = 0.01  # the trainer holds out a split; the benchmark never evaluates it
# What a run was measured with, stored in each run (so --from-runs needs no flags) as (field, argparse name).
RUN_SETTINGS = (("model", "model"), ("device", "device"), ("src_len", "src_len"), ("tgt_len", "tgt_len"),
                ("compute_dtype", "compute_dtype"), ("gradient_checkpointing", "gc"), ("warmup_steps", "warmup"),
                ("compile", "compile"))
COLUMNS = ["gpus", "global_batch", "samples_per_s", "tokens_per_s", "step_time_s", "speedup", "efficiency",
           "peak_mem_gib", "last_loss"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def child_env(device: str) -> dict[str, str]:
    env = dict(os.environ, **NO_MULTICAST_ENV, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    if device == "cpu":  # torchrun sets 1 thread per process only for N > 1: same for every N, for a fair CPU check
        env["OMP_NUM_THREADS"] = "1"
    src = str(bc.REPO_ROOT / "src")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (src, env.get("PYTHONPATH", "")) if p)
    return env


# ----------------------------------------------------------------------------- worker (one rank)
class StepClock(NullProfiler):
    """The training loop's profiler slot, recording only when each step ended (host clock, after the step's
    sync): per-step times show whether a rank's steps are steady or jittery. Everything else stays null."""

    def __init__(self) -> None:
        self.ends: list[float] = []

    def step(self, samples: int | None = None, tokens: int | None = None, flops: float | None = None) -> None:
        self.ends.append(time.perf_counter())

    def step_times_s(self, start: float) -> list[float]:
        edges = [start, *self.ends]
        return [b - a for a, b in zip(edges, edges[1:])]


def worker(args) -> None:
    from sumtune import distributed
    from sumtune.config import TrainConfig
    from sumtune.recipe import TrainRecipe

    cfg = TrainConfig(
        model=args.model, tokenizer=str(bc.shared_data_dir() / "t5-tokenizer"), dataset=args.data,
        eval_ratio=EVAL_RATIO, max_source_tokens=args.src_len, max_target_tokens=args.tgt_len,
        compute_dtype=args.compute_dtype, batch_size=args.batch_size, grad_accum_steps=args.grad_accum_steps,
        max_steps=args.warmup + args.steps + traced_steps(args), eval_every_steps=10**9, log_every_steps=10**9,
        progress=False,
        output_dir=args.run_dir, overwrite=True, device=args.device, gradient_checkpointing=args.gc,
        compile=args.compile,
        optimizer="paged_adamw_8bit" if args.device == "cuda" else "adamw", pin_memory=True, num_workers=0)
    recipe = TrainRecipe(cfg)
    # Throughput of training, not of checkpoint I/O: train() otherwise writes a resumable checkpoint (adapter +
    # optimizer state, on rank 0) at the end of each call, inside the timed region.
    recipe.save_checkpoint = lambda: None
    try:
        build_start = time.perf_counter()
        recipe.setup()
        build_s = time.perf_counter() - build_start
        recipe.train(max_steps=args.warmup)  # warm-up: allocator, kernels, NCCL communicators
        bc.sync(recipe.device)
        distributed.barrier()
        samples_before = recipe.samples_seen
        recipe.step.profiler = clock = StepClock()
        start = time.perf_counter()
        last = recipe.train(max_steps=args.warmup + args.steps)  # continues at samples_seen
        bc.sync(recipe.device)
        elapsed_s = time.perf_counter() - start
        recipe.step.profiler = NULL_PROFILER
        timed_samples = recipe.samples_seen - samples_before
        distributed.barrier()
        peak = torch.cuda.max_memory_allocated(recipe.device) / 2**30 if recipe.device.type == "cuda" else None
        mine = dict(rank=recipe.dist.rank, elapsed_s=elapsed_s, step_times_s=clock.step_times_s(start),
                    build_s=build_s, peak_mem_gib=peak,
                    device=torch.cuda.get_device_name(recipe.device) if recipe.device.type == "cuda" else "cpu",
                    versions=bc.library_versions())
        if args.trace_steps:  # after the timed steps: the profiler never touches the figures above
            mine["trace"] = trace_worker(recipe, args)
        ranks = distributed.gather_objects(mine)
        if recipe.dist.is_main:
            result = dict(world_size=recipe.dist.world_size, samples=timed_samples,
                          steps=args.steps, micro_batch=args.batch_size,
                          grad_accum_steps=args.grad_accum_steps, last_loss=last.get("loss"),
                          tokens_per_s_logged=last.get("tokens_per_s"), ranks=ranks)
            Path(args.out).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    finally:
        recipe.cleanup()


def traced_steps(args) -> int:
    return args.trace_steps + 1 if args.trace_steps else 0  # one profiler warm-up step, then the traced ones


def trace_worker(recipe, args) -> dict:
    """Where a step's time goes on this rank, from a torch.profiler trace of `--trace-steps` steps.

    Diagnostic for scaling losses: the same GPU work per rank at every N means any slowdown is either GPU idle
    time (host syncs, waiting for another rank) or slower kernels (communication competing for SMs/memory)."""
    from sumtune.profiling import trace_analysis
    from sumtune.profiling.profiler import StepProfiler

    out_dir = Path(args.run_dir) / f"trace-rank{recipe.dist.rank}"
    recipe.step.profiler = profiler = StepProfiler(out_dir, wait=0, warmup=1, active=args.trace_steps,
                                                   record_shapes=False, profile_memory=False,
                                                   device=recipe.device.type, sync_phases=False)
    recipe.train(max_steps=recipe.global_step + traced_steps(args))
    trace = trace_analysis.load_trace(profiler.trace_path)
    stats = trace_analysis.gpu_stats(trace, top_k=6) or {}
    events = trace_analysis.complete_events(trace)
    windows = trace_analysis.step_windows_us(events)
    kernels = trace_analysis.events_in_windows(trace_analysis.kernel_events(events), windows)
    steps = max(len(windows), 1)

    def per_step_s(selected) -> float:
        return sum(float(k["dur"]) for k in selected) / steps / 1e6

    is_comm = ["nccl" in k["name"].lower() for k in kernels]
    return dict(steps=len(windows), step_time_s=stats.get("trace_step_time_mean_s"),
                gpu_busy_pct=stats.get("utilization_pct"),
                comm_kernel_s_per_step=per_step_s(k for k, c in zip(kernels, is_comm) if c),
                compute_kernel_s_per_step=per_step_s(k for k, c in zip(kernels, is_comm) if not c),
                top_kernels=stats.get("top_kernels", []))


# ----------------------------------------------------------------------------- parent
def full_length_rows(args) -> tuple[list[dict], float]:
    """BillSum rows whose source fills --src-len, and their mean real source + target tokens per row.

    Every step then does the same work at every world size (with a few short rows, length grouping makes
    some steps cheaper, and which ones depends on the sharding)."""
    rows = bc.load_billsum_texts()
    data = bc.tokenize_rows(bc.load_t5_tokenizer(), rows, args.src_len, args.tgt_len)
    full = data["attention_mask"].sum(1) == args.src_len
    if not bool(full.any()):
        raise SystemExit(f"no BillSum row fills {args.src_len} source tokens")
    tokens = data["attention_mask"][full].sum() + (data["labels"][full] != -100).sum()
    return [row for row, keep in zip(rows, full.tolist()) if keep], float(tokens) / int(full.sum())


def rows_for_steps(rows: list[dict], samples: int, eval_ratio: float) -> list[dict]:
    """`rows` repeated so the training split holds at least `samples`: no epoch ends inside a run.

    An epoch's last batch is partial; timed, it costs nearly a full step for a few samples, and it comes
    more often the larger the global batch, so it would bias the scaling against more GPUs (the 2-GPU
    runs of 2026-11-28 counted 548 of 640 samples in 20 steps for this reason)."""
    needed = int(samples / (1 - eval_ratio)) + 2
    return [rows[i % len(rows)] for i in range(max(needed, len(rows)))]


def write_rows(path: Path, rows: list[dict]) -> int:
    with path.open("w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row) + "\n")
    return len(rows)


def run_world(n: int, args, data: Path, work: Path) -> dict:
    out = work / f"result-{n}.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(n), "--master-port",
           str(free_port()), str(Path(__file__).resolve()), "--worker", "--out", str(out), "--data", str(data),
           "--run-dir", str(work / f"run-{n}"), "--model", args.model, "--device", args.device,
           "--batch-size", str(args.batch_size), "--grad-accum-steps", str(args.grad_accum_steps),
           "--src-len", str(args.src_len), "--tgt-len", str(args.tgt_len),
           "--compute-dtype", args.compute_dtype, "--warmup", str(args.warmup), "--steps", str(args.steps),
           "--trace-steps", str(args.trace_steps)]
    cmd += ["--gc"] * args.gc + ["--compile"] * args.compile
    print(f"[scale_out] {n} process(es): {' '.join(cmd[1:4])} {n} ...", flush=True)
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=child_env(args.device), timeout=args.timeout_s)
    if proc.returncode != 0 or not out.is_file():
        raise SystemExit(f"torchrun with {n} process(es) failed (exit status {proc.returncode})")
    result = json.loads(out.read_text(encoding="utf-8"))
    result["wall_s"] = time.perf_counter() - start
    return result


def median_run(runs: list[dict]) -> dict:
    """The run with the median throughput (slowest rank's time) among repeats of one world size."""
    ordered = sorted(runs, key=lambda r: max(k["elapsed_s"] for k in r["ranks"]))
    return ordered[len(ordered) // 2]


def step_spread(times_s: list[float]) -> dict:
    """Median, fastest and slowest of one rank's timed steps, and the coefficient of variation."""
    return dict(median=statistics.median(times_s), min=min(times_s), max=max(times_s),
                cv=statistics.pstdev(times_s) / statistics.fmean(times_s))


def summarize(results: list[dict], tokens_per_sample: float) -> list[dict]:
    rows = []
    base = None
    for r in results:
        slowest_s = max(rank["elapsed_s"] for rank in r["ranks"])
        samples_per_s = r["samples"] / slowest_s
        base = base if base is not None else (samples_per_s / r["world_size"] if r["world_size"] == 1 else None)
        speedup = samples_per_s / base if base else None
        peaks = [rank["peak_mem_gib"] for rank in r["ranks"] if rank["peak_mem_gib"] is not None]
        per_rank_step = r["micro_batch"] * r.get("grad_accum_steps", 1)
        rows.append(dict(gpus=r["world_size"], global_batch=per_rank_step * r["world_size"],
                         samples_per_s=samples_per_s, tokens_per_s=samples_per_s * tokens_per_sample,
                         step_time_s=slowest_s / r["steps"], speedup=speedup,
                         efficiency=speedup / r["world_size"] if speedup else None,
                         peak_mem_gib=max(peaks) if peaks else None, last_loss=r["last_loss"],
                         full_batches=r["samples"] == r["steps"] * per_rank_step * r["world_size"],
                         build_s=max(rank["build_s"] for rank in r["ranks"]), wall_s=r["wall_s"],
                         devices=sorted({rank["device"] for rank in r["ranks"]}),
                         **({"rank_step_time_s": [step_spread(rank["step_times_s"]) for rank in r["ranks"]]}
                            if r["ranks"][0].get("step_times_s") else {}),
                         **({"trace_by_rank": [rank["trace"] for rank in r["ranks"]]}
                            if "trace" in r["ranks"][0] else {})))
    return rows


def parent(args) -> None:
    os.environ.update(NO_MULTICAST_ENV)
    visible = torch.cuda.device_count() if args.device == "cuda" else 2
    worlds = [n for n in (int(x) for x in args.gpus.split(",")) if n <= visible]
    if not worlds:
        raise SystemExit(f"no world size of {args.gpus} fits the {visible} visible device(s)")
    unique, tokens_per_sample = full_length_rows(args)
    steps = args.warmup + args.steps + traced_steps(args)
    texts = rows_for_steps(unique, max(worlds) * args.batch_size * args.grad_accum_steps * steps, EVAL_RATIO)
    setting = dict({key: getattr(args, name) for key, name in RUN_SETTINGS}, visible_gpus=visible,
                   data_rows=len(texts), unique_rows=len(unique), tokens_per_sample=tokens_per_sample)
    with tempfile.TemporaryDirectory(prefix="sumtune-scale-") as tmp:
        work = Path(tmp)
        data = work / "billsum.jsonl"
        write_rows(data, texts)
        # Interleaved repeats (1, 2, 4, 1, 2, 4, ...): a GPU whose clock drifts during the run affects every
        # world size alike, and the median per world size drops a stray run.
        runs = []
        for _ in range(args.repeats):
            for n in worlds:
                runs.append({**run_world(n, args, data, work), **setting})
                if args.runs_file:  # each run kept as it ends: a run cut off by a time limit loses only itself
                    with open(args.runs_file, "a", encoding="utf-8") as fh:
                        fh.write(json.dumps(runs[-1]) + "\n")
    report(runs, args)


def report(runs: list[dict], args, note: str | None = None) -> None:
    """Table and saved JSON of `runs` (raw torchrun results): the median run per world size, all runs listed."""
    worlds = sorted({r["world_size"] for r in runs})
    tokens_per_sample = runs[0].get("tokens_per_sample") or full_length_rows(args)[1]
    results = [median_run([r for r in runs if r["world_size"] == n]) for n in worlds]
    rows = summarize(results, tokens_per_sample)
    for row, n in zip(rows, worlds):
        row["runs_samples_per_s"] = [r["samples"] / max(k["elapsed_s"] for k in r["ranks"])
                                     for r in runs if r["world_size"] == n]
    bc.print_table(rows, COLUMNS)
    for row in rows:
        for rank, spread in enumerate(row.get("rank_step_time_s", [])):
            print(f"{row['gpus']} GPU(s), rank {rank}: step time median {spread['median']:.3f} s, "
                  f"{spread['min']:.3f}-{spread['max']:.3f} s, CV {100 * spread['cv']:.1f}%")
        for rank, trace in enumerate(row.get("trace_by_rank", [])):
            cell = {key: bc._cell(value) for key, value in trace.items()}
            print(f"trace {row['gpus']} GPU(s), rank {rank}: step {cell['step_time_s']} s, GPU busy "
                  f"{cell['gpu_busy_pct']}%, compute kernels {cell['compute_kernel_s_per_step']} s, "
                  f"communication kernels {cell['comm_kernel_s_per_step']} s per step")
    first = runs[0]
    gpu_names = sorted({d for r in rows for d in r["devices"]})
    versions = first["ranks"][0].get("versions")
    # Runs written before they carried their settings (2026-11-30's first runs file) take them from the flags.
    payload = dict({key: first.get(key, getattr(args, name)) for key, name in RUN_SETTINGS},
                   micro_batch=first["micro_batch"], grad_accum_steps=first.get("grad_accum_steps", 1),
                   timed_steps=first["steps"], visible_gpus=first.get("visible_gpus", max(worlds)),
                   data_rows=first.get("data_rows"), unique_rows=first.get("unique_rows"),
                   repeats=max(sum(r["world_size"] == n for r in runs) for n in worlds), gpu_names=gpu_names,
                   targets={"speedup_2": 1.9, "speedup_4": 3.6}, results=rows,
                   method="torchrun per N; recipe.train() timed between barriers after warm-up; samples/s = "
                          "global samples / slowest rank's time; weak scaling (fixed per-GPU micro-batch); "
                          "rows repeated so no epoch (and no partial batch) ends inside a run; each row is the "
                          "median of interleaved repeats (the slower one of two)")
    if gpu_names and gpu_names != ["cpu"]:
        payload["gpu"] = gpu_names[0] if len(gpu_names) == 1 else ", ".join(gpu_names)
    payload["versions"] = versions  # the runs' own (None: runs written before versions were recorded)
    if note:
        payload["note"] = note
    if not args.no_save:
        name = "scale_out-quick" if args.quick else args.save_as
        slug = f"{bc.gpu_slug(payload.get('gpu', 'cpu'))}x{payload['visible_gpus']}"
        path = bc.save_result(name, payload, slug=slug)
        print(f"saved {path}")


def from_runs(args) -> None:
    """Summarize a --runs-file written by an earlier (possibly cut-off) run."""
    lines = Path(args.from_runs).read_text(encoding="utf-8").splitlines()
    runs = [json.loads(line) for line in lines if line.strip()]
    if not runs:
        raise SystemExit(f"{args.from_runs} holds no runs")
    report(runs, args, note=args.note)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpus", default="1,2,4", help="world sizes to run (those above the visible GPUs are skipped)")
    parser.add_argument("--model", default="random:t5-3b")
    parser.add_argument("--batch-size", type=int, default=16, help="micro-batch per GPU")
    parser.add_argument("--grad-accum-steps", type=int, default=1, help="micro-batches per optimizer step "
                        "(configs/t5-3b-billsum.yaml resolves to 16 × 2 on an H200)")
    parser.add_argument("--runs-file", help="append each torchrun's raw result to this JSONL file as it ends")
    parser.add_argument("--from-runs", help="no training: summarize and save the runs of an earlier --runs-file")
    parser.add_argument("--note", help="with --from-runs: a note stored in the saved JSON")
    parser.add_argument("--save-as", default="scale_out", help="result name (benchmarks/results/<name>-<date>-...)")
    parser.add_argument("--src-len", type=int, default=1024)
    parser.add_argument("--tgt-len", type=int, default=128)
    parser.add_argument("--compute-dtype", default="bf16", choices=["bf16", "fp32"])
    parser.add_argument("--gc", action="store_true", help="gradient checkpointing")
    parser.add_argument("--compile", action="store_true", help="torch.compile of the T5 blocks (sumtune's `compile`)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=1, help="run the world sizes this many times, interleaved; "
                        "each row is the median run")
    parser.add_argument("--trace-steps", type=int, default=0, help="after the timed steps, trace this many more "
                        "per rank with torch.profiler and record GPU busy %%, compute vs communication kernel time")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--timeout-s", type=float, default=420.0, help="limit for each torchrun")
    parser.add_argument("--quick", action="store_true", help="CPU plumbing check: tiny T5, 1 and 2 processes")
    parser.add_argument("--no-save", action="store_true")
    # worker mode (set by the parent)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--run-dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quick:
        args.model, args.device, args.gpus, args.batch_size = "tiny", "cpu", "1,2", 2
        args.src_len, args.tgt_len, args.compute_dtype, args.warmup, args.steps = 128, 32, "fp32", 1, 3
    if args.worker:
        worker(args)
    elif args.from_runs:
        from_runs(args)
    else:
        parent(args)


if __name__ == "__main__":
    main()
