"""Dropout's keep mask for the warp-specialized attention forward (`sumtune.fast_t5.ws_forward`), in Gluon.

The mask is `dropout_draws._keep_pairs`' (one Philox-2x32 call per queries {r, r + 8} x keys {c, c + 8}, four 16-bit
draws), so the Triton backward regenerates it. Two ways to the consumers' accumulator layout:
- `_keep_pairs`: each consumer warpgroup draws its own tile's calls, laid out where its accumulator holds their
  elements (no data movement). Its 16 calls x 7 rounds a thread and tile double the consumers' instructions in a
  latency-bound loop (session 48's Nsight Compute: 774 M against 354 M warp instructions, issue slots 33% busy).
- `draw_tile` (`ws_forward.DRAW_IN_PRODUCER`): the producer partition, four warps instead of one, draws both
  consumers' calls a tile ahead into a shared-memory ring, one nibble a call (its four keep flags); a consumer loads
  its 16 nibbles a tile in the calls' layout and tests four bits each (`keep_from_ring`). The draws then use issue
  slots the consumers leave idle. The ring shares the value ring's slots and its "empty" barrier: a consumer's P·V
  of a tile, which releases the V slot, comes after it has read that tile's nibbles. (A partition of its own does
  not fit: the consumers' 2 x 4 warps x 240 registers leave 96 a lane for one more warpgroup, the producer's.)
"""

from __future__ import annotations

from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import mbarrier

_PHILOX2_M = gl.constexpr(0xD256D193)  # dropout_draws' Philox-2x32 multiplier and key increment
_PHILOX2_W = gl.constexpr(0x9E3779B9)


@gluon.jit
def _pair_draws(seed, stream, counter, drop_below):
    """`dropout_draws._pair_draws` in Gluon: the keep flags of one Philox-2x32 call per counter (in the counter's
    layout), for (query r, key c), (r, c + 8), (r + 8, c), (r + 8, c + 8)."""
    c0 = counter.to(gl.uint32, bitcast=True)
    c1 = (gl.zeros_like(counter) + stream).to(gl.uint32, bitcast=True)
    key = (gl.zeros_like(counter).to(gl.int64) + seed).to(gl.uint32)
    for _ in gl.static_range(7):  # dropout_draws.PHILOX_ROUNDS
        hi = gl.umulhi(c0, _PHILOX2_M)
        lo = c0 * _PHILOX2_M
        c0 = hi ^ c1 ^ key
        c1 = lo
        key = key + _PHILOX2_W
    return ((c0 & 0xFFFF).to(gl.int32) >= drop_below, (c0 >> 16).to(gl.int32) >= drop_below,
            (c1 & 0xFFFF).to(gl.int32) >= drop_below, (c1 >> 16).to(gl.int32) >= drop_below)


@gluon.constexpr_function
def calls_layout(rows, cols):
    """Where a 4-warp m64n128 accumulator holds the (r, c) element of the call of (r, c) with r % 16 < 8 and
    c % 16 < 8. An accumulator element (r, c): register bits c + 1, +8 row, c + 8, 16, 32, 64; lane bits c + 2, 4,
    r + 1, 2, 4; warp bits r + 16, 32."""
    return gl.DistributedLinearLayout(
        reg_bases=[[0, 1], [0, 8], [0, 16], [0, 32]], lane_bases=[[0, 2], [0, 4], [1, 0], [2, 0], [4, 0]],
        warp_bases=[[8, 0], [16, 0]], block_bases=[], shape=[int(rows), int(cols)])


@gluon.jit
def _in_accumulator_layout(near, far_key, far_query, far_both, ROWS: gl.constexpr, COLS: gl.constexpr,
                           s_layout: gl.constexpr):
    """The four flags of each call (in `calls_layout`) as the (ROWS, COLS) mask in ``s_layout``: joined, reshaped
    and permuted as `dropout_draws._keep_pairs` does; the conversion is asserted trivial at compile time."""
    keep = gl.join(gl.join(near, far_key), gl.join(far_query, far_both))  # (rows, columns, +8 column, +8 row)
    keep = gl.reshape(keep, (ROWS // 16, 8, COLS // 16, 8, 2, 2))
    keep = gl.permute(keep, (0, 5, 1, 2, 4, 3))  # (row band, +8 row, row, column band, +8 column, column)
    return gl.convert_layout(gl.reshape(keep, (ROWS, COLS)), s_layout, assert_trivial=True)


@gluon.jit
def _counters(m0, start_n, n_cols, ROWS: gl.constexpr, COLS: gl.constexpr):
    """The Philox counters of queries m0.. and keys start_n.. (8 per 16-query band and 16-key band) in
    `calls_layout`."""
    calls: gl.constexpr = calls_layout(ROWS // 2, COLS // 2)
    rows = m0 // 2 + gl.arange(0, ROWS // 2, layout=gl.SliceLayout(1, calls))
    cols = start_n // 2 + gl.arange(0, COLS // 2, layout=gl.SliceLayout(0, calls))
    return rows[:, None] * n_cols + cols[None, :]


@gluon.jit
def _keep_pairs(seed, stream, m0, start_n, n_cols, drop_below, ROWS: gl.constexpr, COLS: gl.constexpr,
                s_layout: gl.constexpr):
    """The (ROWS, COLS) keep mask of queries m0.. and keys start_n.. in ``s_layout``, drawn here."""
    gl.static_assert(ROWS == 64 and COLS == 128, "the calls' layout is that of a 4-warp m64n128 accumulator")
    near, far_key, far_query, far_both = _pair_draws(seed, stream, _counters(m0, start_n, n_cols, ROWS, COLS),
                                                     drop_below)
    return _in_accumulator_layout(near, far_key, far_query, far_both, ROWS, COLS, s_layout)


@gluon.jit
def keep_from_ring(buf, ROWS: gl.constexpr, COLS: gl.constexpr, s_layout: gl.constexpr):
    """The (ROWS, COLS) keep mask in ``s_layout`` from a consumer's nibbles of a tile in shared memory ``buf``."""
    nibbles = buf.load(calls_layout(ROWS // 2, COLS // 2))
    return _in_accumulator_layout((nibbles & 1) != 0, (nibbles & 2) != 0, (nibbles & 4) != 0, (nibbles & 8) != 0,
                                  ROWS, COLS, s_layout)


@gluon.jit
def draw_tile(keep_ring, keep_ready, slot, seed, stream, start_m, start_n, n_cols, drop_below):
    """Both consumers' nibbles of the key tile at ``start_n`` into the ring's ``slot``, then its "ready" barrier:
    by the producer partition (four warps), right after it loaded the tile's values into the same slot of the value
    ring (so both consumers have done with the slot's last tile). Eight query rows of calls at a time: four calls a
    thread, within the producer's few registers."""
    rows: gl.constexpr = 2 * keep_ring.type.shape[1]  # a consumer's query rows (64)
    block_n: gl.constexpr = 2 * keep_ring.type.shape[2]
    band: gl.constexpr = 8
    layout: gl.constexpr = gl.BlockedLayout([1, 4], [2, 16], [4, 1], [1, 0])
    for which in gl.static_range(2):
        for part in gl.static_range(rows // 2 // band):
            r = (start_m + which * rows) // 2 + part * band + gl.arange(0, band, layout=gl.SliceLayout(1, layout))
            c = start_n // 2 + gl.arange(0, block_n // 2, layout=gl.SliceLayout(0, layout))
            near, far_key, far_query, far_both = _pair_draws(seed, stream, r[:, None] * n_cols + c[None, :],
                                                             drop_below)
            nibbles = (near.to(gl.int8) | (far_key.to(gl.int8) << 1) | (far_query.to(gl.int8) << 2)
                       | (far_both.to(gl.int8) << 3))
            keep_ring.index(2 * slot + which).slice(part * band, band, dim=0).store(nibbles)
    mbarrier.arrive(keep_ready.index(slot), count=1)
