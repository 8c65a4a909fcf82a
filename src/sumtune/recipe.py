"""The QLoRA training recipe: `setup()` → `train()` → `finish()` → `cleanup()`.

The recipe owns a run's lifecycle: the run directory, resume, the loop's schedule (when to log, evaluate,
checkpoint, stop) and the final save. The work itself is done by small parts built in `setup()`, each taking
what it needs explicitly: `sumtune.training` builds the model, batches and THE step (`sumtune.train_step`),
`ThroughputWindow` measures speed, `Evaluator` evaluates, `CheckpointKeeper` keeps checkpoints,
`NonFiniteGuard` stops a run that keeps producing NaN/inf. The profiler is a null object unless a profile was
asked for, so the hot path has no `if profiling` branches.
"""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import torch

from sumtune import argparsing, checkpoint, distributed, faults, rundir, safe_io, training, truncation
from sumtune.checkpoint_keeper import CheckpointKeeper
from sumtune.config import TrainConfig
from sumtune.errors import SumtuneError
from sumtune.evaluator import EvalSettings, Evaluator
from sumtune.flops import measure_bf16_matmul_tflops, mfu_basis, peak_tflops
from sumtune.metrics import MetricsLogger
from sumtune.modeling import check_model_source, count_parameters, resolve_device
from sumtune.optim import get_lr
from sumtune.profiling.profiler import NULL_PROFILER
from sumtune.progress import Progress, eta_step_s
from sumtune.throughput import ThroughputWindow, WindowTotals, peak_memory_gib
from sumtune.train_step import StepResult


def shown_source(source: str | None) -> str:
    """A data or model source as the user should see it: local paths resolved, names as they are."""
    if not source:
        return "-"
    path = Path(source).expanduser()
    return str(path.resolve()) if path.exists() else source


class TrainRecipe:
    def __init__(self, cfg: TrainConfig, profiler=None):
        self.cfg = cfg
        self.user_cfg = cfg  # as given (batch_size may be `auto`); self.cfg becomes the resolved one
        self.profiler = profiler or NULL_PROFILER
        self.global_step = 0
        self.samples_seen = 0  # data position, all ranks together: a resume on any world size starts here
        self.auto_batch_trials: list[dict] = []
        self._claim: rundir.RunDirClaim | None = None
        self._stop = faults.StopRequest()
        self.evals_without_improvement = 0  # for early_stopping_patience
        self.stopped_early = False
        self._last_eval: tuple[int, dict, list[dict]] | None = None  # (step, metrics, records) of the last one

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
        training.seed_everything(cfg.seed)
        self.progress = Progress(enabled=cfg.progress) if self.dist.is_main else distributed.SilentProgress()
        out = Path(cfg.output_dir).expanduser().resolve()
        # Every check that needs no long work comes before anything is written (bad input: nothing half-written).
        if self.dist.is_main:  # checked, then locked for this run before anything is written (rank 0 for the job)
            rundir.check_output_dir(out, overwrite=cfg.overwrite, resume=cfg.resume)
            self._claim = rundir.RunDirClaim(out, overwrite=cfg.overwrite, resume=cfg.resume)
            self._claim.acquire(notify=self.progress.write)
        resume_from, resume_record = None, None
        if cfg.resume:
            resume_from = checkpoint.find_resume_checkpoint(cfg.resume, out, notify=self.progress.write)
            resume_record = checkpoint.check_resume_config(resume_from, self.run_config())
        check_model_source(cfg.model, allow_pickle=cfg.allow_pickle)
        data, self.tokenizer = training.read_inputs(cfg, self.progress)
        self.train_rows, self.eval_rows = data.train, data.eval
        with self.dist.main_process_first():  # only rank 0 creates (or takes over) the run directory
            if self.dist.is_main:
                self._claim.begin()
            self.run_dir = out
        examples = training.tokenize_examples(self.tokenizer, self.train_rows, cfg, self.progress)
        self.truncation = truncation.announce(examples, cfg, write=self.progress.write,  # what the limits cut
                                              run_dir=self.run_dir if self.dist.is_main else None)
        # Before the model: the GEMM's 384 MiB go back to the allocator's cache for the weights to reuse.
        self.matmul_tflops = measure_bf16_matmul_tflops(self.device)
        parts = training.build_parts(cfg, self.tokenizer, examples, dist=self.dist, run_dir=self.run_dir,
                                     resume_record=resume_record, profiler=self.profiler, progress=self.progress)
        self.cfg = cfg = parts.cfg  # `batch_size: auto` → a number
        self.profiler.describe_run(device=self.device.type, matmul_tflops=self.matmul_tflops)
        self.model, self.optimizer, self.batches, self.step = parts.model, parts.optimizer, parts.batches, parts.step
        self.auto_batch_trials = parts.auto_batch_trials
        self.steps_per_epoch = max(1, self.batches.batches_per_epoch() // cfg.grad_accum_steps)
        self.total_steps = cfg.max_steps or max(1, math.ceil(self.steps_per_epoch * cfg.epochs))
        self.evaluator = Evaluator(self.model, self.tokenizer, EvalSettings.from_config(cfg), device=self.device,
                                   dist=self.dist, progress=self.progress)
        self.keeper = CheckpointKeeper(self.run_dir / "checkpoints", keep_last=cfg.keep_last_checkpoints,
                                       writes=self.dist.is_main)
        self.guard = faults.NonFiniteGuard(max_in_a_row=cfg.max_nonfinite_steps, compute_dtype=cfg.compute_dtype,
                                           lr=cfg.lr, notify=self.progress.write)
        self.logger = MetricsLogger(self.run_dir, enabled=self.dist.is_main, report_to=cfg.report_to,
                                    hparams=argparsing.to_mapping(cfg))
        if self.dist.is_main:
            argparsing.write_yaml(replace(self.user_cfg, resume=None), self.run_dir / "config.yaml")
            with safe_io.files_replaced_atomically(self.run_dir) as tmp:
                self.tokenizer.save_pretrained(tmp)
        total, trainable = count_parameters(self.model)
        self.param_counts = {"total": total, "trainable": trainable}
        self.peak_tflops = peak_tflops(self.device)
        self._captures_logged = (0, 0.0, 0.0)  # CUDA-graph captures (and their seconds) already in a log line
        self.progress.write(
            f"sumtune: {cfg.model} ({cfg.quantization}, {cfg.compute_dtype}) on {self.device}; "
            f"{trainable:,} trainable of {total:,} parameters ({100 * trainable / total:.2f}%); "
            f"{len(self.train_rows)} train / {len(self.eval_rows)} eval rows; {self.total_steps} steps of "
            f"{distributed.describe_batch(cfg.batch_size, cfg.grad_accum_steps, self.dist.world_size)}.")
        basis = mfu_basis(torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else None,
                          self.peak_tflops, self.matmul_tflops)
        if basis:
            self.progress.write(basis)
        self.progress.write(f"sumtune: run directory {self.run_dir}; data {shown_source(cfg.dataset)}"
                            + (f" (eval: {shown_source(cfg.eval_dataset)})" if cfg.eval_dataset else "")
                            + f"; model {shown_source(cfg.model)}.")
        if resume_from is not None:
            self._restore(resume_from)  # last: it puts back the RNG states of the checkpoint's step

    def _restore(self, path: Path) -> None:
        """Continue from a checkpoint: weights, optimizer, RNG, data position; metrics cut back to its step."""
        state = checkpoint.load_checkpoint(path, model=self.model, optimizer=self.optimizer)
        self.global_step, self.samples_seen = state.step, state.samples_seen
        self.keeper.resumed(path, state)
        self.guard.skipped_total = state.nonfinite_skipped
        self.logger.rewind(state.metrics_bytes, state.step)  # the lines after the checkpoint are redone
        if state.best_step is not None:  # early stopping's count goes on from the evaluations logged since the best
            from sumtune.metrics import read_metrics

            self.evals_without_improvement = sum(1 for r in read_metrics(self.run_dir)
                                                 if r.get("split") == "eval" and r.get("step", 0) > state.best_step)
        self.progress.write(f"sumtune: resuming from {path} at step {state.step} of {self.total_steps}.")

    def current_lr(self) -> float:
        return get_lr(self.global_step, peak_lr=self.cfg.lr, warmup_steps=self.cfg.warmup_steps,
                      total_steps=self.total_steps, schedule=self.cfg.lr_schedule)

    # ---- the loop ----------------------------------------------------------------------------------
    def train(self, max_steps: int | None = None) -> dict:
        """Train to `max_steps` (or the configured end); returns the last train log record. SIGTERM/SIGINT end it
        after a checkpoint (`faults.TrainingInterrupted`, exit status 143/130); a CUDA OOM becomes one
        `SumtuneError` sentence."""
        self._stop = faults.StopRequest(notify=self.progress.write)
        try:
            with self._stop:
                return self._train_loop(max_steps)
        except torch.cuda.OutOfMemoryError:
            documents, source_tokens, target_tokens = self.step.last_batch_shape
            message = faults.oom_message(
                where=f"in training step {self.global_step + 1}", micro_batch=documents,
                source_tokens=source_tokens, target_tokens=target_tokens,
                grad_accum_steps=self.cfg.grad_accum_steps, device=self.device)
        raise SumtuneError(message)  # outside the except block: the OOM traceback (and its tensors) is freed

    def _train_loop(self, max_steps: int | None = None) -> dict:
        cfg = self.cfg
        stop_at = min(self.total_steps, max_steps) if max_steps else self.total_steps
        self.model.train()
        stream = self.batches.stream(start_sample=self.samples_seen)
        bar = self.progress.bar(total=stop_at, desc="training", initial=self.global_step)
        window = ThroughputWindow.for_device(self.device)
        last_train: dict = {}
        while self.global_step < stop_at:
            result = self.step(self.step.draw(stream, cfg.grad_accum_steps), lr=self.current_lr(), stop=self._stop)
            self.samples_seen = self.batches.samples_seen
            window.add(result.samples, result.tokens, result.flops)
            self.guard.check(self.global_step + 1, result.loss, result.grad_norm, self.keeper.last)
            if result.grad_norm is None:  # NaN/inf loss or gradient: no update, no step counted
                self._stop_if_requested(result)
                continue
            self.global_step += 1
            bar.update(1)
            if self.global_step % cfg.log_every_steps == 0 or self.global_step == stop_at:
                totals = window.close()
                last_train = self._log_train(result, totals)
                eta_s = (stop_at - self.global_step) * eta_step_s(last_train, totals.steps)  # training steps only
                self.progress.train_log(last_train, bar, stop_at, eta_s)
            if self._eval_due():
                with window.paused():  # evaluation and checkpoints are not training time
                    self.evaluate_and_checkpoint()
                self.model.train()
                if self._early_stop_due():
                    self._stop_early()
                    break
            elif self._checkpoint_due(stop_at):
                with window.paused():
                    self.save_checkpoint()
            self._stop_if_requested(result)
        bar.close()
        return last_train

    def _log_train(self, result: StepResult, window: WindowTotals) -> dict:
        """One train line: the last step's loss and gradient norm, the window's speed (all ranks together)."""
        loss, tokens, samples = distributed.reduce_for_log(self.dist, result.loss, window.tokens, window.samples)
        rates = replace(window, tokens=tokens, samples=samples).rates(self.peak_tflops, self.matmul_tflops)
        mfus = {key: rates.pop(key) for key in ("mfu", "mfu_measured") if key in rates}  # this GPU's FLOPs: per GPU
        return self.logger.log("train", self.global_step, {
            "epoch": round(self.global_step / self.steps_per_epoch, 4), "loss": loss, "lr": self.current_lr(),
            "grad_norm": result.grad_norm, **rates, "peak_mem_gib": peak_memory_gib(self.device), **mfus,
            **self._new_graph_captures()})

    def _new_graph_captures(self) -> dict[str, float]:
        """Batch shapes captured in CUDA graphs since the last log line (with graphs on), and the host seconds they
        took: `graph_warm_up_s` (the eager warm-up, until its work is done) and `graph_record_s` (the capture).
        A window holding some is slower than the steady ones: the line says so, and by how much."""
        graphed = self.step.graphed
        if graphed is None:
            return {}
        now = (graphed.captures, graphed.warm_up_s, graphed.record_s)
        new = [a - b for a, b in zip(now, self._captures_logged)]
        self._captures_logged = now
        return {"graph_captures": new[0], "graph_warm_up_s": new[1], "graph_record_s": new[2]}

    def _early_stop_due(self) -> bool:
        patience = self.cfg.early_stopping_patience
        return patience is not None and self.evals_without_improvement >= patience

    def _stop_early(self) -> None:
        """Patience ran out: say so (log line and metrics.jsonl); `finish()` then saves the run as usual."""
        self.stopped_early = True
        best, best_step = self.keeper.best_score, self.keeper.best_step
        self.logger.log("early_stop", self.global_step, {"patience": self.cfg.early_stopping_patience,
                                                         "best_rougeL": best, "best_step": best_step})
        self.progress.write(f"sumtune: stopping early at step {self.global_step} of {self.total_steps}: ROUGE-L has "
                            f"not improved for {self.evals_without_improvement} evaluations (best {best:.2f} at "
                            f"step {best_step}; early_stopping_patience {self.cfg.early_stopping_patience}).")

    def _checkpoint_due(self, stop_at: int) -> bool:
        every = self.cfg.checkpoint_every_steps or self.cfg.eval_every_steps or self.steps_per_epoch
        return self.global_step % every == 0 or self.global_step == stop_at

    def _eval_due(self) -> bool:
        every = self.cfg.eval_every_steps or self.steps_per_epoch
        return self.global_step % every == 0 and self.global_step < self.total_steps

    def _stop_if_requested(self, result: StepResult) -> None:
        """After a SIGTERM/SIGINT: checkpoint this step boundary (unless just done) and leave the loop."""
        # Data-parallel: every rank stops at the same step, on the request all ranks agreed on in this step's
        # sync (max over ranks: a signal to any one process stops the job). One process: the flag as it is now.
        signum = result.stop_signum if self.dist.enabled else self._stop.signum
        if signum is None:
            return
        done = self.keeper.is_current(self.global_step, self.samples_seen)
        path = self.keeper.last if done else self.save_checkpoint()
        self.progress.write(faults.interrupted_message(signum, path, self.global_step))
        raise faults.TrainingInterrupted(signum, path)

    # ---- evaluation and saving -----------------------------------------------------------------------
    def evaluate(self, rows: list[dict] | None = None) -> tuple[dict, list[dict]]:
        """ROUGE and loss on `rows` (default: the held-out rows, at most `eval_max_samples`)."""
        rows = rows if rows is not None else self.eval_rows[: self.cfg.eval_max_samples or None]
        processes = f" ({self.dist.world_size} processes)" if self.dist.enabled else ""
        self.step.release_graphs()  # generation needs the memory the captured training graphs hold
        with self.progress.task(f"evaluating on {len(rows)} documents{processes}"):
            return self.evaluator.evaluate(rows)

    def _log_eval(self, metrics: dict) -> None:
        self.logger.log("eval", self.global_step, {"epoch": round(self.global_step / self.steps_per_epoch, 4),
                                                   **metrics})

    def evaluate_and_checkpoint(self) -> dict:
        metrics, records = self.evaluate()
        self._last_eval = (self.global_step, metrics, records)
        self._log_eval(metrics)
        self.progress.write(f"step {self.global_step}: eval loss {metrics['loss']:.4f}, "
                            f"ROUGE-L {metrics['rougeL']:.2f}")
        improved = self.keeper.note_score(metrics["rougeL"], self.global_step)
        self.evals_without_improvement = 0 if improved else self.evals_without_improvement + 1
        path = self.save_checkpoint()
        if improved and path is not None:
            self.keeper.keep_as_best(path, {"step": self.global_step, **metrics})
        return metrics

    def save_checkpoint(self) -> Path | None:
        """The full training state at this step boundary → checkpoints/step-N (rank 0 writes; None elsewhere)."""
        state = checkpoint.TrainerState(
            step=self.global_step, samples_seen=self.samples_seen, micro_batch_size=self.cfg.batch_size,
            grad_accum_steps=self.cfg.grad_accum_steps, best_score=self.keeper.best_score,
            best_step=self.keeper.best_step, nonfinite_skipped=self.guard.skipped_total,
            metrics_bytes=self.logger.path.stat().st_size if self.logger.path.is_file() else 0,
            config=self.run_config(), ds_gemm_held_off=training.ds_gemm_held_off())
        return self.keeper.save(model=self.model, optimizer=self.optimizer, state=state)

    def finish(self) -> dict:
        """Final evaluation, then the adapter, predictions and model card at the top of the run directory."""
        from sumtune.evaluation import write_eval
        from sumtune.modelcard import write_model_card
        from sumtune.plots import write_plots

        if self._last_eval is not None and self._last_eval[0] == self.global_step:  # stopped early: just evaluated
            _, metrics, records = self._last_eval
            improved = self.keeper.best_step == self.global_step
        else:
            metrics, records = self.evaluate()
            self._log_eval(metrics)
            improved = self.keeper.note_score(metrics["rougeL"], self.global_step)
        metrics["heldout_rows"] = len(self.eval_rows)  # num_samples below it: the final score is on a subset
        if not self.dist.is_main:  # rank 0 writes the run directory
            return metrics
        if improved:  # the last step's checkpoint (when there is one) is the best
            self.keeper.keep_as_best(self.keeper.root / f"step-{self.global_step}",
                                     {"step": self.global_step, **metrics})
        write_eval(self.run_dir / "eval", metrics, records)
        checkpoint.save_adapter(self.model, self.run_dir)  # replaced by renames: never a moment without one
        write_model_card(self.run_dir, self.cfg, metrics, self.param_counts,
                         model_type=getattr(getattr(self.model, "config", None), "model_type", None))
        write_plots(self.run_dir)
        return metrics

    def cleanup(self) -> None:
        self._stop.restore()  # the signal handlers of `train()`, should it have been left without its own cleanup
        logger = getattr(self, "logger", None)
        if logger is not None:
            logger.close()
        # Free the DDP wrapper (its reducer holds the process group) before the group goes: a gloo group torn down
        # later, from the reducer's destructor, can deadlock on the GIL with its worker thread (seen in CI).
        step = getattr(self, "step", None)
        if step is not None:
            step.release_graphs()  # a Python caller's process keeps running: hand the graphs' memory pool back
            step.train_model = None
        distributed.shutdown()
        if self._claim is not None:
            self._claim.release()
