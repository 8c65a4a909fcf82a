"""Batching: tokenized examples → padded tensor batches, epoch by epoch, for one process or for one rank of many.

- `pad_batch` / `Collator`: right-pad to the longest row of the batch (dynamic padding), or with `pad_to_buckets`
  up to a small fixed set of widths (`bucket_width`), so compiled code meets few distinct shapes;
- `epoch_batches`: the batches of indices of one epoch, fully determined by (seed, epoch);
- `Batches`: this process's micro-batches, resumable at any sample.

Data-parallel contract (W ranks with micro-batch B ≡ one process with micro-batch B×W, tested on CPU): every rank
draws the same global batches of B×W examples and takes a contiguous slice of each (`shard_indices`); each rank's
loss is weighted by its share of the global batch's label tokens ×W (`loss_scale`, undoing DDP's mean), so the
all-reduced gradient is the gradient of the global token-mean loss. One process is the plain case: its slice is
the whole batch and its batches carry no `loss_scale`. The position is counted in samples seen, so a run resumed
on another number of processes continues at the same sample.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterator, Sequence

import torch

if TYPE_CHECKING:
    from sumtune.data import TokenizedExample

# `pad_to_buckets` widths: sources up to a multiple of 128 tokens, targets of 32, capped at max_*_tokens. At the
# default 1024/128 that is at most 8 × 4 shapes, and a row gains at most 127 / 31 pad tokens.
SOURCE_BUCKET_TOKENS = 128
TARGET_BUCKET_TOKENS = 32


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """A host batch on `device` (pinned host tensors copy without blocking the host)."""
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def bucket_width(length: int, step: int, cap: int) -> int:
    """`length` rounded up to a multiple of `step`, but never past `cap` (nor below `length`)."""
    return max(length, min(cap, -(-length // step) * step))


def pad_batch(sequences: Sequence[Sequence[int]], pad_id: int, multiple: int = 1,
              width: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad to `width`, or to the longest sequence rounded up to `multiple`; ids and attention mask."""
    if width is None:
        width = -(-max(len(s) for s in sequences) // multiple) * multiple
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, seq in enumerate(sequences):
        ids[i, : len(seq)] = torch.as_tensor(list(seq), dtype=torch.long)
        mask[i, : len(seq)] = 1
    return ids, mask


@dataclass(frozen=True)
class Collator:
    """Examples → `{"input_ids", "attention_mask", "labels"}` (labels -100 where padded, ignored by the loss).

    `bucket_caps` = (max_source_tokens, max_target_tokens) turns on bucketed widths (`bucket_width`); None pads
    each batch to its own longest row. A plain dataclass, so DataLoader workers can pickle it.
    """

    pad_id: int
    bucket_caps: tuple[int, int] | None = None

    def widths(self, examples: Sequence["TokenizedExample"]) -> tuple[int | None, int | None]:
        if self.bucket_caps is None:
            return None, None
        longest_source = max(len(e.input_ids) for e in examples)
        longest_target = max(len(e.labels) for e in examples)
        return (bucket_width(longest_source, SOURCE_BUCKET_TOKENS, self.bucket_caps[0]),
                bucket_width(longest_target, TARGET_BUCKET_TOKENS, self.bucket_caps[1]))

    def __call__(self, examples: Sequence["TokenizedExample"]) -> dict[str, torch.Tensor]:
        source_width, target_width = self.widths(examples)
        input_ids, attention_mask = pad_batch([e.input_ids for e in examples], self.pad_id, width=source_width)
        labels, label_mask = pad_batch([e.labels for e in examples], self.pad_id, width=target_width)
        labels[label_mask == 0] = -100
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def collate(examples: Sequence["TokenizedExample"], pad_id: int) -> dict[str, torch.Tensor]:
    """One batch padded to its longest row (see `Collator`)."""
    return Collator(pad_id)(examples)


def epoch_batches(lengths: list[int], batch_size: int, *, seed: int, epoch: int, shuffle: bool = True,
                  group_by_length: bool = False) -> list[list[int]]:
    """The batches of indices for one epoch, fully determined by (seed, epoch).

    With `group_by_length`, indices are shuffled, cut into mega-batches of 50 batches, and sorted by length
    inside each, so every batch holds similar lengths while the epoch order stays random.
    """
    order = list(range(len(lengths)))
    if shuffle:
        random.Random(seed * 1_000_003 + epoch).shuffle(order)
    if group_by_length:
        mega = batch_size * 50
        order = [i for start in range(0, len(order), mega)
                 for i in sorted(order[start:start + mega], key=lambda j: -lengths[j])]
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    if group_by_length and shuffle:
        random.Random(seed * 7_919 + epoch).shuffle(batches)  # don't always start with the longest batch
    return batches


def shard_indices(global_batch: Sequence[int], rank: int, world: int) -> tuple[list[int], bool]:
    """This rank's contiguous slice of one global batch, and whether it is a padding stand-in.

    Slices differ in size by at most one; a full batch of B×W gives every rank B. When a (last, short) batch
    has fewer samples than ranks, a rank left empty gets the batch's first sample as padding with loss weight
    0, so every rank still runs the step (DDP needs all ranks in every all-reduce).
    """
    n = len(global_batch)
    base, extra = divmod(n, world)
    start = rank * base + min(rank, extra)
    size = base + (1 if rank < extra else 0)
    if size == 0:
        return list(global_batch[:1]), True
    return list(global_batch[start:start + size]), False


def chunk(items: Sequence[int], size: int) -> list[list[int]]:
    return [list(items[i:i + size]) for i in range(0, len(items), size)]


def batches_from(batches: list[list[int]], start_sample: int, batch_size: int) -> list[list[int]]:
    """The rest of an epoch's batches after `start_sample` samples of it were seen.

    At a batch boundary: the remaining batches as they are (an exact resume); mid-batch (the run was saved
    under another global batch size): the remaining samples in the same order, re-cut into batches.
    """
    if start_sample <= 0:
        return batches
    seen = 0
    for k, batch in enumerate(batches):
        if seen == start_sample:
            return batches[k:]
        seen += len(batch)
    flat = [i for b in batches for i in b]
    return chunk(flat[start_sample:], batch_size)


class Batches:
    """This process's micro-batches: global batches of `batch_size × world_size` examples cut into rank slices.

    `epoch(e, start_sample)` yields one epoch's micro-batches, `stream(start_sample)` an endless stream across
    epochs; `samples_seen` counts the samples (all ranks together) handed out so far: the resume position.
    Collation runs in DataLoader workers when `num_workers` > 0.
    """

    def __init__(self, examples: list["TokenizedExample"], batch_size: int, collator: Collator, *, seed: int,
                 group_by_length: bool = False, shuffle: bool = True, rank: int = 0, world_size: int = 1,
                 num_workers: int = 0, pin_memory: bool = False):
        self.examples = examples
        self.batch_size = batch_size  # per rank (the micro-batch)
        self.global_batch_size = batch_size * world_size
        self.collator = collator
        self.seed, self.group_by_length, self.shuffle = seed, group_by_length, shuffle
        self.rank, self.world_size = rank, world_size
        self.num_workers, self.pin_memory = num_workers, pin_memory
        self.lengths = [len(e.input_ids) + len(e.labels) for e in examples]
        self.samples_seen = 0

    def batches_per_epoch(self) -> int:
        return -(-len(self.examples) // self.global_batch_size)

    def global_batches(self, epoch: int, start_sample: int = 0) -> list[list[int]]:
        batches = epoch_batches(self.lengths, self.global_batch_size, seed=self.seed, epoch=epoch,
                                shuffle=self.shuffle, group_by_length=self.group_by_length)
        return batches_from(batches, start_sample, self.global_batch_size)

    def _loss_scale(self, global_batch: list[int], local: list[int], padding: bool) -> float:
        if padding:
            return 0.0
        label_tokens = sum(len(self.examples[i].labels) for i in global_batch)
        local_tokens = sum(len(self.examples[i].labels) for i in local)
        return local_tokens * self.world_size / max(1, label_tokens)

    def epoch(self, epoch: int, start_sample: int = 0) -> Iterator[dict[str, torch.Tensor]]:
        """This rank's batches of one epoch, from sample `start_sample` of it on."""
        global_batches = self.global_batches(epoch, start_sample)
        shards = [shard_indices(g, self.rank, self.world_size) for g in global_batches]
        loader = torch.utils.data.DataLoader(
            self.examples, batch_sampler=[local for local, _ in shards], collate_fn=self.collator,
            num_workers=self.num_workers, pin_memory=self.pin_memory, persistent_workers=False)
        for batch, global_batch, (local, padding) in zip(loader, global_batches, shards):
            if self.world_size > 1:  # one process: untouched batches, the plain token-mean loss
                batch["loss_scale"] = torch.tensor(self._loss_scale(global_batch, local, padding))
            self.samples_seen += len(global_batch)
            yield batch

    def stream(self, start_sample: int = 0) -> Iterator[dict[str, torch.Tensor]]:
        """Endless micro-batches from global sample `start_sample` on (epochs of `len(examples)` samples).

        Each DataLoader iterator draws a seed from torch's global generator; a resumed run creates one where the
        uninterrupted run did not, so the draw is undone: data loading never shifts the dropout masks.
        """
        epoch, offset = divmod(start_sample, len(self.examples))
        self.samples_seen = start_sample
        while True:
            batches = self.epoch(epoch, start_sample=offset)
            while True:
                rng = torch.get_rng_state()
                batch = next(batches, None)
                torch.set_rng_state(rng)
                if batch is None:
                    break
                yield batch
            epoch, offset = epoch + 1, 0
