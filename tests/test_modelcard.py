"""Model cards through huggingface_hub's ModelCardData: base_model only for a hub id, the license, tags from the
base's own model type; a card for merged models, which `sumtune push` uploads (no network here)."""

from __future__ import annotations

from pathlib import Path

import pytest
from huggingface_hub import ModelCard

from sumtune.config import TrainConfig
from sumtune.errors import SumtuneError
from sumtune.modelcard import render_merged_card, render_model_card

METRICS = {"rouge1": 40.0, "rouge2": 20.0, "rougeL": 35.0, "rougeLsum": 36.0, "gen_len": 30.0, "num_samples": 16}
COUNTS = {"trainable": 1000, "total": 100000}


def card(cfg: TrainConfig, model_type: str | None = "t5") -> ModelCard:
    return ModelCard(render_model_card(cfg, METRICS, COUNTS, model_type))


def test_a_hub_base_is_credited_with_its_license():
    data = card(TrainConfig(model="google-t5/t5-base", output_dir="runs/news")).data
    assert data.base_model == "google-t5/t5-base" and data.license == "apache-2.0" and data.library_name == "peft"
    assert data.tags == ["sumtune", "summarization", "qlora", "lora", "t5"]
    assert data.datasets == ["FiscalNote/billsum"]
    assert {r.metric_type: r.metric_value for r in data.eval_results} == {
        "rouge1": 40.0, "rouge2": 20.0, "rougeL": 35.0, "rougeLsum": 36.0}


def test_a_local_base_is_never_dressed_up_as_a_hub_repository(tmp_path):
    """`/models/t5-base` once became `base_model: sumtune-models/t5-base`, which looks like a hub repo."""
    base = tmp_path / "models" / "t5-base"
    base.mkdir(parents=True)
    written = card(TrainConfig(model=str(base), dataset=str(tmp_path / "news.jsonl")))
    assert written.data.base_model is None and written.data.license == "other"
    assert "a local model (`t5-base`; not a hub repository)" in written.text
    (base / "README.md").write_text("---\nlicense: mit\n---\n# a base\n")
    assert card(TrainConfig(model=str(base))).data.license == "mit"  # the base's own card says


def test_the_license_setting_wins_and_bart_is_not_tagged_t5():
    data = card(TrainConfig(model="facebook/bart-base", license="cc-by-4.0", quantization="none"), "bart").data
    assert data.license == "cc-by-4.0" and data.base_model == "facebook/bart-base"
    assert "t5" not in data.tags and "bart" in data.tags and "qlora" not in data.tags
    assert card(TrainConfig(model="facebook/bart-base"), "bart").data.license == "other"  # unknown: not guessed


def test_a_merged_model_card_is_a_transformers_card():
    merged = ModelCard(render_merged_card(TrainConfig(model="google/flan-t5-base"), METRICS, "t5", "bf16"))
    assert merged.data.library_name == "transformers" and merged.data.base_model == "google/flan-t5-base"
    assert merged.data.base_model_relation == "finetune" and merged.data.license == "apache-2.0"
    assert "merged" in merged.data.tags and "pipeline(\"summarization\"" in merged.text
    assert "Measured on the quantized base with the adapter on top" in merged.text
    tiny = ModelCard(render_merged_card(TrainConfig(model="tiny"), None, "t5", "fp32"))
    assert tiny.data.base_model is None and "base_model_relation" not in tiny.data.to_dict()


# ---- pushing a merged model -----------------------------------------------------------------------------------

@pytest.fixture
def merged_dir(tmp_path) -> Path:
    """The layout `sumtune merge` writes (contents do not matter to what is selected)."""
    out = tmp_path / "merged"
    for rel in ("config.json", "generation_config.json", "model.safetensors", "README.md", "tokenizer.json",
                "tokenizer_config.json", "notes.txt"):
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        (out / rel).write_text("{}")
    return out


def test_a_merged_model_pushes_its_weights_config_tokenizer_and_card(merged_dir, monkeypatch):
    from sumtune.push import files_to_push, push_run

    assert files_to_push(merged_dir) == ["README.md", "config.json", "generation_config.json", "model.safetensors",
                                         "tokenizer.json", "tokenizer_config.json"]
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(SumtuneError, match=r"^Cannot push: the hub is switched off \(HF_HUB_OFFLINE=1\)"):
        push_run(merged_dir, "someone/merged")  # checked whole first, then refused in one sentence
    (merged_dir / "model.safetensors").unlink()
    with pytest.raises(SumtuneError, match=r"not a merged model ready to push \(model.safetensors missing\)"):
        push_run(merged_dir, "someone/merged")
