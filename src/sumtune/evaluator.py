"""Evaluation during training: ROUGE of generated summaries and the eval loss, on one process or split over ranks.

Data-parallel: each rank generates for its share of the rows (rank::world) and computes its token-weighted eval
loss; rank 0 puts the predictions back in row order and scores all of them, and every rank gets the metrics (so
`best` checkpoint decisions agree). Predictions are returned on rank 0 only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from sumtune import distributed
from sumtune.batching import Batches, Collator, to_device
from sumtune.config import GenerationSettings
from sumtune.data import tokenize_rows
from sumtune.errors import SumtuneError
from sumtune.evaluation import evaluate_rows, score_predictions
from sumtune.faults import eval_oom_message
from sumtune.train_step import forward_loss

if TYPE_CHECKING:
    from sumtune.config import TrainConfig
    from sumtune.progress import Progress


@dataclass(frozen=True)
class EvalSettings:
    """The settings an evaluation uses (a TrainConfig carries them all: `from_config`)."""

    source_prefix: str
    max_source_tokens: int
    max_target_tokens: int
    generation: GenerationSettings
    batch_size: int
    compute_dtype: str

    @classmethod
    def from_config(cls, cfg: "TrainConfig") -> "EvalSettings":
        return cls(source_prefix=cfg.source_prefix, max_source_tokens=cfg.max_source_tokens,
                   max_target_tokens=cfg.max_target_tokens, generation=GenerationSettings.of(cfg),
                   batch_size=cfg.eval_batch_size, compute_dtype=cfg.compute_dtype)


class Evaluator:
    """`evaluate(rows) -> (metrics, records)`: ROUGE-1/2/L/Lsum, generated length and eval loss of `model`."""

    def __init__(self, model: torch.nn.Module, tokenizer, settings: EvalSettings, *, device: torch.device,
                 dist: distributed.DistContext | None = None, progress: "Progress | None" = None):
        self.model, self.tokenizer, self.settings = model, tokenizer, settings
        self.device = device
        self.dist = dist or distributed.DistContext(device=device)
        self.progress = progress

    def evaluate(self, rows: list[dict]) -> tuple[dict, list[dict]]:
        """Metrics and per-row predictions on `rows`; a CUDA out-of-memory error becomes one SumtuneError sentence."""
        try:
            return self._evaluate(rows)
        except torch.cuda.OutOfMemoryError:
            s = self.settings
            message = eval_oom_message(eval_batch_size=s.batch_size, num_beams=s.generation.num_beams,
                                       max_new_tokens=s.generation.max_new_tokens, source_tokens=s.max_source_tokens,
                                       device=self.device)
        raise SumtuneError(message)  # outside the except block: the OOM traceback (and its tensors) is freed

    def _evaluate(self, rows: list[dict]) -> tuple[dict, list[dict]]:
        s = self.settings
        if self.dist.enabled:
            return self._evaluate_sharded(rows)
        bar = self.progress if self.progress is not None and self.progress.enabled else None
        metrics, records = evaluate_rows(
            self.model, self.tokenizer, rows, prefix=s.source_prefix, max_source_tokens=s.max_source_tokens,
            batch_size=s.batch_size, progress=bar, **s.generation.kwargs())
        total, count = self.loss_sum(rows)
        metrics["loss"] = total / max(1, count)
        return metrics, records

    def _evaluate_sharded(self, rows: list[dict]) -> tuple[dict, list[dict]]:
        from sumtune.generation.summaries import generate_summaries

        s, ctx = self.settings, self.dist
        indices = list(range(ctx.rank, len(rows), ctx.world_size))
        local = [rows[i] for i in indices]
        predictions: list[str] = []
        lengths: list[int] = []
        loss_total, label_tokens = 0.0, 0
        if local:
            predictions, lengths = generate_summaries(
                self.model, self.tokenizer, [r["text"] for r in local], prefix=s.source_prefix,
                max_source_tokens=s.max_source_tokens, batch_size=s.batch_size, **s.generation.kwargs())
            loss_total, label_tokens = self.loss_sum(local)
        parts = distributed.gather_objects((indices, predictions, lengths, loss_total, label_tokens))
        metrics, records = assemble_eval(parts, rows) if ctx.is_main else (None, [])
        return distributed.broadcast_object(metrics), records

    @torch.no_grad()
    def loss_sum(self, rows: list[dict]) -> tuple[float, int]:
        """(sum of per-token losses, label tokens) on `rows`: shards of an evaluation add up exactly."""
        s = self.settings
        examples = tokenize_rows(self.tokenizer, rows, prefix=s.source_prefix, max_source_tokens=s.max_source_tokens,
                                 max_target_tokens=s.max_target_tokens)
        batches = Batches(examples, s.batch_size, Collator(self.tokenizer.pad_token_id), seed=0, shuffle=False)
        was_training = self.model.training
        self.model.eval()
        total, count = 0.0, 0
        try:
            for batch in batches.epoch(0):
                batch = to_device(batch, self.device)
                n = int((batch["labels"] != -100).sum())
                total += float(forward_loss(self.model, batch, device=self.device,
                                            compute_dtype=s.compute_dtype)) * n
                count += n
        finally:
            self.model.train(was_training)
        return total, count


def assemble_eval(parts: list[tuple], rows: list[dict]) -> tuple[dict, list[dict]]:
    """Metrics and records of all rows from the ranks' `(indices, predictions, lengths, loss_total, label_tokens)`.

    Predictions go back to row order; the eval loss is token-weighted over all ranks (as one process computes it).
    """
    by_index = {i: (p, n) for idx, preds, lens, _, _ in parts for i, p, n in zip(idx, preds, lens)}
    if sorted(by_index) != list(range(len(rows))):
        raise RuntimeError(f"evaluation shards cover {len(by_index)} of {len(rows)} rows")
    ordered = [by_index[i] for i in range(len(rows))]
    metrics, records = score_predictions([p for p, _ in ordered], [n for _, n in ordered], rows)
    metrics["loss"] = sum(p[3] for p in parts) / max(1, sum(p[4] for p in parts))
    return metrics, records
