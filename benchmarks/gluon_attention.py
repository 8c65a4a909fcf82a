"""A prototype: T5 attention's forward in Gluon with asynchronous warpgroup MMAs, against sumtune's Triton forward.

    python benchmarks/gluon_attention.py --compile-only        # CPU: compile for sm_90, report waits/registers
    python benchmarks/gluon_attention.py                       # GPU: outputs vs the Triton forward, then timings

Why: sumtune's Triton attention kernels are bound by the ALU work of T5's bias, padding and dropout (benchmarks/
NOTES.md, sessions 14 and 19-21), and Triton 3.6 waits for every `wgmma` at once, so the tensor cores idle while
the softmax runs. Here, per query block, the next key tile's Q·Kᵀ is issued before this tile's softmax and P·V
runs while the next scores are awaited (FlashAttention-3's intra-warpgroup overlap), K and V arrive by cp.async
into rings of two. Not wired into the product: it covers the forward of the 1024/128 config's calls (bias from the
same table, right padding by key length, the same paired Philox dropout draws, bf16, no P·V in float16); if it is
faster on an H200, the backward and the rest come next. Its dropout draws must equal the Triton kernels' (the
backward regenerates them), which the GPU check compares through the outputs.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
import triton  # noqa: E402
from triton.experimental import gluon  # noqa: E402
from triton.experimental.gluon import language as gl  # noqa: E402
from triton.experimental.gluon.language.nvidia.hopper import (  # noqa: E402
    async_copy, fence_async_shared, warpgroup_mma, warpgroup_mma_init, warpgroup_mma_wait)

PHILOX_M = gl.constexpr(0xD256D193)  # Random123's Philox-2x32 (sumtune.fast_t5.dropout_draws: the same 7 rounds)
PHILOX_W = gl.constexpr(0x9E3779B9)


@gluon.jit
def _philox2x32(key, c0, c1):
    for _ in gl.static_range(7):
        hi = gl.umulhi(c0, PHILOX_M)
        lo = c0 * PHILOX_M
        c0 = hi ^ c1 ^ key
        c1 = lo
        key = key + PHILOX_W
    return c0, c1


@gluon.jit
def _keep_pairs(seed, stream, start_i, start_j, n_cols, drop_below, BLOCK_I: gl.constexpr, BLOCK_J: gl.constexpr,
                pair_layout: gl.constexpr, s_layout: gl.constexpr):
    """The keep mask of `dropout_draws._keep_pairs` (queries first), built on the (BLOCK_I/2, BLOCK_J/2) counter
    grid in the layout whose expansion is the accumulator's: each thread draws for the elements it holds."""
    rows = start_i // 2 + gl.arange(0, BLOCK_I // 2, layout=gl.SliceLayout(1, pair_layout))
    cols = start_j // 2 + gl.arange(0, BLOCK_J // 2, layout=gl.SliceLayout(0, pair_layout))
    counter = rows[:, None] * n_cols + cols[None, :]
    zero = gl.zeros([BLOCK_I // 2, BLOCK_J // 2], gl.uint32, layout=pair_layout)
    key = zero + seed.to(gl.uint32)
    w0, w1 = _philox2x32(key, counter.to(gl.uint32, bitcast=True), zero + stream.to(gl.uint32, bitcast=True))
    near = (w0 & 0xFFFF).to(gl.int32) >= drop_below
    far_key = (w0 >> 16).to(gl.int32) >= drop_below
    far_query = (w1 & 0xFFFF).to(gl.int32) >= drop_below
    far_both = (w1 >> 16).to(gl.int32) >= drop_below
    keep = gl.join(gl.join(near, far_key), gl.join(far_query, far_both))  # (rows, cols, +8 key, +8 query)
    keep = gl.reshape(keep, (BLOCK_I // 16, 8, BLOCK_J // 16, 8, 2, 2))
    keep = gl.permute(keep, (0, 5, 1, 2, 4, 3))
    keep = gl.reshape(keep, (BLOCK_I, BLOCK_J))
    return gl.convert_layout(keep, s_layout, assert_trivial=True)


@gluon.jit
def _load_tile(buffer, BASE, offs, stride_n, offs_d, limit):
    async_copy.async_copy_global_to_shared(buffer, BASE + offs[:, None] * stride_n + offs_d[None, :],
                                           mask=(offs < limit)[:, None])
    async_copy.commit_group()


@gluon.jit
def t5_gluon_attention_fwd(Q, K, V, O, LSE, TABLE, KV_LEN, SEED, stride_qb, stride_qh, stride_qm, stride_kb,
                           stride_kh, stride_kn, stride_vb, stride_vh, stride_vn, stride_ob, stride_oh, stride_om,
                           H, Lq, Lk, R, table_row, table_zero, qk_scale, drop_below, drop_scale, n_cols,
                           HEAD_DIM: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
                           HAS_BIAS: gl.constexpr, HAS_LENGTHS: gl.constexpr, DROPOUT: gl.constexpr,
                           num_warps: gl.constexpr):
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                       instr_shape=[16, BLOCK_N, 16])
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                       instr_shape=[16, HEAD_DIM, 16])
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    load_layout: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [num_warps, 1], [1, 0])
    pair_layout: gl.constexpr = gl.BlockedLayout([1, 2], [8, 4], [num_warps, 1], [1, 0])
    tile_smem: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=16, rank=2)

    start_m = gl.program_id(0) * BLOCK_M
    bh = gl.program_id(1)
    b = (bh // H).to(gl.int64)
    h = bh % H
    seed = 0
    if DROPOUT:
        seed = gl.load(SEED)
    kv_len = Lk
    if HAS_LENGTHS:
        kv_len = gl.load(KV_LEN + b)

    offs_d = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, load_layout))
    offs_ml = start_m + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, load_layout))
    q = gl.load(Q + b * stride_qb + h * stride_qh + offs_ml[:, None] * stride_qm + offs_d[None, :],
                mask=(offs_ml < Lq)[:, None], other=0.0)
    q_smem = gl.allocate_shared_memory(gl.bfloat16, [BLOCK_M, HEAD_DIM], tile_smem, q)
    k_smem = gl.allocate_shared_memory(gl.bfloat16, [2, BLOCK_N, HEAD_DIM], tile_smem)
    v_smem = gl.allocate_shared_memory(gl.bfloat16, [2, BLOCK_N, HEAD_DIM], tile_smem)
    K += b * stride_kb + h * stride_kh
    V += b * stride_vb + h * stride_vh
    rows_n = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, load_layout))

    offs_m = start_m + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, s_layout))
    cols_n = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s_layout))
    far_left = 0.0
    far_right = 0.0
    if HAS_BIAS:
        TABLE += h * table_row + table_zero  # TABLE[d]: bias (log2 units) at offset d = j - i
        far_left = gl.load(TABLE + gl.maximum(-R, 1 - Lq))
        far_right = gl.load(TABLE + gl.minimum(R, Lk - 1))

    n_tiles = gl.cdiv(kv_len, BLOCK_N)
    # prologue: K0, K1, V0 in flight (three groups); S0 computed
    _load_tile(k_smem.index(0), K, rows_n, stride_kn, offs_d, kv_len)
    _load_tile(k_smem.index(1), K, BLOCK_N + rows_n, stride_kn, offs_d, kv_len)
    _load_tile(v_smem.index(0), V, rows_n, stride_vn, offs_d, kv_len)
    async_copy.wait_group(2)
    gl.thread_barrier()
    fence_async_shared()
    zero_s = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, layout=s_layout)
    s_raw = warpgroup_mma(q_smem, k_smem.index(0).permute((1, 0)), zero_s, use_acc=False, is_async=True)
    s_raw = warpgroup_mma_wait(num_outstanding=0, deps=(s_raw,))

    m_i = gl.full([BLOCK_M], float("-inf"), gl.float32, layout=gl.SliceLayout(1, s_layout))
    l_i = gl.zeros([BLOCK_M], gl.float32, layout=gl.SliceLayout(1, s_layout))
    acc = warpgroup_mma_init(gl.zeros([BLOCK_M, HEAD_DIM], gl.float32, layout=o_layout))  # loop-carried as async
    for j in range(0, n_tiles):
        start_n = j * BLOCK_N
        cur = j % 2
        nxt = 1 - cur
        # K(j+1) has landed (V(j) may not yet); K(j+2) goes where K(j) was (S(j) is done)
        async_copy.wait_group(1)
        gl.thread_barrier()
        fence_async_shared()
        s_next = warpgroup_mma(q_smem, k_smem.index(nxt).permute((1, 0)), zero_s, use_acc=False, is_async=True)
        _load_tile(k_smem.index(cur), K, start_n + 2 * BLOCK_N + rows_n, stride_kn, offs_d, kv_len)

        # this tile's softmax on the ALUs while S(j+1) and P(j-1)·V(j-1) run on the tensor cores
        offs_n = start_n + cols_n
        s = s_raw * qk_scale
        if HAS_BIAS:
            if start_n + BLOCK_N - 1 - start_m <= -R:
                s = s + far_left
            elif start_n - (start_m + BLOCK_M - 1) >= R:
                s = s + far_right
            else:
                s = s + gl.load(TABLE + (offs_n[None, :] - offs_m[:, None]))
        s = gl.where((offs_n < kv_len)[None, :], s, float("-inf"))
        m_new = gl.maximum(m_i, gl.max(s, 1))
        m_use = gl.where(m_new == float("-inf"), 0.0, m_new)
        p = gl.exp2(s - m_use[:, None])
        alpha = gl.exp2(m_i - m_use)
        l_i = l_i * alpha + gl.sum(p, 1)
        m_i = m_new
        if DROPOUT:
            kept = _keep_pairs(seed, bh, start_m, start_n, n_cols, drop_below, BLOCK_M, BLOCK_N, pair_layout,
                               s_layout)
            p = gl.where(kept, p, 0.0)
        p_op = gl.convert_layout(p.to(gl.bfloat16), p_layout)

        # P(j-1)·V(j-1) done (S(j+1) may run on): V(j+1) goes where V(j-1) was; V(j) must have landed
        acc = warpgroup_mma_wait(num_outstanding=1, deps=(acc,))
        async_copy.wait_group(1)
        gl.thread_barrier()
        fence_async_shared()
        _load_tile(v_smem.index(nxt), V, start_n + BLOCK_N + rows_n, stride_vn, offs_d, kv_len)
        acc = acc * gl.convert_layout(alpha, gl.SliceLayout(1, o_layout))[:, None]
        acc = warpgroup_mma(p_op, v_smem.index(cur), acc, is_async=True)
        s_raw = warpgroup_mma_wait(num_outstanding=1, deps=(s_next,))
    acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))
    async_copy.wait_group(0)

    empty = l_i == 0.0
    l_safe = gl.where(empty, 1.0, l_i)
    out_scale = gl.convert_layout(drop_scale / l_safe, gl.SliceLayout(1, o_layout))
    out = acc * out_scale[:, None]
    offs_mo = start_m + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, o_layout))
    offs_do = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, o_layout))
    gl.store(O + b * stride_ob + h * stride_oh + offs_mo[:, None] * stride_om + offs_do[None, :],
             out.to(gl.bfloat16), mask=(offs_mo < Lq)[:, None])
    gl.store(LSE + bh.to(gl.int64) * Lq + offs_m, gl.where(empty, float("inf"), m_i + gl.log2(l_safe)),
             mask=offs_m < Lq)


SIGNATURE = dict(Q="*bf16", K="*bf16", V="*bf16", O="*bf16", LSE="*fp32", TABLE="*fp32", KV_LEN="*i32",
                 SEED="*i64", stride_qb="i32", stride_qh="i32", stride_qm="i32", stride_kb="i32", stride_kh="i32",
                 stride_kn="i32", stride_vb="i32", stride_vh="i32", stride_vn="i32", stride_ob="i32",
                 stride_oh="i32", stride_om="i32", H="i32", Lq="i32", Lk="i32", R="i32", table_row="i32",
                 table_zero="i32", qk_scale="fp32", drop_below="i32", drop_scale="fp32", n_cols="i32")


def compile_for_sm90(block_m: int = 64, block_n: int = 64, num_warps: int = 4, head_dim: int = 128):
    """Compile on any machine (no GPU needed) with the specialisation a T5-3b launch would give."""
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource

    constexprs = dict(HEAD_DIM=head_dim, BLOCK_M=block_m, BLOCK_N=block_n, HAS_BIAS=True, HAS_LENGTHS=True,
                      DROPOUT=True, num_warps=num_warps)
    names = t5_gluon_attention_fwd.arg_names
    signature = {n: ("constexpr" if n in constexprs else SIGNATURE[n]) for n in names}
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(names)
             if n not in constexprs and (SIGNATURE[n].startswith("*") or n.startswith("stride_"))}
    source = GluonASTSource(fn=t5_gluon_attention_fwd, signature=signature, constexprs=constexprs, attrs=attrs)
    return triton.compile(source, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=num_warps))


def compile_report() -> None:
    from sumtune.fast_t5 import flash_compile

    for block_m, block_n, num_warps in ((64, 64, 4), (64, 128, 4), (128, 64, 8)):
        try:
            compiled = compile_for_sm90(block_m, block_n, num_warps)
        except Exception as error:  # noqa: BLE001 - a config that does not compile is reported, not fatal
            print(f"({block_m}, {block_n}, {num_warps}): does not compile: {str(error).splitlines()[-1][:300]}")
            continue
        ptx = compiled.asm["ptx"]
        waits = re.findall(r"wgmma.wait_group.sync.aligned\s+(\d+)", ptx)
        ops = flash_compile.sass_opcodes(compiled)
        print(f"({block_m}, {block_n}, {num_warps}): wgmma waits {waits}, {flash_compile.resources(compiled)}, "
              f"SASS {sum(ops.values())} (HGMMA {ops.get('HGMMA', 0)})")


def inputs(batch: int, heads: int, length: int, head_dim: int, radius: int = 128, padded_rows: int = 1, seed: int = 0):
    """Encoder self-attention inputs as the fast T5 path has them: (B, L, H, D) bf16 memory seen as (B, H, L, D), a
    bias table saturating beyond +-radius (`bias_table_log2`), right padding on `padded_rows` rows."""
    from sumtune.fast_t5.attention_inputs import key_padding
    from sumtune.fast_t5.flash_attention import bias_table_log2

    gen = torch.Generator(device="cuda").manual_seed(seed)
    q, k, v = (torch.randn(batch, length, heads, head_dim, device="cuda", dtype=torch.bfloat16, generator=gen)
               .transpose(1, 2) for _ in range(3))
    offsets = torch.arange(-(length - 1), length, device="cuda").clamp(-radius, radius) + radius
    per_bucket = torch.randn(heads, 2 * radius + 1, device="cuda", generator=gen)
    table = bias_table_log2(per_bucket[:, offsets])
    mask = torch.ones(batch, length, dtype=torch.bool, device="cuda")
    for row in range(min(padded_rows, batch)):
        mask[row, length - length // (3 + row):] = False  # right padding, no holes
    return q, k, v, table, radius, key_padding(mask)


def gluon_forward(q, k, v, table, radius, padding, scale, dropout_p, seed, block=(64, 64, 4)):
    from sumtune.fast_t5.attention_inputs import dropout_threshold
    from sumtune.fast_t5.flash_attention import LOG2E, _radius, _table_geometry

    batch, heads, length, head_dim = q.shape
    out = torch.empty((batch, length, heads, head_dim), device=q.device, dtype=q.dtype).transpose(1, 2)
    lse = torch.empty((batch, heads, length), device=q.device, dtype=torch.float32)
    drop_below, drop_scale = dropout_threshold(dropout_p, 1 << 16)
    block_m, block_n, num_warps = block
    t5_gluon_attention_fwd[(triton.cdiv(length, block_m), batch * heads)](
        q, k, v, out, lse, table, padding.lengths, seed, q.stride(0), q.stride(1), q.stride(2), k.stride(0),
        k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2), out.stride(0), out.stride(1), out.stride(2),
        heads, length, length, _radius(radius, length, length), *_table_geometry(table, length), scale * LOG2E,
        drop_below, drop_scale, triton.cdiv(length, 16) * 8,
        HEAD_DIM=head_dim, BLOCK_M=block_m, BLOCK_N=block_n, HAS_BIAS=True, HAS_LENGTHS=True, DROPOUT=dropout_p > 0,
        num_warps=num_warps)
    return out, lse


def triton_forward(q, k, v, table, radius, padding, scale, dropout_p, seed):
    """The product's forward (sumtune.fast_t5.flash_attention._forward), P·V in bf16 at every length (as here)."""
    from unittest import mock

    from sumtune.fast_t5 import flash_attention as fa

    with mock.patch.object(fa, "PRECISE_PV_MIN_KEYS", 1 << 30):
        return fa._forward(q, k, v, table, radius, padding.mask, padding.lengths, padding.holes, False, scale,
                           dropout_p, seed, 16, True)


def gpu_compare(shapes, dropout_p: float = 0.1) -> list[dict]:
    import bench_common as bc

    rows = []
    for batch, heads, length, head_dim in shapes:
        q, k, v, table, radius, padding = inputs(batch, heads, length, head_dim)
        seed = torch.tensor([1234], device="cuda", dtype=torch.int64)
        scale = 1.0  # T5 folds the scale into its weights
        row = dict(shape=f"{batch}x{heads}x{length}x{head_dim}")
        for p, tag in ((0.0, "nodrop"), (dropout_p, "drop")):  # without dropout first: a wrong mask shows apart
            ref, ref_lse = triton_forward(q, k, v, table, radius, padding, scale, p, seed)
            out, lse = gluon_forward(q, k, v, table, radius, padding, scale, p, seed)
            rows_ok = torch.isfinite(ref_lse)
            row[f"{tag}_max_abs_diff"] = (out.float() - ref.float()).abs().max().item()
            row[f"{tag}_lse_max_abs_diff"] = (lse - ref_lse)[rows_ok].abs().max().item()
        row["ref_max_abs"] = ref.float().abs().max().item()
        for name, fn in (("triton_ms", lambda: triton_forward(q, k, v, table, radius, padding, scale, dropout_p, seed)),
                         ("gluon_ms", lambda: gluon_forward(q, k, v, table, radius, padding, scale, dropout_p, seed))):
            row[name] = triton.testing.do_bench(fn, warmup=25, rep=200)
        flops = 4 * batch * heads * length * length * head_dim  # QK^T and PV, padding included
        row["triton_tflops"] = flops / row["triton_ms"] / 1e9
        row["gluon_tflops"] = flops / row["gluon_ms"] / 1e9
        print(row, flush=True)
        rows.append(row)
    bc.print_table(rows, list(rows[0]))
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--compile-only", action="store_true")
    parser.add_argument("--shapes", default="32x32x1024x128,4x32x4096x128")
    parser.add_argument("--no-save", action="store_true")
    args = parser.parse_args(argv)
    if args.compile_only or not torch.cuda.is_available():
        compile_report()
        return 0
    import bench_common as bc

    shapes = [tuple(int(x) for x in s.split("x")) for s in args.shapes.split(",") if s.strip()]
    rows = gpu_compare(shapes)
    if not args.no_save:
        payload = dict(what="Gluon async-wgmma forward vs the Triton forward", rows=rows)
        print(f"saved {bc.save_result('gluon_attention', payload)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
