"""Data-parallel training on PyTorch's own engine: torchrun / `accelerate launch` + DistributedDataParallel.

Every rank holds the whole (4-bit) base and the LoRA adapter; only the adapter's gradients are all-reduced.
Launchers export RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT; without them this is one process
and everything here is a no-op (the single-GPU path is untouched).

Equivalence contract (tested on CPU): W ranks with micro-batch B and accumulation A compute the same optimizer
steps as one process with micro-batch B×W and accumulation A. For that,
- every rank builds the same global batches (`epoch_batches` with batch size B×W) and takes a contiguous
  slice of each (`shard_indices`);
- each rank's loss is weighted by its share of the global micro-batch's label tokens (×W, undoing DDP's mean),
  so the all-reduced gradient is the gradient of the global token-mean loss, as in one process.
The data position is counted in samples seen (`ShardedBatches.samples_seen`), so a run resumed on another
number of processes continues at the same sample.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import torch

from sumtune.progress import Progress


# ---- process group ---------------------------------------------------------------------------------------

@dataclass
class DistContext:
    """Where this process stands in the job. `world_size == 1` means no process group (plain single process)."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")
    backend: str | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    def barrier(self) -> None:
        barrier()

    @contextlib.contextmanager
    def main_process_first(self) -> Iterator[None]:
        """Rank 0 runs the body first (e.g. writes a file); the other ranks run it after (e.g. read it)."""
        if not self.is_main:
            self.barrier()
        yield
        if self.is_main:
            self.barrier()


def env_world() -> tuple[int, int, int]:
    """(rank, local_rank, world_size) as torchrun and `accelerate launch` export them; (0, 0, 1) otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", str(rank)))
    return rank, local_rank, world


def init_distributed(device: torch.device, timeout_s: float = 1800.0) -> DistContext:
    """Join the launcher's process group: NCCL with one GPU per local rank on CUDA, gloo on the CPU.

    `device` is the resolved training device (`cuda` or `cpu`); on CUDA it becomes `cuda:<local_rank>`.
    Idempotent: a second call returns the existing group's context.
    """
    import torch.distributed as dist

    rank, local_rank, world = env_world()
    if world <= 1:
        return DistContext(device=device)
    if device.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            from sumtune.errors import SumtuneError

            raise SumtuneError(f"Local rank {local_rank} has no GPU: only {torch.cuda.device_count()} visible "
                               f"(start at most that many processes per node).")
        torch.cuda.set_device(local_rank)  # before init: NCCL binds the communicator to the current device
        device = torch.device("cuda", local_rank)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if not dist.is_initialized():
        kwargs = {"device_id": device} if backend == "nccl" else {}
        dist.init_process_group(backend=backend, rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=timeout_s), **kwargs)
    return DistContext(rank=rank, local_rank=local_rank, world_size=world, device=device, backend=backend)


def _initialized() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if _initialized() else 0


def is_main_process() -> bool:
    return rank() == 0


def barrier() -> None:
    import torch.distributed as dist

    if _initialized():
        dist.barrier()


def shutdown() -> None:
    """Leave together, then destroy the group once nothing else holds it (see TrainRecipe.cleanup)."""
    import gc

    import torch.distributed as dist

    if _initialized():
        gc.collect()  # DDP reducers still referencing the group are freed here, while it is alive
        dist.barrier()
        dist.destroy_process_group()


def gather_objects(obj: Any) -> list[Any]:
    """`[obj of rank 0, obj of rank 1, ...]` on every rank (pickled; for small eval results, not tensors)."""
    import torch.distributed as dist

    if not _initialized():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank `src`'s `obj` on every rank."""
    import torch.distributed as dist

    if not _initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def reduce_for_log(ctx: DistContext, loss_sum: torch.Tensor, tokens: int, samples: int) -> tuple[float, int, int]:
    """Global (loss, tokens, samples) of a log window: one small all-reduce, only on logging steps.

    Each rank's loss is already weighted by its token share ×W (see `ShardedBatches`), so the sum over ranks
    divided by W is the global token-mean loss, the number one process would log.
    """
    if not ctx.enabled:
        return float(loss_sum), tokens, samples
    import torch.distributed as dist

    packed = torch.stack([loss_sum.detach().double().reshape(()),
                          torch.tensor(float(tokens), dtype=torch.float64, device=loss_sum.device),
                          torch.tensor(float(samples), dtype=torch.float64, device=loss_sum.device)])
    dist.all_reduce(packed, op=dist.ReduceOp.SUM)
    loss, tokens_all, samples_all = packed.tolist()
    return loss / ctx.world_size, int(tokens_all), int(samples_all)


def min_over_ranks(value: int, device: torch.device) -> int:
    """The smallest `value` of all ranks (e.g. the micro-batch every GPU can fit); `value` when not distributed."""
    if not _initialized():
        return value
    import torch.distributed as dist

    box = torch.tensor([value], dtype=torch.int64, device=device)
    dist.all_reduce(box, op=dist.ReduceOp.MIN)
    return int(box.item())


def max_over_ranks_on_device(value: int, device: torch.device) -> torch.Tensor:
    """The largest `value` of all ranks as a 0-d float tensor on `device`, without a host sync.

    `torch.full` fills on the device (a host tensor copied over would wait for the stream), and the
    all-reduce is queued behind it; the caller reads the result with the values it syncs on anyway.
    """
    box = torch.full((), float(value), dtype=torch.float32, device=device)
    if _initialized():
        import torch.distributed as dist

        dist.all_reduce(box, op=dist.ReduceOp.MAX)
    return box


class SilentProgress(Progress):
    """What ranks other than 0 print: nothing (no bars, no lines); rank 0 talks for the job."""

    def __init__(self) -> None:
        super().__init__(enabled=False)

    def write(self, message: str) -> None:
        pass


# ---- the model -------------------------------------------------------------------------------------------

def wrap_model(model: torch.nn.Module, ctx: DistContext) -> torch.nn.Module:
    """DistributedDataParallel over the trainable (LoRA) parameters; the model itself when not distributed.

    The frozen base (bitsandbytes Params4bit/Int8Params, embeddings) and all buffers are told to DDP as
    ignored: they are identical on every rank by construction (same seed, same files), need no gradient
    all-reduce, and skipping them avoids broadcasting gigabytes of packed 4-bit weights at start-up (and any
    reliance on DDP handling bnb's tensor subclasses). The trainable weights are broadcast from rank 0 once.
    `find_unused_parameters=False`: every LoRA weight is used in every forward (no graph walk each step).
    Buckets stay PyTorch's (25 MB, all-reduced while backward runs): one bucket all-reduced after backward was
    measured no faster on 2× H200 (benchmarks/results/scale_out_one_bucket-2026-11-30-h200x2.json).
    """
    if not ctx.enabled:
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP

    ignored = [n for n, p in model.named_parameters() if not p.requires_grad]
    ignored += [n for n, _ in model.named_buffers()]
    DDP._set_params_and_buffers_to_ignore_for_model(model, ignored)
    device_ids = [ctx.local_rank] if ctx.device.type == "cuda" else None
    ddp = DDP(model, device_ids=device_ids, output_device=device_ids[0] if device_ids else None,
              find_unused_parameters=False)  # no buffer syncing: every buffer is in the ignore list
    # Weights are built; from here randomness is dropout: a different stream per rank (rank 0 keeps its own).
    if ctx.rank:
        torch.manual_seed(torch.initial_seed() + ctx.rank)
    return ddp


def set_grad_sync(train_model: torch.nn.Module, enabled: bool) -> None:
    """Gradient accumulation under DDP: all-reduce only on the last micro-batch of an optimizer step.

    This is exactly what `DDP.no_sync()` toggles (the flag is read by the forward); a flag instead of a
    context manager keeps the training loop flat. No-op for a plain module.
    """
    if hasattr(train_model, "require_backward_grad_sync"):
        train_model.require_backward_grad_sync = enabled


# ---- data --------------------------------------------------------------------------------------------------

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


class ShardedBatches:
    """This rank's micro-batches: global batches of `batch_size × world` cut into per-rank slices.

    Same interface as `sumtune.data.BatchIterator` (`batches_per_epoch`, `epoch`), plus `stream(start_sample)`
    and `samples_seen`, the number of samples (all ranks together) handed out so far: the resume position.
    With one process it yields exactly the batches of the BatchIterator it wraps.
    """

    def __init__(self, inner, rank: int, world: int):
        self.inner = inner
        self.rank = rank
        self.world = world
        self.batch_size = inner.batch_size  # per rank (the micro-batch)
        self.global_batch_size = inner.batch_size * world
        self.num_examples = len(inner.examples)
        self.samples_seen = 0

    def batches_per_epoch(self) -> int:
        return -(-self.num_examples // self.global_batch_size)

    def global_batches(self, epoch: int, start_sample: int = 0) -> list[list[int]]:
        from sumtune.data import epoch_batches

        batches = epoch_batches(self.inner.lengths, self.global_batch_size, seed=self.inner.seed, epoch=epoch,
                                group_by_length=self.inner.group_by_length)
        return batches_from(batches, start_sample, self.global_batch_size)

    def _loss_scale(self, global_batch: list[int], local: list[int], padding: bool) -> float:
        if padding:
            return 0.0
        label_tokens = [len(self.inner.examples[i].labels) for i in global_batch]
        local_tokens = sum(len(self.inner.examples[i].labels) for i in local)
        return local_tokens * self.world / max(1, sum(label_tokens))

    def epoch(self, epoch: int, start_batch: int = 0, start_sample: int | None = None) -> Iterator[dict]:
        """This rank's batches of one epoch, from global batch `start_batch` (or from sample `start_sample`)."""
        offset = start_sample if start_sample is not None else start_batch * self.global_batch_size
        global_batches = self.global_batches(epoch, offset)
        shards = [shard_indices(g, self.rank, self.world) for g in global_batches]
        loader = torch.utils.data.DataLoader(
            self.inner.examples, batch_sampler=[local for local, _ in shards], collate_fn=self.inner._collate,
            num_workers=self.inner.num_workers, pin_memory=self.inner.pin_memory, persistent_workers=False)
        for batch, global_batch, (local, padding) in zip(loader, global_batches, shards):
            if self.world > 1:  # one process: untouched batches, the plain token-mean loss
                batch["loss_scale"] = torch.tensor(self._loss_scale(global_batch, local, padding))
            self.samples_seen += len(global_batch)
            yield batch

    def stream(self, start_sample: int = 0) -> Iterator[dict]:
        """Endless micro-batches from global sample `start_sample` on (epochs of `num_examples` samples)."""
        epoch, offset = divmod(start_sample, self.num_examples)
        self.samples_seen = start_sample
        while True:
            yield from self.epoch(epoch, start_sample=offset)
            epoch, offset = epoch + 1, 0


def shard_batches(batches, rank: int, world: int) -> ShardedBatches:
    """Wrap a `BatchIterator` so this rank gets its slice of every global batch (see `ShardedBatches`)."""
    return ShardedBatches(batches, rank, world)


# ---- evaluation ----------------------------------------------------------------------------------------------

def evaluate_sharded(recipe, rows: list[dict]) -> tuple[dict, list[dict]]:
    """Evaluation split across ranks (rows rank::world), gathered and scored on rank 0, metrics sent to all.

    Every rank generates for its share and computes its token-weighted eval loss; rank 0 puts predictions
    back in row order, computes ROUGE over all of them, and broadcasts the metrics (so `best` decisions agree).
    Records (predictions) are returned on rank 0 only.
    """
    from sumtune.evaluation import generate_summaries

    ctx, cfg = recipe.dist, recipe.cfg
    indices = list(range(ctx.rank, len(rows), ctx.world_size))
    local = [rows[i] for i in indices]
    predictions: list[str] = []
    lengths: list[int] = []
    loss_total, label_tokens = 0.0, 0
    if local:
        predictions, lengths = generate_summaries(
            recipe.model, recipe.tokenizer, [r["text"] for r in local], prefix=cfg.source_prefix,
            max_source_tokens=cfg.max_source_tokens, max_new_tokens=cfg.generation_max_new_tokens,
            num_beams=cfg.num_beams, batch_size=cfg.eval_batch_size)
        loss_total, label_tokens = recipe.eval_loss_sum(local)
    parts = gather_objects((indices, predictions, lengths, loss_total, label_tokens))
    metrics, records = assemble_eval(parts, rows) if ctx.is_main else (None, [])
    return broadcast_object(metrics), records


def assemble_eval(parts: list[tuple], rows: list[dict]) -> tuple[dict, list[dict]]:
    """Metrics and records of all rows from the ranks' `(indices, predictions, lengths, loss_total, label_tokens)`.

    Predictions go back to row order; the eval loss is token-weighted over all ranks (as one process computes it).
    """
    from sumtune.evaluation import score_predictions

    by_index = {i: (p, n) for idx, preds, lens, _, _ in parts for i, p, n in zip(idx, preds, lens)}
    if sorted(by_index) != list(range(len(rows))):
        raise RuntimeError(f"evaluation shards cover {len(by_index)} of {len(rows)} rows")
    ordered = [by_index[i] for i in range(len(rows))]
    metrics, records = score_predictions([p for p, _ in ordered], [n for _, n in ordered], rows)
    metrics["loss"] = sum(p[3] for p in parts) / max(1, sum(p[4] for p in parts))
    return metrics, records


# ---- reporting -------------------------------------------------------------------------------------------------

def describe_batch(micro_batch: int, accum_steps: int, world: int) -> str:
    """`64 samples (16 × 2 accumulation × 2 processes)`: the effective batch and where it comes from."""
    total = micro_batch * accum_steps * world
    processes = f"{world} process{'es' if world > 1 else ''}"
    return f"{total} samples ({micro_batch} × {accum_steps} accumulation × {processes})"
