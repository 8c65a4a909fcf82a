"""A `summarization` task for `transformers.pipeline`, registered by `import sumtune`.

transformers 5 removed its summarization (text2text) pipelines. A model merged by `sumtune merge` is a plain
seq2seq model; after `import sumtune`, `transformers.pipeline("summarization", model=OUT_DIR)` loads and runs it
again, with the prefix and generation settings that `sumtune merge` stored in the model's config.

How the task gets back, on every transformers 5 tested (5.17 pinned, the newest 5.x in `scripts/test.sh --latest`):
- `PIPELINE_REGISTRY.register_pipeline`, transformers' documented way to add a task. On 5.17 that is all it takes.
- Later 5.x releases (5.24 does, 5.17 does not) also refuse the name before `pipeline()` reads the registry:
  `REMOVED_TASKS` maps "summarization" to "has been removed from transformers…", a message about transformers'
  own pipeline, not the one registered here. sumtune drops that one entry, once its own pipeline is registered.
- Then transformers' own `check_task("summarization")` (what `pipeline()` calls) must resolve to sumtune's class;
  `register_summarization_pipeline()` returns False when it does not, and the pipeline tests say so under both sets.
"""

from __future__ import annotations

import functools

TASK = "summarization"
_REGISTERED = False


@functools.cache
def summarization_pipeline_class():
    """The pipeline class (built on first use: `transformers.Pipeline` is imported only then)."""
    from transformers import Pipeline

    class SummarizationPipeline(Pipeline):
        """Prefix, tokenize (truncating at the tokenizer's model_max_length), generate, decode."""

        def _sanitize_parameters(self, truncation=True, **generate_kwargs):
            return {"truncation": truncation}, {"generate_kwargs": generate_kwargs}, {}

        def preprocess(self, text, truncation=True):
            prefix = getattr(self.model.config, "prefix", None) or ""
            return self.tokenizer(prefix + text, truncation=truncation, return_tensors="pt")

        def _forward(self, inputs, generate_kwargs=None):
            return {"output_ids": self.model.generate(**inputs, **(generate_kwargs or {}))}

        def postprocess(self, outputs):
            return [{"summary_text": self.tokenizer.decode(ids, skip_special_tokens=True).strip()}
                    for ids in outputs["output_ids"]]

    return SummarizationPipeline


def resolved_pipeline_class():
    """The class `transformers.pipeline("summarization", ...)` would build now, or None if it refuses the task."""
    from transformers import pipelines

    try:
        _, task_impl, _ = pipelines.check_task(TASK)
    except KeyError:
        return None
    return task_impl["impl"]


def register_summarization_pipeline() -> bool:
    """Register the task if transformers lacks it; True when sumtune's pipeline is (now) what `pipeline()` builds."""
    global _REGISTERED
    if _REGISTERED:
        return True
    from transformers import AutoModelForSeq2SeqLM, pipelines

    if TASK in pipelines.SUPPORTED_TASKS:  # a transformers that has the task (again): keep its own
        return False
    pipeline_class = summarization_pipeline_class()
    pipelines.PIPELINE_REGISTRY.register_pipeline(TASK, pipeline_class=pipeline_class,
                                                  pt_model=AutoModelForSeq2SeqLM, type="text")
    removed = getattr(pipelines, "REMOVED_TASKS", None)  # newer 5.x: refused before the registry
    if isinstance(removed, dict):
        removed.pop(TASK, None)
    _REGISTERED = resolved_pipeline_class() is pipeline_class
    return _REGISTERED
