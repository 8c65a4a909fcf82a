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

`import sumtune` must stay fast (`sumtune --help` imports it, and importing `transformers.pipelines` takes
seconds), so it does not register at once: `register_when_transformers_imports_pipelines()` registers right away
if `transformers.pipelines` is already imported, and otherwise the moment anything imports it
(`from transformers import pipeline` does), through a one-shot import hook.
"""

from __future__ import annotations

import functools
import importlib.abc
import importlib.util
import sys
import warnings

TASK = "summarization"
_REGISTERED = False


@functools.cache
def summarization_pipeline_class():
    """The pipeline class (built on first use: `transformers.Pipeline` is imported only then)."""
    from transformers import Pipeline

    class SummarizationPipeline(Pipeline):
        """Prefix, tokenize (truncating at the tokenizer's model_max_length), generate, decode.

        A list of texts gives a flat list, one `{"summary_text": ...}` per text, as transformers 4's pipeline did
        (transformers 5's `Pipeline.__call__` would return one list per text)."""

        def __call__(self, inputs, *args, **kwargs):
            result = super().__call__(inputs, *args, **kwargs)
            if (isinstance(inputs, list) and all(isinstance(text, str) for text in inputs)
                    and all(isinstance(one, list) and len(one) == 1 for one in result)):
                return [one[0] for one in result]
            return result

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


PIPELINES_MODULE = "transformers.pipelines"


def _register_quietly() -> None:
    try:
        register_summarization_pipeline()
    except Exception as err:  # noqa: BLE001 - a registry change in transformers must not break its import
        warnings.warn(f"sumtune could not register the summarization pipeline ({type(err).__name__}: {err}).",
                      RuntimeWarning, stacklevel=2)


class _RegisteringLoader(importlib.abc.Loader):
    """Runs transformers.pipelines' own loader, then registers the task (its other methods are the loader's)."""

    def __init__(self, inner: importlib.abc.Loader):
        self._inner = inner

    def create_module(self, spec):
        return self._inner.create_module(spec)

    def exec_module(self, module) -> None:
        self._inner.exec_module(module)
        _register_quietly()

    def __getattr__(self, name: str):  # get_source, get_filename, ... (inspect, linecache, importlib.resources)
        return getattr(self._inner, name)


class _PipelinesImportHook(importlib.abc.MetaPathFinder):
    """Finds `transformers.pipelines` as the other finders do, with a loader that registers after it runs."""

    def find_spec(self, fullname, path, target=None):
        if fullname != PIPELINES_MODULE:
            return None
        _remove_hook()  # one shot
        spec = importlib.util.find_spec(fullname) if path is None else next(
            (found for finder in sys.meta_path if hasattr(finder, "find_spec")
             and (found := finder.find_spec(fullname, path, target)) is not None), None)
        if spec is None or spec.loader is None:
            return spec
        spec.loader = _RegisteringLoader(spec.loader)
        return spec


_HOOK = _PipelinesImportHook()


def _remove_hook() -> None:
    if _HOOK in sys.meta_path:
        sys.meta_path.remove(_HOOK)


def register_when_transformers_imports_pipelines() -> None:
    """Register now if `transformers.pipelines` is imported, else as soon as it is (no transformers import here)."""
    if PIPELINES_MODULE in sys.modules:
        _register_quietly()
    elif _HOOK not in sys.meta_path:
        sys.meta_path.insert(0, _HOOK)
