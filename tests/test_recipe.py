"""The recipe's lifecycle on real tiny runs: it trains with the public step (the one benchmarks time), writes a
complete run directory, and profiles its own steps when asked."""

from __future__ import annotations

import json

import torch

from sumtune.config import TrainConfig
from sumtune.metrics import read_metrics


def test_the_recipe_trains_with_the_public_step_a_benchmark_calls(tmp_path, billsum_jsonl, t5_tokenizer_dir):
    """`sumtune train` and a benchmark built with `sumtune.training.build_training` take the same steps: the same
    model, the same batches, the same dropout masks, hence the same losses to the last bit."""
    from transformers import T5ForConditionalGeneration

    from sumtune.api import train
    from sumtune.modeling import t5_config
    from sumtune.training import build_training

    torch.manual_seed(0)
    T5ForConditionalGeneration(t5_config("tiny", vocab_size=32100)).save_pretrained(tmp_path / "base")
    cfg = TrainConfig(model=str(tmp_path / "base"), tokenizer=str(t5_tokenizer_dir), dataset=str(billsum_jsonl),
                      compute_dtype="fp32", device="cpu", batch_size=4, grad_accum_steps=2, max_source_tokens=48,
                      max_target_tokens=12, lora_dropout=0.1, lr=1e-3, lr_schedule="constant", max_steps=3,
                      log_every_steps=1, eval_every_steps=1000, eval_max_samples=2, max_new_tokens=4,
                      progress=False, output_dir=str(tmp_path / "run"))
    train(cfg)
    recipe_losses = [r["loss"] for r in read_metrics(tmp_path / "run") if r["split"] == "train"]

    parts = build_training(cfg)
    stream = parts.batches.stream()
    bench_losses = [parts.step(parts.step.draw(stream, cfg.grad_accum_steps), lr=cfg.lr).loss for _ in range(3)]
    assert len(recipe_losses) == 3 and bench_losses == recipe_losses


def test_a_trained_run_holds_its_adapter_checkpoints_and_logs(trained_run):
    names = {p.name for p in trained_run.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "config.yaml", "metrics.jsonl", "README.md",
            "base_model", "checkpoints", "eval", "plots", "tb"} <= names
    lines = read_metrics(trained_run)
    assert [r["step"] for r in lines if r["split"] == "train"] == [10, 20, 30, 40]
    evals = [r for r in lines if r["split"] == "eval"]
    assert [r["step"] for r in evals] == [20, 40]
    assert sorted(p.name for p in (trained_run / "checkpoints").iterdir()) == ["best", "step-20", "step-40"]
    best = json.loads((trained_run / "checkpoints" / "best" / "checkpoint.json").read_text())
    assert best["step"] == max(evals, key=lambda r: r["rougeL"])["step"]  # the best by ROUGE-L, kept
    state = json.loads((trained_run / "checkpoints" / "step-40" / "trainer_state.json").read_text())
    # written before the final evaluation: the best known then was step 20's
    assert state["step"] == 40 and state["samples_seen"] == 40 * 8 and state["best_step"] == 20


def test_a_run_whose_rouge_stops_improving_stops_early_and_says_so(tmp_path, capsys):
    """`early_stopping_patience: 2` with evaluations every 2 steps and a learning rate too small to change a token:
    step 2 sets the best ROUGE-L, steps 4 and 6 do not beat it, so the run stops at step 6 of 30 and says why; the
    run directory is finished as usual. Its log (no terminal here) has one line per logging window with every
    field."""
    import sumtune

    out = tmp_path / "run"
    metrics = sumtune.train(dict(model="tiny", dataset="demo", max_samples=120, compute_dtype="fp32", device="cpu",
                                 batch_size=4, max_source_tokens=48, max_target_tokens=12, max_steps=30, lr=1e-9,
                                 lr_schedule="constant", eval_every_steps=2, eval_max_samples=4, eval_batch_size=4,
                                 log_every_steps=2, early_stopping_patience=2, output_dir=str(out), seed=0))
    err = capsys.readouterr().err
    lines = read_metrics(out)
    evals = [r for r in lines if r["split"] == "eval"]
    assert [r["step"] for r in evals] == [2, 4, 6]  # the final evaluation is step 6's, not a second one
    assert len({r["rougeL"] for r in evals}) == 1
    stop = [r for r in lines if r["split"] == "early_stop"]
    assert [(r["step"], r["best_step"], r["patience"]) for r in stop] == [(6, 2, 2)]
    assert (f"sumtune: stopping early at step 6 of 30: ROUGE-L has not improved for 2 evaluations (best "
            f"{evals[0]['rougeL']:.2f} at step 2; early_stopping_patience 2).") in err
    assert metrics["rougeL"] == evals[-1]["rougeL"] and (out / "adapter_model.safetensors").is_file()
    assert json.loads((out / "eval" / "metrics.json").read_text())["num_samples"] == 4

    log_lines = [line for line in err.splitlines() if line.startswith("step ") and "  epoch " in line]
    assert [line.split()[1] for line in log_lines] == ["2/30", "4/30", "6/30"]
    for line in log_lines:
        fields = line.split("  ")
        assert [f.split(" ")[0] for f in fields] == ["step", "epoch", "loss", "lr", "grad_norm", "tokens/s", "ETA"]
    assert "\r" not in err  # no progress bar without a terminal
