"""The backward's two dQ routes in sumtune's Triton T5 attention: dQ from the dS the dK/dV kernel stores (DS_GEMM,
the default, within DS_GEMM_MAX_GIB) and the dQ kernel (DS_GEMM off, above the cap, or held off by the micro-batch
search), each against float64.

On CPU in Triton's interpreter (tests/conftest.py); the compiled kernels: tests/test_fast_t5_attention_gpu.py.
"""

from __future__ import annotations

import pytest
import torch
from _fast_t5_attention_helpers import (
    CASES,
    FP32_RTOL,
    assert_matches_reference,
    case_inputs,
    make_qkv,
    padding_mask,
    seed_of_next_call,
    t5_like_table,
)

from sumtune.config import TrainConfig


@pytest.fixture()
def ds_gemm(fa, monkeypatch):
    """The backward's dQ from the dS the dK/dV kernel stores (DS_GEMM, the default), into a buffer first filled with
    NaN: every entry the GEMM reads must be written, the zeros of unvisited tiles included."""
    monkeypatch.setattr(fa, "DS_GEMM", True)
    allocate = fa._ds_buffer
    monkeypatch.setattr(fa, "_ds_buffer", lambda *args: allocate(*args).fill_(float("nan")))
    return fa


@pytest.mark.parametrize("case", CASES)
def test_dq_from_stored_ds_matches_float64_reference(ds_gemm, case):
    q, k, v, table, mask, causal, radius = case_inputs(case)
    with ds_gemm.block_sizes(fwd=(16, 16), dkdv=(16, 32)):  # causal: query blocks above the diagonal stay unvisited
        assert_matches_reference(ds_gemm, q, k, v, FP32_RTOL, table, mask, causal, radius=radius)


def test_dq_from_stored_ds_only_while_its_buffer_fits_the_cap(ds_gemm, monkeypatch):
    """Above DS_GEMM_MAX_GIB the backward takes the dQ kernel (no buffer); below it, the stored dS."""
    q, k, v, table, mask, causal, radius = case_inputs("encoder-bias-padding")
    made = ds_gemm.ds_buffers_made
    gib = ds_gemm._ds_buffer_gib(3, 2, 50, 50, 4)
    assert gib == 3 * 2 * 128 * 128 * 4 / 2**30  # padded to whole 128 tiles
    for cap, expected in ((gib / 2, 0), (gib, 1)):
        monkeypatch.setattr(ds_gemm, "DS_GEMM_MAX_GIB", cap)
        assert_matches_reference(ds_gemm, q, k, v, FP32_RTOL, table, mask, causal, radius=radius)
        assert ds_gemm.ds_buffers_made - made == expected


@pytest.mark.parametrize("case", CASES)
def test_dq_kernel_matches_float64_reference(fa, monkeypatch, case):
    """The dQ kernel: what a backward runs with DS_GEMM off, above the buffer cap, or in a run whose micro-batch fits
    only without the buffer (sumtune.training)."""
    monkeypatch.setattr(fa, "DS_GEMM", False)
    made = fa.ds_buffers_made
    q, k, v, table, mask, causal, radius = case_inputs(case)
    with fa.block_sizes(fwd=(16, 16), dq=(32, 16)):
        assert_matches_reference(fa, q, k, v, FP32_RTOL, table, mask, causal, radius=radius)
    assert fa.ds_buffers_made == made


def test_a_run_that_holds_the_ds_gemm_off_takes_the_dq_kernel(fa, monkeypatch):
    """The micro-batch search's leaner mode: tried only after a probe that made a dS buffer; under it (and for a
    run it chose, until the next run sets it again) the backward makes none."""
    import sys

    from sumtune import training

    q, k, v, table, mask, causal, radius = case_inputs("encoder-bias-padding")
    training.resolve_batch_size(TrainConfig(batch_size=2), model=None, examples=[], collator=None,
                                device=torch.device("cpu"))  # a new run: the switch as shipped
    assert fa.ds_gemm_active() and not training.ds_gemm_held_off()
    with monkeypatch.context() as unloaded:  # a search starts before the first forward imports the kernels' module
        unloaded.delitem(sys.modules, fa.__name__)
        leaner = training._ds_gemm_leaner()
    monkeypatch.setattr(fa, "ds_buffers_made", 0)  # as freshly imported
    assert not leaner.applies()  # no probe has made a buffer yet
    assert_matches_reference(fa, q, k, v, FP32_RTOL, table, mask, causal, radius=radius)
    assert leaner.applies() and not leaner.applies()  # once per probe that made one
    made = fa.ds_buffers_made
    with leaner.held():
        assert not fa.ds_gemm_active()
        assert_matches_reference(fa, q, k, v, FP32_RTOL, table, mask, causal, radius=radius)
    assert fa.ds_buffers_made == made and fa.ds_gemm_active()
    resumed = {"micro_batch_size": 2, "grad_accum_steps": 8, training.DS_GEMM_HELD_OFF: True}
    try:  # a resumed run keeps what its search chose (checkpoint.TrainerState records it)
        training.resolve_batch_size(TrainConfig(batch_size="auto", samples_per_step=16), model=None, examples=[],
                                    collator=None, device=torch.device("cpu"), resume_record=resumed)
        assert training.ds_gemm_held_off() and not fa.ds_gemm_active()
        assert_matches_reference(fa, q, k, v, FP32_RTOL, table, mask, causal, radius=radius)
        assert fa.ds_buffers_made == made
    finally:
        training.resolve_batch_size(TrainConfig(batch_size=2), model=None, examples=[], collator=None,
                                    device=torch.device("cpu"))
    assert fa.ds_gemm_active()


def test_dq_from_stored_ds_with_dropout_and_keyless_rows(ds_gemm):
    q, k, v = make_qkv(2, 2, 45, 45, 16, torch.float32)
    table, mask, p = t5_like_table(2, 45, 45, 8), padding_mask(2, 45), 0.3
    mask[1] = False  # a row with nothing to attend to: every key block of it is skipped
    for causal in (False, True):
        seed = seed_of_next_call(ds_gemm, 7)
        keep = ds_gemm.dropout_keep_mask(seed, 2, 2, 45, 45, p, device="cpu")
        with ds_gemm.block_sizes(fwd=(16, 32), dkdv=(32, 16)):
            _, grads = assert_matches_reference(ds_gemm, q, k, v, FP32_RTOL, table, mask, causal, keep=keep,
                                                keep_scale=ds_gemm.dropout_scale(p), dropout_p=p, radius=8)
        assert torch.equal(grads[0][1], torch.zeros_like(grads[0][1]))
