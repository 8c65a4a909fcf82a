"""Benchmark tokens for sumtune's kernel settings that are module constants (not TrainConfig fields), and the
context manager that sets them around a benchmark row. Kept beside bench_common (which re-exports them) because the
table, with the history of each token, is long.
"""

from __future__ import annotations

import contextlib

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
    # (`wsonerelease`: a key tile's K and V slots freed by one arrive, measured slower on 2026-12-06 (H100: 8.08 against
    # 7.86 ms at 16x32x4096x128) and gone: commit 1306ac7 has it.)
    # its far tiles' bias inside the exponent's FFMA (ws_forward.LEAN_FAR_TILES, on since 2026-12-06; the token was
    # `wslean` while it was off)
    "nowslean": ("sumtune.fast_t5.ws_forward", "LEAN_FAR_TILES", False),
    "nows64": ("sumtune.fast_t5.ws_forward", "HEAD_DIMS", (128,)),  # head_dim 64 (T5-large, FLAN-T5-XL) in Triton
    "nowsnobias": ("sumtune.fast_t5.ws_forward", "WITHOUT_BIAS_HEAD_DIMS", ()),  # calls without a bias in Triton
    # the warp-specialized forward for training's forwards too, dropout included (flash_attention.WS_TRAINING_FORWARD)
    "wstrain": ("sumtune.fast_t5.flash_attention", "WS_TRAINING_FORWARD", True),
    # (`wsdraw`: its keep mask drawn a tile ahead by a four-warp producer into a shared-memory ring of nibbles, measured
    # slower on 2026-12-06 (H100: forward 2.80 against 2.41 ms at 32x32x1024x128) and gone: commit 3bbfdba has it.)
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
    # (`overlapenc`: the next batch's encoder chunks on a second CUDA stream between the current batch's decoding
    # steps, session 36's `encoderahead` built again: 13.30 against 13.24 summaries/s on 2026-12-06 (H100, tokens
    # equal; 12.02 against 12.02 on 2026-12-05) and gone: commit 24130b0 has it, results/generate_throughput-2026-12-06-
    # h100-80gb-hbm3-overlapenc.json.) Session 51 built it again beside `wsprogramsN` (the 32-head decoding kernel as N
    # persistent programs, leaving the other SMs to the encoder's stream; the decoding steps on a highest-priority
    # stream): 12.20 and 10.68 against 13.29 summaries/s at N = 88 and 66 (H100; results/generate_throughput-2026-12-06-
    # h100-80gb-hbm3-overlap-persistent.json, decode_attention-…-persistent.json); gone too: commit 73c6cb6 has both.
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
