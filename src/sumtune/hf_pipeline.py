"""A `summarization` task for `transformers.pipeline`, registered when transformers has none.

transformers 5 removed its summarization (text2text) pipelines. A model merged by `sumtune merge` is a plain
seq2seq model; after `import sumtune`, `transformers.pipeline("summarization", model=OUT_DIR)` loads and runs it
again, with the prefix and generation settings that `sumtune merge` stored in the model's config.
"""

from __future__ import annotations

_REGISTERED = False


def summarization_pipeline_class():
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


def register_summarization_pipeline() -> bool:
    """Register the task if transformers lacks it; True when sumtune's pipeline is (now) the registered one."""
    global _REGISTERED
    if _REGISTERED:
        return True
    from transformers import AutoModelForSeq2SeqLM
    from transformers.pipelines import PIPELINE_REGISTRY, SUPPORTED_TASKS

    if "summarization" in SUPPORTED_TASKS:
        return False
    PIPELINE_REGISTRY.register_pipeline("summarization", pipeline_class=summarization_pipeline_class(),
                                        pt_model=AutoModelForSeq2SeqLM, type="text")
    _REGISTERED = True
    return True
