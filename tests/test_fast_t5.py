"""sumtune.fast_t5 against the stock transformers T5 path, on a real NF4 (bitsandbytes) + PEFT LoRA model.

"Stock" is the same model object with the fast path disabled, so weights and batch are identical.
Both paths run in bf16, so gradients differ by rounding: for scale, the two stock attention
backends (eager vs sdpa) disagree with each other by 5-15% on this tiny model.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import types
import warnings

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
pytest.importorskip("bitsandbytes")
pytest.importorskip("peft")

from sumtune.fast_t5 import (  # noqa: E402
    cache_dequantized_weights,
    dequantized_weight_bytes,
    disable_fast_t5,
    enable_fast_t5,
    is_fast_t5_enabled,
    uncache_dequantized_weights,
)
from sumtune.fast_t5 import bias as bias_lib  # noqa: E402
from sumtune.fast_t5.numerics import relative_errors  # noqa: E402
from sumtune.modeling import keep_4bit_layout  # noqa: E402

VOCAB = 512
LOSS_RTOL = 5e-3  # the bar (0.5%): about one bf16 step at this loss (~6); measured equal here
GRAD_RTOL = 2e-2  # the bar for bf16 gradients (the two stock backends differ far more: see above)


# ----------------------------------------------------------------------------- model + batch builders
def build_qlora_t5(config_kwargs: dict, device: str = "cpu", seed: int = 0, lora_b_std: float = 0.02,
                   prepare_for_kbit: bool = False, init_factor: float = 0.5):
    """Random T5 saved to disk, loaded back in NF4 with from_pretrained, then PEFT LoRA (all-linear).

    LoRA B gets small random values (as after some training) so lora_A gradients are not all zero.
    """
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSeq2SeqLM, BitsAndBytesConfig, T5Config, T5ForConditionalGeneration

    torch.manual_seed(seed)
    config = T5Config(**dict(dict(feed_forward_proj="relu", pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
                                  dropout_rate=0.0, initializer_factor=init_factor), **config_kwargs))
    with tempfile.TemporaryDirectory() as tmpdir:
        T5ForConditionalGeneration(config).to(torch.bfloat16).save_pretrained(tmpdir)
        quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                   bnb_4bit_compute_dtype=torch.bfloat16)
        model = AutoModelForSeq2SeqLM.from_pretrained(tmpdir, quantization_config=quant, dtype=torch.bfloat16,
                                                      device_map={"": device})
    keep_4bit_layout(model)  # as sumtune's loader does: eval-then-train on an AVX512-BF16 CPU loses gradients otherwise
    if prepare_for_kbit:  # the reference recipe: upcasts every unquantized weight to fp32
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    lora = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear", task_type="SEQ_2_SEQ_LM")
    model = get_peft_model(model, lora)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, lora_b_std)
    return model.train()


def padded_batch(batch_size: int, src_len: int, tgt_len: int, vocab: int, device: str = "cpu", seed: int = 1):
    """Right-padded source and target, one row of each length class (full, half, short)."""
    gen = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(2, vocab, (batch_size, src_len), generator=gen)
    labels = torch.randint(2, vocab, (batch_size, tgt_len), generator=gen)
    attention_mask = torch.ones(batch_size, src_len, dtype=torch.long)
    for row in range(1, batch_size):
        keep_src = max(2, src_len // (row + 1))
        attention_mask[row, keep_src:] = 0
        labels[row, max(1, tgt_len // (row + 1)):] = -100
    input_ids[attention_mask == 0] = 0
    batch = dict(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
    return {k: v.to(device) for k, v in batch.items()}


@contextlib.contextmanager
def fast_route_calls():
    """Counts the fast stacks that really ran (each builds its position bias once: dense on the SDPA route, a table
    on the Triton route), so a test comparing "fast" with stock cannot silently compare stock with itself."""
    calls = []
    names = ("relative_position_bias", "relative_position_bias_by_offset")
    reals = {name: getattr(bias_lib, name) for name in names}

    def spy_on(real):
        def spy(*args, **kwargs):
            calls.append(1)
            return real(*args, **kwargs)

        return spy

    for name, real in reals.items():
        setattr(bias_lib, name, spy_on(real))
    try:
        yield calls
    finally:
        for name, real in reals.items():
            setattr(bias_lib, name, real)


def loss_and_lora_grads(model, batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    with fast_route_calls() as calls:
        loss = model(**batch).loss
        loss.backward()
    expected = is_fast_t5_enabled(model)
    assert bool(calls) == expected, "the fast T5 route did not run" if expected else "stock ran the fast route"
    grads = {n: p.grad.detach().float().clone() for n, p in model.named_parameters() if p.requires_grad}
    return loss.detach().float(), grads


def set_attn_implementation(model, name: str) -> None:
    for module in model.modules():
        config = getattr(module, "config", None)
        if config is not None and hasattr(config, "_attn_implementation"):
            config._attn_implementation = name


TINY = dict(d_model=64, d_ff=256, d_kv=16, num_heads=4, num_layers=2, num_decoder_layers=2, vocab_size=VOCAB)


@pytest.fixture(scope="module")
def model():
    model = build_qlora_t5(TINY)
    yield model
    disable_fast_t5(model)


@pytest.fixture(scope="module")
def batch():
    return padded_batch(3, 24, 10, VOCAB)


@pytest.fixture(scope="module")
def stock_result(model, batch):
    disable_fast_t5(model)
    return loss_and_lora_grads(model, batch)


@pytest.fixture()
def fast_model(model):
    enable_fast_t5(model)
    yield model
    disable_fast_t5(model)


# ----------------------------------------------------------------------------- tests
def test_enable_patches_peft_wrapped_t5_and_disable_restores(model):
    from transformers.models.t5 import modeling_t5 as t5

    enable_fast_t5(model)
    kinds = (t5.T5Stack, t5.T5Attention, t5.T5LayerNorm, t5.T5DenseActDense)
    patched = [m for m in model.modules() if isinstance(m, kinds)]
    assert patched and all("forward" in vars(m) for m in patched)
    assert is_fast_t5_enabled(model)
    disable_fast_t5(model)
    assert not any("forward" in vars(m) for m in patched)
    assert not is_fast_t5_enabled(model)


def test_loss_and_every_lora_grad_match_stock(fast_model, batch, stock_result):
    stock_loss, stock_grads = stock_result
    loss, grads = loss_and_lora_grads(fast_model, batch)
    assert torch.isfinite(loss)
    assert abs(float(loss - stock_loss)) <= LOSS_RTOL * abs(float(stock_loss))
    errors = relative_errors(grads, stock_grads)
    assert len(errors) == 2 * (6 * 2 + 10 * 2)  # LoRA A and B of every linear: 6 per encoder block, 10 per decoder block
    worst = max(errors, key=errors.get)
    assert errors[worst] <= GRAD_RTOL, f"{worst}: {errors[worst]:.4f}"


def test_fast_is_closer_to_stock_than_stock_backends_are_to_each_other(model, batch, stock_result):
    _, stock_grads = stock_result
    set_attn_implementation(model, "eager")
    try:
        _, eager_grads = loss_and_lora_grads(model, batch)
    finally:
        set_attn_implementation(model, "sdpa")
    enable_fast_t5(model)
    try:
        _, fast_grads = loss_and_lora_grads(model, batch)
    finally:
        disable_fast_t5(model)
    assert max(relative_errors(fast_grads, stock_grads).values()) < max(relative_errors(eager_grads, stock_grads).values())


def test_padded_token_ids_do_not_change_loss_or_grads(fast_model, batch):
    loss, grads = loss_and_lora_grads(fast_model, batch)
    garbage = dict(batch)
    input_ids = batch["input_ids"].clone()
    input_ids[batch["attention_mask"] == 0] = 7  # any real token id where the source is padded
    garbage["input_ids"] = input_ids
    garbage_loss, garbage_grads = loss_and_lora_grads(fast_model, garbage)
    assert torch.equal(loss, garbage_loss)
    assert all(torch.equal(grads[n], garbage_grads[n]) for n in grads)


def test_padded_decoder_ids_do_not_change_loss_or_grads(fast_model, batch):
    decoder_input_ids = fast_model.base_model.model._shift_right(batch["labels"])
    decoder_mask = torch.ones_like(decoder_input_ids)
    decoder_mask[:, 1:] = (batch["labels"][:, :-1] != -100).long()
    base = dict(batch, decoder_input_ids=decoder_input_ids, decoder_attention_mask=decoder_mask)
    loss, grads = loss_and_lora_grads(fast_model, base)
    garbage_ids = decoder_input_ids.clone()
    garbage_ids[decoder_mask == 0] = 9
    garbage_loss, garbage_grads = loss_and_lora_grads(fast_model, dict(base, decoder_input_ids=garbage_ids))
    assert torch.equal(loss, garbage_loss)
    assert all(torch.equal(grads[n], garbage_grads[n]) for n in grads)


def test_padding_invariance_per_sample(fast_model, batch):
    """A row's logits are the same alone (no padding) as inside the padded batch."""
    row = 2
    src_len = int(batch["attention_mask"][row].sum())
    tgt_len = int((batch["labels"][row] != -100).sum())
    alone = dict(input_ids=batch["input_ids"][row:row + 1, :src_len],
                 attention_mask=batch["attention_mask"][row:row + 1, :src_len],
                 labels=batch["labels"][row:row + 1, :tgt_len])
    with torch.no_grad():
        logits_batch = fast_model(**batch).logits[row, :tgt_len].float()
        logits_alone = fast_model(**alone).logits[0].float()
    # Logits, not the loss: a random model's loss sits near ln(vocab) and hardly moves even when padding leaks.
    # bf16 rounding with another batch shape moves them by ~0.015 std here; a leak moves them ~0.26 std.
    assert (logits_batch - logits_alone).abs().max() <= 0.06 * logits_alone.std()


def test_bias_equals_stock_compute_bias_and_masks(model):
    from transformers.integrations.sdpa_attention import create_position_bias_mask

    dtype = torch.bfloat16
    for stack in (model.base_model.model.encoder, model.base_model.model.decoder):
        attention = stack.block[0].layer[0].SelfAttention
        ours = bias_lib.relative_position_bias(attention, 12, 12, torch.device("cpu"), dtype)
        assert not ours.requires_grad  # frozen table: SDPA gets a bias without autograd
        assert torch.equal(ours, attention.compute_bias(12, 12).to(dtype))
    encoder_attention = model.base_model.model.encoder.block[0].layer[0].SelfAttention
    position_bias = bias_lib.relative_position_bias(encoder_attention, 12, 12, torch.device("cpu"), dtype)
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, 5:] = 0
    query = torch.zeros(2, 4, 12, 16, dtype=dtype)
    stock = create_position_bias_mask(position_bias, mask.bool()[:, None, None, :], False, query, query)
    assert torch.equal(bias_lib.encoder_self_bias(position_bias, mask), stock)
    assert bias_lib.encoder_self_bias(position_bias, torch.ones_like(mask)).shape[0] == 1  # broadcast, not B copies
    stock_causal = create_position_bias_mask(position_bias, None, True, query, query)
    assert torch.equal(bias_lib.decoder_self_bias(position_bias, None), stock_causal)
    assert torch.equal(bias_lib.decoder_self_bias(position_bias, torch.ones_like(mask)), stock_causal)
    # A padded decoder: stock T5 hands attention one boolean mask, causal and key padding combined.
    decoder_mask = mask.clone()
    decoder_mask[0, 3] = 0  # a hole inside the sequence too, so key padding is not hidden by causality
    causal = torch.ones(12, 12, dtype=torch.bool).tril()
    combined = causal[None, None] & decoder_mask.bool()[:, None, None, :]
    stock_padded = create_position_bias_mask(position_bias, combined, True, query, query)
    assert torch.equal(bias_lib.decoder_self_bias(position_bias, decoder_mask), stock_padded)
    cross = bias_lib.cross_attention_bias(mask, dtype)
    assert cross.shape == (2, 1, 1, 12)
    assert torch.equal(cross[1, 0, 0, 5:], torch.full((7,), torch.finfo(dtype).min, dtype=dtype))
    assert bias_lib.cross_attention_bias(torch.ones_like(mask), dtype) is None


def test_a_cache_passed_as_cache_keeps_the_stock_route():
    """Since transformers 5.2x the key/value cache reaches T5's forwards as `cache`: a forward given one must take the
    stock, cache-filling route, as with `past_key_values`."""
    from sumtune.fast_t5.modules import can_take_fast_route

    stack = types.SimpleNamespace(config=types.SimpleNamespace(output_attentions=False, output_hidden_states=False))
    assert can_take_fast_route(stack, None, None, {})
    assert not can_take_fast_route(stack, None, None, {"cache": object()})
    assert not can_take_fast_route(stack, object(), None, {})


def test_generate_with_cache_matches_stock(batch):
    """generate() runs the encoder on the fast route (padded rows included) and decodes with the stock cache."""
    model = build_qlora_t5(TINY, init_factor=2.0).eval()  # a livelier model: rows generate different tokens
    kwargs = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], max_new_tokens=5,
                  do_sample=False, num_beams=1)
    with torch.no_grad():
        stock = model.generate(**kwargs)
        enable_fast_t5(model)
        with fast_route_calls() as calls, warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            fast = model.generate(**kwargs)
        disable_fast_t5(model)
    assert calls, "the encoder did not take the fast route"
    # transformers 5.2x names the cache `cache` and warns when the fast forwards hand on past_key_values=None beside it
    assert not [w for w in caught if "past_key_values" in str(w.message)], [str(w.message)[:120] for w in caught]
    assert len({tuple(row) for row in stock.tolist()}) > 1, "every row generated the same tokens: the check is idle"
    assert torch.equal(stock, fast)


def test_dequantized_weight_cache_matches_bnb(fast_model, batch):
    import bitsandbytes as bnb

    quantized = [m for m in fast_model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    loss, grads = loss_and_lora_grads(fast_model, batch)
    expected_bytes = dequantized_weight_bytes(fast_model)
    cached_bytes = cache_dequantized_weights(fast_model)
    try:
        assert cached_bytes == expected_bytes == sum(2 * m.in_features * m.out_features for m in quantized)  # bf16
        cached_loss, cached_grads = loss_and_lora_grads(fast_model, batch)
    finally:
        restored = uncache_dequantized_weights(fast_model)
    assert restored == len(quantized) > 0
    assert not any("forward" in vars(m) for m in quantized)
    # The cache runs the same dequantization and GEMM once instead of per call: equal up to float rounding.
    assert abs(float(cached_loss - loss)) <= 1e-6 * abs(float(loss))
    assert max(relative_errors(cached_grads, grads).values()) <= 1e-5


def test_after_prepare_for_kbit_training_fast_matches_stock_under_autocast():
    """The reference recipe's fp32 upcasts: the fast path autocasts them to bf16, stock runs fp32 GEMMs."""
    model = build_qlora_t5(TINY, seed=3, prepare_for_kbit=True)
    assert model.base_model.model.encoder.block[0].layer[1].DenseReluDense.wo.weight.dtype == torch.float32
    batch = padded_batch(3, 24, 10, VOCAB, seed=4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        stock_loss, stock_grads = loss_and_lora_grads(model, batch)
        enable_fast_t5(model)
        loss, grads = loss_and_lora_grads(model, batch)
    disable_fast_t5(model)
    assert abs(float(loss - stock_loss)) <= LOSS_RTOL * abs(float(stock_loss))
    assert max(relative_errors(grads, stock_grads).values()) <= GRAD_RTOL


# ----------------------------------------------------------------------------- GPU, T5-3b widths
def assert_fast_no_further_from_fp32_than_stock(model, batch, stock_grads, grads, slack: float = 1.1):
    """bf16 noise on one small tensor can exceed 2e-2 even between stock's own backends, so the per-tensor
    bar is relative: against a float32 recomputation, fast may be at most `slack` x further than stock."""
    from sumtune.fast_t5.numerics import fp32_reference_grads, vector_relative_error

    _, fp32_grads = fp32_reference_grads(model, batch)
    fast_errors, stock_errors = relative_errors(grads, fp32_grads), relative_errors(stock_grads, fp32_grads)
    assert max(fast_errors.values()) <= slack * max(stock_errors.values())
    assert vector_relative_error(grads, fp32_grads) <= slack * vector_relative_error(stock_grads, fp32_grads)


def test_fast_is_as_close_to_float32_as_stock_on_cpu(model):
    batch = padded_batch(3, 24, 10, VOCAB, seed=5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, stock_grads = loss_and_lora_grads(model, batch)
        enable_fast_t5(model)
        _, grads = loss_and_lora_grads(model, batch)
    disable_fast_t5(model)
    assert_fast_no_further_from_fp32_than_stock(model, batch, stock_grads, grads)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("norm_weight_in_kernel", [True, False], ids=["shipped", "nonormweight"])
def test_t5_3b_widths_fast_matches_stock_on_gpu(monkeypatch, norm_weight_in_kernel):
    """At T5-3b's widths (2 + 2 layers), bf16, QLoRA: the fast path's loss and LoRA gradients match stock's and are
    no further from float32; padding's token ids change nothing. Also with modules.RMS_NORM_WEIGHT_IN_KERNEL off
    (stock's two roundings): the bar any default must pass."""
    from sumtune.fast_t5 import modules
    from sumtune.fast_t5.numerics import vector_relative_error

    monkeypatch.setattr(modules, "RMS_NORM_WEIGHT_IN_KERNEL", norm_weight_in_kernel)

    config = dict(d_model=1024, d_ff=16384, d_kv=128, num_heads=32, num_layers=2, num_decoder_layers=2,
                  vocab_size=32128, relative_attention_num_buckets=32)
    model = build_qlora_t5(config, device="cuda")
    batch = padded_batch(4, 1024, 128, 32128, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        stock_loss, stock_grads = loss_and_lora_grads(model, batch)
        enable_fast_t5(model)
        loss, grads = loss_and_lora_grads(model, batch)
        garbage = dict(batch, input_ids=batch["input_ids"].masked_fill(batch["attention_mask"] == 0, 7))
        garbage_loss, _ = loss_and_lora_grads(model, garbage)
    disable_fast_t5(model)
    assert abs(float(loss - stock_loss)) <= LOSS_RTOL * abs(float(stock_loss))
    assert vector_relative_error(grads, stock_grads) <= GRAD_RTOL  # all LoRA gradients as one vector
    assert_fast_no_further_from_fp32_than_stock(model, batch, stock_grads, grads)
    assert torch.equal(loss, garbage_loss)


def test_biases_are_contiguous_for_the_efficient_sdpa_kernel(model):
    """SDPA's memory-efficient kernel needs a unit-stride bias; a permuted view silently selects the math kernel."""
    from sumtune.fast_t5 import bias as bias_lib

    attention = model.base_model.model.encoder.block[0].layer[0].SelfAttention
    position_bias = bias_lib.relative_position_bias(attention, 12, 12, torch.device("cpu"), torch.bfloat16)
    assert position_bias.is_contiguous()
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, 9:] = 0
    assert bias_lib.encoder_self_bias(position_bias, mask).is_contiguous()
    assert bias_lib.decoder_self_bias(position_bias, mask).is_contiguous()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_fast_attention_runs_in_efficient_kernels_on_gpu():
    """With the math backend disabled, the fast path must still run forward and backward (no math fallback)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    config = dict(d_model=1024, d_ff=4096, d_kv=128, num_heads=32, num_layers=1, num_decoder_layers=1,
                  vocab_size=32128, relative_attention_num_buckets=32)
    model = build_qlora_t5(config, device="cuda")
    enable_fast_t5(model)
    batch = padded_batch(2, 512, 64, 32128, device="cuda")
    with sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION]):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss, grads = loss_and_lora_grads(model, batch)
    assert torch.isfinite(loss) and all(torch.isfinite(g).all() for g in grads.values())


def test_relu_runs_in_the_gemm_epilogue_only_where_nothing_needs_it_apart():
    """FUSED_LINEAR_RELU: ReLU in wi's GEMM epilogue for a plain half-precision wi on CUDA with no dropout and no
    gradient; anywhere else (CPU, training with dropout, a gradient, a quantized or LoRA wi) the stock order. The
    fused product equals relu(linear) exactly (here on the CPU, where torch computes it as two steps)."""
    from transformers import T5Config
    from transformers.models.t5.modeling_t5 import T5DenseActDense

    from sumtune.fast_t5 import modules

    dense = T5DenseActDense(T5Config(d_model=32, d_ff=64, dropout_rate=0.1, feed_forward_proj="relu"))
    dense = dense.to(torch.bfloat16).eval()
    x = torch.randn(3, 5, 32, dtype=torch.bfloat16)
    fused = modules._linear_relu(dense.wi, x)
    assert torch.equal(fused, torch.relu(dense.wi(x)))

    class OnCuda(torch.Tensor):  # a CPU tensor that reports CUDA: only the routing is under test here
        @property
        def is_cuda(self):
            return True

    on_cuda = x.as_subclass(OnCuda)
    with torch.no_grad():
        assert modules._epilogue_relu(dense, on_cuda)
        assert not modules._epilogue_relu(dense, x)  # CPU
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(modules, "FUSED_LINEAR_RELU", False)
            assert not modules._epilogue_relu(dense, on_cuda)
        assert not modules._epilogue_relu(dense.train(), on_cuda)  # dropout 0.1 follows the ReLU
        assert not modules._epilogue_relu(dense.eval().float(), on_cuda.float())  # fp32 weights: stock
    dense = dense.to(torch.bfloat16)
    assert not modules._epilogue_relu(dense, on_cuda)  # the weight wants a gradient


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_encoder_with_relu_in_the_gemm_epilogue_equals_the_two_step_encoder_on_gpu():
    """Generation's encoder (dense bf16 weights, no gradient) with FUSED_LINEAR_RELU against the same forwards with
    ReLU as its own pass: the same outputs, to the last bit or within a few bf16 steps (another GEMM algorithm)."""
    from transformers import T5Config, T5EncoderModel

    from sumtune.fast_t5 import modules

    torch.manual_seed(0)
    config = T5Config(d_model=1024, d_ff=16384, d_kv=128, num_heads=32, num_layers=2, vocab_size=32128,
                      feed_forward_proj="relu", dropout_rate=0.1)
    encoder = T5EncoderModel(config).to("cuda", torch.bfloat16).eval()
    enable_fast_t5(encoder)
    ids = torch.randint(2, 32128, (4, 1024), device="cuda")
    with torch.inference_mode():
        fused = encoder(input_ids=ids).last_hidden_state
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(modules, "FUSED_LINEAR_RELU", False)
            apart = encoder(input_ids=ids).last_hidden_state
    assert (fused.float() - apart.float()).norm() <= 1e-2 * apart.float().norm()
