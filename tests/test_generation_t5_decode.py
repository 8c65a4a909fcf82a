"""sumtune.generation.t5_decode: the decoder's self-attention in the fused kernel (FUSED_SELF_ATTENTION), the cross-
attention slices of rows sorted longest first (cross_groups), its RMSNorm against T5LayerNorm and float64 (with
sumtune.fast_t5.modules' weight inside the fused kernel), and the attention mode "auto" picks. Greedy decoding checked
against transformers on the tiny random T5s of tests/_generation_helpers.py.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from _generation_helpers import EOS, MAX_NEW, PAD, START, agreement, assert_same_or_near_tie, fp32_tolerance, ours

from sumtune.generation.greedy import GreedySession
from sumtune.generation.t5_decode import DecoderWeights

pytestmark = pytest.mark.usefixtures("one_thread")


def test_fused_self_attention_matches_transformers_fp32(merged32, expected32, inputs, monkeypatch):
    """t5_decode.FUSED_SELF_ATTENTION (on a GPU only the Gluon kernel takes it; here the Triton kernel in the
    interpreter, which the routing names): the decoder's self-attention in the fused kernel, with the step's
    position bias, over the step + 1 positions written so far, gives transformers' tokens as the other modes do; the
    kernel really ran with a bias at every layer and step."""
    pytest.importorskip("triton")
    from sumtune.generation import cross_attention, t5_decode

    if cross_attention.kernel_available(torch.zeros(1, 64)) is not None:
        pytest.skip("the kernel cannot run here (no CUDA and Triton's interpreter is off)")
    monkeypatch.setattr(t5_decode, "FUSED_SELF_ATTENTION", True)
    calls = []
    fused = cross_attention.fused_hidden_attention
    monkeypatch.setattr(cross_attention, "fused_hidden_attention",
                        lambda *a, **k: calls.append(k.get("bias") is not None) or fused(*a, **k))
    got = ours(merged32, inputs, attention="fused", batch_size=5)
    layers = merged32.config.num_decoder_layers
    assert calls.count(True) == calls.count(False) >= layers  # one self- and one cross-attention a layer and step
    assert agreement(got, expected32) >= 0.9
    assert_same_or_near_tie(merged32, inputs, got, expected32, fp32_tolerance)
    weights = DecoderWeights.from_model(merged32)
    assert t5_decode.new_state(weights, 2, 6, 4, "fused", torch.device("cpu")).self_kernel == "triton"
    assert t5_decode.new_state(weights, 2, 6, 4, "hidden", torch.device("cpu")).self_kernel is None
    monkeypatch.setattr(t5_decode, "FUSED_SELF_ATTENTION", False)
    assert t5_decode.new_state(weights, 2, 6, 4, "fused", torch.device("cpu")).self_kernel is None


def test_cross_groups_slice_sorted_rows_by_their_own_longest_source():
    from sumtune.generation.t5_decode import cross_groups

    lengths = [4000, 3900, 2100, 2000, 900, 800, 300, 10]
    assert cross_groups(lengths, 4032, groups=4) == ((0, 2, 4032), (2, 4, 2304), (4, 6, 1024), (6, 8, 512))
    assert cross_groups(lengths, 4032, groups=3) == ((0, 3, 4032), (3, 6, 2048), (6, 8, 512))  # 3 rows, 3, 2
    # neighbours that round to the same length merge; slices only when they leave out >= 10% of the padded keys
    assert cross_groups([500, 490, 300, 260], 512, groups=4) == ((0, 4, 512),)
    assert cross_groups([512, 500, 480, 200], 512, groups=4) == ((0, 3, 512), (3, 4, 256))  # 12.5% left out
    assert cross_groups([512, 500, 480, 470, 460, 450, 440, 200], 512) == ((0, 8, 512),)  # 6.25%: not worth it
    assert cross_groups([512, 500, 100, 90], 512, groups=2, multiple=64) == ((0, 2, 512), (2, 4, 128))
    assert cross_groups([512] * 4, 512) == ((0, 4, 512),)
    with pytest.raises(ValueError, match="longest first"):
        cross_groups([10, 20], 64)


@pytest.mark.parametrize("attention", ["hidden", "kv"])
def test_cross_attention_slices_read_fewer_keys_and_decode_the_same(merged32, inputs, attention):
    """Rows sorted longest first, cut into slices that each read only their own longest source: the tokens are
    those of the whole-width decoder (padded keys have zero probability), up to fp32 near-ties."""
    from sumtune.generation.t5_decode import cross_groups

    batch = sorted(inputs, key=len, reverse=True)
    lengths = [len(row) for row in batch]
    longest = lengths[0]
    groups = cross_groups(lengths, longest, groups=4, multiple=8)
    assert len(groups) == 4 and sum((b - a) * k for a, b, k in groups) < 0.7 * len(batch) * longest
    ids = torch.tensor([row + [PAD] * (longest - len(row)) for row in batch])
    mask = (torch.arange(longest)[None, :] < torch.tensor(lengths)[:, None]).long()
    with torch.no_grad():
        encoder_out = merged32.encoder(input_ids=ids, attention_mask=mask).last_hidden_state
    results = {}
    for sliced in (None, groups):
        session = GreedySession(DecoderWeights.from_model(merged32), batch=len(batch), src_len=longest,
                                max_new_tokens=MAX_NEW, attention=attention, pad_token_id=PAD, eos_token_id=EOS,
                                use_cuda_graphs=False, cross_groups=sliced)
        with torch.no_grad():
            results[sliced] = session.run(encoder_out, mask, decoder_start_token_id=START)
    assert agreement(results[groups], results[None]) >= 0.9
    assert_same_or_near_tie(merged32, batch, results[groups], results[None], fp32_tolerance)


def test_cross_attention_slices_must_tile_the_batch(merged32):
    from sumtune.generation.t5_decode import new_state

    weights = DecoderWeights.from_model(merged32)
    for bad in (((0, 2, 64), (3, 4, 32)), ((0, 4, 65),), ((0, 3, 64),)):
        with pytest.raises(ValueError, match="do not tile"):
            new_state(weights, 4, 64, 8, "hidden", torch.device("cpu"), bad)


def test_rms_norm_with_the_weight_in_the_kernel_is_one_rounding_from_float64():
    """modules.RMS_NORM_WEIGHT_IN_KERNEL (on by default): the weight's multiply inside torch's fused RMSNorm, in
    fp32, one rounding to bf16 instead of stock T5LayerNorm's two. Every element is within half a bf16 step of the
    float64 result (stock's second rounding takes some further), on average closer than stock, and within two steps
    of stock; an fp32 residual stream (hidden states in fp32, bf16 weight) gives the same; its gradient is float64's."""
    from transformers.models.t5.modeling_t5 import T5LayerNorm

    from sumtune.fast_t5 import modules

    gen = torch.Generator().manual_seed(12)
    norm = T5LayerNorm(1024, eps=1e-6).to(torch.bfloat16)
    norm.weight.data = (1 + torch.randn(1024, generator=gen) / 4).bfloat16()
    h = (torch.randn(512, 1024, generator=gen) * 3).bfloat16()
    h64, w64 = h.double(), norm.weight.double()
    exact = h64 * torch.rsqrt(h64.pow(2).mean(-1, keepdim=True) + 1e-6) * w64
    stock = norm(h)
    assert modules.RMS_NORM_WEIGHT_IN_KERNEL  # on as shipped
    for hidden in (h, h.float()):
        fused = modules.half_rms_norm(hidden, norm.weight, 1e-6)
        assert fused.dtype == torch.bfloat16
        error, stock_error = (fused.double() - exact).abs(), (stock.double() - exact).abs()
        assert (error <= exact.abs() * 2.0**-8 * 1.01 + 1e-30).all()  # half a bf16 step: rounded once
        assert error.mean() < stock_error.mean() and (stock_error > exact.abs() * 2.0**-8 * 1.01).any()
        assert ((fused.float() - stock.float()).abs() <= stock.float().abs() * 2.0**-6 + 1e-30).all()
    # training: its gradient (torch's fused backward) is the float64 one to bf16's precision
    upstream = torch.randn(512, 1024, generator=gen)
    x = h.float().requires_grad_(True)
    (modules.half_rms_norm(x, norm.weight, 1e-6).float() * upstream).sum().backward()
    x64 = h64.clone().requires_grad_(True)
    ((x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + 1e-6) * w64) * upstream.double()).sum().backward()
    assert (x.grad.double() - x64.grad).abs().max() <= 1e-2 * x64.grad.abs().max()


def test_fused_rms_norm_matches_t5_layer_norm_to_a_rounding(monkeypatch):
    """Without FUSED_RMS_NORM, t5_decode.rms_norm is transformers' T5LayerNorm bit for bit; with it (torch's fused
    kernel, its mean summed in another order) a bf16 output differs from it by at most one rounding: in few elements
    with the weight's multiply after the kernel as stock's, in more with it inside (modules.RMS_NORM_WEIGHT_IN_KERNEL,
    the default: one rounding instead of two); an fp32 weight keeps the ops."""
    from transformers.models.t5.modeling_t5 import T5LayerNorm

    from sumtune.fast_t5 import modules
    from sumtune.generation import t5_decode

    gen = torch.Generator().manual_seed(11)
    norm = T5LayerNorm(1024, eps=1e-6).to(torch.bfloat16)
    norm.weight.data = (1 + torch.randn(1024, generator=gen) / 4).bfloat16()
    h = (torch.randn(256, 1024, generator=gen) * 3).bfloat16()
    stock = norm(h)
    monkeypatch.setattr(t5_decode, "FUSED_RMS_NORM", False)
    assert torch.equal(t5_decode.rms_norm(h, norm.weight, 1e-6), stock)
    monkeypatch.setattr(t5_decode, "FUSED_RMS_NORM", True)
    for weight_in_kernel, fewest, most in ((False, 0.0, 0.02), (True, 0.01, 0.5)):
        monkeypatch.setattr(modules, "RMS_NORM_WEIGHT_IN_KERNEL", weight_in_kernel)
        fused = t5_decode.rms_norm(h, norm.weight, 1e-6)
        assert fused.dtype == stock.dtype == torch.bfloat16
        apart = (fused.float() - stock.float()).abs()
        assert (apart <= stock.float().abs() * 2.0**-7 + 1e-30).all()  # within one bf16 rounding step
        assert fewest <= (apart > 0).float().mean() < most, weight_in_kernel
    norm.float()  # an fp32 weight (after peft's kbit preparation): the ops, stock's fp32 result
    assert torch.equal(t5_decode.rms_norm(h, norm.weight, 1e-6), norm(h))


def test_auto_attention_takes_the_fused_kernel_where_it_was_measured_faster_on_cuda_only(merged32, monkeypatch):
    """"auto": the fused cross-attention on CUDA, where its kernel runs, for batches that reach AUTO_FUSED_FROM
    (sources over 1024 tokens at any batch, 1024 from 256 rows: measured faster there), the two GEMMs ("hidden")
    for other batches, off CUDA, or without the kernel; "kv" where caching keys/values reads fewer bytes."""
    from types import SimpleNamespace

    from sumtune.generation import cross_attention, t5_decode

    assert t5_decode.AUTO_FUSED_FROM == ((1025, 1), (1024, 256))
    weights = DecoderWeights.from_model(merged32)
    assert weights.n_heads * weights.d_kv > weights.d_model
    on_cpu = dataclasses.replace(weights, embed=SimpleNamespace(is_cuda=False))
    on_cuda = dataclasses.replace(weights, embed=SimpleNamespace(is_cuda=True))
    monkeypatch.setattr(cross_attention, "kernel_available", lambda tensor: None)
    assert on_cpu.resolve_attention("auto", src_len=4096, rows=256) == "hidden"
    batches = [(1025, 1), (4096, 32), (1024, 256), (1024, 512), (1024, 255), (1024, 32), (512, 512)]
    assert [on_cuda.resolve_attention("auto", src_len=n, rows=b) for n, b in batches] == \
        ["fused", "fused", "fused", "fused", "hidden", "hidden", "hidden"]
    assert on_cuda.resolve_attention("auto", src_len=1024) == "hidden"  # one row
    assert on_cuda.resolve_attention("auto") == "hidden"
    monkeypatch.setattr(cross_attention, "kernel_available", lambda tensor: "triton is not installed")
    assert on_cuda.resolve_attention("auto", src_len=4096, rows=256) == "hidden"
    narrow = dataclasses.replace(on_cuda, d_model=weights.n_heads * weights.d_kv,
                                 embed=SimpleNamespace(is_cuda=True, dtype=torch.bfloat16, device="cuda:0"))
    monkeypatch.setattr(t5_decode, "free_gpu_bytes", lambda device: 2**50)  # every cache fits
    assert narrow.resolve_attention("auto", src_len=4096, rows=256) == "kv"


def test_auto_attention_leaves_the_kv_cache_where_it_would_not_fit_the_gpu(merged32, monkeypatch):
    """A model whose heads x d_kv equal its d_model (FLAN-T5-XL) keeps "kv" under "auto" where every layer's keys
    and values fit in KV_CACHE_SHARE_OF_FREE of the GPU's free memory, and takes "hidden" where they do not (FLAN-T5-XL
    at 4096 -> 512 ran out of memory at 128 rows in kv and ran in hidden); off CUDA, or with no source length to size
    by, "kv". At FLAN-T5-XL's shapes 64 rows x 4096 tokens cache 48 GiB, 128 rows 96: an 80 GB card with ~70 GiB
    free keeps kv at 64 rows only, as measured."""
    from types import SimpleNamespace

    from sumtune.generation import t5_decode

    weights = DecoderWeights.from_model(merged32)
    gpu = SimpleNamespace(is_cuda=True, dtype=torch.bfloat16, device="cuda:0")
    narrow = dataclasses.replace(weights, d_model=weights.n_heads * weights.d_kv, embed=gpu)
    need = narrow.kv_cache_bytes(4096, 128)
    assert need == 2 * len(weights.layers) * 128 * 4096 * weights.n_heads * weights.d_kv * 2
    monkeypatch.setattr(t5_decode, "free_gpu_bytes", lambda device: need / t5_decode.KV_CACHE_SHARE_OF_FREE)
    assert narrow.resolve_attention("auto", src_len=4096, rows=128) == "kv"
    assert narrow.resolve_attention("auto", src_len=4096, rows=129) == "hidden"
    assert narrow.resolve_attention("auto", src_len=4097, rows=128) == "hidden"
    assert narrow.resolve_attention("auto") == "kv"  # nothing to size the caches by
    assert narrow.resolve_attention("kv", src_len=4096, rows=129) == "kv"  # asked for: as asked
    on_cpu = dataclasses.replace(narrow, embed=SimpleNamespace(is_cuda=False, dtype=torch.bfloat16))
    assert on_cpu.resolve_attention("auto", src_len=4096, rows=10**6) == "kv"
    flan_xl = dataclasses.replace(narrow, layers=[weights.layers[0]] * 24, n_heads=32, d_kv=64, d_model=2048)
    assert flan_xl.kv_cache_bytes(4096, 64) == 48 * 2**30
    monkeypatch.setattr(t5_decode, "free_gpu_bytes", lambda device: 70 * 2**30)
    assert [flan_xl.resolve_attention("auto", src_len=4096, rows=r) for r in (64, 128, 256)] == \
        ["kv", "hidden", "hidden"]
