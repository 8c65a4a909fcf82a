"""The QLoRA training recipe: `setup()` → `train()` → `cleanup()`.

One readable loop; everything it needs is built in `setup()`. The profiler is a null object unless a profile
was asked for, so the hot path has no `if profiling` branches.
"""

from __future__ import annotations

import contextlib
import json
import math
import random
import resource
import shutil
import time
from pathlib import Path

import torch

from sumtune import argparsing
from sumtune.config import TrainConfig
from sumtune.data import BatchIterator, load_rows, tokenize_rows
from sumtune.errors import SumtuneError
from sumtune.flops import mfu, peak_tflops, train_flops_per_sample
from sumtune.metrics import MetricsLogger
from sumtune.modeling import DTYPES, count_parameters, load_tokenizer, resolve_device
from sumtune.optim import build_optimizer, get_lr, set_lr
from sumtune.progress import Progress

RUN_MARKERS = ("config.yaml", "metrics.jsonl", "adapter_config.json")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def peak_memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


def autocast(device: torch.device, compute_dtype: str):
    if compute_dtype == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=DTYPES[compute_dtype])


def prepare_output_dir(cfg: TrainConfig) -> Path:
    out = Path(cfg.output_dir).expanduser()
    if out.exists() and not out.is_dir():
        raise SumtuneError(f"Output path {str(out)!r} exists and is not a directory.")
    if out.is_dir() and any((out / m).exists() for m in RUN_MARKERS):
        if not cfg.overwrite:
            raise SumtuneError(f"Output directory {str(out)!r} already holds a run; pass --overwrite to replace "
                               f"it or choose another --output-dir.")
        for marker in ("metrics.jsonl", "tb", "eval", "checkpoints", "profile", "plots", "base_model"):
            path = out / marker
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()
    out.mkdir(parents=True, exist_ok=True)
    return out


def materialize_tiny_base(cfg: TrainConfig, tokenizer, run_dir: Path) -> str:
    """Save the random tiny T5 as a real model directory, then load it like any checkpoint.

    The run then carries its own base model, so evaluate/summarize/merge and PEFT find it again.
    """
    from transformers import T5ForConditionalGeneration

    from sumtune.modeling import t5_config

    target = run_dir / "base_model"
    config = t5_config("tiny", vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                       eos_token_id=tokenizer.eos_token_id, decoder_start_token_id=tokenizer.pad_token_id)
    torch.manual_seed(cfg.seed)
    T5ForConditionalGeneration(config).save_pretrained(target)
    tokenizer.save_pretrained(target)
    return str(target)


class TrainRecipe:
    def __init__(self, cfg: TrainConfig, profiler=None):
        from sumtune.profiling import NULL_PROFILER

        self.cfg = cfg
        self.profiler = profiler or NULL_PROFILER
        self.global_step = 0
        self.epoch = 0
        self.best_score: float | None = None

    # ---- setup -------------------------------------------------------------------------------------
    def setup(self) -> None:
        cfg = self.cfg
        self.device = resolve_device(cfg.device)
        seed_everything(cfg.seed)
        self.progress = Progress(enabled=cfg.progress)
        self.run_dir = prepare_output_dir(cfg)
        with self.progress.task("reading data"):
            data = load_rows(cfg)
        self.train_rows, self.eval_rows = data.train, data.eval
        if data.skipped_empty:
            self.progress.write(f"Skipped {data.skipped_empty} row(s) with an empty text or summary.")
        self.tokenizer = load_tokenizer(cfg, [r["text"] + " " + r["summary"] for r in data.train])
        self.model = self._build_model()
        with self.progress.task("tokenizing"):
            examples = tokenize_rows(self.tokenizer, self.train_rows, cfg)
        self.batches = BatchIterator(examples, cfg.batch_size, self.tokenizer.pad_token_id, seed=cfg.seed,
                                     group_by_length=cfg.group_by_length, num_workers=cfg.num_workers,
                                     pin_memory=cfg.pin_memory and self.device.type == "cuda")
        micro_per_epoch = self.batches.batches_per_epoch()
        self.steps_per_epoch = max(1, micro_per_epoch // cfg.grad_accum_steps)
        self.total_steps = cfg.max_steps or max(1, math.ceil(self.steps_per_epoch * cfg.epochs))
        self.optimizer = build_optimizer(cfg.optimizer, (p for p in self.model.parameters() if p.requires_grad),
                                         lr=cfg.lr, weight_decay=cfg.weight_decay, device=self.device)
        self.logger = MetricsLogger(self.run_dir)
        argparsing.write_yaml(cfg, self.run_dir / "config.yaml")
        self.tokenizer.save_pretrained(self.run_dir)
        total, trainable = count_parameters(self.model)
        self.param_counts = {"total": total, "trainable": trainable}
        self.peak_tflops = peak_tflops(self.device)
        self.flops_per_sample = self.batch_flops_for(cfg.max_source_tokens, cfg.max_target_tokens)
        self.progress.write(
            f"sumtune: {cfg.model} ({cfg.quantization}, {cfg.compute_dtype}) on {self.device}; "
            f"{trainable:,} trainable of {total:,} parameters ({100 * trainable / total:.2f}%); "
            f"{len(self.train_rows)} train / {len(self.eval_rows)} eval rows; {self.total_steps} steps of "
            f"{cfg.effective_batch_size} samples.")

    def _build_model(self):
        from sumtune.lora import apply_lora
        from sumtune.modeling import load_model

        cfg = self.cfg
        model_cfg = cfg
        if cfg.model == "tiny":
            from dataclasses import replace

            model_cfg = replace(cfg, model=materialize_tiny_base(cfg, self.tokenizer, self.run_dir))
        with self.progress.task(f"loading and quantizing {cfg.model}"):
            base = load_model(model_cfg, vocab_size=len(self.tokenizer), device=self.device)
        if cfg.gradient_checkpointing:
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model = apply_lora(base, cfg).to(self.device)
        if cfg.fast_kernels:
            model = enable_fast_path(model)
        if cfg.compile and self.device.type == "cuda":
            from sumtune import fast_t5

            model = fast_t5.compile_for_training(model)
        return model

    def to_device(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}

    # ---- one step ----------------------------------------------------------------------------------
    def forward_loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        with autocast(self.device, self.cfg.compute_dtype):
            return self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                              labels=batch["labels"]).loss

    def optimizer_step(self) -> float:
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        max_norm = self.cfg.max_grad_norm or float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        set_lr(self.optimizer, self.current_lr())
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(grad_norm)

    def train_step(self, batch: dict[str, torch.Tensor]) -> dict[str, float]:
        """One optimizer step on one micro-batch already on the device (used by benchmarks)."""
        loss = self.forward_loss(batch)
        loss.backward()
        grad_norm = self.optimizer_step()
        self.global_step += 1
        return {"loss": float(loss.detach()), "grad_norm": grad_norm, "tokens": int(self._tokens(batch))}

    def current_lr(self) -> float:
        return get_lr(self.global_step, peak_lr=self.cfg.lr, warmup_steps=self.cfg.warmup_steps,
                      total_steps=self.total_steps, schedule=self.cfg.lr_schedule)

    def batch_flops_for(self, src_len: int, tgt_len: int, batch_size: int = 1) -> float:
        """Useful training FLOPs for a padded batch of this shape (0 for models sumtune cannot count)."""
        config = self.model.config
        if getattr(config, "model_type", "") != "t5":
            return 0.0
        return batch_size * train_flops_per_sample(config, src_len, tgt_len,
                                                   lora_params=self.param_counts["trainable"])

    def batch_flops(self, batch: dict[str, torch.Tensor]) -> float:
        return self.batch_flops_for(batch["input_ids"].shape[1], batch["labels"].shape[1], batch["input_ids"].shape[0])

    @staticmethod
    def _tokens(batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return batch["attention_mask"].sum() + (batch["labels"] != -100).sum()

    def _micro_batches(self):
        """Endless stream of (epoch, batch) pairs, epoch by epoch."""
        while True:
            for batch in self.batches.epoch(self.epoch):
                yield batch
            self.epoch += 1

    # ---- the loop ----------------------------------------------------------------------------------
    def train(self, max_steps: int | None = None) -> dict:
        cfg, prof = self.cfg, self.profiler
        stop_at = min(self.total_steps, max_steps) if max_steps else self.total_steps
        self.model.train()
        stream = self._micro_batches()
        bar = self.progress.bar(total=stop_at, desc="training", initial=self.global_step)
        window_tokens, window_samples, window_flops, window_start = 0, 0, 0.0, time.perf_counter()
        last_train: dict = {}
        while self.global_step < stop_at:
            loss_sum = torch.zeros((), device=self.device)
            step_tokens = step_samples = 0
            for _ in range(cfg.grad_accum_steps):
                with prof.phase("data"):
                    batch = next(stream)
                step_tokens += int(self._tokens(batch))  # counted on the host batch: no GPU sync
                step_samples += batch["input_ids"].shape[0]
                window_flops += self.batch_flops(batch)
                with prof.phase("h2d"):
                    batch = self.to_device(batch)
                with prof.phase("forward"):
                    loss = self.forward_loss(batch) / cfg.grad_accum_steps
                with prof.phase("backward"):
                    loss.backward()
                loss_sum += loss.detach()
            with prof.phase("optimizer"):
                grad_norm = self.optimizer_step()
            prof.step(samples=step_samples, tokens=step_tokens)
            window_tokens += step_tokens
            window_samples += step_samples
            self.global_step += 1
            bar.update(1)
            if self.global_step % cfg.log_every_steps == 0 or self.global_step == stop_at:
                if self.device.type == "cuda":
                    torch.cuda.synchronize(self.device)
                elapsed = time.perf_counter() - window_start
                steps_in_window = (self.global_step - 1) % cfg.log_every_steps + 1
                last_train = self.logger.log("train", self.global_step, {
                    "epoch": round(self.global_step / self.steps_per_epoch, 4),
                    "loss": float(loss_sum), "lr": self.current_lr(), "grad_norm": grad_norm,
                    "tokens_per_s": window_tokens / elapsed, "samples_per_s": window_samples / elapsed,
                    "step_time_s": elapsed / steps_in_window, "peak_mem_gib": peak_memory_gib(self.device),
                    **({"mfu": mfu(window_flops, elapsed, self.peak_tflops)} if self.peak_tflops else {})})
                bar.set_postfix(loss=f"{float(loss_sum):.4f}", lr=f"{self.current_lr():.2e}",
                                tok_s=f"{window_tokens / elapsed:,.0f}")
                window_tokens, window_samples, window_flops, window_start = 0, 0, 0.0, time.perf_counter()
            if self._eval_due():
                self.evaluate_and_checkpoint()
                self.model.train()
                window_start = time.perf_counter()
        bar.close()
        return last_train

    def _eval_due(self) -> bool:
        every = self.cfg.eval_every_steps or self.steps_per_epoch
        return self.global_step % every == 0 and self.global_step < self.total_steps

    # ---- evaluation and saving -----------------------------------------------------------------------
    @torch.no_grad()
    def eval_loss(self, rows: list[dict]) -> float:
        examples = tokenize_rows(self.tokenizer, rows, self.cfg)
        it = BatchIterator(examples, self.cfg.eval_batch_size, self.tokenizer.pad_token_id, seed=0,
                           group_by_length=False)
        self.model.eval()
        total, count = 0.0, 0
        for batch in it.epoch(0):
            batch = self.to_device(batch)
            n = int((batch["labels"] != -100).sum())
            total += float(self.forward_loss(batch)) * n
            count += n
        return total / max(1, count)

    def evaluate(self, rows: list[dict] | None = None) -> tuple[dict, list[dict]]:
        from sumtune.evaluation import evaluate_rows

        cfg = self.cfg
        rows = rows if rows is not None else self.eval_rows[: cfg.eval_max_samples or None]
        with self.progress.task(f"evaluating on {len(rows)} documents"):
            metrics, records = evaluate_rows(
                self.model, self.tokenizer, rows, prefix=cfg.source_prefix, max_source_tokens=cfg.max_source_tokens,
                max_new_tokens=cfg.generation_max_new_tokens, num_beams=cfg.num_beams,
                batch_size=cfg.eval_batch_size)
            metrics["loss"] = self.eval_loss(rows)
        return metrics, records

    def evaluate_and_checkpoint(self) -> dict:
        metrics, _ = self.evaluate()
        record = {"epoch": round(self.global_step / self.steps_per_epoch, 4), **metrics}
        self.logger.log("eval", self.global_step, record)
        self.progress.write(f"step {self.global_step}: eval loss {metrics['loss']:.4f}, "
                            f"ROUGE-L {metrics['rougeL']:.2f}")
        ckpt_root = self.run_dir / "checkpoints"
        self.save_adapter(ckpt_root / f"step-{self.global_step}")
        self._prune_checkpoints(ckpt_root)
        if self.best_score is None or metrics["rougeL"] > self.best_score:
            self.best_score = metrics["rougeL"]
            self.save_adapter(ckpt_root / "best", extra={"step": self.global_step, **metrics})
        return metrics

    def _prune_checkpoints(self, root: Path) -> None:
        steps = sorted((p for p in root.glob("step-*") if p.is_dir()), key=lambda p: int(p.name.split("-")[1]))
        for old in steps[: max(0, len(steps) - self.cfg.keep_last_checkpoints)]:
            shutil.rmtree(old, ignore_errors=True)

    def save_adapter(self, path: Path, extra: dict | None = None) -> None:
        """Write the adapter to a temporary directory, then rename it into place (never half a checkpoint)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        self.model.save_pretrained(tmp)
        if extra:
            (tmp / "checkpoint.json").write_text(json.dumps(extra, indent=2) + "\n", encoding="utf-8")
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            path.rename(old)
            tmp.rename(path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(path)

    def finish(self) -> dict:
        """Final evaluation, then the adapter, predictions and model card at the top of the run directory."""
        from sumtune.evaluation import write_eval
        from sumtune.modelcard import write_model_card

        metrics, records = self.evaluate()
        self.logger.log("eval", self.global_step, {"epoch": round(self.global_step / self.steps_per_epoch, 4),
                                                   **metrics})
        write_eval(self.run_dir / "eval", metrics, records)
        for name in ("adapter_config.json", "adapter_model.safetensors"):
            (self.run_dir / name).unlink(missing_ok=True)
        self.model.save_pretrained(self.run_dir)
        write_model_card(self.run_dir, self.cfg, metrics, self.param_counts)
        from sumtune.plots import write_plots

        write_plots(self.run_dir)
        return metrics

    def cleanup(self) -> None:
        logger = getattr(self, "logger", None)
        if logger is not None:
            logger.close()


def enable_fast_path(model):
    """sumtune's fast T5 kernels when the model is a T5 and the module is available; the stock path otherwise."""
    from transformers.models.t5.modeling_t5 import T5Stack

    from sumtune import fast_t5

    if not any(isinstance(m, T5Stack) for m in model.modules()):
        return model  # other seq2seq models (BART, Pegasus ...) train on transformers' own code
    return fast_t5.enable_fast_t5(model)
