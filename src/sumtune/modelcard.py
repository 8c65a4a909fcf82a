"""A Hugging Face model card (`README.md` with YAML metadata) for a trained adapter."""

from __future__ import annotations

from pathlib import Path

import yaml

from sumtune.argparsing import to_mapping

CARD_SETTINGS = ("model", "model_dropout", "quantization", "double_quant", "compute_dtype", "lora_r", "lora_alpha", "lora_dropout",
                 "lora_targets", "modules_to_save", "dataset", "dataset_split", "max_source_tokens",
                 "max_target_tokens", "epochs", "max_steps", "batch_size", "grad_accum_steps", "optimizer", "lr",
                 "lr_schedule", "warmup_steps", "seed")


def base_model_id(model: str) -> str:
    from sumtune.modeling import model_source

    return model_source(model).hub_id or "sumtune-" + model.replace(":", "-").strip("/.")


def dataset_id(dataset: str) -> str | None:
    if dataset == "billsum":
        return "FiscalNote/billsum"
    if "/" in dataset and not Path(dataset).exists() and not dataset.startswith((".", "/")):
        return dataset
    return None


def render_model_card(cfg, metrics: dict, param_counts: dict) -> str:
    settings = to_mapping(cfg)
    meta = {
        "library_name": "peft",
        "base_model": base_model_id(cfg.model),
        "pipeline_tag": "summarization",
        "tags": ["sumtune", "qlora", "lora", "summarization", "t5"],
    }
    ds = dataset_id(cfg.dataset)
    if ds:
        meta["datasets"] = [ds]
    meta["metrics"] = ["rouge"]
    meta["model-index"] = [{
        "name": Path(cfg.output_dir).name,
        "results": [{
            "task": {"type": "summarization", "name": "Summarization"},
            "dataset": {"name": ds or cfg.dataset, "type": ds or cfg.dataset},
            "metrics": [{"type": k, "value": round(float(metrics[k]), 3), "name": k}
                        for k in ("rouge1", "rouge2", "rougeL", "rougeLsum") if k in metrics],
        }],
    }]
    rows = "\n".join(f"| `{k}` | `{settings[k]}` |" for k in CARD_SETTINGS)
    scores = "\n".join(f"| {k} | {metrics[k]:.2f} |" for k in ("rouge1", "rouge2", "rougeL", "rougeLsum", "gen_len")
                       if k in metrics)
    trainable, total = param_counts.get("trainable", 0), param_counts.get("total", 1)
    return (
        f"---\n{yaml.safe_dump(meta, sort_keys=False)}---\n\n"
        f"# {Path(cfg.output_dir).name}\n\n"
        f"A LoRA adapter for `{cfg.model}` trained with sumtune "
        f"(QLoRA: {cfg.quantization} base, {cfg.compute_dtype} compute) for abstractive summarization.\n\n"
        f"Trainable parameters: {trainable:,} of {total:,} ({100 * trainable / max(1, total):.2f}%).\n\n"
        f"## Evaluation (held-out split, {int(metrics.get('num_samples', 0))} documents)\n\n"
        f"| metric | value |\n|---|---|\n{scores}\n\n"
        f"## Training settings\n\n| setting | value |\n|---|---|\n{rows}\n\n"
        "## Use\n\n"
        "```python\nimport sumtune\n"
        "summarizer = sumtune.Summarizer.from_pretrained(\"RUN_DIR\")\n"
        "print(summarizer.summarize([\"text to summarize\"]))\n```\n"
    )


def write_model_card(run_dir: str | Path, cfg, metrics: dict, param_counts: dict) -> Path:
    path = Path(run_dir) / "README.md"
    path.write_text(render_model_card(cfg, metrics, param_counts), encoding="utf-8")
    return path
