"""Data-parallel training on PyTorch's own engine: torchrun / `accelerate launch` + DistributedDataParallel.

Every rank holds the whole (4-bit) base and the LoRA adapter; only the adapter's gradients are all-reduced.
Launchers export RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT; without them this is one process
and everything here is a no-op (the single-GPU path is untouched).

This module holds the process group, the few collectives the loop needs and the DDP wrapper. How batches are
sharded so that W ranks compute what one process computes is `sumtune.batching`'s contract; the sharded
evaluation is `sumtune.evaluator`'s.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from dataclasses import dataclass
from typing import Any, Iterator

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


def reduce_for_log(ctx: DistContext, loss: float, tokens: int, samples: int) -> tuple[float, int, int]:
    """Global (loss, tokens, samples) of a log window: one small all-reduce, only on logging steps.

    Each rank's loss is already weighted by its token share ×W (`sumtune.batching`'s `loss_scale`), so the sum
    over ranks divided by W is the global token-mean loss, the number one process would log.
    """
    if not ctx.enabled:
        return float(loss), tokens, samples
    import torch.distributed as dist

    packed = torch.tensor([float(loss), float(tokens), float(samples)], dtype=torch.float64, device=ctx.device)
    dist.all_reduce(packed, op=dist.ReduceOp.SUM)
    loss_all, tokens_all, samples_all = packed.tolist()
    return loss_all / ctx.world_size, int(tokens_all), int(samples_all)


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


# ---- reporting -------------------------------------------------------------------------------------------------

def describe_batch(micro_batch: int, accum_steps: int, world: int) -> str:
    """`64 samples (16 × 2 accumulation × 2 processes)`: the effective batch and where it comes from."""
    total = micro_batch * accum_steps * world
    processes = f"{world} process{'es' if world > 1 else ''}"
    return f"{total} samples ({micro_batch} × {accum_steps} accumulation × {processes})"
