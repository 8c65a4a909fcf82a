"""sumtune.fast_t5.ws_backward: the dK/dV backward, warp-specialized (flash_attention.WS_BACKWARD).

On CPU: it builds for sm_90 within Hopper's shared memory with (almost) no spill, a producer warp with few registers
and two consumer warpgroups with many, loads and dS stores by TMA; its keep mask reaches the accumulator layout
without data movement. On a Hopper GPU (``-m gpu``): with T5's bias, padding and dropout, the gradients equal the
Triton backward's under the same seed, and are as close to float64 as those.
"""

from __future__ import annotations


import pytest
import torch

WS_BACKWARD_FOR_HOPPER = r"""
import json, re
from sumtune.fast_t5.flash_compile import resources, _sass
from sumtune.fast_t5 import ws_backward
for settings in ({}, {"DROPOUT": False}, {"HAS_KEY_MASK": False}, {"stages": 2}):
    compiled = ws_backward.compile_for_sm90(**settings)
    ptx, sass = compiled.asm["ptx"], _sass(compiled)
    print(json.dumps(dict(settings=settings, hgmma=sass.count("HGMMA"), bulk=ptx.count("cp.async.bulk.tensor"),
                          setmaxnreg=re.findall(r"setmaxnreg\.(\w+)\.sync\.aligned\.u32\s+(\d+)", ptx),
                          **resources(compiled))))
"""


def test_the_ws_backward_builds_for_hopper_as_a_producer_warp_and_two_consumer_warpgroups(compiled_for_hopper):
    """With and without dropout and the key mask, rings of three and two: within Hopper's shared memory, at most a few
    dozen bytes of spill (32-query tiles: with 64, Sᵀ, dPᵀ and P beside dK and dV spilled 610 bytes with dropout);
    Q, dO, K, V in and dSᵀ out by TMA; registers 24 for the producer, 240 for the consumers; each consumer's 20
    warpgroup MMAs a tile (Sᵀ and dPᵀ: 8 steps of 16 over head_dim each; dV and dK: 2 steps over 32 queries each).
    That it builds at all shows the keys-first keep mask in the accumulator's layout (asserted trivial)."""
    pytest.importorskip("triton.experimental.gluon")
    from sumtune.fast_t5.flash_compile import HOPPER_SHARED_BYTES

    rows, stderr = compiled_for_hopper(WS_BACKWARD_FOR_HOPPER)
    assert len(rows) == 4, stderr
    for row in rows:
        assert row["shared_bytes"] <= HOPPER_SHARED_BYTES and row["spill_bytes"] <= 64, row
        assert row["async_copies"] == 0 and row["bulk"] >= 5, row  # Q, dO, K, V loads and the dS store
        assert ["dec", "24"] in row["setmaxnreg"] and ["inc", "240"] in row["setmaxnreg"], row
        assert row["hgmma"] == 40, row


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] != 9,
                    reason="needs a Hopper GPU")
@pytest.mark.parametrize("dropout_p, masked", [(0.0, True), (0.1, True), (0.1, False)])
def test_gpu_ws_backward_matches_the_triton_backward_and_float64(monkeypatch, dropout_p, masked, t5_attention_case):
    """WS_BACKWARD on a Hopper GPU: T5's bias (near and far tiles), a padded row, a hole (or no key mask), lengths that
    are not whole tiles; under one seed dQ, dK and dV equal the Triton backward's to bf16 rounding, and their error
    against a float64 recomputation with the same keep mask is no larger than 1.5x the Triton backward's; its kernel
    ran. The dS buffer comes filled with NaN, so a dQ from entries it did not write would show."""
    from sumtune.fast_t5 import flash_attention as fa
    from sumtune.fast_t5 import ws_backward

    launched = []
    launch = ws_backward.dkdv
    monkeypatch.setattr(ws_backward, "dkdv", lambda *a, **k: launched.append(a[0].shape) or launch(*a, **k))
    allocate = fa._ds_buffer
    monkeypatch.setattr(fa, "_ds_buffer", lambda *a: allocate(*a).fill_(float("nan")))
    q, k, v, mask, table, radius, grad_out = t5_attention_case(6)
    mask = mask if masked else None
    batch, heads, length, _ = q.shape

    def grads(ws: bool):
        monkeypatch.setattr(fa, "WS_BACKWARD", ws)
        leaves = [x.detach().requires_grad_() for x in (q, k, v)]
        torch.manual_seed(21)
        out = fa.flash_t5_attention(*leaves, table, mask, bias_radius=radius, dropout_p=dropout_p)
        out.backward(grad_out)
        return [x.grad for x in leaves]

    triton_grads = grads(False)
    before = len(launched)
    ws_grads = grads(True)
    assert len(launched) == before + 1 and ws_backward.failure is None
    torch.manual_seed(21)
    seed = fa.draw_seed("cuda")  # the forward's seed: the first draw after the caller's RNG state
    keep = fa.dropout_keep_mask(seed, batch, heads, length, length, dropout_p) if dropout_p else None
    leaves = [x.detach().double().requires_grad_() for x in (q, k, v)]
    reference = fa.reference_t5_attention(*leaves, table, mask, keep_mask=keep,
                                          keep_scale=fa.dropout_scale(dropout_p) if dropout_p else 1.0)
    reference.backward(grad_out.double())
    for name, got, expected, exact in zip(("dq", "dk", "dv"), ws_grads, triton_grads, (x.grad for x in leaves)):
        assert relative_error(got, expected) < 2e-2, name
        assert relative_error(got, exact) <= 1.5 * relative_error(expected, exact) + 1e-3, name


def relative_error(value, reference) -> float:
    value, reference = value.detach().double(), reference.detach().double()
    return float((value - reference).norm() / reference.norm().clamp_min(1e-30))
