"""sumtune.generation.gluon_decode: the Gluon decoding kernel (cross_attention.GLUON_KERNEL). On CPU: it builds for
sm_90 (a process without Triton's interpreter) with warpgroup MMAs and TMA loads, the routing takes only what it
covers, and a launch or import that fails hands over to the Triton kernel once. On a Hopper GPU (``-m gpu``): the
same maths as float64, for the cross-attention and the decoder's self-attention, and greedy tokens that track
transformers'. The warp-specialized kernel: tests/test_gluon_decode_ws.py.
"""

from __future__ import annotations

import sys

import pytest
import torch
from _generation_helpers import MAX_NEW, START, agreement, hf_generate, ours

from sumtune.generation import prepare_inference_model

pytestmark = pytest.mark.usefixtures("one_thread")


GLUON_DECODE_FOR_HOPPER = """
import json
from sumtune.fast_t5.flash_compile import resources
from sumtune.generation import gluon_decode
for split, slots, bias in ((False, 6, False), (True, 6, False), (False, 5, False), (False, 6, True)):
    compiled = gluon_decode.compile_for_sm90(d_model=1024, split=split, slots=slots, bias=bias)
    ptx = compiled.asm["ptx"]
    print(json.dumps(dict(split=split, slots=slots, bias=bias, wgmma=ptx.count("wgmma.mma_async"),
                          ldmatrix=ptx.count("ldmatrix"), bulk=ptx.count("cp.async.bulk.tensor"),
                          expected_shared=gluon_decode.shared_bytes(1024, slots), **resources(compiled))))
"""


def test_the_gluon_decode_kernel_builds_for_hopper_with_warpgroup_mmas(compiled_for_hopper):
    """cross_attention.GLUON_KERNEL's kernel (sumtune.generation.gluon_decode), compiled for sm_90 on the CPU at
    T5-3b's shapes: both products as warpgroup MMAs from shared memory (128 in the loop: 64 for the scores, 64 for
    the weighted sum; no ldmatrix), within Hopper's shared memory and as much of it as `shared_bytes` counts (at most
    1 KiB more: alignment), at most a few hundred bytes of spill (none with Triton 3.6, the GPU image's; 16 bytes
    with 3.9), with and without key splits, with the shipped ring of six and the `gluon5` ring of five, and with the
    decoder self-attention's position bias (t5_decode.FUSED_SELF_ATTENTION); the chunks
    by TMA (four 64-wide boxes a chunk at SLOTS + 4 issue sites: the prologue's and the loop's four refills). Gluon
    has no interpreter: the GPU test checks its values."""
    pytest.importorskip("triton.experimental.gluon")
    from sumtune.fast_t5.flash_compile import HOPPER_SHARED_BYTES

    rows, stderr = compiled_for_hopper(GLUON_DECODE_FOR_HOPPER)
    assert len(rows) == 4, stderr
    for row in rows:
        assert row["wgmma"] == 128 and row["ldmatrix"] == 0, row
        assert row["shared_bytes"] <= HOPPER_SHARED_BYTES and row["spill_bytes"] <= 256, row  # 3.6: 0, 3.9: 16
        assert 0 <= row["shared_bytes"] - row["expected_shared"] <= 1024, row
        assert row["bulk"] == 4 * (row["slots"] + 4) and row["async_copies"] == 0, row


def test_the_gluon_decode_kernel_runs_only_where_asked_and_able(monkeypatch):
    """GLUON_KERNEL on (shipped since it was measured faster): only on a CUDA Hopper, in bf16, at shapes it covers,
    for sources over 1024 tokens in dense states (the launches it was measured on); never when off."""
    from sumtune.generation import cross_attention, gluon_decode

    assert cross_attention.GLUON_KERNEL and cross_attention.GLUON_FROM_KEYS == 1025
    memory = torch.zeros(1, 4, 1024, dtype=torch.bfloat16)
    assert cross_attention._gluon_kernel(memory) is None  # on, but not on a GPU
    monkeypatch.setattr(cross_attention, "GLUON_KERNEL", False)
    assert cross_attention._gluon_kernel(memory) is None  # off
    assert gluon_decode.dense(torch.zeros(2, 8, 64)) and not gluon_decode.dense(torch.zeros(2, 8, 64)[:, :4])
    # the launches it takes on a Hopper GPU (the shape rules, without one): sources over 1024 tokens, dense states
    # (its TMA descriptor), a d_model it covers; 16 heads a program
    takes = cross_attention.gluon_heads_per_program
    assert takes(gluon_decode, 4096, True, 1024) == 16 and takes(gluon_decode, 1025, True, 1024) == 16
    assert takes(gluon_decode, 1024, True, 1024) is None  # 1024/128: not measured, the Triton kernel
    assert takes(gluon_decode, 4096, False, 1024) is None  # strided: the Triton kernel
    assert takes(gluon_decode, 4096, True, 2048) is None  # FLAN-T5-XL's d_model: four chunks of 512 too wide
    assert takes(gluon_decode, 4096, True, 512) == 16
    # the decoder's self-attention (FUSED_SELF_ATTENTION) at any length, dense states only
    assert takes(gluon_decode, 16, True, 1024, True) == 16 and takes(gluon_decode, 512, False, 1024, True) is None
    assert gluon_decode.supported(1024) is None and gluon_decode.supported(512) is None
    assert "d_model 48" in gluon_decode.supported(48)
    assert gluon_decode.load_threads_along_d(1024) == 32 and gluon_decode.load_threads_along_d(512) == 16
    assert gluon_decode.shared_bytes(1024, 6) == 2 * (16 * 1024 + 6 * 64 * 256 + 64 * 16) + 48
    dense = torch.zeros(2, 128, 1024, dtype=torch.bfloat16)
    descriptor = gluon_decode._states_descriptor(dense)  # TMA: dense states as [B * L, D] in 64 x 64 boxes
    assert descriptor.shape == [256, 1024] and descriptor.block_shape == [64, 64]
    assert gluon_decode._states_descriptor(torch.zeros(4, 128, 1024, dtype=torch.bfloat16)[::2]) is None  # strided


def test_a_gluon_kernel_that_fails_to_launch_hands_over_to_the_triton_kernel_once(monkeypatch):
    """If the Gluon launch raises (a Triton release whose Gluon API moved), one warning names the error, the Triton
    kernel computes that call and every later one, and the Gluon kernel is not tried again; likewise if its module
    cannot be imported."""
    pytest.importorskip("triton")
    from types import SimpleNamespace

    from sumtune.generation import cross_attention

    memory = torch.randn(2, 40, 32, generator=torch.Generator().manual_seed(5))
    if cross_attention.kernel_available(memory) is not None:
        pytest.skip("the Triton kernel cannot run here (no CUDA and Triton's interpreter is off)")
    tries = []

    def broken_launch(*args):
        tries.append(args)
        raise TypeError("async_copy_global_to_shared() got an unexpected keyword argument")

    broken = SimpleNamespace(BLOCK_N=64, launch=broken_launch)
    monkeypatch.setattr(cross_attention, "gluon_failure", None)
    monkeypatch.setattr(cross_attention, "_gluon_kernel",
                        lambda memory, self_attention=False, heads=0: None if cross_attention.gluon_failure
                        else (broken, 16))
    q_mem = torch.randn(2, 4, 32, generator=torch.Generator().manual_seed(6))
    lengths = torch.tensor([40, 17], dtype=torch.int32)
    expected = cross_attention.reference_hidden_attention(q_mem, memory, lengths)
    with pytest.warns(RuntimeWarning, match="Gluon decoding kernel cannot run here .TypeError: async_copy"):
        got = cross_attention.fused_hidden_attention(q_mem, memory, lengths)
    assert (got.double() - expected).abs().max().item() < 1e-5
    assert cross_attention.gluon_failure.startswith("TypeError: async_copy_global_to_shared()")
    again = cross_attention.fused_hidden_attention(q_mem, memory, lengths)
    assert torch.equal(again, got) and len(tries) == 1
    # a Triton that cannot import the Gluon module at all: the same hand-over
    monkeypatch.setattr(cross_attention, "gluon_failure", None)
    import sumtune.generation

    monkeypatch.delattr(sumtune.generation, "gluon_decode", raising=False)
    monkeypatch.setitem(sys.modules, "sumtune.generation.gluon_decode", None)  # import raises ImportError
    with pytest.warns(RuntimeWarning, match="Gluon decoding kernel cannot run here .ModuleNotFoundError"):
        assert cross_attention._gluon_module() is None
    assert cross_attention.gluon_failure.startswith("ModuleNotFoundError")
    # the warp-specialized kernel failing hands over to gluon_decode (here: the Triton kernel stands in for it) and
    # leaves gluon_decode on
    monkeypatch.setattr(cross_attention, "gluon_failure", None)
    monkeypatch.setattr(cross_attention, "ws_failure", None)
    broken_ws = SimpleNamespace(WARP_SPECIALIZED=True, BLOCK_N=64, launch=broken_launch)
    monkeypatch.setattr(cross_attention, "_gluon_kernel",
                        lambda memory, self_attention=False, heads=0: None if cross_attention.ws_failure
                        else (broken_ws, 32))
    with pytest.warns(RuntimeWarning, match="warp-specialized Gluon decoding kernel cannot run here .TypeError"):
        got = cross_attention.fused_hidden_attention(q_mem, memory, lengths)
    assert (got.double() - expected).abs().max().item() < 1e-5 and len(tries) == 2
    assert cross_attention.ws_failure.startswith("TypeError") and cross_attention.gluon_failure is None


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] != 9,
                    reason="needs a Hopper GPU")
def test_gpu_gluon_decode_kernel_matches_float64(monkeypatch):
    """GLUON_KERNEL on a Hopper GPU, bf16: the same maths as the float64 masked softmax (as the Triton kernel's test
    demands), with key splits, rows of lengths that are not whole tiles (one empty), the ring of six and of five, 32
    heads and 20 (a partly empty program), at d_model 1024 and 512; it is the Gluon kernel that ran on dense states,
    and the Triton kernel where the shipped routing says so (strided states, sources under GLUON_FROM_KEYS)."""
    import itertools

    from sumtune.generation import cross_attention, gluon_decode

    monkeypatch.setattr(cross_attention, "GLUON_KERNEL", True)
    monkeypatch.setattr(cross_attention, "GLUON_WARP_SPECIALIZED", False)  # its own test: test_gluon_decode_ws.py
    monkeypatch.setattr(cross_attention, "GLUON_FROM_KEYS", 1)  # these 700 keys too
    launched = []
    launch = gluon_decode.launch
    monkeypatch.setattr(gluon_decode, "launch", lambda *a, **k: launched.append(a[0]) or launch(*a, **k))
    gen = torch.Generator().manual_seed(4)
    for d_model, heads in ((1024, 32), (1024, 20), (512, 32)):
        larger = torch.randn(6, 700, d_model, generator=gen)
        memory = larger[::2]
        # strided rows, as a slice of a larger buffer, made on the GPU (.cuda() of a strided CPU view is contiguous)
        strided = larger.cuda().bfloat16()[::2]
        assert not gluon_decode.dense(strided) and gluon_decode.dense(strided.contiguous())
        q_mem = torch.randn(3, heads, d_model, generator=gen) / d_model ** 0.5 * 4
        lengths = torch.tensor([700, 131, 0], dtype=torch.int32)
        expected = cross_attention.reference_hidden_attention(q_mem.bfloat16(), memory.bfloat16(), lengths)
        for slots, splits in itertools.product((6, 5), (1, 3)):
            monkeypatch.setattr(gluon_decode, "SLOTS", slots)
            got = cross_attention.fused_hidden_attention(q_mem.cuda().bfloat16(), strided.contiguous(),
                                                         lengths.cuda(), splits=splits).cpu()
            error = (got.double() - expected).abs().max().item()
            assert error < 3e-2, (d_model, heads, slots, splits)
            heads_first = q_mem.cuda().bfloat16().transpose(0, 1).contiguous().transpose(0, 1)  # as t5_decode's
            again = cross_attention.fused_hidden_attention(heads_first, strided.contiguous(), lengths.cuda(),
                                                           splits=splits).cpu()
            assert torch.equal(again, got), (d_model, heads, slots, splits)
            assert not got[2].any()  # no keys: zeros, not NaN
    assert cross_attention.gluon_failure is None  # every launch was the Gluon kernel's own (no hand-over)
    assert len(launched) == 24 and {grid[0] for grid in launched} == {2}  # two programs of 16 heads a row
    # as shipped: strided states, and dense ones shorter than GLUON_FROM_KEYS, go to the Triton kernel
    monkeypatch.setattr(gluon_decode, "SLOTS", 6)
    for from_keys, states in ((1, strided), (701, strided.contiguous())):
        monkeypatch.setattr(cross_attention, "GLUON_FROM_KEYS", from_keys)
        got = cross_attention.fused_hidden_attention(q_mem.cuda().bfloat16(), states, lengths.cuda()).cpu()
        assert (got.double() - expected).abs().max().item() < 3e-2
    assert len(launched) == 24


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] != 9,
                    reason="needs a Hopper GPU")
def test_gpu_gluon_self_attention_matches_float64_and_keeps_the_tokens(monkeypatch, inputs):
    """t5_decode.FUSED_SELF_ATTENTION's Gluon launches (a position bias a head, lengths broadcast) on a Hopper GPU,
    bf16: the same maths as the float64 reference at lengths inside, at and across 64-key tiles, with key splits,
    at d_model 1024 and 512; then whole greedy generation (CUDA graphs) with a random T5 of d_model 512 (the tests'
    tiny one is too narrow for the kernel): the Gluon kernel takes every self-attention, and the tokens track
    transformers' float32 ones as well as the two GEMMs' do (one sequence of slack)."""
    from transformers import T5Config, T5ForConditionalGeneration

    from sumtune.generation import cross_attention, gluon_decode, t5_decode

    launched = []
    launch = gluon_decode.launch
    monkeypatch.setattr(gluon_decode, "launch",
                        lambda *a, **k: launched.append(len(a) > 12 and a[12] is not None) or launch(*a, **k))
    gen = torch.Generator().manual_seed(9)
    for d_model, heads in ((1024, 32), (512, 32)):
        memory = torch.randn(3, 512, d_model, generator=gen)  # the decoder's [B, T, D] buffer
        q_mem = torch.randn(3, heads, d_model, generator=gen) / d_model ** 0.5 * 4
        bias = torch.randn(heads, 512, generator=gen) * 3
        bias[:, 300:] = torch.finfo(torch.bfloat16).min
        for written in (1, 63, 64, 65, 300):
            lengths = torch.tensor([written], dtype=torch.int32).expand(3)
            expected = cross_attention.reference_hidden_attention(q_mem.bfloat16(), memory.bfloat16(), lengths,
                                                                  bias=bias.bfloat16())
            for splits in (1, 3):
                got = cross_attention.fused_hidden_attention(
                    q_mem.cuda().bfloat16(), memory.cuda().bfloat16(), lengths.cuda(), splits=splits,
                    bias=bias.cuda().bfloat16()).cpu()
                assert (got.double() - expected).abs().max().item() < 3e-2, (d_model, written, splits)
    assert cross_attention.gluon_failure is None and len(launched) == 20 and all(launched)
    assert cross_attention.self_attention_kernel(memory.cuda().bfloat16()) == "gluon"

    torch.manual_seed(0)
    config = T5Config(d_model=512, d_ff=1024, d_kv=64, num_heads=8, num_layers=2, num_decoder_layers=2,
                      vocab_size=32128, feed_forward_proj="relu", dropout_rate=0.0, initializer_factor=2.0,
                      decoder_start_token_id=START)
    model32 = prepare_inference_model(T5ForConditionalGeneration(config), torch.float32).cuda()
    expected32 = hf_generate(model32, inputs, max_new_tokens=MAX_NEW)
    model = prepare_inference_model(model32, torch.bfloat16)
    gemms = ours(model, inputs, batch_size=8, attention="fused")
    launched.clear()
    monkeypatch.setattr(t5_decode, "FUSED_SELF_ATTENTION", True)
    fused_self = ours(model, inputs, batch_size=8, attention="fused")
    assert launched.count(True) >= 2 * config.num_decoder_layers  # the self-attention's launches (captured once)
    assert agreement(fused_self, expected32) >= agreement(gemms, expected32) - 1 / len(inputs)
