"""Training performance analysis (`sumtune profile`, `sumtune train --profile-steps`)."""

from sumtune.profiling.profiler import NULL_PROFILER, NullProfiler, StepProfiler
from sumtune.profiling.report import format_study_table, format_summary
from sumtune.profiling.runner import (
    ProfileArgs,
    finalize_profile,
    make_train_profiler,
    parse_profile_steps,
    run_mobilenet_study,
    run_profile,
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
    "run_profile",
    "save_study",
]
