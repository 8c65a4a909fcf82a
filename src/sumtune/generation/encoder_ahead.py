"""The next batch's encoder run beside the current batch's greedy decoding (`generate_ids`, `OVERLAP_ENCODER`).

Why: at long inputs the two halves of generation want different parts of the GPU. The encoder (4096 tokens a row)
is matmul-bound; the decoder's cross-attention reads every row's encoder states each step and is bound by memory
bandwidth (an H100, 1024 rows x 4096 -> 512: ~29 ms of encoder and ~43 ms of decoding a summary, one after the
other). Enqueued on a second CUDA stream, the next batch's encoder chunks can fill what the decoding steps leave idle.

The host enqueues encoder chunks (``encoder_batch_size`` rows each) between decoding steps, at most
``CHUNKS_IN_FLIGHT`` not yet finished on the GPU: a whole batch's encoder enqueued at once (tens of thousands of
launches) would fill the launch queue and block the host, and with it the decoding steps it has to enqueue; one
chunk at a time would leave the side stream idle from a chunk's end to the host's next look, which comes only after
the decoder's periodic "all rows done?" sync. The chunks are the
ones `decoding.encode` runs, so the encoder states, and the tokens, are the same with or without it.
"""

from __future__ import annotations

import contextlib
from collections import deque

import torch
from torch import Tensor, nn

CHUNKS_IN_FLIGHT = 2  # one running, one queued behind it


class EncoderAhead:
    """Encoder states [B, S, D] of ``ids``/``mask``, computed ``chunk`` rows at a time on a side stream.

    `advance()` (between decoding steps) enqueues chunks while fewer than CHUNKS_IN_FLIGHT are unfinished;
    `finish()` enqueues what is left and makes the current stream wait for all of it, then returns the states. On a
    CPU each `advance()` runs one chunk in place (no stream), which keeps the interleaving for tests.
    """

    def __init__(self, model: nn.Module, ids: Tensor, mask: Tensor, chunk: int):
        self.model, self.ids, self.mask, self.chunk = model, ids, mask, chunk
        self.starts = list(range(0, ids.shape[0], chunk))
        self.enqueued = 0
        encoder = model.get_encoder()
        dtype = encoder.final_layer_norm.weight.dtype  # T5LayerNorm returns its weight's dtype
        # allocated on the current stream, which goes on to read it; the side stream first waits for what the
        # current stream has queued, so it never writes memory a queued kernel still reads
        self.states = torch.empty(ids.shape[0], ids.shape[1], model.config.d_model, dtype=dtype, device=ids.device)
        self.stream = torch.cuda.Stream(ids.device) if ids.device.type == "cuda" else None
        if self.stream is not None:
            self.stream.wait_stream(torch.cuda.current_stream(ids.device))
        self._in_flight: deque[torch.cuda.Event] = deque()

    @property
    def done_enqueuing(self) -> bool:
        return self.enqueued == len(self.starts)

    def advance(self) -> None:
        """Enqueue chunks while fewer than CHUNKS_IN_FLIGHT are unfinished (never waits)."""
        if self.stream is None:
            if not self.done_enqueuing:
                self._enqueue_next()
            return
        while self._in_flight and self._in_flight[0].query():
            self._in_flight.popleft()
        while not self.done_enqueuing and len(self._in_flight) < CHUNKS_IN_FLIGHT:
            self._enqueue_next()

    def finish(self) -> Tensor:
        while not self.done_enqueuing:
            self._enqueue_next()
        if self.stream is not None:
            torch.cuda.current_stream(self.ids.device).wait_stream(self.stream)
        return self.states

    def _enqueue_next(self) -> None:
        start = self.starts[self.enqueued]
        rows = slice(start, start + self.chunk)
        context = torch.cuda.stream(self.stream) if self.stream is not None else contextlib.nullcontext()
        with context:
            part = self.model.encoder(input_ids=self.ids[rows], attention_mask=self.mask[rows]).last_hidden_state
            self.states[rows].copy_(part)
            if self.stream is not None:
                done = torch.cuda.Event()
                done.record(self.stream)
                self._in_flight.append(done)
        self.enqueued += 1
