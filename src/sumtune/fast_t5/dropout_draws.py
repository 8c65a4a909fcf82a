"""Dropout decisions for sumtune's Triton attention kernels (``flash_kernels``): which elements one Philox call
draws for, laid out as the kernels' tensor-core tiles hold them.

Every draw depends only on (seed, batch * heads + head, query, key), never on the tile sizes, so the forward and
both backward kernels make the same decisions. Three schemes (``sumtune.fast_t5.flash_attention`` picks one):

* pairs (``PAIRS``, the default): a Philox-2x32 call per queries {r, r + 8} x keys {c, c + 8} (r % 16 < 8,
  c % 16 < 8), four 16-bit draws (``PAIRS == 2``: the same draws, each round's 32 x 32-bit product from one
  ``mul.wide.u32``). One thread holds these four elements of a tensor-core accumulator whether its
  rows are the queries (forward, dQ) or the keys (dK/dV), so every kernel builds its mask in its own layout.
* quads: a Philox-4x32 call (Triton's ``tl.philox``) per queries {r, r + 8} x keys {c, c + 1, c + 8, c + 9}, eight
  16-bit draws; only the queries-first layout holds them in one thread (the dK/dV kernel transposes the mask).
* 8-bit (``DRAW8``): a Philox-4x32 call per queries {r, r + 8} x keys c + {0, 1, 8, 9, 16, 17, 24, 25}, sixteen
  8-bit draws (p rounded to 1/256, as FlashAttention-2 rounds it).

7 rounds, as FlashAttention-2's Philox-4x32. An element is kept when its draw is >= ``drop_below``.
"""

from __future__ import annotations

import triton
import triton.language as tl

PHILOX_ROUNDS = tl.constexpr(7)
PHILOX2_M = tl.constexpr(0xD256D193)  # Random123's Philox-2x32 multiplier and key increment
PHILOX2_W = tl.constexpr(0x9E3779B9)
PAIRS_WIDE_MUL = tl.constexpr(2)  # the kernels' PAIRS: 0 quads, 1 pairs, 2 pairs with _wide_product


@triton.jit
def _wide_product(c0):
    """(low, high) 32-bit halves of PHILOX2_M * c0 from one ``mul.wide.u32`` (one IMAD.WIDE on sm_90; ptxas keeps
    Triton's separate ``mul.lo`` and ``mul.hi`` as two instructions)."""
    return tl.inline_asm_elementwise("{ .reg .b64 t; mul.wide.u32 t, $2, 3528905107; mov.b64 {$0, $1}, t; }",
                                     "=r,=r,r", [c0], dtype=(tl.uint32, tl.uint32), is_pure=True, pack=1)


@triton.jit
def _philox2x32(key, c0, c1, n_rounds: tl.constexpr, WIDE_MUL: tl.constexpr = False):
    """Random123's Philox-2x32: two 32-bit words from the counter (c0, c1) (uint32) under a 32-bit key. WIDE_MUL:
    the product's two halves from one instruction (compiled kernels only: the interpreter runs no inline PTX)."""
    for _ in tl.static_range(n_rounds):
        if WIDE_MUL:
            lo, hi = _wide_product(c0)
        else:
            hi = tl.math.umulhi(PHILOX2_M, c0)
            lo = tl.mul(PHILOX2_M, c0, sanitize_overflow=False)
        c0 = hi ^ c1 ^ key
        c1 = lo
        key = tl.add(key, PHILOX2_W, sanitize_overflow=False)
    return c0, c1


@triton.jit
def _pair_draws(seed, stream, counter, drop_below, WIDE_MUL: tl.constexpr = False):
    """Keep flags of one Philox-2x32 call per counter: (query r, key c), (r, c + 8), (r + 8, c), (r + 8, c + 8)."""
    key = tl.zeros_like(counter).to(tl.uint32) + seed.to(tl.uint32)
    w0, w1 = _philox2x32(key, counter.to(tl.uint32, bitcast=True),
                         (tl.zeros_like(counter) + stream).to(tl.uint32, bitcast=True), PHILOX_ROUNDS, WIDE_MUL)
    return ((w0 & 0xFFFF).to(tl.int32) >= drop_below, (w0 >> 16).to(tl.int32) >= drop_below,
            (w1 & 0xFFFF).to(tl.int32) >= drop_below, (w1 >> 16).to(tl.int32) >= drop_below)


@triton.jit
def _keep_pairs(seed, stream, start_i, start_j, n_cols, drop_below, BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr,
                KEYS_FIRST: tl.constexpr = False, WIDE_MUL: tl.constexpr = False):
    """(BLOCK_I, BLOCK_J) queries x keys keep mask from one Philox-2x32 call per queries {r, r + 8} x keys
    {c, c + 8} (r % 16 < 8, c % 16 < 8): four 16-bit draws that one thread holds of a tensor-core accumulator
    whether its rows are the queries (forward, dQ) or the keys (dK/dV), so neither layout exchanges draws between
    threads. With KEYS_FIRST the same draws as a (BLOCK_J, BLOCK_I) keys x queries mask, built in that layout."""
    rows = start_i // 2 + tl.arange(0, BLOCK_I // 2)  # counter row: 8 per 16-query band
    cols = start_j // 2 + tl.arange(0, BLOCK_J // 2)  # counter column: 8 per 16-key band
    if KEYS_FIRST:
        counter = rows[None, :] * n_cols + cols[:, None]
    else:
        counter = rows[:, None] * n_cols + cols[None, :]
    near, far_key, far_query, far_both = _pair_draws(seed, stream, counter, drop_below, WIDE_MUL)
    if KEYS_FIRST:  # the tile's own rows and columns: the element 8 rows on, and the one 8 columns on
        far_row, far_column = far_key, far_query
    else:
        far_row, far_column = far_query, far_key
    keep = tl.join(tl.join(near, far_column), tl.join(far_row, far_both))  # (rows, columns, +8 column, +8 row)
    keep = tl.reshape(keep, (counter.shape[0] // 8, 8, counter.shape[1] // 8, 8, 2, 2))
    keep = tl.permute(keep, (0, 5, 1, 2, 4, 3))  # (row band, +8 row, row, column band, +8 column, column)
    return tl.reshape(keep, (counter.shape[0] * 2, counter.shape[1] * 2))


@triton.jit
def _keep_tile(seed, stream, start_i, start_j, n_cols, drop_below, BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr,
               DRAW8: tl.constexpr, PAIRS: tl.constexpr = False):
    """(BLOCK_I, BLOCK_J) keep mask for queries ``start_i + arange`` and keys ``start_j + arange`` (starts: multiples
    of 16; of 32 for the keys with DRAW8).

    One Philox call gives 8 16-bit draws for rows {r, r + 8} x keys {c, c + 1, c + 8, c + 9} (r % 16 < 8, c % 16
    even and < 8): exactly what one thread holds of a tensor-core accumulator, so the draws need no exchange
    between threads (an earlier 8-consecutive-keys grouping cost 2x the instructions in layout shuffles). With
    DRAW8, 16 8-bit draws for rows {r, r + 8} x keys c + {0, 1, 8, 9, 16, 17, 24, 25} (c % 32 even and < 8): the
    same thread's elements over 32 keys."""
    if DRAW8:
        return _keep_tile_8bit(seed, stream, start_i, start_j, n_cols, drop_below, BLOCK_I, BLOCK_J)
    if PAIRS:  # PAIRS == PAIRS_WIDE_MUL: the same draws, each Philox product from one instruction
        return _keep_pairs(seed, stream, start_i, start_j, n_cols, drop_below, BLOCK_I, BLOCK_J, False,
                           PAIRS == PAIRS_WIDE_MUL)
    rows = start_i // 2 + tl.arange(0, BLOCK_I // 2)  # counter row: 8 per 16-row band
    cols = start_j // 4 + tl.arange(0, BLOCK_J // 4)  # counter column: 4 per 16-key band
    counter = rows[:, None] * n_cols + cols[None, :]
    zero = tl.zeros_like(counter)
    r0, r1, r2, r3 = tl.philox(seed, counter, zero + stream, zero, zero, PHILOX_ROUNDS)
    # word w, half h: w0 -> (r, c + h), w1 -> (r + 8, c + h), w2 -> (r, c + 8 + h), w3 -> (r + 8, c + 8 + h)
    x0 = tl.join((r0 & 0xFFFF).to(tl.int32) >= drop_below, (r0 >> 16).to(tl.int32) >= drop_below)
    x1 = tl.join((r1 & 0xFFFF).to(tl.int32) >= drop_below, (r1 >> 16).to(tl.int32) >= drop_below)
    x2 = tl.join((r2 & 0xFFFF).to(tl.int32) >= drop_below, (r2 >> 16).to(tl.int32) >= drop_below)
    x3 = tl.join((r3 & 0xFFFF).to(tl.int32) >= drop_below, (r3 >> 16).to(tl.int32) >= drop_below)
    keep = tl.join(tl.join(x0, x2), tl.join(x1, x3))  # (rows, cols, h, +8 key, +8 row)
    # counter row = 8 * row band + row in band, counter column = 4 * key band + key pair in band
    keep = tl.reshape(keep, (BLOCK_I // 16, 8, BLOCK_J // 16, 4, 2, 2, 2))
    keep = tl.permute(keep, (0, 6, 1, 2, 5, 3, 4))  # (row band, +8 row, row, key band, +8 key, key pair, h)
    return tl.reshape(keep, (BLOCK_I, BLOCK_J))


@triton.jit
def _bytes_kept(word, drop_below):
    """(..., h, +8 key) keep flags of a Philox word's four bytes: byte 2 * g + h is key c + 8 * g + h."""
    b0 = (word & 0xFF).to(tl.int32) >= drop_below
    b1 = ((word >> 8) & 0xFF).to(tl.int32) >= drop_below
    b2 = ((word >> 16) & 0xFF).to(tl.int32) >= drop_below
    b3 = (word >> 24).to(tl.int32) >= drop_below
    return tl.join(tl.join(b0, b1), tl.join(b2, b3))


@triton.jit
def _keep_tile_8bit(seed, stream, start_i, start_j, n_cols, drop_below, BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr):
    tl.static_assert(BLOCK_J % 32 == 0, "8-bit dropout draws cover 32 keys a call: key tiles of 32, 64, ...")
    rows = start_i // 2 + tl.arange(0, BLOCK_I // 2)  # counter row: 8 per 16-row band
    cols = start_j // 8 + tl.arange(0, BLOCK_J // 8)  # counter column: 4 per 32-key band
    counter = rows[:, None] * n_cols + cols[None, :]
    zero = tl.zeros_like(counter)
    r0, r1, r2, r3 = tl.philox(seed, counter, zero + stream, zero, zero, PHILOX_ROUNDS)
    # w0 -> row r, keys c + {0, 1, 8, 9}; w1 -> row r + 8, same keys; w2, w3 -> the same 16 keys further
    keep = tl.join(tl.join(_bytes_kept(r0, drop_below), _bytes_kept(r2, drop_below)),
                   tl.join(_bytes_kept(r1, drop_below), _bytes_kept(r3, drop_below)))  # (.., h, +8, +16 key, +8 row)
    keep = tl.reshape(keep, (BLOCK_I // 16, 8, BLOCK_J // 32, 4, 2, 2, 2, 2))
    keep = tl.permute(keep, (0, 7, 1, 2, 6, 5, 3, 4))  # (row band, +8 row, row, key band, +16, +8, key pair, h)
    return tl.reshape(keep, (BLOCK_I, BLOCK_J))


@triton.jit
def _counter_cols(Lk, DRAW8: tl.constexpr, PAIRS: tl.constexpr = False):
    """Philox counter columns per query-row pair: 4 per 16 keys (16-bit draws) or per 32 keys (8-bit); with PAIRS 8
    per 16 keys (one per key pair {c, c + 8})."""
    if DRAW8:
        return tl.cdiv(Lk, 32) * 4
    if PAIRS:
        return tl.cdiv(Lk, 16) * 8
    return tl.cdiv(Lk, 16) * 4
