"""sumtune.generation's entry points against transformers: prepare_inference_model (sumtune.generation.dense_copy:
the merged dense copy of the NF4 + LoRA training model) and generate_ids (sumtune.generation.decoding): the fast T5
encoder path, one greedy session reused per batch shape, beam search and the n-gram ban in transformers' `generate`
on sumtune's encoder output. Tiny random T5s in real NF4 with real PEFT LoRA, fed real BillSum text through the real
T5 tokenizer (tests/_generation_helpers.py, tests/conftest.py).
"""

from __future__ import annotations

import pytest
import torch
from _generation_helpers import MAX_NEW, _logits, _quantized_peft, hf_generate, ours, repeated_ngrams

from sumtune.errors import SumtuneError
from sumtune.generation import prepare_inference_model

pytestmark = pytest.mark.usefixtures("one_thread")


def test_merged_model_matches_peft_logits_and_leaves_training_model_alone(tmp_path_factory, inputs):
    peft_relu = _quantized_peft(tmp_path_factory, "relu", init_factor=1.0)
    before = {k: v.clone() for k, v in peft_relu.state_dict().items()}
    param_ids = [id(p) for p in peft_relu.parameters()]
    merged = prepare_inference_model(peft_relu, torch.float32)
    after = peft_relu.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert param_ids == [id(p) for p in peft_relu.parameters()]
    assert not any(p.data_ptr() == q.data_ptr() for p in merged.parameters() for q in peft_relu.parameters())

    reference = _logits(peft_relu, inputs)  # bf16 compute on the NF4 base + LoRA
    scale = reference.std().item()
    error = (_logits(merged, inputs) - reference).abs().max().item() / scale
    with peft_relu.disable_adapter():  # base weights only, to show the tolerance can catch a missing merge
        base_only = prepare_inference_model(peft_relu, torch.float32)
    missing_lora = (_logits(base_only, inputs) - reference).abs().max().item() / scale
    assert error < 0.05, error
    assert missing_lora > 5 * error, (missing_lora, error)
    bf16_error = (_logits(prepare_inference_model(peft_relu, torch.bfloat16), inputs) - reference).abs().max()
    assert bf16_error.item() / scale < 0.1


def test_trained_lm_head_copy_is_untied_from_input_embeddings(peft_relu, merged32):
    base = peft_relu.get_base_model()
    assert merged32.lm_head.weight is not merged32.shared.weight
    assert torch.equal(merged32.lm_head.weight, base.lm_head.modules_to_save["default"].weight.float())
    assert torch.equal(merged32.shared.weight, base.shared.weight.float())
    assert merged32.encoder.embed_tokens.weight is merged32.shared.weight
    assert merged32.decoder.embed_tokens.weight is merged32.shared.weight
    assert not torch.equal(merged32.lm_head.weight, merged32.shared.weight)
    assert merged32.dtype == torch.float32 and not getattr(merged32, "is_quantized", False)


def test_plain_t5_input_keeps_lm_head_tied(merged32):
    plain = prepare_inference_model(merged32, torch.bfloat16)  # a dense T5 without PEFT, tied head
    untrained = prepare_inference_model(type(merged32)(merged32.config), torch.float32)
    assert untrained.lm_head.weight is untrained.shared.weight
    assert plain.lm_head.weight is not plain.shared.weight  # the untied source stays untied
    assert torch.equal(plain.lm_head.weight, merged32.lm_head.weight.bfloat16())


def test_generate_ids_rejects_the_quantized_training_model(peft_relu, inputs):
    with pytest.raises(SumtuneError, match="prepare_inference_model"):
        ours(peft_relu, inputs[:2])
    with pytest.raises(SumtuneError):
        ours(prepare_inference_model(peft_relu, torch.float32), inputs[:2], max_new_tokens=0)


def test_encoder_runs_the_fast_t5_path_and_the_model_is_restored(merged32, inputs, monkeypatch):
    import sumtune.generation.decoding as generation_api
    from sumtune.fast_t5 import is_fast_t5_enabled

    seen, encode = [], generation_api.encode

    def spy(model, ids, mask, chunk):
        seen.append(is_fast_t5_enabled(model.get_encoder()))
        return encode(model, ids, mask, chunk)

    monkeypatch.setattr(generation_api, "encode", spy)
    fast = ours(merged32, inputs[:3], max_new_tokens=6)
    stock = ours(merged32, inputs[:3], max_new_tokens=6, fast_encoder=False)
    assert seen == [True, False]
    assert not is_fast_t5_enabled(merged32)  # the caller's model is left as it was
    assert fast == stock  # fp32: the two encoder paths differ only by rounding far below a token flip


def test_repeated_calls_reuse_one_greedy_session_per_shape(merged32, inputs):
    import gc
    import weakref

    from sumtune.generation.decoding import cached_session, release_generation_cache

    release_generation_cache(merged32)
    first = ours(merged32, inputs[:4], batch_size=4, pad_to_multiple_of=64)
    session = cached_session(merged32)
    again = ours(merged32, inputs[:4], batch_size=4, pad_to_multiple_of=64)
    assert cached_session(merged32) is session and again == first
    ours(merged32, inputs[:2], batch_size=2, pad_to_multiple_of=64)  # another batch shape: a new session
    assert cached_session(merged32) not in (None, session)
    release_generation_cache(merged32)
    assert cached_session(merged32) is None

    copy = prepare_inference_model(merged32, torch.float32)  # a dropped model frees its session at once
    ours(copy, inputs[:2], batch_size=2)
    session_ref = weakref.ref(cached_session(copy))
    gc.disable()  # freed by reference counting alone: no cycle keeps the model's buffers alive until a GC pass
    try:
        del copy
        assert session_ref() is None
    finally:
        gc.enable()


def test_beam_search_matches_transformers(merged32, inputs):
    subset = inputs[:6]
    expected = hf_generate(merged32, subset, max_new_tokens=12, num_beams=4)
    got = ours(merged32, subset, max_new_tokens=12, num_beams=4, batch_size=4)
    assert got == expected


def test_length_penalty_reaches_beam_search(merged32, inputs):
    subset = inputs[:4]
    for penalty in (0.2, 3.0):
        expected = hf_generate(merged32, subset, max_new_tokens=12, num_beams=3, length_penalty=penalty)
        assert ours(merged32, subset, max_new_tokens=12, num_beams=3, length_penalty=penalty, batch_size=4) == expected


def test_no_repeat_ngram_size_runs_transformers_generate_with_the_same_tokens(merged32, expected32, inputs):
    """sumtune's greedy step has no n-gram ban, so the call goes to transformers' generate on sumtune's encoder
    output: token for token what `generate(no_repeat_ngram_size=2)` gives, and no bigram twice, where plain greedy
    repeats itself (the option took effect)."""
    from sumtune.generation.decoding import cached_session, release_generation_cache, uses_own_decoder

    assert not uses_own_decoder(no_repeat_ngram_size=2) and uses_own_decoder()
    release_generation_cache(merged32)
    got = ours(merged32, inputs, no_repeat_ngram_size=2, batch_size=8)
    assert cached_session(merged32) is None  # sumtune's greedy session never ran
    assert got == hf_generate(merged32, inputs, max_new_tokens=MAX_NEW, no_repeat_ngram_size=2)
    assert all(repeated_ngrams(row, 2) == 0 for row in got)
    assert sum(repeated_ngrams(row, 2) for row in expected32) > 0
    with_min = ours(merged32, inputs[:6], no_repeat_ngram_size=3, min_new_tokens=10, batch_size=6)
    assert with_min == hf_generate(merged32, inputs[:6], max_new_tokens=MAX_NEW, no_repeat_ngram_size=3,
                                   min_new_tokens=10)
