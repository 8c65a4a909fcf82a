"""One decoding step's cross-attention over cached encoder states in one Triton kernel (the "fused" mode of
sumtune.generation.t5_decode).

Public:
    fused_hidden_attention(q_mem, memory, lengths, splits=None, bias=None) -> Tensor  ([B, H, D] as the two GEMMs)
    kernel_available(tensor) -> str | None                    (why the kernel cannot run, or None)
    self_attention_kernel(memory) -> str | None               (which kernel takes the decoder's self-attention)
    reference_hidden_attention(q_mem, memory, lengths, bias=None) -> Tensor   (plain PyTorch, float64: tests)
    attend_in_torch(q_mem, memory, lengths, bias=None) -> Tensor   (torch's ops: where no tile fits shared memory)
    combine_in_torch(acc, running_max, total, heads, dtype) -> Tensor         (key splits combined, torch's ops)
    combine_constexprs(splits, d_model) -> dict                               (the combine kernel's constexprs)

``q_mem`` [B, H, D] are the queries with W_k moved to their side (t5_decode's "hidden" mode), ``memory`` [B, L, D] the
encoder states (keys and values both), ``lengths`` [B] int32 each row's source length (its keys are a prefix).
The hidden mode's two batched GEMMs read every padded state twice a step; this reads each real one once.
"""

from __future__ import annotations

import importlib.util
import math

import torch
from torch import Tensor

# Tiles measured at 32 heads x 4096 keys, d_model 1024 (results/decode_attention_head_groups-2026-12-03-h200.json):
# 64 keys x 8 warps x 16 heads x 2 stages 1.29 ms at 256 rows (the two GEMMs 1.45; 32 heads in one program with 16
# keys x 16 warps, the earlier tiles, 3.98), 0.88 at 64 rows (the two GEMMs 0.42 there; on real bills, whose rows are
# shorter than the batch's width, whole generation at 64 rows is faster fused: t5_decode.AUTO_FUSED_FROM).
# (states from, keys a loop iteration, warps): the first whose count of states (rows x padded source tokens) a launch
# reaches. A tile is d_model-wide states (128 KiB at T5-3b's 1024 for 64 keys, bf16). 32 keys x 4 warps (sm_90 build
# at T5-3b's shapes: 255 registers, 4 bytes of spill, 99 KB of shared memory, so two programs an SM) against 64 x 8
# (178 registers, no spill, 166 KB) on an H200, 2026-12-04: at 4096 keys 1.46 against 1.65 ms at 256 rows and 1.01
# against 0.89 at 64 (results/decode_attention-2026-12-04-h200.json; 1.17 against 1.30 at 256 in session 28's,
# decode_attention-2026-12-03-h200.json); at 1024 keys 0.96 against 1.06 at 512 rows and 0.68 against 0.63 at 256
# (decode_attention-2026-12-04-h200-1024.json): faster from 2^19 states, slower at 2^18 either way. Whole decode loops
# of 256 rows x 512 steps: 15.81 s against 18.14 with every input 4096 tokens, 9.85 against 10.06 on real bills cut
# there (results/generate_profile-2026-12-04-h200-{full,bills}.json); whole generation with every input 4096 tokens
# 10.31 against 9.39 summaries/s, tokens equal to transformers' (generate_throughput-2026-12-04-h200-full.json).
TILES_BY_STATES = ((1 << 19, 32, 4), (0, 64, 8))
INTERPRETER_BLOCK_N = 64  # Triton's CPU interpreter: fewer, wider iterations (tests)
MIN_PROGRAMS = 264  # split rows' keys until about two programs an H100/H200 SM (132 SMs)
HEADS_PER_PROGRAM = 16  # heads of one program (a power of two >= 16); fewer -> several programs a row and split
NUM_STAGES = 2  # Triton's software pipelining depth over the key tiles
# Tiles that did not fit a GPU's shared memory: (d_model, heads a program, keys a tile asked for, warps) -> keys a
# tile that launched, or 0 where none did (torch's ops then), for the process: CUDA graphs replay the eager choice.
# sm_90 builds at 16 heads a program (Triton 3.6, session 47): 64 keys x 8 warps take 166 KB at d_model 1024 and
# 330 KB at 2048 (an H100/H200 SM has 227 KiB: FLAN-T5-XL's launches failed), 32 x 4 99 and 198 KB, 16 x 4 66 and
# 132 KB (results/kernel_builds-2026-12-06-cpu-sm90-2.json).
fitted_block_n: dict[tuple[int, int, int, int], int] = {}
MIN_BLOCK_N = 16  # a tensor-core tile's keys
# The kernel in Gluon with Hopper's warpgroup MMAs, keys first, its chunks by TMA (sumtune.generation.gluon_decode):
# on an H200 on 2026-12-04, 0.92-1.11 against 1.14-1.29 ms at 256 rows x 4096 keys and 3.28-3.38 against 4.19-4.23
# at 1024 rows; whole generation with every input 4096 tokens 11.6 against 10.4 summaries/s in two runs, tokens equal
# to transformers' (its docstring has the files). So it takes the launches it was measured on and can run: a Hopper
# GPU, bf16, dense states (TMA), sources of GLUON_FROM_KEYS or more (shorter ones, e.g. 1024/128 at 256+ rows, were
# not measured and keep the Triton kernel). Token `nodecodegluon`: off.
GLUON_KERNEL = True
GLUON_FROM_KEYS = 1025
# A row's 32 heads in one warp-specialized program (sumtune.generation.gluon_decode_ws: a TMA producer warp, two
# consumer warpgroups of 16 heads reading each chunk of the row's states from shared memory), so each row's states
# come from L2 once instead of twice; cross-attention of d_model 1024 with 17-32 heads. Session 44 (H100) ran it in two
# key splits at 256 rows: 0.98 vs 0.82 ms and generation 11.6 vs 12.4 summaries/s (results/decode_attention-2026-12-06-
# h100-80gb-hbm3.json, generate_throughput-…-hbm3.json). Unsplit (WS_MIN_PROGRAMS below), session 45 on an H100: 0.772
# vs 0.815 ms at 256 rows x 4096 keys, 2.90 vs 3.18 at 1024 (decode_attention-…-hbm3-unsplit.json); generation at
# 256 rows x 4096 -> 512 12.99 vs 12.48 summaries/s, tokens equal to transformers' (generate_throughput-…-hbm3-
# unsplit.json); its GPU test passed again. On since then; token `nodecodews32`: off.
# It takes launches split over keys too (fewer rows than WS_MIN_PROGRAMS below). Alone in CUDA graphs on an H100
# (session 47) it ran them slower than gluon_decode, 0.189 against 0.175 ms at 32 rows x 4096 keys and 0.282 against
# 0.260 at 64 (faster at 256, unsplit: 0.741 against 0.796; results/decode_attention-2026-12-06-h100-80gb-hbm3-
# graphs.json), but whole generation on real bills at 64 rows ran 14.16-14.17 with it against 14.06 with gluon_decode
# there, in three runs (generate_throughput-…-hbm3-split64{,b}.json): it keeps them.
GLUON_WARP_SPECIALIZED = True
# Its programs take an SM each (208 KiB of shared memory), so one a row and SM is a full wave: 256 rows run unsplit
# (256 programs, two waves on 132 SMs) instead of in two splits whose combine (torch ops over a [B, 2, 32, D] fp32
# buffer, ~67 MB at 256 rows) ran on top of the kernel in session 44's 0.98 ms against gluon_decode's 0.82 (that
# kernel's 512 programs at 256 rows are unsplit under MIN_PROGRAMS). Token `wsmin264`: the shared MIN_PROGRAMS.
WS_MIN_PROGRAMS = 132
# Launches split over keys (rows too few to fill the GPU: real bills at 64 rows, any launch under 132 rows of the
# 32-head kernel) combine their splits in one Triton kernel (`cross_kernels.combine_splits`: one read of the fp32
# partial sums) instead of ~10 torch ops that write and read back a [B, splits, heads, D] product. On an H100
# (session 46): whole generation on real bills cut at 4096, 64 rows, 13.8 against 12.3 summaries/s, tokens equal to
# transformers' (results/generate_throughput-2026-12-06-h100-80gb-hbm3-fusedcombine.json); the kernel alone at 4096
# keys 0.47 vs 1.03 ms at 32 rows, 0.85 vs 1.12 at 64 rows under gluon_decode, but 0.84 vs 0.61 at 64 rows under the
# 32-head kernel (a row out of line with its neighbours: 32 rows took 1.03 there), errors against float32 equal
# (decode_attention-…-fusedcombine.json). On since then; benchmark token `nofusedcombine`: torch's ops.
FUSED_COMBINE = True
COMBINE_BLOCK_D = 256  # d_model columns a combine loop iteration
# Why the Gluon kernel cannot run in this process, once its import or a launch has failed (its API moves between
# Triton releases; the builds are tested with 3.6 and the newest): the Triton kernel takes its launches from then on,
# said once.
gluon_failure: str | None = None
# The same for the warp-specialized kernel alone (GLUON_WARP_SPECIALIZED): its failure hands its launches to
# gluon_decode, not to the Triton kernel.
ws_failure: str | None = None
# Two other forms of the kernel were measured on 2026-12-03 and went: the products transposed (keys, then d_model, as
# the MMA tile's rows, so Hopper's warpgroup MMA takes them; 1.43 and 1.23 ms against 1.31 and 1.28 at 256 rows x 4096
# keys in two calls, 15.9 against 16.7 summaries/s in whole generation on real bills, 6.34 against 6.39 at batch 32)
# and d_model in four chunks (four independent score products; 1.32 ms, 16.7 summaries/s): results/decode_attention_
# {keys_first,chunked}-2026-12-03-h200.json, generate_throughput_4096_512_{keys_first,chunked,b32}-…; commit 73d947f
# has the first, 3a66a66 the second. A third on 2026-12-04 gave each warp its own d_model slice (so a warp's score
# product is short and the slices' partial scores meet in one sum): 2.3-2.6 ms with 8 slices, 6.2-7.2 with 16, against
# 1.30 shipped (results/decode_attention-2026-12-03-h200.json); commit 0f59099 has it. On 2026-12-04 (commit 2d1e9f9):
# the accumulator rescaled only when a head's maximum grew by more than e^8 (as FlashAttention-4 does) ran 1.158
# against 1.123 ms at 256 rows x 4096 keys (results/decode_attention-2026-12-04-h200-rescale.json), and the decoder's
# self-attention in this kernel (a per-head bias, the step's length) with it made whole generation 10.04 against 10.26
# summaries/s (generate_throughput-2026-12-04-h200-full-s30.json): both went. Triton's warp-specialised key loop
# (`tl.range(..., warp_specialize=True)`: loads, products and softmax in separate warp groups) on 2026-12-04: 2.66
# against 1.14 ms at 32 keys x 4 warps and 256 rows x 4096 keys, 1.34 against 1.34 at 64 x 8
# (results/decode_attention-2026-12-04-h200-decodews.json), whole generation 5.87 against 10.39 summaries/s with every
# input 4096 tokens (generate_throughput-2026-12-04-h200-full-decodews.json): it went (commit 04eb97e has it).
# On 2026-12-05 (commit 210896c), the Gluon kernel with a row's 32 heads in one program (8 warps, each row's states
# from L2 once; 64-wide chunks in a ring of 19, a tile and 3 chunks of the next in flight beside 64 KiB of queries)
# passed its float64 GPU test and kept transformers' tokens, but ran 1.56 against 0.82 ms at 256 rows x 4096 keys and
# 5.75 against 3.17 at 1024 rows on an H100, whole generation 8.45 against 12.08 summaries/s (results/decode_attention-
# 2026-12-05-h100-wide.json, generate_throughput-2026-12-05-h100-full-wide.json): its sm_90 build has 255 registers
# with reloads in every chunk, and block barriers after each chunk's score MMAs that the kernel does not ask for
# (Triton's shared-memory analysis adds them) beside the 17 it does: one program an SM waits, it does not stream.
# It went.


def _kernels():
    from sumtune.generation import cross_kernels

    return cross_kernels


def kernel_available(tensor: Tensor) -> str | None:
    """The first reason the kernel cannot run on ``tensor``'s device and shape, or None."""
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed"
    if tensor.device.type != "cuda" and not _kernels().INTERPRET:
        return f"it needs a CUDA device, not {tensor.device.type}"
    d_model = tensor.shape[-1]
    if d_model & (d_model - 1) or d_model < 16:
        return f"d_model {d_model} is not a power of two >= 16"
    return None


def tiles_for(rows: int, src_len: int) -> tuple[int, int]:
    """(keys a tile, warps) for a launch over ``rows`` rows of ``src_len`` (padded) source tokens: the first of
    TILES_BY_STATES whose count of states they reach."""
    return next((block_n, warps) for least, block_n, warps in TILES_BY_STATES if rows * src_len >= least)


def choose_splits(batch: int, src_len: int, block_n: int, head_groups: int = 1, min_programs: int | None = None) -> int:
    """Key splits per row: enough programs to fill the GPU (``min_programs``, MIN_PROGRAMS unless given), each with at
    least a few tiles of keys."""
    wanted = min_programs or MIN_PROGRAMS
    return max(1, min(-(-wanted // max(batch * head_groups, 1)), -(-src_len // (8 * block_n))))


def head_blocks(heads: int, per_program: int) -> tuple[int, int]:
    """(heads a program, head groups a row): a power of two >= 16 (a tensor-core tile's rows) and enough groups."""
    block_h = max(16, min(1 << (heads - 1).bit_length(), per_program))
    return block_h, -(-heads // block_h)


def _gluon_kernel(memory: Tensor, self_attention: bool = False, heads: int = 0):
    """(sumtune.generation.gluon_decode, its heads a program) where GLUON_KERNEL asks for it and it can run here on
    a launch of the kind it was measured faster on (or, for ``self_attention``, on any launch it covers), else
    None; (gluon_decode_ws, 32) for a cross-attention launch it covers where GLUON_WARP_SPECIALIZED asks for it."""
    if not GLUON_KERNEL or gluon_failure or _kernels().INTERPRET or memory.device.type != "cuda" \
            or memory.dtype != torch.bfloat16 or torch.compiler.is_compiling():  # dynamo traces Triton, not Gluon
        return None
    if torch.cuda.get_device_capability(memory.device)[0] != 9:  # warpgroup MMAs: Hopper only
        return None
    gluon_decode = _gluon_module()
    if gluon_decode is None:
        return None
    block_h = gluon_heads_per_program(gluon_decode, memory.shape[1], gluon_decode.dense(memory), memory.shape[-1],
                                      self_attention)
    if block_h and GLUON_WARP_SPECIALIZED and not self_attention and not ws_failure:
        try:
            from sumtune.generation import gluon_decode_ws
        except Exception as error:  # noqa: BLE001 - as _gluon_module: gluon_decode takes the launch
            _gluon_failed(error, warp_specialized=True)
        else:
            if gluon_decode_ws.supported(heads, memory.shape[-1]) is None:
                return gluon_decode_ws, gluon_decode_ws.BLOCK_H
    return (gluon_decode, block_h) if block_h else None


def gluon_heads_per_program(gluon_decode, src_len: int, dense: bool, d_model: int,
                            self_attention: bool = False) -> int | None:
    """The Gluon kernel's heads a program for a launch of the kind it was measured faster on (sources of
    GLUON_FROM_KEYS or more, dense states for its TMA descriptor, a d_model it covers), else None: the Triton
    kernel. The decoder's self-attention (t5_decode.FUSED_SELF_ATTENTION asks for it only where this kernel runs)
    at any length."""
    if (src_len < GLUON_FROM_KEYS and not self_attention) or not dense or gluon_decode.supported(d_model) is not None:
        return None
    return gluon_decode.BLOCK_H


def self_attention_kernel(memory: Tensor) -> str | None:
    """Which kernel would take the decoder's self-attention over ``memory`` (t5_decode.FUSED_SELF_ATTENTION):
    "gluon" on a Hopper GPU where the Gluon kernel can run, "triton" in Triton's CPU interpreter (tests), else None
    (the two GEMMs: the Triton kernel was not faster there, results/generate_throughput-2026-12-04-h200-full-s30
    .json)."""
    if kernel_available(memory) is not None:
        return None
    if _kernels().INTERPRET:
        return "triton"
    return "gluon" if _gluon_kernel(memory, self_attention=True) else None


def _gluon_module():
    """sumtune.generation.gluon_decode, or None where this Triton cannot import it (then said once, as a failed
    launch is)."""
    try:
        from sumtune.generation import gluon_decode
    except Exception as error:  # noqa: BLE001 - a Triton without (this form of) Gluon's Hopper API
        _gluon_failed(error)
        return None
    return gluon_decode


def fused_hidden_attention(q_mem: Tensor, memory: Tensor, lengths: Tensor, splits: int | None = None,
                           bias: Tensor | None = None) -> Tensor:
    """softmax(q_mem . memory^T (+ bias) over each row's first lengths[b] keys) . memory -> [B, H, D] in memory's
    dtype. ``lengths`` [B] may be a broadcast view (stride 0); ``bias`` [H, >= longest length] (keys contiguous), one
    row a head, the same for every row of the batch: the decoder's relative position bias at one step."""
    batch, heads, d_model = q_mem.shape
    src_len = memory.shape[1]
    if bias is not None and (bias.shape[0] != heads or bias.stride(-1) != 1 or bias.shape[-1] < src_len):
        raise ValueError(f"bias must be [{heads}, >= {src_len}] with contiguous keys, not {tuple(bias.shape)}")
    kernels = _kernels()
    splits_asked = splits
    block_n, warps = tiles_for(batch, src_len)
    block_n = INTERPRETER_BLOCK_N if kernels.INTERPRET else block_n
    gluon = _gluon_kernel(memory, self_attention=bias is not None, heads=heads)
    gluon_kernel = gluon[0] if gluon else None
    block_h, groups = head_blocks(heads, gluon[1] if gluon else HEADS_PER_PROGRAM)
    if gluon:
        block_n = gluon_kernel.BLOCK_N
    warp_specialized = bool(gluon_kernel) and getattr(gluon_kernel, "WARP_SPECIALIZED", False)
    splits = splits or choose_splits(batch, src_len, block_n, groups, WS_MIN_PROGRAMS if warp_specialized else None)
    keys_per_split = -(-src_len // splits)
    keys_per_split = -(-keys_per_split // block_n) * block_n
    if q_mem.stride(-1) != 1:  # the kernels take any row and head strides: t5_decode's [H, B, D] GEMM output as it is
        q_mem = q_mem.contiguous()
    out = torch.empty((batch, heads, d_model), device=q_mem.device, dtype=memory.dtype)
    if splits > 1:
        acc = torch.empty((batch, splits, groups * block_h, d_model), device=q_mem.device, dtype=torch.float32)
        running_max = torch.empty((batch, splits, groups * block_h), device=q_mem.device, dtype=torch.float32)
        total = torch.empty_like(running_max)
    else:
        acc = running_max = total = out  # unused
    if gluon_kernel:
        try:
            gluon_kernel.launch((groups, batch, splits), q_mem, memory, lengths, out, acc, running_max, total, heads,
                                keys_per_split, block_h, splits > 1, bias)
        except Exception as error:  # noqa: BLE001 - e.g. a Triton release whose Gluon API moved
            _gluon_failed(error, warp_specialized)
            # the kernel taking over chooses its own splits (the warp-specialized one's fit its 32-head programs)
            return fused_hidden_attention(q_mem, memory, lengths, splits_asked if warp_specialized else splits, bias)
    else:
        asked = (d_model, block_h, block_n, warps)
        block_n = fitted_block_n.get(asked, block_n)
        while block_n:
            try:
                kernels.hidden_cross_attention[(groups, batch, splits)](
                    q_mem, memory, lengths, out, acc, running_max, total, q_mem if bias is None else bias,
                    q_mem.stride(0), q_mem.stride(1), memory.stride(0), memory.stride(1), out.stride(0), out.stride(1),
                    lengths.stride(0), 0 if bias is None else bias.stride(0), heads, keys_per_split, BLOCK_H=block_h,
                    D=d_model, BLOCK_N=block_n, SPLIT=splits > 1, UPCAST=kernels.INTERPRET, HAS_BIAS=bias is not None,
                    num_warps=warps, num_stages=NUM_STAGES)
                break
            except Exception as error:  # noqa: BLE001 - only a tile too big for this GPU's shared memory is retried
                if type(error).__name__ != "OutOfResources":
                    raise
                block_n = fitted_block_n[asked] = _smaller_tile(error, d_model, block_n)
        if not block_n:
            return attend_in_torch(q_mem, memory, lengths, bias)
    if splits == 1:
        return out
    if not FUSED_COMBINE:
        return combine_in_torch(acc, running_max, total, heads, memory.dtype)
    kernels.combine_splits[(heads, batch)](acc, running_max, total, out, out.stride(0), out.stride(1), acc.shape[2],
                                           **combine_constexprs(splits, d_model), num_warps=4)
    return out


def _smaller_tile(error: Exception, d_model: int, block_n: int) -> int:
    """Half of ``block_n`` keys a tile after a launch this GPU's shared memory could not hold (the tiles were measured
    on H100/H200 at d_model 1024; FLAN-T5-XL's 2048, or a card with less shared memory, needs smaller ones); 0, said
    once, when even MIN_BLOCK_N keys do not fit."""
    if block_n > MIN_BLOCK_N:
        return block_n // 2
    import warnings

    warnings.warn(f"sumtune: the fused decoding kernel does not fit this GPU's shared memory at d_model {d_model} "
                  f"({str(error).splitlines()[0][:200]}); torch's ops run its launches instead.", RuntimeWarning,
                  stacklevel=4)
    return 0


def combine_constexprs(splits: int, d_model: int) -> dict[str, int]:
    """`cross_kernels.combine_splits`' compile-time arguments for a launch of ``splits`` key splits (what
    benchmarks/kernel_builds.py builds too): the splits padded to a power of two (at least 2) for tl.arange."""
    return dict(SPLITS=splits, BLOCK_S=max(2, 1 << (splits - 1).bit_length()), D=d_model,
                BLOCK_D=min(d_model, COMBINE_BLOCK_D))


def combine_in_torch(acc: Tensor, running_max: Tensor, total: Tensor, heads: int, dtype: torch.dtype) -> Tensor:
    """The key splits' partial results ([B, splits, padded heads, D] sums, [B, splits, padded heads] running maxima
    and denominators) combined into [B, heads, D] in ``dtype`` with torch's ops (what FUSED_COMBINE's kernel does in
    one pass)."""
    weights = torch.exp(running_max - running_max.amax(dim=1, keepdim=True)).nan_to_num_(0.0)  # empty splits: 0
    numerator = (acc * weights[..., None]).sum(dim=1)[:, :heads]
    denominator = (total * weights).sum(dim=1)[:, :heads].clamp_min(torch.finfo(torch.float32).tiny)
    return (numerator / denominator[..., None]).to(dtype)


def _gluon_failed(error: Exception, warp_specialized: bool = False) -> None:
    """Record why the Gluon kernel (or only its warp-specialized form, which hands over to gluon_decode) cannot
    launch here and say so once; the Triton kernel (or gluon_decode) runs instead."""
    import warnings

    global gluon_failure, ws_failure
    why = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"[:300]
    if warp_specialized:
        ws_failure = why
    else:
        gluon_failure = why
    kernel, instead = ("warp-specialized Gluon", "the Gluon kernel") if warp_specialized \
        else ("Gluon", "the Triton kernel")
    warnings.warn(f"sumtune: the {kernel} decoding kernel cannot run here ({why}); {instead} runs instead.",
                  RuntimeWarning, stacklevel=3)


def attend_in_torch(q_mem: Tensor, memory: Tensor, lengths: Tensor, bias: Tensor | None = None) -> Tensor:
    """The kernel's result with torch's ops (two batched GEMMs in memory's dtype, the softmax in float32): where no
    tile of the kernel fits the GPU's shared memory."""
    scores = torch.bmm(q_mem, memory.transpose(1, 2)).float()
    if bias is not None:
        scores = scores + bias[:, : memory.shape[1]].float()
    keep = torch.arange(memory.shape[1], device=memory.device)[None, :] < lengths[:, None]
    probs = torch.softmax(scores.masked_fill(~keep[:, None, :], -math.inf), dim=-1).nan_to_num_(0.0)
    return torch.bmm(probs.to(memory.dtype), memory)


def reference_hidden_attention(q_mem: Tensor, memory: Tensor, lengths: Tensor, dtype=torch.float64,
                               bias: Tensor | None = None) -> Tensor:
    """The same maths in plain PyTorch (masked softmax over the first lengths[b] keys, ``bias`` [H, >= L] added)."""
    scores = q_mem.to(dtype) @ memory.to(dtype).transpose(1, 2)
    if bias is not None:
        scores = scores + bias[:, : memory.shape[1]].to(dtype)
    keep = torch.arange(memory.shape[1], device=memory.device)[None, :] < lengths[:, None].to(memory.device)
    probs = torch.softmax(scores.masked_fill(~keep[:, None, :], -math.inf), dim=-1).nan_to_num(0.0)
    return probs @ memory.to(dtype)
