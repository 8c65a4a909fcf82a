"""Long documents: sumtune's own training step against the stock reference recipe at the same long lengths.

    python benchmarks/long_documents.py                                   # GPU: T5-3b shapes, 4096/512 and 8192/512
    python benchmarks/long_documents.py --lengths 4096/512 --sumtune "b4,b8:gc" --reference 1,2,4
    python benchmarks/long_documents.py --quick                           # CPU plumbing check (tiny model)

Data: the real BillSum rows, joined end to end (documents with documents, summaries with summaries) until every
document fills the source length and every summary the target length, so both paths train on exactly
`src_len`/`tgt_len` tokens per sample and samples/s means the same on both sides.

- `sumtune` rows: `configs/t5-3b-billsum-long.yaml` (or `--config`) with the model swapped for `random:<model>`
  (real shapes, random weights, T5's dropout 0.1) and the lengths and batch of the row; built and stepped through
  the product (`sumtune.training.build_training`, `TrainStep`), exactly what `sumtune train` runs. Setting tokens
  (joined by ':'): `b<N>` micro-batch, `gc` / `nogc` gradient checkpointing, `sdpa` / `triton` attention backend,
  `compile`, `cache` (dequantized-weight cache), `ldrop0` (lora_dropout 0), `fusedlora` (fused_lora), `drop0`
  (model_dropout 0, for reference only: not the target's).
- `reference` rows: the stock recipe (NF4 base with `wo` and `lm_head` unquantized, prepare_model_for_kbit_training
  with its gradient checkpointing, LoRA r=32 on v,o + lm_head, Seq2SeqTrainer, paged 8-bit AdamW, bf16), one model
  for all its batch sizes; the largest batch that fits is tried last and an OOM is recorded as a row note.

Writes benchmarks/results/long_documents-<date>-<gpu>.json with `rows` of {path, model, src_len, tgt_len, batch,
samples_per_s, peak_mem_gib, speedup, mfu, ...}; speedup is against the reference's best at the same lengths.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

import bench_common as bc  # noqa: E402

CHARS_PER_TOKEN_FLOOR = 3  # BillSum text averages ~4.5 characters per T5 token: 3 leaves a margin
COLUMNS = ["path", "model", "src_len", "tgt_len", "setting", "batch", "samples_per_s", "peak_mem_gib", "mfu",
           "speedup", "note"]


# ----------------------------------------------------------------------------- data
def joined_rows(rows: list[dict], src_chars: int, tgt_chars: int, count: int) -> list[dict]:
    """`count` rows whose text and summary are consecutive BillSum texts/summaries joined until long enough."""
    out, i = [], 0
    for _ in range(count):
        text, summary = "", ""
        while len(text) < src_chars or len(summary) < tgt_chars:
            row = rows[i % len(rows)]
            i += 1
            if len(text) < src_chars:
                text += (" " if text else "") + row["text"]
            if len(summary) < tgt_chars:
                summary += (" " if summary else "") + row["summary"]
        out.append({"text": text, "summary": summary})
    return out


def write_jsonl(rows: list[dict], path: Path) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


# ----------------------------------------------------------------------------- sumtune (the product's step)
def parse_setting(text: str) -> dict:
    """TrainConfig overrides of a settings string (tokens: bench_common.CONFIG_TOKENS, `b<N>`, `mem<N>`)."""
    return bc.setting_fields(text)


def sumtune_config(args, src_len: int, tgt_len: int, dataset: Path, overrides: dict):
    from sumtune import argparsing
    from sumtune.config import TrainConfig

    cfg = argparsing.resolve(TrainConfig, args.config, {})
    return replace(cfg, model=f"random:{args.model}" if args.model != "tiny" else "tiny", dataset=str(dataset),
                   tokenizer=None if args.model == "tiny" else str(bc.shared_data_dir() / "t5-tokenizer"),
                   max_source_tokens=src_len, max_target_tokens=tgt_len, eval_ratio=0.05, group_by_length=False, progress=False, output_dir=tempfile.mkdtemp(),
                   device="auto", **overrides)


def time_sumtune(cfg, args) -> dict:
    """Build the run through the product and time its step (one optimizer step = one micro-batch here)."""
    from sumtune.training import build_training

    parts = build_training(cfg)
    stream = parts.batches.stream()
    bc.free_gpu_memory()  # the peak is the training's, not the build's transient
    times_s, losses, flops = [], [], []
    for index, result, seconds in bc.timed_steps(parts.step, stream, parts.cfg.grad_accum_steps, parts.cfg.lr,
                                                 args.warmup + args.steps):
        if index >= args.warmup:
            times_s.append(seconds)
            losses.append(result.loss)
            flops.append(result.flops)
    peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None
    run = dict(times_s=times_s, losses=losses, flops_per_step=statistics.fmean(flops), peak_mem_gib=peak,
               batch=parts.cfg.batch_size * parts.cfg.grad_accum_steps)
    del parts
    return run


# ----------------------------------------------------------------------------- the stock reference
def time_reference_batches(config, device, data: dict, batches: list[int], args) -> list[tuple[int, dict | None, str]]:
    """The stock recipe at each batch size (one model, a fresh Seq2SeqTrainer per size); stops at the first OOM."""
    from train_throughput import build_reference, time_trainer

    model = build_reference(config, device, argparse.Namespace(lora_targets=None))
    results = []
    for batch in batches:
        try:
            timing = argparse.Namespace(warmup=args.warmup, steps=args.steps, src_len=data["input_ids"].shape[1],
                                        tgt_len=data["labels"].shape[1])
            results.append((batch, time_trainer(model, config, device, data, batch, timing), ""))
        except torch.OutOfMemoryError as error:
            results.append((batch, None, f"OOM: {str(error).splitlines()[0][:80]}"))
            break
        finally:
            bc.free_gpu_memory()
    del model
    bc.free_gpu_memory()
    return results


# ----------------------------------------------------------------------------- the run
def row(path: str, args, src_len: int, tgt_len: int, setting: str, batch: int, run: dict | None, note: str,
        flops_per_sample: float, matmul_tflops: float | None) -> dict:
    out = dict(path=path, model=args.model, src_len=src_len, tgt_len=tgt_len, setting=setting, batch=batch,
               note=note)
    if run is None:
        return out
    step_time_s = statistics.median(run["times_s"])
    samples_per_s = batch / step_time_s
    achieved = flops_per_sample * samples_per_s / 1e12
    out.update(samples_per_s=samples_per_s, step_time_s=step_time_s, peak_mem_gib=run.get("peak_mem_gib"),
               achieved_tflops=achieved, mfu=achieved / matmul_tflops if matmul_tflops else None,
               flops_per_sample=flops_per_sample, steps_timed=len(run["times_s"]),
               last_loss=run["losses"][-1] if run.get("losses") else None)
    return out


def run_lengths(args, device, src_len: int, tgt_len: int, work: Path, matmul_tflops) -> list[dict]:
    base_rows = bc.load_billsum_texts() if args.model != "tiny" else demo_rows()
    rows = joined_rows(base_rows, src_len * CHARS_PER_TOKEN_FLOOR * 2, tgt_len * CHARS_PER_TOKEN_FLOOR * 2,
                       args.rows)
    dataset = write_jsonl(rows, work / f"long-{src_len}-{tgt_len}.jsonl")
    config = bc.t5_config(args.model)
    out = []
    if args.reference:
        tokenizer = bc.load_t5_tokenizer() if args.model != "tiny" else None
        if tokenizer is not None:
            data = bc.tokenize_rows(tokenizer, rows, src_len, tgt_len)
            full = int(data["attention_mask"].sum(1).min()), int((data["labels"] != -100).sum(1).min())
            print(f"reference data: every row fills {full[0]}/{src_len} source and {full[1]}/{tgt_len} target "
                  f"tokens", flush=True)
            for batch, run, note in time_reference_batches(config, device, data, args.reference, args):
                flops = statistics.median(run["flops"]) / batch if run else 0.0
                out.append(row("reference", args, src_len, tgt_len, f"hf-trainer b{batch}", batch, run, note, flops,
                               matmul_tflops))
                print(out[-1], flush=True)
    for text in args.sumtune:
        cfg = sumtune_config(args, src_len, tgt_len, dataset, parse_setting(text))
        try:
            with bc.patched(text):
                run, note = time_sumtune(cfg, args), ""
        except torch.OutOfMemoryError as error:
            bc.write_oom_report(args.oom_reports, f"{src_len}-{tgt_len}-{text}", error)
            run, note = None, f"OOM: {str(error).splitlines()[0][:160]}"
        finally:
            bc.free_gpu_memory()
            if hasattr(torch, "_dynamo"):
                torch._dynamo.reset()
        batch = run["batch"] if run else cfg.batch_size
        flops = run["flops_per_step"] / batch if run else 0.0
        out.append(row("sumtune", args, src_len, tgt_len, text, batch, run, note, flops, matmul_tflops))
        print(out[-1], flush=True)
    best = max((r["samples_per_s"] for r in out if r["path"] == "reference" and "samples_per_s" in r), default=None)
    for r in out:
        if best and "samples_per_s" in r:
            r["speedup"] = r["samples_per_s"] / best
    return out


def demo_rows() -> list[dict]:
    from sumtune.demo_data import demo_records

    return [{"text": r["text"], "summary": r["summary"]} for r in demo_records(64, seed=0)]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="t5-3b", help="T5 shape (random weights), e.g. t5-3b, flan-t5-xl")
    parser.add_argument("--config", default=str(bc.REPO_ROOT / "configs" / "t5-3b-billsum-long.yaml"))
    parser.add_argument("--lengths", default="4096/512,8192/512", help="SRC/TGT pairs, comma-separated")
    parser.add_argument("--sumtune", default="b4:gc,b8:gc", help="sumtune settings per length (see the docstring)")
    parser.add_argument("--reference", default="1,2,4", help="reference batch sizes, ascending ('' = none)")
    parser.add_argument("--rows", type=int, default=64, help="joined long rows to build")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--memory-cap-gib", type=float, default=75.0, help="the peak an 80 GB card allows")
    parser.add_argument("--quick", action="store_true", help="tiny model on CPU, a few seconds")
    parser.add_argument("--no-save", action="store_true")
    bc.add_oom_reports_option(parser)
    args = parser.parse_args(argv)
    args.lengths = [tuple(int(x) for x in pair.split("/")) for pair in args.lengths.split(",") if pair.strip()]
    args.sumtune = [s.strip() for s in args.sumtune.split(",") if s.strip()]
    args.reference = [int(b) for b in args.reference.split(",") if b.strip()]
    if args.quick:
        args.model, args.lengths, args.sumtune, args.reference = "tiny", [(256, 64)], ["b2", "b2:gc"], []
        args.rows, args.warmup, args.steps = 8, 1, 2
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    device = bc.benchmark_device("long_documents", args.quick)
    if device is None:
        return 2
    matmul_tflops = bc.measure_bf16_matmul_tflops()
    bc.start_oom_reports(args.oom_reports, device)
    rows = []
    with tempfile.TemporaryDirectory() as work:
        for src_len, tgt_len in args.lengths:
            rows += run_lengths(args, device, src_len, tgt_len, Path(work), matmul_tflops)
    for r in rows:
        if r.get("peak_mem_gib") is not None and r["peak_mem_gib"] > args.memory_cap_gib:
            r["note"] = (r.get("note", "") + f" over {args.memory_cap_gib:g} GiB").strip()
    print()
    bc.print_table(rows, COLUMNS)
    if not args.no_save:
        payload = dict(model=args.model, config=args.config, lengths=args.lengths, warmup_steps=args.warmup,
                       timed_steps=args.steps, bf16_matmul_tflops=matmul_tflops, memory_cap_gib=args.memory_cap_gib,
                       rows=rows)
        print(f"saved {bc.save_result('long_documents' + ('-quick' if args.quick else ''), payload)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
