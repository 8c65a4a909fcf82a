"""`sumtune profile`: its arguments, the profiler of a training run, and the MobileNet study.

The T5 workload itself is a training run (`sumtune.api.profile`): the recipe's own steps under this profiler."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from sumtune.errors import SumtuneError

if TYPE_CHECKING:
    from sumtune.profiling.profiler import StepProfiler

WORKLOADS = ("t5", "mobilenet-cifar10")
QUICK_SCHEDULE = (0, 1, 2)  # wait, warmup, active


@dataclass
class ProfileArgs:
    """Options of `sumtune profile` (and of `sumtune train --profile-steps`)."""

    wait: int = 1
    """Steps run before the profiler starts (skips one-time setup costs)."""
    warmup: int = 1
    """Steps traced but discarded (the profiler's own start-up overhead)."""
    active: int = 3
    """Steps traced and measured for the summary."""
    record_shapes: bool = True
    """Record operator input shapes (TensorBoard's 'group by input shape')."""
    profile_memory: bool = True
    """Record tensor allocations (TensorBoard's memory view)."""
    with_stack: bool = False
    """Record Python stacks per operator (large traces; useful to find the source line of a slow op)."""
    workload: str = "t5"
    """What to profile: 't5' (the training config) or 'mobilenet-cifar10' (the original tuning study)."""
    cifar10_dir: str | None = None
    """Local CIFAR10 copy for the mobilenet study: the binary version (cifar-10-batches-bin), or the Python version (cifar-10-batches-py, pickle: read only with --allow-pickle); synthetic images if unset."""
    stages: list[str] | None = None
    """Mobilenet study stages to run (base amp batch128 gpu_normalize workers2 pinned); all if unset."""
    steps_per_stage: int = 10
    """Measured (active) steps per mobilenet stage; its wait/warmup come from wait and warmup."""
    image_size: int = 224
    """Side of the resized mobilenet images in pixels (224 as in the study)."""
    quick: bool = False
    """Short smoke run: 0 wait, 1 warmup, 2 active steps (also per mobilenet stage)."""

    def __post_init__(self) -> None:
        if self.workload not in WORKLOADS:
            raise SumtuneError(f"workload must be one of {', '.join(WORKLOADS)}, not {self.workload!r}.")
        if self.wait < 0 or self.warmup < 0 or self.active < 1:
            raise SumtuneError("profile steps need wait >= 0, warmup >= 0 and active >= 1.")
        if self.steps_per_stage < 1:
            raise SumtuneError("steps_per_stage must be at least 1.")
        if self.image_size < 8:
            raise SumtuneError("image_size must be at least 8 pixels.")
        if self.cifar10_dir is not None and not Path(self.cifar10_dir).is_dir():
            raise SumtuneError(f"cifar10_dir {self.cifar10_dir} is not a directory.")
        if self.stages:
            from sumtune.profiling.mobilenet import select_stages

            select_stages(self.stages)  # refuses unknown names

    def schedule(self) -> tuple[int, int, int]:
        """(wait, warmup, active) for the T5 workload."""
        return QUICK_SCHEDULE if self.quick else (self.wait, self.warmup, self.active)

    def stage_schedule(self) -> tuple[int, int, int]:
        """(wait, warmup, active) for each mobilenet stage."""
        return QUICK_SCHEDULE if self.quick else (self.wait, self.warmup, self.steps_per_stage)


def parse_profile_steps(text: str) -> tuple[int, int, int]:
    """`--profile-steps` value: "ACTIVE" or "WAIT,WARMUP,ACTIVE" (e.g. "3" or "5,1,3")."""
    try:
        parts = [int(p) for p in str(text).split(",")]
    except ValueError:
        parts = []
    if len(parts) == 1:
        parts = [1, 1, parts[0]]
    if len(parts) != 3 or parts[0] < 0 or parts[1] < 0 or parts[2] < 1:
        raise SumtuneError(f"--profile-steps takes ACTIVE or WAIT,WARMUP,ACTIVE with ACTIVE >= 1, not {text!r}.")
    return parts[0], parts[1], parts[2]


def make_train_profiler(run_dir: str | Path, args: ProfileArgs | None = None, *,
                        schedule: tuple[int, int, int] | None = None) -> StepProfiler:
    """A StepProfiler writing to RUN_DIR/profile (for `profile` and `train --profile-steps`).

    What the run is (device, batch, settings) it learns from the recipe's setup (`StepProfiler.describe_run`)."""
    from sumtune.profiling.profiler import StepProfiler

    args = args or ProfileArgs()
    wait, warmup, active = schedule or args.schedule()
    return StepProfiler(Path(run_dir) / "profile", wait=wait, warmup=warmup, active=active,
                        record_shapes=args.record_shapes, profile_memory=args.profile_memory,
                        with_stack=args.with_stack)


def finalize_profile(prof: StepProfiler, echo: Callable[[str], None] | None = print) -> dict[str, Any]:
    """Compute the summary, write PROFILE_DIR/summary.json and print the report."""
    from sumtune.profiling.report import format_summary

    summary = prof.write_summary(prof.out_dir / "summary.json")
    if echo:
        echo(format_summary(summary))
    return summary


def run_mobilenet_study(args: ProfileArgs, out_dir: str | Path, *, device: str | None = None,
                        model_fn: Callable[[], Any] | None = None, echo: Callable[[str], None] | None = print,
                        allow_pickle: bool = False) -> dict[str, Any]:
    """Run the cumulative MobileNetV2 stages and print our table next to the published one.

    Traces and per-stage summary.json go to OUT_DIR/<stage>/; the caller saves the returned dict.
    `model_fn` replaces torchvision's MobileNetV2 (tests use a small conv net).
    """
    from sumtune.profiling.mobilenet import run_study
    from sumtune.profiling.report import format_study_table

    wait, warmup, active = args.stage_schedule()
    result = run_study(out_dir=out_dir, stages=args.stages, device=device, image_size=args.image_size, wait=wait,
                       warmup=warmup, active=active, cifar10_dir=args.cifar10_dir, model_fn=model_fn,
                       record_shapes=args.record_shapes, profile_memory=args.profile_memory,
                       with_stack=args.with_stack, echo=echo, allow_pickle=allow_pickle)
    if echo:
        echo(format_study_table(result))
    return result


def save_study(result: dict[str, Any], out_dir: str | Path) -> Path:
    from sumtune.profiling.profiler import write_json

    return write_json(result, Path(out_dir) / "study.json")
