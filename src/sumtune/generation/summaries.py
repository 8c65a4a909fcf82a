"""Summaries of texts: the one entry point evaluation and `Summarizer` call.

First match decides how a model generates: a T5 (PEFT-wrapped, quantized or not) gets a dense copy
(`dense_copy.prepare_inference_model`) and sumtune's own decoder (`decoding.generate_ids`); any other seq2seq
model generates with transformers' `generate`.
"""

from __future__ import annotations

from typing import Sequence

import torch

from sumtune.batching import pad_batch
from sumtune.data import tokenize_sources
from sumtune.generation.decoding import generate_ids, uses_own_decoder
from sumtune.generation.dense_copy import prepare_inference_model, supports_fast_generation


def inference_copy(model) -> torch.nn.Module | None:
    """A dense copy of `model` (base dequantized, LoRA merged) for sumtune's T5 decoder: no per-token
    dequantization or adapter branches; bf16 on the GPU, fp32 on the CPU (where bf16 matmuls are emulated).
    None for models that decoder does not know: they generate with transformers' `generate`."""
    if not supports_fast_generation(model):
        return None
    device = next(model.parameters()).device
    return prepare_inference_model(model, torch.bfloat16 if device.type == "cuda" else torch.float32)


_FRESH_COPY = object()  # generate_summaries' default: copy the model now (its weights may have changed)


@torch.no_grad()
def hf_generate_ids(model, input_ids: list[list[int]], *, pad_token_id: int, max_new_tokens: int,
                    num_beams: int = 1, batch_size: int = 32, min_new_tokens: int = 0, length_penalty: float = 1.0,
                    no_repeat_ngram_size: int = 0, on_batch_done=None) -> list[list[int]]:
    """transformers `generate`, length-sorted batches, explicit generation settings (never the model's
    generation_config defaults for them); ids without the start token. `on_batch_done(rows)` after each batch."""
    device = next(model.parameters()).device
    order = sorted(range(len(input_ids)), key=lambda i: -len(input_ids[i]))
    out: list[list[int]] = [[] for _ in input_ids]
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        ids, mask = pad_batch([input_ids[i] for i in idx], pad_token_id)
        generated = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                                   max_new_tokens=max_new_tokens, num_beams=num_beams, do_sample=False,
                                   min_new_tokens=min_new_tokens or None,
                                   no_repeat_ngram_size=no_repeat_ngram_size or None,
                                   **({"length_penalty": length_penalty} if num_beams > 1 else {}))
        for row, i in zip(generated.tolist(), idx):
            row = row[1:]  # drop the decoder start token
            while row and row[-1] == pad_token_id:
                row.pop()
            out[i] = row
        if on_batch_done is not None:
            on_batch_done(len(idx))
    return out


def _generate_all(model, dense, tokenizer, ids: list[list[int]], *, batch_size: int,
                  **settings) -> list[list[int]]:
    if dense is not None:
        return generate_ids(dense, ids, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                            decoder_start_token_id=model.config.decoder_start_token_id, batch_size=batch_size,
                            **settings)
    return hf_generate_ids(model, ids, pad_token_id=tokenizer.pad_token_id, batch_size=batch_size, **settings)


def generation_path(model, *, num_beams: int = 1, no_repeat_ngram_size: int = 0) -> str:
    """Which code generates for `model` with these settings, in words (what a log line or a benchmark says)."""
    if not supports_fast_generation(model):
        return "transformers' generate"
    if uses_own_decoder(num_beams=num_beams, no_repeat_ngram_size=no_repeat_ngram_size):
        return "sumtune's T5 decoder"
    return "transformers' generate on sumtune's encoder output"


def generate_summaries(model, tokenizer, texts: Sequence[str], *, prefix: str, max_source_tokens: int,
                       max_new_tokens: int, num_beams: int = 1, batch_size: int = 32, min_new_tokens: int = 0,
                       length_penalty: float = 1.0, no_repeat_ngram_size: int = 0,
                       progress=None, dense_model=_FRESH_COPY,
                       source_ids: list[list[int]] | None = None) -> tuple[list[str], list[int]]:
    """Summaries of `texts` (in order) and their lengths in tokens; `progress` (a sumtune Progress) shows a bar.

    Generation settings are `config.GenerationSettings`' (`**settings.kwargs()`). A T5 runs sumtune's decoder
    for greedy decoding; beam search and `no_repeat_ngram_size` run transformers' `generate` on the encoder output
    sumtune computed (`generation_path` says which). `dense_model`: an `inference_copy(model)` made earlier and
    still current (a frozen model summarizing many times); by default one is made for this call and dropped after
    it. `source_ids`: the texts already tokenized (prefix and cut included), when the caller has them."""
    if not (source_ids if source_ids is not None else texts):
        return [], []  # (a tokenizer refuses an empty batch)
    input_ids = source_ids if source_ids is not None else \
        tokenize_sources(tokenizer, list(texts), prefix, max_source_tokens)
    was_training = model.training
    model.eval()
    bar = progress.bar(total=len(input_ids), desc="generating", unit="doc") if progress is not None else None
    try:
        dense = inference_copy(model) if dense_model is _FRESH_COPY else dense_model
        # one call over every input (both paths sort by length and batch); the bar moves after each batch
        ids = _generate_all(model, dense, tokenizer, list(input_ids), batch_size=batch_size,
                            max_new_tokens=max_new_tokens, num_beams=num_beams, min_new_tokens=min_new_tokens,
                            length_penalty=length_penalty, no_repeat_ngram_size=no_repeat_ngram_size,
                            on_batch_done=bar.update if bar is not None else None)
        del dense
    finally:
        model.train(was_training)
        if bar is not None:
            bar.close()
    texts_out = tokenizer.batch_decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=True)
    lengths = [sum(1 for t in row if t != tokenizer.pad_token_id) for row in ids]
    return [t.strip() for t in texts_out], lengths
