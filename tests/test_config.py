"""Config: every shipped YAML parses; unknown keys and wrong types are refused naming the key; CLI overrides YAML."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import pytest
import yaml

from sumtune import argparsing
from sumtune.cli import main
from sumtune.config import TrainConfig
from sumtune.demo import demo_config
from sumtune.errors import SumtuneError

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_shipped_config_parses(path):
    cfg = argparsing.resolve(TrainConfig, str(path), {})
    assert isinstance(cfg, TrainConfig)
    assert set(yaml.safe_load(path.read_text())) <= set(asdict(cfg))


@pytest.mark.parametrize("argv, expected", [([], "auto"), (["--cache-dequantized-weights"], True),
                                             (["--cache-dequantized-weights", "false"], False),
                                             (["--cache-dequantized-weights", "auto"], "auto")])
def test_the_weight_cache_is_auto_unless_forced(argv, expected):
    """`auto` by default; a bare flag forces it on, `false` off (yaml and flags alike go through coerce)."""
    import argparse

    parser = argparse.ArgumentParser()
    argparsing.add_dataclass_arguments(parser, TrainConfig)
    cfg = argparsing.from_mapping(TrainConfig, vars(parser.parse_args(argv)))
    assert cfg.cache_dequantized_weights == expected and type(cfg.cache_dequantized_weights) is type(expected)
    with pytest.raises(SumtuneError, match="`cache_dequantized_weights` must be"):
        argparsing.from_mapping(TrainConfig, {"cache_dequantized_weights": "sometimes"})
    # nothing to cache without 4-bit weights: `auto` simply resolves off, `true` is refused
    assert TrainConfig(quantization="none").cache_dequantized_weights == "auto"
    with pytest.raises(SumtuneError, match="caches 4-bit weights"):
        TrainConfig(quantization="none", cache_dequantized_weights=True)


def test_seed_config_is_the_reference_recipe_in_bf16():
    cfg = argparsing.resolve(TrainConfig, str(Path(CONFIGS[0]).with_name("seed.yaml")), {})
    assert (cfg.model, cfg.quantization, cfg.double_quant, cfg.compute_dtype) == ("t5-3b", "nf4", True, "bf16")
    assert (cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout) == (32, 16.0, 0.05)
    assert cfg.lora_targets == ["v", "o"] and cfg.modules_to_save == ["lm_head"]
    assert (cfg.optimizer, cfg.lr, cfg.batch_size, cfg.epochs) == ("paged_adamw_8bit", 2e-5, 4, 4.0)
    assert (cfg.dataset, cfg.dataset_split, cfg.eval_ratio) == ("billsum", "ca_test", 0.2)
    assert (cfg.max_source_tokens, cfg.max_target_tokens, cfg.source_prefix) == (1024, 128, "summarize: ")


def test_demo_yaml_matches_the_demo_command():
    from dataclasses import asdict

    shipped = asdict(argparsing.resolve(TrainConfig, str(Path(CONFIGS[0]).with_name("demo.yaml")), {}))
    built = asdict(demo_config("runs/demo"))
    differing = {k for k in built if built[k] != shipped[k]}
    assert differing <= {"overwrite"}, {k: (built[k], shipped[k]) for k in differing}  # the command may rerun


def test_unknown_key_without_a_likely_meaning_lists_the_valid_keys(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("zzz_unheard_of: 8\n")
    with pytest.raises(SumtuneError, match="'zzz_unheard_of'.*valid keys are:.*lora_r"):
        argparsing.resolve(TrainConfig, str(path), {})


@pytest.mark.parametrize("key, meant", [
    ("learning_rate", "lr"), ("num_train_epochs", "epochs"), ("per_device_train_batch_size", "batch_size"),
    ("gradient_accumulation_steps", "grad_accum_steps"), ("lr_scheduler_type", "lr_schedule"),
    ("per_device_eval_batch_size", "eval_batch_size"), ("save_total_limit", "keep_last_checkpoints"),
    ("generation_num_beams", "num_beams"), ("max_source_length", "max_source_tokens"),
    ("lora_rank", "lora_r"), ("max-steps", "max_steps"), ("warmup", "warmup_steps"), ("lr_shedule", "lr_schedule"),
])
def test_unknown_key_says_what_it_most_likely_meant(tmp_path, key, meant):
    path = tmp_path / "c.yaml"
    path.write_text(f"{key}: 3\n")
    with pytest.raises(SumtuneError) as err:
        argparsing.resolve(TrainConfig, str(path), {})
    assert str(err.value) == f"Unknown key {key!r} (did you mean {meant!r}?) in config file {str(path)!r}."


def test_every_hugging_face_name_points_at_a_real_field():
    fields = set(argparsing.field_types(TrainConfig))
    assert not {hf: ours for hf, ours in argparsing.HF_NAMES.items() if ours not in fields}


def test_api_dict_keys_get_the_same_suggestion():
    from sumtune.api import as_config

    with pytest.raises(SumtuneError, match=r"Unknown key 'learning_rate' \(did you mean 'lr'\?\) in the config\."):
        as_config({"learning_rate": 1e-3})


@pytest.mark.parametrize("key, value, message", [
    ("lora_r", "eight", "`lora_r` must be an integer"),
    ("lr", [1], "`lr` must be a number"),
    ("double_quant", "maybe", "`double_quant` must be true/false"),
    ("quantization", "nf3", "`quantization` must be one of nf4, fp4, int8, none"),
    ("lora_targets", 5, "`lora_targets` must be a list"),
])
def test_wrong_types_are_refused_naming_the_key(tmp_path, key, value, message):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({key: value}))
    with pytest.raises(SumtuneError, match=message):
        argparsing.resolve(TrainConfig, str(path), {})


@pytest.mark.parametrize("key, value", [("lora_r", 0), ("lr", 0.0), ("max_target_tokens", 0), ("eval_ratio", 1.0),
                                        ("eval_ratio", 0.0), ("batch_size", -1)])
def test_out_of_range_values_are_refused(key, value):
    with pytest.raises(SumtuneError, match=f"`{key}`"):
        argparsing.from_mapping(TrainConfig, {key: value})


def test_command_line_overrides_yaml(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("lora_r: 8\nlr: 0.001\nlora_targets: [q, v]\n")
    cfg = argparsing.resolve(TrainConfig, str(path), {"lr": "5e-4", "lora_targets": ["o"]})
    assert (cfg.lora_r, cfg.lr, cfg.lora_targets) == (8, 5e-4, ["o"])


def test_cli_reports_config_errors_in_one_line_with_status_2(tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_text("learning_rate: 1\n")
    assert main(["train", "--config", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "learning_rate" in err[0] and "Traceback" not in err[0]


def test_yaml_round_trip(tmp_path):
    cfg = TrainConfig(lora_r=8, lora_targets=["q", "v"], max_steps=3)
    argparsing.write_yaml(cfg, tmp_path / "config.yaml")
    assert argparsing.resolve(TrainConfig, str(tmp_path / "config.yaml"), {}) == cfg


def test_every_field_has_a_docstring():
    docs = argparsing.field_docs(TrainConfig)
    missing = [name for name in argparsing.field_types(TrainConfig) if not docs.get(name)]
    assert not missing


FLOAT_FIELDS = [name for name, tp in argparsing.field_types(TrainConfig).items()
                if argparsing._unwrap_optional(tp)[0] is float]


YAML_SPELLING = {"nan": ".nan", "inf": ".inf", "-inf": "-.inf"}


@pytest.mark.parametrize("value", list(YAML_SPELLING))
@pytest.mark.parametrize("key", FLOAT_FIELDS)
def test_non_finite_numbers_are_refused_in_every_float_field(key, value):
    """NaN passes every `x <= 0` check and inf most range checks: each float field refuses both, from the command
    line, from YAML (.nan, .inf) and from Python alike."""
    assert {"lr", "epochs", "max_grad_norm", "lora_alpha", "weight_decay"} <= set(FLOAT_FIELDS)
    message = rf"^`{key}` must be a finite number, got -?{value.lstrip('-')}\.$"
    with pytest.raises(SumtuneError, match=message):
        argparsing.from_mapping(TrainConfig, {key: value})
    with pytest.raises(SumtuneError, match=message):
        argparsing.from_mapping(TrainConfig, yaml.safe_load(f"{key}: {YAML_SPELLING[value]}"))
    with pytest.raises(SumtuneError, match=message):
        TrainConfig(**{key: float(value)})


@pytest.mark.parametrize("seed, ok", [(0, True), (2**64 - 1, True), (2**64, False), (-1, False), (10**30, False)])
def test_seed_range_is_torchs(seed, ok):
    import torch

    if ok:
        torch.manual_seed(TrainConfig(seed=seed).seed)
    else:
        with pytest.raises(SumtuneError, match=rf"^`seed` must be between 0 and 2\^64 - 1 \(\d+\), got {seed}\.$"):
            TrainConfig(seed=seed)


@pytest.mark.parametrize("values, message", [
    ({"min_new_tokens": -1}, "`min_new_tokens` must not be negative"),
    ({"min_new_tokens": 50, "max_target_tokens": 32}, r"`min_new_tokens` \(50\) is larger than `max_new_tokens` \(32\)"),
    ({"no_repeat_ngram_size": -2}, "`no_repeat_ngram_size` must not be negative"),
    ({"early_stopping_patience": 0}, "`early_stopping_patience` must be greater than 0 or none"),
    ({"report_to": ["none", "wandb"]}, "`report_to` lists `none` with other trackers"),
    ({"report_to": ["comet"]}, "`report_to` must be one of tensorboard, wandb, mlflow, none"),
    ({"license": " "}, "`license` must not be empty"),
    ({"lora_in_base_gemm": True}, "`lora_in_base_gemm` works inside `fused_lora`"),
    ({"lora_in_base_gemm": True, "fused_lora": True, "fast_kernels": False}, "`lora_in_base_gemm` works inside"),
])
def test_generation_tracker_and_stopping_settings_are_checked(values, message):
    with pytest.raises(SumtuneError, match=message):
        argparsing.from_mapping(TrainConfig, values)


def test_generation_settings_take_the_runs_and_the_given_ones():
    from sumtune.config import GenerationSettings

    cfg = TrainConfig(max_target_tokens=40, num_beams=2, no_repeat_ngram_size=3)
    assert GenerationSettings.of(cfg) == GenerationSettings(max_new_tokens=40, num_beams=2, no_repeat_ngram_size=3)
    assert GenerationSettings.of(cfg, num_beams=None, min_new_tokens=5, length_penalty=0.5).kwargs() == {
        "max_new_tokens": 40, "num_beams": 2, "min_new_tokens": 5, "length_penalty": 0.5, "no_repeat_ngram_size": 3}


def test_the_shipped_speed_configs_use_the_measured_settings():
    """The two T5-3b configs ship what benchmarks/results measured fastest under 75 GiB (README "Speed")."""
    for name in ("t5-3b-billsum.yaml", "t5-3b-billsum-long.yaml"):
        cfg = argparsing.resolve(TrainConfig, str(Path(CONFIGS[0]).with_name(name)), {})
        assert (cfg.lora_dropout, cfg.fused_lora, cfg.cuda_graphs, cfg.compile) == (0.0, True, True, False), name
        assert cfg.max_memory_gib == 75 and cfg.optimizer == "adamw" and not cfg.gradient_checkpointing, name
        assert cfg.fused_ffn_dropout and cfg.fused_gated_ffn and cfg.attention_backend == "auto", name  # 2026-12-01
        assert cfg.cache_dequantized_weights == "auto", name  # on when it fits: +2.7% at 1024, +1% at 4096
