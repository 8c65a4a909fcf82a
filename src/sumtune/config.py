"""Every option of a sumtune run, with its meaning and its validation, in one dataclass.

YAML keys are these field names; every field is also a `--field-name` flag of `sumtune train`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Literal, Union

from sumtune.errors import SumtuneError

Quantization = Literal["nf4", "fp4", "int8", "none"]
ComputeDtype = Literal["bf16", "fp16", "fp32"]
BatchSize = Union[int, Literal["auto"]]
ReportTarget = Literal["tensorboard", "wandb", "mlflow", "none"]
AUTO_BATCH_DEFAULT_SAMPLES = 16  # samples per micro-batch × accumulation step when `batch_size: auto` has no target
SEED_MAX = 2**64 - 1  # torch.manual_seed's range
INT_MAX = 2**63 - 1  # counts and sizes end up in int64 tensors and C loops


def check_number_ranges(obj) -> None:
    """Every float field finite (NaN/inf pass `x <= 0` checks and fail much later) and every int field within
    int64, in one sentence naming the field; `seed` has its own range."""
    for f in fields(obj):
        value = getattr(obj, f.name)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        if isinstance(value, float) and not math.isfinite(value):
            raise SumtuneError(f"`{f.name}` must be a finite number, got {value}.")
        if isinstance(value, int) and f.name != "seed" and not -INT_MAX <= value <= INT_MAX:
            raise SumtuneError(f"`{f.name}` is out of range: {value} does not fit in 64 bits.")


def check_generation_settings(*, max_new_tokens: int | None = None, min_new_tokens: int | None = None,
                              no_repeat_ngram_size: int | None = None, length_penalty: float | None = None,
                              num_beams: int | None = None) -> None:
    """Generation options in range, each refused in one sentence (None: not given, the run's own applies)."""
    if max_new_tokens is not None and max_new_tokens <= 0:
        raise SumtuneError(f"`max_new_tokens` must be greater than 0, got {max_new_tokens}.")
    if num_beams is not None and num_beams <= 0:
        raise SumtuneError(f"`num_beams` must be greater than 0, got {num_beams}.")
    if min_new_tokens is not None and min_new_tokens < 0:
        raise SumtuneError(f"`min_new_tokens` must not be negative, got {min_new_tokens}.")
    if min_new_tokens is not None and max_new_tokens is not None and min_new_tokens > max_new_tokens:
        raise SumtuneError(f"`min_new_tokens` ({min_new_tokens}) is larger than `max_new_tokens` ({max_new_tokens}).")
    if no_repeat_ngram_size is not None and no_repeat_ngram_size < 0:
        raise SumtuneError(f"`no_repeat_ngram_size` must not be negative, got {no_repeat_ngram_size}.")
    if length_penalty is not None and not math.isfinite(length_penalty):
        raise SumtuneError(f"`length_penalty` must be a finite number, got {length_penalty}.")


@dataclass(frozen=True)
class GenerationSettings:
    """How summaries are generated: what evaluation, `summarize`, the API and merged models share."""

    max_new_tokens: int
    num_beams: int = 1
    min_new_tokens: int = 0
    length_penalty: float = 1.0
    no_repeat_ngram_size: int = 0

    def __post_init__(self) -> None:
        check_generation_settings(max_new_tokens=self.max_new_tokens, num_beams=self.num_beams,
                                  min_new_tokens=self.min_new_tokens, length_penalty=self.length_penalty,
                                  no_repeat_ngram_size=self.no_repeat_ngram_size)

    @classmethod
    def of(cls, cfg: "TrainConfig", **overrides) -> "GenerationSettings":
        """The run's settings, with the overrides that are not None (a caller's `num_beams=None`: the run's)."""
        values = {"max_new_tokens": cfg.generation_max_new_tokens, "num_beams": cfg.num_beams,
                  "min_new_tokens": cfg.min_new_tokens, "length_penalty": cfg.length_penalty,
                  "no_repeat_ngram_size": cfg.no_repeat_ngram_size}
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)

    def kwargs(self) -> dict:
        return {"max_new_tokens": self.max_new_tokens, "num_beams": self.num_beams,
                "min_new_tokens": self.min_new_tokens, "length_penalty": self.length_penalty,
                "no_repeat_ngram_size": self.no_repeat_ngram_size}


@dataclass
class TrainConfig:
    # ---- model -------------------------------------------------------------------------------------
    model: str = "t5-3b"
    """Base model: a Hugging Face hub id, a local directory, `tiny` (a small random T5 for demos and tests) or `random:<t5-small|t5-base|t5-large|t5-3b|t5-11b|flan-t5-base|flan-t5-large|flan-t5-xl>` (real shapes, random weights: for benchmarks)."""
    tokenizer: str | None = None
    """Tokenizer hub id or directory; by default the model's own (for `tiny`/`random:` models: a word-level tokenizer built from the training texts)."""
    trust_remote_code: bool = False
    """Allow model code from the hub repository to run (off: only transformers' own model code runs)."""
    allow_pickle: bool = False
    """Allow loading pickle-based weights (pytorch_model.bin, adapter_model.bin), which can run arbitrary code; off: safetensors only."""
    model_dropout: float | None = None
    """Dropout rate inside the base model (attention probabilities, feed-forward, residuals); none keeps the model's own (0.1 for released T5). 0 trains about a quarter faster on T5-3b (measured)."""
    quantization: Quantization = "nf4"
    """How the frozen base weights are stored: 4-bit NF4 (QLoRA), 4-bit FP4, 8-bit LLM.int8, or none (plain compute dtype)."""
    double_quant: bool = True
    """Quantize the 4-bit quantization constants too (QLoRA's double quantization, ~0.4 bit/parameter saved)."""
    compute_dtype: ComputeDtype = "bf16"
    """Dtype of matrix products and activations. bf16 is the sane default: T5 overflows in fp16."""

    # ---- LoRA --------------------------------------------------------------------------------------
    lora_r: int = 16
    """LoRA rank."""
    lora_alpha: float = 32.0
    """LoRA scaling numerator (the update is scaled by alpha / r)."""
    lora_dropout: float = 0.05
    """Dropout on the LoRA branch input."""
    lora_targets: list[str] = field(default_factory=lambda: ["all-linear"])
    """Module names that get LoRA adapters (e.g. `v o`), or `all-linear` for every linear layer but the output head."""
    modules_to_save: list[str] = field(default_factory=list)
    """Modules trained in full and saved with the adapter (e.g. `lm_head`; T5 ties it to the embeddings: sumtune unties it for you)."""

    # ---- data --------------------------------------------------------------------------------------
    dataset: str = "billsum"
    """`billsum` (FiscalNote/billsum from the hub), `demo` (small corpus shipped inside sumtune), a .jsonl/.csv/.parquet file, a `save_to_disk` directory, or a hub dataset name."""
    dataset_split: str = "ca_test"
    """Split of a hub dataset to read (BillSum's `ca_test` is the reference recipe's)."""
    text_column: str = "text"
    """Column holding the document to summarize."""
    summary_column: str = "summary"
    """Column holding the reference summary."""
    eval_ratio: float = 0.2
    """Share of the rows held out for evaluation (deterministic split by `seed`)."""
    eval_dataset: str | None = None
    """A separate evaluation file or dataset; when set, `eval_ratio` is not used."""
    source_prefix: str = "summarize: "
    """Text put before every document (T5's task prefix)."""
    max_source_tokens: int = 1024
    """Documents are truncated to this many tokens."""
    max_target_tokens: int = 128
    """Reference summaries are truncated to this many tokens for training."""
    max_samples: int | None = None
    """Use at most this many rows of the dataset (before the split); none = all."""
    empty_rows: Literal["skip", "error"] = "skip"
    """Rows with an empty text or summary: skip them (and report how many) or refuse the dataset."""
    group_by_length: bool = False
    """Batch documents of similar length together (less padding, same samples per epoch)."""
    pad_to_buckets: bool = True
    """Pad each batch up to one of a few fixed widths (sources to a multiple of 128 tokens, targets of 32, at most `max_source_tokens` / `max_target_tokens`) instead of to its longest row: compiled code then sees few distinct shapes, at the cost of some padding."""
    seed: int = 42
    """Seed for the split, data order, LoRA initialisation and dropout."""

    # ---- training ----------------------------------------------------------------------------------
    output_dir: str = "runs/sumtune"
    """Run directory: adapter, tokenizer, resolved config, metrics, TensorBoard logs, checkpoints, model card."""
    overwrite: bool = False
    """Allow writing into an output directory that already holds a run."""
    resume: str | None = field(default=None, metadata={"cli_const": "latest"})
    """Continue an interrupted run: `latest` (what a bare `--resume` means) for the newest checkpoint in `output_dir`, or the path of a checkpoint or run directory. The config must be the run's own."""
    epochs: float = 4.0
    """Passes over the training split (ignored when `max_steps` is set)."""
    max_steps: int | None = None
    """Stop after this many optimizer steps; none = run `epochs`."""
    batch_size: BatchSize = 16
    """Micro-batch size (samples per forward pass), or `auto`: the largest that fits on the GPU, with gradient accumulation keeping `samples_per_step` samples per optimizer step."""
    samples_per_step: int | None = None
    """Samples per optimizer step kept by `batch_size: auto` (a divisor of it becomes the micro-batch); none = 16 × `grad_accum_steps`."""
    grad_accum_steps: int = 1
    """Micro-batches accumulated per optimizer step (effective batch = batch_size × grad_accum_steps)."""
    optimizer: Literal["paged_adamw_8bit", "adamw_8bit", "adamw"] = "adamw"
    """Optimizer for the adapter weights: torch's AdamW (fused on a GPU: all adapter tensors in a few kernels, no host syncs; fp32 state, ~0.3 GB for T5-3b's all-linear adapters), bitsandbytes' paged 8-bit AdamW (the QLoRA paper's: it waits for the GPU once per tensor, 769 times a step for T5-3b with LoRA on every linear layer, measured) or 8-bit AdamW."""
    lr: float = 2e-4
    """Peak learning rate."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    warmup_steps: int = 0
    """Linear warm-up steps from 0 to `lr`."""
    lr_schedule: Literal["linear", "cosine", "constant"] = "linear"
    """Learning-rate decay after warm-up (to 0 at the last step for linear and cosine)."""
    max_grad_norm: float | None = 1.0
    """Clip the gradient norm to this value; none = no clipping."""
    max_nonfinite_steps: int = 5
    """Stop the run after this many optimizer steps in a row with a NaN/inf loss or gradient (each such step is skipped)."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass: less memory, about a third more compute."""
    fast_kernels: bool = True
    """sumtune's fast T5 path (efficient attention with the position bias, fused norms, no fp32 upcasts); off = stock transformers T5."""
    compile: bool = False
    """torch.compile the T5 blocks (GPU; slow to start, faster steps)."""
    attention_backend: Literal["auto", "triton", "sdpa"] = "auto"
    """T5 attention on the fast path: `auto` (the default: `triton` on a CUDA GPU with triton installed, else `sdpa`), `triton` (sumtune's kernels: bias, padding and dropout computed inside, no L×L tensor; 10-23% faster than SDPA with T5's bias and dropout in isolation, +6% in the whole T5-3b step at 16 × 2 with CUDA graphs, 37.2 vs 35.1 samples/s, 61.6 vs 62.6 GiB, H200 2026-12-01, benchmarks/results/train_throughput_oom_bisect-*), or `sdpa` (torch's kernels with a materialized position bias). The out-of-memory errors once seen on the Triton route were, as far as measured, CUDA graphs' (a new batch shape's full-size eager pass beside the graphs' memory pool, found with allocation stacks on 2026-12-01), not the kernels'; sumtune.cuda_graphs fixed that."""
    fused_ffn_dropout: bool = True
    """On the fast path in training, T5's ReLU feed-forward runs ReLU and dropout as one Triton kernel each way (CUDA; elsewhere the stock ops): one pass over the d_ff-wide intermediate instead of four, and neither the ReLU output nor the dropout mask kept for the backward. In the shipped T5-3b step at 16 × 2: 38.0 vs 36.7 samples/s (+3.6%) and 41.2 vs 61.4 GiB; at 4096/512, 5.57 vs 5.40 and 41.2 vs 61.4 GiB (H200, 2026-12-01). Same mathematics as torch's ReLU and dropout with the kernel's mask (tests/test_fast_t5_ffn_dropout.py). Gated (FLAN-T5) feed-forwards keep the stock ops."""
    fused_gated_ffn: bool = True
    """As `fused_ffn_dropout`, for the gated-GELU feed-forward of T5 v1.1 / FLAN-T5 (`gelu_new`): GELU, gate and dropout in one Triton kernel each way (CUDA; elsewhere the stock ops), keeping wi_0's and wi_1's outputs for the backward instead of those plus the GELU output and the mask. Its GELU runs in fp32 (stock rounds each step to bf16). FLAN-T5-XL shapes, shipped config: 44.1 vs 30.3 samples/s at 39.9 vs 41.6 GiB, the memory it frees letting `batch_size: auto` pick 16 × 2 instead of 8 × 4 (H200, 2026-12-01, results/train_throughput_flan_fused_gated-2026-12-01-h200.json)."""
    cuda_graphs: bool = True
    """Capture each micro-batch shape's forward and backward in a CUDA graph and replay it (GPU, one process, no activation checkpointing; elsewhere the step runs eagerly). Removes the host's kernel-launch cost, which bounds the T5-3b step with LoRA on every layer (+68% samples/s measured on an H200); `pad_to_buckets` keeps the number of captured shapes small."""
    fused_lora: bool = False
    """Run each LoRA layer over a 4-bit linear as one autograd node (base GEMM, dropout and the low-rank update with no copy, scaling or add pass of the output) instead of PEFT's seven; training only, results as PEFT's. Measured 4% slower on the host-bound eager step (H200, 2026-11-30); with `cuda_graphs` +8% (+14% without LoRA dropout: 34.6 vs 30.3 samples/s, H200, 2026-12-01). With `compile` the node runs eagerly between the compiled regions (traced by torch.compile it lost its gradients on CUDA)."""
    lora_in_base_gemm: bool = False
    """With `fused_lora`: the LoRA term computed inside the base GEMM on a layer's wide side ([x | s·xAᵀ] [W | B]ᵀ when the output is at least twice the input, as T5's q/k/v/wi; [dy | s·dy B] [W ; A] for the input gradient of o/wo), instead of an addmm that reads and writes the widest activation again (by arithmetic ~84 GB of memory traffic per T5-3b micro-batch of 16 × 1024). Same sums, one rounding fewer. In the shipped T5-3b step: 42.0 vs 39.8 samples/s (+5.6%) at the same 46.4 GiB, and 5.85 vs 5.68 (+3.0%) at 4096/512 (H200, 2026-12-01, results/train_throughput_loragemm_drop8-… and long_documents_loragemm_drop8-2026-12-01-h200.json); with the weight cache, W is kept beside the low-rank weight in one buffer instead of concatenated per call: +1.2% and +0.7% more (…_join-2026-12-02-h200.json); on in both shipped configs (off here because `fused_lora` is)."""
    cache_dequantized_weights: bool | Literal["auto"] = field(default="auto", metadata={"cli_const": True})
    """Keep a dequantized copy of every 4-bit base weight in the compute dtype, so steps skip bitsandbytes' dequantization (2 bytes/parameter more: 5.2 GiB for T5-3b; +2.7% samples/s in the shipped T5-3b step at 1024/128, +1% at 4096/512, H200 2026-12-01). `auto` (the default): on with a CUDA GPU when the copy fits beside the micro-batch's measured peak (and, with `cuda_graphs`, one row's activations for a new shape's warm-up) within the memory budget (90% of `max_memory_gib` or the card; the micro-batch is settled first, since a larger one gains more), else off; `true` / `false` (a bare `--cache-dequantized-weights` is `true`) force it."""
    max_memory_gib: float | None = None
    """Most GPU memory this run may use, in GiB (PyTorch's allocator refuses more; `batch_size: auto` searches under it): to leave room for other work, or to keep a run that must also fit a smaller card within that card's memory. None: the whole GPU."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """Where to train: the GPU when there is one (auto), or forced."""
    num_workers: int = 0
    """DataLoader worker processes."""
    pin_memory: bool = True
    """Pin host batches for faster non-blocking copies to the GPU (ignored on the CPU)."""

    # ---- evaluation and logging --------------------------------------------------------------------
    eval_every_steps: int | None = None
    """Evaluate every N optimizer steps; none = after each epoch."""
    eval_max_samples: int | None = None
    """Evaluate on at most this many held-out rows during training; none = all."""
    eval_batch_size: int = 32
    """Documents per generation batch."""
    num_beams: int = 1
    """Beam width for generation (1 = greedy)."""
    max_new_tokens: int | None = None
    """Longest generated summary in tokens; none = `max_target_tokens` (never transformers' 20-token default)."""
    min_new_tokens: int = 0
    """Shortest generated summary in tokens (the end of the summary is forbidden before it; 0 = no minimum)."""
    length_penalty: float = 1.0
    """Beam search only: finished beams are scored by log-probability / length ** length_penalty, so values above 1 favour longer summaries and below 1 shorter ones (greedy decoding ignores it, as transformers does)."""
    no_repeat_ngram_size: int = 0
    """Never repeat an n-gram of this many tokens within a summary (0 = off; 3 stops "the beat the beat ..."). sumtune's own T5 decoder does not implement it: generation with it set runs on transformers' generate."""
    checkpoint_every_steps: int | None = None
    """Write a resumable checkpoint (adapter, optimizer, RNG, data position) every N optimizer steps; none = at every evaluation. Also written at the last step and on SIGTERM/SIGINT."""
    keep_last_checkpoints: int = 2
    """How many recent checkpoints to keep besides the best one (at least 1: the newest is what `--resume` continues)."""
    early_stopping_patience: int | None = None
    """Stop training after this many evaluations in a row without a better ROUGE-L than the best so far (the final evaluation, adapter and best checkpoint are written as usual); none = train to the end."""
    log_every_steps: int = 10
    """Write train metrics every N optimizer steps (one log line each: step, epoch, loss, lr, grad norm, tokens/s, MFU, ETA)."""
    report_to: list[ReportTarget] = field(default_factory=lambda: ["tensorboard"])
    """Where metrics and hyper-parameters go besides metrics.jsonl: any of `tensorboard` (RUN_DIR/tb, with the HParams tab), `wandb` (project from WANDB_PROJECT, default sumtune; WANDB_MODE=offline works without an account), `mlflow` (MLFLOW_TRACKING_URI, MLflow's default otherwise), or `none`. wandb and mlflow are imported only when named (pip install "sumtune[trackers]")."""
    progress: bool = True
    """Draw progress bars when the output is a terminal (elsewhere, and with --no-progress: one plain log line per logging window and no bars)."""
    license: str | None = None
    """License of the trained adapter, written into its model card (a hub license id: apache-2.0, mit, other, ...); none = the base model's when known (the model card of a local base, or Apache-2.0 for the T5 and FLAN-T5 checkpoints), else `other`."""
    profile_steps: int | None = None
    """Profile this many training steps with torch.profiler (after 1 wait and 1 warm-up step) and write a trace and summary under RUN_DIR/profile."""

    def __post_init__(self) -> None:
        check_number_ranges(self)
        positive_ints = ["lora_r", "max_source_tokens", "max_target_tokens", "grad_accum_steps",
                         "eval_batch_size", "num_beams", "log_every_steps", "max_nonfinite_steps",
                         "keep_last_checkpoints"]
        if self.batch_size != "auto":
            positive_ints.append("batch_size")
        for name in positive_ints:
            if getattr(self, name) <= 0:
                raise SumtuneError(f"`{name}` must be greater than 0, got {getattr(self, name)}.")
        for name in ["max_steps", "max_samples", "eval_every_steps", "eval_max_samples", "max_new_tokens",
                     "profile_steps", "checkpoint_every_steps", "samples_per_step", "early_stopping_patience"]:
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise SumtuneError(f"`{name}` must be greater than 0 or none, got {value}.")
        if self.lr <= 0:
            raise SumtuneError(f"`lr` must be greater than 0, got {self.lr}.")
        if self.lora_alpha <= 0:
            raise SumtuneError(f"`lora_alpha` must be greater than 0, got {self.lora_alpha}.")
        if self.cache_dequantized_weights is True and self.quantization not in ("nf4", "fp4"):
            raise SumtuneError(f"`cache_dequantized_weights` caches 4-bit weights; quantization is {self.quantization!r}.")
        if self.lora_in_base_gemm and not (self.fused_lora and self.fast_kernels):
            raise SumtuneError("`lora_in_base_gemm` works inside `fused_lora` on the fast path: turn on `fused_lora` "
                               "(and `fast_kernels`) or turn it off.")
        if self.model_dropout is not None and not 0.0 <= self.model_dropout < 1.0:
            raise SumtuneError(f"`model_dropout` must be in [0, 1), got {self.model_dropout}.")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise SumtuneError(f"`lora_dropout` must be in [0, 1), got {self.lora_dropout}.")
        if not 0.0 < self.eval_ratio < 1.0:
            raise SumtuneError(f"`eval_ratio` must be strictly between 0 and 1, got {self.eval_ratio}.")
        if self.epochs <= 0:
            raise SumtuneError(f"`epochs` must be greater than 0, got {self.epochs}.")
        check_generation_settings(max_new_tokens=self.generation_max_new_tokens, min_new_tokens=self.min_new_tokens,
                                  no_repeat_ngram_size=self.no_repeat_ngram_size, length_penalty=self.length_penalty)
        if "none" in self.report_to and len(self.report_to) > 1:
            raise SumtuneError(f"`report_to` lists `none` with other trackers ({', '.join(self.report_to)}); "
                               f"give `none` alone, or only the trackers.")
        if self.license is not None and not self.license.strip():
            raise SumtuneError("`license` must not be empty (leave it unset for the base model's license).")
        for name in ("weight_decay", "warmup_steps", "num_workers"):
            if getattr(self, name) < 0:
                raise SumtuneError(f"`{name}` must not be negative, got {getattr(self, name)}.")
        if self.max_memory_gib is not None and not self.max_memory_gib > 0:
            raise SumtuneError(f"`max_memory_gib` must be greater than 0 or none, got {self.max_memory_gib}.")
        if self.max_grad_norm is not None and self.max_grad_norm <= 0:
            raise SumtuneError(f"`max_grad_norm` must be greater than 0 or none, got {self.max_grad_norm}.")
        if not self.lora_targets:
            raise SumtuneError("`lora_targets` must name at least one module (or `all-linear`).")
        if not self.model.strip():
            raise SumtuneError("`model` must not be empty.")
        if not self.output_dir.strip():
            raise SumtuneError("`output_dir` must not be empty (it would be the working directory).")
        if not 0 <= self.seed <= SEED_MAX:
            raise SumtuneError(f"`seed` must be between 0 and 2^64 - 1 ({SEED_MAX}), got {self.seed}.")
        if self.resume is not None and self.overwrite:
            raise SumtuneError("`resume` and `overwrite` contradict each other: resume continues the run in "
                               "`output_dir`, overwrite replaces it; pass only one.")
        if self.resume is not None and not str(self.resume).strip():
            raise SumtuneError("`resume` must be `latest` or the path of a checkpoint or run directory.")

    @property
    def generation_max_new_tokens(self) -> int:
        return self.max_new_tokens or self.max_target_tokens

    @property
    def effective_batch_size(self) -> int:
        """Samples per optimizer step (per process)."""
        if self.batch_size == "auto":
            return self.samples_per_step or AUTO_BATCH_DEFAULT_SAMPLES * self.grad_accum_steps
        return self.batch_size * self.grad_accum_steps
