"""Load a seq2seq base model (hub id, local directory, or a random T5 of known shape) and quantize it.

Two routes end in the same place, a frozen model whose linear layers are bitsandbytes layers:
- real weights go through `from_pretrained(..., quantization_config=BitsAndBytesConfig(...))`;
- `tiny` and `random:<name>` models are built from a `T5Config` and quantized in place (no hub, no disk).
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Literal

import torch
from torch import nn

from sumtune.errors import SumtuneError

if TYPE_CHECKING:
    from sumtune.config import TrainConfig

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}

# Shapes of the released checkpoints (all: 32 position buckets, maximum distance 128, vocab 32128), and `tiny`: a
# small T5 for demos and tests. Released T5s train with dropout 0.1; the tiny random model learns faster without.
# T5 v1.1 / FLAN-T5 (the published google/flan-t5-* config.json): a gated-GELU feed-forward (wi_0, wi_1) and an
# output head with its own weight, not tied to the embeddings.
_GATED_UNTIED = dict(feed_forward_proj="gated-gelu", tie_word_embeddings=False)
T5_SHAPES: dict[str, dict] = {
    "tiny": dict(d_model=128, d_ff=512, d_kv=32, num_heads=4, num_layers=2, dropout_rate=0.0),
    # the original T5: relu feed-forward, output head tied to the embeddings
    "t5-small": dict(d_model=512, d_ff=2048, d_kv=64, num_heads=8, num_layers=6, dropout_rate=0.1),
    "t5-base": dict(d_model=768, d_ff=3072, d_kv=64, num_heads=12, num_layers=12, dropout_rate=0.1),
    "t5-large": dict(d_model=1024, d_ff=4096, d_kv=64, num_heads=16, num_layers=24, dropout_rate=0.1),
    "t5-3b": dict(d_model=1024, d_ff=16384, d_kv=128, num_heads=32, num_layers=24, dropout_rate=0.1),
    "t5-11b": dict(d_model=1024, d_ff=65536, d_kv=128, num_heads=128, num_layers=24, dropout_rate=0.1),
    # FLAN-T5 (T5 v1.1 shapes)
    "flan-t5-base": dict(d_model=768, d_ff=2048, d_kv=64, num_heads=12, num_layers=12, dropout_rate=0.1,
                         **_GATED_UNTIED),
    "flan-t5-large": dict(d_model=1024, d_ff=2816, d_kv=64, num_heads=16, num_layers=24, dropout_rate=0.1,
                          **_GATED_UNTIED),
    "flan-t5-xl": dict(d_model=2048, d_ff=5120, d_kv=64, num_heads=32, num_layers=24, dropout_rate=0.1,
                       **_GATED_UNTIED),
}
T5_VOCAB_SIZE = 32128
RUN_BASE_DIR = "base_model"  # where a run on the `tiny` model keeps its base (see ModelSource.saved_in_run)


def resolve_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise SumtuneError("`device: cuda` was asked for, but no CUDA GPU is visible.")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def autocast(device: torch.device, compute_dtype: str, cache_enabled: bool = True):
    """The autocast context of `compute_dtype` on `device` (none for fp32)."""
    if compute_dtype == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=DTYPES[compute_dtype], cache_enabled=cache_enabled)


# ---- what a `model` setting names -------------------------------------------------------------------------

@dataclass(frozen=True)
class ModelSource:
    """What a `model` setting names, decided here once (first match): `tiny`, `random:<shape>`, a local
    directory, or a hub id. Everything that treats these differently asks this object.

    - `random`: weights built from `shape` (no files, no tokenizer of their own: a word tokenizer is built);
    - `saved_in_run`: the random weights exist nowhere else, so a run saves them under RUN_DIR/base_model and
      every later command loads that copy (`tiny`; a `random:` model is for benchmarks and is not kept);
    - `full_vocab`: a random model with a real T5's vocabulary size (true shapes for FLOPs and memory), not the
      word tokenizer's;
    - `hub_id`: the id to credit as `base_model` (hub models only).
    """

    name: str
    kind: Literal["tiny", "random", "local", "hub"]
    shape: str | None = None

    @property
    def random(self) -> bool:
        return self.kind in ("tiny", "random")

    @property
    def saved_in_run(self) -> bool:
        return self.kind == "tiny"

    @property
    def full_vocab(self) -> bool:
        return self.kind == "random"

    @property
    def hub_id(self) -> str | None:
        return self.name if self.kind == "hub" else None

    def vocab_size(self, tokenizer_size: int) -> int:
        """A random model's vocabulary: the tokenizer's, or at least a real T5's (`full_vocab`)."""
        return max(tokenizer_size, T5_VOCAB_SIZE) if self.full_vocab else tokenizer_size


def model_source(name: str) -> ModelSource:
    if name == "tiny":
        return ModelSource(name, "tiny", "tiny")
    if name.startswith("random:"):
        shape = name.removeprefix("random:")
        if shape not in T5_SHAPES or shape == "tiny":
            raise SumtuneError(f"Unknown random model {name!r}; use `tiny` or "
                               f"random:<{'|'.join(s for s in T5_SHAPES if s != 'tiny')}>.")
        return ModelSource(name, "random", shape)
    kind = "local" if looks_like_path(name) else "hub"
    base = name.rstrip("/").rsplit("/", 1)[-1]
    return ModelSource(name, kind, base if base in T5_SHAPES and base != "tiny" else None)


def run_base_dir(run_dir: str | Path) -> Path:
    """Where a run keeps a base model that exists nowhere else (`ModelSource.saved_in_run`)."""
    return Path(run_dir) / RUN_BASE_DIR


def t5_config(name: str, vocab_size: int = T5_VOCAB_SIZE, **overrides):
    """A `T5Config` with the shapes of a known T5 (`T5_SHAPES`, `tiny` included)."""
    from transformers import T5Config

    shape = T5_SHAPES.get(name)
    if shape is None:
        raise SumtuneError(f"Unknown T5 shape {name!r}; known: {', '.join(T5_SHAPES)}.")
    kwargs = dict(num_decoder_layers=shape["num_layers"], vocab_size=vocab_size,
                  feed_forward_proj="relu", relative_attention_num_buckets=32, relative_attention_max_distance=128,
                  layer_norm_epsilon=1e-6,
                  pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    kwargs.update(shape)
    kwargs.update(overrides)
    if "num_layers" in overrides and "num_decoder_layers" not in overrides:  # a shallower model: both stacks
        kwargs["num_decoder_layers"] = overrides["num_layers"]
    return T5Config(**kwargs)


# ---- quantization --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class QuantSettings:
    """How the frozen base is stored: the three settings quantization needs (`of(cfg)` reads a TrainConfig)."""

    kind: str = "nf4"  # nf4 | fp4 | int8 | none
    compute_dtype: str = "bf16"
    double_quant: bool = True

    @classmethod
    def of(cls, cfg: "TrainConfig") -> "QuantSettings":
        return cls(cfg.quantization, cfg.compute_dtype, cfg.double_quant)


def skipped_modules(compute_dtype: str) -> list[str]:
    """Linear layers left unquantized. `wo` stays in fp32 only for fp16 compute, where T5's FFN output overflows."""
    # The output head stays in the compute dtype: T5 ties it to the embeddings (quantizing it would quantize
    # their twin), and an untied head (FLAN-T5) is left unquantized as transformers' own 4-bit loading does.
    skip = ["lm_head"]
    if compute_dtype == "fp16":
        skip.append("wo")
    return skip


def bnb_config(quant: QuantSettings):
    """The transformers `BitsAndBytesConfig` for this run (None when not quantizing)."""
    if quant.kind == "none":
        return None
    from transformers import BitsAndBytesConfig

    if quant.kind == "int8":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skipped_modules(quant.compute_dtype))
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quant.kind,
        bnb_4bit_use_double_quant=quant.double_quant,
        bnb_4bit_compute_dtype=DTYPES[quant.compute_dtype],
        llm_int8_skip_modules=skipped_modules(quant.compute_dtype),
    )


def _quantized_linear(linear: nn.Linear, quant: QuantSettings, device: torch.device) -> nn.Module:
    import bitsandbytes as bnb

    weight = linear.weight.data
    if quant.kind == "int8":
        layer = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias=linear.bias is not None,
                                    has_fp16_weights=False, threshold=6.0, device="meta")
        layer.weight = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False)
    else:
        layer = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                                  compute_dtype=DTYPES[quant.compute_dtype], compress_statistics=quant.double_quant,
                                  quant_type=quant.kind, device="meta")  # no throw-away weight init
        layer.weight = bnb.nn.Params4bit(weight, requires_grad=False, compress_statistics=quant.double_quant,
                                         quant_type=quant.kind)
    if linear.bias is not None:
        layer.bias = nn.Parameter(linear.bias.data, requires_grad=False)
    return layer.to(device)  # moving a Params4bit/Int8Params to a device quantizes it


def quantize_in_place(model: nn.Module, quant: QuantSettings, device: torch.device,
                      skip: tuple[str, ...] | None = None) -> nn.Module:
    """Replace every nn.Linear but the skipped ones (default: `skipped_modules`) with a bitsandbytes layer."""
    if quant.kind == "none":
        return model.to(device)
    skip = set(skipped_modules(quant.compute_dtype) if skip is None else skip)
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if type(child) is nn.Linear and child_name not in skip:
                setattr(module, child_name, _quantized_linear(child, quant, device))
    model.to(device)
    model.is_loaded_in_4bit = quant.kind in ("nf4", "fp4")
    model.is_loaded_in_8bit = quant.kind == "int8"
    return model


@contextlib.contextmanager
def quantize_t5_wo(model_cls: type, keep_fp32_wo: bool) -> Iterator[None]:
    """transformers keeps T5's `wo` out of quantization (`_keep_in_fp32_modules`, ~3.2 GB on T5-3b).

    That guard exists for fp16 overflow; with bf16 compute it only costs memory, so lift it for the load.
    """
    owners = [k for k in model_cls.__mro__ if "_keep_in_fp32_modules" in vars(k)]
    saved = {k: vars(k)["_keep_in_fp32_modules"] for k in owners}
    try:
        if not keep_fp32_wo:
            for k in owners:
                k._keep_in_fp32_modules = None
        yield
    finally:
        for k, value in saved.items():
            k._keep_in_fp32_modules = value


def freeze(model: nn.Module) -> nn.Module:
    for param in model.parameters():
        param.requires_grad_(False)
    return model


# ---- loading --------------------------------------------------------------------------------------------

def looks_like_path(name: str) -> bool:
    """A local path (existing, or written like one); anything else is taken as a hub id."""
    return name.startswith((".", "/", "~")) or Path(name).expanduser().exists()


def has_untied_head(config) -> bool:
    """Whether the model's output head has weights of its own (FLAN-T5 / T5 v1.1), not the embeddings'.

    transformers 5's T5Config forces `tie_word_embeddings=True` and keeps a checkpoint's `False` only as
    `scale_decoder_outputs=False` (v1.1 neither ties nor scales); from_pretrained unties the head when the
    checkpoint holds both tensors, but a model built from the config alone comes out tied.
    """
    if getattr(config, "tie_word_embeddings", True) is False:  # other models, and transformers 4's T5
        return True
    return getattr(config, "model_type", "") == "t5" and getattr(config, "scale_decoder_outputs", True) is False


def untie_head_if_untied(model: nn.Module) -> nn.Module:
    """Give the output head its own weight (initialised as T5 initialises an untied head) where the config says
    it has one, so a model built from a FLAN-T5 config has FLAN-T5's parameters and memory."""
    head, embeddings = model.get_output_embeddings(), model.get_input_embeddings()
    if has_untied_head(model.config) and head is not None and head.weight is embeddings.weight:
        weight = torch.empty_like(embeddings.weight)
        if weight.device.type != "meta":
            weight.normal_(0.0, model.config.initializer_factor)
        head.weight = nn.Parameter(weight, requires_grad=embeddings.weight.requires_grad)
    return model


def build_random_model(cfg: "TrainConfig", vocab_size: int, device: torch.device) -> nn.Module:
    """A T5 with random weights and known shapes, quantized in place like a loaded one would be."""
    from transformers import T5ForConditionalGeneration

    source = model_source(cfg.model)
    if not source.random:
        raise SumtuneError(f"{cfg.model!r} is not a random model (`tiny` or random:<shape>).")
    config = t5_config(source.shape, vocab_size=source.vocab_size(vocab_size))
    torch.manual_seed(cfg.seed)
    dtype = DTYPES[cfg.compute_dtype]
    with torch.device(device if device.type == "cuda" else "cpu"):
        model = untie_head_if_untied(T5ForConditionalGeneration(config)).to(dtype)
    if cfg.compute_dtype == "fp16":
        for name_, module in model.named_modules():  # same dtype plan as from_pretrained with fp16
            if name_.endswith(".wo"):
                module.float()
    return freeze(quantize_in_place(model, QuantSettings.of(cfg), device))


PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")  # torch.load would unpickle these: never read


def pickle_files(directory: Path) -> list[str]:
    """Names of the pickle-format files in `directory` (sumtune refuses to load them unless told)."""
    return sorted(p.name for p in Path(directory).glob("*") if p.suffix in PICKLE_SUFFIXES)


def check_model_source(model: str, *, allow_pickle: bool = False) -> None:
    """Refuse a local model directory that is missing, not a saved model, damaged or pickle-only, before any long
    work. Pickle weights (pytorch_model.bin) can run arbitrary code when loaded: read only with `allow_pickle`.
    """
    from sumtune.safe_io import check_json_file, check_safetensors_in, require_dir

    if model_source(model).kind != "local":
        return
    local = require_dir(model, "Model directory").resolve()
    if not (local / "config.json").is_file():
        raise SumtuneError(f"Model directory {str(local)!r} has no config.json: it is not a saved model.")
    check_json_file(local / "config.json", "Model config")
    if list(local.glob("*.safetensors")):
        check_safetensors_in(local, "Model weights file")
        return
    pickled = pickle_files(local)
    if not pickled:
        raise SumtuneError(f"Model directory {str(local)!r} has no weights (no .safetensors file).")
    if not allow_pickle:
        raise SumtuneError(f"Model directory {str(local)!r} has only pickle weights ({', '.join(pickled)}), which "
                           f"can run code when loaded; convert them to safetensors, or pass --allow-pickle if you "
                           f"trust their source.")


def load_pretrained_model(cfg: "TrainConfig", device: torch.device) -> nn.Module:
    """`AutoModelForSeq2SeqLM.from_pretrained` from a hub id or a local directory, quantized on load."""
    from transformers import AutoConfig, AutoModelForSeq2SeqLM

    source = cfg.model
    local = Path(source).expanduser()
    if looks_like_path(source):
        check_model_source(cfg.model, allow_pickle=cfg.allow_pickle)
        source = str(local.resolve())
    try:
        config = AutoConfig.from_pretrained(source, trust_remote_code=cfg.trust_remote_code)
        model_cls = AutoModelForSeq2SeqLM._model_mapping[type(config)]
    except KeyError:
        raise SumtuneError(f"Model {cfg.model!r} is not an encoder-decoder (seq2seq) model.") from None
    except OSError as err:
        raise SumtuneError(_hub_error(cfg.model, err)) from None
    except ValueError as err:
        raise SumtuneError(_value_error(cfg.model, err)) from None
    dtype = DTYPES[cfg.compute_dtype]
    # safetensors only, unless pickle was allowed explicitly (then: safetensors when there, else pickle)
    kwargs = dict(dtype=dtype, use_safetensors=None if cfg.allow_pickle else True,
                  trust_remote_code=cfg.trust_remote_code)
    if cfg.quantization != "none":
        kwargs.update(quantization_config=bnb_config(QuantSettings.of(cfg)), device_map={"": device})
    # Only T5's own FFN is known to run a quantized `wo` correctly (with sumtune's fix_quantized_ffn).
    keep_fp32_wo = cfg.compute_dtype == "fp16" or getattr(config, "model_type", "") != "t5"
    with quantize_t5_wo(model_cls, keep_fp32_wo=keep_fp32_wo):
        try:
            model = AutoModelForSeq2SeqLM.from_pretrained(source, **kwargs)
        except OSError as err:
            raise SumtuneError(_hub_error(cfg.model, err)) from None
        except ValueError as err:
            raise SumtuneError(_value_error(cfg.model, err)) from None
        except Exception as err:
            if type(err).__name__ != "SafetensorError":  # a damaged file in the hub cache
                raise
            raise SumtuneError(f"A weights file of model {cfg.model!r} is damaged ({str(err)[:200]}); "
                               f"download it again.") from None
    if cfg.quantization == "none":
        model.to(device)
    return freeze(model)


def _value_error(name: str, err: ValueError) -> str:
    if "trust_remote_code" in str(err):
        return (f"Model {name!r} needs code from its own repository to load, which sumtune runs only when asked; "
                f"pass --trust-remote-code if you trust its source.")
    first = (str(err).strip().splitlines() or [type(err).__name__])[0][:200].rstrip(".")
    return f"Could not load model {name!r} ({first})."


def _hub_error(name: str, err: Exception) -> str:
    offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false")
    why = "the hub is switched off (HF_HUB_OFFLINE=1)" if offline else "the hub could not be reached or has no such model"
    return f"Could not load model {name!r}: it is not a local directory and {why}."


def load_model(cfg: "TrainConfig", vocab_size: int, device: torch.device) -> nn.Module:
    model = build_random_model(cfg, vocab_size, device) if model_source(cfg.model).random else \
        load_pretrained_model(cfg, device)
    if cfg.quantization != "none" and getattr(model.config, "model_type", "") == "t5":
        from sumtune.fast_t5 import fix_quantized_ffn

        fix_quantized_ffn(model)  # transformers' T5 FFN would cast activations to the 4-bit storage dtype
    if cfg.model_dropout is not None:
        set_model_dropout(model, cfg.model_dropout)
    keep_4bit_layout(model)
    return model


def keep_4bit_layout(model: nn.Module) -> int:
    """Stop bitsandbytes from repacking 4-bit weights for its AVX512-BF16 CPU kernel; returns the layers set.

    On such CPUs bnb 0.50's first eval-mode forward rewrites each Linear4bit weight in place into a
    blocked layout, and a later training forward on that layout runs an op with no autograd: the
    gradient stops there, silently (measured: input grad None after eval, then train). Evaluation
    inside a training run would break every step after it. No effect on GPUs, which never repack.
    """
    try:
        import bitsandbytes as bnb
    except ImportError:
        return 0
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    for layer in layers:
        layer.support_avx512bf16_for_cpu = False
    return len(layers)


def set_model_dropout(model: nn.Module, rate: float) -> nn.Module:
    """Set every dropout of the base model to `rate`: nn.Dropout layers, the attention-probability dropout
    that T5 (and BART) attention keeps as a float attribute, and the config field, so saved configs agree.
    Call before PEFT wraps the model: LoRA's own dropout is `lora_dropout`."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = rate
        elif isinstance(getattr(module, "dropout", None), float):
            module.dropout = rate
    for field_name in ("dropout_rate", "dropout", "attention_dropout"):
        if isinstance(getattr(model.config, field_name, None), float):
            setattr(model.config, field_name, rate)
    return model


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(total, trainable) parameter counts; 4-bit weights count their real element count, not packed bytes."""
    total = trainable = 0
    for param in model.parameters():
        n = param.numel()
        if getattr(param, "quant_state", None) is not None:
            n = int(torch.Size(param.quant_state.shape).numel())
        total += n
        if param.requires_grad:
            trainable += n
    return total, trainable


def load_tokenizer(cfg: "TrainConfig", texts: list[str] | None = None):
    """The run's tokenizer: the configured one, the model's own, or (random models) a word tokenizer over `texts`."""
    from transformers import AutoTokenizer

    source = cfg.tokenizer or (None if model_source(cfg.model).random else cfg.model)
    if source is None:
        if not texts:
            raise SumtuneError(f"Model {cfg.model!r} has no tokenizer; set `tokenizer` to a tokenizer directory.")
        from sumtune.demo_data import build_word_tokenizer

        return build_word_tokenizer(texts)
    path = Path(source).expanduser()
    if looks_like_path(source):
        from sumtune.safe_io import require_dir

        require_dir(path, "Tokenizer directory")
    try:
        return AutoTokenizer.from_pretrained(str(path) if path.is_dir() else source,
                                             trust_remote_code=cfg.trust_remote_code)
    except (OSError, ValueError) as err:
        raise SumtuneError(f"Could not load a tokenizer from {source!r} ({type(err).__name__}).") from None


def enable_fast_path(model: nn.Module, attention_backend: str = "sdpa",
                     fused_ffn_dropout: bool = False, fused_gated_ffn: bool = False) -> nn.Module:
    """sumtune's fast T5 kernels when the model is a T5; other seq2seq models (BART, Pegasus ...) keep
    transformers' own code. `attention_backend`, `fused_ffn_dropout`, `fused_gated_ffn`: see `TrainConfig`."""
    from transformers.models.t5.modeling_t5 import T5Stack

    from sumtune import fast_t5

    if not any(isinstance(m, T5Stack) for m in model.modules()):
        return model
    return fast_t5.enable_fast_t5(model, attention_backend=attention_backend, fused_ffn_dropout=fused_ffn_dropout,
                                  fused_gated_ffn=fused_gated_ffn)
