"""Training throughput of T5 QLoRA: the stock Hugging Face recipe vs sumtune's own training step, on real BillSum.

    python benchmarks/train_throughput.py --reference 4,16 --fast b16,b32:gc          # GPU
    python benchmarks/train_throughput.py --numerics --layers 4                       # GPU numerics
    python benchmarks/train_throughput.py --quick                                     # CPU plumbing check

sumtune rows are built and stepped by the product: each setting becomes a `TrainConfig` (model
`random:<shape>`, the BillSum rows as a JSONL dataset, the real T5 tokenizer, the reference's LoRA) that
`sumtune.training.build_training` sets up exactly as `sumtune train` does; the timed call is
`sumtune.train_step.TrainStep` (THE step of `sumtune train`) on micro-batches drawn from the product's batching.
The reference rows are a stock transformers/PEFT build trained by `Seq2SeqTrainer`: the baseline, not a copy.

Settings are tokens joined by ':' that map onto TrainConfig fields -- ``b<N>`` batch_size, ``a<N>``
grad_accum_steps, ``gc`` gradient_checkpointing, ``compile`` compile (the T5 blocks), ``cache``
cache_dequantized_weights, ``drop0`` model_dropout 0 (the reference keeps T5's 0.1), ``ldrop0`` lora_dropout 0,
``fusedlora`` fused_lora, ``triton`` / ``sdpa`` attention_backend, ``adamw`` optimizer adamw
(fused; default paged 8-bit AdamW), ``buckets`` pad_to_buckets, ``group`` group_by_length -- plus ``eff`` /
``cudnn``, which pin SDPA to the memory-efficient or cuDNN attention kernel around the timed steps (default:
PyTorch's choice). Each setting builds a fresh model.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

import bench_common as bc  # noqa: E402
import kernel_table  # noqa: E402

REFERENCE_LORA = dict(r=32, lora_alpha=16, lora_dropout=0.05, target_modules=["v", "o"],
                      modules_to_save=["lm_head"], task_type="SEQ_2_SEQ_LM")
COLUMNS = ["path", "setting", "batch", "samples_per_s", "tokens_per_s", "step_time_s", "peak_mem_gib",
           "mfu_measured", "mfu_datasheet", "speedup", "note"]


# ----------------------------------------------------------------------------- settings
RESOLVED_FIELDS = ("batch_size", "grad_accum_steps", "optimizer", "lora_targets", "lora_r", "compile",
                   "cache_dequantized_weights", "cuda_graphs", "pad_to_buckets", "gradient_checkpointing",
                   "model_dropout", "max_memory_gib", "lora_dropout", "fused_lora", "attention_backend")
CONFIG_SAMPLES_GUESS = 64  # rows to provide per step for a config whose batch is `auto` (resolved at build)


def parse_setting(text: str) -> dict:
    """A settings string → {"name", "sdpa", "host_skip", "fields": TrainConfig overrides} (tokens:
    bench_common.CONFIG_TOKENS, plus `a<N>` grad_accum_steps, `eff` / `cudnn` (an SDPA kernel pinned around the timed
    steps) and `hostskip` (the optimizer's finite-or-skip decision taken on the host after the step's read, as before
    2026-12-01, instead of on the GPU: an A/B of TrainStep.update_on_device))."""
    pinned, host_skip = [], []

    def own_token(token: str, fields: dict) -> bool:
        if token[:1] == "a" and token[1:].isdigit():
            fields["grad_accum_steps"] = int(token[1:])
        elif token in ("eff", "cudnn"):
            pinned.append(token)
        elif token == "hostskip":
            host_skip.append(token)
        else:
            return False
        return True

    fields = bc.setting_fields(text, own_token)
    return dict(name=text, sdpa=pinned[-1] if pinned else None, host_skip=bool(host_skip), fields=fields)


def lora_config(targets: list[str] | None):
    from peft import LoraConfig

    kwargs = dict(REFERENCE_LORA)
    if targets:  # PEFT takes its "all-linear" shorthand only as a string
        kwargs["target_modules"] = "all-linear" if targets == ["all-linear"] else targets
    return LoraConfig(**kwargs)


def reset_peak_memory() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


# ----------------------------------------------------------------------------- model builders
def build_reference(config, device, args):
    """DEVELOPERS.md recipe in bf16: NF4 base (wo, lm_head unquantized), prepare_model_for_kbit_training, LoRA."""
    from peft import get_peft_model, prepare_model_for_kbit_training

    model = bc.quantize_linear4bit(bc.random_t5(config, torch.bfloat16, device), skip=("lm_head", "wo"))
    model = prepare_model_for_kbit_training(model)  # fp32 upcasts + gradient checkpointing, as the recipe does
    return get_peft_model(model, lora_config(args.lora_targets))


EVAL_RATIO = 0.01  # the product holds out a split; the benchmark never evaluates it


def rows_for_steps(rows: list[dict], args) -> list[dict]:
    """`rows` repeated so that no epoch ends inside the timed steps: every step gets a full batch."""
    per_step = [steady_batch(f, CONFIG_SAMPLES_GUESS) * f.get("grad_accum_steps", 1)
                for f in (parse_setting(text)["fields"] for text in args.fast)]
    needed = (args.warmup + args.steps + 2) * max(per_step, default=1)
    count = max(len(rows), int(needed / (1 - EVAL_RATIO)) + 2)
    return [rows[i % len(rows)] for i in range(count)]


def steady_batch(fields: dict, unknown: int) -> int:
    """A setting's micro-batch, or `unknown` when it resolves at build (a config's or a `bauto` setting's `auto`)."""
    batch = fields.get("batch_size", unknown)
    return unknown if batch == "auto" else batch


def sumtune_config(setting: dict, args, data_file: Path, device: torch.device):
    """The TrainConfig of one sumtune row: what `sumtune train` would run with these settings."""
    from sumtune.config import TrainConfig

    if args.config and setting["name"].startswith("config"):  # a shipped config as it is, with only the model,
        # data and the setting's fields swapped in; other settings keep the reference's LoRA
        from dataclasses import replace

        from sumtune import argparsing

        base = argparsing.resolve(TrainConfig, args.config, {})
        return replace(base, model="tiny" if args.model == "tiny" else f"random:{args.model}",
                       tokenizer=None if args.model == "tiny" else str(bc.shared_data_dir() / "t5-tokenizer"),
                       dataset=str(data_file), eval_dataset=None, eval_ratio=EVAL_RATIO,
                       max_source_tokens=args.src_len, max_target_tokens=args.tgt_len, device=device.type,
                       compute_dtype=base.compute_dtype if device.type == "cuda" else "fp32", progress=False,
                       **{k: v for k, v in setting["fields"].items() if k != "batch_size" or v})
    lora = dict(lora_r=REFERENCE_LORA["r"], lora_alpha=float(REFERENCE_LORA["lora_alpha"]),
                lora_dropout=REFERENCE_LORA["lora_dropout"],
                lora_targets=args.lora_targets or list(REFERENCE_LORA["target_modules"]),
                modules_to_save=list(REFERENCE_LORA["modules_to_save"]))
    return TrainConfig(
        model="tiny" if args.model == "tiny" else f"random:{args.model}", tokenizer=str(bc.shared_data_dir() / "t5-tokenizer"),
        dataset=str(data_file), eval_ratio=EVAL_RATIO, max_source_tokens=args.src_len, max_target_tokens=args.tgt_len,
        compute_dtype="bf16" if device.type == "cuda" else "fp32", lr=args.lr, device=device.type,
        progress=False, **lora, **setting["fields"])


def sdpa_backend(setting: dict):
    """Context pinning SDPA to one kernel (``eff``/``cudnn`` tokens), else a no-op. Eager attention only: with
    ``compile`` the blocks kept cuDNN attention under an ``eff`` pin (seen in the profile), so check with --profile."""
    import contextlib

    from torch.nn.attention import SDPBackend, sdpa_kernel

    backends = {"eff": SDPBackend.EFFICIENT_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION}
    return sdpa_kernel([backends[setting["sdpa"]]]) if setting.get("sdpa") else contextlib.nullcontext()


def time_fast(data_file, device, setting, args) -> dict:
    with sdpa_backend(setting), bc.patched(setting["name"]):
        return _time_fast(data_file, device, setting, args)


def _time_fast(data_file, device, setting, args) -> dict:
    from sumtune.training import build_training

    cfg = sumtune_config(setting, args, data_file, device)
    parts = build_training(cfg)
    reset_peak_memory()  # peak = model + training, not the transient of building it
    step, stream = parts.step, parts.batches.stream()
    if setting.get("host_skip"):
        step.update_on_device = False
    parts.model.train()
    times_s, losses, samples, tokens, flops = [], [], [], [], []
    first_loss = None
    shapes_at_timing = 0
    for index, result, seconds in bc.timed_steps(step, stream, parts.cfg.grad_accum_steps, cfg.lr,
                                                 args.warmup + args.steps):
        if index == args.warmup - 1:
            shapes_at_timing = graph_shape_events(step)
        first_loss = result.loss if first_loss is None else first_loss
        if index >= args.warmup:
            times_s.append(seconds)
            losses.append(result.loss)
            samples.append(result.samples)
            tokens.append(result.tokens)
            flops.append(result.flops)
    peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None
    shape_events_timed = graph_shape_events(step) - shapes_at_timing
    pool_frees = graph_pool_frees(step)
    kernel_profile = None
    if args.profile:
        try:  # a diagnosis after the timed steps: its failure should not cost the row's figures
            kernel_profile = profile_steps(step, stream, parts.cfg.grad_accum_steps, cfg.lr)
        except Exception as error:  # noqa: BLE001
            print(f"profile of {setting['name']} failed: {type(error).__name__}: {error}", flush=True)
    lora = bc.count_lora_params(parts.model)
    resolved = parts.cfg
    del parts, step, stream
    return dict(times_s=times_s, losses=losses, samples=samples, tokens=tokens, flops=flops, lora_params=lora,
                first_loss=first_loss, peak_mem_gib=peak, samples_per_step=resolved.batch_size * resolved.grad_accum_steps,
                graph_shape_events_timed=shape_events_timed, graph_pool_frees=pool_frees,
                resolved={k: getattr(resolved, k) for k in RESOLVED_FIELDS}, kernel_profile=kernel_profile)


def graph_shape_events(step) -> int:
    """New-shape events so far under CUDA graphs: a warm-up (one row, or the full micro-batch with compile) and a
    capture each, counted apart. Inside the timed steps they are not steady state (2026-12-01: micro-batch 4 x 8 read
    24.9 samples/s against 34.7 at 4 x 1, probably for this reason; this count was added to tell)."""
    graphed = getattr(step, "graphed", None)
    return 0 if graphed is None else len(graphed.seen) + graphed.captures


def graph_pool_frees(step) -> int:
    """Times a new shape's warm-up found no room beside the graphs' pool, so the graphs were freed and captured again."""
    graphed = getattr(step, "graphed", None)
    return 0 if graphed is None else graphed.pool_freed_for_warm_up


def profile_steps(step, stream, accum: int, lr: float, steps: int = 2) -> dict:
    """Where the product's step goes: torch.profiler over a few steps (GPU only); prints the top CUDA ops and
    returns `kernel_table.kernel_breakdown` of the kernels (saved in the row as ``kernel_profile``)."""
    micro = iter([step.draw(stream, accum) for _ in range(steps)])
    bc.sync(step.device)
    breakdown, prof = kernel_table.profiled(lambda: step(next(micro), lr=lr), steps, torch.device(step.device),
                                            cpu_ops=True)
    wall_s = breakdown["wall_s_per_step"] * steps
    print(f"profiled {steps} steps: wall {wall_s:.3f} s, summed kernel time {breakdown['kernel_s_per_step'] * steps:.3f}"
          f" s (GPU busy <= {breakdown['busy_share']:.0%}, profiler overhead included); kernel ms a step by family: "
          + ", ".join(f"{family} {ms:.1f}" for family, ms in breakdown["family_ms_per_step"].items()))
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=40, max_name_column_width=70), flush=True)
    return breakdown


def time_reference(config, device, data, batch_size, args) -> dict:
    """The reference through Seq2SeqTrainer on a fresh stock build (see `time_trainer`)."""
    model = build_reference(config, device, args)
    run = time_trainer(model, config, device, data, batch_size, args)
    del model
    return run


def time_trainer(model, config, device, data, batch_size, args) -> dict:
    """A stock PEFT model trained by Seq2SeqTrainer (the reference's settings) on fixed-length `data` rows at
    `batch_size`; steps timed by a callback (sync at begin/end of each step). `args`: warmup, steps, src_len,
    tgt_len."""
    import tempfile

    from transformers import Seq2SeqTrainer, Seq2SeqTrainingArguments, TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.times_s, self._start = [], None

        def on_step_begin(self, args_, state, control, **kwargs):
            bc.sync(device)
            self._start = time.perf_counter()

        def on_step_end(self, args_, state, control, **kwargs):
            bc.sync(device)
            self.times_s.append(time.perf_counter() - self._start)

    reset_peak_memory()
    rows = data["input_ids"].shape[0]
    dataset = [{k: v[i] for k, v in data.items()} for i in range(rows)]
    timer = StepTimer()
    with tempfile.TemporaryDirectory() as out_dir:
        training_args = Seq2SeqTrainingArguments(
            output_dir=out_dir, per_device_train_batch_size=batch_size, learning_rate=2e-5,
            optim="paged_adamw_8bit" if device.type == "cuda" else "adamw_torch", bf16=device.type == "cuda",
            max_steps=args.warmup + args.steps, logging_steps=10_000, save_strategy="no", report_to=[],
            dataloader_num_workers=0, seed=0, use_cpu=device.type != "cuda", disable_tqdm=True)
        trainer = Seq2SeqTrainer(model=model, args=training_args, train_dataset=dataset, callbacks=[timer])
        trainer.train()
    lora = bc.count_lora_params(model)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None
    del trainer
    times_s = timer.times_s[args.warmup:]
    # Fixed-length batches: every step processes batch_size rows padded to src_len/tgt_len. FLOPs counted as the
    # product counts its own (sumtune.train_step.BatchFlops: all trainable parameters, lm_head copy included).
    tokens_per_row = float(data["attention_mask"].sum() + (data["labels"] != -100).sum()) / rows
    flops = bc.train_flops_per_sample(config, args.src_len, args.tgt_len, lora_params=trainable) * batch_size
    return dict(times_s=times_s, losses=[], samples=[batch_size] * len(times_s),
                tokens=[tokens_per_row * batch_size] * len(times_s), flops=[flops] * len(times_s),
                lora_params=lora, peak_mem_gib=peak)


# ----------------------------------------------------------------------------- reporting
def summarize(path: str, name: str, batch: int, run: dict, args, matmul_tflops, peak_tflops, gc: bool) -> dict:
    """One table row: medians over the timed steps of what each step processed per second."""
    def median_rate(key: str) -> float:
        return statistics.median(v / t for v, t in zip(run[key], run["times_s"]))

    step_time_s = statistics.median(run["times_s"])
    shape_events = run.get("graph_shape_events_timed", 0)
    samples_per_s = median_rate("samples")
    achieved = median_rate("flops") / 1e12
    return dict(path=path, setting=name, batch=batch, samples_per_s=samples_per_s,
                tokens_per_s=median_rate("tokens"), step_time_s=step_time_s,
                peak_mem_gib=run.get("peak_mem_gib"),
                mfu_measured=achieved / matmul_tflops if matmul_tflops else None,
                mfu_datasheet=achieved / peak_tflops if peak_tflops else None,
                achieved_tflops=achieved, flops_per_sample=sum(run["flops"]) / max(1, sum(run["samples"])),
                gradient_checkpointing=gc, steps_timed=len(run["times_s"]),
                first_loss=run.get("first_loss"), last_loss=run["losses"][-1] if run["losses"] else None,
                resolved=run.get("resolved"), graph_shape_events_timed=shape_events,
                graph_pool_frees=run.get("graph_pool_frees", 0),
                note=unsteady_note(shape_events, len(run["times_s"])), kernel_profile=run.get("kernel_profile"))


def unsteady_note(events: int, steps: int) -> str:
    return (f"{events} new-shape events (warm-up or graph capture) inside the {steps} timed "
            f"steps: not steady state, time more steps") if events else ""


def run_guarded(fn, *fn_args, oom_reports: Path | None = None, setting: str = ""):
    """Run one setting; an out-of-memory error becomes a row note instead of ending the sweep (and, with
    ``oom_reports``, a report of what held the memory: bench_common.write_oom_report)."""
    try:
        return fn(*fn_args), None
    except torch.OutOfMemoryError as error:
        bc.write_oom_report(oom_reports, setting, error)
        return None, f"OOM: {str(error).splitlines()[0][:160]}"
    finally:
        bc.free_gpu_memory()
        if hasattr(torch, "_dynamo"):
            torch._dynamo.reset()


def throughput(args, device) -> None:
    import tempfile

    from sumtune.flops import peak_tflops

    if args.layers:
        raise SystemExit("--layers is for --numerics: throughput rows are built by sumtune at the model's own depth")
    config = bc.t5_config(args.model)
    rows = bc.load_billsum_texts()
    data = bc.tokenize_rows(bc.load_t5_tokenizer(), rows, args.src_len, args.tgt_len)  # the reference's batches
    if args.full_rows:  # measurement only: batches without source padding
        full = data["attention_mask"].sum(1) == data["attention_mask"].shape[1]
        data = {k: v[full] for k, v in data.items()}
        rows = [row for row, keep in zip(rows, full.tolist()) if keep]
    matmul_tflops = bc.measure_bf16_matmul_tflops()
    peak = peak_tflops(device)
    print(f"{bc.gpu_name()}: bf16 GEMM {matmul_tflops or 0:.0f} TFLOP/s measured; {args.model} "
          f"({config.num_layers}+{config.num_decoder_layers} layers) at {args.src_len}/{args.tgt_len}", flush=True)
    results = []
    PARTIAL.update(model=args.model, src_len=args.src_len, tgt_len=args.tgt_len, warmup_steps=args.warmup,
                   timed_steps=args.steps, bf16_matmul_tflops=matmul_tflops, rows=results,
                   saved=args.no_save or args.quick)  # runs that save nothing save nothing when cut either
    for batch in args.reference:
        run, note = run_guarded(time_reference, config, device, data, batch, args)
        row = (summarize("reference", f"hf-trainer b{batch}", batch, run, args, matmul_tflops, peak, True)
               if run else dict(path="reference", setting=f"hf-trainer b{batch}", batch=batch, note=note))
        results.append(row)
        print(row, flush=True)
    with tempfile.TemporaryDirectory(prefix="sumtune-bench-") as tmp:
        data_file = Path(tmp) / "billsum.jsonl"
        data_file.write_text("".join(json.dumps(r) + "\n" for r in rows_for_steps(rows, args)), encoding="utf-8")
        for text in args.fast:
            setting = parse_setting(text)
            batch = steady_batch(setting["fields"], 0) * setting["fields"].get("grad_accum_steps", 1)
            run, note = run_guarded(time_fast, data_file, device, setting, args, oom_reports=args.oom_reports,
                                    setting=text)
            batch = run["samples_per_step"] if run else batch  # a config's `auto` batch as it resolved
            row = (summarize("sumtune", text, batch, run, args, matmul_tflops, peak,
                             setting["fields"].get("gradient_checkpointing", False))
                   if run else dict(path="sumtune", setting=text, batch=batch, note=note))
            results.append(row)
            print(row, flush=True)
    finish(results, args, matmul_tflops)


def loss_drop(row: dict) -> float | None:
    """How far a row's loss fell over its steps, as a fraction of where it started (None without both losses)."""
    first, last = row.get("first_loss"), row.get("last_loss")
    return (first - last) / first if first and last is not None else None


def idle_rows(rows: list[dict]) -> list[dict]:
    """The sumtune rows whose loss fell less than half as far as the best row's: they are not training as the others
    do (2026-12-01: a fast-looking compile + fused LoRA row went 11.08 -> 10.35 where the rest went 11.1 -> 8.5, its
    gradients lost). Each gets a note; `finish` leaves them out of `fastest`."""
    drops = {id(r): d for r in rows if r["path"] == "sumtune" and (d := loss_drop(r)) is not None}
    if len(drops) < 2:
        return []
    best = max(drops.values())
    idle = [r for r in rows if id(r) in drops and drops[id(r)] < 0.5 * best]
    for row in idle:
        row["note"] = (row.get("note", "") + f" loss barely fell ({100 * drops[id(row)]:.0f}% vs {100 * best:.0f}% "
                       f"in the best row): not training as the others do").strip()
    return idle


def finish(rows: list[dict], args, matmul_tflops) -> None:
    reference_best = max((r["samples_per_s"] for r in rows if r["path"] == "reference" and "samples_per_s" in r),
                         default=args.reference_samples_per_s)
    for row in rows:
        if reference_best and "samples_per_s" in row:
            row["speedup"] = row["samples_per_s"] / reference_best
    idle = {id(r) for r in idle_rows(rows)}
    fast = [r for r in rows if r["path"] == "sumtune" and "samples_per_s" in r and id(r) not in idle]
    fastest = max(fast, key=lambda r: r["samples_per_s"], default=None)
    capped = [r for r in fast if r.get("peak_mem_gib") is not None and r["peak_mem_gib"] <= args.memory_cap_gib]
    best_capped = max(capped, key=lambda r: r["samples_per_s"], default=None)
    for row, label in ((fastest, "fastest"), (best_capped, f"best<= {args.memory_cap_gib} GiB")):
        if row:
            row["note"] = (row.get("note", "") + " " + label).strip()
    print()
    bc.print_table(rows, COLUMNS)
    if not args.no_save:
        payload = dict(model=args.model, layers=args.layers, src_len=args.src_len, tgt_len=args.tgt_len,
                       warmup_steps=args.warmup, timed_steps=args.steps, bf16_matmul_tflops=matmul_tflops,
                       memory_cap_gib=args.memory_cap_gib, reference_best_samples_per_s=reference_best, lora=REFERENCE_LORA | (
                           {"target_modules": args.lora_targets} if args.lora_targets else {}),
                       flops_counted=bc.FLOPS_COUNTED, rows=rows, fastest=fastest and fastest["setting"],
                       method="sumtune rows: TrainConfig -> sumtune.training.build_training -> TrainStep on the "
                              "product's batches; reference: stock transformers/PEFT via Seq2SeqTrainer; rates "
                              "are medians over the timed steps",
                       best_under_cap=best_capped and best_capped["setting"])
        print(f"saved {bc.save_result('train_throughput' + ('-quick' if args.quick else ''), payload)}")
    PARTIAL["saved"] = True


# ----------------------------------------------------------------------------- CLI
def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="t5-3b", choices=sorted(bc.T5_SHAPES))
    parser.add_argument("--layers", type=int, default=None, help="--numerics: encoder and decoder layers (default 4)")
    parser.add_argument("--src-len", type=int, default=1024)
    parser.add_argument("--tgt-len", type=int, default=128)
    parser.add_argument("--reference", default="4,16", help="reference batch sizes, comma-separated ('' = none)")
    parser.add_argument("--fast", default="b16,b32:gc", help="fast settings, comma-separated ('' = none)")
    parser.add_argument("--lora-targets", default=None, help="comma-separated LoRA targets (default: v,o)")
    parser.add_argument("--config", default=None,
                        help="settings that start with 'config' start from this YAML file (e.g. "
                             "configs/t5-3b-billsum.yaml) instead of the reference's LoRA; 'config' alone is that file "
                             "exactly as shipped")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--lr", type=float, default=2e-5)
    parser.add_argument("--reference-samples-per-s", type=float, default=None,
                        help="reference's best samples/s from an earlier run on the same GPU (for speedup)")
    parser.add_argument("--memory-cap-gib", type=float, default=15.3)
    parser.add_argument("--full-rows", action="store_true", help="only rows that fill --src-len (no padding)")
    parser.add_argument("--numerics", action="store_true", help="fast vs stock loss/grads + 200-step loss curves")
    parser.add_argument("--curve-steps", type=int, default=200)
    parser.add_argument("--curve-lr", type=float, default=1e-4)
    parser.add_argument("--numerics-batch", type=int, default=4)
    parser.add_argument("--numerics-patch", default="",
                        help="--numerics: module-constant tokens for the fast path (bench_common.PATCH_TOKENS, "
                             "':'-joined); several fast variants, compared on the same draws: ','-joined "
                             "(the first is the primary `fast` path; 'default' or '' = the code's defaults)")
    parser.add_argument("--numerics-draws", type=int, default=1,
                        help="--numerics: repeat the gradient comparison on this many (model seed, batch) draws")
    parser.add_argument("--quick", action="store_true", help="tiny shapes on CPU, a few seconds")
    parser.add_argument("--no-save", action="store_true")
    bc.add_oom_reports_option(parser)
    parser.add_argument("--profile", action="store_true",
                        help="after timing each fast setting, profile 2 steps: print the top CUDA ops, save kernel ms "
                             "a step by family and the top kernels in the row (kernel_profile)")
    args = parser.parse_args(argv)
    args.reference = [int(b) for b in args.reference.split(",") if b.strip()]
    args.fast = [s.strip() for s in args.fast.split(",") if s.strip()]
    args.lora_targets = args.lora_targets.split(",") if args.lora_targets else None
    args.numerics_variants = ["" if v.strip() == "default" else v.strip() for v in args.numerics_patch.split(",")]
    unknown = [t for v in args.numerics_variants for t in v.split(":") if t and t not in bc.PATCH_TOKENS]
    if unknown:
        raise SystemExit(f"--numerics-patch: unknown token(s) {unknown}; known: {sorted(bc.PATCH_TOKENS)}")
    if args.quick:
        args.model, args.src_len, args.tgt_len = "tiny", 32, 8
        args.reference, args.fast = [2], ["b2", "b2:gc:cache"]
        args.warmup, args.steps, args.curve_steps, args.numerics_batch = 1, 2, 20, 2
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    device = bc.benchmark_device("train_throughput", args.quick)
    if device is None:
        return 2
    if args.numerics:
        from fast_numerics import run_numerics

        run_numerics(args, device)  # each fast variant under its own patches (e.g. `nopv16`), on the same draws
    else:
        bc.start_oom_reports(args.oom_reports, device)
        throughput(args, device)
    return 0


# What a run has measured so far, saved if a signal cuts it (bench_common.saved_if_interrupted)
PARTIAL: dict = {}

if __name__ == "__main__":
    with bc.saved_if_interrupted("train_throughput", PARTIAL):
        sys.exit(main())
