"""sumtune.generation.batch_encoder: the encoder's chunks launched ahead on a side stream a few at a time.

The pacing is host-side logic; here CUDA's stream and events are stood in for by objects whose completion the test
decides, and the encoder is a real tiny T5's (CPU). The GPU test in test_generation runs it on real streams."""

from __future__ import annotations

import contextlib

import pytest
import torch
from transformers import T5Config, T5ForConditionalGeneration

from sumtune.generation import batch_encoder


class FakeEvent:
    """A CUDA event whose completion the test sets: `query()` is True once the GPU is "past" it."""
    finished_up_to = 0  # events with a number below this have completed
    made = 0

    def __init__(self):
        self.number = None

    def record(self, stream):
        self.number = FakeEvent.made
        FakeEvent.made += 1

    def query(self):
        return self.number < FakeEvent.finished_up_to


class FakeStream:
    def __init__(self):
        self.waited = []

    def wait_stream(self, other):
        pass

    def wait_event(self, event):
        self.waited.append(event.number)


@pytest.fixture
def fake_cuda(monkeypatch):
    reader = FakeStream()
    FakeEvent.finished_up_to, FakeEvent.made = 0, 0
    monkeypatch.setattr(torch.cuda, "Event", FakeEvent)
    monkeypatch.setattr(torch.cuda, "stream", lambda stream: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "current_stream", lambda *a: reader)
    monkeypatch.setattr(torch.Tensor, "record_stream", lambda self, stream: None)
    return reader


def tiny_t5():
    config = T5Config(vocab_size=64, d_model=16, d_kv=4, d_ff=32, num_layers=1, num_heads=4, dropout_rate=0.0)
    return T5ForConditionalGeneration(config).eval()


def test_chunks_launch_as_the_side_stream_finishes_them_and_the_result_is_the_whole_encoder(fake_cuda):
    model = tiny_t5()
    ids = torch.randint(1, 64, (10, 7))
    mask = torch.ones_like(ids)
    mask[3:, 5:] = 0
    calls = []
    forward = model.encoder.forward
    model.encoder.forward = lambda **kw: calls.append(kw["input_ids"].shape[0]) or forward(**kw)
    with torch.no_grad():
        expected = batch_encoder.encode(model, ids, mask, 3)
        calls.clear()
        encoding = batch_encoder.Encoding(model, ids, mask, 3, stream=FakeStream())
        assert calls == [3, 3]  # CHUNKS_IN_FLIGHT launched at once, no more
        encoding.advance()
        assert calls == [3, 3]  # nothing finished: advance does not wait and launches nothing
        FakeEvent.finished_up_to = 1  # the first chunk done
        encoding.advance()
        assert calls == [3, 3, 3]
        FakeEvent.finished_up_to = 3
        encoding.advance()
        assert calls == [3, 3, 3, 1]  # the last chunk: 10 rows in chunks of 3
        encoding.advance()
        assert calls == [3, 3, 3, 1]
        got_ids, got_mask, out = encoding.result()
    assert got_ids is ids and got_mask is mask
    assert torch.equal(out, expected)
    assert fake_cuda.waited == [FakeEvent.made - 1]  # the reader waits for the event after the concatenation


def test_the_result_launches_the_chunks_not_yet_launched(fake_cuda):
    model = tiny_t5()
    ids = torch.randint(1, 64, (8, 5))
    calls = []
    forward = model.encoder.forward
    model.encoder.forward = lambda **kw: calls.append(kw["input_ids"].shape[0]) or forward(**kw)
    with torch.no_grad():
        encoding = batch_encoder.Encoding(model, ids, torch.ones_like(ids), 2, stream=FakeStream())
        assert len(calls) == batch_encoder.CHUNKS_IN_FLIGHT
        _, _, out = encoding.result()  # the decode loop ended before the GPU finished any chunk
    assert calls == [2, 2, 2, 2] and out.shape == (8, 5, 16)


def test_in_turn_the_encoder_runs_at_once_with_no_stream():
    model = tiny_t5()
    ids = torch.randint(1, 64, (5, 4))
    with torch.no_grad():
        encoding = batch_encoder.Encoding(model, ids, torch.ones_like(ids), 2)
        encoding.advance()  # nothing to do
        _, _, out = encoding.result()
        assert torch.equal(out, batch_encoder.encode(model, ids, torch.ones_like(ids), 2))
