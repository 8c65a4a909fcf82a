"""sumtune's Triton T5 attention in half precision: bf16/fp16 inputs against the reference, and the forward's P·V
in more precision (PV_FP16: V in float16's range; PV_SPLIT: P's high and low parts; PRECISE_PV_MIN_KEYS).

On CPU in Triton's interpreter (tests/conftest.py); the compiled kernels: tests/test_fast_t5_attention_gpu.py.
"""

from __future__ import annotations

import pytest
import torch
from _fast_t5_attention_helpers import (
    HALF_RTOL,
    assert_matches_reference,
    make_qkv,
    padding_mask,
    relative_error,
    t5_like_table,
)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_inputs_match_reference(fa, dtype):
    q, k, v = make_qkv(2, 2, 40, 40, 64, dtype)
    table = t5_like_table(2, 40, 40, 8, seed=2)
    assert_matches_reference(fa, q, k, v, HALF_RTOL[dtype], table, padding_mask(2, 40), causal=dtype == torch.float16,
                             radius=8)


@pytest.mark.parametrize("v_scale", [2.0**-20, 1.0, 2.0**20], ids=["tiny-v", "v", "v-beyond-float16"])
def test_pv_in_float16_matches_reference_whatever_v_holds(fa, monkeypatch, v_scale):
    """PV_FP16: the forward's P·V in float16 with V scaled by a power of two into float16's range (values far past
    65504 or far below its normal range included) and O unscaled: output and gradients as the bf16 kernels'."""
    monkeypatch.setattr(fa, "PV_FP16", True)
    monkeypatch.setattr(fa, "PRECISE_PV_MIN_KEYS", 0)
    scaled = []
    to_fp16 = fa._fp16_values
    monkeypatch.setattr(fa, "_fp16_values", lambda v: scaled.append(to_fp16(v)) or scaled[-1])
    q, k, v = make_qkv(2, 2, 40, 40, 64, torch.bfloat16)
    v = (v.detach() * v_scale).requires_grad_()  # a power of two: still bf16-exact
    table = t5_like_table(2, 40, 40, 8, seed=2)
    out, _ = assert_matches_reference(fa, q, k, v, HALF_RTOL[torch.bfloat16], table, padding_mask(2, 40), radius=8)
    assert out.dtype == torch.bfloat16 and out.abs().max() > v_scale * 0.1  # unscaled, not left at max ~ 2^15
    (v16, largest), = scaled  # the float16 route ran, once (the forward), with V's largest value in [2^14, 2^15)
    assert float(largest) == float(v.detach().abs().max())
    assert v16.dtype == torch.float16 and 2.0**14 <= float(v16.abs().max()) < 2.0**15
    _, exponent = torch.frexp(largest.float())  # largest = m 2^exponent, m in [0.5, 1): the power is 2^(15 - exponent)
    assert torch.equal(v16.float(), torch.ldexp(v.detach().float(), 15 - exponent))  # exact: a power of two


def test_precise_pv_waits_for_enough_keys(fa, monkeypatch):
    """Below PRECISE_PV_MIN_KEYS keys the forward keeps its bf16 P·V: no float16 copy of V, no second GEMM."""
    monkeypatch.setattr(fa, "PV_FP16", True)
    monkeypatch.setattr(fa, "PV_SPLIT", True)
    monkeypatch.setattr(fa, "PRECISE_PV_MIN_KEYS", 48)
    launches = []
    launch = fa._launch

    def recording_launch(name, *args, **kwargs):
        launches.append((name, kwargs.get("PV_FP16"), kwargs.get("PV_SPLIT")))
        return launch(name, *args, **kwargs)

    monkeypatch.setattr(fa, "_launch", recording_launch)
    for key_len in (40, 48):
        q, k, v = make_qkv(1, 2, 16, key_len, 16, torch.bfloat16)
        fa.flash_t5_attention(q, k, v)
    assert [entry for entry in launches if entry[0] == "fwd"] == [("fwd", False, False), ("fwd", True, True)]

    # ... and only where a gradient will flow (PRECISE_PV_WITHOUT_GRAD off): inference keeps bf16's P·V, as SDPA
    launches.clear()
    with torch.no_grad():
        fa.flash_t5_attention(q, k, v)
    fa.flash_t5_attention(q.detach(), k.detach(), v.detach())
    fa.flash_t5_attention(q.detach(), k.detach(), v)  # one input with a gradient is enough
    monkeypatch.setattr(fa, "PRECISE_PV_WITHOUT_GRAD", True)
    with torch.no_grad():
        fa.flash_t5_attention(q, k, v)
    assert [entry[1:] for entry in launches if entry[0] == "fwd"] == [(False, False)] * 2 + [(True, True)] * 2


def test_pv_in_float16_with_an_all_zero_v_gives_zeros(fa, monkeypatch):
    monkeypatch.setattr(fa, "PV_FP16", True)
    monkeypatch.setattr(fa, "PRECISE_PV_MIN_KEYS", 0)
    q, k, _ = make_qkv(1, 2, 20, 20, 16, torch.bfloat16)
    out = fa.flash_t5_attention(q, k, torch.zeros_like(k))
    assert torch.equal(out, torch.zeros_like(out))


def test_pv_split_brings_the_forward_closer_to_float64(fa, monkeypatch):
    """PV_SPLIT: P·V over P's high and low parts (bf16, or float16 with PV_FP16 as by default). P's rounding is gone
    from the output (what is left is O's own rounding to bf16, doubled here: the interpreter truncates where the GPU
    rounds), and the gradients still match."""
    q, k, v = make_qkv(1, 2, 96, 96, 32, torch.bfloat16, seed=1)
    q = (q.detach() * 0.25).requires_grad_()  # a spread-out softmax, whose P·V sums many rounded P
    table = t5_like_table(2, 96, 96, 8, seed=2)
    reference = fa.reference_t5_attention(q, k, v, table)
    output_rounding = relative_error(reference.to(torch.bfloat16), reference)
    monkeypatch.setattr(fa, "PRECISE_PV_MIN_KEYS", 0)
    errors = {}
    for fp16, split in ((False, False), (False, True), (True, True)):  # bf16, the bf16 split, the default (both)
        monkeypatch.setattr(fa, "PV_FP16", fp16)
        monkeypatch.setattr(fa, "PV_SPLIT", split)
        errors[fp16, split] = relative_error(fa.flash_t5_attention(q, k, v, table), reference)
    for precise in ((False, True), (True, True)):
        assert errors[precise] < 0.85 * errors[False, False], errors
        assert errors[precise] < 2.2 * output_rounding, (errors, output_rounding)
    assert_matches_reference(fa, q, k, v, HALF_RTOL[torch.bfloat16], table, padding_mask(1, 96), radius=8)
