"""Small helpers of the training recipe: seeding, autocast, peak memory, sources, model set-up pieces."""

from __future__ import annotations

import contextlib
import random
import resource
from pathlib import Path

import torch

from sumtune import checkpoint
from sumtune.config import TrainConfig
from sumtune.modeling import DTYPES


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def peak_memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


def autocast(device: torch.device, compute_dtype: str):
    if compute_dtype == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=DTYPES[compute_dtype])


def describe_source(source: str | None) -> str:
    """A data or model source as the user should see it: local paths resolved, names as they are."""
    if not source:
        return "-"
    path = Path(source).expanduser()
    return str(path.resolve()) if path.exists() else source


def tiny_base_dir(run_dir: str | Path) -> Path:
    """Where a run on the `tiny` model keeps its own base (random weights exist nowhere else)."""
    return Path(run_dir) / "base_model"


def materialize_tiny_base(cfg: TrainConfig, tokenizer, run_dir: Path) -> str:
    """Save the random tiny T5 as a real model directory, then load it like any checkpoint.

    The run then carries its own base model, so evaluate/summarize/merge and PEFT find it again.
    """
    from transformers import T5ForConditionalGeneration

    from sumtune.modeling import t5_config

    target = tiny_base_dir(run_dir)
    if (target / "model.safetensors").is_file():  # a resumed run keeps the base it started with
        return str(target)
    config = t5_config("tiny", vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                       eos_token_id=tokenizer.eos_token_id, decoder_start_token_id=tokenizer.pad_token_id)
    torch.manual_seed(cfg.seed)
    with checkpoint.atomic_directory(target) as tmp:  # never a half-written base that a resume would reuse
        T5ForConditionalGeneration(config).save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return str(target)


def enable_fast_path(model):
    """sumtune's fast T5 kernels when the model is a T5 and the module is available; the stock path otherwise."""
    from transformers.models.t5.modeling_t5 import T5Stack

    from sumtune import fast_t5

    if not any(isinstance(m, T5Stack) for m in model.modules()):
        return model  # other seq2seq models (BART, Pegasus ...) train on transformers' own code
    return fast_t5.enable_fast_t5(model)
