"""T5's position bias in sumtune's Triton attention: the bias table by offset (sumtune.fast_t5.bias) against stock's
compute_bias, and the kernels' bias band (BIAS_BAND, sumtune.fast_t5.bias_band) against the table's gathers.

On CPU in Triton's interpreter (tests/conftest.py); the compiled kernels: tests/test_fast_t5_attention_gpu.py.
"""

from __future__ import annotations

import pytest
import torch
from _fast_t5_attention_helpers import _band_on_and_off, t5_like_table

from sumtune.fast_t5 import bias as bias_lib


@pytest.mark.parametrize("num_buckets,max_distance", [(32, 128), (16, 64), (32, 40)])
def test_bias_table_reproduces_stock_compute_bias_and_saturates(num_buckets, max_distance):
    """The table is stock's bias at every offset, and constant beyond +-max_distance, which the kernels rely on
    to skip it for far-apart tiles."""
    from transformers import T5Config
    from transformers.models.t5.modeling_t5 import T5Attention

    for is_decoder in (False, True):
        config = T5Config(d_model=32, d_kv=8, num_heads=4, relative_attention_num_buckets=num_buckets,
                          relative_attention_max_distance=max_distance, is_decoder=is_decoder)
        torch.manual_seed(0)
        attention = T5Attention(config, has_relative_attention_bias=True).requires_grad_(False)
        query_len, key_len = 2 * max_distance + 37, max_distance + 50  # far beyond max_distance on both sides
        for dtype in (torch.float32, torch.bfloat16):
            table = bias_lib.relative_position_bias_by_offset(attention, query_len, key_len, dtype)
            assert table.shape == (4, query_len + key_len - 1) and table.dtype == torch.float32
            offsets = torch.arange(key_len)[None, :] - torch.arange(query_len)[:, None]
            stock = attention.compute_bias(query_len, key_len)[0].to(dtype).float()
            assert torch.equal(table[:, offsets + query_len - 1], stock)
            at = {d: table[:, d + query_len - 1] for d in (-max_distance, max_distance)}
            far_left, far_right = table[:, : query_len - max_distance], table[:, query_len - 1 + max_distance:]
            assert torch.equal(far_left, at[-max_distance][:, None].expand_as(far_left))
            assert torch.equal(far_right, at[max_distance][:, None].expand_as(far_right))


@pytest.mark.parametrize("causal", [False, True], ids=["encoder", "decoder"])
def test_bias_band_changes_no_bit(fa, monkeypatch, causal):
    """BIAS_BAND: the near tiles read the bias from the band instead of the table: the same bits, forward and
    backward, with padding and dropout; tiles of different shapes per kernel, lengths not a multiple of them, a
    radius that leaves far-left, near and far-right tiles."""
    results = _band_on_and_off(fa, monkeypatch, "cpu", torch.float32, 70, 2, 16, 8, causal,
                               dict(fwd=(16, 32), dkdv=(32, 16), dq=(16, 16)))
    for ds_gemm in (False, True):
        (out_off, grads_off), (out_on, grads_on) = results[False, ds_gemm], results[True, ds_gemm]
        assert torch.equal(out_off, out_on) and all(map(torch.equal, grads_off, grads_on))


def test_bias_band_holds_the_tiles_each_kernel_may_take(fa, monkeypatch):
    """The band is sized for the kernel that reads it: its pinned tiles, or the largest tile the autotuner may pick
    when only another kernel's tiles are pinned (a band sized for the pinned kernel would be read past its end)."""
    from sumtune.fast_t5 import flash_kernels

    monkeypatch.setattr(flash_kernels, "INTERPRET", False)  # as on a GPU: no interpreter tiles to fall back on
    with fa.block_sizes(fwd=(16, 32)):
        assert fa._band_tile_limit("fwd") == 32
        assert fa._band_tile_limit("dkdv") == fa._band_tile_limit("dq") == fa.TABLE_MARGIN
    assert fa._band_tile_limit("fwd") == fa.TABLE_MARGIN


def test_bias_band_holds_each_tiles_bias(fa, monkeypatch):
    """The band itself: for every near tile the kernels visit (their own loop bounds: offsets within the radius),
    reading it as the forward does and as the dK/dV kernel does (transposed) gives the bias of each element j - i."""
    monkeypatch.setattr(fa, "BIAS_BAND", True)
    heads, length, radius, tile = 2, 90, 8, 32
    table = fa.bias_table_log2(t5_like_table(heads, length, length, radius))
    zero = fa._table_geometry(table, length)[1]
    with fa.block_sizes(fwd=(tile, tile), dkdv=(tile, tile), dq=(tile, tile)):
        for transposed in (False, True):
            args = fa._band_args(table, radius, length, length, "dkdv" if transposed else "fwd")
            width, per_head = args["band_w"], args["band_head"]
            band, origin = args["BAND"]._base.reshape(-1), args["BAND"].storage_offset()  # kernels index from origin
            visited = 0
            for start in range(0, length, tile):  # the program's query block (forward) or key block (dK/dV)
                first = min(max(start - radius + 1, 0) // tile * tile, length)
                last = max(min(-(-(start + tile - 1 + radius) // tile) * tile, length), first)
                for other in range(first, last, tile):  # the near tiles of its loop
                    start_m, start_n = (other, start) if transposed else (start, other)
                    shift = (start_m - start_n) if transposed else (start_n - start_m)
                    offsets = torch.arange(tile)[:, None] * width + torch.arange(tile)[None, :] + shift
                    got = torch.stack([band[origin + h * per_head + offsets] for h in range(heads)])
                    i, j = start_m + torch.arange(tile), start_n + torch.arange(tile)
                    rel = (j[:, None] - i[None, :]) if transposed else (j[None, :] - i[:, None])
                    inside = (rel.abs() <= length - 1) & ((i[None, :] if transposed else i[:, None]) < length) & (
                        (j[:, None] if transposed else j[None, :]) < length)
                    want = table[:, zero + rel.clamp(-radius, radius)]
                    assert torch.equal(got[:, inside], want[:, inside]), (transposed, start_m, start_n)
                    visited += 1
            assert visited >= 6
