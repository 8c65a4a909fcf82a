"""One greedy T5 decoder step on static buffers, written against the module weights directly.

Every tensor the step reads or writes lives in a `DecodeState` allocated once per batch shape, and the
step has no host synchronisation, so it can be captured in a CUDA graph and replayed.

Two ways to run attention over a memory (encoder output for cross-attention, earlier decoder positions
for self-attention), chosen by `attention`:
- "kv": cache the projected keys/values (as transformers does): reads 2*H*d_kv numbers per memory token.
- "hidden": cache the memory itself (the encoder output, or each layer's normed decoder input) and move the
  key/value projections to the query side: score_h = (W_k,h^T q_h) . x_j and out_h = W_v,h (sum_j p_hj x_j).
  Reads d_model numbers per token, 4x fewer bytes than "kv" for t5-3b (H*d_kv = 4096 vs d_model = 1024),
  and needs no key/value cache memory beyond the hidden states. Same maths, different bf16 rounding.
- "fused": "hidden", with cross-attention in one Triton kernel (sumtune.generation.cross_attention) that reads each
  row's real encoder states once for scores and values together, instead of two GEMMs that each read all padded
  states (CUDA; on an H200 at 4096 keys faster than the two GEMMs at 256 rows, 1.29 vs 1.45 ms a layer and step,
  slower at 64, 0.88 vs 0.42, results/decode_attention_head_groups-2026-12-03-h200.json; in whole generation at
  4096/512 faster at batch 32, 64 and 256 alike, at 1024/128 from 256 rows: "auto" picks it there, AUTO_FUSED_FROM).
  With FUSED_SELF_ATTENTION (on) the self-attention too, where the kernel's Gluon form runs.

Cross-attention reads the encoder memory of every row at every step: at 4096/512 most of the decoder's time.
A batch's rows (sorted longest first) are cut into a few slices (`cross_groups`), each attending only to its own
longest source, so padding is not read 512 times over; padded keys have zero probability, so the maths is the same.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sumtune.fast_t5.modules import half_rms_norm

ATTENTION_MODES = ("auto", "kv", "hidden", "fused")
CROSS_GROUPS = 8  # at most this many row slices per batch, each attending to its own source length
CROSS_GROUP_MULTIPLE = 256  # slice lengths rounded up to this: fewer distinct shapes (CUDA graphs) per batch
CROSS_GROUP_MIN_SAVING = 0.1  # slice only when it leaves out at least this share of the padded keys
# "auto" takes "fused" on CUDA for a batch whose padded width and rows reach one of these (min source tokens, min rows),
# measured on an H200 with greedy tokens equal to transformers' in every mode. Above 1024 tokens at any batch: real
# bills cut at 4096 6.06 -> 6.39 summaries/s at batch 32, 6.13 -> 9.86 at 64, 13.78 -> 16.78 at 256, every input 4096
# tokens 8.09 -> 8.97 (results/generate_throughput_4096_512_{b32,fused,full_length_fused}-2026-12-03-h200.json). At
# 1024 only from 256 rows: 75.6 -> 79.7 at batch 256, 81.2 -> 86.0 at 512, but 35.4 -> 31.9 at 32 and 65.3 -> 59.3 at
# 128 (…_1024_128_{fused,small_batches}-2026-12-03-h200.json). Narrower batches were not measured: "hidden" there.
AUTO_FUSED_FROM = ((1025, 1), (1024, 256))
# "auto" keeps "kv" for a model whose heads x d_kv equal its d_model (FLAN-T5-XL) only where every layer's keys and
# values fit in this share of what the GPU has free; else "hidden" (the states cached once). FLAN-T5-XL shapes at 4096
# -> 512 on an H100: kv 5.03 summaries/s at 64 rows (66 GiB), out of memory at 128 and 256 rows; hidden 4.28 / 4.54 /
# 4.71 at 64 / 128 / 256 rows (16 / 21 / 31 GiB) (results/generate_throughput-2026-12-06-h100-80gb-hbm3-
# flan-hidden256.json). The other 20% leaves room for the decoding step's own buffers.
KV_CACHE_SHARE_OF_FREE = 0.8
# The decoder's T5LayerNorm as torch's fused RMSNorm kernel (fp32 inside, one rounding: fast_t5.modules.half_rms_norm,
# the fast training stack's) and the weight's multiply: two kernels where the ops below take seven (a cast, the
# square, the mean, the epsilon, rsqrt, the multiply, the cast back), ~22 us of a decode step's ~26.5 ms per norm,
# 73 norms a step (T5-3b, 256 rows: results/logs/encoder_gluonenc_s34-2026-12-04-h200.log's step profile). Its mean
# sums in another order, so a variance may differ by an ulp. On since 2026-12-05: whole generation with every input
# 4096 tokens 12.23 vs 11.97 summaries/s alone, 12.49 with FUSED_SELF_ATTENTION, greedy tokens equal to transformers'
# (results/generate_throughput-2026-12-05-h200-full-selfgluon.json). Benchmark token `nodecodermsnorm` turns it off.
FUSED_RMS_NORM = True
# In "fused" mode the self-attention too in the fused kernel where its Gluon form runs (a Hopper GPU, bf16: with the
# step's position bias, over the step + 1 positions written so far) instead of two GEMMs over the bucket's kv_len
# positions and a softmax between them (~154 us a layer at kv_len 512 and 256 rows, of a 26.5 ms step: results/logs/
# encoder_gluonenc_s34-2026-12-04-h200.log). In the Triton kernel it was not faster (whole generation 10.04 against
# 10.26 summaries/s with the lazy rescaling, results/generate_throughput-2026-12-04-h200-full-s30.json): that one
# runs it only in Triton's CPU interpreter (tests). On since 2026-12-05: 12.20 vs 11.97 summaries/s alone, 12.49 with
# FUSED_RMS_NORM, tokens equal (results/generate_throughput-2026-12-05-h200-full-selfgluon.json). Token `noselfgluon`.
FUSED_SELF_ATTENTION = True


def free_gpu_bytes(device: torch.device) -> int:
    """What the device has free plus what torch's caching allocator holds unused."""
    free, _ = torch.cuda.mem_get_info(device)
    return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)


@dataclass
class LayerWeights:
    ln_self: Tensor
    q: Tensor
    k: Tensor
    v: Tensor
    o: Tensor
    ln_cross: Tensor
    cq: Tensor
    ck: Tensor
    cv: Tensor
    co: Tensor
    ln_ff: Tensor
    wi: tuple[Tensor, ...]  # (wi,) for relu/gelu, (wi_0, wi_1) for gated
    wo: Tensor


@dataclass
class DecoderWeights:
    """References (not copies) to the decoder weights of a dense `T5ForConditionalGeneration`."""

    embed: Tensor
    layers: list[LayerWeights]
    final_ln: Tensor
    lm_head: Tensor
    relative_bias: nn.Module  # decoder block 0 SelfAttention (has the bucket function and the table)
    act: Callable[[Tensor], Tensor]
    n_heads: int
    d_kv: int
    d_model: int
    eps: float
    scale_output: bool

    @classmethod
    def from_model(cls, model: nn.Module) -> "DecoderWeights":
        decoder = model.decoder
        layers = []
        for block in decoder.block:
            self_attn, cross_attn, ff = block.layer[0], block.layer[1], block.layer[2]
            sa, ca, dense = self_attn.SelfAttention, cross_attn.EncDecAttention, ff.DenseReluDense
            wi = (dense.wi_0.weight, dense.wi_1.weight) if hasattr(dense, "wi_0") else (dense.wi.weight,)
            layers.append(LayerWeights(
                self_attn.layer_norm.weight, sa.q.weight, sa.k.weight, sa.v.weight, sa.o.weight,
                cross_attn.layer_norm.weight, ca.q.weight, ca.k.weight, ca.v.weight, ca.o.weight,
                ff.layer_norm.weight, wi, dense.wo.weight))
        first = decoder.block[0].layer[0].SelfAttention
        return cls(
            embed=decoder.embed_tokens.weight, layers=layers, final_ln=decoder.final_layer_norm.weight,
            lm_head=model.lm_head.weight, relative_bias=first,
            act=decoder.block[0].layer[2].DenseReluDense.act, n_heads=first.n_heads,
            d_kv=first.key_value_proj_dim, d_model=model.config.d_model,
            eps=decoder.final_layer_norm.variance_epsilon,
            scale_output=bool(getattr(model.config, "scale_decoder_outputs", True)))

    @property
    def dtype(self) -> torch.dtype:
        return self.embed.dtype

    def kv_cache_bytes(self, src_len: int, rows: int) -> int:
        """Bytes the "kv" mode caches for ``rows`` sources of ``src_len`` tokens: every layer's keys and values."""
        return 2 * len(self.layers) * rows * src_len * self.n_heads * self.d_kv * self.dtype.itemsize

    def kv_cache_fits(self, src_len: int, rows: int) -> bool:
        """Whether those keys and values fit in KV_CACHE_SHARE_OF_FREE of the GPU's free memory (always off CUDA)."""
        if not self.embed.is_cuda:
            return True
        return self.kv_cache_bytes(src_len, rows) <= KV_CACHE_SHARE_OF_FREE * free_gpu_bytes(self.embed.device)

    def resolve_attention(self, attention: str, src_len: int | None = None, rows: int = 1) -> str:
        """"auto" -> "hidden" when caching hidden states reads fewer bytes than caching keys/values, and "fused"
        instead on CUDA, where its kernel runs, for a batch of ``rows`` sources padded to ``src_len`` tokens that
        reaches AUTO_FUSED_FROM; "kv" otherwise, unless its caches would not fit the GPU (`kv_cache_fits`): then
        "hidden". A "fused" asked for is refused (one sentence) where its kernel cannot run."""
        from sumtune.generation.cross_attention import kernel_available

        if attention == "auto":
            if self.n_heads * self.d_kv <= self.d_model:
                return "kv" if src_len is None or self.kv_cache_fits(src_len, rows) else "hidden"
            measured_faster = src_len is not None and any(src_len >= tokens and rows >= min_rows
                                                          for tokens, min_rows in AUTO_FUSED_FROM)
            on_gpu = measured_faster and self.embed.is_cuda and kernel_available(self.embed) is None
            return "fused" if on_gpu else "hidden"
        if attention == "fused":
            reason = kernel_available(self.embed)
            if reason is not None:
                from sumtune.errors import SumtuneError

                raise SumtuneError(f"attention 'fused' cannot run here: {reason}.")
        return attention


@dataclass
class DecodeState:
    """Static buffers of one batch shape; the step reads and updates them in place."""

    tokens: Tensor  # [B] token fed at this step
    step: Tensor  # [1] index of the token being produced
    finished: Tensor  # [B] saw eos
    out: Tensor  # [B, T] produced tokens (pad after eos)
    self_bias: Tensor  # [T, H, T] relative bias of query t over key j; future keys hold dtype-min
    eos_bias: Tensor  # [T] float32: -inf while step < min_new_tokens, else 0
    cross_bias: Tensor  # [B, 1, 1, S] 0 for real encoder tokens, dtype-min for padding
    cross_groups: tuple[tuple[int, int, int], ...]  # (first row, end row, source tokens read) per row slice
    self_memory: list[tuple[Tensor, ...]] = field(default_factory=list)  # per layer: (K, V) or (X,)
    cross_memory: list[tuple[Tensor, ...]] = field(default_factory=list)  # per layer: (K, V) or (enc,)
    cross_lengths: Tensor | None = None  # [B] int32 source lengths: "fused" mode's kernel reads only these keys
    self_kernel: str | None = None  # FUSED_SELF_ATTENTION's kernel ("gluon"; "triton" in the interpreter), or None


def cross_groups(lengths: Sequence[int], src_len: int, groups: int | None = None, multiple: int | None = None,
                 min_saving: float | None = None) -> tuple[tuple[int, int, int], ...]:
    """Row slices of a batch whose source `lengths` are sorted longest first: (first row, end row, source tokens
    the slice attends to), the slice's longest source rounded up to `multiple` (at most `src_len`, the padded
    width). Up to `groups` equal slices; neighbours of equal length merge; one slice over `src_len` when slicing
    would leave out less than `min_saving` of the padded keys. Unset, each is the module's constant as it is at the
    call (CROSS_GROUPS, CROSS_GROUP_MULTIPLE, CROSS_GROUP_MIN_SAVING: benchmarks/generate_throughput.py --slicing
    sweeps the first two)."""
    groups = CROSS_GROUPS if groups is None else groups
    multiple = CROSS_GROUP_MULTIPLE if multiple is None else multiple
    min_saving = CROSS_GROUP_MIN_SAVING if min_saving is None else min_saving
    batch = len(lengths)
    whole = ((0, batch, src_len),)
    if batch == 0 or src_len <= 0:
        return whole
    if any(a < b for a, b in zip(lengths, lengths[1:])):
        raise ValueError("cross_groups needs the rows sorted longest first")
    size = -(-batch // groups)
    slices: list[tuple[int, int, int]] = []
    for start in range(0, batch, size):
        stop = min(start + size, batch)
        keys = min(src_len, -(-max(lengths[start], 1) // multiple) * multiple)
        if slices and slices[-1][2] == keys:
            slices[-1] = (slices[-1][0], stop, keys)
        else:
            slices.append((start, stop, keys))
    read = sum((stop - start) * keys for start, stop, keys in slices)
    return tuple(slices) if read <= (1 - min_saving) * batch * src_len else whole


def new_state(w: DecoderWeights, batch: int, src_len: int, max_new_tokens: int, attention: str,
              device: torch.device, groups: tuple[tuple[int, int, int], ...] | None = None) -> DecodeState:
    """Buffers for `batch` rows of `src_len` source tokens; `groups` from :func:`cross_groups` (None: one slice)."""
    groups = groups or ((0, batch, src_len),)
    if groups[0][0] != 0 or groups[-1][1] != batch or any(a[1] != b[0] for a, b in zip(groups, groups[1:])) \
            or any(not 0 < keys <= src_len for _, _, keys in groups):
        raise ValueError(f"cross-attention groups {groups} do not tile {batch} rows of {src_len} source tokens")
    dtype, heads, d_kv, steps = w.dtype, w.n_heads, w.d_kv, max_new_tokens
    long = dict(dtype=torch.long, device=device)
    state = DecodeState(
        tokens=torch.zeros(batch, **long), step=torch.zeros(1, **long),
        finished=torch.zeros(batch, dtype=torch.bool, device=device),
        out=torch.zeros(batch, steps, **long),
        self_bias=self_bias_table(w, steps, device),
        eos_bias=torch.zeros(steps, dtype=torch.float32, device=device),
        cross_bias=torch.zeros(batch, 1, 1, src_len, dtype=dtype, device=device), cross_groups=groups)

    def zeros(*shape):
        return torch.zeros(*shape, dtype=dtype, device=device)
    if attention == "kv":
        state.self_memory = [(zeros(batch, heads, steps, d_kv), zeros(batch, heads, steps, d_kv)) for _ in w.layers]
        state.cross_memory = [(zeros(batch, heads, src_len, d_kv), zeros(batch, heads, src_len, d_kv))
                              for _ in w.layers]
    else:
        state.self_memory = [(zeros(batch, steps, w.d_model),) for _ in w.layers]
        encoder_out = zeros(batch, src_len, w.d_model)  # one buffer shared by all layers
        state.cross_memory = [(encoder_out,) for _ in w.layers]
        if attention == "fused":
            state.cross_lengths = torch.zeros(batch, dtype=torch.int32, device=device)
            if FUSED_SELF_ATTENTION:
                from sumtune.generation.cross_attention import self_attention_kernel

                state.self_kernel = self_attention_kernel(state.self_memory[0][0])
    return state


@torch.no_grad()
def self_bias_table(w: DecoderWeights, steps: int, device: torch.device) -> Tensor:
    """Decoder relative position bias for every (query step, key position), future keys masked: [T, H, T]."""
    from sumtune.fast_t5.bias import decoder_self_bias, relative_position_bias

    bias = decoder_self_bias(relative_position_bias(w.relative_bias, steps, steps, device, w.dtype), None)
    return bias[0].permute(1, 0, 2).contiguous()


@torch.no_grad()
def load_batch(state: DecodeState, w: DecoderWeights, encoder_out: Tensor, encoder_mask: Tensor,
               decoder_start_token_id: int, pad_token_id: int, min_new_tokens: int) -> None:
    """Reset the state for a new batch: encoder memory, masks, empty self-attention memory."""
    state.tokens.fill_(decoder_start_token_id)
    state.step.zero_()
    state.finished.zero_()
    state.out.fill_(pad_token_id)
    state.eos_bias.zero_()
    state.eos_bias[:min_new_tokens] = float("-inf")
    bias = torch.zeros(encoder_mask.shape, dtype=w.dtype, device=encoder_mask.device)
    state.cross_bias.copy_(bias.masked_fill(encoder_mask == 0, torch.finfo(w.dtype).min)[:, None, None, :])
    if state.cross_lengths is not None:
        lengths = encoder_mask.sum(dim=-1)
        positions = torch.arange(encoder_mask.shape[-1], device=encoder_mask.device)
        if not torch.equal(positions[None, :] < lengths[:, None], encoder_mask != 0):  # one sync a batch
            from sumtune.errors import SumtuneError

            raise SumtuneError("attention 'fused' needs right-padded inputs (each row's tokens first, then padding).")
        state.cross_lengths.copy_(lengths)
    for memory in state.self_memory:
        for buf in memory:
            buf.zero_()  # stale values are masked, but must not be inf/nan (0 * nan = nan)
    batch, src_len, _ = encoder_out.shape
    for lw, memory in zip(w.layers, state.cross_memory):
        if len(memory) == 1:
            memory[0].copy_(encoder_out)
        else:
            for buf, weight in zip(memory, (lw.ck, lw.cv)):
                buf.copy_(F.linear(encoder_out, weight).view(batch, src_len, w.n_heads, w.d_kv).transpose(1, 2))


def rms_norm(h: Tensor, weight: Tensor, eps: float) -> Tensor:
    """T5LayerNorm, with the same casts (fp32 variance, cast back before the scale); FUSED_RMS_NORM: in torch's fused
    kernel for a half-precision weight."""
    if FUSED_RMS_NORM and weight.dtype in (torch.float16, torch.bfloat16):
        return half_rms_norm(h, weight, eps)
    variance = h.to(torch.float32).pow(2).mean(-1, keepdim=True)
    h = h * torch.rsqrt(variance + eps)
    if weight.dtype in (torch.float16, torch.bfloat16):
        h = h.to(weight.dtype)
    return weight * h


def kv_attention(q: Tensor, k: Tensor, v: Tensor, bias: Tensor) -> Tensor:
    """q [B,H,1,dk] over cached k/v [B,H,L,dk]; T5 does not scale scores."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=1.0)


def hidden_attention(q: Tensor, wk: Tensor, wv: Tensor, memory: Tensor, bias: Tensor | None,
                     groups: Sequence[tuple[int, int, int]] | None = None, lengths: Tensor | None = None,
                     position_bias: Tensor | None = None) -> Tensor:
    """q [B,H,dk] over memory [B,L,D] with the k/v projections wk, wv [H*dk, D] moved to the query side; bias
    [B,1,L] or [1,H,L]. `groups`: (first row, end row, keys) slices that each read only their first keys.
    `lengths` [B] int32: the fused kernel over each row's first keys instead (`bias` unused: padding only), adding
    `position_bias` [H, >= L] (one row a head, every batch row alike) if given."""
    batch, heads, d_kv = q.shape
    wk_h = wk.view(heads, d_kv, -1)
    q_mem = torch.bmm(q.transpose(0, 1), wk_h).transpose(0, 1)  # [B,H,D], a view the fused kernels read in place
    if lengths is not None:
        from sumtune.generation.cross_attention import fused_hidden_attention

        ctx_mem = fused_hidden_attention(q_mem, memory, lengths, bias=position_bias)
    elif groups is None or (len(groups) == 1 and groups[0][2] >= memory.shape[1]):
        ctx_mem = _attend_hidden(q_mem, memory, bias)
    else:
        ctx_mem = torch.cat([_attend_hidden(q_mem[start:stop], memory[start:stop, :keys], bias[start:stop, :, :keys])
                             for start, stop, keys in groups])
    ctx = torch.bmm(ctx_mem.transpose(0, 1), wv.view(heads, d_kv, -1).transpose(1, 2))  # [H,B,dk]
    return ctx.transpose(0, 1).reshape(batch, heads * d_kv)  # [B, H*dk]


def _attend_hidden(q_mem: Tensor, memory: Tensor, bias: Tensor) -> Tensor:
    scores = torch.bmm(q_mem, memory.transpose(1, 2))  # [B,H,L]
    # bias added in the model dtype, softmax in float32, as transformers' T5Attention does (the upcast happens
    # inside the softmax kernel: two passes over [B,H,L] fewer than adding float32 copies)
    probs = torch.softmax(scores + bias, dim=-1, dtype=torch.float32).to(memory.dtype)
    return torch.bmm(probs, memory)  # [B,H,D]


def grouped_kv_attention(q: Tensor, k: Tensor, v: Tensor, bias: Tensor,
                         groups: Sequence[tuple[int, int, int]]) -> Tensor:
    """kv_attention over row slices that each read only their first keys (see `cross_groups`)."""
    if len(groups) == 1 and groups[0][2] >= k.shape[2]:
        return kv_attention(q, k, v, bias)
    return torch.cat([kv_attention(q[start:stop], k[start:stop, :, :keys], v[start:stop, :, :keys],
                                   bias[start:stop, ..., :keys]) for start, stop, keys in groups])


def _clamp_fp16(h: Tensor) -> Tensor:
    if h.dtype != torch.float16:
        return h
    big = torch.finfo(h.dtype).max
    limit = torch.where(torch.isinf(h).any(), big - 1000, big)
    return torch.clamp(h, min=-limit, max=limit)


def decode_step(w: DecoderWeights, state: DecodeState, kv_len: int, pad_token_id: int, eos_token_id: int) -> None:
    """Produce the token at position `state.step` for every row and advance. Attends to the first `kv_len`
    self-attention positions (a static size >= step + 1; later positions are masked anyway)."""
    batch, heads, d_kv = state.tokens.shape[0], w.n_heads, w.d_kv
    step = state.step
    h = F.embedding(state.tokens, w.embed)  # [B, D]
    step_bias = state.self_bias.index_select(0, step)  # [1, H, T]
    self_bias = step_bias[:, :, :kv_len]  # [1, H, L]
    # FUSED_SELF_ATTENTION: the kernel reads the step + 1 positions written so far, whatever the bucket
    self_lengths = (step + 1).to(torch.int32).expand(batch) if state.self_kernel else None
    for lw, self_mem, cross_mem in zip(w.layers, state.self_memory, state.cross_memory):
        n = rms_norm(h, lw.ln_self, w.eps)
        q = F.linear(n, lw.q)
        if len(self_mem) == 2:
            k_cache, v_cache = self_mem
            k_cache.index_copy_(2, step, F.linear(n, lw.k).view(batch, heads, 1, d_kv))
            v_cache.index_copy_(2, step, F.linear(n, lw.v).view(batch, heads, 1, d_kv))
            attn = kv_attention(q.view(batch, heads, 1, d_kv), k_cache[:, :, :kv_len], v_cache[:, :, :kv_len],
                                self_bias.unsqueeze(2)).reshape(batch, heads * d_kv)
        else:
            x_cache = self_mem[0]
            x_cache.index_copy_(1, step, n.unsqueeze(1))
            if self_lengths is None:
                attn = hidden_attention(q.view(batch, heads, d_kv), lw.k, lw.v, x_cache[:, :kv_len], self_bias)
            else:
                attn = hidden_attention(q.view(batch, heads, d_kv), lw.k, lw.v, x_cache, None, lengths=self_lengths,
                                        position_bias=step_bias[0])
        h = _clamp_fp16(h + F.linear(attn, lw.o))

        n = rms_norm(h, lw.ln_cross, w.eps)
        q = F.linear(n, lw.cq)
        if len(cross_mem) == 2:
            attn = grouped_kv_attention(q.view(batch, heads, 1, d_kv), *cross_mem, state.cross_bias,
                                        state.cross_groups)
            attn = attn.reshape(batch, heads * d_kv)
        else:
            attn = hidden_attention(q.view(batch, heads, d_kv), lw.ck, lw.cv, cross_mem[0], state.cross_bias[:, 0],
                                    state.cross_groups, state.cross_lengths)
        h = _clamp_fp16(h + F.linear(attn, lw.co))

        n = rms_norm(h, lw.ln_ff, w.eps)
        if len(lw.wi) == 2:
            x = w.act(F.linear(n, lw.wi[0])) * F.linear(n, lw.wi[1])
        else:
            x = w.act(F.linear(n, lw.wi[0]))
        if x.dtype != lw.wo.dtype and lw.wo.dtype != torch.int8:
            x = x.to(lw.wo.dtype)
        h = _clamp_fp16(h + F.linear(x, lw.wo))

    h = rms_norm(h, w.final_ln, w.eps)
    if w.scale_output:
        h = h * (w.d_model ** -0.5)
    logits = F.linear(h, w.lm_head).float()  # transformers also takes argmax over float32 copies
    logits[:, eos_token_id] += state.eos_bias.index_select(0, step)
    next_tokens = torch.where(state.finished, pad_token_id, logits.argmax(dim=-1))
    state.out.index_copy_(1, step, next_tokens.unsqueeze(1))
    state.finished |= next_tokens == eos_token_id
    state.tokens.copy_(next_tokens)
    state.step += 1


def kv_buckets(max_new_tokens: int, smallest: int = 16) -> list[int]:
    """Static self-attention lengths: each step attends to the smallest bucket covering it."""
    buckets, size = [], smallest
    while size < max_new_tokens:
        buckets.append(size)
        size *= 2
    return buckets + [max_new_tokens]


def bucket_for_step(step: int, buckets: list[int]) -> int:
    return next(b for b in buckets if b > step)
