"""The bias band of sumtune's Triton T5 attention kernels (``flash_kernels``): the near tiles' bias at aligned,
contiguous addresses.

T5's bias depends only on the offset j - i and is constant beyond +-max_distance (R), so the kernels add one constant
to every tile whose offsets all lie beyond it, and read the bias only in the near tiles. Read from the (H, 2L - 1)
table, a tile's address j - i is contiguous along the keys but of no known alignment (and runs backwards along the
queries of the dK/dV kernel's (keys, queries) tiles), so each element is a 4-byte gather. The band holds, per head,
a (ROWS, W) block in which every near tile of every program is a rectangle at an aligned column: the forward's and
dQ kernel's tile (start_m, start_n) is rows 0..BLOCK_M-1 from column ``band_zero + start_n - start_m``, the dK/dV
kernel's (start_n, start_m) rows 0..BLOCK_N-1 of the transposed band from ``band_zero + start_m - start_n``. Built
once per attention call from the table (one small launch, ~10 MiB for T5-3b's 32 heads at R = 128); W depends on R
and the largest tile, not on the sequence length.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _band_tile(BAND, shift, band_w, ROWS: tl.constexpr, COLS: tl.constexpr):
    """A (ROWS, COLS) bias tile from a band row block: row r, column ``shift + c``. ``BAND`` and ``band_w`` are
    multiples of 16 elements and ``shift`` of the tile sizes, so the compiler can vectorise the loads."""
    return tl.load(BAND + shift + tl.arange(0, ROWS)[:, None] * band_w + tl.arange(0, COLS)[None, :])


@triton.jit
def t5_bias_band(TABLE, BAND, table_row, table_zero, lo, hi, band_zero, band_w, ROWS: tl.constexpr,
                 BLOCK: tl.constexpr, TRANSPOSED: tl.constexpr):
    """BAND[h, r, c] = TABLE[h, table_zero + clamp(rel, lo, hi)] with rel = c - band_zero - r (the forward's and dQ
    kernel's (queries, keys) tiles: row r = i - start_m, column c = j - start_m + band_zero) or, TRANSPOSED,
    rel = band_zero + r - c (the dK/dV kernel's (keys, queries) tiles: r = j - start_n, c = i - start_n + band_zero).
    lo/hi: the bias of every offset beyond them equals theirs (T5's saturation at +-max_distance, or the sequence
    ends, past which a tile's elements are masked anyway)."""
    r = tl.program_id(0)
    h = tl.program_id(1)
    source = TABLE + h * table_row + table_zero
    target = BAND + (h * ROWS + r).to(tl.int64) * band_w
    for start in range(0, band_w, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        if TRANSPOSED:
            rel = band_zero + r - cols
        else:
            rel = cols - band_zero - r
        rel = tl.minimum(tl.maximum(rel, lo), hi)
        tl.store(target + cols, tl.load(source + rel), mask=cols < band_w)


def band_layout(radius: int, tile: int) -> tuple[int, int]:
    """(band_zero, band_w): the column of a tile's first offset and the row length, both multiples of 16 elements.

    A near tile's columns reach from -(R + tile - 2) to R + 2 tile - 3 around its start (the kernels' loop bounds),
    so band_zero = R + tile and band_w = band_zero + R + 2 tile (rounded up) hold every one of them."""
    band_zero = -(-(radius + tile) // 16) * 16
    return band_zero, -(-(band_zero + radius + 2 * tile) // 16) * 16


def build_band(table, radius: int, query_len: int, key_len: int, table_zero: int, tile: int, transposed: bool):
    """The kernels' band arguments (``BAND`` pointing at column band_zero, ``band_w``, ``band_head``) for this
    call's margined log2 table (``flash_attention.bias_table_log2``)."""
    import torch

    heads, table_row = table.shape
    band_zero, band_w = band_layout(radius, tile)
    band = torch.empty((heads, tile, band_w), device=table.device, dtype=table.dtype)
    t5_bias_band[(tile, heads)](table, band, table_row, table_zero, max(-radius, 1 - query_len),
                                min(radius, key_len - 1), band_zero, band_w, ROWS=tile, BLOCK=256,
                                TRANSPOSED=transposed)
    return dict(BAND=band.view(-1)[band_zero:], band_w=band_w, band_head=tile * band_w)
