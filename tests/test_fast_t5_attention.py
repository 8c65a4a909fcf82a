"""sumtune's Triton T5 attention (sumtune.fast_t5.flash_attention) against plain-PyTorch references.

On CPU the kernels run in Triton's interpreter (TRITON_INTERPRET=1, set by tests/conftest.py when there is no GPU).
float32 inputs there make the kernels' arithmetic exact up to fp32
rounding, so bias indexing, masks and dropout are checked to ~1e-6 against a float64 reference of the same math;
bf16/fp16 cases check the real dtypes. Small tiles are pinned so that every case crosses several blocks and the
far/near bias regions. GPU tests (``-m gpu``) compare the compiled kernels with stock transformers in bf16.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

from sumtune.config import TrainConfig
from sumtune.fast_t5 import attention as attention_lib
from sumtune.fast_t5 import bias as bias_lib

HAS_TRITON = importlib.util.find_spec("triton") is not None

FP32_RTOL = 2e-5  # fp32 kernels vs float64: rounding only
HALF_RTOL = {torch.bfloat16: 3e-2, torch.float16: 5e-3}  # P and dS rounded to the input dtype, as in FlashAttention


def _interpreting() -> bool:
    from sumtune.fast_t5 import flash_kernels

    return flash_kernels.INTERPRET


@pytest.fixture()
def fa():
    """flash_attention with its kernels in Triton's CPU interpreter (tests/conftest.py turns it on without CUDA;
    it must be on before triton is first imported, which peft and bitsandbytes do)."""
    pytest.importorskip("triton")
    if not _interpreting():
        pytest.skip("Triton's interpreter is off (a CUDA machine: run with TRITON_INTERPRET=1, or -m gpu)")
    from sumtune.fast_t5 import flash_attention

    return flash_attention


# ----------------------------------------------------------------------------- helpers
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


# ----------------------------------------------------------------------------- exact math (fp32 in the interpreter)
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


@pytest.mark.parametrize("case", CASES)
def test_forward_and_grads_match_float64_reference(fa, case):
    q, k, v, table, mask, causal, radius = case_inputs(case)
    with fa.block_sizes(fwd=(16, 16), dkdv=(16, 32), dq=(32, 16)):  # lengths are not multiples of any of them
        assert_matches_reference(fa, q, k, v, FP32_RTOL, table, mask, causal, radius=radius)


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


def test_key_padding_flags_rows_with_a_hole_before_their_length(fa):
    """KeyPadding.holes: 1 only where a masked key comes before the row's last kept key (left padding counts)."""
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 0, 1, 1, 0], [0, 0, 0, 0, 0], [0, 1, 1, 1, 1], [1, 1, 1, 1, 1]])
    padding = fa.key_padding(mask)
    assert padding.lengths.tolist() == [3, 4, 0, 5, 5]
    assert padding.holes.tolist() == [0, 1, 0, 1, 0]
    assert padding.holes.dtype == torch.int8


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


@pytest.mark.parametrize("causal", [False, True], ids=["encoder", "decoder"])
def test_bias_band_changes_no_bit(fa, monkeypatch, causal):
    """BIAS_BAND: the near tiles read the bias from the band instead of the table: the same bits, forward and
    backward, with padding and dropout; tiles of different shapes per kernel, lengths not a multiple of them, a
    radius that leaves far-left, near and far-right tiles."""
    results = _band_on_and_off(fa, monkeypatch, "cpu", torch.float32, 70, 2, 16, 8, causal,
                               dict(fwd=(16, 32), dkdv=(32, 16), dq=(16, 16)))
    for ds_gemm in (False, True):
        (out_off, grads_off), (out_on, grads_on) = results[False, ds_gemm], results[True, ds_gemm]
        assert torch.equal(out_off, out_on) and all(map(torch.equal, grads_off, grads_on))


def test_bias_band_holds_the_tiles_each_kernel_may_take(fa, monkeypatch):
    """The band is sized for the kernel that reads it: its pinned tiles, or the largest tile the autotuner may pick
    when only another kernel's tiles are pinned (a band sized for the pinned kernel would be read past its end)."""
    from sumtune.fast_t5 import flash_kernels

    monkeypatch.setattr(flash_kernels, "INTERPRET", False)  # as on a GPU: no interpreter tiles to fall back on
    with fa.block_sizes(fwd=(16, 32)):
        assert fa._band_tile_limit("fwd") == 32
        assert fa._band_tile_limit("dkdv") == fa._band_tile_limit("dq") == fa.TABLE_MARGIN
    assert fa._band_tile_limit("fwd") == fa.TABLE_MARGIN


def test_bias_band_holds_each_tiles_bias(fa, monkeypatch):
    """The band itself: for every near tile the kernels visit (their own loop bounds: offsets within the radius),
    reading it as the forward does and as the dK/dV kernel does (transposed) gives the bias of each element j - i."""
    monkeypatch.setattr(fa, "BIAS_BAND", True)
    heads, length, radius, tile = 2, 90, 8, 32
    table = fa.bias_table_log2(t5_like_table(heads, length, length, radius))
    zero = fa._table_geometry(table, length)[1]
    with fa.block_sizes(fwd=(tile, tile), dkdv=(tile, tile), dq=(tile, tile)):
        for transposed in (False, True):
            args = fa._band_args(table, radius, length, length, "dkdv" if transposed else "fwd")
            width, per_head = args["band_w"], args["band_head"]
            band, origin = args["BAND"]._base.reshape(-1), args["BAND"].storage_offset()  # kernels index from origin
            visited = 0
            for start in range(0, length, tile):  # the program's query block (forward) or key block (dK/dV)
                first = min(max(start - radius + 1, 0) // tile * tile, length)
                last = max(min(-(-(start + tile - 1 + radius) // tile) * tile, length), first)
                for other in range(first, last, tile):  # the near tiles of its loop
                    start_m, start_n = (other, start) if transposed else (start, other)
                    shift = (start_m - start_n) if transposed else (start_n - start_m)
                    offsets = torch.arange(tile)[:, None] * width + torch.arange(tile)[None, :] + shift
                    got = torch.stack([band[origin + h * per_head + offsets] for h in range(heads)])
                    i, j = start_m + torch.arange(tile), start_n + torch.arange(tile)
                    rel = (j[:, None] - i[None, :]) if transposed else (j[None, :] - i[:, None])
                    inside = (rel.abs() <= length - 1) & ((i[None, :] if transposed else i[:, None]) < length) & (
                        (j[:, None] if transposed else j[None, :]) < length)
                    want = table[:, zero + rel.clamp(-radius, radius)]
                    assert torch.equal(got[:, inside], want[:, inside]), (transposed, start_m, start_n)
                    visited += 1
            assert visited >= 6


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


# ----------------------------------------------------------------------------- dropout
def seed_of_next_call(fa, rng_seed: int, device="cpu") -> torch.Tensor:
    """The seed the next kernel call on ``device`` will draw after torch.manual_seed(rng_seed) (re-applied here)."""
    torch.manual_seed(rng_seed)
    seed = fa.draw_seed(device)
    torch.manual_seed(rng_seed)
    return seed


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


# ----------------------------------------------------------------------------- bias table, dispatch, custom op
@pytest.mark.parametrize("num_buckets,max_distance", [(32, 128), (16, 64), (32, 40)])
def test_bias_table_reproduces_stock_compute_bias_and_saturates(num_buckets, max_distance):
    """The table is stock's bias at every offset, and constant beyond +-max_distance, which the kernels rely on
    to skip it for far-apart tiles."""
    from transformers import T5Config
    from transformers.models.t5.modeling_t5 import T5Attention

    for is_decoder in (False, True):
        config = T5Config(d_model=32, d_kv=8, num_heads=4, relative_attention_num_buckets=num_buckets,
                          relative_attention_max_distance=max_distance, is_decoder=is_decoder)
        torch.manual_seed(0)
        attention = T5Attention(config, has_relative_attention_bias=True).requires_grad_(False)
        query_len, key_len = 2 * max_distance + 37, max_distance + 50  # far beyond max_distance on both sides
        for dtype in (torch.float32, torch.bfloat16):
            table = bias_lib.relative_position_bias_by_offset(attention, query_len, key_len, dtype)
            assert table.shape == (4, query_len + key_len - 1) and table.dtype == torch.float32
            offsets = torch.arange(key_len)[None, :] - torch.arange(query_len)[:, None]
            stock = attention.compute_bias(query_len, key_len)[0].to(dtype).float()
            assert torch.equal(table[:, offsets + query_len - 1], stock)
            at = {d: table[:, d + query_len - 1] for d in (-max_distance, max_distance)}
            far_left, far_right = table[:, : query_len - max_distance], table[:, query_len - 1 + max_distance:]
            assert torch.equal(far_left, at[-max_distance][:, None].expand_as(far_left))
            assert torch.equal(far_right, at[max_distance][:, None].expand_as(far_right))


def test_dispatch_first_match(monkeypatch):
    from sumtune.errors import SumtuneError

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert attention_lib.choose_backend("auto", cpu, torch.bfloat16, 64, None) == "sdpa"
    assert attention_lib.choose_backend("sdpa", cuda, torch.bfloat16, 64, None) == "sdpa"
    assert attention_lib.triton_blocker(cuda, torch.bfloat16, 128, None) == (None if HAS_TRITON else
                                                                              "triton is not installed")
    assert "float32" in attention_lib.triton_blocker(cuda, torch.float32, 64, None)
    assert "head_dim" in attention_lib.triton_blocker(cuda, torch.bfloat16, 80, None)
    assert "CUDA" in attention_lib.triton_blocker(cpu, torch.bfloat16, 64, None)
    with pytest.raises(SumtuneError, match="CUDA"):
        attention_lib.choose_backend("triton", cpu, torch.bfloat16, 64, None)
    with pytest.raises(SumtuneError, match="one of auto, triton, sdpa"):
        attention_lib.choose_backend("flash", cuda, torch.bfloat16, 64, None)


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
def test_dispatch_keeps_sdpa_for_a_trainable_bias():
    from transformers import T5Config
    from transformers.models.t5.modeling_t5 import T5Attention

    attention = T5Attention(T5Config(d_model=32, d_kv=8, num_heads=4), has_relative_attention_bias=True)
    cuda = torch.device("cuda")
    assert "trainable" in attention_lib.triton_blocker(cuda, torch.bfloat16, 64, attention)
    with torch.no_grad():  # no gradient asked for: the frozen-table kernels are exact
        assert attention_lib.triton_blocker(cuda, torch.bfloat16, 64, attention) is None
    attention.requires_grad_(False)  # QLoRA freezes it
    assert attention_lib.choose_backend("auto", cuda, torch.bfloat16, 64, attention) == "triton"


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


def test_custom_op_registration_passes_opcheck(fa):
    """Schema, fake tensors and autograd registration as torch.compile relies on (torch.library.opcheck)."""
    q, k, v = make_qkv(2, 2, 20, 20, 16, torch.float32)
    padding = fa.key_padding(padding_mask(2, 20))
    table = fa.bias_table_log2(t5_like_table(2, 20, 20, 4))
    op = torch.ops.sumtune.t5_flash_attention.default
    torch.library.opcheck(op, (q, k, v, table, 4, *padding, False, 1.0, 0.0, 16, True, True),
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


def test_compiled_graph_keeps_the_custom_ops_and_their_dropout(fa):
    """torch.compile (dynamo + AOTAutograd, eager kernels) traces the fast path's call with its FlashInputs in one
    graph, and the compiled backward regenerates the forward's dropout mask: bit-identical to eager at one seed."""
    q, k, v = make_qkv(2, 2, 24, 24, 16, torch.float32)
    inputs = attention_lib.FlashInputs(fa.bias_table_log2(t5_like_table(2, 24, 24, 4)), 4,
                                       fa.key_padding(padding_mask(2, 24)), False)

    def loss(q, k, v, inputs):
        return attention_lib.flash_attend(q, k, v, inputs, dropout_p=0.2).square().sum()

    compiled = torch.compile(loss, backend="aot_eager", fullgraph=True)
    results = []
    for fn in (loss, compiled):
        torch.manual_seed(1)
        value = fn(q, k, v, inputs)
        results.append((value, torch.autograd.grad(value, (q, k, v))))
    (eager, eager_grads), (traced, traced_grads) = results
    assert torch.equal(eager, traced)
    assert all(torch.equal(a, b) for a, b in zip(eager_grads, traced_grads))


# ----------------------------------------------------------------------------- the fast T5 stack on this route
@pytest.mark.slow
def test_fast_t5_on_the_triton_route_matches_stock(fa):
    """Tiny QLoRA T5 (padded source and target, position biases of a few units as trained T5s have) through
    enable_fast_t5(attention_backend="triton") in the interpreter: loss as stock, padding exact, LoRA gradients
    near a float32 recomputation. This checks the wiring (which table, masks, causality, cross-attention inputs);
    the kernels' arithmetic is pinned to ~1e-6 above.

    The bar is 3x stock's distance from float32: measured 1.8x (all gradients as one vector; 0.96x for the worst
    tensor), because the kernels round P and dS to bf16 before their GEMMs as GPU flash kernels do and CPU SDPA
    does not (the GPU test holds them to 1.1x of stock's GPU kernels). Mis-wiring is far above it: a mirrored bias
    table measured 47x, no causal mask 40x."""
    from test_fast_t5 import LOSS_RTOL, TINY, VOCAB, build_qlora_t5, loss_and_lora_grads, padded_batch

    from sumtune.fast_t5 import disable_fast_t5, enable_fast_t5
    from sumtune.fast_t5.numerics import fp32_reference_grads, relative_errors, vector_relative_error

    model = build_qlora_t5(dict(TINY, num_layers=1, num_decoder_layers=1), seed=11)  # the interpreter is slow
    with torch.no_grad():
        for stack in (model.base_model.model.encoder, model.base_model.model.decoder):
            stack.block[0].layer[0].SelfAttention.relative_attention_bias.weight.normal_(0.0, 2.0)
    batch = padded_batch(3, 24, 10, VOCAB, seed=12)
    decoder_ids = model.base_model.model._shift_right(batch["labels"])
    decoder_mask = torch.ones_like(decoder_ids)
    decoder_mask[:, 1:] = (batch["labels"][:, :-1] != -100).long()
    batch = dict(batch, decoder_input_ids=decoder_ids, decoder_attention_mask=decoder_mask)
    stock_loss, stock_grads = loss_and_lora_grads(model, batch)
    enable_fast_t5(model, attention_backend="triton")
    try:
        loss, grads = loss_and_lora_grads(model, batch)
        garbage = dict(batch, input_ids=batch["input_ids"].masked_fill(batch["attention_mask"] == 0, 7),
                       decoder_input_ids=decoder_ids.masked_fill(decoder_mask == 0, 9))
        with torch.no_grad():
            garbage_loss = model(**garbage).loss
            clean_loss = model(**batch).loss
    finally:
        disable_fast_t5(model)
    assert abs(float(loss - stock_loss)) <= LOSS_RTOL * abs(float(stock_loss))
    assert torch.equal(clean_loss, garbage_loss)  # padded source and target tokens change nothing
    _, fp32_grads = fp32_reference_grads(model, batch)
    ours, stock = relative_errors(grads, fp32_grads), relative_errors(stock_grads, fp32_grads)
    assert max(ours.values()) <= 3 * max(stock.values())
    assert vector_relative_error(grads, fp32_grads) <= 3 * vector_relative_error(stock_grads, fp32_grads)


# ----------------------------------------------------------------------------- GPU (compiled kernels)
@pytest.fixture()
def compiled_fa():
    if _interpreting():
        pytest.skip("TRITON_INTERPRET=1: the GPU tests need the compiled kernels")
    from sumtune.fast_t5 import flash_attention

    return flash_attention


def sdpa_dense(q, k, v, table, mask, causal, dropout_p=0.0):
    """Stock's way: materialised bias with masks folded in as finfo.min, through SDPA."""
    query_len, key_len = q.shape[2], k.shape[2]
    offsets = torch.arange(key_len, device=q.device)[None, :] - torch.arange(query_len, device=q.device)[:, None]
    bias = table.to(q.dtype)[:, offsets + query_len - 1][None]
    keep = mask[:, None, None, :]
    if causal:
        keep = keep & torch.ones(query_len, key_len, dtype=torch.bool, device=q.device).tril()
    bias = torch.where(keep, bias, torch.finfo(q.dtype).min)
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=dropout_p, scale=1.0)


def first_configs(fa):
    """Pin each kernel's first autotune config: one compile per variant instead of the autotuner's ten."""
    return fa.block_sizes(**{name: configs[0] for name, configs in fa.AUTOTUNE_CONFIGS.items()})


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("head_dim,causal,dtype", [(64, False, torch.bfloat16), (128, False, torch.bfloat16),
                                                   (128, True, torch.bfloat16), (64, True, torch.float16)])
def test_gpu_kernels_no_further_from_float64_than_sdpa(compiled_fa, monkeypatch, head_dim, causal, dtype):
    """Compiled kernels vs float64, next to SDPA with the materialised bias (stock's way); with dropout, against
    float64 with the kernels' own mask. The backward with its dQ kernel (DS_GEMM off: the route above the buffer
    cap); the stored-dS route is the next test."""
    fa = compiled_fa
    monkeypatch.setattr(fa, "DS_GEMM", False)
    with first_configs(fa):
        _check_against_sdpa_and_float64(fa, head_dim, causal, dtype)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("pv_fp16,pv_split", [(True, True), (True, False), (False, True)],
                         ids=["both", "fp16", "split"])
@pytest.mark.parametrize("head_dim,causal", [(128, False), (64, True)])
def test_gpu_precise_pv_no_further_from_float64_than_sdpa(compiled_fa, monkeypatch, head_dim, causal, pv_fp16,
                                                          pv_split):
    """The same check with the forward's P·V in more precision (compiled): P in float16 plus its remainder, as by
    default from PRECISE_PV_MIN_KEYS keys, and each part alone."""
    fa = compiled_fa
    monkeypatch.setattr(fa, "PV_FP16", pv_fp16)
    monkeypatch.setattr(fa, "PV_SPLIT", pv_split)
    monkeypatch.setattr(fa, "PRECISE_PV_MIN_KEYS", 0)
    with first_configs(fa):
        _check_against_sdpa_and_float64(fa, head_dim, causal, torch.bfloat16)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("head_dim,causal,dtype", [(128, False, torch.bfloat16), (64, True, torch.float16)])
def test_gpu_dq_from_stored_ds_no_further_from_float64_than_sdpa(compiled_fa, monkeypatch, head_dim, causal, dtype):
    """The same check with DS_GEMM (the default): dQ from the dS the compiled dK/dV kernel stores, as cuBLAS GEMMs."""
    fa = compiled_fa
    monkeypatch.setattr(fa, "DS_GEMM", True)
    with first_configs(fa):
        _check_against_sdpa_and_float64(fa, head_dim, causal, dtype)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("causal", [False, True], ids=["encoder", "decoder"])
def test_gpu_bias_band_changes_no_bit(compiled_fa, monkeypatch, causal):
    """The compiled kernels (first configs) with BIAS_BAND: the same results as the table's gathers (to within 1e-3:
    compiled variants may schedule their arithmetic apart; bit for bit on the CPU), through both dQ routes."""
    fa = compiled_fa
    blocks = {name: configs[0] for name, configs in fa.AUTOTUNE_CONFIGS.items()}
    results = _band_on_and_off(fa, monkeypatch, "cuda", torch.bfloat16, 300, 4, 128, 128, causal, blocks)
    for ds_gemm in (False, True):
        (out_off, grads_off), (out_on, grads_on) = results[False, ds_gemm], results[True, ds_gemm]
        errors = [relative_error(a, b) for a, b in zip((out_on, *grads_on), (out_off, *grads_off))]
        assert max(errors) <= 1e-3, errors


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] < 9,
                    reason="needs a GPU with TMA (Hopper or later)")
@pytest.mark.parametrize("causal,dropout_p,fused,blocks", [(False, 0.0, True, (128, 128, 8, 3)),
                                                           (False, 0.2, False, (128, 64, 8, 3)),
                                                           (True, 0.2, True, (64, 64, 4, 2))])
def test_gpu_forward_by_tma_descriptors_matches_pointer_loads(compiled_fa, monkeypatch, causal, dropout_p, fused,
                                                              blocks):
    """FWD_DESCRIPTORS compiled at its tiles (FWD_DESCRIPTOR_CONFIGS' first, others): the pointer loads' outputs and
    gradients to within 1e-3 (compiled variants may schedule their arithmetic apart), at 300 keys (not whole tiles),
    bf16, head_dim 128, with bias, padding with a hole, dropout, causal masking and the fused layout; the same for
    BWD_DESCRIPTORS at the dK/dV kernel's first tiles."""
    fa = compiled_fa
    results, used = _descriptor_runs(fa, monkeypatch, "cuda", torch.bfloat16, causal, dropout_p, fused, 300, 300,
                                     blocks=dict(fwd=blocks))
    (out_off, grads_off), (out_on, grads_on) = results[False], results[True]
    assert len(used) == 1 and used[0] is not None and used[0][0].block_shape == [blocks[1], 128]
    errors = [relative_error(a, b) for a, b in zip((out_on, *grads_on), (out_off, *grads_off))]
    assert max(errors) <= 1e-3, errors
    dkdv = fa.AUTOTUNE_CONFIGS["dkdv"][0]
    monkeypatch.setattr(fa, "FWD_DESCRIPTORS", False)
    results, used = _descriptor_runs(fa, monkeypatch, "cuda", torch.bfloat16, causal, dropout_p, fused, 300, 300,
                                     blocks=dict(dkdv=dkdv), flag="BWD_DESCRIPTORS")
    (out_off, grads_off), (out_on, grads_on) = results[False], results[True]
    assert len(used) == 1 and used[0] is not None and used[0][0].block_shape == [dkdv[0], 128]
    errors = [relative_error(a, b) for a, b in zip((out_on, *grads_on), (out_off, *grads_off))]
    assert max(errors) <= 1e-3, errors


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] < 9,
                    reason="needs a GPU with TMA (Hopper or later)")
@pytest.mark.parametrize("dropout_p,fused,blocks,tma", [(0.0, True, (128, 128, 8, 3), True),
                                                        (0.2, False, (128, 64, 8, 3), False),
                                                        (0.2, True, (64, 64, 4, 2), True)])
def test_gpu_lean_forward_matches_the_masked_loops(compiled_fa, monkeypatch, dropout_p, fused, blocks, tma):
    """LEAN_FORWARD compiled (pointer loads and TMA descriptors, with and without dropout): the masked loops'
    outputs and gradients to within 1e-3 (the scale and bias added in another order), at 300 keys (not whole tiles),
    bf16, head_dim 128, T5's bias (far and near tiles), a right-padded row and a row with a hole."""
    fa = compiled_fa
    monkeypatch.setattr(fa, "FWD_DESCRIPTORS", tma)
    results, _ = _descriptor_runs(fa, monkeypatch, "cuda", torch.bfloat16, False, dropout_p, fused, 300, 300,
                                  blocks=dict(fwd=blocks), flag="LEAN_FORWARD")
    (out_off, grads_off), (out_on, grads_on) = results[False], results[True]
    errors = [relative_error(a, b) for a, b in zip((out_on, *grads_on), (out_off, *grads_off))]
    assert max(errors) <= 1e-3, errors
    assert out_off.abs().max() > 0.1


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


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dropout_p,fused,config", [(0.0, True, 0), (0.2, False, 0), (0.2, True, 1)])
def test_gpu_lean_backward_as_close_to_float64_as_the_masked_loops(compiled_fa, monkeypatch, dropout_p, fused, config):
    """LEAN_BACKWARD compiled (the dK/dV kernel's first two tiles, with and without dropout), bf16, head_dim 128, 300
    queries (not whole tiles): outputs and gradients no further from float64 than the masked loops' (within 10%:
    compiled, both round differently), and without dropout within 1e-3 of theirs (the far tiles' scale, bias and
    log-sum-exp added in another order). On an H100 (2026-12-05) the dropout cases differ from the masked loops by
    ~3.3e-3, as in the interpreter: bf16's rounding of P before or after dropout's scale."""
    errors, apart = _lean_backward_errors(compiled_fa, monkeypatch, "cuda", torch.bfloat16, dropout_p, fused, 300,
                                          dict(dkdv=compiled_fa.AUTOTUNE_CONFIGS["dkdv"][config]))
    assert max(errors[False]) < 2e-2, errors
    for lean, masked in zip(errors[True], errors[False]):
        assert lean <= 1.1 * masked + 1e-4, errors
    if not dropout_p:
        assert max(apart) <= 1e-3, apart


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_mask_only_with_holes_changes_no_bit(compiled_fa, monkeypatch):
    """The compiled kernels (first configs) with MASK_ONLY_WITH_HOLES: the same results as reading the mask
    everywhere (to within 1e-3: the compiled variants may schedule their arithmetic apart; bit for bit on the CPU)."""
    fa = compiled_fa
    with first_configs(fa):
        results = _holes_on_and_off(fa, monkeypatch, "cuda", torch.bfloat16, 300, 4, 128, 128)
    for ds_gemm in (False, True):
        (out_off, grads_off), (out_on, grads_on) = results[False, ds_gemm, 1], results[True, ds_gemm, 1]
        assert all(relative_error(a, b) <= 1e-3 for a, b in zip((out_on, *grads_on), (out_off, *grads_off)))
    unflagged, _ = results[True, False, 0]
    assert torch.equal(unflagged[:2], out_on[:2]) and relative_error(unflagged[2], out_on[2]) > 1e-2


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("bits, pairs", [(8, False), (16, True), (16, False)])
def test_gpu_kernels_with_each_draw_scheme_match_float64_with_their_mask(compiled_fa, monkeypatch, bits, pairs):
    """`DROPOUT_DRAW_BITS = 8`, `DROPOUT_PAIRS` and neither, compiled for the GPU (each kernel's first autotune
    config): the same checks."""
    monkeypatch.setattr(compiled_fa, "DROPOUT_DRAW_BITS", bits)
    monkeypatch.setattr(compiled_fa, "DROPOUT_PAIRS", pairs)
    with first_configs(compiled_fa):
        _check_against_sdpa_and_float64(compiled_fa, 128, False, torch.bfloat16)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_wide_philox_products_draw_the_same_masks(compiled_fa, monkeypatch):
    """PHILOX_WIDE_MUL changes how the product is computed, not the draws: the compiled mask kernel gives the same
    mask with it on and off (and the CPU interpreter, which always multiplies twice, the same again)."""
    masks = {}
    monkeypatch.setattr(compiled_fa, "PHILOX_WIDE_MUL_MIN_KEYS", 0)  # these 260 keys too (shipped: from 2048)
    for wide in (True, False):
        monkeypatch.setattr(compiled_fa, "PHILOX_WIDE_MUL", wide)
        masks[wide] = compiled_fa.dropout_keep_mask(77, 2, 4, 300, 260, 0.1, device="cuda")
    assert torch.equal(masks[True], masks[False]) and 0.85 < masks[True].float().mean().item() < 0.95


def _check_against_sdpa_and_float64(fa, head_dim, causal, dtype):
    q, k, v = make_qkv(4, 8, 1000, 1000, head_dim, dtype, device="cuda")
    table = t5_like_table(8, 1000, 1000, 128, device="cuda").to(dtype).float()
    mask = padding_mask(4, 1000, device="cuda")
    grad_out = torch.randn(q.shape, device="cuda", dtype=dtype)
    ours = run_with_grads(lambda *t: fa.flash_t5_attention(*t, table, mask, causal, bias_radius=128), q, k, v,
                          grad_out)
    sdpa = run_with_grads(lambda *t: sdpa_dense(*t, table, mask, causal), q, k, v, grad_out)
    reference = run_with_grads(lambda *t: fa.reference_t5_attention(*t, table, mask, causal), q, k, v, grad_out)
    for name, a, b, r in zip(("out", "dq", "dk", "dv"), (ours[0], *ours[1]), (sdpa[0], *sdpa[1]),
                             (reference[0], *reference[1])):
        assert torch.isfinite(a).all(), name
        assert relative_error(a, r) <= 1.5 * relative_error(b, r) + 1e-3, name
    seed = seed_of_next_call(fa, 5, device="cuda")
    keep = fa.dropout_keep_mask(seed, 4, 8, 1000, 1000, 0.1, device="cuda")
    dropped = run_with_grads(lambda *t: fa.flash_t5_attention(*t, table, mask, causal, dropout_p=0.1,
                                                              bias_radius=128), q, k, v, grad_out)
    expected = run_with_grads(lambda *t: fa.reference_t5_attention(*t, table, mask, causal, keep_mask=keep,
                                                                   keep_scale=fa.dropout_scale(0.1)), q, k, v,
                              grad_out)
    for a, r in zip((dropped[0], *dropped[1]), (expected[0], *expected[1])):
        assert relative_error(a, r) <= HALF_RTOL[dtype]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_t5_3b_widths_triton_route_no_further_from_fp32_than_stock(compiled_fa):
    from test_fast_t5 import (GRAD_RTOL, LOSS_RTOL, assert_fast_no_further_from_fp32_than_stock, build_qlora_t5,
                              loss_and_lora_grads, padded_batch)

    from sumtune.fast_t5 import disable_fast_t5, enable_fast_t5
    from sumtune.fast_t5.numerics import vector_relative_error

    config = dict(d_model=1024, d_ff=16384, d_kv=128, num_heads=32, num_layers=2, num_decoder_layers=2,
                  vocab_size=32128, relative_attention_num_buckets=32)
    model = build_qlora_t5(config, device="cuda")
    batch = padded_batch(4, 1024, 128, 32128, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16), first_configs(compiled_fa):
        stock_loss, stock_grads = loss_and_lora_grads(model, batch)
        enable_fast_t5(model, attention_backend="triton")
        loss, grads = loss_and_lora_grads(model, batch)
    disable_fast_t5(model)
    assert abs(float(loss - stock_loss)) <= LOSS_RTOL * abs(float(stock_loss))
    assert vector_relative_error(grads, stock_grads) <= GRAD_RTOL
    assert_fast_no_further_from_fp32_than_stock(model, batch, stock_grads, grads)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_compiled_graph_keeps_the_kernels_and_their_dropout(compiled_fa):
    """torch.compile(fullgraph) keeps the custom ops (autotuned here), and the backward regenerates the forward's
    dropout mask: compiled and eager agree at the same torch seed."""
    fa = compiled_fa
    q, k, v = make_qkv(2, 4, 300, 300, 64, torch.bfloat16, device="cuda")
    table = t5_like_table(4, 300, 300, 128, device="cuda")
    mask = padding_mask(2, 300, device="cuda")

    def attend(q, k, v):
        return fa.flash_t5_attention(q, k, v, table, mask, dropout_p=0.1, bias_radius=128).float().square().sum()

    compiled = torch.compile(attend, fullgraph=True)
    torch.manual_seed(1)
    eager_loss = attend(q, k, v)
    eager_grads = torch.autograd.grad(eager_loss, (q, k, v))
    torch.manual_seed(1)
    compiled_loss = compiled(q, k, v)
    compiled_grads = torch.autograd.grad(compiled_loss, (q, k, v))
    assert torch.allclose(compiled_loss, eager_loss, rtol=1e-3)
    assert all(relative_error(a, b) < 1e-2 for a, b in zip(compiled_grads, eager_grads))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_cuda_graph_replays_draw_a_new_mask_each_time(compiled_fa):
    """Captured in a CUDA graph (as sumtune's cuda_graphs step is), each replay draws a new seed on the device, and
    the replayed kernels apply exactly the mask of that seed."""
    fa = compiled_fa
    q, k, v = make_qkv(2, 4, 300, 300, 64, torch.bfloat16, device="cuda")
    table = t5_like_table(4, 300, 300, 128, device="cuda")
    padding = fa.key_padding(padding_mask(2, 300, device="cuda"))
    # the draw scheme as flash_t5_attention passes it
    args = (q.detach(), k.detach(), v.detach(), fa.bias_table_log2(table), 128, *padding, False, 1.0, 0.3,
            fa._draw_bits(), fa._pairs(), True)
    op = torch.ops.sumtune.t5_flash_attention.default
    with first_configs(fa):
        op(*args)  # compile outside the capture
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out, _, seed = op(*args)
    replays = []
    for _ in range(2):
        graph.replay()
        torch.cuda.synchronize()
        replays.append((out.clone(), seed.clone()))
    (first, first_seed), (second, second_seed) = replays
    assert not torch.equal(first_seed, second_seed) and not torch.equal(first, second)
    for result, result_seed in replays:
        keep = fa.dropout_keep_mask(result_seed, 2, 4, 300, 300, 0.3, device="cuda")
        expected = fa.reference_t5_attention(q, k, v, table, padding.mask, keep_mask=keep,
                                             keep_scale=fa.dropout_scale(0.3))
        assert relative_error(result, expected) <= HALF_RTOL[torch.bfloat16]
