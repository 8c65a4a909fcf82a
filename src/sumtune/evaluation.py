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
                  progress=None, source_ids: list[list[int]] | None = None, **generation) -> tuple[dict, list[dict]]:
    """ROUGE-1/2/L/Lsum and mean generated length on `rows`; also the per-row predictions. `generation`: the
    other settings of `config.GenerationSettings` (min_new_tokens, length_penalty, no_repeat_ngram_size)."""
    from sumtune.generation.summaries import generate_summaries

    predictions, lengths = generate_summaries(
        model, tokenizer, [r["text"] for r in rows], prefix=prefix, max_source_tokens=max_source_tokens,
        max_new_tokens=max_new_tokens, num_beams=num_beams, batch_size=batch_size, progress=progress,
        source_ids=source_ids, **generation)
    return score_predictions(predictions, lengths, rows)


def score_predictions(predictions: Sequence[str], lengths: Sequence[int],
                      rows: Sequence[dict]) -> tuple[dict, list[dict]]:
    """ROUGE, mean generated length and row count of `predictions` (in row order), and the per-row records: the
    source row's id (its `id` column, else its 0-based position in the source) and text, the reference and the
    prediction."""
    references = [r["summary"] for r in rows]
    metrics = rouge_scores(list(predictions), references)
    metrics["gen_len"] = sum(lengths) / max(1, len(lengths))
    metrics["num_samples"] = len(rows)
    records = [{"id": row.get("id", i), "text": row["text"], "reference": row["summary"], "prediction": pred}
               for i, (row, pred) in enumerate(zip(rows, predictions))]
    return metrics, records


def write_eval(out_dir: str | Path, metrics: dict, records: list[dict]) -> Path:
    """OUT_DIR/predictions.jsonl and OUT_DIR/metrics.json, each written whole or not at all."""
    from sumtune.safe_io import atomic_write_text

    out = Path(out_dir)
    atomic_write_text(out / "predictions.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    atomic_write_text(out / "metrics.json", json.dumps(metrics, indent=2) + "\n")
    return out


def new_eval_dir(run_dir: Path, *, name: str | None = None, dataset: str | None = None) -> Path:
    """RUN_DIR/eval/NAME for an evaluation after training (the training's own stays in RUN_DIR/eval/). NAME by
    default: what was evaluated (`heldout`, or the dataset's file or hub name) and when; an explicit NAME that
    is taken is refused, a default one gets a number."""
    import datetime as dt

    from sumtune.errors import SumtuneError

    root = run_dir / "eval"
    if name is not None:
        if not re.fullmatch(r"[\w.-]+", name) or name in (".", ".."):
            raise SumtuneError(f"Evaluation name {name!r} must be one word of letters, digits, '.', '-' or '_'.")
        if (root / name).exists():
            raise SumtuneError(f"{str(root / name)!r} already holds an evaluation; choose another name.")
        return root / name
    what = "heldout" if not dataset else re.sub(r"[^\w.-]+", "-", Path(str(dataset).rstrip("/")).stem or "data")
    base = f"{what}-{dt.datetime.now():%Y%m%d-%H%M%S}"
    candidate, number = root / base, 2
    while candidate.exists():
        candidate, number = root / f"{base}-{number}", number + 1
    return candidate
