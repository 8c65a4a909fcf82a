"""sumtune.generation against transformers, on tiny random T5s quantized to NF4 with real bitsandbytes,
wrapped in real PEFT LoRA, fed real BillSum text through the real T5 tokenizer."""

from __future__ import annotations

import math

import dataclasses
import json
import os
import sys

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from sumtune.errors import SumtuneError  # noqa: E402
from sumtune.generation import generate_ids, prepare_inference_model  # noqa: E402
from sumtune.generation.greedy import GreedySession, trim_rows  # noqa: E402
from sumtune.generation.t5_decode import DecoderWeights  # noqa: E402

PAD, EOS, START = 0, 1, 0
SOURCE_LENGTHS = [7, 40, 130, 18, 90, 64, 11, 150, 33, 75, 120, 22, 56, 100, 9, 48]  # varied, unsorted
MAX_NEW = 24


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny matmuls: extra threads only add synchronisation, and on a busy 2-core box they spin (30x slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def inputs(billsum_jsonl, t5_tokenizer_dir) -> list[list[int]]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(t5_tokenizer_dir))
    rows = [json.loads(line) for line in billsum_jsonl.read_text().splitlines()[: len(SOURCE_LENGTHS)]]
    return [tokenizer("summarize: " + row["text"], truncation=True, max_length=n)["input_ids"]
            for row, n in zip(rows, SOURCE_LENGTHS)]


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
    quantized = AutoModelForSeq2SeqLM.from_pretrained(path, dtype=torch.bfloat16, quantization_config=BitsAndBytesConfig(
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


@pytest.fixture(scope="module")
def peft_relu(tmp_path_factory, inputs):
    model = _quantized_peft(tmp_path_factory, "relu")
    _make_eos_reachable(model, inputs)
    return model


@pytest.fixture(scope="module")
def peft_gated(tmp_path_factory, inputs):
    model = _quantized_peft(tmp_path_factory, "gated-gelu")
    _make_eos_reachable(model, inputs)
    return model


@pytest.fixture(scope="module")
def merged32(peft_relu):
    return prepare_inference_model(peft_relu, torch.float32)


@pytest.fixture(scope="module")
def expected32(merged32, inputs):
    """transformers greedy on the merged fp32 model: the reference for the greedy tests."""
    return hf_generate(merged32, inputs, max_new_tokens=MAX_NEW)


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


# ---- prepare_inference_model -------------------------------------------------------------------------

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


# ---- greedy ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("attention", ["kv", "hidden", "fused"])
def test_greedy_matches_transformers_fp32(merged32, expected32, inputs, attention):
    expected = expected32
    got = ours(merged32, inputs, attention=attention, batch_size=5)
    ended = sum(row[-1] == EOS for row in expected)
    assert 0 < ended < len(expected), "test data should mix early-eos and full-length sequences"
    assert len({tuple(r) for r in expected}) > len(expected) // 2, "outputs should differ between inputs"
    assert agreement(got, expected) >= 0.9
    assert_same_or_near_tie(merged32, inputs, got, expected, fp32_tolerance)


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


def _fused_kernel_device():
    """(device, dtype, tolerance against float64) where the fused decoding kernel runs: a GPU in bf16, else Triton's
    interpreter in float32; skips the test where neither can."""
    from sumtune.generation import cross_attention

    device, dtype, tolerance = ("cuda", torch.bfloat16, 3e-2) if torch.cuda.is_available() else \
        ("cpu", torch.float32, 1e-5)
    if cross_attention.kernel_available(torch.zeros(1, 64, device=device)) is not None:
        pytest.skip("the kernel cannot run here (no CUDA and Triton's interpreter is off)")
    return device, dtype, tolerance


def test_fused_kernel_adds_a_per_head_bias_over_broadcast_lengths():
    """The fused kernel with `bias` (one row a head, as the decoder's self-attention passes it) and lengths as a
    broadcast view (stride 0) against the float64 reference, with key splits; a bias of the wrong shape is refused."""
    pytest.importorskip("triton")
    from sumtune.generation import cross_attention

    device, dtype, tolerance = _fused_kernel_device()
    gen = torch.Generator().manual_seed(8)
    memory = torch.randn(3, 90, 32, generator=gen)
    q_mem = torch.randn(3, 20, 32, generator=gen)
    bias = torch.randn(20, 96, generator=gen) * 3
    bias[:, 50:] = torch.finfo(torch.float32).min  # the decoder's table: future positions masked
    for written in (1, 37, 50):
        lengths = torch.tensor([written], dtype=torch.int32).expand(3)
        expected = cross_attention.reference_hidden_attention(q_mem, memory, lengths, bias=bias)
        unbiased = cross_attention.reference_hidden_attention(q_mem, memory, lengths)
        assert written == 1 or (expected - unbiased).abs().max() > 0.1  # the bias matters
        for splits in (1, 2):
            got = cross_attention.fused_hidden_attention(q_mem.to(device, dtype), memory.to(device, dtype),
                                                         lengths.to(device), splits=splits,
                                                         bias=bias.to(device, dtype)).cpu()
            assert (got.double() - expected).abs().max().item() < tolerance, (written, splits)
    with pytest.raises(ValueError, match="bias must be"):
        cross_attention.fused_hidden_attention(q_mem, memory, lengths, bias=bias[:4])


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


def test_the_key_splits_combine_in_one_kernel_as_torch_combines_them(monkeypatch):
    """FUSED_COMBINE: cross_kernels.combine_splits against combine_in_torch on partial results with an empty split
    (running max -inf) and a row with no keys at all (zeros, not NaN), then through the whole op with key splits
    against the float64 reference, the head count not a power of two."""
    pytest.importorskip("triton")
    from sumtune.generation import cross_attention

    device, dtype, tolerance = _fused_kernel_device()
    gen = torch.Generator().manual_seed(8)
    batch, splits, padded, heads, d_model = 3, 5, 16, 12, 512
    acc = torch.randn(batch, splits, padded, d_model, generator=gen)
    running_max = torch.randn(batch, splits, padded, generator=gen) * 4
    total = torch.rand(batch, splits, padded, generator=gen) + 0.5
    running_max[0, 2] = -math.inf  # a split that met no key
    acc[0, 2], total[0, 2] = 0.0, 0.0
    running_max[1] = -math.inf  # a row with no keys
    acc[1], total[1] = 0.0, 0.0
    partials = [t.to(device) for t in (acc, running_max, total)]
    expected = cross_attention.combine_in_torch(*partials, heads, torch.float32).cpu()
    out = torch.full((batch, heads, d_model), math.nan, device=device)
    cross_attention._kernels().combine_splits[(heads, batch)](
        *partials, out, out.stride(0), out.stride(1), padded, SPLITS=splits, BLOCK_S=8, D=d_model, BLOCK_D=256)
    assert torch.allclose(out.cpu(), expected, rtol=1e-5, atol=1e-6) and not out[1].any()
    monkeypatch.setattr(cross_attention, "FUSED_COMBINE", True)
    memory = torch.randn(4, 300, 64, generator=gen).to(device, dtype)
    q_mem = torch.randn(4, 20, 64, generator=gen).to(device, dtype) / 4
    lengths = torch.tensor([300, 77, 0, 130], dtype=torch.int32)
    reference = cross_attention.reference_hidden_attention(q_mem.cpu(), memory.cpu(), lengths)
    for splits in (2, 3):
        got = cross_attention.fused_hidden_attention(q_mem, memory, lengths.to(device), splits=splits).cpu()
        assert (got.double() - reference).abs().max().item() < tolerance, splits
        assert not got[2].any()


COMBINE_FOR_HOPPER = """
import json
from sumtune.generation import cross_kernels as k
from sumtune.fast_t5.flash_compile import compile_source, resources
t = dict(ACC="*fp32", MAX="*fp32", SUM="*fp32", OUT="*bf16", stride_ob="i32", stride_oh="i32", padded_heads="i32")
for splits in (2, 16):
    c = compile_source(k.combine_splits, t, dict(SPLITS=splits, BLOCK_S=splits, D=1024, BLOCK_D=256), 4, 1)
    print(json.dumps(dict(splits=splits, **resources(c))))
"""


def test_the_split_combine_kernel_builds_for_hopper_without_spilling(compiled_for_hopper):
    """cross_kernels.combine_splits compiled for sm_90 on the CPU at T5-3b's d_model, 2 and 16 splits."""
    pytest.importorskip("triton")
    rows, stderr = compiled_for_hopper(COMBINE_FOR_HOPPER)
    assert [row["splits"] for row in rows] == [2, 16], stderr
    assert all(row["spill_bytes"] == 0 for row in rows), rows


def test_fused_cross_attention_kernel_matches_float64_and_refuses_what_it_cannot_run(merged32):
    """The fused mode's kernel (Triton's interpreter on CPU, compiled on a GPU in bfloat16) against a float64 masked softmax, with key splits and rows of different lengths (one empty); a non-power-of-two
    d_model and left padding are refused in one sentence."""
    pytest.importorskip("triton")
    from sumtune.generation import cross_attention
    from sumtune.generation.t5_decode import load_batch, new_state

    device, dtype, tolerance = _fused_kernel_device()
    gen = torch.Generator().manual_seed(3)

    def check(q_mem, larger, lengths, splits_to_try, label):
        # every other row of a larger buffer, sliced where the kernel runs (a strided CPU view's .to("cuda") copy
        # would be contiguous)
        q_mem, memory = q_mem.to(device, dtype), larger.to(device, dtype)[::2]
        assert not memory.is_contiguous()
        expected = cross_attention.reference_hidden_attention(q_mem.cpu(), memory.cpu(), lengths)
        # the queries as t5_decode hands them over: [H, B, D] GEMM output seen as [B, H, D] (read in place)
        q_heads_first = q_mem.transpose(0, 1).contiguous().transpose(0, 1)
        for splits in splits_to_try:
            got = cross_attention.fused_hidden_attention(q_mem, memory, lengths.to(device), splits=splits).cpu()
            assert (got.double() - expected).abs().max().item() < tolerance, (label, splits)
            again = cross_attention.fused_hidden_attention(q_heads_first, memory, lengths.to(device), splits=splits)
            assert torch.equal(again.cpu(), got), (label, splits)
        return got

    memory = torch.randn(8, 70, 32, generator=gen)  # the kernel reads its rows 0, 2, 4, 6 (strided rows)
    lengths = torch.tensor([70, 33, 1, 0], dtype=torch.int32)
    got = check(torch.randn(4, 5, 32, generator=gen), memory, lengths, (1, 2, 5), "5 heads, padded to 16 rows")
    assert not got[3].any()  # no keys: zeros, not NaN
    q_mem = torch.randn(4, 20, 32, generator=gen)  # 20 heads in groups of 16: a second, partly empty group
    for per_program in (32, 16):
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(cross_attention, "HEADS_PER_PROGRAM", per_program)
            assert cross_attention.head_blocks(20, per_program) == ((32, 1) if per_program == 32 else (16, 2))
            check(q_mem, memory, lengths, (1, 3), f"{per_program} heads a program")
    shapes = ((1, 70), (64, 4096), (256, 1024), (256, 4096), (512, 1024))  # (rows, source tokens)
    assert [cross_attention.tiles_for(*shape) for shape in shapes] == [(64, 8)] * 3 + [(32, 4)] * 2
    for least, block_n, warps in cross_attention.TILES_BY_STATES:  # each shipped tile (compiled: on a GPU)
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(cross_attention, "TILES_BY_STATES", ((0, block_n, warps),))
            check(q_mem, memory, lengths, (1, 3), f"{block_n} keys x {warps} warps (from {least} states)")

    weights = DecoderWeights.from_model(merged32)
    with pytest.raises(SumtuneError, match="d_model 48 is not a power of two"):
        dataclasses.replace(weights, embed=torch.zeros(2, 48, device=device)).resolve_attention("fused")
    on = weights.embed.device  # the merged model's (a GPU machine's tests put it there)
    state = new_state(weights, 2, 6, 4, "fused", on)
    encoder_out = torch.zeros(2, 6, weights.d_model, device=on)
    left_padded = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]], device=on)
    with pytest.raises(SumtuneError, match="right-padded"):
        load_batch(state, weights, encoder_out, left_padded, START, PAD, 0)
    load_batch(state, weights, encoder_out, torch.tensor([[1, 1, 1, 0, 0, 0], [1] * 6], device=on), START, PAD, 0)
    assert state.cross_lengths.tolist() == [3, 6]


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
    narrow = dataclasses.replace(on_cuda, d_model=weights.n_heads * weights.d_kv)
    assert narrow.resolve_attention("auto", src_len=4096, rows=256) == "kv"


# ---- encoder path and session reuse ---------------------------------------------------------------------

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


# ---- beam search -------------------------------------------------------------------------------------

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


# ---- options sumtune's decoder lacks: transformers' generate for that call ---------------------------------

def repeated_ngrams(row: list[int], n: int) -> int:
    grams = [tuple(row[i:i + n]) for i in range(len(row) - n + 1)]
    return len(grams) - len(set(grams))


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


def test_summaries_pass_every_generation_setting_on_both_paths(merged32, inputs, t5_tokenizer_dir):
    """`generate_summaries` (what evaluate, summarize and the API call) hands every setting to the path it takes:
    sumtune's T5 path (here: transformers' generate on sumtune's encoder output, for the n-gram ban) and plain
    transformers `generate` (models sumtune's decoder does not know; `dense_model=None` takes it for this T5)."""
    from transformers import AutoTokenizer

    from sumtune.generation.summaries import generate_summaries, generation_path

    tokenizer = AutoTokenizer.from_pretrained(str(t5_tokenizer_dir))
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id) == (PAD, EOS)
    assert generation_path(merged32) == "sumtune's T5 decoder"
    assert generation_path(merged32, no_repeat_ngram_size=3) == "transformers' generate on sumtune's encoder output"
    subset = inputs[:5]
    settings = dict(max_new_tokens=MAX_NEW, min_new_tokens=10, no_repeat_ngram_size=2)
    expected = hf_generate(merged32, subset, **settings)
    assert all(len(row) >= 10 and repeated_ngrams(row, 2) == 0 for row in expected)
    expected_texts = [t.strip() for t in tokenizer.batch_decode(expected, skip_special_tokens=True)]
    for dense in ({}, {"dense_model": None}):
        texts, lengths = generate_summaries(merged32, tokenizer, [""] * len(subset), prefix="", max_source_tokens=256,
                                            source_ids=subset, batch_size=5, **settings, **dense)
        assert texts == expected_texts and lengths == [len(row) for row in expected]


class RecordingProgress:
    """What generate_summaries needs of a sumtune Progress: a bar whose updates are kept."""

    def __init__(self):
        self.updates, self.closed = [], False

    def bar(self, total, desc, unit):
        self.total = total
        return self

    def update(self, n):
        self.updates.append(n)

    def close(self):
        self.closed = True


def test_summaries_run_every_input_in_one_call_and_move_the_bar_after_each_batch(merged32, inputs, t5_tokenizer_dir,
                                                                              monkeypatch):
    """One generate_ids call over all inputs (so the next batch's encoder can run ahead across the whole set), the
    bar moved by each batch's rows, on both paths; no input, no call and no bar movement."""
    from transformers import AutoTokenizer

    from sumtune.generation import decoding, summaries

    tokenizer = AutoTokenizer.from_pretrained(str(t5_tokenizer_dir))
    calls, generate = [], decoding.generate_ids
    monkeypatch.setattr(summaries, "generate_ids", lambda model, ids, **k: calls.append(len(ids))
                        or generate(model, ids, **k))
    for dense in ({}, {"dense_model": None}):
        progress = RecordingProgress()
        texts, _ = summaries.generate_summaries(merged32, tokenizer, [""] * 5, prefix="", max_source_tokens=256,
                                                source_ids=inputs[:5], batch_size=2, max_new_tokens=6,
                                                progress=progress, **dense)
        assert len(texts) == 5 and progress.total == 5 and progress.updates == [2, 2, 1] and progress.closed
    assert calls == [5]  # the sumtune path once; the transformers path (dense_model=None) does not call it
    progress = RecordingProgress()
    assert summaries.generate_summaries(merged32, tokenizer, [], prefix="", max_source_tokens=256,
                                        max_new_tokens=6, progress=progress) == ([], [])
    assert progress.updates == [] and calls == [5]


# ---- CUDA graphs (GPU only) --------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_graphs_match_eager_on_gpu(peft_relu, inputs):
    model = prepare_inference_model(peft_relu, torch.bfloat16).to("cuda")
    for attention in ("kv", "hidden", "fused"):
        eager = ours(model, inputs, use_cuda_graphs=False, batch_size=8, pad_to_multiple_of=64, attention=attention)
        graphed = ours(model, inputs, use_cuda_graphs=True, batch_size=8, attention=attention)
        assert graphed == eager  # same shapes, same kernels, replayed from a graph


def test_the_decode_attention_benchmark_times_the_same_maths_as_the_decoder():
    """benchmarks/decode_attention.py times an SDPA formulation of the decoder's hidden-state cross-attention
    against the decoder's own; its CPU check (float32, padded rows) must find them equal."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "decode_attention.py"
    result = subprocess.run([sys.executable, str(script), "--cpu-check"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and "formulations agree" in result.stdout, result.stdout + result.stderr
