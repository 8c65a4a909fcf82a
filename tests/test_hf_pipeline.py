"""`transformers.pipeline("summarization", model=MERGED)` after `import sumtune`, as the README says.

Runs under both dependency sets (`scripts/test.sh` and `scripts/test.sh --latest`) and needs no ../shared: a tiny
random T5 and sumtune's word tokenizer are saved the way `sumtune merge` saves a merged model (`config.prefix`,
generation settings, the tokenizer's `model_max_length`). The pipeline must print what prefix + tokenize +
generate + decode gives, in a fresh interpreter that only imports sumtune and transformers.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

DOCS = [
    "the riverton city council met on monday evening . members voted seven to two to approve the school budget .",
    "acme published its results for the quarter on friday . profits rose by five percent as sales of phones grew .",
    "a storm hit oakdale on friday morning . heavy rain closed schools in oakdale and the bus routes .",
    # longer than the tokenizer's model_max_length below: the pipeline must truncate, not fail
    " ".join(["the hawks beat the tigers in pinecrest on sunday ."] * 20),
]
PREFIX = "summarize: "
MAX_SOURCE_TOKENS = 48


@pytest.fixture(scope="module")
def merged_like_dir(tmp_path_factory):
    """A seq2seq model directory with what `sumtune merge` stores; large initial weights make the greedy
    output depend on the input, so equal summaries across documents would show the input was lost."""
    from transformers import T5ForConditionalGeneration

    from sumtune.demo_data import build_word_tokenizer
    from sumtune.modeling import t5_config

    out = tmp_path_factory.mktemp("pipeline") / "merged"
    tokenizer = build_word_tokenizer(DOCS + [PREFIX])
    torch.manual_seed(0)
    model = T5ForConditionalGeneration(t5_config("tiny", vocab_size=len(tokenizer), initializer_factor=2.0)).eval()
    model.config.prefix = PREFIX
    model.generation_config.max_new_tokens = 8
    model.generation_config.num_beams = 1
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.model_max_length = MAX_SOURCE_TOKENS
    tokenizer.save_pretrained(out)
    return out


def reference_summaries(model_dir) -> list[str]:
    """What the pipeline must give: the prefix, truncation at model_max_length, greedy generate, decode."""
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    model = AutoModelForSeq2SeqLM.from_pretrained(model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    out = []
    for doc in DOCS:
        ids = tokenizer(PREFIX + doc, truncation=True, return_tensors="pt")
        assert ids["input_ids"].shape[1] <= MAX_SOURCE_TOKENS
        with torch.no_grad():
            gen = model.generate(**ids)
        out.append(tokenizer.decode(gen[0], skip_special_tokens=True).strip())
    return out


def test_import_sumtune_registers_the_task_transformers_resolves():
    import sumtune  # noqa: F401  (registers on import)
    from transformers import pipelines

    from sumtune.hf_pipeline import register_summarization_pipeline, summarization_pipeline_class

    assert register_summarization_pipeline() is True
    _, task_impl, _ = pipelines.check_task("summarization")  # what pipeline() itself calls
    assert task_impl["impl"] is summarization_pipeline_class()


def test_readme_pipeline_usage_in_a_fresh_interpreter(merged_like_dir):
    """`import sumtune` loads no transformers (registration waits for `transformers.pipelines`), then the task is
    there; a list of texts gives a flat list, one dict per text (as transformers 4 did)."""
    script = ("import json, sys\nimport sumtune\n"
              "assert 'transformers' not in sys.modules and 'torch' not in sys.modules\n"
              "from transformers import pipeline\n"
              "summarizer = pipeline('summarization', model=sys.argv[1], device='cpu')\n"
              "docs = json.loads(sys.stdin.read())\n"
              "print(json.dumps([summarizer(doc)[0]['summary_text'] for doc in docs]))\n"
              "print(json.dumps(summarizer(docs)))\n")
    result = subprocess.run([sys.executable, "-c", script, str(merged_like_dir)], input=json.dumps(DOCS),
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    one_by_one, as_list = (json.loads(line) for line in result.stdout.strip().splitlines()[-2:])
    expected = reference_summaries(merged_like_dir)
    assert len(set(expected)) > 1 and all(expected)  # the model's output depends on its input
    assert one_by_one == expected
    assert as_list == [{"summary_text": text} for text in expected]


def test_registration_waits_for_transformers_pipelines_and_runs_once_it_is_imported():
    script = ("import sys\nimport sumtune\nfrom sumtune import hf_pipeline\n"
              "assert hf_pipeline._HOOK in sys.meta_path and not hf_pipeline._REGISTERED\n"
              "import transformers.pipelines\n"
              "assert hf_pipeline._REGISTERED and hf_pipeline._HOOK not in sys.meta_path\n"
              "assert hf_pipeline.resolved_pipeline_class() is hf_pipeline.summarization_pipeline_class()\n"
              "import inspect; assert inspect.getsource(transformers.pipelines)  # the module's loader still works\n"
              "print('ok')\n")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-3000:]
