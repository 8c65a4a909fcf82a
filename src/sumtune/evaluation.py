"""Score summaries with ROUGE (rouge_score, stemming): held-out rows in, metrics and per-row records out."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Sequence

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL", "rougeLsum")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def split_sentences(text: str) -> str:
    """rougeLsum scores sentence by sentence, separated by newlines (a regex splitter: no nltk download)."""
    return "\n".join(s for s in _SENTENCE_END.split(text.strip()) if s)


def rouge_scores(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """Mean ROUGE F-measures ×100 over the pairs, as `rouge_score` computes them with the Porter stemmer."""
    from rouge_score import rouge_scorer

    if len(predictions) != len(references):
        raise ValueError("predictions and references differ in length")
    scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=True)
    totals = dict.fromkeys(ROUGE_TYPES, 0.0)
    for pred, ref in zip(predictions, references):
        scores = scorer.score(split_sentences(ref), split_sentences(pred))
        for key in ROUGE_TYPES:
            totals[key] += scores[key].fmeasure
    n = max(1, len(predictions))
    return {key: 100.0 * total / n for key, total in totals.items()}


def evaluate_rows(model, tokenizer, rows: Sequence[dict], *, prefix: str, max_source_tokens: int,
                  max_new_tokens: int, num_beams: int = 1, batch_size: int = 32,
                  progress=None, source_ids: list[list[int]] | None = None) -> tuple[dict, list[dict]]:
    """ROUGE-1/2/L/Lsum and mean generated length on `rows`; also the per-row predictions."""
    from sumtune.generation.summaries import generate_summaries

    predictions, lengths = generate_summaries(
        model, tokenizer, [r["text"] for r in rows], prefix=prefix, max_source_tokens=max_source_tokens,
        max_new_tokens=max_new_tokens, num_beams=num_beams, batch_size=batch_size, progress=progress,
        source_ids=source_ids)
    return score_predictions(predictions, lengths, rows)


def score_predictions(predictions: Sequence[str], lengths: Sequence[int],
                      rows: Sequence[dict]) -> tuple[dict, list[dict]]:
    """ROUGE, mean generated length and row count of `predictions` (in row order), and the per-row records."""
    references = [r["summary"] for r in rows]
    metrics = rouge_scores(list(predictions), references)
    metrics["gen_len"] = sum(lengths) / max(1, len(lengths))
    metrics["num_samples"] = len(rows)
    records = [{"index": i, "reference": ref, "prediction": pred}
               for i, (ref, pred) in enumerate(zip(references, predictions))]
    return metrics, records


def write_eval(out_dir: str | Path, metrics: dict, records: list[dict]) -> Path:
    """OUT_DIR/predictions.jsonl and OUT_DIR/metrics.json, each written whole or not at all."""
    from sumtune.safe_io import atomic_write_text

    out = Path(out_dir)
    atomic_write_text(out / "predictions.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    atomic_write_text(out / "metrics.json", json.dumps(metrics, indent=2) + "\n")
    return out
