"""Use a trained run: load base + adapter, summarize text, merge the adapter into a plain model."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Sequence

from sumtune import argparsing
from sumtune.config import TrainConfig
from sumtune.errors import SumtuneError
from sumtune.modeling import enable_fast_path, load_model, model_source, resolve_device, run_base_dir


def read_run_config(run_dir: str | Path) -> TrainConfig:
    run = Path(run_dir).expanduser()
    if not run.is_dir():
        raise SumtuneError(f"Run directory {str(run)!r} does not exist.")
    if not (run / "adapter_config.json").is_file():
        raise SumtuneError(f"{str(run)!r} holds no trained adapter (adapter_config.json is missing).")
    if not (run / "config.yaml").is_file():
        raise SumtuneError(f"{str(run)!r} has no config.yaml: it was not written by `sumtune train`.")
    return argparsing.from_mapping(TrainConfig, argparsing.read_yaml(run / "config.yaml"),
                                   source=f"{run / 'config.yaml'}")


def base_model_source(cfg: TrainConfig, run_dir: Path) -> TrainConfig:
    """The run's base model: the copy the run saved when its weights exist nowhere else (a `tiny` run)."""
    if model_source(cfg.model).saved_in_run:
        return replace(cfg, model=str(run_base_dir(run_dir)))
    return cfg


def check_adapter_dir(adapter: Path, allow_pickle: bool) -> None:
    """An adapter is read from adapter_model.safetensors; a pickle-only adapter only with `allow_pickle`."""
    if (adapter / "adapter_model.safetensors").is_file():
        return
    if not (adapter / "adapter_model.bin").is_file():
        raise SumtuneError(f"{str(adapter)!r} holds no adapter weights (adapter_model.safetensors is missing).")
    if not allow_pickle:
        raise SumtuneError(f"The adapter in {str(adapter)!r} is a pickle file (adapter_model.bin), which can run "
                           f"code when loaded; re-save it as safetensors, or allow pickle if you trust its source.")


def load_run(run_dir: str | Path, *, device: str = "auto", adapter_dir: str | Path | None = None,
             fast_kernels: bool | None = None, allow_pickle: bool = False):
    """(model, tokenizer, cfg) for a run directory: the quantized base with the trained adapter on top.

    Only safetensors weights are read unless `allow_pickle` (never taken from the run's own config.yaml,
    which travels with the weights it would vouch for).
    """
    from peft import PeftModel
    from transformers import AutoTokenizer

    run = Path(run_dir).expanduser().resolve()
    cfg = replace(read_run_config(run), allow_pickle=allow_pickle)
    adapter = Path(adapter_dir).expanduser().resolve() if adapter_dir else run
    check_adapter_dir(adapter, allow_pickle)
    dev = resolve_device(device)
    tokenizer = AutoTokenizer.from_pretrained(str(run))
    base = load_model(base_model_source(cfg, run), vocab_size=len(tokenizer), device=dev)
    if "lm_head" in cfg.modules_to_save:
        from sumtune.lora import untie_output_head

        untie_output_head(base)
    try:
        model = PeftModel.from_pretrained(base, str(adapter), is_trainable=False)
    except (RuntimeError, ValueError, KeyError) as err:
        lines = [line.strip() for line in str(err).splitlines() if line.strip()] or [""]
        detail = next((line for line in lines if "size mismatch" in line), lines[0])  # the telling line
        raise SumtuneError(f"The adapter in {str(adapter)!r} does not fit base model {cfg.model!r} "
                           f"({type(err).__name__}: {detail[:300].rstrip('.')}).") from None
    model.to(dev).eval()
    if cfg.fast_kernels if fast_kernels is None else fast_kernels:
        model = enable_fast_path(model)
    return model, tokenizer, cfg


class Summarizer:
    """Summarize text with a trained run: `Summarizer.from_pretrained(run_dir).summarize(texts)`.

    The first call makes the dense copy sumtune's T5 decoder runs on (base dequantized, adapter merged) and keeps
    it, with its decoding buffers, for later calls: `release()` frees them (they are made again when needed).
    Change `summarizer.model` only after `release()`, or the copy goes on summarizing with the old weights.
    """

    def __init__(self, model, tokenizer, cfg: TrainConfig):
        self.model, self.tokenizer, self.cfg = model, tokenizer, cfg
        self._dense = None  # the decoder's dense copy, made on first use: the loaded weights never change
        self._dense_ready = False

    @classmethod
    def from_pretrained(cls, run_dir: str | Path, *, device: str = "auto", allow_pickle: bool = False) -> "Summarizer":
        return cls(*load_run(run_dir, device=device, allow_pickle=allow_pickle))

    def summarize(self, texts: str | Sequence[str], *, max_new_tokens: int | None = None, num_beams: int | None = None,
                  batch_size: int | None = None) -> list[str]:
        from sumtune.generation.summaries import generate_summaries, inference_copy

        if isinstance(texts, str):
            texts = [texts]
        if not texts:
            return []
        if not self._dense_ready:
            self._dense, self._dense_ready = inference_copy(self.model), True
        summaries, _ = generate_summaries(
            self.model, self.tokenizer, list(texts), prefix=self.cfg.source_prefix,
            max_source_tokens=self.cfg.max_source_tokens,
            max_new_tokens=max_new_tokens or self.cfg.generation_max_new_tokens,
            num_beams=num_beams or self.cfg.num_beams, batch_size=batch_size or self.cfg.eval_batch_size,
            dense_model=self._dense)
        return summaries

    def release(self) -> None:
        """Free the dense copy and its decoding buffers (CUDA graphs included); the next call makes them again."""
        if self._dense is not None:
            from sumtune.generation import release_generation_cache

            release_generation_cache(self._dense)
        self._dense, self._dense_ready = None, False


def merge_run(run_dir: str | Path, out_dir: str | Path, *, dtype: str = "bf16", device: str = "auto",
              allow_pickle: bool = False) -> Path:
    """Write base (dequantized) + merged LoRA as a plain transformers model that `pipeline()` loads as it is."""
    from sumtune.modeling import DTYPES

    out = Path(out_dir).expanduser()
    if out.exists() and any(out.iterdir()):
        raise SumtuneError(f"Output directory {str(out)!r} is not empty; choose a new directory for the merged model.")
    model, tokenizer, cfg = load_run(run_dir, device=device, fast_kernels=False, allow_pickle=allow_pickle)
    from sumtune.generation import prepare_inference_model

    # A fresh dense model: base dequantized, LoRA merged in fp32, then cast (merging into 4-bit weights would
    # re-quantize the update away). A trained lm_head copy becomes its own tensor, saved beside the embeddings.
    merged = prepare_inference_model(model, DTYPES[dtype])  # its config has no quantization, dtype set
    merged.is_loaded_in_4bit = merged.is_loaded_in_8bit = False
    merged.hf_quantizer = None
    merged.generation_config.max_new_tokens = cfg.generation_max_new_tokens  # not transformers' 20-token default
    merged.generation_config.num_beams = cfg.num_beams
    # pipeline("summarization") prepends this prefix for T5 (task_specific_params), as the adapter was trained.
    merged.config.task_specific_params = {"summarization": {"prefix": cfg.source_prefix,
                                                            "max_new_tokens": cfg.generation_max_new_tokens,
                                                            "num_beams": cfg.num_beams}}
    merged.config.prefix = cfg.source_prefix
    out.mkdir(parents=True, exist_ok=True)
    merged.save_pretrained(out, safe_serialization=True)
    tokenizer.model_max_length = cfg.max_source_tokens  # pipelines truncate where training did
    tokenizer.save_pretrained(out)
    return out
