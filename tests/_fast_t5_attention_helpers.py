"""Helpers shared by the tests of sumtune's Triton T5 attention (tests/test_fast_t5_attention_*.py).

Inputs as the fast T5 attention hands them over, the float64 reference check and its tolerances, the seed the next
kernel call draws, and runs of the kernels with one flag off and on (on CPU in Triton's interpreter, and compiled
on the GPU). The `fa` and `compiled_fa` fixtures (the module under test) are in tests/conftest.py.
"""

from __future__ import annotations

import torch


FP32_RTOL = 2e-5  # fp32 kernels vs float64: rounding only


HALF_RTOL = {torch.bfloat16: 3e-2, torch.float16: 5e-3}  # P and dS rounded to the input dtype, as in FlashAttention


def make_qkv(batch, heads, query_len, key_len, head_dim, dtype, device="cpu", seed=0):
    """(B, H, L, D) views of (B, L, H, D) tensors, as the fast T5 attention hands them over."""
    gen = torch.Generator().manual_seed(seed)

    def one(length):
        data = torch.randn(batch, length, heads, head_dim, generator=gen)
        return data.to(device=device, dtype=dtype).transpose(1, 2).requires_grad_()

    return one(query_len), one(key_len), one(key_len)


def padding_mask(batch, key_len, device="cpu"):
    """Row 0 full, row 1 right-padded, row 2 (if any) short with a hole: the kernels take any key mask."""
    mask = torch.ones(batch, key_len, dtype=torch.bool, device=device)
    if batch > 1:
        mask[1, key_len * 2 // 3:] = False
    if batch > 2:
        mask[2, key_len // 3:] = False
        mask[2, 1] = False
    return mask


def t5_like_table(heads, query_len, key_len, radius, device="cpu", seed=1):
    """(H, Lq + Lk - 1) random bias by offset that, like T5's, is constant beyond +-radius."""
    compact = torch.randn(heads, 2 * radius + 1, generator=torch.Generator().manual_seed(seed)).to(device)
    offsets = torch.arange(1 - query_len, key_len, device=device)
    return compact[:, offsets.clamp(-radius, radius) + radius].contiguous()


def run_with_grads(fn, q, k, v, grad_out):
    for t in (q, k, v):
        t.grad = None
    out = fn(q, k, v)
    out.backward(grad_out.to(out.dtype))  # .backward, not autograd.grad: reentrant checkpointing allows only this
    grads = tuple(t.grad.clone() for t in (q, k, v))
    for t in (q, k, v):
        t.grad = None
    return out.detach(), grads


def relative_error(value, reference) -> float:
    value, reference = value.detach().double(), reference.detach().double()
    return float((value - reference).norm() / reference.norm().clamp_min(1e-30))


def assert_matches_reference(fa, q, k, v, rtol, table=None, mask=None, causal=False, keep=None, keep_scale=1.0,
                             dropout_p=0.0, radius=None):
    grad_out = torch.randn(q.shape[0], q.shape[1], q.shape[2], v.shape[-1], generator=torch.Generator().manual_seed(9))
    out, grads = run_with_grads(lambda *t: fa.flash_t5_attention(*t, bias_table=table, key_mask=mask, causal=causal,
                                                                 dropout_p=dropout_p, bias_radius=radius),
                                q, k, v, grad_out)
    ref, ref_grads = run_with_grads(lambda *t: fa.reference_t5_attention(*t, bias_table=table, key_mask=mask,
                                                                         causal=causal, keep_mask=keep,
                                                                         keep_scale=keep_scale), q, k, v, grad_out)
    assert torch.isfinite(out).all() and all(torch.isfinite(g).all() for g in grads)
    errors = {name: relative_error(a, b) for name, a, b in zip(("out", "dq", "dk", "dv"), (out, *grads),
                                                                (ref, *ref_grads))}
    assert max(errors.values()) <= rtol, errors
    return out, grads


CASES = {  # name: (query_len, key_len, head_dim, bias: radius / "any" table / None, causal, padded)
    "encoder-bias-padding": (50, 50, 16, 8, False, True),  # far-left, near and far-right tiles
    "decoder-causal-bias-padding": (50, 50, 16, 8, True, True),
    "cross-no-bias-padding": (21, 50, 16, None, False, True),
    "encoder-near-only": (37, 37, 32, 128, False, False),  # T5's radius: every tile reads the table
    "any-table-no-radius": (33, 33, 16, "any", False, True),  # no saturation promised: the table everywhere
}


def case_inputs(case: str) -> tuple:
    """(q, k, v, table, mask, causal, radius) of one of CASES: float32, batch 3, 2 heads."""
    query_len, key_len, head_dim, bias, causal, padded = CASES[case]
    q, k, v = make_qkv(3, 2, query_len, key_len, head_dim, torch.float32)
    radius = bias if isinstance(bias, int) else None
    table = None
    if bias == "any":
        table = torch.randn(2, query_len + key_len - 1, generator=torch.Generator().manual_seed(1))
    elif radius:
        table = t5_like_table(2, query_len, key_len, radius)
    mask = padding_mask(3, key_len) if padded else None
    return q, k, v, table, mask, causal, radius


def seed_of_next_call(fa, rng_seed: int, device="cpu") -> torch.Tensor:
    """The seed the next kernel call on ``device`` will draw after torch.manual_seed(rng_seed) (re-applied here)."""
    torch.manual_seed(rng_seed)
    seed = fa.draw_seed(device)
    torch.manual_seed(rng_seed)
    return seed


def _flag_comparison_inputs(fa, device, dtype, length, heads, head_dim, radius):
    """(q, k, v, bias table, padding, output gradient) of 3 rows for running the kernels with a flag off and on
    (padding_mask's rows: full, right-padded, short with a hole)."""
    q, k, v = make_qkv(3, heads, length, length, head_dim, dtype, device=device)
    table = fa.bias_table_log2(t5_like_table(heads, length, length, radius, device=device))
    padding = fa.key_padding(padding_mask(3, length, device=device))
    grad = torch.randn(3, heads, length, head_dim, generator=torch.Generator().manual_seed(2)).to(device)
    return q, k, v, table, padding, grad


def _holes_on_and_off(fa, monkeypatch, device, dtype, length, heads, head_dim, radius):
    """Output and gradients with MASK_ONLY_WITH_HOLES off and on, through the dQ kernel and the stored-dS route,
    plus one run on padding whose hole is not flagged."""
    q, k, v, table, padding, grad = _flag_comparison_inputs(fa, device, dtype, length, heads, head_dim, radius)
    # the lean tiles (LEAN_FORWARD) run only where the mask is skipped, and round in another order: their own tests
    # compare them; here the masked loops both ways
    monkeypatch.setattr(fa, "LEAN_FORWARD", False)
    results = {}
    for holes, ds_gemm, flags in [(h, d, padding.holes) for h in (False, True) for d in (False, True)] + [
            (True, False, torch.zeros_like(padding.holes))]:
        monkeypatch.setattr(fa, "MASK_ONLY_WITH_HOLES", holes)
        monkeypatch.setattr(fa, "DS_GEMM", ds_gemm)
        torch.manual_seed(3)
        given = fa.KeyPadding(padding.mask, padding.lengths, flags)
        results[holes, ds_gemm, int(flags.sum())] = run_with_grads(
            lambda q, k, v: fa.t5_flash_attention(q, k, v, table, radius, given, False, 0.25, 0.2), q, k, v, grad)
    return results


def _band_on_and_off(fa, monkeypatch, device, dtype, length, heads, head_dim, radius, causal, blocks):
    """Output and gradients with BIAS_BAND off and on, through the dQ kernel and the stored-dS route, with dropout."""
    q, k, v, table, padding, grad = _flag_comparison_inputs(fa, device, dtype, length, heads, head_dim, radius)
    results = {}
    for band in (False, True):
        for ds_gemm in (False, True):
            monkeypatch.setattr(fa, "BIAS_BAND", band)
            monkeypatch.setattr(fa, "DS_GEMM", ds_gemm)
            torch.manual_seed(3)
            with fa.block_sizes(**blocks):
                results[band, ds_gemm] = run_with_grads(
                    lambda q, k, v: fa.t5_flash_attention(q, k, v, table, radius, padding, causal, 0.25, 0.2),
                    q, k, v, grad)
    return results


def _descriptor_runs(fa, monkeypatch, device, dtype, causal, dropout_p, fused, query_len=40, key_len=40, blocks=None,
                     flag="FWD_DESCRIPTORS", reference=False):
    """Output and gradients with ``flag`` (FWD_DESCRIPTORS, BWD_DESCRIPTORS, LEAN_FORWARD or LEAN_BACKWARD) off and
    on, in one (B, H, L, D) layout: separate projections, or q/k/v slices of one fused [B, L, 3, H, D] projection
    (self-attention); the output's gradient as (B, L, H, D) rows, as the output projection hands it back. Also the
    descriptors made. With ``reference``, results["reference"] holds the same in float64 with the kernels' dropout
    draws."""
    heads, head_dim = 2, 32 if device == "cpu" else 128
    gen = torch.Generator().manual_seed(7)
    if fused:
        qkv = torch.randn(3, key_len, 3, heads, head_dim, generator=gen).to(device=device, dtype=dtype)
        q, k, v = (qkv[:, :, i].transpose(1, 2).detach().requires_grad_() for i in range(3))
    else:
        q, k, v = make_qkv(3, heads, query_len, key_len, head_dim, dtype, device=device, seed=7)
    raw_table, key_mask = t5_like_table(heads, q.shape[2], key_len, 8, device=device), padding_mask(3, key_len, device)
    table, padding = fa.bias_table_log2(raw_table), fa.key_padding(key_mask)
    grad = torch.randn(3, q.shape[2], heads, head_dim, generator=gen).to(device).transpose(1, 2)
    results, used = {}, []
    describe = fa.row_descriptors
    monkeypatch.setattr(fa, "row_descriptors", lambda *t: used.append(describe(*t)) or used[-1])
    for on in (False, True):
        monkeypatch.setattr(fa, flag, on)
        torch.manual_seed(3)
        with fa.block_sizes(**(blocks or {})):
            results[on] = run_with_grads(
                lambda q, k, v: fa.t5_flash_attention(q, k, v, table, 8, padding, causal, 1.0, dropout_p), q, k, v,
                grad)
    if reference:
        keep = (fa.dropout_keep_mask(seed_of_next_call(fa, 3, device), 3, heads, q.shape[2], key_len, dropout_p,
                                     device=device) if dropout_p else None)
        results["reference"] = run_with_grads(
            lambda q, k, v: fa.reference_t5_attention(q, k, v, raw_table, key_mask, causal, keep_mask=keep,
                                                      keep_scale=fa.dropout_scale(dropout_p) if dropout_p else 1.0),
            *(t.detach().double().requires_grad_() for t in (q, k, v)), grad)  # float64 gradients, not rounded
    return results, used


def _errors_against_float64(results) -> dict:
    """{flag off/on: [relative error of output, dq, dk, dv against results["reference"]]}."""
    reference = results["reference"]
    return {on: [relative_error(a, b) for a, b in zip((results[on][0], *results[on][1]),
                                                       (reference[0], *reference[1]))] for on in (False, True)}


def _lean_backward_errors(fa, monkeypatch, device, dtype, dropout_p, fused, length, blocks) -> tuple:
    """(errors against float64 with LEAN_BACKWARD off and on, on-against-off errors) at ``length`` queries and keys,
    T5's bias (far and near tiles), a right-padded row and a row with a hole."""
    results, _ = _descriptor_runs(fa, monkeypatch, device, dtype, False, dropout_p, fused, length, length,
                                  blocks=blocks, flag="LEAN_BACKWARD", reference=True)
    apart = [relative_error(a, b) for a, b in zip((results[True][0], *results[True][1]),
                                                  (results[False][0], *results[False][1]))]
    return _errors_against_float64(results), apart
