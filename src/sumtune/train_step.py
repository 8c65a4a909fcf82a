"""THE training step of sumtune: `sumtune train`, `sumtune profile` and every benchmark run this one.

    step = TrainStep(model, optimizer, device=..., compute_dtype="bf16", max_grad_norm=1.0)
    stream = batches.stream()                      # sumtune.batching.Batches: host-side micro-batches
    result = step(step.draw(stream, grad_accum_steps), lr=2e-4)
    result.loss, result.grad_norm, result.samples, result.tokens, result.flops

One call is one optimizer step: host → device copies, forward and backward of each micro-batch (gradients
accumulated; under DDP only the last micro-batch all-reduces), then the guarded optimizer step: gradient
clipping, and no update at all when the loss or the gradient norm is NaN/inf (`grad_norm` is then None;
counting such steps and stopping a run is `sumtune.faults.NonFiniteGuard`'s job; a fused Adam/AdamW makes that
decision on the GPU, so its update is queued before the host waits). Exactly one host sync per step: the loss and
gradient norm are read together (`.tolist()`), and a data-parallel stop request rides on that same read. Profiler
phases (data, h2d, forward, backward, optimizer) wrap each part; the profiler is a null object unless one is
profiling.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch

from sumtune import distributed
from sumtune.batching import to_device
from sumtune.faults import StopRequest
from sumtune.flops import train_flops_per_sample
from sumtune.modeling import autocast
from sumtune.optim import set_lr
from sumtune.profiling.profiler import NULL_PROFILER


# OMIT_FULL_SOURCE_MASK: a micro-batch whose source rows are all unpadded (most at 1024 tokens, where 94% of bills are
# cut) goes to the model without its all-ones attention mask, so the fast attention runs its variant without a key
# mask (on an H200 the forward's key padding cost 0.23 of 2.51 ms at 32x32x1024x128,
# benchmarks/results/attention_ceiling-2026-12-03-h200-parts.json). Same maths: no key is masked either way.
# Measured in the whole step on an H200: the seed's best 48.52 -> 48.83 samples/s, the shipped config 45.94 -> 46.18
# (+0.4 GiB: a shape meets its graph with and without the mask), results/train_throughput_{seed,shipped}_omitmask-
# 2026-12-03-h200.json. On by default; benchmark token `keepmask` turns it off.
OMIT_FULL_SOURCE_MASK = True


def without_full_source_mask(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``batch`` without its ``attention_mask`` when every source position is a real token (a host tensor: no
    GPU sync), else ``batch`` itself."""
    mask = batch.get("attention_mask")
    if mask is None or not bool(mask.all()):
        return batch
    return {name: tensor for name, tensor in batch.items() if name != "attention_mask"}


@dataclass(frozen=True)
class StepResult:
    """What one optimizer step did (host numbers; nothing here waits for the GPU again)."""

    loss: float
    """Token-mean loss of the step's micro-batches (this process's share under DDP: `loss_scale`-weighted)."""
    grad_norm: float | None
    """Gradient norm before clipping; None when the step was skipped (NaN/inf loss or gradient: no update)."""
    samples: int
    """Documents in the step's micro-batches (this process)."""
    tokens: int
    """Non-padding source tokens plus label tokens (this process)."""
    flops: float
    """Useful training FLOPs of the batches as padded (`sumtune.flops`; 0 for models it cannot count)."""
    stop_signum: int | None = None
    """A stop request (SIGTERM/SIGINT) seen by any rank, agreed on in this step's sync; None when none."""


def skips_nonfinite_on_device(optimizer: torch.optim.Optimizer) -> bool:
    """Whether ``optimizer`` can skip its update on the GPU from a `found_inf` flag: torch's Adam and AdamW with
    ``fused=True`` (their fused kernels return early when it is 1, and the step counters are put back)."""
    return isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW)) and all(
        group.get("fused") for group in optimizer.param_groups)


def forward_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor], *, device: torch.device,
                 compute_dtype: str, autocast_cache: bool = True) -> torch.Tensor:
    """The model's token-mean loss on a device batch; data-parallel batches carry their `loss_scale`.
    `autocast_cache=False` under CUDA-graph capture (casts cached during a capture must not outlive it)."""
    with autocast(device, compute_dtype, cache_enabled=autocast_cache):
        loss = model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"),
                     labels=batch["labels"]).loss
    return loss * batch["loss_scale"] if "loss_scale" in batch else loss


def count_tokens(batch: dict[str, torch.Tensor]) -> int:
    """Non-padding source tokens plus label tokens of a host batch (no GPU sync)."""
    return int(batch["attention_mask"].sum()) + int((batch["labels"] != -100).sum())


class BatchFlops:
    """Useful training FLOPs of a padded batch: T5 counts from `sumtune.flops`, 0 for models it cannot count."""

    def __init__(self, model_config, lora_params: int):
        self.config = model_config if getattr(model_config, "model_type", "") == "t5" else None
        self.lora_params = lora_params

    def __call__(self, src_len: int, tgt_len: int, batch_size: int = 1) -> float:
        if self.config is None:
            return 0.0
        return batch_size * train_flops_per_sample(self.config, src_len, tgt_len, lora_params=self.lora_params)

    def of_batch(self, batch: dict[str, torch.Tensor]) -> float:
        return self(batch["input_ids"].shape[1], batch["labels"].shape[1], batch["input_ids"].shape[0])


class TrainStep:
    """THE training step (see the module docstring): `step(micro_batches, lr=...) -> StepResult`.

    `model` is the PEFT model; `train_model` what runs forward and backward (the DDP wrapper when data-parallel,
    else the model itself); `optimizer` holds the trainable weights. `flops` counts a batch's useful FLOPs.
    `cuda_graphs` captures and replays each micro-batch shape (sumtune.cuda_graphs).
    """

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, *, device: torch.device,
                 compute_dtype: str, max_grad_norm: float | None, flops: BatchFlops | None = None,
                 train_model: torch.nn.Module | None = None, dist: distributed.DistContext | None = None,
                 profiler=NULL_PROFILER, cuda_graphs: bool = False, notify=print):
        self.model, self.optimizer = model, optimizer
        self.train_model = train_model if train_model is not None else model
        self.device, self.compute_dtype = device, compute_dtype
        self.max_grad_norm = max_grad_norm
        self.flops = flops
        self.dist = dist or distributed.DistContext(device=device)
        self.profiler = profiler
        self.params = [p for group in optimizer.param_groups for p in group["params"]]
        self.last_batch_shape = (0, 0, 0)  # (documents, source tokens, target tokens): for an OOM message
        self.update_on_device = skips_nonfinite_on_device(optimizer)
        self.graphed = None  # cuda_graphs.GraphedMicroSteps when the micro-steps are captured and replayed
        if cuda_graphs:
            from sumtune.cuda_graphs import GraphedMicroSteps, warm_up_rows_for

            self.graphed = GraphedMicroSteps(self._graph_forward_backward, self.params, device, notify=notify,
                                             warm_up_rows=warm_up_rows_for(self.train_model))

    def draw(self, stream: Iterator[dict[str, torch.Tensor]], count: int) -> list[dict[str, torch.Tensor]]:
        """The host micro-batches of one step from a batches stream (the profiler's data phase)."""
        with self.profiler.phase("data"):
            return [next(stream) for _ in range(count)]

    def forward_loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return forward_loss(self.train_model, batch, device=self.device, compute_dtype=self.compute_dtype)

    def __call__(self, micro_batches: Sequence[dict[str, torch.Tensor]], *, lr: float,
                 stop: StopRequest | None = None) -> StepResult:
        """One optimizer step over host `micro_batches` at learning rate `lr`. `stop` (this process's SIGTERM /
        SIGINT flag) is read at the step's one sync and agreed on with the other ranks there."""
        prof = self.profiler
        accum = len(micro_batches)
        loss_sum = torch.zeros((), device=self.device)
        samples = tokens = 0
        flops = 0.0
        for index, host_batch in enumerate(micro_batches):
            tokens += count_tokens(host_batch)  # counted on the host batch: no GPU sync
            samples += host_batch["input_ids"].shape[0]
            self.last_batch_shape = (host_batch["input_ids"].shape[0], host_batch["input_ids"].shape[1],
                                     host_batch["labels"].shape[1])
            flops += self.flops.of_batch(host_batch) if self.flops is not None else 0.0
            if OMIT_FULL_SOURCE_MASK:
                host_batch = without_full_source_mask(host_batch)
            if self.graphed is not None:  # h2d copy into the shape's buffers, then forward and backward replayed
                with prof.phase("forward_backward"):
                    loss_sum += self.graphed(host_batch, accum)
                continue
            with prof.phase("h2d"):
                batch = to_device(host_batch, self.device)
            distributed.set_grad_sync(self.train_model, index == accum - 1)  # DDP: all-reduce on the last only
            with prof.phase("forward"):
                loss = self.forward_loss(batch) / accum
            with prof.phase("backward"):
                loss.backward()
            loss_sum += loss.detach()
        with prof.phase("optimizer"):
            loss_value, grad_norm, agreed = self._guarded_update(loss_sum, lr, stop.signum if stop else None)
        prof.step(samples=samples, tokens=tokens, flops=flops)
        return StepResult(loss=loss_value, grad_norm=grad_norm, samples=samples, tokens=tokens, flops=flops,
                          stop_signum=agreed)

    def _guarded_update(self, loss_sum: torch.Tensor, lr: float,
                        stop_signum: int | None) -> tuple[float, float | None, int | None]:
        """Clip, read loss and norm (the step's one host sync), and step the optimizer only if both are finite.

        A fused torch Adam/AdamW takes that decision on the GPU (`found_inf`, as torch's GradScaler hands it one):
        its update and the zeroing of the gradients are queued before the host waits, so the GPU goes on from the
        backward to the update without waiting for the host. Other optimizers are stepped after the read."""
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm or float("inf"))
        checks = [loss_sum.detach().float(), grad_norm.detach().float()]
        if self.dist.enabled:  # the ranks' stop requests ride on this sync: no second host round trip per step
            checks.append(distributed.max_over_ranks_on_device(stop_signum or 0, self.device))
        checks = torch.stack(checks)
        if self.update_on_device:
            self.optimizer.found_inf = (~torch.isfinite(checks[:2])).any().float()
            try:
                self._update(lr, step=True)
            finally:
                del self.optimizer.found_inf
        loss_value, norm_value, *agreed = checks.tolist()
        signum = (int(agreed[0]) or None) if agreed else stop_signum
        finite = math.isfinite(loss_value) and math.isfinite(norm_value)
        if not self.update_on_device:
            self._update(lr, step=finite)
        return loss_value, norm_value if finite else None, signum

    def _update(self, lr: float, step: bool) -> None:
        if step:
            set_lr(self.optimizer, lr)
            self.optimizer.step()
        # Captured backwards add into the same .grad buffers on every replay: zero them in place.
        self.optimizer.zero_grad(set_to_none=self.graphed is None)

    def release_graphs(self) -> None:
        """Drop the captured graphs and their memory (before an evaluation); later steps capture again."""
        if self.graphed is not None:
            self.graphed.release()

    def _graph_forward_backward(self, batch: dict[str, torch.Tensor], accum: int) -> torch.Tensor:
        """One micro-batch's forward and backward as the graphs capture it (the loss scaled by 1/`accum`, a
        constant inside a captured graph); returns the detached scaled loss."""
        loss = forward_loss(self.train_model, batch, device=self.device, compute_dtype=self.compute_dtype,
                            autocast_cache=False) / accum
        loss.backward()
        return loss.detach()
