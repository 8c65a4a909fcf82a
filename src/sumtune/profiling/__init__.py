"""Training performance analysis (`sumtune profile`, `sumtune train --profile-steps`).

Importing this package loads no training code: a training run is profiled by handing a `StepProfiler` to the
recipe (`sumtune.api.profile`), never the other way round. Its names are imported when first used (no torch for
`ProfileArgs`).
"""

import importlib

# name -> the submodule that defines it, imported on first use: `sumtune profile --help` needs ProfileArgs (no
# torch) and must not pay for torch; the profiler itself (torch) loads when a profile runs.
_EXPORTS = {
    "NULL_PROFILER": "profiler", "NullProfiler": "profiler", "StepProfiler": "profiler",
    "format_study_table": "report", "format_summary": "report",
    "ProfileArgs": "runner", "finalize_profile": "runner", "make_train_profiler": "runner",
    "parse_profile_steps": "runner", "run_mobilenet_study": "runner", "save_study": "runner",
}


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"sumtune.profiling.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'sumtune.profiling' has no attribute {name!r}")


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
