"""Helpers shared by sumtune's benchmarks: model shapes, random QLoRA T5s, real BillSum data, timing, results.

Benchmarks import this file by path (``sys.path`` gets ``benchmarks/``); sumtune itself never imports it.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import itertools
import json
import os
import re
import sys
from pathlib import Path

import torch
from torch import nn

REPO_ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = REPO_ROOT / "benchmarks" / "results"
if str(REPO_ROOT / "src") not in sys.path:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(REPO_ROOT / "src"))

# One table of T5 shapes, one config builder and one FLOP count for the product and its benchmarks.
from sumtune.flops import FLOPS_COUNTED, train_flops_per_sample  # noqa: E402,F401
from sumtune.modeling import (  # noqa: E402,F401
    T5_SHAPES as _PRODUCT_T5_SHAPES, T5_VOCAB_SIZE, t5_config, untie_head_if_untied)

T5_SHAPES = list(_PRODUCT_T5_SHAPES)  # "tiny" among them: CPU plumbing checks only


# ----------------------------------------------------------------------------- data
def shared_data_dir(shared_dir: str | Path | None = None) -> Path:
    """../shared/data next to the repo, or $SUMTUNE_SHARED_DATA, or the given directory."""
    if shared_dir is not None:
        return Path(shared_dir)
    env = os.environ.get("SUMTUNE_SHARED_DATA")
    return Path(env) if env else REPO_ROOT.parent / "shared" / "data"


def load_billsum_texts(shared_dir: str | Path | None = None) -> list[dict]:
    """The 200 real BillSum rows (clean text) as ``{"text", "summary"}`` dicts."""
    path = shared_data_dir(shared_dir) / "billsum" / "us_train_subset200_cleantext.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"BillSum rows not found at {path} (set SUMTUNE_SHARED_DATA)")
    rows = []
    with path.open(encoding="utf-8") as handle:
        for line in handle:
            if line.strip():
                row = json.loads(line)
                rows.append({"text": row["text"], "summary": row["summary"]})
    return rows


def load_t5_tokenizer(shared_dir: str | Path | None = None):
    """The real T5 sentencepiece tokenizer from shared/data/t5-tokenizer (no hub access)."""
    from transformers import AutoTokenizer

    path = shared_data_dir(shared_dir) / "t5-tokenizer"
    if not path.is_dir():
        raise FileNotFoundError(f"T5 tokenizer not found at {path} (set SUMTUNE_SHARED_DATA)")
    return AutoTokenizer.from_pretrained(str(path))


def tokenize_rows(tokenizer, rows: list[dict], src_len: int, tgt_len: int,
                  prefix: str = "summarize: ") -> dict[str, torch.Tensor]:
    """Pad/truncate to fixed lengths; labels are -100 where the target is padding."""
    source = tokenizer([prefix + r["text"] for r in rows], max_length=src_len, truncation=True,
                       padding="max_length", return_tensors="pt")
    target = tokenizer([r["summary"] for r in rows], max_length=tgt_len, truncation=True,
                       padding="max_length", return_tensors="pt")
    labels = target["input_ids"].masked_fill(target["attention_mask"] == 0, -100)
    return {"input_ids": source["input_ids"], "attention_mask": source["attention_mask"], "labels": labels}


def batch_at(data: dict[str, torch.Tensor], step: int, batch_size: int) -> dict[str, torch.Tensor]:
    """Batch number ``step`` of a fixed-order pass over ``data``, wrapping around."""
    rows = data["input_ids"].shape[0]
    index = (torch.arange(batch_size) + step * batch_size) % rows
    return {k: v[index.to(v.device)] for k, v in data.items()}


# ----------------------------------------------------------------------------- models
def random_t5(config, dtype: torch.dtype = torch.bfloat16, device: str | torch.device = "cuda", seed: int = 0):
    """T5ForConditionalGeneration with T5's own random init, built directly on ``device`` in ``dtype``.

    Built in ``dtype`` (default-dtype switch) so T5-3b never has an fp32 copy on the GPU.
    """
    from transformers import T5ForConditionalGeneration

    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = untie_head_if_untied(T5ForConditionalGeneration(config))  # FLAN-T5: the head's own weight
    finally:
        torch.set_default_dtype(previous)
    return model.to(dtype)


def quantize_linear4bit(model: nn.Module, compute_dtype: torch.dtype = torch.bfloat16, quant_type: str = "nf4",
                        double_quant: bool = True, skip: tuple[str, ...] = ("lm_head",),
                        device: str | torch.device | None = None) -> nn.Module:
    """Replace every plain nn.Linear (but those named in ``skip``) by a frozen bnb Linear4bit, in place.

    sumtune's own quantizer (`sumtune.modeling.quantize_in_place`), on ``device`` (default: where the model is).
    For the reference recipe pass ``skip=("lm_head", "wo")``: from_pretrained keeps T5's ``wo`` unquantized.
    """
    from sumtune.modeling import DTYPES, QuantSettings, freeze, quantize_in_place

    dtype_name = {dtype: name for name, dtype in DTYPES.items()}[compute_dtype]
    target = torch.device(device) if device is not None else next(model.parameters()).device
    return freeze(quantize_in_place(model, QuantSettings(quant_type, dtype_name, double_quant), target,
                                    skip=tuple(skip)))


def count_lora_params(model: nn.Module) -> int:
    return sum(p.numel() for n, p in model.named_parameters() if p.requires_grad and "lora_" in n)


# ----------------------------------------------------------------------------- hardware + FLOPs
def sync(device: torch.device) -> None:
    """Wait for `device`'s GPU (timings end here; each torchrun rank waits for its own); nothing on the CPU."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def timed_steps(step, stream, accum: int, lr: float, count: int):
    """`count` optimizer steps of the product's `TrainStep` as `sumtune train`'s loop takes them: draw the micro-batches
    (collation on the host), run the step, read its result. Yields (index, result, seconds from the draw to the read):
    the draw is on the clock, as in training."""
    import time

    for index in range(count):
        sync(step.device)
        start = time.perf_counter()
        result = step(step.draw(stream, accum), lr=lr)
        sync(step.device)
        yield index, result, time.perf_counter() - start


def cuda_event_ms(fn, repeats: int, warmup: int = 3) -> float:
    """Median milliseconds of ``fn()`` on the current CUDA stream: events around each call, the calls back to back
    and one sync at the end, so that each pair times the GPU's work while the host queues the next call (as in CUDA
    graphs and a training step) rather than the host's launch latency too. Until 2026-12-04 (session 33) a sync
    followed each call, which added the Python launch path to every figure: ncu timed the Gluon decode kernel at
    0.68 ms where that method gave 0.92-1.11 (results/logs/ncu_gluontma_256_details_s33-...)."""
    import statistics

    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    events = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        events.append((start, end))
    torch.cuda.synchronize()
    return statistics.median(start.elapsed_time(end) for start, end in events)


def free_gpu_memory() -> None:
    """Drop what the last measurement left (Python garbage, cached blocks) and restart the peak counter."""
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


# ----------------------------------------------------------------------------- setting tokens
# The TrainConfig overrides a benchmark setting token stands for (settings are tokens joined by ':', e.g.
# "config:ldrop0:fusedlora" or "b8:gc"); `mem<N>` is max_memory_gib N (decimals allowed), `b<N>` the micro-batch and
# `bauto` batch_size auto.
CONFIG_TOKENS: dict[str, dict] = {
    "gc": {"gradient_checkpointing": True}, "nogc": {"gradient_checkpointing": False},
    "compile": {"compile": True}, "nocompile": {"compile": False},
    "cache": {"cache_dequantized_weights": True}, "nocache": {"cache_dequantized_weights": False},
    "graphs": {"cuda_graphs": True}, "nograph": {"cuda_graphs": False},
    "buckets": {"pad_to_buckets": True}, "nobuckets": {"pad_to_buckets": False},
    "group": {"group_by_length": True},
    "fusedlora": {"fused_lora": True}, "nofused": {"fused_lora": False}, "loragemm": {"lora_in_base_gemm": True},
    "noloragemm": {"lora_in_base_gemm": False},
    "drop0": {"model_dropout": 0.0},  # T5's own dropout off: the targets keep 0.1, so for comparison only
    "ldrop0": {"lora_dropout": 0.0}, "ldrop5": {"lora_dropout": 0.05},  # ldrop5: the reference's LoRA dropout
    "sdpa": {"attention_backend": "sdpa"}, "triton": {"attention_backend": "triton"},
    "fusedffn": {"fused_ffn_dropout": True}, "nofusedffn": {"fused_ffn_dropout": False},
    "fusedgated": {"fused_gated_ffn": True}, "nofusedgated": {"fused_gated_ffn": False},
    "adamw": {"optimizer": "adamw"}, "paged": {"optimizer": "paged_adamw_8bit"}, "adamw8": {"optimizer": "adamw_8bit"},
}


# Tokens for kernel settings that are module constants, not TrainConfig fields: (module, name, value) patched around
# the row (sumtune reads them at call time). `drop8`: the attention kernels' dropout from 8-bit draws; `nojoin`: the
# fused LoRA node concatenates a copy of the cached W per call instead of keeping it beside the low-rank weight;
# `oldtiles`: the attention kernels autotune over the tile lists they had before 2026-12-02; `noqkvgroup`: q/k/v (and
# cross-attention k/v) as separate LoRA nodes instead of one group over their shared input (sumtune.fast_t5.lora_group).
# `nodsgemm`: the attention backward's dQ from its dQ kernel, not as batched GEMMs over the dS the dK/dV kernel
# writes (DS_GEMM, the default since 2026-12-02; the token was `dsgemm` while it was off).
# (`dkgemm`, dK as batched GEMMs over that dS too, measured slower and went with its kernel variant: commit 737b9c9.)
# `nopv16`: the attention forward's P·V not in float16 (PV_FP16: P with 11 bits instead of bf16's 8, V scaled into
# float16's range); `nopvsplit`: without the second GEMM over P's remainder (PV_SPLIT). Both on by default from 2048
# keys since 2026-12-02 (the tokens were `pv16` and `pvsplit` while they were off).
# (`nofold` measured the dK/dV kernel's select per score against a folded per-key term, which lost: the term went.)
# (`onebias`, the attention's bias tiles in one loop, measured slower and went with its kernel variant: commit 6681814.)
# (`pvlow8`, the precise P·V's remainder GEMM in float8, measured slower on an H200 — forward 7.57 vs 5.73 ms at
# 4x32x4096x128, the long step 6.00 vs 6.39 samples/s, results/*_pvlow8-2026-12-02-h200.json — and went with its
# kernel variant: commit b74dbf9 has it.)
# `pvall`: the precise P·V at every key length (PRECISE_PV_MIN_KEYS 0; off by default). `pvnograd`: the precise
# P·V in forwards no gradient reaches too (PRECISE_PV_WITHOUT_GRAD; off by default since 2026-12-04). `noholes`: the key mask read
# in every row, not only in rows with a hole (MASK_ONLY_WITH_HOLES, on by default since 2026-12-02; the token was
# `holes` while it was off). (`wholetiles`, the forward's whole key tiles in loops without bounds or selects,
# measured no faster on an H200 — long 6.39 vs 6.38, shipped 45.12 vs 45.10 samples/s,
# results/*_whole_tiles-2026-12-03-h200.json — and went: commit ffbaa8b has it.) (`keyadd`, masked keys' -inf
# added with the bias in the forward and dK/dV kernels instead of a select per score, the dK/dV kernel's select on
# rows past Lq dropped, measured +0.7% long (6.485 vs 6.438) and -2.2% shipped (43.4 vs 44.3):
# results/*_keyadd-2026-12-03-h200.json; commit 7d9d708 has it.)
# (`noahead` measured the training loop launching the next step before reading the pending one's loss against one
# step at a time: no gain, long 6.439 vs 6.438 samples/s, shipped 45.15 vs 45.26 — results/*_run_ahead*-2026-12-03-*
# — so it went: commit ffbaa8b has it.)
# (`gluonfwd` measured the attention forward in Gluon, asynchronous warpgroup MMAs, against the Triton forward: the
# same outputs, forward + backward 8.59 vs 8.59 ms at 32x32x1024x128 and 14.79 vs 14.24 at 4x32x4096x128 —
# results/attention_kernels-2026-12-03-h200-gluon.json, results/gluon_attention-2026-12-03-h200.json — and went with
# its module, benchmarks/gluon_attention.py and its tests: commit 2fa495d has them.)
# (`cudnnunpadded` measured unpadded non-causal attention in SDPA's cuDNN kernel with the bias broadcast (1, H, L, L)
# against the Triton kernels: cuDNN with bias and dropout 12.03 ms forward + backward at 32x32x1024x128 against the
# kernels' 8.32 (7.72 unpadded), the seed's step 43.3 against 48.8 samples/s —
# results/*_seed_omitmask-2026-12-03-h200.json, results/logs/attention_kernels_unpadded-2026-12-03-h200.log — and
# went: commit 9a12a5c has it.)
# (`keepbits`: the training forward storing its dropout decisions as 4 bits a Philox call for the backward kernels to
# load. Compiled for sm_90 the dK/dV loops issued 7-23% fewer instructions, but Triton drew the forward's Philox
# twice (once in the store's layout), 30-64% more there — results/kernel_loops-2026-12-05-cpu-sm90-keep-bits-*.json —
# so it went unmeasured on a GPU, as bytes and bits had gone in sessions 10 and 14: commit 52ea75e has it.)
PATCH_TOKENS: dict[str, tuple[str, str, object]] = {
    "drop8": ("sumtune.fast_t5.flash_attention", "DROPOUT_DRAW_BITS", 8),
    "nopairs": ("sumtune.fast_t5.flash_attention", "DROPOUT_PAIRS", False),
    "nojoin": ("sumtune.fast_t5.lora4bit", "JOIN_CACHED_WEIGHTS", False),
    "oldtiles": ("sumtune.fast_t5.flash_tiles", "AUTOTUNE_CONFIGS", lambda module: module.PREVIOUS_AUTOTUNE_CONFIGS),
    "noqkvgroup": ("sumtune.fast_t5.lora_group", "GROUP_PROJECTIONS", False),
    "nodsgemm": ("sumtune.fast_t5.flash_attention", "DS_GEMM", False),
    "nopv16": ("sumtune.fast_t5.flash_attention", "PV_FP16", False),
    "nopvsplit": ("sumtune.fast_t5.flash_attention", "PV_SPLIT", False),
    "pvall": ("sumtune.fast_t5.flash_attention", "PRECISE_PV_MIN_KEYS", 0),
    "pvnograd": ("sumtune.fast_t5.flash_attention", "PRECISE_PV_WITHOUT_GRAD", True),
    "noholes": ("sumtune.fast_t5.flash_attention", "MASK_ONLY_WITH_HOLES", False),
    # near bias tiles from the table's gathers, not the band (BIAS_BAND on by default since 2026-12-03; was `band`)
    "noband": ("sumtune.fast_t5.flash_attention", "BIAS_BAND", False),
    # the attention forward's K and V by TMA descriptors, autotuned over its own tiles (FWD_DESCRIPTORS, off)
    "fwdtma": ("sumtune.fast_t5.flash_attention", "FWD_DESCRIPTORS", True),
    # the forward's every key tile in the masked loops, not the lean loops without masks for the tiles inside a row's
    # keys (LEAN_FORWARD, on since 2026-12-05; the token was `fwdlean` while it was off)
    "nofwdlean": ("sumtune.fast_t5.flash_attention", "LEAN_FORWARD", False),
    # the dK/dV kernel's whole query tiles of unmasked key blocks in loops without masks (LEAN_BACKWARD: on with
    # Triton before 3.9, flash_tiles.lean_backward_default; `bwdlean` turns it on with a later one)
    "nobwdlean": ("sumtune.fast_t5.flash_attention", "LEAN_BACKWARD", False),
    "bwdlean": ("sumtune.fast_t5.flash_attention", "LEAN_BACKWARD", True),
    # the dK/dV kernel's Q and dO by TMA descriptors (BWD_DESCRIPTORS, off)
    "bwdtma": ("sumtune.fast_t5.flash_attention", "BWD_DESCRIPTORS", True),
    # the pointer forward autotuned with 128 x 128 x 8 x 3 first (its near loop at 2 stages: flash_attention.near_stages)
    "fwd128": ("sumtune.fast_t5.flash_tiles", "AUTOTUNE_CONFIGS",
               lambda module: {**module.AUTOTUNE_CONFIGS, "fwd": [(128, 128, 8, 3), *module.AUTOTUNE_CONFIGS["fwd"]]}),
    # unpadded micro-batches keep their all-ones source mask (OMIT_FULL_SOURCE_MASK on by default since 2026-12-03;
    # was `omitmask`)
    "keepmask": ("sumtune.train_step", "OMIT_FULL_SOURCE_MASK", False),
    # padding widths (first_epoch.py): targets always at max_target_tokens; sources / targets in coarser steps
    "tgtcap": ("sumtune.batching", "TARGET_BUCKET_TOKENS", 1 << 30),
    "src256": ("sumtune.batching", "SOURCE_BUCKET_TOKENS", 256),
    "tgt64": ("sumtune.batching", "TARGET_BUCKET_TOKENS", 64),
    # every new shape warmed up before its capture, even inside a warmed shape's width classes (first_epoch.py; on
    # by default since 2026-12-03, the token was `classwarm` while it was off)
    "noclasswarm": ("sumtune.cuda_graphs", "WARM_UP_ONLY_UNCOVERED_SHAPES", False),
    # the attention kernels' Philox products as Triton's mul.lo + mul.hi, not one mul.wide.u32 each
    "nowidemul": ("sumtune.fast_t5.flash_attention", "PHILOX_WIDE_MUL", False),
    # the wide Philox products at every key length (PHILOX_WIDE_MUL_MIN_KEYS 2048: measured even at 1024 on 2026-12-03,
    # before the dS and P-conversion cuts left Philox the larger share of the loops)
    "widemulall": ("sumtune.fast_t5.flash_attention", "PHILOX_WIDE_MUL_MIN_KEYS", 0),
    # T5LayerNorm's weight multiplied after torch's fused RMSNorm kernel, as stock (fast_t5.modules.
    # RMS_NORM_WEIGHT_IN_KERNEL on since 2026-12-05; its token was `normweight` while it was off)
    "nonormweight": ("sumtune.fast_t5.modules", "RMS_NORM_WEIGHT_IN_KERNEL", False),
    # the no-gradient attention forward (generation's encoder) in the Triton forward, not warp-specialized in Gluon
    # (flash_attention.WS_NO_GRAD_FORWARD, fast_t5.ws_forward; on since 2026-12-05, its token was `wsenc` while off)
    "nowsenc": ("sumtune.fast_t5.flash_attention", "WS_NO_GRAD_FORWARD", False),
    "wsenc3": ("sumtune.fast_t5.ws_forward", "STAGES", 3),  # its K and V rings of three slots, not two
    # its far tiles' bias inside the exponent's FFMA (ws_forward.LEAN_FAR_TILES, on since 2026-12-06; the token was
    # `wslean` while it was off)
    "nowslean": ("sumtune.fast_t5.ws_forward", "LEAN_FAR_TILES", False),
    "ws64": ("sumtune.fast_t5.ws_forward", "HEAD_DIMS", (64, 128)),  # it takes head_dim 64 too (T5-large, FLAN-T5-XL)
    "wsnobias": ("sumtune.fast_t5.ws_forward", "WITHOUT_BIAS", True),  # and calls without a bias (cross-attention)
    # the warp-specialized forward for training's forwards too, dropout included (flash_attention.WS_TRAINING_FORWARD)
    "wstrain": ("sumtune.fast_t5.flash_attention", "WS_TRAINING_FORWARD", True),
    "wsbwd": ("sumtune.fast_t5.flash_attention", "WS_BACKWARD", True),  # and the dK/dV kernel (fast_t5.ws_backward)
    # LoRA's input dropout regenerated from a seed in the low-rank kernels, not native_dropout's copy and mask kept
    # (fast_t5.lora_dropout.LORA_DROPOUT_KERNEL, on since 2026-12-06; the token was `loradrop` while it was off).
    # `noloradrop`: native_dropout's copy and mask, as PEFT
    "noloradrop": ("sumtune.fast_t5.lora_dropout", "LORA_DROPOUT_KERNEL", False),
    # its backward's keep flags for dx drawn a second time, not through a scratch tile (lora_dropout.MASK_SCRATCH, on
    # since 2026-12-06; the token was `ldscratch` while it was off)
    "noldscratch": ("sumtune.fast_t5.lora_dropout", "MASK_SCRATCH", False),
    # the feed-forward's ReLU as its own pass where no dropout follows (FUSED_LINEAR_RELU on since 2026-12-04)
    "nolinearrelu": ("sumtune.fast_t5.modules", "FUSED_LINEAR_RELU", False),
    # (`fwdoneloop`: the attention forward's bias in one loop over the key tiles, measured 1.3-1.6x slower on
    # 2026-12-04 and gone: flash_kernels' docstring; commit 34a8ef0 has it.)
    # the decoding cross-attention in the Triton kernel, not in Gluon with warpgroup MMAs (cross_attention.GLUON_KERNEL,
    # on since 2026-12-04; before that, its token `decodegluon` turned it on, and `gluontma` took TMA)
    "nodecodegluon": ("sumtune.generation.cross_attention", "GLUON_KERNEL", False),
    # a row's 32 heads in one warp-specialized Gluon program (cross_attention.GLUON_WARP_SPECIALIZED, gluon_decode_ws)
    # (on since 2026-12-06; the token was `decodews32` while it was off)
    "nodecodews32": ("sumtune.generation.cross_attention", "GLUON_WARP_SPECIALIZED", False),
    # its key splits aimed at two programs an SM as gluon_decode's (264), not one (cross_attention.WS_MIN_PROGRAMS)
    "wsmin264": ("sumtune.generation.cross_attention", "WS_MIN_PROGRAMS", 264),
    # the key splits' partial results combined by torch's ops, not one Triton kernel (cross_attention.FUSED_COMBINE, on
    # since 2026-12-06; the token was `fusedcombine` while it was off)
    "nofusedcombine": ("sumtune.generation.cross_attention", "FUSED_COMBINE", False),
    # (`gluonenc`, `gluonenc2`, `gluonenc64`: a no-gradient attention forward in Gluon, measured slower on 2026-12-04
    # and gone: flash_attention's note; commit f21cad8 has it.)
    "gluon5": ("sumtune.generation.gluon_decode", "SLOTS", 5),  # the Gluon kernel with a ring of 5 chunks, not 6
    # (`decodewide`: the decoding cross-attention with a row's 32 heads in one Gluon program, measured 1.8-1.9x slower
    # on 2026-12-05 and gone: cross_attention's note; commit 210896c has it.)
    # the decoder's T5LayerNorm in its seven ops, not torch's fused RMSNorm kernel (t5_decode.FUSED_RMS_NORM, on since
    # 2026-12-05; the token was `decodermsnorm` while it was off)
    "nodecodermsnorm": ("sumtune.generation.t5_decode", "FUSED_RMS_NORM", False),
    # the decoder's self-attention in the Gluon decoding kernel with the step's position bias (t5_decode.
    # FUSED_SELF_ATTENTION, on since 2026-12-05, the token was `selfgluon` while it was off; in the Triton kernel it was
    # not faster in session 30, and the token was `noselffused`). `noselfgluon`: the two GEMMs and a softmax instead.
    "noselfgluon": ("sumtune.generation.t5_decode", "FUSED_SELF_ATTENTION", False),
    # (`gluoncp`: its chunks by cp.async, `gluon32`: 32 heads a program; both slower and gone in session 34:
    # gluon_decode's note; commit f21cad8 has them.)
    # (`decodews`: the decoding kernel's key loop warp-specialised by Triton, measured 2.3x slower on 2026-12-04 and
    # gone: cross_attention's note.)
    # (`farsplit`/`nofarsplit`, `farsplitall`, `farright`: a no-gradient attention forward's far keys from cuDNN's
    # causal kernel, sumtune.fast_t5.far_split, measured on 2026-12-04 and gone: flash_attention's note; commit 6aa3184
    # has it, 10b629b the far-right variant.)
}


def patch_strings(text: str) -> list[str]:
    """``"pvnograd,pvnograd:noband"`` -> its settings strings, each token checked against PATCH_TOKENS
    (an unknown one ends the run with its name)."""
    strings = [patch for patch in text.split(",") if patch]
    unknown = sorted({token for patch in strings for token in patch.split(":")} - set(PATCH_TOKENS))
    if unknown:
        raise SystemExit(f"unknown patch tokens {unknown}; known: {', '.join(PATCH_TOKENS)}")
    return strings


@contextlib.contextmanager
def patched(text: str):
    """The module constants that the PATCH_TOKENS of settings string `text` stand for, set for the block
    (unittest.mock.patch: put back afterwards); other tokens are setting_fields' business."""
    import importlib
    from unittest import mock

    with contextlib.ExitStack() as stack:
        for module_name, name, value in (PATCH_TOKENS[t] for t in text.split(":") if t in PATCH_TOKENS):
            module = importlib.import_module(module_name)
            value = value(module) if callable(value) else value  # a value the module itself holds
            stack.enter_context(mock.patch.object(module, name, value))
        yield


# The decoding cross-attention kernel's tiles (sumtune.generation.cross_attention), as benchmarks take them.
FUSED_TILES_HELP = ("comma-separated BLOCK_NxWARPSxHEADSxSTAGES[xMIN_PROGRAMS] specs of "
                    "sumtune.generation.cross_attention (e.g. 32x8x16x3; a fifth number splits each row's keys until "
                    "the launch has that many programs, shipped 264)")


def parse_fused_tiles(text: str) -> list[tuple[int, ...]]:
    """``"64x8x16x2,32x8x16x3x1024"`` -> [(64, 8, 16, 2), (32, 8, 16, 3, 1024)] (keys a tile, warps, heads a program,
    stages, and optionally the programs a launch aims for)."""
    specs = [tuple(int(v) for v in spec.split("x")) for spec in text.split(",") if spec]
    bad = [spec for spec in specs if len(spec) not in (4, 5)]
    if bad:
        raise SystemExit(f"fused tiles need 4 or 5 numbers each ({FUSED_TILES_HELP}): {bad}")
    return specs


def fused_tiles(tiles: tuple[int, ...] | str | None):
    """The fused cross-attention kernel's tiles set to ``tiles`` (a tuple or one spec) for the block (none: as
    shipped)."""
    from unittest import mock

    from sumtune.generation import cross_attention

    if not tiles:
        return contextlib.nullcontext()
    spec = parse_fused_tiles(tiles)[0] if isinstance(tiles, str) else tuple(tiles)
    values = dict(zip(("HEADS_PER_PROGRAM", "NUM_STAGES", "MIN_PROGRAMS"), spec[2:]))
    return mock.patch.multiple(cross_attention, TILES_BY_STATES=((0, spec[0], spec[1]),), **values)


def setting_fields(text: str, extra=None) -> dict:
    """The TrainConfig overrides of a settings string. `extra(token, fields) -> bool` handles a benchmark's own tokens
    (True when it took the token). A setting names its micro-batch (`b<N>`) unless it starts from a config file
    (`config`, whose `batch_size: auto` resolves at build); an unknown token ends the run with its name."""
    fields: dict = {}
    for token in text.split(":"):
        if token == "config" or token in PATCH_TOKENS:  # the config file's own settings; patches: `patched`
            continue
        if token[:1] == "b" and token[1:].isdigit():
            fields["batch_size"] = int(token[1:])
        elif token == "bauto":  # the largest micro-batch that fits (under `mem<N>` when given)
            fields["batch_size"] = "auto"
        elif re.fullmatch(r"mem\d+(\.\d+)?", token):  # e.g. mem15.3: the reference's own peak
            fields["max_memory_gib"] = float(token[3:])
        elif token in CONFIG_TOKENS:
            fields.update(CONFIG_TOKENS[token])
        elif extra is None or not extra(token, fields):
            raise SystemExit(f"unknown setting token {token!r} in {text!r}")
    if "batch_size" not in fields and not text.startswith("config"):
        raise SystemExit(f"setting {text!r} needs a micro-batch token like b16 (or start with 'config')")
    return fields


def benchmark_device(name: str, quick: bool) -> torch.device | None:
    """The GPU a benchmark runs on, or the CPU for its --quick plumbing check; None (after saying why) otherwise."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type != "cuda" and not quick:
        print(f"{name} needs a CUDA GPU; use --quick for a CPU plumbing check.", file=sys.stderr)
        return None
    return device


def gpu_name() -> str:
    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"


def gpu_slug(name: str | None = None) -> str:
    """File-name form of a GPU name (this machine's by default): "NVIDIA H200" -> "h200"."""
    name = (name or gpu_name()).lower().replace("nvidia", "")
    return re.sub(r"[^a-z0-9]+", "-", name).strip("-") or "cpu"


def measure_bf16_matmul_tflops(size: int = 8192, iters: int = 20) -> float | None:
    """Median achieved TFLOP/s of a large bf16 GEMM on this GPU; None on CPU (the product's measurement, the
    one `sumtune train` divides its second MFU figure by)."""
    from sumtune.flops import measure_bf16_matmul_tflops as measure

    return measure(torch.device("cuda"), size, iters) if torch.cuda.is_available() else None


# ----------------------------------------------------------------------------- results
def library_versions() -> dict[str, str]:
    versions = {"torch": torch.__version__}
    for name in ("transformers", "peft", "bitsandbytes", "triton"):  # triton: some kernel defaults follow it
        try:
            versions[name] = __import__(name).__version__
        except Exception:  # noqa: BLE001 - a missing library is reported, not fatal
            versions[name] = "missing"
    return versions


def save_result(name: str, payload: dict, slug: str | None = None) -> Path:
    """Write benchmarks/results/<name>-<YYYY-MM-DD>-<gpu-slug>.json (or -2, -3, ... after it: never over an earlier
    file) with environment metadata.

    `payload` may override `gpu`/`versions` (a summary made on another machine than the runs'), and `slug`
    the file name's machine part."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    today = _dt.date.today().isoformat()
    stem = f"{name}-{today}-{slug or gpu_slug()}"
    record = {"name": name, "date": today, "gpu": gpu_name(), "versions": library_versions(), **payload}
    text = json.dumps(record, indent=2, default=str) + "\n"
    # A second run of the same day and machine gets -2, -3, ...: it must not overwrite the first one's figures
    # (session 41's seed profile was lost so, under the shipped config's run). "x" mode: no race with a twin.
    for attempt in itertools.count(1):
        path = RESULTS_DIR / (f"{stem}.json" if attempt == 1 else f"{stem}-{attempt}.json")
        try:
            with path.open("x", encoding="utf-8") as handle:
                handle.write(text)
            return path
        except FileExistsError:
            continue


@contextlib.contextmanager
def saved_if_interrupted(name: str, partial: dict):
    """Around a benchmark's run: on SIGINT (Ctrl-C, or the device calls' `timeout --signal=INT`) save ``partial``
    (the rows measured so far and what else the script has put in it) as a result file that says it was cut, then
    stop as interrupted. Session 45 lost two generation runs' files to their time limits (rebuilt from logs). A run
    that saved its own file sets ``partial["saved"]``."""
    try:
        yield partial
    except KeyboardInterrupt:
        if partial.get("rows") and not partial.get("saved"):
            record = {key: value for key, value in partial.items() if key != "saved"}
            record["interrupted"] = "stopped by SIGINT (a time limit) before the run ended: these are the rows it had " \
                                    "finished"
            print(f"\ninterrupted: saved {save_result(name, record)}", flush=True)
        raise


def _cell(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 100 else f"{value:,.0f}"
    return str(value)


def print_table(rows: list[dict], columns: list[str]) -> None:
    """Plain fixed-width table of ``rows`` (dicts) restricted to ``columns``."""
    cells = [[_cell(row.get(c)) for c in columns] for row in rows]
    widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(columns)]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    print("  ".join("-" * w for w in widths))
    for r in cells:
        print("  ".join(v.ljust(w) for v, w in zip(r, widths)))


# ----------------------------------------------------------------------------- out-of-memory reports
def record_memory_history() -> None:
    """Keep a Python stack for every CUDA allocation from now on (for :func:`oom_report`; slows allocation)."""
    torch.cuda.memory._record_memory_history(enabled="all", context="alloc", stacks="python")


def oom_report(error: BaseException, top: int = 30) -> str:
    """What held the GPU when ``error`` (an out-of-memory error) was raised: the full message, the allocator's summary
    and, when :func:`record_memory_history` ran, the live blocks grouped by pool and by the innermost sumtune,
    transformers, peft or bitsandbytes frame that allocated them, largest first."""
    lines = [str(error), torch.cuda.memory_summary(abbreviated=True)]
    snapshot = torch.cuda.memory._snapshot()
    groups: dict[tuple, list[int]] = {}
    pools: dict[tuple, list[int]] = {}
    for segment in snapshot.get("segments", []):
        pool = tuple(segment.get("segment_pool_id", (0, 0)))
        totals = pools.setdefault(pool, [0, 0])
        totals[0] += segment["total_size"]
        for block in segment.get("blocks", []):
            if block.get("state") != "active_allocated":
                continue
            totals[1] += block["size"]
            where = next((f"{f['filename'].split('site-packages/')[-1]}:{f['line']} {f['name']}"
                          for f in block.get("frames", [])
                          if any(name in f["filename"] for name in ("sumtune", "transformers", "peft", "bitsandbytes"))),
                         "(no stack recorded)")
            entry = groups.setdefault((pool, where), [0, 0])
            entry[0] += block["size"]
            entry[1] += 1
    lines.append("pools (id: reserved GiB, allocated GiB): " + "; ".join(
        f"{pool}: {r / 2**30:.2f}, {a / 2**30:.2f}" for pool, (r, a) in sorted(pools.items())))
    for (pool, where), (size, count) in sorted(groups.items(), key=lambda kv: -kv[1][0])[:top]:
        lines.append(f"{size / 2**30:8.2f} GiB {count:6d} blocks pool {pool} {where}")
    return "\n".join(lines)


def write_oom_report(directory: Path | None, setting: str, error: BaseException) -> None:
    """With ``directory`` (a benchmark's --oom-reports), :func:`oom_report` of ``error`` in
    DIRECTORY/oom-<setting>.txt; a failed report says so in the file rather than hiding the OOM."""
    if directory is None:
        return
    path = Path(directory) / f"oom-{re.sub(r'[^A-Za-z0-9_.-]', '_', setting)}.txt"
    try:
        text = oom_report(error)
    except Exception as report_error:  # noqa: BLE001 - the row's OOM note must survive a failed report
        text = f"{error}\n(report failed: {report_error!r})"
    path.write_text(text, encoding="utf-8")
    print(f"out-of-memory report: {path}", flush=True)


def add_oom_reports_option(parser) -> None:
    parser.add_argument("--oom-reports", type=Path, default=None,
                        help="record every CUDA allocation's stack; a setting that runs out of memory writes what held "
                             "the memory to DIR/oom-<setting>.txt")


def start_oom_reports(directory: Path | None, device: torch.device) -> None:
    if directory is not None and device.type == "cuda":
        Path(directory).mkdir(parents=True, exist_ok=True)
        record_memory_history()
