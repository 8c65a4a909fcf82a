"""Hugging Face model cards (`README.md` with YAML metadata, through `huggingface_hub.ModelCardData`): one for a
trained adapter (written by `sumtune train`), one for a merged model (written by `sumtune merge`).

The metadata says only what is known: `base_model` only when the base is a hub id (a local directory or a random
`tiny` model is named in the text instead, never dressed up as a hub repository), the license (the run's
`license` setting, else the base's, else `other`), and tags from the base's own model type (`bart` for BART).
"""

from __future__ import annotations

import re
from pathlib import Path

from sumtune.argparsing import to_mapping
from sumtune.safe_io import atomic_write_text

CARD_SETTINGS = ("model", "model_dropout", "quantization", "double_quant", "compute_dtype", "lora_r", "lora_alpha",
                 "lora_dropout", "lora_targets", "modules_to_save", "dataset", "dataset_split", "max_source_tokens",
                 "max_target_tokens", "epochs", "max_steps", "batch_size", "grad_accum_steps", "optimizer", "lr",
                 "lr_schedule", "warmup_steps", "seed", "num_beams", "max_new_tokens", "min_new_tokens",
                 "length_penalty", "no_repeat_ngram_size")
ROUGE_KEYS = {"rouge1": "ROUGE-1", "rouge2": "ROUGE-2", "rougeL": "ROUGE-L", "rougeLsum": "ROUGE-Lsum"}
# Checkpoints whose license is known without reading their card: Google's T5, T5 v1.1 and FLAN-T5 (Apache-2.0).
KNOWN_LICENSES = ((re.compile(r"^(google-t5/)?t5-(small|base|large|3b|11b)$"), "apache-2.0"),
                  (re.compile(r"^google/(flan-t5|t5-v1_1|t5-efficient)-[\w-]+$"), "apache-2.0"))
UNKNOWN_LICENSE = "other"


def base_model_id(model: str) -> str | None:
    """The base's hub id, or None for a local directory or a random model (no hub repository to credit)."""
    from sumtune.modeling import model_source

    return model_source(model).hub_id


def dataset_id(dataset: str) -> str | None:
    if dataset == "billsum":
        return "FiscalNote/billsum"
    if "/" in dataset and not Path(dataset).exists() and not dataset.startswith((".", "/")):
        return dataset
    return None


def _card_license(readme: Path | str | None) -> str | None:
    if readme is None or not Path(readme).is_file():
        return None
    try:
        from huggingface_hub import metadata_load

        value = (metadata_load(readme) or {}).get("license")
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    return value if isinstance(value, str) and value.strip() else None


def base_license(model: str) -> str | None:
    """The base model's license: from its model card (a local base's README.md, or a hub card already in the
    cache; nothing is downloaded), or for the T5 family, known. None when unknown."""
    from sumtune.modeling import model_source

    source = model_source(model)
    if source.random:
        return None
    if source.kind == "local":
        return _card_license(Path(model).expanduser() / "README.md")
    try:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(model, "README.md")
    except (OSError, ValueError):
        cached = None
    found = _card_license(cached if isinstance(cached, str) else None)
    return found or next((lic for pattern, lic in KNOWN_LICENSES if pattern.match(model)), None)


def card_license(cfg) -> str:
    return cfg.license or base_license(cfg.model) or UNKNOWN_LICENSE


def card_tags(cfg, model_type: str | None, *extra: str) -> list[str]:
    tags = ["sumtune", "summarization", "lora", *extra]
    if cfg.quantization != "none":
        tags.insert(2, "qlora")
    if model_type:
        tags.append(model_type)
    return list(dict.fromkeys(tags))


def describe_base(cfg) -> str:
    from sumtune.modeling import model_source

    source = model_source(cfg.model)
    if source.hub_id:
        return f"[`{source.hub_id}`](https://huggingface.co/{source.hub_id})"
    if source.kind == "tiny":
        return "sumtune's `tiny` T5 (random weights, for demos and tests; kept in the run's `base_model/`)"
    if source.random:
        return f"a randomly initialised `{cfg.model}` (real shapes, random weights: a benchmark, not a summarizer)"
    return f"a local model (`{Path(cfg.model).name}`; not a hub repository)"


def _eval_results(cfg, metrics: dict):
    from huggingface_hub import EvalResult

    ds = dataset_id(cfg.dataset)
    return [EvalResult(task_type="summarization", task_name="Summarization", dataset_type=ds or cfg.dataset,
                       dataset_name=ds or Path(cfg.dataset).name or cfg.dataset, metric_type=key,
                       metric_name=label, metric_value=round(float(metrics[key]), 3))
            for key, label in ROUGE_KEYS.items() if key in metrics]


def _scores_table(metrics: dict) -> str:
    rows = "\n".join(f"| {label} | {metrics[key]:.2f} |" for key, label in
                     {**ROUGE_KEYS, "gen_len": "mean summary length (tokens)"}.items() if key in metrics)
    return f"| metric | value |\n|---|---|\n{rows}\n"


def _settings_table(cfg) -> str:
    settings = to_mapping(cfg)
    return "| setting | value |\n|---|---|\n" + "\n".join(f"| `{k}` | `{settings[k]}` |" for k in CARD_SETTINGS) + "\n"


def _card(data, body: str) -> str:
    from huggingface_hub import ModelCard

    card = ModelCard(f"---\n{data.to_yaml()}\n---\n\n{body}")  # parses the metadata back: a bad field fails here
    return str(card)


def render_model_card(cfg, metrics: dict, param_counts: dict, model_type: str | None = None) -> str:
    """The card of a trained adapter (RUN_DIR/README.md)."""
    from huggingface_hub import ModelCardData

    name = Path(cfg.output_dir).name
    ds = dataset_id(cfg.dataset)
    data = ModelCardData(
        base_model=base_model_id(cfg.model), library_name="peft", license=card_license(cfg),
        pipeline_tag="summarization", tags=card_tags(cfg, model_type), datasets=[ds] if ds else None,
        metrics=["rouge"], model_name=name, eval_results=_eval_results(cfg, metrics) or None)
    trainable, total = param_counts.get("trainable", 0), param_counts.get("total", 1)
    body = (
        f"# {name}\n\n"
        f"A LoRA adapter for {describe_base(cfg)}, trained with sumtune "
        f"(QLoRA: {cfg.quantization} base, {cfg.compute_dtype} compute) for abstractive summarization.\n\n"
        f"Trainable parameters: {trainable:,} of {total:,} ({100 * trainable / max(1, total):.2f}%).\n\n"
        f"## Evaluation (held-out split, {int(metrics.get('num_samples', 0))} documents)\n\n"
        f"{_scores_table(metrics)}\n"
        f"## Training settings\n\n{_settings_table(cfg)}\n"
        "## Use\n\n"
        "```python\nimport sumtune\n"
        "summarizer = sumtune.Summarizer.from_pretrained(\"RUN_DIR_OR_HUB_ID\")\n"
        "print(summarizer.summarize([\"text to summarize\"]))\n```\n"
    )
    return _card(data, body)


def render_merged_card(cfg, metrics: dict | None, model_type: str | None, dtype: str) -> str:
    """The card of a merged model (`sumtune merge` OUT_DIR/README.md): a plain transformers model."""
    from huggingface_hub import ModelCardData

    base = base_model_id(cfg.model)
    ds = dataset_id(cfg.dataset)
    data = ModelCardData(
        base_model=base, library_name="transformers", license=card_license(cfg), pipeline_tag="summarization",
        tags=card_tags(cfg, model_type, "merged"), datasets=[ds] if ds else None, metrics=["rouge"],
        **({"base_model_relation": "finetune"} if base else {}))
    scores = ""
    if metrics:
        scores = (f"## Evaluation of the adapter before merging ({int(metrics.get('num_samples', 0))} held-out "
                  f"documents)\n\nMeasured on the quantized base with the adapter on top; the merged weights are the "
                  f"dequantized base plus the adapter in {dtype}, so their summaries can differ slightly.\n\n"
                  f"{_scores_table(metrics)}\n")
    body = (
        f"# {Path(cfg.output_dir).name} (merged)\n\n"
        f"{describe_base(cfg)} with a LoRA adapter trained by sumtune merged into its weights ({dtype}): a plain "
        "transformers model, no PEFT or bitsandbytes needed.\n\n"
        f"{scores}"
        f"## Training settings\n\n{_settings_table(cfg)}\n"
        "## Use\n\n"
        "```python\nimport sumtune  # registers the summarization task (transformers 5 removed it)\n"
        "from transformers import pipeline\n\n"
        "summarizer = pipeline(\"summarization\", model=\"MODEL_DIR_OR_HUB_ID\")\n"
        "print(summarizer([\"text to summarize\"])[0][\"summary_text\"])\n```\n"
    )
    return _card(data, body)


def write_model_card(run_dir: str | Path, cfg, metrics: dict, param_counts: dict,
                     model_type: str | None = None) -> Path:
    path = Path(run_dir) / "README.md"
    return atomic_write_text(path, render_model_card(cfg, metrics, param_counts, model_type))
