"""`generate_ids`: batched decoding (greedy on sumtune's decoder step, or beam search) for a dense T5 (the copy
`sumtune.generation.dense_copy.prepare_inference_model` makes)."""

from __future__ import annotations

import contextlib
import weakref
from typing import Callable, Iterator, Sequence

import torch
from torch import Tensor, nn

from sumtune.batching import pad_batch
from sumtune.errors import SumtuneError
from sumtune.generation.greedy import GreedySession, trim_rows
from sumtune.generation.t5_decode import ATTENTION_MODES, DecoderWeights, cross_groups

GRAPH_PAD_MULTIPLE = 64  # with CUDA graphs, pad source length to a multiple of this so shapes (graphs) repeat


def generate_ids(
    model: nn.Module,
    input_ids: Sequence[Sequence[int]],
    *,
    pad_token_id: int,
    eos_token_id: int,
    decoder_start_token_id: int,
    max_new_tokens: int,
    num_beams: int = 1,
    batch_size: int = 32,
    length_penalty: float = 1.0,
    use_cuda_graphs: bool | None = None,
    min_new_tokens: int = 0,
    encoder_batch_size: int = 16,
    attention: str = "auto",
    compile_step: bool = False,
    early_stopping: bool | str = False,
    pad_to_multiple_of: int | None = None,
    fast_encoder: bool = True,
    no_repeat_ngram_size: int = 0,
    slice_cross_attention: bool = True,
    on_batch_done: Callable[[int], None] | None = None,
) -> list[list[int]]:
    """Generated token ids for each input, in input order.

    Each result is what transformers' `generate` returns for that row minus the decoder start token and
    minus trailing padding: it ends with `eos_token_id` if eos was produced (nothing after it), otherwise it
    holds exactly `max_new_tokens` tokens. No logits processors are applied besides `min_new_tokens`
    (eos forbidden before it), whatever the model's generation_config says.

    Inputs are sorted by length (longest first) and batched, each batch padded to its own longest input
    (rounded up to `pad_to_multiple_of`: default 64 with CUDA graphs so graphs get reused, else 1); in sumtune's
    decoder, slices of a batch's rows read only their own longest source in cross-attention
    (`t5_decode.cross_groups`; `slice_cross_attention=False`: every row reads the batch's width, for A/B timing).
    The encoder runs once per batch in chunks of `encoder_batch_size`, through sumtune's fast T5 forwards unless
    `fast_encoder=False`.
    Greedy (`num_beams == 1`) runs sumtune's own decoder step on static buffers,
    captured in CUDA graphs on CUDA (`use_cuda_graphs=None` means "on CUDA"), stopping when all rows are
    done; the session (buffers and graphs) is kept for the model, for the next call with the same shapes.
    `attention` picks how attention memory is cached ("kv", "hidden", "fused", or "auto"; see t5_decode).
    Beam search runs transformers' `generate` on the same model with the precomputed encoder output, and so does
    greedy decoding with `no_repeat_ngram_size` (sumtune's decoder step has no n-gram ban: `uses_own_decoder`).
    `on_batch_done(rows)` is called after each batch (a progress bar).
    """
    _check_arguments(model, input_ids, max_new_tokens, min_new_tokens, num_beams, batch_size, attention)
    device = next(model.parameters()).device
    graphs = device.type == "cuda" if use_cuda_graphs is None else use_cuda_graphs
    if graphs and device.type != "cuda":
        raise SumtuneError("use_cuda_graphs=True needs the model on a CUDA device.")
    pad_multiple = pad_to_multiple_of or (GRAPH_PAD_MULTIPLE if graphs else 1)
    order = sorted(range(len(input_ids)), key=lambda i: -len(input_ids[i]))  # stable: ties keep input order
    batches = [order[start:start + batch_size] for start in range(0, len(order), batch_size)]
    results: list[list[int]] = [[] for _ in input_ids]
    if not batches:
        return results
    encoder_context = _fast_encoder(model) if fast_encoder else contextlib.nullcontext()
    own = uses_own_decoder(num_beams=num_beams, no_repeat_ngram_size=no_repeat_ngram_size)
    with torch.inference_mode(), _eval_mode(model), encoder_context:
        weights = DecoderWeights.from_model(model) if own else None
        for rows in batches:
            ids, mask = pad_batch([input_ids[i] for i in rows], pad_token_id, pad_multiple)
            ids, mask = ids.to(device, non_blocking=True), mask.to(device, non_blocking=True)
            encoder_out = encode(model, ids, mask, encoder_batch_size)
            if weights is None:
                outputs = beam_search(model, encoder_out, mask, pad_token_id=pad_token_id,
                                      eos_token_id=eos_token_id, decoder_start_token_id=decoder_start_token_id,
                                      max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens,
                                      num_beams=num_beams, length_penalty=length_penalty,
                                      early_stopping=early_stopping, no_repeat_ngram_size=no_repeat_ngram_size)
            else:
                mode = weights.resolve_attention(attention, src_len=ids.shape[1], rows=ids.shape[0])
                lengths = [len(input_ids[i]) for i in rows]
                # "fused" reads each row's own length already: no slices, so no new graphs per batch layout
                groups = cross_groups(lengths, ids.shape[1]) if slice_cross_attention and mode != "fused" else None
                session = _session_for(model, weights, batch=ids.shape[0], src_len=ids.shape[1], cross_groups=groups,
                                       max_new_tokens=max_new_tokens, attention=mode,
                                       pad_token_id=pad_token_id, eos_token_id=eos_token_id,
                                       use_cuda_graphs=graphs, compile_step=compile_step)
                outputs = session.run(encoder_out, mask, decoder_start_token_id=decoder_start_token_id,
                                      min_new_tokens=min_new_tokens)
            del encoder_out
            for row, out in zip(rows, outputs):
                results[row] = out
            if on_batch_done is not None:
                on_batch_done(len(rows))
    return results


def uses_own_decoder(*, num_beams: int = 1, no_repeat_ngram_size: int = 0) -> bool:
    """Whether `generate_ids` runs sumtune's greedy decoder step (greedy, no n-gram ban) rather than transformers'
    `generate` on the cached encoder output (beam search, or `no_repeat_ngram_size`)."""
    return num_beams == 1 and not no_repeat_ngram_size


# model -> (options key, session). Weak keys: the session holds the model's weight tensors but not the model, so
# dropping the model (evaluation drops its dense copy after each run) frees the session with it, without a GC cycle.
_SESSIONS: "weakref.WeakKeyDictionary[nn.Module, tuple[tuple, GreedySession]]" = weakref.WeakKeyDictionary()


def _session_for(model: nn.Module, weights: DecoderWeights, **options) -> GreedySession:
    """The model's cached greedy session when its shapes, options and weight storage match, else a new one.

    Evaluation calls `generate_ids` chunk by chunk; rebuilding buffers and re-capturing CUDA graphs for every
    chunk costs more than a batch. One session is kept per model (the last shape), so memory stays bounded.
    """
    key = (tuple(sorted(options.items())), tuple(p.data_ptr() for p in model.parameters()))
    cached = _SESSIONS.get(model)
    if cached is not None and cached[0] == key:
        return cached[1]
    _SESSIONS.pop(model, None)  # free the previous shape's buffers and graphs first
    session = GreedySession(weights, **options)
    _SESSIONS[model] = (key, session)
    return session


def cached_session(model: nn.Module) -> GreedySession | None:
    """The greedy session `generate_ids` keeps for `model`, if any."""
    cached = _SESSIONS.get(model)
    return cached[1] if cached else None


def release_generation_cache(model: nn.Module) -> None:
    """Drop the greedy session (buffers, CUDA graphs) that `generate_ids` keeps for `model`."""
    _SESSIONS.pop(model, None)


@contextlib.contextmanager
def _fast_encoder(model: nn.Module) -> Iterator[None]:
    """sumtune's fast T5 forwards on the encoder for the duration (left as they are if already enabled)."""
    from sumtune.fast_t5 import disable_fast_t5, enable_fast_t5, is_fast_t5_enabled

    encoder = model.get_encoder()
    if is_fast_t5_enabled(encoder):
        yield
        return
    enable_fast_t5(encoder)
    try:
        yield
    finally:
        disable_fast_t5(encoder)


def _check_arguments(model, input_ids, max_new_tokens, min_new_tokens, num_beams, batch_size, attention) -> None:
    from transformers import T5ForConditionalGeneration

    if not isinstance(model, T5ForConditionalGeneration):
        raise SumtuneError("generate_ids needs a dense T5ForConditionalGeneration; "
                           "call prepare_inference_model on the training model first.")
    if getattr(model, "is_quantized", False) or getattr(model, "hf_quantizer", None) is not None:
        raise SumtuneError("generate_ids needs dense weights; call prepare_inference_model on the quantized model.")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise SumtuneError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}.")
    if not 0 <= min_new_tokens <= max_new_tokens:
        raise SumtuneError(f"min_new_tokens must be between 0 and max_new_tokens, got {min_new_tokens}.")
    if num_beams < 1 or batch_size < 1:
        raise SumtuneError("num_beams and batch_size must be at least 1.")
    if attention not in ATTENTION_MODES:
        raise SumtuneError(f"attention must be one of {', '.join(ATTENTION_MODES)}, got {attention!r}.")
    if any(len(ids) == 0 for ids in input_ids):
        raise SumtuneError("Every input must have at least one token.")


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """Dropout off while generating; the caller's train/eval mode is restored afterwards."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def encode(model: nn.Module, ids: Tensor, mask: Tensor, chunk: int) -> Tensor:
    """Encoder output [B, S, D], computed `chunk` rows at a time to bound attention-bias memory."""
    parts = [model.encoder(input_ids=ids[i:i + chunk], attention_mask=mask[i:i + chunk]).last_hidden_state
             for i in range(0, ids.shape[0], chunk)]
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def beam_search(model: nn.Module, encoder_out: Tensor, mask: Tensor, *, pad_token_id: int, eos_token_id: int,
                decoder_start_token_id: int, max_new_tokens: int, min_new_tokens: int, num_beams: int,
                length_penalty: float, early_stopping: bool | str, no_repeat_ngram_size: int = 0) -> list[list[int]]:
    """transformers `generate` (beam search, or greedy with an n-gram ban) from a precomputed encoder output (the
    encoder is not run again)."""
    from transformers.modeling_outputs import BaseModelOutput

    beam_options = {"length_penalty": length_penalty, "early_stopping": early_stopping} if num_beams > 1 else {}
    sequences = model.generate(
        encoder_outputs=BaseModelOutput(last_hidden_state=encoder_out), attention_mask=mask,
        decoder_start_token_id=decoder_start_token_id, pad_token_id=pad_token_id, eos_token_id=eos_token_id,
        bos_token_id=None, max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens or None,
        num_beams=num_beams, num_return_sequences=1, do_sample=False,
        no_repeat_ngram_size=no_repeat_ngram_size or None, **beam_options)
    return trim_rows(sequences[:, 1:].tolist(), eos_token_id)
