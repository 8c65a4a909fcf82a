"""sumtune.fast_t5.gluon_attention: the Gluon attention forward (off by default: flash_attention.GLUON_FORWARD).

On CPU: it compiles for sm_90 (a process without Triton's interpreter) without spills, within Hopper's shared memory,
and its loop keeps a warpgroup MMA in flight; with the flag on, calls it does not cover (here: the interpreter) run
the Triton forward unchanged. On a GPU (``-m gpu``): the flag on and off give the same outputs, log-sum-exps and
gradients, with and without dropout (the backward regenerates the forward's draws, so they must be the same).
"""

from __future__ import annotations

import importlib.util

import pytest
import torch
from test_fast_t5_attention import relative_error

HAS_TRITON = importlib.util.find_spec("triton") is not None


@pytest.mark.slow
@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
def test_the_gluon_forward_compiles_for_hopper_and_keeps_an_mma_in_flight(compiled_for_hopper):
    """Every variant the product can ask for builds for sm_90 without spilling, leaves room for two programs per SM,
    and waits in its loop with a warpgroup MMA still in flight (what Triton's forward never does: all its waits are
    0), so the tensor cores work during the softmax."""
    rows, stderr = compiled_for_hopper(
        "import json, re; from sumtune.fast_t5 import flash_compile as fc, gluon_attention as ga\n"
        "for head_dim in (128, 64):\n"
        "    for flags in ({}, {'PV_FP16': True, 'PV_SPLIT': True}, {'DROPOUT': False},\n"
        "                  {'HAS_BIAS': False, 'HAS_KEY_MASK': False}):\n"
        "        c = ga.compile_for_sm90(head_dim=head_dim, **flags)\n"
        "        waits = [int(w) for w in re.findall(r'wgmma.wait_group.sync.aligned\\s+(\\d+)', c.asm['ptx'])]\n"
        "        print(json.dumps(dict(fc.resources(c), head_dim=head_dim, flags=flags, waits=waits)))")
    from sumtune.fast_t5.flash_compile import HOPPER_SHARED_BYTES

    assert len(rows) == 8, stderr
    for row in rows:
        assert row["spill_bytes"] == 0 and row["shared_bytes"] <= HOPPER_SHARED_BYTES // 2, row  # two programs/SM
        assert max(row["waits"]) >= 1, row  # the loop waits with a group still in flight: MMA beside the softmax


def test_with_the_flag_on_uncovered_calls_run_the_triton_forward(monkeypatch):
    """The interpreter (or any call the kernel does not cover) keeps the Triton forward: the same bits."""
    pytest.importorskip("triton")
    from sumtune.fast_t5 import flash_attention as fa
    from sumtune.fast_t5 import flash_kernels

    if not flash_kernels.INTERPRET:
        pytest.skip("a CUDA machine: the GPU test below compares the two forwards")
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 16, 2, 32, generator=gen).transpose(1, 2) for _ in range(3))
    table = torch.randn(2, 31, generator=gen)
    mask = torch.ones(2, 16, dtype=torch.bool)
    mask[1, 10:] = False
    with fa.block_sizes(fwd=(16, 16), dkdv=(16, 16), dq=(16, 16)):
        torch.manual_seed(3)
        off = fa.flash_t5_attention(q, k, v, table, mask, dropout_p=0.1, bias_radius=4)
        monkeypatch.setattr(fa, "GLUON_FORWARD", True)
        assert not fa._gluon_covers(q, k, v, False, 16, True, 0.1)
        torch.manual_seed(3)
        on = fa.flash_t5_attention(q, k, v, table, mask, dropout_p=0.1, bias_radius=4)
    assert torch.equal(on, off)


def _gpu_case(batch, heads, query_len, key_len, head_dim, with_bias, seed=0):
    gen = torch.Generator(device="cuda").manual_seed(seed)

    def one(length):
        data = torch.randn(batch, length, heads, head_dim, device="cuda", generator=gen, dtype=torch.bfloat16)
        return data.transpose(1, 2).requires_grad_()

    q, k, v = one(query_len), one(key_len), one(key_len)
    radius = 8
    offsets = torch.arange(1 - query_len, key_len, device="cuda").clamp(-radius, radius) + radius
    table = torch.randn(heads, 2 * radius + 1, device="cuda", generator=gen)[:, offsets] if with_bias else None
    mask = torch.ones(batch, key_len, dtype=torch.bool, device="cuda")
    mask[1, key_len * 2 // 3:] = False  # right padding
    if batch > 2:
        mask[2, key_len // 3:] = False
        mask[2, 5] = False  # a hole: the mask is read in this row
    return q, k, v, table, mask, radius


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("query_len,key_len,head_dim,with_bias", [(320, 320, 128, True), (96, 320, 128, False),
                                                                  (200, 200, 64, True), (2112, 2112, 128, True)],
                         ids=["self", "cross", "head64", "precise_pv"])
@pytest.mark.parametrize("dropout_p", [0.0, 0.1])
def test_gpu_gluon_forward_matches_the_triton_forward(monkeypatch, query_len, key_len, head_dim, with_bias,
                                                      dropout_p):
    """Outputs, log-sum-exps and gradients with GLUON_FORWARD on and off, the same seed for both (2112 keys: the
    P·V in float16 plus its remainder, as the product runs it from 2048 keys)."""
    from sumtune.fast_t5 import flash_attention as fa

    if torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("the Gluon kernel is for Hopper (sm_90)")
    batch = 2 if query_len > 1024 else 3
    q, k, v, table, mask, radius = _gpu_case(batch, 4, query_len, key_len, head_dim, with_bias)
    grad_out = torch.randn(q.shape, device="cuda", dtype=torch.bfloat16,
                           generator=torch.Generator(device="cuda").manual_seed(9))
    results = {}
    for gluon in (False, True):
        monkeypatch.setattr(fa, "GLUON_FORWARD", gluon)
        padding = fa.key_padding(mask)
        prepared = fa.bias_table_log2(table) if table is not None else None
        assert fa._gluon_covers(q, k, v, False, 16, True, dropout_p) == gluon
        torch.manual_seed(5)
        out, lse, _ = fa._attention_op(q, k, v, prepared, radius if table is not None else 0, *padding, False, 1.0,
                                       dropout_p, 16, True)
        for t in (q, k, v):
            t.grad = None
        out.backward(grad_out)
        results[gluon] = (out.detach().float(), lse, q.grad.float(), k.grad.float(), v.grad.float())
    (out0, lse0, *grads0), (out1, lse1, *grads1) = results[False], results[True]
    finite = torch.isfinite(lse0)
    assert torch.equal(finite, torch.isfinite(lse1))
    torch.testing.assert_close(lse1[finite], lse0[finite], atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(out1, out0, atol=2e-2, rtol=2e-2)  # bf16 outputs, another summation order
    # The same backward reads both forwards' outputs: a last-bit difference of a bf16 output moves its row's
    # D = rowsum(dO * O), and so every gradient of that row a little. Elementwise bounds fail on such rows at scale
    # 1.0 (head 64 without dropout: 21 of 153,600 elements, 2026-12-03); the whole tensor's error is the measure.
    for got, want in zip(grads1, grads0):
        assert relative_error(got, want) <= 5e-3


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("head_dim", [64, 128])
def test_gpu_gluon_forward_no_further_from_float64_than_sdpa(monkeypatch, head_dim):
    """With the flag on, the attention tests' float64 check (4 x 8 x 1000 with T5's table, padding; dropout
    against float64 with the kernels' own mask)."""
    from test_fast_t5_attention import _check_against_sdpa_and_float64, first_configs

    from sumtune.fast_t5 import flash_attention as fa

    if torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("the Gluon kernel is for Hopper (sm_90)")
    monkeypatch.setattr(fa, "GLUON_FORWARD", True)
    with first_configs(fa):
        _check_against_sdpa_and_float64(fa, head_dim, False, torch.bfloat16)
