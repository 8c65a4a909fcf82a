"""The QLoRA training recipe: `setup()` → `train()` → `cleanup()`.

One readable loop; everything it needs is built in `setup()`. The profiler is a null object unless a profile
was asked for, so the hot path has no `if profiling` branches.
"""

from __future__ import annotations

import math
import time
from dataclasses import replace
from pathlib import Path

import torch

from sumtune import argparsing, checkpoint, distributed, faults, truncation
from sumtune.config import TrainConfig
from sumtune.data import BatchIterator, clip_chars, load_rows, tokenize_rows
from sumtune.errors import SumtuneError
from sumtune.flops import mfu, peak_tflops, train_flops_per_sample
from sumtune.metrics import MetricsLogger
from sumtune.modeling import count_parameters, load_tokenizer, resolve_device
from sumtune.optim import build_optimizer, get_lr, set_lr
from sumtune.progress import Progress
from sumtune.runtime import (autocast, describe_source, enable_fast_path, materialize_tiny_base, peak_memory_gib,
                             seed_everything, tiny_base_dir)

class TrainRecipe:
    def __init__(self, cfg: TrainConfig, profiler=None):
        from sumtune.profiling import NULL_PROFILER

        self.cfg = cfg
        self.profiler = profiler or NULL_PROFILER
        self.global_step = 0
        self.epoch = 0
        self.samples_seen = 0  # data position, all ranks together: a resume on any world size starts here
        self.best_score: float | None = None
        self.user_cfg = cfg  # as given (batch_size may be `auto`); self.cfg becomes the resolved one
        self.best_step: int | None = None
        self.nonfinite_in_a_row = self.nonfinite_skipped = 0
        self.last_checkpoint: Path | None = None
        self._checkpointed_samples = -1
        self.resume_from: Path | None = None
        self.auto_batch_trials: list[dict] = []
        self._claim: checkpoint.RunDirClaim | None = None
        self._stop = faults.StopRequest()
        self._agreed_signum: int | None = None  # data-parallel: the ranks' stop request, agreed on each step
        self._batch_shape = (0, 0, 0)  # (documents, source tokens, target tokens) of the latest micro-batch

    # ---- setup -------------------------------------------------------------------------------------
    def setup(self) -> None:
        """Build everything; if any of it fails, the output directory is left as it was (nothing half-written)."""
        try:
            self._setup()
        except BaseException:
            if self._claim is not None:
                self._claim.rollback()
            raise
        if self._claim is not None:
            self._claim.commit()

    def run_config(self) -> dict:
        """The user's config as saved in checkpoints and compared on resume."""
        return checkpoint.normalized_config(argparsing.to_mapping(self.user_cfg))

    def _setup(self) -> None:
        cfg = self.cfg
        self.dist = distributed.init_distributed(resolve_device(cfg.device))  # one process: a no-op context
        self.device = self.dist.device
        seed_everything(cfg.seed)
        self.progress = Progress(enabled=cfg.progress) if self.dist.is_main else distributed.SilentProgress()
        out = Path(cfg.output_dir).expanduser().resolve()
        # Every check that needs no long work comes before anything is written (bad input: nothing half-written).
        checkpoint.check_output_dir(out, overwrite=cfg.overwrite, resume=cfg.resume)
        if cfg.resume:
            self.resume_from = checkpoint.find_resume_checkpoint(cfg.resume, out)
            self.resume_record = checkpoint.check_resume_config(self.resume_from, self.run_config())
        from sumtune.modeling import check_model_source

        check_model_source(cfg)
        with self.progress.task("reading data"):
            data = load_rows(cfg)
        self.train_rows, self.eval_rows = data.train, data.eval
        if data.skipped_empty:
            self.progress.write(f"Skipped {data.skipped_empty} row(s) with an empty text or summary.")
        # (a word vocabulary for random models is built from the text the model can see: clipped like the inputs)
        self.tokenizer = load_tokenizer(cfg, [t + " " + s for t, s in zip(
            clip_chars([r["text"] for r in data.train], cfg.max_source_tokens),
            clip_chars([r["summary"] for r in data.train], cfg.max_target_tokens))])
        with self.dist.main_process_first():  # only rank 0 creates (or takes over) the run directory
            if self.dist.is_main:
                self._claim = checkpoint.RunDirClaim(out, overwrite=cfg.overwrite)
                self._claim.begin()
            self.run_dir = out
        self.model = self._build_model()
        examples = self.progress.map_chunks(lambda chunk: tokenize_rows(self.tokenizer, chunk, cfg),
                                            self.train_rows, desc="tokenizing")
        self.truncation = truncation.announce(examples, cfg, write=self.progress.write,  # what the limits cut
                                              run_dir=self.run_dir if self.dist.is_main else None)
        self.cfg = cfg = self._resolve_batch_size(cfg, examples)  # `batch_size: auto` → a number
        self.batches = BatchIterator(examples, cfg.batch_size, self.tokenizer.pad_token_id, seed=cfg.seed,
                                     group_by_length=cfg.group_by_length, num_workers=cfg.num_workers,
                                     pin_memory=cfg.pin_memory and self.device.type == "cuda")
        # This rank's slice of global batches of batch_size × world; position counted in samples seen.
        self.batches = distributed.shard_batches(self.batches, self.dist.rank, self.dist.world_size)
        micro_per_epoch = self.batches.batches_per_epoch()
        self.steps_per_epoch = max(1, micro_per_epoch // cfg.grad_accum_steps)
        self.total_steps = cfg.max_steps or max(1, math.ceil(self.steps_per_epoch * cfg.epochs))
        self.optimizer = build_optimizer(cfg.optimizer, (p for p in self.model.parameters() if p.requires_grad),
                                         lr=cfg.lr, weight_decay=cfg.weight_decay, device=self.device)
        self.train_model = distributed.wrap_model(self.model, self.dist)  # DDP over the adapter when distributed
        self.logger = MetricsLogger(self.run_dir, enabled=self.dist.is_main)
        if self.dist.is_main:
            argparsing.write_yaml(replace(self.user_cfg, resume=None), self.run_dir / "config.yaml")
            self.tokenizer.save_pretrained(self.run_dir)
        total, trainable = count_parameters(self.model)
        self.param_counts = {"total": total, "trainable": trainable}
        self.peak_tflops = peak_tflops(self.device)
        self.flops_per_sample = self.batch_flops_for(cfg.max_source_tokens, cfg.max_target_tokens)
        self.progress.write(
            f"sumtune: {cfg.model} ({cfg.quantization}, {cfg.compute_dtype}) on {self.device}; "
            f"{trainable:,} trainable of {total:,} parameters ({100 * trainable / total:.2f}%); "
            f"{len(self.train_rows)} train / {len(self.eval_rows)} eval rows; {self.total_steps} steps of "
            f"{distributed.describe_batch(cfg.batch_size, cfg.grad_accum_steps, self.dist.world_size)}.")
        self.progress.write(f"sumtune: run directory {self.run_dir}; data {describe_source(cfg.dataset)}"
                            + (f" (eval: {describe_source(cfg.eval_dataset)})" if cfg.eval_dataset else "")
                            + f"; model {describe_source(cfg.model)}.")
        if self.resume_from is not None:
            self._restore(self.resume_from)  # last: it puts back the RNG states of the checkpoint's step

    def _resolve_batch_size(self, cfg: TrainConfig, examples: list) -> TrainConfig:
        """The config with a numeric micro-batch: a resumed run's own, or the largest that fits the GPU."""
        if cfg.batch_size != "auto":
            return cfg
        samples = cfg.effective_batch_size
        if self.resume_from is not None:
            micro, accum = self.resume_record["micro_batch_size"], self.resume_record["grad_accum_steps"]
        elif self.device.type != "cuda":
            micro, accum = samples, 1  # no GPU memory to measure: host memory is rarely the limit at CPU speeds
        else:
            micro, self.auto_batch_trials = faults.find_micro_batch(self, samples, examples)
            micro = distributed.min_over_ranks(micro, self.device)  # all ranks agree (a divisor still)
            accum = samples // micro
        self.progress.write(f"sumtune: batch_size auto → micro-batch {micro} × {accum} accumulation "
                            f"({samples} samples per step).")
        return replace(cfg, batch_size=micro, grad_accum_steps=accum)

    def _restore(self, path: Path) -> None:
        """Continue from a checkpoint: weights, optimizer, RNG, data position; metrics cut back to its step."""
        state = checkpoint.load_checkpoint(path, model=self.model, optimizer=self.optimizer)
        self.global_step, self.samples_seen = state.step, state.samples_seen
        self.best_score, self.best_step = state.best_score, state.best_step
        self.nonfinite_skipped = state.nonfinite_skipped
        self.last_checkpoint, self._checkpointed_samples = path, state.samples_seen
        if self.dist.is_main:
            checkpoint.rewind_metrics(self.logger, state)  # the lines after the checkpoint are redone by this run
        self.progress.write(f"sumtune: resuming from {path} at step {state.step} of {self.total_steps}.")

    def _build_model(self):
        from sumtune.lora import apply_lora
        from sumtune.modeling import load_model

        cfg = self.cfg
        model_cfg = cfg
        if cfg.model == "tiny":
            with self.dist.main_process_first():  # rank 0 writes the tiny base, the others load it
                path = materialize_tiny_base(cfg, self.tokenizer, self.run_dir) if self.dist.is_main else \
                    str(tiny_base_dir(self.run_dir))
            model_cfg = replace(cfg, model=path)
        with self.progress.task(f"loading and quantizing {cfg.model}"):
            base = load_model(model_cfg, vocab_size=len(self.tokenizer), device=self.device)
        if cfg.gradient_checkpointing:
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model = apply_lora(base, cfg).to(self.device)
        if cfg.fast_kernels:
            model = enable_fast_path(model)
        from sumtune import fast_t5

        if cfg.cache_dequantized_weights:
            fast_t5.cache_dequantized_weights(model)
        if cfg.compile and self.device.type == "cuda":
            model = fast_t5.compile_for_training(model)
        return model

    def to_device(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}

    # ---- one step ----------------------------------------------------------------------------------
    def forward_loss(self, batch: dict[str, torch.Tensor], model=None) -> torch.Tensor:
        with autocast(self.device, self.cfg.compute_dtype):
            loss = (model or self.model)(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                         labels=batch["labels"]).loss
        # Data-parallel batches carry this rank's label-token share ×W (sumtune.distributed.ShardedBatches).
        return loss * batch["loss_scale"] if "loss_scale" in batch else loss

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
        """Endless stream of this rank's micro-batches, from sample `self.samples_seen` on, epoch by epoch.

        Each DataLoader iterator draws a seed from torch's global generator; a resumed run creates one where the
        uninterrupted run did not, so the draw is undone: data loading never shifts the dropout masks.
        """
        stream = self.batches.stream(start_sample=self.samples_seen)
        while True:
            rng = torch.get_rng_state()
            batch = next(stream)
            torch.set_rng_state(rng)
            yield batch

    # ---- the loop ----------------------------------------------------------------------------------
    def train(self, max_steps: int | None = None) -> dict:
        """Train to `max_steps` (or the configured end). SIGTERM/SIGINT end it after a checkpoint
        (`faults.TrainingInterrupted`, exit status 143/130); a CUDA OOM becomes one `SumtuneError` sentence."""
        self._stop = faults.StopRequest(notify=self.progress.write)
        self._agreed_signum = None
        try:
            with self._stop:
                return self._train_loop(max_steps)
        except torch.cuda.OutOfMemoryError:
            documents, source_tokens, target_tokens = self._batch_shape
            message = faults.oom_message(
                where=f"in training step {self.global_step + 1}", micro_batch=documents,
                source_tokens=source_tokens, target_tokens=target_tokens,
                grad_accum_steps=self.cfg.grad_accum_steps, device=self.device)
        raise SumtuneError(message)  # outside the except block: the OOM traceback (and its tensors) is freed

    def _train_loop(self, max_steps: int | None = None) -> dict:
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
            for micro in range(cfg.grad_accum_steps):
                with prof.phase("data"):
                    batch = next(stream)
                step_tokens += int(self._tokens(batch))  # counted on the host batch: no GPU sync
                step_samples += batch["input_ids"].shape[0]
                self._batch_shape = (batch["input_ids"].shape[0], batch["input_ids"].shape[1], batch["labels"].shape[1])
                window_flops += self.batch_flops(batch)
                with prof.phase("h2d"):
                    batch = self.to_device(batch)
                distributed.set_grad_sync(self.train_model, micro == cfg.grad_accum_steps - 1)  # DDP: last only
                with prof.phase("forward"):
                    loss = self.forward_loss(batch, self.train_model) / cfg.grad_accum_steps
                with prof.phase("backward"):
                    loss.backward()
                loss_sum += loss.detach()
            with prof.phase("optimizer"):
                grad_norm = self.guarded_optimizer_step(loss_sum)
            prof.step(samples=step_samples, tokens=step_tokens)
            self.samples_seen = self.batches.samples_seen
            if grad_norm is None:  # NaN/inf loss or gradient: no update, no step counted
                self._stop_if_requested()
                continue
            window_tokens += step_tokens
            window_samples += step_samples
            self.global_step += 1
            bar.update(1)
            if self.global_step % cfg.log_every_steps == 0 or self.global_step == stop_at:
                if self.device.type == "cuda":
                    torch.cuda.synchronize(self.device)
                elapsed = time.perf_counter() - window_start
                loss_value, window_tokens, window_samples = distributed.reduce_for_log(  # all ranks' totals
                    self.dist, loss_sum, window_tokens, window_samples)
                steps_in_window = (self.global_step - 1) % cfg.log_every_steps + 1
                last_train = self.logger.log("train", self.global_step, {
                    "epoch": round(self.global_step / self.steps_per_epoch, 4),
                    "loss": loss_value, "lr": self.current_lr(), "grad_norm": grad_norm,
                    "tokens_per_s": window_tokens / elapsed, "samples_per_s": window_samples / elapsed,
                    "step_time_s": elapsed / steps_in_window, "peak_mem_gib": peak_memory_gib(self.device),
                    **({"mfu": mfu(window_flops, elapsed, self.peak_tflops)} if self.peak_tflops else {})})
                bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{self.current_lr():.2e}",
                                tok_s=f"{window_tokens / elapsed:,.0f}")
                window_tokens, window_samples, window_flops, window_start = 0, 0, 0.0, time.perf_counter()
            if self._eval_due():
                self.evaluate_and_checkpoint()
                self.model.train()
                window_start = time.perf_counter()
            elif self._checkpoint_due(stop_at):
                self.save_checkpoint()
                window_start = time.perf_counter()
            self._stop_if_requested()
        bar.close()
        return last_train

    def guarded_optimizer_step(self, loss_sum: torch.Tensor) -> float | None:
        """Clip and step; returns the gradient norm, or None when the loss or the norm is NaN/inf.

        A non-finite step is skipped (gradients dropped, no update) and counted; `max_nonfinite_steps` in a row
        stop the run with a SumtuneError naming the likely cause. One host sync per step, as before.
        """
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        grad_norm = torch.nn.utils.clip_grad_norm_(params, self.cfg.max_grad_norm or float("inf"))
        checks = [loss_sum.detach().float(), grad_norm.detach().float()]
        if self.dist.enabled:  # the ranks' stop requests ride on this sync: no second host round trip per step
            checks.append(distributed.max_over_ranks_on_device(self._stop.signum or 0, self.device))
        loss_value, norm_value, *agreed = torch.stack(checks).tolist()
        if agreed:
            self._agreed_signum = int(agreed[0]) or None
        if math.isfinite(loss_value) and math.isfinite(norm_value):
            self.nonfinite_in_a_row = 0
            set_lr(self.optimizer, self.current_lr())
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            return norm_value
        self.optimizer.zero_grad(set_to_none=True)
        self.nonfinite_in_a_row += 1
        self.nonfinite_skipped += 1
        self.progress.write(f"step {self.global_step + 1}: loss {loss_value}, gradient norm {norm_value}: update "
                            f"skipped ({self.nonfinite_in_a_row} in a row, {self.nonfinite_skipped} in total).")
        if self.nonfinite_in_a_row >= self.cfg.max_nonfinite_steps:
            raise SumtuneError(faults.nonfinite_message(
                steps_in_a_row=self.nonfinite_in_a_row, compute_dtype=self.cfg.compute_dtype, lr=self.cfg.lr,
                last_checkpoint=self.last_checkpoint))
        return None

    def _checkpoint_due(self, stop_at: int) -> bool:
        every = self.cfg.checkpoint_every_steps or self.cfg.eval_every_steps or self.steps_per_epoch
        return self.global_step % every == 0 or self.global_step == stop_at

    def _stop_if_requested(self) -> None:
        """After a SIGTERM/SIGINT: checkpoint this step boundary (unless just done) and leave the loop."""
        # Data-parallel: every rank stops at the same step, on the request all ranks agreed on in this step's
        # optimizer sync (max over ranks: a signal to any one process stops the job).
        signum = self._agreed_signum if self.dist.enabled else self._stop.signum
        if signum is None:
            return
        done = self.last_checkpoint is not None and self.last_checkpoint.name == f"step-{self.global_step}" \
            and self._checkpointed_samples == self.samples_seen
        path = self.last_checkpoint if done else self.save_checkpoint()
        self.progress.write(faults.interrupted_message(signum, path, self.global_step))
        raise faults.TrainingInterrupted(signum, path)

    def _eval_due(self) -> bool:
        every = self.cfg.eval_every_steps or self.steps_per_epoch
        return self.global_step % every == 0 and self.global_step < self.total_steps

    # ---- evaluation and saving -----------------------------------------------------------------------
    @torch.no_grad()
    def eval_loss(self, rows: list[dict]) -> float:
        total, count = self.eval_loss_sum(rows)
        return total / max(1, count)

    def eval_loss_sum(self, rows: list[dict]) -> tuple[float, int]:
        """(sum of per-token losses, label tokens) on `rows`: shards of an evaluation add up exactly."""
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
        return total, count

    def evaluate(self, rows: list[dict] | None = None) -> tuple[dict, list[dict]]:
        """ROUGE and loss on `rows` (default: the held-out rows); a CUDA OOM becomes one SumtuneError sentence."""
        try:
            return self._evaluate(rows)
        except torch.cuda.OutOfMemoryError:
            message = faults.eval_oom_message(
                eval_batch_size=self.cfg.eval_batch_size, num_beams=self.cfg.num_beams,
                max_new_tokens=self.cfg.generation_max_new_tokens, source_tokens=self.cfg.max_source_tokens,
                device=self.device)
        raise SumtuneError(message)

    def _evaluate(self, rows: list[dict] | None = None) -> tuple[dict, list[dict]]:
        from sumtune.evaluation import evaluate_rows

        cfg = self.cfg
        rows = rows if rows is not None else self.eval_rows[: cfg.eval_max_samples or None]
        if self.dist.enabled:  # each rank generates for its share; rank 0 scores, all get the metrics
            with self.progress.task(f"evaluating on {len(rows)} documents ({self.dist.world_size} processes)"):
                return distributed.evaluate_sharded(self, rows)
        with self.progress.task(f"evaluating on {len(rows)} documents"):
            metrics, records = evaluate_rows(
                self.model, self.tokenizer, rows, prefix=cfg.source_prefix, max_source_tokens=cfg.max_source_tokens,
                max_new_tokens=cfg.generation_max_new_tokens, num_beams=cfg.num_beams,
                batch_size=cfg.eval_batch_size, progress=self.progress if self.progress.enabled else None)
            metrics["loss"] = self.eval_loss(rows)
        return metrics, records

    def evaluate_and_checkpoint(self) -> dict:
        metrics, _ = self.evaluate()
        record = {"epoch": round(self.global_step / self.steps_per_epoch, 4), **metrics}
        self.logger.log("eval", self.global_step, record)
        self.progress.write(f"step {self.global_step}: eval loss {metrics['loss']:.4f}, "
                            f"ROUGE-L {metrics['rougeL']:.2f}")
        improved = self._note_score(metrics)
        path = self.save_checkpoint()
        if improved and path is not None:
            checkpoint.copy_checkpoint(path, path.parent / "best", extra={"step": self.global_step, **metrics})
        return metrics

    def _note_score(self, metrics: dict) -> bool:
        improved = self.best_score is None or metrics["rougeL"] > self.best_score
        if improved:
            self.best_score, self.best_step = metrics["rougeL"], self.global_step
        return improved

    def save_checkpoint(self) -> Path | None:
        """The full training state at this step boundary → checkpoints/step-N (atomically); old ones pruned."""
        self._checkpointed_samples = self.samples_seen
        if not self.dist.is_main:  # rank 0 writes for the job (every rank holds the same adapter and optimizer)
            return None
        root = self.run_dir / "checkpoints"
        state = checkpoint.TrainerState(
            step=self.global_step, samples_seen=self.samples_seen, micro_batch_size=self.cfg.batch_size,
            grad_accum_steps=self.cfg.grad_accum_steps, best_score=self.best_score, best_step=self.best_step,
            nonfinite_skipped=self.nonfinite_skipped,
            metrics_bytes=self.logger.path.stat().st_size if self.logger.path.is_file() else 0,
            config=self.run_config())
        path = checkpoint.save_checkpoint(root / f"step-{self.global_step}", model=self.model,
                                          optimizer=self.optimizer, state=state)
        checkpoint.prune_checkpoints(root, self.cfg.keep_last_checkpoints)
        self.last_checkpoint = path
        return path

    def finish(self) -> dict:
        """Final evaluation, then the adapter, predictions and model card at the top of the run directory."""
        from sumtune.evaluation import write_eval
        from sumtune.modelcard import write_model_card

        metrics, records = self.evaluate()
        self.logger.log("eval", self.global_step, {"epoch": round(self.global_step / self.steps_per_epoch, 4),
                                                   **metrics})
        improved = self._note_score(metrics)
        if not self.dist.is_main:  # rank 0 writes the run directory
            return metrics
        final = self.run_dir / "checkpoints" / f"step-{self.global_step}"
        if improved and (final / checkpoint.STATE_FILE).is_file():  # the last step's checkpoint is the best
            checkpoint.copy_checkpoint(final, final.parent / "best", extra={"step": self.global_step, **metrics})
        write_eval(self.run_dir / "eval", metrics, records)
        for name in ("adapter_config.json", "adapter_model.safetensors"):
            (self.run_dir / name).unlink(missing_ok=True)
        self.model.save_pretrained(self.run_dir)
        write_model_card(self.run_dir, self.cfg, metrics, self.param_counts)
        from sumtune.plots import write_plots

        write_plots(self.run_dir)
        return metrics

    def cleanup(self) -> None:
        self._stop.restore()  # the signal handlers of `train()`, should it have been left without its own cleanup
        logger = getattr(self, "logger", None)
        if logger is not None:
            logger.close()
        # Free the DDP wrapper (its reducer holds the process group) before the group goes: a gloo group torn down
        # later, from the reducer's destructor, can deadlock on the GIL with its worker thread (seen in CI).
        self.train_model = None
        distributed.shutdown()
