"""The tile loops and tile configs of sumtune's Triton T5 attention (sumtune.fast_t5.flash_tiles): the lean tiles
(LEAN_FORWARD, LEAN_BACKWARD) and the TMA descriptors' loads (FWD_DESCRIPTORS, BWD_DESCRIPTORS) against the masked
loops and pointer loads and against float64, and what the autotuners key on and hand to block_sizes().

On CPU in Triton's interpreter (tests/conftest.py); the compiled kernels: tests/test_fast_t5_attention_gpu.py.
"""

from __future__ import annotations

import pytest
import torch
from _fast_t5_attention_helpers import (
    FP32_RTOL,
    _descriptor_runs,
    _lean_backward_errors,
    assert_matches_reference,
    case_inputs,
    relative_error,
    seed_of_next_call,
)


def _lean_off_and_on(fa, monkeypatch, case: str, dropout_p: float, flag: str, dkdv_blocks: tuple) -> tuple:
    """{False: (out, grads), True: (out, grads)} with ``flag`` (LEAN_FORWARD or LEAN_BACKWARD) off
    and on, each held to float64 with the kernels' own dropout draws, and the (kernel, LEAN_TILES) of the run with it
    on."""
    q, k, v, table, mask, causal, radius = case_inputs(case)
    results, launched = {}, []
    launch = fa._launch
    for lean in (False, True):
        monkeypatch.setattr(fa, flag, lean)
        keep = None
        if dropout_p:
            seed = seed_of_next_call(fa, 5)
            keep = fa.dropout_keep_mask(seed, 3, 2, q.shape[2], k.shape[2], dropout_p, device="cpu")
        if lean:
            monkeypatch.setattr(fa, "_launch", lambda name, *a, **kw: launched.append((name, kw.get("LEAN_TILES")))
                                or launch(name, *a, **kw))
        with fa.block_sizes(fwd=(16, 16), dkdv=dkdv_blocks, dq=(32, 16)):
            results[lean] = assert_matches_reference(fa, q, k, v, FP32_RTOL, table, mask, causal, keep=keep,
                                                     keep_scale=fa.dropout_scale(dropout_p) if dropout_p else 1.0,
                                                     dropout_p=dropout_p, radius=radius)
    return results, launched


@pytest.mark.parametrize("case", ["encoder-bias-padding", "cross-no-bias-padding", "encoder-near-only"])
@pytest.mark.parametrize("dropout_p", [0.0, 0.2])
def test_lean_forward_tiles_match_float64_reference(fa, monkeypatch, case, dropout_p):
    """LEAN_FORWARD: the key tiles inside a row's keys (row 0 whole, row 1 right-padded; row 2 has a hole: masked
    loops only) without masks, far tiles' scale and bias in one multiply-add: output and gradients as float64's,
    with dropout's draws. The lean far loops ran where far tiles with a bias exist (the bias added in another order
    moved the rounding; not in row 2); where no constant is reassociated (no bias: the interpreter rounds each
    operation as the masked loop does) or every tile is near (T5's radius at these lengths) the lean loops round as
    the masked ones (a lean near loop that dropped its bias fails the float64 comparison: checked)."""
    results, launched = _lean_off_and_on(fa, monkeypatch, case, dropout_p, "LEAN_FORWARD", (16, 32))
    (off, _), (on, _) = results[False], results[True]
    assert ("fwd", True) in launched  # the forward's launch asked for the lean loops
    if case != "encoder-bias-padding":
        assert torch.equal(on, off)
    else:
        assert not torch.equal(on, off)
        assert torch.equal(on[2], off[2])  # the row with a hole: its masked loops, as before


@pytest.mark.parametrize("case,dropout_p", [("encoder-bias-padding", 0.0), ("encoder-bias-padding", 0.2),
                                             ("cross-no-bias-padding", 0.0), ("encoder-near-only", 0.0)])
def test_lean_backward_tiles_match_float64_reference(fa, monkeypatch, case, dropout_p):
    """LEAN_BACKWARD: the dK/dV kernel's key blocks with no masked key run their whole query tiles (all but the last
    partial one: 50 queries in tiles of 16) without masks, far tiles' scale, bias and log-sum-exp in one
    multiply-add, and with dropout its 1 / (1 - p) applied once to dK, dV and the dQ GEMM: gradients as float64's,
    with dropout's draws (a dQ GEMM without the scale fails). Without dropout: where a bias constant is
    reassociated (far tiles) the rounding moves, but not in row 2 (a hole: masked loops only); without a bias or
    with near tiles only the lean loops round as the masked ones, so a lean loop that dropped a tile, its bias or
    its rows' log-sum-exp would show here and in the float64 comparison."""
    results, launched = _lean_off_and_on(fa, monkeypatch, case, dropout_p, "LEAN_BACKWARD", (16, 16))
    (_, off), (_, on) = results[False], results[True]
    assert ("dkdv", True) in launched  # the dK/dV launch asked for the lean loops
    if dropout_p:  # dropout's scale moved out of the loops (all of them): every gradient rounds apart
        assert not any(torch.equal(a, b) for a, b in zip(on, off))
    elif case != "encoder-bias-padding":
        assert all(torch.equal(a, b) for a, b in zip(on, off))
    else:
        assert not torch.equal(on[1], off[1])
        assert all(torch.equal(a[2], b[2]) for a, b in zip(on, off))  # the row with a hole


def test_lean_backward_with_the_dq_kernel_matches_float64_reference(fa, monkeypatch):
    """LEAN_BACKWARD where dQ comes from its own kernel (no stored dS: DS_GEMM off, or held off for a micro-batch
    that fits only so): the dK/dV kernel's folded dropout scale leaves the dQ kernel's sums as they were."""
    q, k, v, table, mask, causal, radius = case_inputs("encoder-bias-padding")
    monkeypatch.setattr(fa, "LEAN_BACKWARD", True)
    monkeypatch.setattr(fa, "DS_GEMM", False)
    seed = seed_of_next_call(fa, 5)
    keep = fa.dropout_keep_mask(seed, 3, 2, q.shape[2], k.shape[2], 0.2, device="cpu")
    with fa.block_sizes(fwd=(16, 16), dkdv=(16, 16), dq=(32, 16)):
        assert_matches_reference(fa, q, k, v, FP32_RTOL, table, mask, causal, keep=keep,
                                 keep_scale=fa.dropout_scale(0.2), dropout_p=0.2, radius=radius)


def test_lean_backward_is_on_by_default_only_with_the_triton_releases_it_was_measured_on(fa):
    """LEAN_BACKWARD's default follows the installed Triton: on before 3.9 (timed with 3.6), off from 3.9 (its sm_90
    build spills there) and without Triton."""
    from sumtune.fast_t5 import flash_tiles

    assert flash_tiles.lean_backward_default("3.6.0") and flash_tiles.lean_backward_default("3.8.1+git4a5b")
    assert not flash_tiles.lean_backward_default("3.9.0") and not flash_tiles.lean_backward_default("4.0.0")
    assert flash_tiles.triton_release("nightly") is None and not flash_tiles.lean_backward_default("nightly")
    assert fa.LEAN_BACKWARD == flash_tiles.lean_backward_default()


@pytest.mark.parametrize("dropout_p", [0.0, 0.2])
def test_lean_backward_in_bf16_is_as_close_to_float64_as_the_masked_loops(fa, monkeypatch, dropout_p):
    """LEAN_BACKWARD in bf16 (interpreter): with dropout, P is rounded to bf16 before its 1 / (1 - p) (applied to dK,
    dV and the dQ GEMM) instead of after, so the gradients round apart from the masked loops' (by ~3e-3, as on an
    H100) but are no further from float64 than theirs; without dropout the same bits."""
    errors, apart = _lean_backward_errors(fa, monkeypatch, "cpu", torch.bfloat16, dropout_p, False, 70,
                                          dict(fwd=(16, 16), dkdv=(16, 16), dq=(16, 16)))
    assert max(errors[False]) < 2e-2  # bf16's own rounding, not a wrong gradient
    for lean, masked in zip(errors[True], errors[False]):
        assert lean <= 1.02 * masked + 1e-5, errors
    assert (max(apart) > 1e-3) == (dropout_p > 0), apart


@pytest.mark.parametrize("flag", ["FWD_DESCRIPTORS", "BWD_DESCRIPTORS"], ids=["forward", "dkdv"])
@pytest.mark.parametrize("causal,dropout_p,fused,query_len", [(False, 0.0, False, 24), (False, 0.2, True, 40),
                                                              (True, 0.2, False, 40)],
                         ids=["cross", "encoder-fused-dropout", "decoder-dropout"])
def test_kernels_by_tma_descriptors_match_pointer_loads(fa, monkeypatch, causal, dropout_p, fused, query_len, flag):
    """FWD_DESCRIPTORS (K and V in the forward) and BWD_DESCRIPTORS (Q and dO in the dK/dV kernel): TMA descriptors
    over the (B * L, H * D) rows give the pointer loads' outputs and gradients to within float32 rounding, with T5's
    bias (near and far tiles), padding with a hole, dropout's draws, causal masking, cross-attention lengths and the
    fused projection's layout; tiles of 16 cross the rows' ends, where the descriptors read the next row or zeros.
    A layout the descriptors cannot read (heads outermost) keeps the pointer loads."""
    results, used = _descriptor_runs(fa, monkeypatch, "cpu", torch.float32, causal, dropout_p, fused, query_len,
                                     blocks=dict(fwd=(16, 16), dkdv=(16, 16), dq=(16, 16)), flag=flag)
    (out_off, grads_off), (out_on, grads_on) = results[False], results[True]
    rows = 3 * (40 if flag == "FWD_DESCRIPTORS" else query_len)  # keys' rows in the forward, queries' in dK/dV
    assert len(used) == 1 and used[0] is not None and [d.shape for d in used[0]] == [[rows, 2 * 32]] * 2
    assert [d.block_shape for d in used[0]] == [[16, 32]] * 2  # the launch's BLOCK_N keys or BLOCK_M queries
    errors = [relative_error(a, b) for a, b in zip((out_on, *grads_on), (out_off, *grads_off))]
    assert max(errors) < 1e-5, errors  # a tile read from the wrong row or head would be off by ~1
    assert out_off.abs().max() > 0.1 and relative_error(grads_on[1], torch.zeros_like(grads_on[1])) > 0.5
    heads_outer = torch.zeros(2, 2, 40, 32)  # contiguous (B, H, L, D): not rows of B * L
    from sumtune.fast_t5.flash_descriptors import rows_stride

    assert rows_stride(heads_outer) is None and fa.row_descriptors(heads_outer, heads_outer) is None


def test_best_configs_names_only_kernels_that_block_sizes_pins(monkeypatch):
    """best_configs() feeds block_sizes() (attention_kernels.py pins the dropout row's tiles for the rows after it):
    the TMA forms' tuners ("fwd_desc", "dkdv_desc") are left out, so a run that tuned one can still pin."""
    pytest.importorskip("triton")
    from types import SimpleNamespace

    from sumtune.fast_t5 import flash_tiles

    def tuner(block_m, block_n, warps, stages):
        config = SimpleNamespace(kwargs=dict(BLOCK_M=block_m, BLOCK_N=block_n), num_warps=warps, num_stages=stages)
        return (None, None, SimpleNamespace(best_config=config))

    monkeypatch.setattr(flash_tiles, "_tuned", {"fwd": tuner(64, 64, 4, 2), "fwd_desc": tuner(128, 128, 8, 3),
                                                "dkdv_desc": tuner(32, 64, 4, 3), "dq": (None, None, object())})
    chosen = flash_tiles.best_configs()
    assert chosen == {"fwd": (64, 64, 4, 2), "dq": None}
    with flash_tiles.block_sizes(**{name: config for name, config in chosen.items() if config}):
        assert flash_tiles._fixed_blocks("fwd") == (64, 64, 4, 2)


def test_each_flag_that_picks_a_forward_build_keys_its_own_tuning(monkeypatch):
    """The forward's and the dK/dV kernel's autotuners key on LEAN_TILES (and the other build flags they are
    launched with), so turning LEAN_FORWARD or LEAN_BACKWARD on in a process that tuned the masked loops tunes the
    lean build anew instead of reusing the masked build's tile."""
    pytest.importorskip("triton")
    from sumtune.fast_t5 import flash_kernels, flash_tiles

    monkeypatch.setattr(flash_tiles, "_tuned", {})
    forward = flash_tiles._autotuned("fwd", flash_kernels.t5_flash_attention_fwd)
    assert {"LEAN_TILES", "HAS_BIAS", "HAS_KEY_MASK", "DROPOUT", "CHECK_HOLES", "USE_BAND"} <= set(forward.keys)
    dkdv = flash_tiles._autotuned("dkdv", flash_kernels.t5_flash_attention_bwd_dkdv)
    assert {"STORE_DS", "LEAN_TILES"} <= set(dkdv.keys)
