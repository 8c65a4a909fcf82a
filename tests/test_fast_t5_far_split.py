"""sumtune.fast_t5.far_split: the far-left part of T5 attention from a causal kernel without bias, folded into the
forward kernel (FAR_GIVEN). On CPU the kernels run in Triton's interpreter and the far part in torch's CPU flash
kernel; the GPU test runs the compiled kernels with cuDNN's."""

from __future__ import annotations

import pytest
import torch

from test_fast_t5_attention import _interpreting, make_qkv, padding_mask, relative_error, t5_like_table


@pytest.fixture()
def fa(monkeypatch):
    pytest.importorskip("triton")
    if not _interpreting():
        pytest.skip("Triton's interpreter is off (a CUDA machine: run with TRITON_INTERPRET=1, or -m gpu)")
    from sumtune.fast_t5 import far_split, flash_attention

    monkeypatch.setattr(far_split, "FAR_SPLIT_MIN_KEYS", 0)
    return flash_attention


def _forward(fa, monkeypatch, split: bool, q, k, v, table, radius, mask, grad=False):
    """The forward with the far-left part from the causal kernel (split) or without."""
    from sumtune.fast_t5 import far_split

    monkeypatch.setattr(far_split, "FAR_SPLIT_WITHOUT_GRAD", split)
    with torch.set_grad_enabled(grad):
        return fa.flash_t5_attention(q, k, v, bias_table=table, key_mask=mask, bias_radius=radius)


def _inputs(length=70, heads=2, head_dim=16, radius=8, dtype=torch.float32, device="cpu"):
    q, k, v = (t.detach() for t in make_qkv(3, heads, length, length, head_dim, dtype, device=device))
    table = t5_like_table(heads, length, length, radius, device=device)
    return q, k, v, table, padding_mask(3, length, device=device)


@pytest.mark.parametrize("blocks", [None, (16, 16)], ids=["interpreter-tiles", "16x16"])
def test_far_split_matches_the_one_kernel_at_every_real_query(fa, monkeypatch, blocks):
    """Rows full and right-padded take the far-left part from the causal kernel: the same output at every real
    query as the kernel alone (float32: rounding only), finite at padded ones; the row with a hole in its mask keeps
    the kernel's own far-left loop, bit for bit."""
    q, k, v, table, mask = _inputs()
    pinned = fa.block_sizes(fwd=blocks) if blocks else torch.no_grad()
    with pinned:
        plain = _forward(fa, monkeypatch, False, q, k, v, table, 8, mask)
        out = _forward(fa, monkeypatch, True, q, k, v, table, 8, mask)
    reference = fa.reference_t5_attention(q.double(), k.double(), v.double(), bias_table=table.double(),
                                          key_mask=mask)
    real = mask[:, None, :, None].expand_as(plain)
    assert torch.isfinite(out).all()
    assert relative_error(out[real], reference[real]) < 2e-6
    assert torch.allclose(out[real], plain[real], rtol=1e-5, atol=1e-6)
    assert not torch.equal(out[0], plain[0])  # the split ran (another summation order)
    assert torch.equal(out[2], plain[2])  # the row with a hole: the kernel's own far-left loop


def test_far_split_only_without_gradient_and_from_its_key_count(fa, monkeypatch):
    """A forward that a gradient reaches, or shorter than FAR_SPLIT_MIN_KEYS, runs the one kernel: the same bits."""
    from sumtune.fast_t5 import far_split

    q, k, v, table, mask = _inputs()
    plain = _forward(fa, monkeypatch, False, q, k, v, table, 8, mask)
    q_grad = q.clone().requires_grad_()
    with_grad = _forward(fa, monkeypatch, True, q_grad, k, v, table, 8, mask, grad=True)
    assert torch.equal(with_grad.detach(), plain)
    monkeypatch.setattr(far_split, "FAR_SPLIT_MIN_KEYS", 71)
    assert torch.equal(_forward(fa, monkeypatch, True, q, k, v, table, 8, mask), plain)
    cpu = torch.device("cpu")
    assert not far_split.applies(70, 70, 8, True, False, 0.0, False, False, cpu)  # below FAR_SPLIT_MIN_KEYS
    monkeypatch.setattr(far_split, "FAR_SPLIT_MIN_KEYS", 0)
    assert far_split.applies(70, 70, 8, True, False, 0.0, False, False, cpu)
    assert not far_split.applies(70, 70, 8, True, True, 0.0, False, False, cpu)  # causal
    assert not far_split.applies(70, 70, 8, True, False, 0.1, False, False, cpu)  # dropout
    assert not far_split.applies(70, 70, 0, True, False, 0.0, False, False, cpu)  # no radius promised
    assert not far_split.applies(70, 70, 8, True, False, 0.0, False, True, cpu)  # precise P·V


def test_a_far_part_the_causal_kernel_refuses_leaves_the_one_kernel(fa, monkeypatch):
    """cuDNN refusing the inputs (a RuntimeError) costs nothing but the speed: the one kernel's bits."""
    from sumtune.fast_t5 import far_split

    def refuse(*args, **kwargs):
        raise RuntimeError("no cuDNN engine for these inputs")

    q, k, v, table, mask = _inputs()
    plain = _forward(fa, monkeypatch, False, q, k, v, table, 8, mask)
    monkeypatch.setattr(far_split, "_causal_attention", refuse)
    assert torch.equal(_forward(fa, monkeypatch, True, q, k, v, table, 8, mask), plain)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_far_split_close_to_float64_as_the_one_kernel(monkeypatch):
    """Compiled, bf16, T5's radius, 2304 keys: the far-left part from cuDNN's causal kernel keeps the output at the
    real queries within 1.5x the one kernel's error against float64 (the part comes rounded to bf16), finite at the
    padded ones; the row with a hole: the one kernel's bits."""
    if _interpreting():
        pytest.skip("TRITON_INTERPRET=1: the GPU tests need the compiled kernels")
    from sumtune.fast_t5 import flash_attention as fa

    q, k, v, table, mask = _inputs(length=2304, heads=4, head_dim=128, radius=128, dtype=torch.bfloat16,
                                   device="cuda")
    plain = _forward(fa, monkeypatch, False, q, k, v, table, 128, mask)
    out = _forward(fa, monkeypatch, True, q, k, v, table, 128, mask)
    reference = fa.reference_t5_attention(q.double(), k.double(), v.double(), bias_table=table.double(),
                                          key_mask=mask)
    real = mask[:, None, :, None].expand_as(plain)
    assert torch.isfinite(out).all()
    assert not torch.equal(out[0], plain[0])
    assert relative_error(out[real], reference[real]) <= 1.5 * relative_error(plain[real], reference[real])
    assert torch.equal(out[2], plain[2])
