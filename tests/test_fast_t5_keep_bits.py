"""flash_attention.KEEP_BITS: the training forward stores its dropout decisions and the backward kernels load them
(sumtune.fast_t5.dropout_draws' keep bits) instead of drawing again. On CPU in Triton's interpreter (float32)."""

from __future__ import annotations

import pytest
import torch

from test_fast_t5_attention import (FP32_RTOL, assert_matches_reference, case_inputs, make_qkv, padding_mask,
                                    run_with_grads, seed_of_next_call, t5_like_table)


@pytest.fixture()
def fa(monkeypatch):
    from test_fast_t5_attention import _interpreting

    pytest.importorskip("triton")
    if not _interpreting():
        pytest.skip("Triton's interpreter is off (a CUDA machine)")
    from sumtune.fast_t5 import flash_attention

    monkeypatch.setattr(flash_attention, "DROPOUT_PAIRS", True)
    monkeypatch.setattr(flash_attention, "DROPOUT_DRAW_BITS", 16)
    return flash_attention


def unpack_keep_bits(bits: torch.Tensor, batch: int, heads: int, query_len: int, key_len: int) -> torch.Tensor:
    """(B, H, Lq, Lk) bool from the forward's keep bits, decoded from the layout dropout_draws' docstring gives
    (written again here, so that a kernel and this decoding would have to be wrong in the same way)."""
    words = bits.to(torch.int32) & 0xFFFF
    words_per_row = -(-key_len // 32) * 4
    words = words.reshape(batch * heads, -1, words_per_row)
    i = torch.arange(query_len)
    j = torch.arange(key_len)
    row = (i // 16) * 8 + i % 8  # counter row of query i, and whether it is the pair's r + 8
    col = (j // 16) * 8 + j % 8
    word = (col // 16) * 4 + (col % 8) // 2
    shift = 4 * (2 * ((col % 16) // 8) + col % 2)
    element = ((i % 16) // 8)[:, None] * 2 + ((j % 16) // 8)[None, :]  # (r, c), (r, c + 8), (r + 8, c), (r + 8, c + 8)
    picked = words[:, row[:, None], word[None, :]]  # (BH, Lq, Lk)
    keep = (picked >> (shift[None, :] + element)[None]) & 1
    return keep.reshape(batch, heads, query_len, key_len).bool()


def _forward_keep_bits(fa, monkeypatch, q, k, v, table, mask, causal, p, radius, blocks):
    """The keep bits one training forward stored (captured at the op's output)."""
    monkeypatch.setattr(fa, "KEEP_BITS", True)
    outputs = []
    op = fa._attention_op

    def spy(*args):
        result = op(*args)
        outputs.append(result)
        return result

    monkeypatch.setattr(fa, "_attention_op", spy)
    with fa.block_sizes(fwd=blocks):
        fa.flash_t5_attention(q, k, v, bias_table=table, key_mask=mask, causal=causal, dropout_p=p,
                              bias_radius=radius)
    monkeypatch.setattr(fa, "_attention_op", op)
    return outputs[0][3]


@pytest.mark.parametrize("causal", [False, True])
def test_the_forward_stores_the_decisions_it_draws(fa, monkeypatch, causal):
    """Unpacked by the documented layout, the stored bits are the debug helper's mask wherever the forward visits
    (every key up to each row's length; with causal masking, every key up to the query's tile), for two tilings."""
    batch, heads, length = 2, 2, 70
    q, k, v = make_qkv(batch, heads, length, length, 16, torch.float32)
    table, mask, p = t5_like_table(heads, length, length, 8), padding_mask(batch, length), 0.3
    lengths = mask.sum(1)
    for blocks in ((16, 32), (32, 64)):
        seed = seed_of_next_call(fa, 11)
        expected = fa.dropout_keep_mask(seed, batch, heads, length, length, p, device="cpu")
        bits = _forward_keep_bits(fa, monkeypatch, q, k, v, table, mask, causal, p, 8, blocks)
        assert bits.dtype == torch.int16 and bits.shape[0] == batch * heads
        stored = unpack_keep_bits(bits, batch, heads, length, length)
        visited = torch.arange(length)[None, :] < lengths[:, None]  # (B, Lk)
        visited = visited[:, None, None, :].expand(batch, heads, length, length)
        if causal:
            visited = visited & (torch.arange(length)[None, :] <= torch.arange(length)[:, None])
        assert torch.equal(stored[visited], expected[visited]), blocks
        assert 0.6 < stored[visited].float().mean() < 0.8  # p = 0.3 dropped, not all zeros or ones


@pytest.mark.parametrize("ds_gemm", [True, False])
@pytest.mark.parametrize("case", ["encoder-bias-padding", "decoder-causal-bias-padding", "cross-no-bias-padding"])
def test_gradients_from_the_stored_bits_equal_those_from_drawing_again(fa, monkeypatch, case, ds_gemm):
    """Output and the three gradients bit for bit with KEEP_BITS off and on (dK/dV from the bits; dQ from the stored
    dS, or the dQ kernel from the bits), the backward's tiles unlike the forward's; and on, as close to the float64
    reference with the helper's mask as the kernels always are."""
    q, k, v, table, mask, causal, radius = case_inputs(case)
    p = 0.3
    monkeypatch.setattr(fa, "DS_GEMM", ds_gemm)
    grad_out = torch.randn(q.shape[0], q.shape[1], q.shape[2], v.shape[-1], generator=torch.Generator().manual_seed(3))
    launched = []
    launch = fa._launch
    monkeypatch.setattr(fa, "_launch", lambda name, *a, **kw: launched.append((name, kw.get("KEEP_BITS")))
                        or launch(name, *a, **kw))
    results = {}
    for keep_bits in (False, True):
        monkeypatch.setattr(fa, "KEEP_BITS", keep_bits)
        seed_of_next_call(fa, 5)
        with fa.block_sizes(fwd=(16, 32), dkdv=(32, 16), dq=(16, 16)):
            results[keep_bits] = run_with_grads(
                lambda *t: fa.flash_t5_attention(*t, bias_table=table, key_mask=mask, causal=causal, dropout_p=p,
                                                 bias_radius=radius), q, k, v, grad_out)
    (out_off, grads_off), (out_on, grads_on) = results[False], results[True]
    assert torch.equal(out_off, out_on)
    for off, on in zip(grads_off, grads_on):
        assert torch.equal(off, on)
    backward = ["dkdv"] + ([] if ds_gemm else ["dq"])
    assert launched == [("fwd", None), *[(name, None) for name in backward], ("fwd", 1),
                        *[(name, 2) for name in backward]]
    seed = seed_of_next_call(fa, 5)
    keep = fa.dropout_keep_mask(seed, q.shape[0], q.shape[1], q.shape[2], k.shape[2], p, device="cpu")
    with fa.block_sizes(fwd=(16, 32), dkdv=(32, 16), dq=(16, 16)):
        assert_matches_reference(fa, q, k, v, FP32_RTOL, table, mask, causal, keep=keep,
                                 keep_scale=fa.dropout_scale(p), dropout_p=p, radius=radius)


def test_keep_bits_only_where_a_gradient_and_paired_draws_are(fa, monkeypatch):
    """No bits without dropout, without a gradient, or with the Philox-4x32 grouping (whose draws the layout does
    not describe); a forward with them stores Lq x Lk bits a head (rounded up to 16 queries and 32 keys)."""
    from sumtune.fast_t5.dropout_draws import keep_bits_words

    monkeypatch.setattr(fa, "KEEP_BITS", True)
    q, k, v = make_qkv(1, 2, 40, 40, 16, torch.float32)
    stored = []
    op = fa._attention_op
    monkeypatch.setattr(fa, "_attention_op", lambda *args: stored.append(args[-1]) or op(*args))
    fa.flash_t5_attention(q, k, v, dropout_p=0.0)
    with torch.no_grad():
        fa.flash_t5_attention(q, k, v, dropout_p=0.2)
    monkeypatch.setattr(fa, "DROPOUT_PAIRS", False)
    fa.flash_t5_attention(q, k, v, dropout_p=0.2)
    monkeypatch.setattr(fa, "DROPOUT_PAIRS", True)
    fa.flash_t5_attention(q, k, v, dropout_p=0.2)
    assert stored == [False, False, False, True]
    assert keep_bits_words(40, 40) * 16 == 48 * 64  # 40 queries -> 48, 40 keys -> 64
    assert keep_bits_words(1024, 1024) * 16 == 1024 * 1024


def test_keep_bits_through_checkpointing_recompute_the_same_decisions(fa, monkeypatch):
    """Under activation checkpointing the forward runs twice (no gradient, then recomputed with one): the bits of the
    recomputation are the first call's decisions, so the gradients equal those without checkpointing."""
    from torch.utils.checkpoint import checkpoint

    monkeypatch.setattr(fa, "KEEP_BITS", True)
    q, k, v = make_qkv(2, 2, 33, 33, 16, torch.float32)
    table, mask = t5_like_table(2, 33, 33, 8), padding_mask(2, 33)
    grad_out = torch.randn(2, 2, 33, 16, generator=torch.Generator().manual_seed(4))

    def attend(*t):
        return fa.flash_t5_attention(*t, bias_table=table, key_mask=mask, dropout_p=0.25, bias_radius=8)

    results = []
    for wrap in (attend, lambda *t: checkpoint(attend, *t, use_reentrant=False)):
        torch.manual_seed(8)
        with fa.block_sizes(fwd=(16, 32), dkdv=(32, 16), dq=(16, 16)):
            results.append(run_with_grads(wrap, q, k, v, grad_out))
    (out_a, grads_a), (out_b, grads_b) = results
    assert torch.equal(out_a, out_b) and all(torch.equal(a, b) for a, b in zip(grads_a, grads_b))
