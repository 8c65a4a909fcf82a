"""sumtune: QLoRA fine-tuning of T5 summarizers on one GPU, with honest speed and memory numbers."""

from __future__ import annotations

from sumtune.config import TrainConfig
from sumtune.errors import SumtuneError
from sumtune.version import __version__


from sumtune.hf_pipeline import register_when_transformers_imports_pipelines

# `transformers.pipeline("summarization", ...)` for merged models (transformers 5 dropped the task): registered
# when transformers' pipelines are imported, so `import sumtune` (and `sumtune --help`) imports no torch.
register_when_transformers_imports_pipelines()

__all__ = ["TrainConfig", "SumtuneError", "__version__", "train", "profile", "evaluate", "Summarizer", "merge_run", "memory_report"]


def __getattr__(name: str):
    # Heavy modules (torch models, PEFT, bitsandbytes) load only when used.
    if name in ("train", "profile", "evaluate"):
        from sumtune import api

        return getattr(api, name)
    if name in ("Summarizer", "merge_run"):
        from sumtune import inference

        return getattr(inference, name)
    if name == "memory_report":
        from sumtune.memory import memory_report

        return memory_report
    raise AttributeError(f"module 'sumtune' has no attribute {name!r}")
