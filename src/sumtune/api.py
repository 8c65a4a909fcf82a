"""The Python API, mirroring the CLI: `sumtune.train(config)`, `sumtune.profile(config)`, `sumtune.evaluate(run_dir)`,
`sumtune.Summarizer`. These drivers sit on top: they run the recipe (or, for `evaluate`, the evaluation parts)."""

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
    """Run a whole training job (setup → train → final evaluation and save); returns the final eval metrics.

    With `profile_steps`, rank 0 profiles that many steps of the run (`sumtune profile` without leaving the run)."""
    from sumtune.distributed import env_world
    from sumtune.profiling import finalize_profile, make_train_profiler
    from sumtune.recipe import TrainRecipe

    cfg = as_config(config)
    profiler = None
    if cfg.profile_steps and env_world()[0] == 0:  # one trace per run, from rank 0
        profiler = make_train_profiler(cfg.output_dir, schedule=(1, 1, cfg.profile_steps))
    recipe = TrainRecipe(cfg, profiler=profiler)
    try:
        recipe.setup()
        recipe.train()
        metrics = recipe.finish()
        if profiler is not None and profiler.done:
            finalize_profile(profiler, echo=recipe.progress.write)
        recipe.progress.write(f"done: ROUGE-1 {metrics['rouge1']:.2f}, ROUGE-2 {metrics['rouge2']:.2f}, "
                              f"ROUGE-L {metrics['rougeL']:.2f}, ROUGE-Lsum {metrics['rougeLsum']:.2f}; "
                              f"run saved in {recipe.run_dir}")
        return metrics
    finally:
        recipe.cleanup()


def profile(config: TrainConfig | dict | str | Path, args=None) -> dict:
    """`sumtune profile`: wait + warmup + active steps of the real training run under torch.profiler; prints the
    report and writes RUN_DIR/profile/summary.json next to a TensorBoard trace. Returns the summary.

    The run is built and stepped by the recipe exactly as `train` does (periodic evaluation is pushed past the
    profiled steps: the profile measures training steps); `args` is a `sumtune.profiling.ProfileArgs`."""
    from dataclasses import replace

    from sumtune.profiling import ProfileArgs, finalize_profile, make_train_profiler
    from sumtune.recipe import TrainRecipe

    args = args or ProfileArgs()
    if args.workload != "t5":
        raise SumtuneError("`profile` profiles the training config; use run_mobilenet_study for mobilenet-cifar10.")
    cfg = replace(as_config(config), eval_every_steps=10**9)
    profiler = make_train_profiler(cfg.output_dir, args)
    recipe = TrainRecipe(cfg, profiler=profiler)
    try:
        recipe.setup()
        with profiler:
            recipe.train(max_steps=profiler.total_steps)
    finally:
        recipe.cleanup()
    return finalize_profile(profiler)


def evaluate(run_dir: str | Path, *, dataset: str | None = None, max_samples: int | None = None,
             num_beams: int | None = None, max_new_tokens: int | None = None, batch_size: int | None = None,
             min_new_tokens: int | None = None, length_penalty: float | None = None,
             no_repeat_ngram_size: int | None = None, name: str | None = None,
             output_dir: str | Path | None = None, device: str = "auto", allow_pickle: bool = False,
             trust_remote_code: bool = False, progress: bool = True) -> dict:
    """ROUGE of a trained run on its held-out split (or on all of `dataset`, which is then the only data read).

    Writes predictions.jsonl (each row's source id and text, reference, prediction) and metrics.json to a new
    RUN_DIR/eval/NAME/ (`name`, default: what was evaluated and when), or to `output_dir`: never over the training's
    own final evaluation in RUN_DIR/eval/, which the report headlines. Generation settings left None are the
    run's. `progress`: bars on a terminal, else plain lines."""
    import torch

    from sumtune import truncation
    from sumtune.config import GenerationSettings
    from sumtune.data import load_eval_rows, load_rows
    from sumtune.evaluation import evaluate_rows, new_eval_dir, write_eval
    from sumtune.inference import check_generation_options, load_run, read_run_config, summaries_oom_message
    from sumtune.progress import Progress
    from sumtune.safe_io import check_output_location

    check_generation_options(max_samples=max_samples, num_beams=num_beams, max_new_tokens=max_new_tokens,
                             batch_size=batch_size)
    if dataset is not None and not str(dataset).strip():
        raise SumtuneError("`dataset` must not be empty.")
    if name is not None and output_dir is not None:
        raise SumtuneError("Give `name` (RUN_DIR/eval/NAME) or `output_dir`, not both.")
    cfg = read_run_config(run_dir)  # a missing or foreign run directory is named before the output path
    settings = GenerationSettings.of(cfg, max_new_tokens=max_new_tokens, num_beams=num_beams,
                                     min_new_tokens=min_new_tokens, length_penalty=length_penalty,
                                     no_repeat_ngram_size=no_repeat_ngram_size)
    out = new_eval_dir(Path(run_dir).expanduser(), name=name, dataset=dataset) if output_dir is None else output_dir
    out = check_output_location(out, "Evaluation output directory")
    rows = load_eval_rows(cfg, dataset) if dataset else load_rows(cfg).eval  # read before the model loads
    rows = rows[: max_samples or None]
    progress_ = Progress(enabled=progress)
    model, tokenizer, cfg = load_run(run_dir, device=device, allow_pickle=allow_pickle,
                                     trust_remote_code=trust_remote_code, progress=progress)
    source_ids, lengths = truncation.evaluation_report(tokenizer, rows, cfg, settings.max_new_tokens)
    progress_.write(lengths.line())  # what the run's source limit and the generation length cut
    batch_size = batch_size or cfg.eval_batch_size
    message = None
    try:
        metrics, records = evaluate_rows(
            model, tokenizer, rows, prefix=cfg.source_prefix, max_source_tokens=cfg.max_source_tokens,
            batch_size=batch_size, progress=progress_, source_ids=source_ids, **settings.kwargs())
    except torch.cuda.OutOfMemoryError:
        message = summaries_oom_message(batch_size, settings, cfg.max_source_tokens, model)
    if message is not None:
        raise SumtuneError(message)  # outside the except block: the OOM traceback (and its tensors) is freed
    write_eval(out, metrics, records)
    progress_.write(f"sumtune: evaluation of {len(rows)} documents written to {out}")
    return metrics
