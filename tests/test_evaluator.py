"""The evaluator: the sharded evaluation's reassembly (pure) and evaluation during training on a real tiny run."""

from __future__ import annotations

import pytest

from sumtune.evaluator import assemble_eval


def test_assemble_eval_restores_row_order_and_weights_the_loss():
    rows = [{"text": f"t{i}", "summary": f"the cat sat {i}"} for i in range(5)]
    parts = [([0, 2, 4], ["the cat sat 0", "x", "the cat sat 4"], [4, 1, 4], 6.0, 3),
             ([1, 3], ["the cat sat 1", "y"], [4, 1], 3.0, 1)]  # token-weighted 2.25; a mean of means: 2.5
    metrics, records = assemble_eval(parts, rows)
    assert [r["prediction"] for r in records] == ["the cat sat 0", "the cat sat 1", "x", "y", "the cat sat 4"]
    assert metrics["loss"] == pytest.approx(9.0 / 4)
    assert metrics["gen_len"] == pytest.approx(14 / 5) and metrics["num_samples"] == 5
    assert 0 < metrics["rouge1"] < 100
    with pytest.raises(RuntimeError):
        assemble_eval(parts[:1], rows)


def test_evaluation_during_training_uses_the_runs_generation_settings(trained_run):
    """no_repeat_ngram_size and min_new_tokens set in the config reach the evaluator's summaries."""
    from dataclasses import replace

    import torch

    from sumtune.data import load_rows
    from sumtune.evaluator import EvalSettings, Evaluator
    from sumtune.inference import load_run

    model, tokenizer, cfg = load_run(trained_run, device="cpu", progress=False)
    rows = load_rows(cfg).eval[:6]

    def predictions(**settings) -> list[list[str]]:
        evaluator = Evaluator(model, tokenizer, EvalSettings.from_config(replace(cfg, **settings)),
                              device=torch.device("cpu"))
        return [tokenizer.tokenize(r["prediction"]) for r in evaluator.evaluate(rows)[1]]

    plain, banned = predictions(), predictions(no_repeat_ngram_size=1, min_new_tokens=10)
    assert any(len(set(p)) < len(p) for p in plain)  # the run repeats itself when nothing stops it
    assert all(len(set(p)) == len(p) >= 10 for p in banned)
