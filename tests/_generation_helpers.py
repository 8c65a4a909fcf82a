"""Helpers shared by the tests of sumtune.generation (tests/test_generation_*.py): tiny random T5s quantized to NF4
with real bitsandbytes and wrapped in real PEFT LoRA, transformers' `generate` as the reference, and the checks that
tell a real difference from a near-tie decided by rounding.

The fixtures built with them (the real BillSum inputs through the real T5 tokenizer, the quantized PEFT model, its
merged fp32 copy and transformers' greedy tokens for it, torch on one thread) are in tests/conftest.py.
"""

from __future__ import annotations

import os

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from sumtune.generation import generate_ids, prepare_inference_model  # noqa: E402
from sumtune.generation.greedy import trim_rows  # noqa: E402

PAD, EOS, START = 0, 1, 0
SOURCE_LENGTHS = [7, 40, 130, 18, 90, 64, 11, 150, 33, 75, 120, 22, 56, 100, 9, 48]  # varied, unsorted
MAX_NEW = 24


def _quantized_peft(tmp_path_factory, feed_forward_proj: str, modules_to_save=("lm_head",), init_factor=2.0):
    """Random tiny T5 -> saved -> loaded in NF4 (double quant, bf16 compute) -> LoRA on v,o with nonzero B.

    init_factor 2 makes a random tiny T5 produce varied text (at 1 it repeats one token) but also makes it
    sensitive: bf16 rounding moves its logits by ~0.2 std. init_factor 1 gives a calm model for logit checks."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSeq2SeqLM, BitsAndBytesConfig, T5Config, T5ForConditionalGeneration

    torch.manual_seed(0)
    config = T5Config(d_model=64, d_ff=128, d_kv=32, num_heads=4, num_layers=2, num_decoder_layers=2,
                      vocab_size=32128, feed_forward_proj=feed_forward_proj, dropout_rate=0.0,
                      initializer_factor=init_factor, decoder_start_token_id=START)
    dense = T5ForConditionalGeneration(config)
    path = tmp_path_factory.mktemp(f"t5-{feed_forward_proj}")
    dense.save_pretrained(path)
    quantized = AutoModelForSeq2SeqLM.from_pretrained(
        path, dtype=torch.bfloat16, quantization_config=BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16))
    peft_model = get_peft_model(quantized, LoraConfig(r=4, lora_alpha=8, target_modules=["v", "o"],
                                                      modules_to_save=list(modules_to_save),
                                                      task_type="SEQ_2_SEQ_LM"))
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.2)
        if modules_to_save:
            head = peft_model.get_base_model().lm_head.modules_to_save["default"].weight
            head.add_(0.3 * torch.randn_like(head))  # a "trained" head that differs from `shared`
    return peft_model.eval()


def _make_eos_reachable(peft_model, inputs) -> None:
    """Give the trained lm_head copy an eos row equal to (1.02 x) the row of a token that greedy decoding
    produces in about half of the inputs, so some sequences stop early and others run to max_new_tokens."""
    from collections import Counter

    probe = ours(prepare_inference_model(peft_model, torch.float32), inputs)
    counts = Counter(token for row in probe for token in set(row))
    target = min(counts, key=lambda token: abs(counts[token] - len(inputs) / 2))
    with torch.no_grad():
        head = peft_model.get_base_model().lm_head.modules_to_save["default"].weight
        head[EOS] = head[target] * 1.02


def hf_generate(model, inputs, **kwargs) -> list[list[int]]:
    """transformers `generate` on one right-padded batch, normalised like generate_ids."""
    longest = max(map(len, inputs))
    ids = torch.tensor([row + [PAD] * (longest - len(row)) for row in inputs], device=model.device)
    mask = torch.tensor([[1] * len(row) + [0] * (longest - len(row)) for row in inputs], device=model.device)
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, decoder_start_token_id=START,
                             pad_token_id=PAD, eos_token_id=EOS, **kwargs)
    assert bool((out[:, 0] == START).all())
    return trim_rows(out[:, 1:].tolist(), EOS)


def ours(model, inputs, **kwargs) -> list[list[int]]:
    kwargs.setdefault("max_new_tokens", MAX_NEW)
    return generate_ids(model, inputs, pad_token_id=PAD, eos_token_id=EOS, decoder_start_token_id=START, **kwargs)


def agreement(a: list[list[int]], b: list[list[int]]) -> float:
    assert len(a) == len(b)
    return sum(x == y for x, y in zip(a, b)) / len(a)


def assert_same_or_near_tie(model, inputs, got, expected, tolerance) -> None:
    """Each differing sequence must differ first at a token where `model`'s own (teacher-forced) logits for
    the two candidates are within `tolerance(source, prefix, logits, (token_a, token_b))`: a near-tie decided
    by rounding."""
    for source, ref, mine in zip(inputs, expected, got):
        if ref == mine:
            continue
        k = next((i for i, (a, b) in enumerate(zip(ref, mine)) if a != b), None)
        assert k is not None, f"one output is a prefix of the other: {ref} vs {mine}"
        prefix = [START] + ref[:k]
        logits = _logits(model, [source], prefix)[0, -1]
        gap = abs((logits[ref[k]] - logits[mine[k]]).item())
        limit = tolerance(source, prefix, logits, (ref[k], mine[k]))
        assert gap <= limit, f"token {k}: tokens {ref[k]} vs {mine[k]}, logit gap {gap} > tolerance {limit}"


def fp32_tolerance(source, prefix, logits, tokens) -> float:
    """fp32 rounding differs with batch shape; a chaotic random model can amplify it ~100x."""
    return 1e-5 * logits.abs().max().item()


def _logits(model, inputs, decoder_inputs=None):
    ids = torch.tensor([inputs[0]])
    dec = torch.tensor([decoder_inputs or [START, 5, 17, 900]])
    with torch.no_grad():
        return model(input_ids=ids, decoder_input_ids=dec).logits.float()


def repeated_ngrams(row: list[int], n: int) -> int:
    grams = [tuple(row[i:i + n]) for i in range(len(row) - n + 1)]
    return len(grams) - len(set(grams))
