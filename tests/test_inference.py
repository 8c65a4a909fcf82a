"""Using a trained run: load it (a tiny run brings its own base), summarize with `Summarizer`."""

from __future__ import annotations

import json

import torch

from sumtune.data import load_rows
from sumtune.inference import Summarizer, base_model_source, load_run, read_run_config


def test_summarizer_writes_the_runs_own_eval_predictions(trained_run):
    """The same documents, the same greedy summaries as the recipe's final evaluation wrote (fp32 CPU)."""
    cfg = read_run_config(trained_run)
    rows = load_rows(cfg).eval[: cfg.eval_max_samples]
    records = [json.loads(line) for line in (trained_run / "eval" / "predictions.jsonl").read_text().splitlines()]
    assert [r["reference"] for r in records] == [r["summary"] for r in rows]
    summarizer = Summarizer.from_pretrained(trained_run, device="cpu")
    summaries = summarizer.summarize([r["text"] for r in rows])
    assert summaries == [r["prediction"] for r in records]
    assert len(set(summaries)) > 1 and all(summaries)  # input-dependent, non-empty: the equality is not idle
    summarizer.release()
    assert summarizer.summarize(rows[0]["text"]) == summaries[:1]  # a string is one document; the copy remade


def test_a_tiny_run_loads_the_base_it_saved(trained_run):
    """Random weights exist nowhere else: the run keeps its base under base_model/ and every command loads it."""
    from safetensors.torch import load_file

    cfg = read_run_config(trained_run)
    assert cfg.model == "tiny" and base_model_source(cfg, trained_run).model == str(trained_run / "base_model")
    saved = load_file(str(trained_run / "base_model" / "model.safetensors"))
    model, tokenizer, _ = load_run(trained_run, device="cpu")
    embeddings = model.get_base_model().shared.weight
    assert torch.equal(embeddings, saved["shared.weight"]) and len(tokenizer) == embeddings.shape[0]
