"""The encoder's runs for `decoding.generate_ids`: in turn on the caller's stream, or ahead on a side stream while
the previous batch decodes (decoding.ENCODER_AHEAD).

Ahead, the encoder's chunks are launched a few at a time as the side stream finishes them (`Encoding.advance`,
which the decode loop calls between its steps): queueing a whole 256-row encoder at once (thousands of kernels)
would fill CUDA's launch queue, and the host would then wait inside a launch with the decode loop's replays behind
it. The side stream has CUDA's lowest priority; the decode loop's stream waits for its last kernel only when it
takes the result.
"""

from __future__ import annotations

from typing import Iterator

import torch
from torch import Tensor, nn

CHUNKS_IN_FLIGHT = 2  # encoder chunks queued on the side stream at once: one running, one behind it (no gap)


def encode(model: nn.Module, ids: Tensor, mask: Tensor, chunk: int) -> Tensor:
    """Encoder output [B, S, D], computed `chunk` rows at a time to bound attention-bias memory."""
    return _joined(list(_chunk_outputs(model, ids, mask, chunk)))


def _chunk_outputs(model: nn.Module, ids: Tensor, mask: Tensor, chunk: int) -> Iterator[Tensor]:
    """The encoder's output for each `chunk` rows, computed as the iterator is advanced."""
    for i in range(0, ids.shape[0], chunk):
        yield model.encoder(input_ids=ids[i:i + chunk], attention_mask=mask[i:i + chunk]).last_hidden_state


def _joined(parts: list[Tensor]) -> Tensor:
    return parts[0] if len(parts) == 1 else torch.cat(parts)


class Encoding:
    """One batch's encoder output, computed at once (in turn) or chunk by chunk on a side stream (ahead)."""

    def __init__(self, model: nn.Module, ids: Tensor, mask: Tensor, chunk: int,
                 stream: "torch.cuda.Stream | None" = None):
        self.ids, self.mask, self.stream = ids, mask, stream
        self._in_flight: list[torch.cuda.Event] = []
        if stream is None:
            self._out: Tensor | None = encode(model, ids, mask, chunk)
            self._chunks: Iterator[Tensor] | None = None
            return
        self._out = None
        self._parts: list[Tensor] = []
        stream.wait_stream(torch.cuda.current_stream())  # the inputs' copies
        self._chunks = _chunk_outputs(model, ids, mask, chunk)
        self.advance()

    def advance(self) -> None:
        """Launch the next chunks while fewer than CHUNKS_IN_FLIGHT are unfinished on the side stream (never
        waits for the GPU)."""
        if self._chunks is None:
            return
        while self._in_flight and self._in_flight[0].query():
            self._in_flight.pop(0)
        while len(self._in_flight) < CHUNKS_IN_FLIGHT and self._launch_next():
            pass

    def _launch_next(self) -> bool:
        if self._chunks is None:
            return False
        with torch.cuda.stream(self.stream):
            part = next(self._chunks, None)
            if part is None:
                self._chunks = None
                return False
            self._parts.append(part)
            done = torch.cuda.Event()
            done.record(self.stream)
        self._in_flight.append(done)
        return True

    def result(self) -> tuple[Tensor, Tensor, Tensor]:
        """(ids, mask, encoder output), the caller's stream ordered after the encoder's last kernel."""
        if self._out is None:
            while self._launch_next():
                pass
            with torch.cuda.stream(self.stream):
                self._out = _joined(self._parts)
                done = torch.cuda.Event()
                done.record(self.stream)
            self._parts = []
            reader = torch.cuda.current_stream()
            reader.wait_event(done)
            # made on the side stream: its memory must not go back to that stream's pool (the next batch's
            # encoder) before the decode loop has copied it
            self._out.record_stream(reader)
        return self.ids, self.mask, self._out


class BatchEncoder:
    """Starts each batch's `Encoding`: in turn on the caller's stream, or, with ``side_stream``, on one side stream
    of CUDA's lowest priority (0) kept for the whole call."""

    def __init__(self, model: nn.Module, chunk: int, side_stream: bool = False):
        self.model, self.chunk = model, chunk
        device = next(model.parameters()).device
        self.stream = torch.cuda.Stream(device=device, priority=0) if side_stream else None

    def start(self, ids: Tensor, mask: Tensor) -> Encoding:
        return Encoding(self.model, ids, mask, self.chunk, self.stream)
