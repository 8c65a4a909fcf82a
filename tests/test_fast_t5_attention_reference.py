"""sumtune's Triton T5 attention (sumtune.fast_t5.flash_attention) against plain-PyTorch references: forward and
gradients against float64, key padding and masks.

On CPU the kernels run in Triton's interpreter (TRITON_INTERPRET=1, set by tests/conftest.py when there is no GPU).
float32 inputs there make the kernels' arithmetic exact up to fp32
rounding, so bias indexing, masks and dropout are checked to ~1e-6 against a float64 reference of the same math;
bf16/fp16 cases check the real dtypes. Small tiles are pinned so that every case crosses several blocks and the
far/near bias regions. GPU tests (``-m gpu``, tests/test_fast_t5_attention_gpu.py) compare the compiled kernels
with stock transformers in bf16. The other themes: tests/test_fast_t5_attention_{precision,bias,backward,dropout,
tiles,dispatch}.py; their shared helpers: tests/_fast_t5_attention_helpers.py.
"""

from __future__ import annotations

import pytest
import torch
from _fast_t5_attention_helpers import (
    CASES,
    FP32_RTOL,
    _holes_on_and_off,
    assert_matches_reference,
    case_inputs,
    make_qkv,
    padding_mask,
    run_with_grads,
    t5_like_table,
)


@pytest.mark.parametrize("case", CASES)
def test_forward_and_grads_match_float64_reference(fa, case):
    q, k, v, table, mask, causal, radius = case_inputs(case)
    with fa.block_sizes(fwd=(16, 16), dkdv=(16, 32), dq=(32, 16)):  # lengths are not multiples of any of them
        assert_matches_reference(fa, q, k, v, FP32_RTOL, table, mask, causal, radius=radius)


def test_key_padding_flags_rows_with_a_hole_before_their_length(fa):
    """KeyPadding.holes: 1 only where a masked key comes before the row's last kept key (left padding counts)."""
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 0, 1, 1, 0], [0, 0, 0, 0, 0], [0, 1, 1, 1, 1], [1, 1, 1, 1, 1]])
    padding = fa.key_padding(mask)
    assert padding.lengths.tolist() == [3, 4, 0, 5, 5]
    assert padding.holes.tolist() == [0, 1, 0, 1, 0]
    assert padding.holes.dtype == torch.int8


def test_mask_only_with_holes_changes_no_bit(fa, monkeypatch):
    """MASK_ONLY_WITH_HOLES: the forward and dQ kernels skip the key mask in rows padded only at their end and read
    it in the row with a hole: the same bits as reading it everywhere, with dropout; a hole left unflagged changes
    the result (the flag is what the kernels go by)."""
    results = _holes_on_and_off(fa, monkeypatch, "cpu", torch.float32, 70, 2, 16, 8)
    for ds_gemm in (False, True):
        (out_off, grads_off), (out_on, grads_on) = results[False, ds_gemm, 1], results[True, ds_gemm, 1]
        assert torch.equal(out_off, out_on) and all(map(torch.equal, grads_off, grads_on))
    unflagged, _ = results[True, False, 0]
    assert torch.equal(unflagged[:2], out_on[:2]) and not torch.allclose(unflagged[2], out_on[2])


def test_padded_keys_get_exactly_zero_probability(fa):
    q, k, v = make_qkv(2, 2, 30, 30, 16, torch.float32)
    mask = padding_mask(2, 30)
    table = t5_like_table(2, 30, 30, 4)
    grad_out = torch.randn(2, 2, 30, 16)
    out, (dq, dk, dv) = run_with_grads(lambda *t: fa.flash_t5_attention(*t, table, mask, bias_radius=4), q, k, v,
                                       grad_out)
    garbage_k, garbage_v = k.detach().clone(), v.detach().clone()
    garbage_k[1, :, 20:] = 1e4  # would dominate every row if a padded key leaked
    garbage_v[1, :, 20:] = -1e4
    garbage_k.requires_grad_()
    garbage_v.requires_grad_()
    out2, (dq2, dk2, dv2) = run_with_grads(lambda *t: fa.flash_t5_attention(*t, table, mask, bias_radius=4), q,
                                           garbage_k, garbage_v, grad_out)
    assert torch.equal(out, out2) and torch.equal(dq, dq2)  # query rows at padded positions included
    assert torch.equal(dk[1, :, 20:], torch.zeros_like(dk[1, :, 20:]))
    assert torch.equal(dv[1, :, 20:], torch.zeros_like(dv[1, :, 20:]))


def test_tiles_overhanging_the_sequences_read_nothing_that_matters(fa):
    """The last tiles reach past Lq and Lk into the bias table's margins (in bounds: bias_table_log2 pads it); what
    they read there must not reach any output: NaN margins give bit-identical results to zero margins."""
    q, k, v = make_qkv(2, 2, 37, 29, 16, torch.float32)
    padding = fa.key_padding(padding_mask(2, 29))
    table = fa.bias_table_log2(torch.randn(2, 37 + 29 - 1))
    poisoned = table.clone()
    poisoned[:, : fa.TABLE_MARGIN] = float("nan")
    poisoned[:, -fa.TABLE_MARGIN:] = float("nan")
    grad_out = torch.randn(2, 2, 37, 16)
    results = []
    for t in (table, poisoned):
        with fa.block_sizes(fwd=(32, 32), dkdv=(32, 32), dq=(32, 32)):  # 37 and 29: ragged last tiles
            results.append(run_with_grads(lambda *x, t=t: fa.t5_flash_attention(*x, t, 0, padding, False, 1.0, 0.0),
                                          q, k, v, grad_out))
    (out, grads), (out2, grads2) = results
    assert torch.isfinite(out).all() and all(torch.isfinite(g).all() for g in grads)
    assert torch.equal(out, out2) and all(torch.equal(a, b) for a, b in zip(grads, grads2))
    with pytest.raises(ValueError, match="bias_table_log2"):
        fa.t5_flash_attention(q, k, v, table[:, 1:], 0, padding, False, 1.0, 0.0)


def test_rows_without_any_key_give_zeros_not_nan(fa):
    q, k, v = make_qkv(2, 2, 20, 20, 16, torch.float32)
    mask = torch.ones(2, 20, dtype=torch.bool)
    mask[1] = False  # a row with nothing to attend to
    out, grads = assert_matches_reference(fa, q, k, v, FP32_RTOL, t5_like_table(2, 20, 20, 4), mask, radius=4)
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    assert all(torch.equal(g[1], torch.zeros_like(g[1])) for g in grads)
    causal_mask = torch.ones(2, 20, dtype=torch.bool)
    causal_mask[:, 0] = False  # causal query 0 sees only key 0, which is masked
    out, _ = assert_matches_reference(fa, q, k, v, FP32_RTOL, t5_like_table(2, 20, 20, 4), causal_mask, causal=True,
                                      radius=4)
    assert torch.equal(out[:, :, 0], torch.zeros_like(out[:, :, 0]))
