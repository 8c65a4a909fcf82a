"""Generate summaries for held-out documents and score them with ROUGE (rouge_score, stemming)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Sequence

import torch

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


def inference_copy(model) -> torch.nn.Module | None:
    """A dense copy of `model` (base dequantized, LoRA merged) for sumtune's T5 decoder: no per-token
    dequantization or adapter branches; bf16 on the GPU, fp32 on the CPU (where bf16 matmuls are emulated).
    None for models that decoder does not know: they generate with transformers' `generate`."""
    from sumtune import generation

    if not generation.supports_fast_generation(model):
        return None
    device = next(model.parameters()).device
    return generation.prepare_inference_model(model, torch.bfloat16 if device.type == "cuda" else torch.float32)


_FRESH_COPY = object()  # generate_summaries' default: copy the model now (its weights may have changed)


@torch.no_grad()
def hf_generate_ids(model, input_ids: list[list[int]], *, pad_token_id: int, max_new_tokens: int,
                    num_beams: int = 1, batch_size: int = 32) -> list[list[int]]:
    """transformers `generate`, length-sorted batches, explicit max_new_tokens; ids without the start token."""
    from sumtune.data import pad_batch

    device = next(model.parameters()).device
    order = sorted(range(len(input_ids)), key=lambda i: -len(input_ids[i]))
    out: list[list[int]] = [[] for _ in input_ids]
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        ids, mask = pad_batch([input_ids[i] for i in idx], pad_token_id)
        generated = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                                   max_new_tokens=max_new_tokens, num_beams=num_beams, do_sample=False)
        for row, i in zip(generated.tolist(), idx):
            row = row[1:]  # drop the decoder start token
            while row and row[-1] == pad_token_id:
                row.pop()
            out[i] = row
    return out


GENERATION_CHUNK_BATCHES = 4  # batches per progress update: small enough to report, large enough to stay fast


def _generate_chunk(model, dense, tokenizer, ids: list[list[int]], *, max_new_tokens: int, num_beams: int,
                    batch_size: int) -> list[list[int]]:
    if dense is not None:
        from sumtune.generation import generate_ids

        return generate_ids(dense, ids, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                                 decoder_start_token_id=model.config.decoder_start_token_id,
                                 max_new_tokens=max_new_tokens, num_beams=num_beams, batch_size=batch_size)
    return hf_generate_ids(model, ids, pad_token_id=tokenizer.pad_token_id, max_new_tokens=max_new_tokens,
                           num_beams=num_beams, batch_size=batch_size)


def generate_summaries(model, tokenizer, texts: Sequence[str], *, prefix: str, max_source_tokens: int,
                       max_new_tokens: int, num_beams: int = 1, batch_size: int = 32,
                       progress=None, dense_model=_FRESH_COPY,
                       source_ids: list[list[int]] | None = None) -> tuple[list[str], list[int]]:
    """Summaries of `texts` (in order) and their lengths in tokens; `progress` (a sumtune Progress) shows a bar.

    `dense_model`: an `inference_copy(model)` made earlier and still current (a frozen model summarizing
    many times); by default one is made for this call and dropped after it. `source_ids`: the texts already
    tokenized (prefix and cut included), when the caller has them."""
    from sumtune.data import tokenize_sources

    input_ids = source_ids if source_ids is not None else \
        tokenize_sources(tokenizer, list(texts), prefix, max_source_tokens)
    order = sorted(range(len(input_ids)), key=lambda i: -len(input_ids[i]))  # similar lengths batch together
    chunk = batch_size * GENERATION_CHUNK_BATCHES
    ids: list[list[int]] = [[] for _ in input_ids]
    was_training = model.training
    model.eval()
    bar = progress.bar(total=len(order), desc="generating", unit="doc") if progress is not None else None
    try:
        dense = inference_copy(model) if dense_model is _FRESH_COPY else dense_model
        for start in range(0, len(order), chunk):
            idx = order[start:start + chunk]
            rows = _generate_chunk(model, dense, tokenizer, [input_ids[i] for i in idx],
                                   max_new_tokens=max_new_tokens, num_beams=num_beams, batch_size=batch_size)
            for i, row in zip(idx, rows):
                ids[i] = row
            if bar is not None:
                bar.update(len(idx))
        del dense
    finally:
        model.train(was_training)
        if bar is not None:
            bar.close()
    texts_out = tokenizer.batch_decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=True)
    lengths = [sum(1 for t in row if t != tokenizer.pad_token_id) for row in ids]
    return [t.strip() for t in texts_out], lengths


def evaluate_rows(model, tokenizer, rows: Sequence[dict], *, prefix: str, max_source_tokens: int,
                  max_new_tokens: int, num_beams: int = 1, batch_size: int = 32,
                  progress=None, source_ids: list[list[int]] | None = None) -> tuple[dict, list[dict]]:
    """ROUGE-1/2/L/Lsum and mean generated length on `rows`; also the per-row predictions."""
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
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with (out / "predictions.jsonl").open("w", encoding="utf-8") as fh:
        for record in records:
            fh.write(json.dumps(record, ensure_ascii=False) + "\n")
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n", encoding="utf-8")
    return out
