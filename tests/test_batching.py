"""Batching: padding (per batch and bucketed), epoch order, and the data-parallel contract of `Batches`
(W ranks together see the batches one process sees, loss weights give the global token mean, resume on any
world size continues at the same sample)."""

from __future__ import annotations

import random

import pytest
import torch

from sumtune.batching import (SOURCE_BUCKET_TOKENS, TARGET_BUCKET_TOKENS, Batches, Collator, batches_from,
                              bucket_width, collate, epoch_batches, shard_indices)
from sumtune.data import TokenizedExample, tokenize_rows
from sumtune.demo_data import build_word_tokenizer, demo_records


def make_examples(n: int, seed: int = 0, max_source: int = 12, max_target: int = 9) -> list[TokenizedExample]:
    """Examples whose first input id is their index (so batches can be traced back) and random lengths."""
    rng = random.Random(seed)
    return [TokenizedExample([i + 10] + [5] * rng.randint(0, max_source), [7] * rng.randint(1, max_target) + [1])
            for i in range(n)]


def sample_ids(batch: dict[str, torch.Tensor]) -> list[int]:
    return [int(x) - 10 for x in batch["input_ids"][:, 0]]


def batches(examples, batch_size, *, seed, rank=0, world=1, group_by_length=False, pad_id=0) -> Batches:
    return Batches(examples, batch_size, Collator(pad_id), seed=seed, group_by_length=group_by_length, rank=rank,
                   world_size=world)


# ---- padding -----------------------------------------------------------------------------------------------

def test_tokenize_truncates_and_collate_pads_labels_with_minus_100():
    records = demo_records(8)
    tokenizer = build_word_tokenizer([r["text"] + " " + r["summary"] for r in records])
    limits = dict(prefix="summarize: ", max_source_tokens=12, max_target_tokens=5)
    examples = tokenize_rows(tokenizer, records, **limits)
    assert all(len(e.input_ids) <= 12 and e.input_ids[-1] == tokenizer.eos_token_id for e in examples)
    assert all(len(e.labels) <= 5 for e in examples)
    short = tokenize_rows(tokenizer, [{"text": "a b", "summary": "one"}], **limits)[0]
    batch = collate([examples[0], short], tokenizer.pad_token_id)
    assert batch["input_ids"].shape == batch["attention_mask"].shape
    assert batch["labels"].shape[1] == max(len(examples[0].labels), len(short.labels))
    assert (batch["labels"][1, len(short.labels):] == -100).all()
    assert (batch["attention_mask"][1, len(short.input_ids):] == 0).all()


def test_bucket_width_rounds_up_to_the_step_and_stops_at_the_cap():
    assert [bucket_width(n, 128, 1024) for n in (1, 128, 129, 900, 1024)] == [128, 128, 256, 1024, 1024]
    assert bucket_width(30, 32, 24) == 30 and bucket_width(20, 32, 24) == 24  # never below the row, capped


def test_pad_to_buckets_gives_few_shapes_and_the_same_tokens():
    """Random lengths up to 1000/120: dynamic padding makes nearly one width per batch, buckets at most
    8 source × 4 target widths; the real tokens, masks and labels are the same either way."""
    examples = make_examples(400, seed=1, max_source=999, max_target=119)
    plain, bucketed = Collator(0), Collator(0, bucket_caps=(1024, 128))
    order = epoch_batches([0] * len(examples), 4, seed=0, epoch=0)
    plain_shapes, bucket_shapes = set(), set()
    for indices in order:
        rows = [examples[i] for i in indices]
        a, b = plain(rows), bucketed(rows)
        plain_shapes.add((a["input_ids"].shape[1], a["labels"].shape[1]))
        bucket_shapes.add((b["input_ids"].shape[1], b["labels"].shape[1]))
        assert b["input_ids"].shape[1] % SOURCE_BUCKET_TOKENS == 0 and b["labels"].shape[1] % TARGET_BUCKET_TOKENS == 0
        for key in a:  # the extra columns are padding: pad id, mask 0, label -100
            width = a[key].shape[1]
            assert torch.equal(b[key][:, :width], a[key])
        assert (b["attention_mask"][:, a["input_ids"].shape[1]:] == 0).all()
        assert (b["labels"][:, a["labels"].shape[1]:] == -100).all()
    assert len(bucket_shapes) <= 8 * 4 < len(plain_shapes)


def test_pad_to_buckets_is_a_training_setting():
    from sumtune.config import TrainConfig
    from sumtune.training import collator_for

    cfg = TrainConfig(max_source_tokens=96, max_target_tokens=24, pad_to_buckets=True)
    batch = collator_for(cfg, 0)(make_examples(3, max_source=20, max_target=5))
    assert tuple(batch["input_ids"].shape[1:]) == (96,) and tuple(batch["labels"].shape[1:]) == (24,)
    assert collator_for(TrainConfig(), 0).bucket_caps is None  # off by default


# ---- epoch order -----------------------------------------------------------------------------------------------

def test_length_grouped_batches_cover_every_row_once_and_hold_similar_lengths():
    lengths = [(i * 37) % 101 for i in range(400)]
    grouped = epoch_batches(lengths, 8, seed=0, epoch=1, group_by_length=True)
    flat = sorted(i for b in grouped for i in b)
    assert flat == list(range(400))
    spread = sum(max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in grouped) / len(grouped)
    plain = epoch_batches(lengths, 8, seed=0, epoch=1)
    plain_spread = sum(max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in plain) / len(plain)
    assert spread < plain_spread / 4
    assert epoch_batches(lengths, 8, seed=0, epoch=1, group_by_length=True) == grouped
    assert epoch_batches(lengths, 8, seed=0, epoch=2, group_by_length=True) != grouped


# ---- one process is the plain case of many -----------------------------------------------------------------

@pytest.mark.parametrize("n", [1, 2, 3, 7, 8, 9, 16])
@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_shard_indices_partition_the_global_batch(n, world):
    batch = list(range(100, 100 + n))
    shards = [shard_indices(batch, r, world) for r in range(world)]
    real = [s for s, padding in shards if not padding]
    assert [i for s in real for i in s] == batch  # contiguous slices, in order, nothing lost or repeated
    sizes = [len(s) for s in real]
    assert max(sizes) - min(sizes) <= 1
    padded = [s for s, padding in shards if padding]
    assert len(padded) == max(0, world - n) and all(s == batch[:1] for s in padded)


@pytest.mark.parametrize("group_by_length", [False, True])
@pytest.mark.parametrize("world", [2, 3])
def test_ranks_together_see_the_one_process_batches(group_by_length, world):
    examples = make_examples(23)
    micro = 2
    single = batches(examples, micro * world, seed=3, group_by_length=group_by_length)
    ranks = [batches(examples, micro, seed=3, rank=r, world=world, group_by_length=group_by_length)
             for r in range(world)]
    assert all(r.batches_per_epoch() == single.batches_per_epoch() for r in ranks)
    for epoch in (0, 1):
        expected = [sample_ids(b) for b in single.epoch(epoch)]
        per_rank = [list(r.epoch(epoch)) for r in ranks]
        for step, want in enumerate(expected):
            got = [i for r in range(world) if per_rank[r][step]["loss_scale"] > 0
                   for i in sample_ids(per_rank[r][step])]
            assert got == want


def test_loss_scale_gives_the_global_token_mean():
    """Σ_r scale_r × mean_r / W == mean over all label tokens of the global batch (what DDP's mean computes)."""
    examples = make_examples(11, seed=5)
    world, micro = 3, 2
    ranks = [batches(examples, micro, seed=1, rank=r, world=world) for r in range(world)]
    token_loss = {i: torch.rand(len(e.labels), generator=torch.Generator().manual_seed(i), dtype=torch.float64)
                  for i, e in enumerate(examples)}
    streams = [list(r.epoch(0)) for r in ranks]
    for step, global_batch in enumerate(ranks[0].global_batches(0)):
        expected = torch.cat([token_loss[i] for i in global_batch]).mean()
        combined = 0.0
        for r in range(world):
            batch = streams[r][step]
            local_mean = torch.cat([token_loss[i] for i in sample_ids(batch)]).mean()  # T5: mean over labels
            combined += float(batch["loss_scale"]) * float(local_mean)
        assert combined / world == pytest.approx(float(expected), rel=1e-6)  # loss_scale is float32


def test_one_process_batches_are_the_plain_batches():
    """World size 1: each batch is exactly `collate` of the epoch's index batch, with no `loss_scale`."""
    examples = make_examples(9)
    order = epoch_batches([len(e.input_ids) + len(e.labels) for e in examples], 4, seed=2, epoch=1)
    got = list(batches(examples, 4, seed=2).epoch(1))
    assert len(got) == len(order)
    for batch, indices in zip(got, order):
        want = collate([examples[i] for i in indices], 0)
        assert batch.keys() == want.keys()  # no loss_scale key: the single-GPU path computes the plain mean
        assert all(torch.equal(batch[k], want[k]) for k in want)


@pytest.mark.parametrize("new_world,new_micro", [(1, 3), (2, 2), (4, 1), (3, 2)])
def test_resume_on_another_world_size_continues_at_the_same_sample(new_world, new_micro):
    """2 ranks × 2 run 6 steps across the end of epoch 0 (17 samples: 4+4+4+4+1, then 4): 21 samples seen.

    Any new layout (processes × micro-batch) then continues with sample 22 of the same order.
    """
    examples = make_examples(17)
    old = [batches(examples, 2, seed=4, rank=r, world=2) for r in range(2)]
    old_streams = [o.stream() for o in old]
    for _ in range(6):
        for s in old_streams:
            next(s)
    seen = old[0].samples_seen
    assert seen == 21 and old[1].samples_seen == 21
    order = [i for e in range(3) for b in epoch_batches([0] * 17, 1, seed=4, epoch=e) for i in b]
    new = [batches(examples, new_micro, seed=4, rank=r, world=new_world) for r in range(new_world)]
    new_streams = [n.stream(start_sample=seen) for n in new]
    got: list[int] = []
    while len(got) < 20:
        drawn = [next(s) for s in new_streams]
        got += [i for b in drawn if float(b.get("loss_scale", 1.0)) > 0 for i in sample_ids(b)]
    assert got[:20] == order[21:41]
    assert new[0].samples_seen == seen + len(got)


def test_resume_mid_batch_recuts_the_rest_in_order():
    cut = [[5, 6, 7], [1, 2, 3], [4, 0]]
    assert batches_from(cut, 3, 3) == [[1, 2, 3], [4, 0]]  # at a boundary: as they were
    assert batches_from(cut, 4, 2) == [[2, 3], [4, 0]]
    assert batches_from(cut, 0, 2) == cut


def test_the_stream_leaves_the_dropout_generator_alone():
    """Starting an epoch's DataLoader draws from torch's generator; the stream undoes it (a resumed run creates
    loaders where the uninterrupted one did not, and must draw the same dropout masks)."""
    stream = batches(make_examples(6), 2, seed=0).stream()
    torch.manual_seed(123)
    before = torch.get_rng_state()
    for _ in range(7):  # across two epoch boundaries
        next(stream)
    assert torch.equal(torch.get_rng_state(), before)
