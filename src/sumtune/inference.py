"""Use a trained run: load base + adapter, summarize text, merge the adapter into a plain model."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Sequence

from sumtune import argparsing
from sumtune.config import GenerationSettings, TrainConfig
from sumtune.errors import SumtuneError
from sumtune.modeling import enable_fast_path, load_model, model_source, resolve_device, run_base_dir
from sumtune.safe_io import check_json_file, check_output_location, check_safetensors, require_dir


def check_generation_options(**values: int | None) -> None:
    """`0` or less is refused, never silently replaced by the run's default (None means: the run's own)."""
    for name, value in values.items():
        if value is not None and value <= 0:
            raise SumtuneError(f"`{name}` must be greater than 0, got {value}.")


# What a run pushed with `sumtune push` holds that loading it needs (no plots, metrics or pickles).
RUN_FILES = ("adapter_config.json", "adapter_model.safetensors", "config.yaml", "README.md", "tokenizer.json",
             "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "spiece.model", "vocab.json",
             "vocab.txt", "merges.txt")


def fetch_run(name: str | Path, *, allow_pickle: bool = False) -> Path:
    """A run directory: `name` itself when it is a local path, else the hub repository `name` (what `sumtune push`
    uploaded), downloaded into (or read from) the Hugging Face cache. Failing that, one sentence."""
    from sumtune.modeling import looks_like_path

    if isinstance(name, Path) or looks_like_path(str(name)):
        return require_dir(name, "Run directory")
    from sumtune.push import hub_failures, hub_offline

    try:
        import huggingface_hub

        return Path(huggingface_hub.snapshot_download(
            str(name), repo_type="model",
            allow_patterns=list(RUN_FILES) + (["adapter_model.bin"] if allow_pickle else [])))
    except hub_failures() as err:
        why = ("the hub is switched off (HF_HUB_OFFLINE=1) with no copy of it in the local cache" if hub_offline()
               else f"the hub could not be reached or has no such repository ({type(err).__name__})")
        raise SumtuneError(f"Cannot load run {str(name)!r}: there is no such local directory, and {why}.") from None


def read_run_config(run_dir: str | Path) -> TrainConfig:
    """The run's config.yaml: what it was trained with. Its `trust_remote_code` and `allow_pickle` are never
    acted on: a run directory travels with the weights those settings would vouch for (see `load_run`)."""
    run = require_dir(run_dir, "Run directory")
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
    """An adapter is read from adapter_model.safetensors (whole: a damaged one is named); a pickle-only adapter
    only with `allow_pickle`."""
    check_json_file(adapter / "adapter_config.json", "Adapter config")
    if (adapter / "adapter_model.safetensors").is_file():
        check_safetensors(adapter / "adapter_model.safetensors", "Adapter weights file")
        return
    if not (adapter / "adapter_model.bin").is_file():
        raise SumtuneError(f"{str(adapter)!r} holds no adapter weights (adapter_model.safetensors is missing).")
    if not allow_pickle:
        raise SumtuneError(f"The adapter in {str(adapter)!r} is a pickle file (adapter_model.bin), which can run "
                           f"code when loaded; re-save it as safetensors, or allow pickle if you trust its source.")


def load_run_tokenizer(run: Path, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(run), trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:  # a damaged tokenizer file, or one that needs remote code
        detail = str(err).strip().splitlines()[0][:200].rstrip(".") if str(err).strip() else type(err).__name__
        raise SumtuneError(f"Cannot load the tokenizer saved in {str(run)!r} ({detail}).") from None


def load_run(run_dir: str | Path, *, device: str = "auto", adapter_dir: str | Path | None = None,
             fast_kernels: bool | None = None, allow_pickle: bool = False, trust_remote_code: bool = False,
             progress: bool = True):
    """(model, tokenizer, cfg) for a run directory: the quantized base with the trained adapter on top.

    Only safetensors weights are read unless `allow_pickle`, and model code from a repository runs only with
    `trust_remote_code`: both come from the caller, never from the run's own config.yaml, which travels with
    the weights and code it would vouch for. `progress`: the libraries' loading bars, on a terminal only.
    """
    from peft import PeftModel

    from sumtune.modeling import check_model_source
    from sumtune.progress import Progress

    Progress(enabled=progress)  # without bars (off, or no terminal), transformers' loading bars are silenced too

    run = require_dir(run_dir, "Run directory").resolve()
    cfg = replace(read_run_config(run), allow_pickle=allow_pickle, trust_remote_code=trust_remote_code)
    adapter = Path(adapter_dir).expanduser().resolve() if adapter_dir else run
    check_adapter_dir(adapter, allow_pickle)
    check_model_source(base_model_source(cfg, run).model, allow_pickle=allow_pickle)  # damaged base: named now
    dev = resolve_device(device)
    tokenizer = load_run_tokenizer(run, trust_remote_code)
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
    def from_pretrained(cls, run: str | Path, *, device: str = "auto", allow_pickle: bool = False,
                        trust_remote_code: bool = False, progress: bool = True) -> "Summarizer":
        """Load a run directory, or a hub repository a run was pushed to (`sumtune push`; cached like any hub
        model, so it also loads offline once downloaded). `progress`: loading bars on a terminal only."""
        run_dir = fetch_run(run, allow_pickle=allow_pickle)
        return cls(*load_run(run_dir, device=device, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code,
                             progress=progress))

    def generation_settings(self, **overrides) -> GenerationSettings:
        """The run's generation settings with the given ones (None: the run's) in their place."""
        return GenerationSettings.of(self.cfg, **overrides)

    def summarize(self, texts: str | Sequence[str], *, max_new_tokens: int | None = None, num_beams: int | None = None,
                  batch_size: int | None = None, min_new_tokens: int | None = None,
                  length_penalty: float | None = None, no_repeat_ngram_size: int | None = None,
                  progress: bool = True) -> list[str]:
        """Summaries of `texts`, in order. Generation settings left None are the run's (its config.yaml);
        `progress` draws a bar when stderr is a terminal."""
        import torch

        from sumtune.generation.summaries import generate_summaries, inference_copy
        from sumtune.progress import Progress

        check_generation_options(max_new_tokens=max_new_tokens, num_beams=num_beams, batch_size=batch_size)
        settings = self.generation_settings(max_new_tokens=max_new_tokens, num_beams=num_beams,
                                            min_new_tokens=min_new_tokens, length_penalty=length_penalty,
                                            no_repeat_ngram_size=no_repeat_ngram_size)
        if isinstance(texts, str):
            texts = [texts]
        if not texts:
            return []
        if not self._dense_ready:
            self._dense, self._dense_ready = inference_copy(self.model), True
        batch_size = self.cfg.eval_batch_size if batch_size is None else batch_size
        try:
            summaries, _ = generate_summaries(
                self.model, self.tokenizer, list(texts), prefix=self.cfg.source_prefix,
                max_source_tokens=self.cfg.max_source_tokens, batch_size=batch_size, dense_model=self._dense,
                progress=Progress(enabled=progress) if progress else None, **settings.kwargs())
            return summaries
        except torch.cuda.OutOfMemoryError:
            message = summaries_oom_message(batch_size, settings, self.cfg.max_source_tokens, self.model)
        self.release()  # the decoding buffers a failed batch left behind
        raise SumtuneError(message)  # outside the except block: the OOM traceback (and its tensors) is freed

    def release(self) -> None:
        """Free the dense copy and its decoding buffers (CUDA graphs included); the next call makes them again."""
        if self._dense is not None:
            from sumtune.generation import release_generation_cache

            release_generation_cache(self._dense)
        self._dense, self._dense_ready = None, False


def summaries_oom_message(batch_size: int, settings: GenerationSettings, source_tokens: int, model) -> str:
    """One sentence for running out of GPU memory while `summarize` or `evaluate` generates (their --batch-size)."""
    from sumtune.faults import eval_oom_message

    return eval_oom_message(eval_batch_size=batch_size, num_beams=settings.num_beams,
                            max_new_tokens=settings.max_new_tokens, source_tokens=source_tokens,
                            device=next(model.parameters()).device, what="summaries", batch_option="--batch-size")


def merged_generation_settings(settings: GenerationSettings) -> dict:
    """The run's generation settings as a merged model's generation_config holds them (never transformers'
    20-token default): options that are off are left out, and length_penalty unless beams are searched
    (transformers warns about it on greedy decoding)."""
    values = settings.kwargs()
    for key in ("min_new_tokens", "no_repeat_ngram_size"):
        if not values[key]:
            del values[key]
    if settings.num_beams == 1:
        del values["length_penalty"]
    return values


def merge_run(run_dir: str | Path, out_dir: str | Path, *, dtype: str = "bf16", device: str = "auto",
              allow_pickle: bool = False, trust_remote_code: bool = False, progress: bool = True) -> Path:
    """Write base (dequantized) + merged LoRA as a plain transformers model that `pipeline()` loads as it is,
    with a model card (README.md) that `sumtune push` uploads.

    The model is written into a hidden sibling of `out_dir` and renamed into place when whole."""
    import json

    from sumtune.checkpoint import atomic_directory
    from sumtune.modelcard import render_merged_card
    from sumtune.modeling import DTYPES
    from sumtune.progress import Progress

    out = check_output_location(out_dir, "Output directory")  # before the long load: a path it can write
    if out.is_dir() and any(out.iterdir()):
        raise SumtuneError(f"Output directory {str(out)!r} is not empty; choose a new directory for the merged model.")
    model, tokenizer, cfg = load_run(run_dir, device=device, fast_kernels=False, allow_pickle=allow_pickle,
                                     trust_remote_code=trust_remote_code, progress=progress)
    from sumtune.generation import prepare_inference_model

    # A fresh dense model: base dequantized, LoRA merged in fp32, then cast (merging into 4-bit weights would
    # re-quantize the update away). A trained lm_head copy becomes its own tensor, saved beside the embeddings.
    merged = prepare_inference_model(model, DTYPES[dtype])  # its config has no quantization, dtype set
    merged.is_loaded_in_4bit = merged.is_loaded_in_8bit = False
    merged.hf_quantizer = None
    settings = merged_generation_settings(GenerationSettings.of(cfg))
    for key, value in settings.items():
        setattr(merged.generation_config, key, value)
    # pipeline("summarization") prepends this prefix for T5 (task_specific_params), as the adapter was trained.
    merged.config.task_specific_params = {"summarization": {"prefix": cfg.source_prefix, **settings}}
    merged.config.prefix = cfg.source_prefix
    tokenizer.model_max_length = cfg.max_source_tokens  # pipelines truncate where training did
    run = Path(run_dir).expanduser()
    try:
        metrics = json.loads((run / "eval" / "metrics.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        metrics = None
    card = render_merged_card(cfg, metrics if isinstance(metrics, dict) else None,
                              getattr(merged.config, "model_type", None), dtype)
    with atomic_directory(out) as tmp:
        merged.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / "README.md").write_text(card, encoding="utf-8")
    return out
