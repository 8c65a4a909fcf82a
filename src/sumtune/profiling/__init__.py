"""Training performance analysis (`sumtune profile`, `sumtune train --profile-steps`).

Importing this package loads no training code: a training run is profiled by handing a `StepProfiler` to the
recipe (`sumtune.api.profile`), never the other way round.
"""

from sumtune.profiling.profiler import NULL_PROFILER, NullProfiler, StepProfiler
from sumtune.profiling.report import format_study_table, format_summary
from sumtune.profiling.runner import (
    ProfileArgs,
    finalize_profile,
    make_train_profiler,
    parse_profile_steps,
    run_mobilenet_study,
    save_study,
)

__all__ = [
    "NULL_PROFILER",
    "NullProfiler",
    "ProfileArgs",
    "StepProfiler",
    "finalize_profile",
    "format_study_table",
    "format_summary",
    "make_train_profiler",
    "parse_profile_steps",
    "run_mobilenet_study",
    "save_study",
]
