"""The tiny training run the reliability tests (tests/test_reliability_*.py) interrupt, break and resume, and its
config. The `config_path` fixture (this config written once per test module) is in tests/conftest.py."""

from __future__ import annotations

from pathlib import Path

import yaml

from sumtune import argparsing
from sumtune.config import TrainConfig


# 36 train rows, micro-batch 4: 9 micro-batches per epoch, so 10 steps cross an epoch boundary; dropout on,
# rank 8 gives LoRA weights of 4096 elements, which bitsandbytes keeps in real 8-bit optimizer state.
RUN_CONFIG = dict(
    model="tiny", dataset="demo", max_samples=40, eval_ratio=0.1, quantization="nf4", compute_dtype="fp32",
    lora_r=8, lora_dropout=0.1, max_source_tokens=32, max_target_tokens=8, batch_size=4, max_steps=10,
    checkpoint_every_steps=3, keep_last_checkpoints=2, eval_every_steps=1000, eval_max_samples=2,
    eval_batch_size=2, max_new_tokens=4, log_every_steps=1, lr=3e-3, warmup_steps=2,
    optimizer="paged_adamw_8bit", device="cpu", progress=False, seed=1,
)
def write_config(path: Path, **overrides) -> Path:
    path.write_text(yaml.safe_dump({**RUN_CONFIG, **overrides}), encoding="utf-8")
    return path


def config(config_path: Path, out: Path, **overrides) -> TrainConfig:
    return argparsing.resolve(TrainConfig, str(config_path), {"output_dir": str(out), **overrides})
