"""Greedy decoding of one padded batch on static buffers: eager steps, or replays of CUDA graphs."""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from sumtune.generation.t5_decode import (
    DecodeState, DecoderWeights, bucket_for_step, decode_step, kv_buckets, load_batch, new_state)


class GreedySession:
    """Buffers (and, on CUDA, captured graphs) for one (batch, source length, cross-attention slices) shape; reused
    across batches. `cross_groups`: from `t5_decode.cross_groups` (None: every row reads all `src_len` keys)."""

    def __init__(self, weights: DecoderWeights, *, batch: int, src_len: int, max_new_tokens: int,
                 attention: str, pad_token_id: int, eos_token_id: int, use_cuda_graphs: bool,
                 compile_step: bool = False, check_every_steps: int = 16,
                 cross_groups: tuple[tuple[int, int, int], ...] | None = None):
        self.weights = weights
        self.shape = (batch, src_len)
        self.max_new_tokens = max_new_tokens
        self.pad_token_id, self.eos_token_id = pad_token_id, eos_token_id
        self.check_every_steps = check_every_steps
        self.buckets = kv_buckets(max_new_tokens)
        self.state: DecodeState = new_state(weights, batch, src_len, max_new_tokens, attention,
                                            weights.embed.device, cross_groups)
        step_fn: Callable[..., None] = decode_step
        if compile_step:
            step_fn = torch.compile(decode_step, fullgraph=True, dynamic=False)
        self._step_fn = step_fn
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        if use_cuda_graphs:
            self._capture()

    def _eager_step(self, kv_len: int) -> None:
        self._step_fn(self.weights, self.state, kv_len, self.pad_token_id, self.eos_token_id)

    def _capture(self) -> None:
        """One warm-up step per bucket on a side stream (cuBLAS/compile set-up), then one graph per bucket.
        The warm-up dirties the buffers; `run` resets them before every batch."""
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for kv_len in self.buckets:
                self._eager_step(kv_len)
        torch.cuda.current_stream().wait_stream(side)
        pool = torch.cuda.graph_pool_handle()  # intermediates only; all state lives in self.state
        for kv_len in self.buckets:
            self.state.step.zero_()  # keep index_copy_ in range while capturing
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self._eager_step(kv_len)
            self.graphs[kv_len] = graph
        torch.cuda.synchronize()

    def _step(self, kv_len: int) -> None:
        graph = self.graphs.get(kv_len)
        if graph is None:
            self._eager_step(kv_len)
        else:
            graph.replay()

    def run(self, encoder_out: Tensor, encoder_mask: Tensor, *, decoder_start_token_id: int,
            min_new_tokens: int = 0, stop_when_done: bool = True) -> list[list[int]]:
        """Greedy tokens per row: no decoder start token, eos included when produced (then stop)."""
        load_batch(self.state, self.weights, encoder_out, encoder_mask, decoder_start_token_id,
                   self.pad_token_id, min_new_tokens)
        for step in range(self.max_new_tokens):
            self._step(bucket_for_step(step, self.buckets))
            done_check = (step + 1) % self.check_every_steps == 0 and step + 1 >= min_new_tokens
            if stop_when_done and done_check and bool(self.state.finished.all()):
                break  # rows that finished only append pad from here on
        return trim_rows(self.state.out.tolist(), self.eos_token_id)


def trim_rows(rows: list[list[int]], eos_token_id: int) -> list[list[int]]:
    """Cut each row after its first eos (kept); rows without eos ran to max_new_tokens and stay whole."""
    trimmed = []
    for row in rows:
        if eos_token_id in row:
            row = row[: row.index(eos_token_id) + 1]
        trimmed.append(row)
    return trimmed
