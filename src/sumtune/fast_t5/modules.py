"""Fast forwards bound onto T5 module instances by :func:`sumtune.fast_t5.enable_fast_t5`.

Each function has the signature of the stock ``forward`` it replaces and is attached per
instance (``module.forward = MethodType(fn, module)``), so deleting the instance attribute
restores the stock class method. The attention forward only takes the fast route when the
fast stack calls it (it passes ``FAST_KW``); any other caller gets stock behaviour.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from sumtune.fast_t5 import attention as attention_lib
from sumtune.fast_t5 import bias as bias_lib
from sumtune.fast_t5 import lora_group

FAST_KW = "_sumtune_fast"
COMPUTE_DTYPE_ATTR = "_sumtune_compute_dtype"
FUSED_RELU_DROPOUT_ATTR = "_sumtune_fused_relu_dropout"  # on T5DenseActDense: ReLU + dropout in one kernel
FUSED_GATED_DROPOUT_ATTR = "_sumtune_fused_gated_dropout"  # on T5DenseGatedActDense: GELU gate + dropout, one kernel
# Without dropout (eval, the encoder in generation), a plain half-precision ``wi`` on CUDA and ReLU: the ReLU in
# cuBLASLt's GEMM epilogue (torch._addmm_activation with a zero bias), instead of one more pass over the d_ff-wide
# activations (2 GiB read and written per layer for 16 inputs of 4096 tokens at T5-3b's 16384). Same values: ReLU
# commutes with rounding to bf16, and x + 0 is x. Benchmark token `nolinearrelu`: off.
FUSED_LINEAR_RELU = True
# T5LayerNorm's half-precision weight inside torch's fused RMSNorm kernel (the product in fp32, one rounding), instead
# of stock's rounding to the weight's dtype and then a multiply in it: that multiply broadcasts the weight, so torch
# runs it in its non-vectorized elementwise kernel, which took 187 us a call against the norm's 102 us for 16 rows of
# 4096 tokens (147 ms of the 8.2 s of kernels of a 256-row encoder pass, results/generate_profile-2026-12-05-h100-full-
# encoder.json), and twice a norm in training (its backward too). One rounding, not two: within half a bf16 step of
# the float64 result, which stock is not everywhere (tests/test_generation_t5_decode.py), but not stock's bits. On since
# 2026-12-05 (H100, same runs: shipped step +1.1%, seed's best +0.6%, whole generation at 4096 +0.9% with tokens equal
# to transformers'; results/*-2026-12-05-h100-*normweight.json). Benchmark token `nonormweight`: off.
RMS_NORM_WEIGHT_IN_KERNEL = True


def _compute_dtype(module: torch.nn.Module) -> torch.dtype:
    return getattr(module, COMPUTE_DTYPE_ATTR)


def _cache_given(past_key_values, kwargs: dict) -> bool:
    """A key/value cache came in: as ``past_key_values``, or as ``cache`` (its name since transformers 5.2x)."""
    return past_key_values is not None or kwargs.get("cache") is not None


def _with_past(past_key_values) -> dict:
    """``past_key_values`` for a stock forward only when there is one: transformers 5.2x warns when it is passed
    (even as None) beside ``cache``."""
    return {} if past_key_values is None else {"past_key_values": past_key_values}


# --------------------------------------------------------------------------- attention
def fast_attention_forward(self, hidden_states, mask=None, key_value_states=None, position_bias=None,
                           past_key_values=None, **kwargs):
    """T5Attention: q/k/v in the compute dtype, then one attention kernel call.

    From the fast stack, ``position_bias`` is either the Triton route's :class:`FlashInputs` (bias table, key
    padding, causality) or, on the SDPA route, the relative bias + padding/causal mask (self-attention) or the
    key-padding bias / None (cross-attention); ``mask`` is None.
    """
    if not kwargs.pop(FAST_KW, False) or _cache_given(past_key_values, kwargs) or mask is not None:
        return type(self).forward(self, hidden_states, mask=mask, key_value_states=key_value_states,
                                  position_bias=position_bias, **_with_past(past_key_values), **kwargs)
    dtype = _compute_dtype(self)
    batch, query_len = hidden_states.shape[:2]
    source = hidden_states if key_value_states is None else key_value_states
    heads, head_dim = self.n_heads, self.key_value_proj_dim
    query, key, value = _projections(self, hidden_states, source)
    query = query.view(batch, query_len, heads, head_dim).transpose(1, 2).to(dtype)
    key = key.view(batch, -1, heads, head_dim).transpose(1, 2).to(dtype)
    value = value.view(batch, -1, heads, head_dim).transpose(1, 2).to(dtype)
    dropout_p = self.dropout if self.training else 0.0
    if isinstance(position_bias, attention_lib.FlashInputs):
        output = attention_lib.flash_attend(query, key, value, position_bias, dropout_p)
        output = output.transpose(1, 2).reshape(batch, query_len, heads * head_dim)  # a view: kernel writes BLHD
        return self.o(output), position_bias, None
    if position_bias is None and self.has_relative_attention_bias:  # direct call, not via the stack
        position_bias = bias_lib.relative_position_bias(self, query_len, key.shape[2], query.device, dtype)
        if self.is_decoder and key_value_states is None:
            position_bias = bias_lib.decoder_self_bias(position_bias, None)
    # T5 does not scale q.k (scale=1.0); dropout on the attention probabilities as stock does.
    output = F.scaled_dot_product_attention(query, key, value, attn_mask=position_bias, dropout_p=dropout_p,
                                            scale=1.0)
    output = output.transpose(1, 2).reshape(batch, query_len, heads * head_dim)
    return self.o(output), position_bias, None


def _projections(self, hidden_states, source):
    """q, k, v: the LoRA layers that share an input as one group node where it applies (lora_group), else each."""
    if source is hidden_states:
        grouped = lora_group.grouped_projections((self.q, self.k, self.v), hidden_states)
        if grouped is not None:
            return grouped
        return self.q(hidden_states), self.k(source), self.v(source)
    grouped = lora_group.grouped_projections((self.k, self.v), source)
    key, value = grouped if grouped is not None else (self.k(source), self.v(source))
    return self.q(hidden_states), key, value


# --------------------------------------------------------------------------- layer norm
def _rms_norm(self, hidden_states: torch.Tensor) -> torch.Tensor:
    """T5LayerNorm's exact rounding with a fused kernel.

    F.rms_norm accumulates half inputs in fp32 (opmath) and rounds once, which is what
    T5LayerNorm's ``(x.float() * rsqrt(var + eps)).to(weight.dtype)`` does; the weight is then
    applied in the weight's dtype, as stock. An fp32 weight (after prepare_model_for_kbit_training)
    gets stock's fp32 result.
    """
    weight = self.weight
    if weight.dtype in (torch.float16, torch.bfloat16):
        return half_rms_norm(hidden_states, weight, self.variance_epsilon)
    return F.rms_norm(hidden_states.float(), (hidden_states.shape[-1],), weight.float(), self.variance_epsilon)


def half_rms_norm(hidden_states: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """T5LayerNorm for a half-precision ``weight`` in torch's fused kernel: fp32 inside, one rounding to the weight's
    dtype, then the weight's multiply in that dtype (the fast training stack's and the decoder's, t5_decode); with
    RMS_NORM_WEIGHT_IN_KERNEL the weight's multiply inside the kernel too, in fp32 before the one rounding."""
    if RMS_NORM_WEIGHT_IN_KERNEL:
        return F.rms_norm(hidden_states, (hidden_states.shape[-1],), weight.to(hidden_states.dtype),
                          eps).to(weight.dtype)
    return weight * F.rms_norm(hidden_states, (hidden_states.shape[-1],), None, eps).to(weight.dtype)


def fast_layer_norm_forward(self, hidden_states):
    """In-block T5LayerNorm: fused RMSNorm whose output is in the compute dtype (feeds q/k/v or wi)."""
    return _rms_norm(self, hidden_states).to(_compute_dtype(self))


def fast_final_layer_norm_forward(self, hidden_states):
    """Final stack norm: fused RMSNorm, output dtype as stock (weight dtype if half, else fp32).

    Stock dtype here keeps lm_head / cross-attention inputs exactly as the stock model types them.
    """
    return _rms_norm(self, hidden_states)


# --------------------------------------------------------------------------- feed-forward
def fast_dense_act_dense_forward(self, hidden_states):
    """T5DenseActDense with ``wo`` fed in the compute dtype (stock upcasts to wo's fp32 weight); in training with
    ``FUSED_RELU_DROPOUT_ATTR`` set (enable_fast_t5's ``fused_ffn_dropout``), ReLU and dropout in one kernel."""
    if _epilogue_relu(self, hidden_states):
        return self.wo(_linear_relu(self.wi, hidden_states).to(_compute_dtype(self)))
    hidden_states = self.wi(hidden_states)
    if self.training and getattr(self, FUSED_RELU_DROPOUT_ATTR, False) and isinstance(self.act, torch.nn.ReLU):
        from sumtune.fast_t5 import ffn_dropout

        if ffn_dropout.fuses_in_model(hidden_states):
            hidden_states = ffn_dropout.relu_dropout(hidden_states, self.dropout.p)
            return self.wo(hidden_states.to(_compute_dtype(self)))
    hidden_states = self.dropout(self.act(hidden_states))
    return self.wo(hidden_states.to(_compute_dtype(self)))


def _epilogue_relu(self, hidden_states) -> bool:
    """Whether the feed-forward's ReLU can run in ``wi``'s GEMM epilogue (FUSED_LINEAR_RELU)."""
    wi = self.wi
    no_dropout = not self.training or self.dropout.p == 0
    no_gradient = not (torch.is_grad_enabled() and (hidden_states.requires_grad or wi.weight.requires_grad))
    return (FUSED_LINEAR_RELU and no_dropout and no_gradient and type(wi) is torch.nn.Linear and wi.bias is None
            and isinstance(self.act, torch.nn.ReLU) and hidden_states.is_cuda
            and wi.weight.dtype in (torch.float16, torch.bfloat16) and hidden_states.dtype == wi.weight.dtype)


def _linear_relu(linear: torch.nn.Linear, hidden_states: torch.Tensor) -> torch.Tensor:
    """relu(linear(hidden_states)) in one GEMM (ReLU in the epilogue; a zero bias, since it takes one)."""
    weight = linear.weight
    flat = hidden_states.reshape(-1, hidden_states.shape[-1])
    out = torch._addmm_activation(weight.new_zeros(weight.shape[0]), flat, weight.t())
    return out.view(*hidden_states.shape[:-1], weight.shape[0])


def fast_dense_gated_act_dense_forward(self, hidden_states):
    """T5DenseGatedActDense (T5 v1.1 / flan) with ``wo`` fed in the compute dtype; in training with
    ``FUSED_GATED_DROPOUT_ATTR`` set (enable_fast_t5's ``fused_gated_ffn``), GELU gate and dropout in one kernel."""
    gate, linear = self.wi_0(hidden_states), self.wi_1(hidden_states)
    if self.training and getattr(self, FUSED_GATED_DROPOUT_ATTR, False):
        from sumtune.fast_t5 import ffn_dropout

        if ffn_dropout.is_tanh_gelu(self.act) and gate.dtype == linear.dtype and ffn_dropout.fuses_in_model(gate):
            hidden_states = ffn_dropout.gated_gelu_dropout(gate, linear, self.dropout.p)
            return self.wo(hidden_states.to(_compute_dtype(self)))
    hidden_states = self.dropout(self.act(gate) * linear)
    return self.wo(hidden_states.to(_compute_dtype(self)))


# --------------------------------------------------------------------------- stack
def _output_flag(self, kwargs: dict, name: str) -> bool:
    value = kwargs.get(name)
    return bool(value if value is not None else getattr(self.config, name, False))


def can_take_fast_route(self, past_key_values, use_cache, kwargs: dict) -> bool:
    """Fast only for cache-free forwards (training, eval loss, the encoder during generate)."""
    if _cache_given(past_key_values, kwargs) or use_cache is True:
        return False
    if kwargs.get("return_dict") is False:
        return False
    return not (_output_flag(self, kwargs, "output_attentions") or _output_flag(self, kwargs, "output_hidden_states"))


def _autocast_context(self, device: torch.device):
    """Autocast to the compute dtype when the stack holds frozen weights in another float dtype.

    That is the case after ``peft.prepare_model_for_kbit_training`` (it upcasts ``wo``, norms and
    embeddings to fp32); without it every fp32 ``nn.Linear`` would run an fp32 GEMM.
    """
    if not getattr(self, "_sumtune_mixed_dtypes", False) or torch.is_autocast_enabled(device.type):
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=_compute_dtype(self))


def _dense_biases(self, first_attention, attention_mask, encoder_hidden_states, encoder_attention_mask,
                  seq_len: int, device: torch.device, dtype: torch.dtype):
    """SDPA route: (self-attention bias with masks folded in, cross-attention key-padding bias or None)."""
    position_bias = bias_lib.relative_position_bias(first_attention, seq_len, seq_len, device, dtype)
    if self.is_decoder:
        self_bias = bias_lib.decoder_self_bias(position_bias, attention_mask)
    else:
        self_bias = bias_lib.encoder_self_bias(position_bias, attention_mask)
    cross_bias = None
    if self.is_decoder and encoder_hidden_states is not None:
        cross_bias = bias_lib.cross_attention_bias(encoder_attention_mask, dtype)
    return self_bias, cross_bias


def _flash_inputs(self, first_attention, attention_mask, encoder_hidden_states, encoder_attention_mask,
                  seq_len: int, dtype: torch.dtype):
    """Triton route: bias table + key padding for self-attention, key padding for cross-attention; no L x L."""
    self_inputs = attention_lib.self_attention_inputs(first_attention, seq_len, attention_mask, dtype,
                                                      causal=self.is_decoder)
    cross_inputs = None
    if self.is_decoder and encoder_hidden_states is not None:
        cross_inputs = attention_lib.cross_attention_inputs(encoder_attention_mask)
    return self_inputs, cross_inputs


def fast_stack_forward(self, input_ids=None, attention_mask=None, encoder_hidden_states=None,
                       encoder_attention_mask=None, inputs_embeds=None, past_key_values=None,
                       use_cache=None, **kwargs):
    """T5Stack: attention inputs built once per stack (for the chosen backend), blocks called with them."""
    if not can_take_fast_route(self, past_key_values, use_cache, kwargs):
        return type(self).forward(self, input_ids=input_ids, attention_mask=attention_mask,
                                  encoder_hidden_states=encoder_hidden_states,
                                  encoder_attention_mask=encoder_attention_mask, inputs_embeds=inputs_embeds,
                                  use_cache=use_cache, **_with_past(past_key_values), **kwargs)
    from transformers.modeling_outputs import BaseModelOutputWithPastAndCrossAttentions

    if (input_ids is None) == (inputs_embeds is None):
        raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
    if inputs_embeds is None:
        inputs_embeds = self.embed_tokens(input_ids)
    dtype = _compute_dtype(self)
    device = inputs_embeds.device
    seq_len = inputs_embeds.shape[1]
    with _autocast_context(self, device):
        first_attention = self.block[0].layer[0].SelfAttention
        backend = attention_lib.choose_backend(getattr(self, attention_lib.BACKEND_ATTR, "auto"), device, dtype,
                                               first_attention.key_value_proj_dim, first_attention)
        if backend == "triton":
            self_bias, cross_bias = _flash_inputs(self, first_attention, attention_mask, encoder_hidden_states,
                                                  encoder_attention_mask, seq_len, dtype)
        else:
            self_bias, cross_bias = _dense_biases(self, first_attention, attention_mask, encoder_hidden_states,
                                                  encoder_attention_mask, seq_len, device, dtype)

        hidden_states = self.dropout(inputs_embeds)
        for block in self.block:
            # Positional order matches T5Block.forward; tensors positional for reentrant checkpointing.
            hidden_states = block(hidden_states, None, self_bias, encoder_hidden_states, None, cross_bias,
                                  **{FAST_KW: True})[0]
        hidden_states = self.dropout(self.final_layer_norm(hidden_states))
    return BaseModelOutputWithPastAndCrossAttentions(last_hidden_state=hidden_states, past_key_values=None)
