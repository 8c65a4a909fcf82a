"""Build a training run's parts from a TrainConfig: the model, the batches, the optimizer and THE step.

The recipe builds its run with these functions, between its own run-directory, logging and resume work; a
benchmark builds the same parts without a run directory (`build_training`) and times `TrainStep` on the
product's own batches:

    parts = build_training(TrainConfig(model="random:t5-3b", dataset="rows.jsonl", tokenizer=..., batch_size=32))
    stream = parts.batches.stream()
    result = parts.step(parts.step.draw(stream, parts.cfg.grad_accum_steps), lr=parts.cfg.lr)  # a StepResult
"""

from __future__ import annotations

import random
import sys
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from sumtune import batch_search, checkpoint, distributed
from sumtune.batching import Batches, Collator, to_device
from sumtune.config import TrainConfig
from sumtune.data import LoadedData, TokenizedExample, clip_chars, load_rows, tokenize_rows
from sumtune.memory import measured_footprint_bytes
from sumtune.modeling import (count_parameters, enable_fast_path, load_model, load_tokenizer, model_source,
                              resolve_device, run_base_dir, t5_config)
from sumtune.optim import build_optimizer
from sumtune.profiling.advice import advice_context
from sumtune.profiling.profiler import NULL_PROFILER
from sumtune.progress import Progress
from sumtune.train_step import BatchFlops, TrainStep, forward_loss


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


# ---- data ---------------------------------------------------------------------------------------------------

def read_inputs(cfg: TrainConfig, progress: Progress) -> tuple[LoadedData, object]:
    """The config's rows (split into train and eval) and the tokenizer.

    A random model's word vocabulary is built from the text the model can see: clipped like the inputs."""
    with progress.task("reading data"):
        data = load_rows(cfg)
    if data.skipped_empty:
        progress.write(f"Skipped {data.skipped_empty} row(s) with an empty text or summary.")
    tokenizer = load_tokenizer(cfg, [t + " " + s for t, s in zip(
        clip_chars([r["text"] for r in data.train], cfg.max_source_tokens),
        clip_chars([r["summary"] for r in data.train], cfg.max_target_tokens))])
    return data, tokenizer


def tokenize_examples(tokenizer, rows: list[dict], cfg: TrainConfig, progress: Progress) -> list[TokenizedExample]:
    """The training rows tokenized (with a bar: a large corpus takes a while)."""
    return progress.map_chunks(
        lambda chunk: tokenize_rows(tokenizer, chunk, prefix=cfg.source_prefix,
                                    max_source_tokens=cfg.max_source_tokens,
                                    max_target_tokens=cfg.max_target_tokens),
        rows, desc="tokenizing")


def collator_for(cfg: TrainConfig, pad_id: int) -> Collator:
    return Collator(pad_id, (cfg.max_source_tokens, cfg.max_target_tokens) if cfg.pad_to_buckets else None)


def build_batches(examples: list[TokenizedExample], cfg: TrainConfig, pad_id: int, *,
                  dist: distributed.DistContext) -> Batches:
    """This rank's slice of global batches of batch_size × world (one process: the whole batch)."""
    return Batches(examples, cfg.batch_size, collator_for(cfg, pad_id), seed=cfg.seed,
                   group_by_length=cfg.group_by_length, rank=dist.rank, world_size=dist.world_size,
                   num_workers=cfg.num_workers, pin_memory=cfg.pin_memory and dist.device.type == "cuda")


# ---- model ---------------------------------------------------------------------------------------------------

def save_random_base(cfg: TrainConfig, tokenizer, run_dir: Path) -> str:
    """Save a random base whose weights exist nowhere else (`ModelSource.saved_in_run`) as a model directory in
    the run, and return its path: the run then carries its base, and evaluate/summarize/merge and PEFT find it."""
    from transformers import T5ForConditionalGeneration

    target = run_base_dir(run_dir)
    if (target / "model.safetensors").is_file():  # a resumed run keeps the base it started with
        return str(target)
    source = model_source(cfg.model)
    config = t5_config(source.shape, vocab_size=source.vocab_size(len(tokenizer)),
                       pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                       decoder_start_token_id=tokenizer.pad_token_id)
    torch.manual_seed(cfg.seed)
    with checkpoint.atomic_directory(target) as tmp:  # never a half-written base that a resume would reuse
        T5ForConditionalGeneration(config).save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return str(target)


def build_model(cfg: TrainConfig, tokenizer, device: torch.device, *, run_dir: Path | None = None,
                dist: distributed.DistContext | None = None, progress: Progress | None = None):
    """The quantized base with LoRA adapters, on `device`, with the config's speed options, in training mode.

    With a `run_dir`, a base that must be kept with the run is saved there first (rank 0 writes, others read)."""
    from sumtune import fast_t5
    from sumtune.lora import apply_lora

    dist = dist or distributed.DistContext(device=device)
    progress = progress or Progress(enabled=False)
    model_cfg = cfg
    if run_dir is not None and model_source(cfg.model).saved_in_run:
        with dist.main_process_first():
            path = save_random_base(cfg, tokenizer, run_dir) if dist.is_main else str(run_base_dir(run_dir))
        model_cfg = replace(cfg, model=path)
    with progress.task(f"loading and quantizing {cfg.model}"):
        base = load_model(model_cfg, vocab_size=len(tokenizer), device=device)
    if cfg.gradient_checkpointing:
        enable_activation_checkpointing(base)
    model = apply_lora(base, cfg).to(device)
    if cfg.fast_kernels:
        model = enable_fast_path(model, attention_backend=cfg.attention_backend,
                                 fused_ffn_dropout=cfg.fused_ffn_dropout, fused_gated_ffn=cfg.fused_gated_ffn)
        if cfg.fused_lora:
            fast_t5.fuse_lora_4bit(model, concat_gemms=cfg.lora_in_base_gemm)
    if cfg.cache_dequantized_weights is True:  # `auto` is settled after the micro-batch (resolve_weight_cache)
        fast_t5.cache_dequantized_weights(model)
    if cfg.compile and device.type == "cuda":
        model = fast_t5.compile_for_training(model)
    return model.train()  # a loaded base comes in eval mode: dropout would be off in the steps


def enable_activation_checkpointing(model) -> None:
    """Non-reentrant activation checkpointing through transformers' current name for it: newer 5.x releases (5.24
    here) call it `activation_checkpointing_enable` and warn that `gradient_checkpointing_enable` goes in v6."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


DS_GEMM_HELD_OFF = "ds_gemm_held_off"  # a micro-batch trial's key (and the checkpoint state's) for that switch


def _loaded_flash_attention():
    """sumtune.fast_t5.flash_attention when this process has imported it (its kernels ran, or a fast-path forward
    chose them), else None: importing it here would pull in bitsandbytes for runs that never use it."""
    return sys.modules.get("sumtune.fast_t5.flash_attention")


def _hold_off_ds_gemm(held_off: bool) -> None:
    if held_off:
        from sumtune.fast_t5 import flash_attention

        flash_attention.hold_off_ds_gemm(True)
    elif _loaded_flash_attention() is not None:
        _loaded_flash_attention().hold_off_ds_gemm(False)


def ds_gemm_held_off() -> bool:
    """Whether this run holds the stored-dS GEMM off (recorded in checkpoints, so a resumed run does too)."""
    flash_attention = _loaded_flash_attention()
    return flash_attention is not None and flash_attention.ds_gemm_held_off_for_run()


def _ds_gemm_leaner() -> batch_search.LeanerMode:
    """The attention backward's dQ kernel instead of its stored-dS GEMM (whose L x L buffer a micro-batch may not
    have room for), tried when the probe that did not fit made such a buffer. The kernels' module loads at the first
    fast-path forward, that is inside the first probe, so it is looked up only then."""
    def buffers_made() -> int:
        flash_attention = _loaded_flash_attention()
        return 0 if flash_attention is None else flash_attention.ds_buffers_made

    seen = [buffers_made()]

    def applies() -> bool:
        made = buffers_made()
        grew, seen[0] = made > seen[0], made
        return grew

    def held():
        from sumtune.fast_t5 import flash_attention

        return flash_attention.holding_off_ds_gemm()

    return batch_search.LeanerMode(DS_GEMM_HELD_OFF, held, applies)


def resolve_batch_size(cfg: TrainConfig, *, model, examples: list[TokenizedExample], collator: Collator,
                       device: torch.device, resume_record: dict | None = None,
                       progress: Progress | None = None) -> tuple[TrainConfig, list[dict]]:
    """The config with a numeric micro-batch (`batch_size: auto` → a resumed run's own, or the largest that fits
    the GPU at the data's longest shapes), and the search's trials."""
    held_off = bool(resume_record and resume_record.get(DS_GEMM_HELD_OFF))
    _hold_off_ds_gemm(held_off)  # every run sets it: none inherits another's
    if cfg.batch_size != "auto":
        return cfg, []
    progress = progress or Progress(enabled=False)
    samples = cfg.effective_batch_size
    trials: list[dict] = []
    if resume_record is not None:
        micro, accum = resume_record["micro_batch_size"], resume_record["grad_accum_steps"]
    elif device.type != "cuda":
        micro, accum = samples, 1  # no GPU memory to measure: host memory is rarely the limit at CPU speeds
    else:
        worst = longest_example(examples)
        with progress.task(f"finding the largest micro-batch for {len(worst.input_ids)} source / "
                           f"{len(worst.labels)} target tokens"):
            micro, trials = batch_search.find_micro_batch(
                loss_fn=lambda batch: forward_loss(model, batch, device=device, compute_dtype=cfg.compute_dtype),
                make_batch=lambda m: to_device(collator([worst] * m), device), model=model, device=device,
                samples_per_step=samples, max_micro_batch=len(examples), max_memory_gib=cfg.max_memory_gib,
                leaner=_ds_gemm_leaner())
        micro = distributed.min_over_ranks(micro, device)  # all ranks agree (a divisor still)
        accum = samples // micro
        held_off = bool(trials[-1].get(DS_GEMM_HELD_OFF)) and trials[-1]["micro_batch"] == micro
        held_off = not distributed.min_over_ranks(int(not held_off), device)  # held off on one rank: on all
        _hold_off_ds_gemm(held_off)
    lean = " (attention's dQ kernel instead of the stored-dS GEMM: only so does it fit)" if held_off else ""
    progress.write(f"sumtune: batch_size auto → micro-batch {micro} × {accum} accumulation "
                   f"({samples} samples per step){lean}.")
    return replace(cfg, batch_size=micro, grad_accum_steps=accum), trials


def resolve_weight_cache(cfg: TrainConfig, *, model, trials: list[dict], examples: list[TokenizedExample],
                         collator: Collator, device: torch.device, graphs: bool,
                         progress: Progress | None = None) -> TrainConfig:
    """`cache_dequantized_weights: auto` → on (and the cache made) when on a CUDA GPU the dequantized copy fits beside
    the micro-batch's peak (and, with CUDA graphs, one row's warm-up: `graph_warm_up_bytes`) within
    `AUTO_BATCH_HEADROOM` of the memory budget, else off. The peak is the one the
    micro-batch search measured, or a probe of the configured micro-batch at the data's longest shapes. `graphs`:
    whether the step will be captured in CUDA graphs (`graph_blocker_for`)."""
    if cfg.cache_dequantized_weights != "auto":
        return cfg
    from sumtune import fast_t5  # lazily, as build_model: it imports bitsandbytes

    size = fast_t5.dequantized_weight_bytes(model) if device.type == "cuda" else 0
    if size == 0:  # no GPU, or no 4-bit weights: nothing to cache
        return replace(cfg, cache_dequantized_weights=False)
    chosen = [t for t in trials if t.get("micro_batch") == cfg.batch_size and t.get("fits")]
    if chosen:
        peak = chosen[-1]["peak_reserved_gib"] * 2**30
    else:  # a numeric (or resumed) micro-batch: one probe
        peak = batch_search.measure_peak_bytes(
            loss_fn=lambda batch: forward_loss(model, batch, device=device, compute_dtype=cfg.compute_dtype),
            make_batch=lambda m: to_device(collator([longest_example(examples)] * m), device), model=model,
            device=device, micro_batch=cfg.batch_size)
    budget = batch_search.AUTO_BATCH_HEADROOM * batch_search.memory_budget_bytes(device, cfg.max_memory_gib)
    warm_up = graph_warm_up_bytes(peak, measured_footprint_bytes(model), cfg.batch_size) if graphs else 0.0
    on = bool(distributed.min_over_ranks(int(peak + size + warm_up <= budget), device))  # every rank alike
    if on:
        fast_t5.cache_dequantized_weights(model)
    beside = f" and {warm_up / 2**30:.1f} GiB for a new shape's warm-up beside the CUDA graphs" if graphs else ""
    (progress or Progress(enabled=False)).write(
        f"sumtune: cache_dequantized_weights auto → {'on' if on else 'off'} ({size / 2**30:.1f} GiB beside a "
        f"{peak / 2**30:.1f} GiB peak at micro-batch {cfg.batch_size}{beside}; budget {budget / 2**30:.1f} GiB).")
    return replace(cfg, cache_dequantized_weights=on)


def graph_warm_up_bytes(peak_bytes: float, resident_bytes: float, micro_batch: int) -> float:
    """One row's activations (the micro-batch's peak less what stays resident, per row): what a batch shape first met
    after the CUDA graphs' pool has grown needs beside it for its one-row eager warm-up (`sumtune.cuda_graphs`).
    Under a 15.3 GiB cap the weight cache beside micro-batch 2 left no such room and the run died (H200,
    2026-12-01, results/train_throughput_seed_15gib_oom-2026-12-01-h200.json)."""
    return max(peak_bytes - resident_bytes, 0.0) / max(micro_batch, 1)


def longest_example(examples: list[TokenizedExample]) -> TokenizedExample:
    """The data's longest source with its longest target: the shapes memory probes measure."""
    return TokenizedExample(max((e.input_ids for e in examples), key=len), max((e.labels for e in examples), key=len))


def graph_blocker_for(cfg: TrainConfig, dist: distributed.DistContext) -> str | None:
    """Why this run's step will not be captured in CUDA graphs (`cuda_graphs.graph_blocker`), or None when it will."""
    from sumtune.cuda_graphs import graph_blocker

    if not cfg.cuda_graphs:
        return "cuda_graphs is off"
    return graph_blocker(device=dist.device, distributed=dist.enabled, gradient_checkpointing=cfg.gradient_checkpointing)


def build_step(model, cfg: TrainConfig, *, dist: distributed.DistContext, profiler=NULL_PROFILER,
               progress: Progress | None = None) -> TrainStep:
    """The optimizer over the trainable weights, the DDP wrapper when data-parallel, and THE step over them.

    This is also where a profiler learns what it profiles (device, samples per step, the settings)."""
    from sumtune.flops import peak_tflops

    device = dist.device
    optimizer = build_optimizer(cfg.optimizer, (p for p in model.parameters() if p.requires_grad), lr=cfg.lr,
                                weight_decay=cfg.weight_decay, device=device)
    train_model = distributed.wrap_model(model, dist)  # DDP over the adapter when distributed
    _, trainable = count_parameters(model)
    profiler.describe_run(device=device.type, peak_tflops=peak_tflops(device),
                          samples_per_step=cfg.effective_batch_size, context=advice_context(cfg))
    progress = progress or Progress(enabled=False)
    reason = graph_blocker_for(cfg, dist)
    if cfg.cuda_graphs and reason is not None and device.type == "cuda":  # on a CPU nobody expects graphs: no line
        progress.write(f"sumtune: cuda_graphs is on but the step runs eagerly: {reason}.")
    graphs = reason is None
    return TrainStep(model, optimizer, device=device, compute_dtype=cfg.compute_dtype,
                     max_grad_norm=cfg.max_grad_norm, flops=BatchFlops(model.config, trainable),
                     train_model=train_model, dist=dist, profiler=profiler, cuda_graphs=graphs,
                     notify=progress.write)


# ---- all of it -------------------------------------------------------------------------------------------------

@dataclass
class TrainingParts:
    """A built run: the resolved config (numeric batch size) and what trains."""

    cfg: TrainConfig
    tokenizer: object
    model: torch.nn.Module
    batches: Batches
    step: TrainStep
    auto_batch_trials: list[dict]
    data: LoadedData | None = None  # the rows (train and eval split), when `build_training` read them

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        return self.step.optimizer


def build_parts(cfg: TrainConfig, tokenizer, examples: list[TokenizedExample], *, dist: distributed.DistContext,
                run_dir: Path | None = None, resume_record: dict | None = None, profiler=NULL_PROFILER,
                progress: Progress | None = None) -> TrainingParts:
    """Model → micro-batch size (`auto` resolved) → weight cache (`auto` resolved) → batches → optimizer and step."""
    batch_search.cap_gpu_memory(dist.device, cfg.max_memory_gib)
    model = build_model(cfg, tokenizer, dist.device, run_dir=run_dir, dist=dist, progress=progress)
    collator = collator_for(cfg, tokenizer.pad_token_id)
    cfg, trials = resolve_batch_size(cfg, model=model, examples=examples, collator=collator, device=dist.device,
                                     resume_record=resume_record, progress=progress)
    cfg = resolve_weight_cache(cfg, model=model, trials=trials, examples=examples, collator=collator,
                               device=dist.device, graphs=graph_blocker_for(cfg, dist) is None, progress=progress)
    batches = build_batches(examples, cfg, tokenizer.pad_token_id, dist=dist)
    step = build_step(model, cfg, dist=dist, profiler=profiler, progress=progress)
    return TrainingParts(cfg=cfg, tokenizer=tokenizer, model=model, batches=batches, step=step,
                         auto_batch_trials=trials)


def build_training(cfg: TrainConfig, *, profiler=NULL_PROFILER, progress: Progress | None = None) -> TrainingParts:
    """Everything a benchmark needs to run the product's step, built as the recipe builds it (the same order,
    the same seeds: the same steps), without a run directory: nothing is written."""
    progress = progress or Progress(enabled=False)
    dist = distributed.init_distributed(resolve_device(cfg.device))
    seed_everything(cfg.seed)
    data, tokenizer = read_inputs(cfg, progress)
    examples = tokenize_examples(tokenizer, data.train, cfg, progress)
    parts = build_parts(cfg, tokenizer, examples, dist=dist, profiler=profiler, progress=progress)
    return replace(parts, data=data)
