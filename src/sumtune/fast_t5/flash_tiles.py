"""Tiles of sumtune's T5 attention kernels (``flash_kernels``) and their launch: autotuning lists, pinned tiles, and
the per-tile settings a launch derives (``near_stages``). ``flash_attention`` launches through ``_launch`` and
re-exports the public names (``block_sizes``, ``best_configs``, the lists).
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import re

TABLE_MARGIN = 128  # zero columns each side of a bias table: a tile reaches at most BLOCK - 1 offsets beyond it
KERNEL_NAMES = ("fwd", "dkdv", "dq")  # the kernels whose tiles block_sizes pins (also by TMA: "fwd_desc" tunes "fwd")
_INTERPRETER_BLOCKS = dict(fwd=(32, 32), dkdv=(32, 32), dq=(32, 32))  # tests pin smaller ones to cross blocks
_pinned_blocks: dict[str, tuple[int, ...]] = {}


def _kernels():
    from sumtune.fast_t5 import flash_kernels

    return flash_kernels


# ----------------------------------------------------------------------------- autotuning (Hopper first)
# (BLOCK_M, BLOCK_N, num_warps, num_stages). Few on purpose: each costs a compile (a few seconds) per kernel
# variant. Candidates from `python -m sumtune.fast_t5.flash_compile` (sm_90, bias + padding + dropout): those that
# spill at most a few dozen bytes at head_dim 128 and fit Hopper's 227 KiB of shared memory (4 warps with 128 x 64
# tiles spill kilobytes: the fp32 accumulators alone take 128 registers a thread). Then timed one by one on an H200
# at 32x32x1024 and 4x32x4096 (results/attention_fwd_tiles_tma-2026-12-02-*, attention_bwd_tiles-2026-12-02-*).
# First: each kernel's fastest at 4096 (within 0.5% of the fastest at 1024 too). Beside it: those within ~10% of
# the fastest at either shape, and two of the old lists' configs kept untimed for the decoder's short shapes (fwd
# (128, 32, 8, 3), dK/dV (16, 128, 8, 3)). Dropped: fwd (64, 64, 4, 3), dK/dV (32, 64, 8, 3) and dQ (64, 64, 4, 3)
# (>10% slower at both shapes), dQ (128, 32, 8, 3) (6-8% slower: a fifth). Measured as a whole: the long config's
# step +2.7% against the old lists (results/long_documents_tiles-2026-12-02-*).
AUTOTUNE_CONFIGS = {
    "fwd": [(64, 64, 4, 2), (128, 64, 8, 3), (128, 64, 8, 2), (128, 32, 8, 3)],
    "dkdv": [(32, 64, 4, 3), (32, 128, 8, 3), (32, 64, 4, 2), (16, 128, 8, 3)],
    "dq": [(128, 64, 8, 3), (64, 64, 4, 2), (128, 64, 8, 2), (64, 32, 4, 3)],
}
# The lists before 2026-12-02 (benchmark token `oldtiles`), for A/B runs of the whole step.
PREVIOUS_AUTOTUNE_CONFIGS = {
    "fwd": [(128, 64, 8, 3), (128, 64, 8, 2), (128, 32, 8, 3), (64, 64, 4, 3)],
    "dkdv": [(32, 128, 8, 3), (16, 128, 8, 3), (32, 64, 8, 3)],
    "dq": [(128, 64, 8, 2), (128, 32, 8, 3), (64, 64, 4, 3)],
}


# The forward with K and V by TMA (FWD_DESCRIPTORS), autotuned as "fwd_desc"; untimed in sumtune's forward yet. Triton's
# tutorial forward ran fastest at 128 x 128 x 8 x 3 (results/attention_tutorial_ceiling-2026-12-04-h200.json), which
# this forward takes with its near loop at 2 stages (near_stages).
FWD_DESCRIPTOR_CONFIGS = [(128, 128, 8, 3), (128, 128, 8, 2), (128, 64, 8, 3), (64, 64, 4, 2)]


# Triton releases whose build of the lean dK/dV loops was measured faster than the masked ones (flash_attention
# LEAN_BACKWARD): 3.6, the GPU image's and requirements.txt's. With 3.9 the sm_90 build spills 108 bytes and no lean
# loop issues fewer instructions than its masked one (results/kernel_loops-2026-12-05-cpu-sm90-lean-backward-
# triton39.json): off there and later until timed.
LEAN_BACKWARD_BEFORE_TRITON = (3, 9)


def triton_release(version: str | None = None) -> tuple[int, int] | None:
    """(major, minor) of the installed Triton (or of ``version``); None without one."""
    if version is None:
        try:
            version = importlib.metadata.version("triton")
        except importlib.metadata.PackageNotFoundError:
            return None
    found = re.match(r"(\d+)\.(\d+)", version)
    return (int(found[1]), int(found[2])) if found else None


def lean_backward_default(version: str | None = None) -> bool:
    """LEAN_BACKWARD's default for the installed Triton (or ``version``): on where its build was measured faster."""
    release = triton_release(version)
    return release is not None and release < LEAN_BACKWARD_BEFORE_TRITON


def _config_list(name: str) -> list[tuple[int, int, int, int]]:
    """The tiles the autotuner tries for ``name``: the dK/dV kernel by TMA ("dkdv_desc") takes its pointer form's."""
    return FWD_DESCRIPTOR_CONFIGS if name == "fwd_desc" else AUTOTUNE_CONFIGS[name.removesuffix("_desc")]


def near_stages(name: str, block_m: int, block_n: int, num_stages: int) -> dict:
    """The forward's NEAR_STAGES for a tile: its near-diagonal loop pipelined over 2 stages where the tile is
    128 x 128 with 3 or more, else the launch's. Triton buffers each pipelined load of a loop per stage, the bias
    tile the near loop gathers too (2 x 64 KiB of float32 at 128 x 128), so 128 x 128 x 8 x 3 took 360 KiB of shared
    memory; with the near loop at 2 stages it takes 225 KiB (sm_90 builds, by pointers or by TMA)."""
    if not name.startswith("fwd") or block_m * block_n < 128 * 128 or num_stages < 3:
        return {}
    return {"NEAR_STAGES": 2}


def _configs(name: str, pre_hook=None):
    import triton

    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n, **near_stages(name, m, n, s)}, num_warps=w, num_stages=s,
                          pre_hook=pre_hook)
            for m, n, w, s in _config_list(name)]


# Every flag that selects another kernel build keys its own tuning (a build tuned under another flag's tile is not
# timed fairly: LEAN_TILES' loops may prefer other tiles than the masked ones).
_AUTOTUNE_KEY = ["HEAD_DIM", "len_key", "CAUSAL", "HAS_BIAS", "HAS_KEY_MASK", "DROPOUT", "DRAW8", "STORE_DS",
                 "PV_SPLIT", "PV_FP16", "PAIRS", "CHECK_HOLES", "USE_BAND", "LEAN_TILES"]
_tuned: dict[str, object] = {}


def _autotuned(name: str, kernel, pre_hook=None):
    """``kernel`` wrapped in triton.autotune (configs of AUTOTUNE_CONFIGS[name], or FWD_DESCRIPTOR_CONFIGS for
    "fwd_desc"; each run after ``pre_hook``), built once per kernel object and list."""
    configs = _config_list(name)
    if _tuned.get(name, (None, None, None))[:2] != (kernel, configs):
        import triton

        key = [arg for arg in _AUTOTUNE_KEY if arg in kernel.arg_names]  # STORE_DS: dK/dV only; PV_*: forward
        _tuned[name] = (kernel, configs, triton.autotune(_configs(name, pre_hook), key=key)(kernel))
    return _tuned[name][2]


@contextlib.contextmanager
def block_sizes(**pinned: tuple[int, ...]):
    """Pin tiles for ``fwd``/``dkdv``/``dq`` as (BLOCK_M, BLOCK_N[, num_warps, num_stages]) instead of autotuning.

    For tests (different tiles forward and backward prove the dropout mask does not depend on them) and for
    timing one config; BLOCK_M and BLOCK_N are powers of two >= 16."""
    unknown = set(pinned) - set(KERNEL_NAMES)
    if unknown:
        raise ValueError(f"block_sizes takes fwd, dkdv and dq, not {sorted(unknown)}")
    previous = dict(_pinned_blocks)
    _pinned_blocks.update(pinned)
    try:
        yield
    finally:
        _pinned_blocks.clear()
        _pinned_blocks.update(previous)


def _fixed_blocks(name: str) -> tuple[int, ...] | None:
    """Kernel ``name``'s pinned tiles, else the interpreter's, else None (the autotuner chooses)."""
    return _pinned_blocks.get(name) or (_INTERPRETER_BLOCKS[name] if _kernels().INTERPRET else None)


def _launch(name: str, kernel, grid_for, *args, tune_as: str | None = None, pre_hook=None, **kwargs) -> None:
    """Run ``kernel`` with pinned tiles (of ``name``), the interpreter's tiles, or the autotuner's choice among the
    configs of ``tune_as or name``; ``pre_hook(arguments by name, with BLOCK_M and BLOCK_N)`` runs before each
    launch (TMA block shapes)."""
    blocks = _fixed_blocks(name)
    if blocks is None:
        tuned = _autotuned(tune_as or name, kernel, pre_hook)
        tuned[lambda meta: grid_for(meta["BLOCK_M"], meta["BLOCK_N"])](*args, **kwargs)
        return
    block_m, block_n, *rest = blocks
    if max(block_m, block_n) > TABLE_MARGIN:
        raise ValueError(f"tiles of at most {TABLE_MARGIN} rows/keys (the bias table's margin), not {blocks}")
    if pre_hook is not None:  # the arguments as the autotuner hands them to a config's pre_hook
        pre_hook(dict(zip(kernel.arg_names, args), **kwargs, BLOCK_M=block_m, BLOCK_N=block_n))
    extra = dict(zip(("num_warps", "num_stages"), rest))
    tile = near_stages(name, block_m, block_n, extra.get("num_stages", 3))
    kernel[grid_for(block_m, block_n)](*args, BLOCK_M=block_m, BLOCK_N=block_n, **extra, **tile, **kwargs)


def best_configs() -> dict[str, tuple[int, int, int, int] | None]:
    """The autotuner's last choice per kernel of KERNEL_NAMES, by pointer loads, as (BLOCK_M, BLOCK_N, num_warps,
    num_stages), for reports and for pinning with :func:`block_sizes` (the TMA forms' tuners, "fwd_desc" and
    "dkdv_desc", are not among them: block_sizes takes kernel names)."""
    chosen = {}
    for name, (_, _, tuned) in _tuned.items():
        if name not in KERNEL_NAMES:
            continue
        config = getattr(tuned, "best_config", None)
        chosen[name] = None if config is None else (config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"],
                                                    config.num_warps, config.num_stages)
    return chosen
