"""sumtune.generation.greedy: sumtune's greedy T5 decoder against transformers' greedy `generate`, token for token up
to near-ties decided by rounding, in fp32 (each attention mode, relu and gated-gelu) and bf16, with min_new_tokens,
any batching and order, with and without the early stop; CUDA graphs against eager on a GPU (``-m gpu``). Tiny random
T5s in real NF4 with real PEFT LoRA, fed real BillSum text (tests/_generation_helpers.py, tests/conftest.py).
"""

from __future__ import annotations

import pytest
import torch
from _generation_helpers import (EOS, MAX_NEW, PAD, START, _logits, _make_eos_reachable, _quantized_peft, agreement,
                                 assert_same_or_near_tie, fp32_tolerance, hf_generate, ours)

from sumtune.generation import prepare_inference_model
from sumtune.generation.greedy import GreedySession
from sumtune.generation.t5_decode import DecoderWeights

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def peft_gated(tmp_path_factory, inputs):
    model = _quantized_peft(tmp_path_factory, "gated-gelu")
    _make_eos_reachable(model, inputs)
    return model


@pytest.mark.parametrize("attention", ["kv", "hidden", "fused"])
def test_greedy_matches_transformers_fp32(merged32, expected32, inputs, attention):
    expected = expected32
    got = ours(merged32, inputs, attention=attention, batch_size=5)
    ended = sum(row[-1] == EOS for row in expected)
    assert 0 < ended < len(expected), "test data should mix early-eos and full-length sequences"
    assert len({tuple(r) for r in expected}) > len(expected) // 2, "outputs should differ between inputs"
    assert agreement(got, expected) >= 0.9
    assert_same_or_near_tie(merged32, inputs, got, expected, fp32_tolerance)


def test_greedy_matches_transformers_fp32_gated_gelu(peft_gated, inputs):
    merged = prepare_inference_model(peft_gated, torch.float32)
    expected = hf_generate(merged, inputs, max_new_tokens=MAX_NEW)
    assert len({tuple(r) for r in expected}) > len(expected) // 2
    got = ours(merged, inputs, attention="hidden", batch_size=16)
    assert agreement(got, expected) >= 0.9
    assert_same_or_near_tie(merged, inputs, got, expected, fp32_tolerance)


@pytest.mark.parametrize("attention", ["kv", "hidden", "fused"])
def test_greedy_bf16_agrees_except_for_bf16_near_ties(peft_relu, merged32, expected32, inputs, attention):
    """bf16 on a sensitive random model: sequences may differ from transformers' bf16 output, but only where
    transformers' own bf16 logits for the two candidates are closer than bf16's rounding error at those two
    tokens (|bf16 - fp32 logits| of the same weights, counted for both runs), and ours must track the fp32
    result at least as well as transformers' bf16 run does (one sequence of slack)."""
    merged = prepare_inference_model(peft_relu, torch.bfloat16)
    expected = hf_generate(merged, inputs, max_new_tokens=MAX_NEW)
    got = ours(merged, inputs, batch_size=8, attention=attention)

    def bf16_rounding_error(source, prefix, logits, tokens):
        # bf16's error at the two candidates (|bf16 - fp32| of the same weights), once for each bf16 run: ours
        # and transformers' round differently, so their gap can flip by up to the sum.
        error = (logits - _logits(merged32, [source], prefix)[0, -1]).abs()
        return 2 * sum(error[t].item() for t in tokens)

    assert_same_or_near_tie(merged, inputs, got, expected, bf16_rounding_error)
    assert agreement(got, expected32) >= agreement(expected, expected32) - 1 / len(inputs)


def test_min_new_tokens_matches_transformers(merged32, inputs):
    expected = hf_generate(merged32, inputs, max_new_tokens=MAX_NEW, min_new_tokens=12)
    got = ours(merged32, inputs, min_new_tokens=12, batch_size=16)
    assert all(len(row) >= 12 for row in got)
    assert agreement(got, expected) >= 0.9
    assert_same_or_near_tie(merged32, inputs, got, expected, fp32_tolerance)


def test_batching_order_and_early_stop_do_not_change_results(merged32, expected32, inputs):
    """Batch composition changes fp32 rounding, so results may differ only at fp32 near-ties."""
    reference = ours(merged32, inputs, batch_size=16)
    assert_same_or_near_tie(merged32, inputs, ours(merged32, inputs, batch_size=1), reference, fp32_tolerance)
    permutation = [5, 0, 15, 3, 9, 1, 12, 7, 2, 14, 4, 11, 6, 13, 8, 10]
    permuted = ours(merged32, [inputs[i] for i in permutation], batch_size=3)
    expected_permuted = [reference[i] for i in permutation]
    assert agreement(permuted, expected_permuted) >= 0.9  # rows really come back in input order
    assert_same_or_near_tie(merged32, [inputs[i] for i in permutation], permuted, expected_permuted, fp32_tolerance)

    ended = [i for i, row in enumerate(reference) if row[-1] == EOS]
    batch = [inputs[i] for i in ended]
    longest = max(map(len, batch))
    ids = torch.tensor([row + [PAD] * (longest - len(row)) for row in batch])
    mask = (torch.arange(longest)[None, :] < torch.tensor([len(r) for r in batch])[:, None]).long()
    results = {}
    for stop in (True, False):
        session = GreedySession(DecoderWeights.from_model(merged32), batch=len(batch), src_len=longest,
                                max_new_tokens=MAX_NEW, attention="kv", pad_token_id=PAD, eos_token_id=EOS,
                                use_cuda_graphs=False, check_every_steps=2)
        with torch.no_grad():
            encoder_out = merged32.encoder(input_ids=ids, attention_mask=mask).last_hidden_state
            results[stop] = session.run(encoder_out, mask, decoder_start_token_id=START, stop_when_done=stop)
        steps_run = int(session.state.step)
        assert (steps_run < MAX_NEW) == stop  # the early stop really cut the loop short
    assert results[True] == results[False]  # same batch, same kernels: early stop alone changes nothing
    assert_same_or_near_tie(merged32, batch, results[True], [reference[i] for i in ended], fp32_tolerance)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_graphs_match_eager_on_gpu(peft_relu, inputs):
    model = prepare_inference_model(peft_relu, torch.bfloat16).to("cuda")
    for attention in ("kv", "hidden", "fused"):
        eager = ours(model, inputs, use_cuda_graphs=False, batch_size=8, pad_to_multiple_of=64, attention=attention)
        graphed = ours(model, inputs, use_cuda_graphs=True, batch_size=8, attention=attention)
        assert graphed == eager  # same shapes, same kernels, replayed from a graph
