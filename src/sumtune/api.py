"""The Python API, mirroring the CLI: `sumtune.train(config)`, `sumtune.evaluate(run_dir)`, `sumtune.Summarizer`."""

from __future__ import annotations

from pathlib import Path

from sumtune.config import TrainConfig
from sumtune.errors import SumtuneError


def as_config(config: TrainConfig | dict | str | Path) -> TrainConfig:
    from sumtune import argparsing

    if isinstance(config, TrainConfig):
        return config
    if isinstance(config, dict):
        return argparsing.from_mapping(TrainConfig, config)
    return argparsing.resolve(TrainConfig, str(config), {})


def train(config: TrainConfig | dict | str | Path) -> dict:
    """Run a whole training job (setup → train → final evaluation and save); returns the final eval metrics."""
    from sumtune.recipe import TrainRecipe

    cfg = as_config(config)
    profiler = None
    from sumtune.distributed import is_main_process

    if cfg.profile_steps and is_main_process():  # one trace per run, from rank 0
        from sumtune.profiling import make_train_profiler

        profiler = make_train_profiler(cfg, schedule=(1, 1, cfg.profile_steps))
    recipe = TrainRecipe(cfg, profiler=profiler)
    try:
        recipe.setup()
        if profiler is not None and recipe.flops_per_sample and recipe.peak_tflops:
            profiler.flops_per_step = recipe.flops_per_sample * cfg.effective_batch_size
            profiler.peak_tflops = recipe.peak_tflops
        recipe.train()
        metrics = recipe.finish()
        if profiler is not None and profiler.done:
            from sumtune.profiling import finalize_profile

            finalize_profile(profiler, Path(cfg.output_dir) / "profile", echo=recipe.progress.write)
        recipe.progress.write(f"done: ROUGE-1 {metrics['rouge1']:.2f}, ROUGE-2 {metrics['rouge2']:.2f}, "
                              f"ROUGE-L {metrics['rougeL']:.2f}, ROUGE-Lsum {metrics['rougeLsum']:.2f}; "
                              f"run saved in {recipe.run_dir}")
        return metrics
    finally:
        recipe.cleanup()


def evaluate(run_dir: str | Path, *, dataset: str | None = None, max_samples: int | None = None,
             num_beams: int | None = None, max_new_tokens: int | None = None, batch_size: int | None = None,
             output_dir: str | Path | None = None, device: str = "auto", allow_pickle: bool = False) -> dict:
    """ROUGE of a trained run on its held-out split (or on `dataset`); writes predictions.jsonl and metrics.json."""
    from dataclasses import replace

    from sumtune import truncation
    from sumtune.data import load_rows
    from sumtune.evaluation import evaluate_rows, write_eval
    from sumtune.inference import load_run
    from sumtune.progress import Progress

    for name, value in (("max_samples", max_samples), ("num_beams", num_beams), ("max_new_tokens", max_new_tokens),
                        ("batch_size", batch_size)):
        if value is not None and value <= 0:
            raise SumtuneError(f"`{name}` must be greater than 0, got {value}.")
    model, tokenizer, cfg = load_run(run_dir, device=device, allow_pickle=allow_pickle)
    data_cfg = replace(cfg, eval_dataset=dataset) if dataset else cfg
    rows = load_rows(data_cfg).eval[: max_samples or None]
    progress = Progress(enabled=True)
    max_new_tokens = max_new_tokens or cfg.generation_max_new_tokens
    source_ids, lengths = truncation.evaluation_report(tokenizer, rows, cfg, max_new_tokens)
    progress.write(lengths.line())  # what the run's source limit and the generation length cut
    metrics, records = evaluate_rows(
        model, tokenizer, rows, prefix=cfg.source_prefix, max_source_tokens=cfg.max_source_tokens,
        max_new_tokens=max_new_tokens, num_beams=num_beams or cfg.num_beams,
        batch_size=batch_size or cfg.eval_batch_size, progress=progress, source_ids=source_ids)
    write_eval(Path(output_dir) if output_dir else Path(run_dir) / "eval", metrics, records)
    return metrics
