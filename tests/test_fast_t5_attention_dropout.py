"""Dropout in sumtune's Triton T5 attention: one mask for the forward and both backward kernels whatever the tiling,
each draw scheme (DROPOUT_DRAW_BITS, DROPOUT_PAIRS, PHILOX_WIDE_MUL), the rate and independence of the draws, and
reproducibility under torch.manual_seed and activation checkpointing.

On CPU in Triton's interpreter (tests/conftest.py); the compiled kernels: tests/test_fast_t5_attention_gpu.py.
"""

from __future__ import annotations

import pytest
import torch
from _fast_t5_attention_helpers import (
    FP32_RTOL,
    assert_matches_reference,
    make_qkv,
    padding_mask,
    run_with_grads,
    seed_of_next_call,
    t5_like_table,
)


def test_dropout_forward_and_backward_use_the_mask_the_kernels_draw(fa):
    """The float64 reference with the debug helper's mask reproduces output and all three gradients, while the
    forward and both backward kernels run with different tiles: one mask, whatever the tiling."""
    q, k, v = make_qkv(2, 2, 45, 45, 16, torch.float32)
    table, mask, p = t5_like_table(2, 45, 45, 8), padding_mask(2, 45), 0.3
    for causal in (False, True):
        seed = seed_of_next_call(fa, 7)
        keep = fa.dropout_keep_mask(seed, 2, 2, 45, 45, p, device="cpu")
        with fa.block_sizes(fwd=(16, 32), dkdv=(32, 16), dq=(16, 16)):
            assert_matches_reference(fa, q, k, v, FP32_RTOL, table, mask, causal, keep=keep,
                                     keep_scale=fa.dropout_scale(p), dropout_p=p, radius=8)


def test_dropout_mask_rate_streams_and_tiling(fa):
    p = 0.1
    mask = fa.dropout_keep_mask(1234, 2, 3, 64, 72, p, device="cpu")
    drop_rate = 1 - mask.float().mean().item()
    sigma = (p * (1 - p) / mask.numel()) ** 0.5
    assert abs(drop_rate - p) < 4 * sigma
    assert abs(fa.dropout_scale(p) * (1 - p) - 1) < 1e-4  # kept values scaled like torch's 1 / (1 - p)
    assert torch.equal(mask, fa.dropout_keep_mask(1234, 2, 3, 64, 72, p, device="cpu", block=(32, 16)))
    assert not torch.equal(mask, fa.dropout_keep_mask(1235, 2, 3, 64, 72, p, device="cpu"))
    assert not torch.equal(mask[0, 0], mask[0, 1]) and not torch.equal(mask[0, 0], mask[1, 0])  # per (b, h) streams
    assert not torch.equal(mask[0, 0, 0], mask[0, 0, 1])  # per query row


@pytest.mark.parametrize("bits, pairs", [(8, False), (16, True), (16, False)])
def test_each_draw_scheme_gives_one_mask_to_all_kernels_whatever_the_tiling(fa, monkeypatch, bits, pairs):
    """`DROPOUT_DRAW_BITS = 8` (16 draws per Philox-4x32 call), `DROPOUT_PAIRS` (4 per Philox-2x32 call, built in
    place by the dK/dV kernel) and neither: the float64 reference with the helper's mask reproduces output and
    gradients while the three kernels run with different tiles (key tiles of 32 or more for 8-bit draws)."""
    monkeypatch.setattr(fa, "DROPOUT_DRAW_BITS", bits)
    monkeypatch.setattr(fa, "DROPOUT_PAIRS", pairs)
    q, k, v = make_qkv(2, 2, 45, 70, 16, torch.float32)
    table, mask, p = t5_like_table(2, 45, 70, 8), padding_mask(2, 70), 0.3
    seed = seed_of_next_call(fa, 7)
    keep = fa.dropout_keep_mask(seed, 2, 2, 45, 70, p, device="cpu")
    assert torch.equal(keep, fa.dropout_keep_mask(seed, 2, 2, 45, 70, p, device="cpu", block=(32, 64)))
    dkdv_keys = 16 if bits == 16 else 64  # a (32 queries, 16 keys) dK/dV tile: its mask from (16, 16) pair blocks
    with fa.block_sizes(fwd=(16, 32), dkdv=(32, dkdv_keys), dq=(32, 32)):
        assert_matches_reference(fa, q, k, v, FP32_RTOL, table, mask, False, keep=keep,
                                 keep_scale=fa.dropout_scale(p), dropout_p=p, radius=8)


def test_wide_philox_products_are_used_from_their_measured_key_length_in_compiled_kernels_only(fa, monkeypatch):
    """The kernels' PAIRS: 0 without pairs, 2 (one mul.wide a Philox round) for compiled kernels from
    PHILOX_WIDE_MUL_MIN_KEYS keys, else 1 (below it, with the flag off, and always in the interpreter)."""
    import types

    assert fa._pairs_mode(True, 4096) == 1 and fa._pairs_mode(False, 4096) == 0  # the interpreter: no inline PTX
    monkeypatch.setattr(fa, "_kernels", lambda: types.SimpleNamespace(INTERPRET=False))
    keys = fa.PHILOX_WIDE_MUL_MIN_KEYS
    assert [fa._pairs_mode(True, n) for n in (keys - 1, keys, 4096)] == [1, 2, 2]
    assert fa._pairs_mode(False, 4096) == 0
    monkeypatch.setattr(fa, "PHILOX_WIDE_MUL", False)
    assert fa._pairs_mode(True, 4096) == 1


@pytest.mark.parametrize("bits, pairs", [(16, False), (8, False), (16, True)])
def test_dropout_draws_are_independent_at_the_rounded_rate(fa, monkeypatch, bits, pairs):
    """Drop rate = p rounded to 1/2^bits, scale = 1 / exact keep rate, and the decisions one Philox call makes
    (neighbouring keys, the rows 8 apart, keys 8/16 apart, row and key 8 apart) are as independent as any: each
    pair is dropped together at rate^2 within 4 sigma."""
    monkeypatch.setattr(fa, "DROPOUT_DRAW_BITS", bits)
    monkeypatch.setattr(fa, "DROPOUT_PAIRS", pairs)
    p = 0.1
    rate = round(p * 2**bits) / 2**bits
    # one (128, 128) tile per program: the same mask as any tiling (test above), in 1/30 of the interpreter's time
    mask = fa.dropout_keep_mask(99, 4, 4, 128, 256, p, device="cpu", block=(128, 128))
    dropped = ~mask
    sigma = (rate * (1 - rate) / mask.numel()) ** 0.5
    assert abs(dropped.float().mean().item() - rate) < 4 * sigma
    assert abs(fa.dropout_scale(p) * (1 - rate) - 1) < 1e-9
    for a, b in ((dropped[..., :-1], dropped[..., 1:]), (dropped[..., :-8], dropped[..., 8:]),
                 (dropped[..., :-16], dropped[..., 16:]), (dropped[:, :, :-8], dropped[:, :, 8:]),
                 (dropped[:, :, :-8, :-8], dropped[:, :, 8:, 8:])):
        both = (a & b).float()
        pair_sigma = (rate**2 * (1 - rate**2) / both.numel()) ** 0.5
        assert abs(both.mean().item() - rate**2) < 4 * pair_sigma


def test_dropout_reproducible_under_manual_seed_and_checkpointing(fa):
    from torch.utils.checkpoint import checkpoint

    q, k, v = make_qkv(2, 2, 24, 24, 16, torch.float32)
    grad_out = torch.randn(2, 2, 24, 16)

    def attend(*t):
        return fa.flash_t5_attention(*t, t5_like_table(2, 24, 24, 4), dropout_p=0.2, bias_radius=4)

    torch.manual_seed(3)
    out, grads = run_with_grads(attend, q, k, v, grad_out)
    torch.manual_seed(3)
    again, _ = run_with_grads(attend, q, k, v, grad_out)
    torch.manual_seed(4)
    other, _ = run_with_grads(attend, q, k, v, grad_out)
    assert torch.equal(out, again) and not torch.equal(out, other)
    for reentrant in (False, True):  # the recomputed forward must draw the same mask as the first one
        torch.manual_seed(3)
        recomputed, recomputed_grads = run_with_grads(
            lambda *t: checkpoint(attend, *t, use_reentrant=reentrant), q, k, v, grad_out)
        assert torch.equal(recomputed, out)
        assert all(torch.equal(a, b) for a, b in zip(recomputed_grads, grads))
