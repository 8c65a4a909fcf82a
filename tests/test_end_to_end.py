"""The whole job through the CLI on real BillSum rows and the real T5 tokenizer: train → evaluate → summarize → merge.

Tiny T5 (random weights) in real bitsandbytes NF4 on the CPU, real PEFT LoRA with `lm_head` trained (the tied head),
real rouge_score. The adapter must load with plain PEFT and the merged model with transformers.pipeline, and both
must produce what `sumtune summarize` prints.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
import yaml

from sumtune.cli import main

DOCS = 3


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    """A random tiny T5 with large initial weights: unlike a calm one, its greedy output depends on the input,
    so the summaries compared below differ from document to document (a constant string would prove nothing)."""
    from transformers import T5ForConditionalGeneration

    from sumtune.modeling import t5_config

    path = tmp_path_factory.mktemp("e2e-base") / "t5"
    torch.manual_seed(0)
    T5ForConditionalGeneration(t5_config("tiny", initializer_factor=2.0)).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, base_dir, billsum_jsonl, t5_tokenizer_dir):
    out = tmp_path_factory.mktemp("e2e") / "run"
    args = ["train", "--model", str(base_dir), "--tokenizer", str(t5_tokenizer_dir), "--dataset", str(billsum_jsonl),
            "--max-samples", "40", "--eval-ratio", "0.2", "--max-source-tokens", "96", "--max-target-tokens", "24",
            "--max-new-tokens", "16", "--batch-size", "4", "--max-steps", "12", "--lr", "3e-3", "--compute-dtype",
            "fp32", "--lora-r", "8", "--lora-targets", "all-linear", "--modules-to-save", "lm_head",
            "--eval-every-steps", "6", "--eval-max-samples", "4", "--log-every-steps", "3", "--device", "cpu",
            "--no-progress", "--output-dir", str(out)]
    assert main(args) == 0
    return out


def test_run_directory_holds_adapter_tokenizer_config_metrics_and_card(run_dir):
    for name in ["adapter_config.json", "adapter_model.safetensors", "config.yaml", "metrics.jsonl", "README.md",
                 "tokenizer_config.json", "eval/predictions.jsonl", "eval/metrics.json", "checkpoints/best"]:
        assert (run_dir / name).exists(), name
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert config["max_steps"] == 12 and config["modules_to_save"] == ["lm_head"]
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in lines if r["split"] == "train"]
    assert [r["step"] for r in train] == [3, 6, 9, 12]
    assert all(r["tokens_per_s"] > 0 and r["lr"] >= 0 and r["loss"] > 0 for r in train)
    assert [r["step"] for r in lines if r["split"] == "eval"] == [6, 12]
    card = (run_dir / "README.md").read_text()
    assert card.startswith("---\n") and "library_name: peft" in card and "rougeL" in card
    assert list((run_dir / "tb").glob("events.out.tfevents.*"))


def test_evaluate_command_writes_predictions_and_metrics(run_dir, tmp_path, capsys):
    assert main(["evaluate", str(run_dir), "--max-samples", "3", "--output-dir", str(tmp_path / "ev"),
                 "--device", "cpu"]) == 0
    metrics = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert metrics["num_samples"] == 3 and 0 < metrics["gen_len"] <= 16
    assert set(metrics) >= {"rouge1", "rouge2", "rougeL", "rougeLsum", "gen_len"}
    assert len((tmp_path / "ev" / "predictions.jsonl").read_text().splitlines()) == 3


POOL = 10  # documents summarized by the CLI; the comparisons use DOCS of them whose summaries differ


@pytest.fixture(scope="module")
def summarized(run_dir, billsum_jsonl, tmp_path_factory):
    """(document, CLI summary) for POOL documents: one output line per input file, empty summaries included.
    This chaotic random model writes an empty summary (only "▁" tokens) for some inputs, and which ones depends
    on the CPU's float rounding, so the comparisons below take DOCS documents whose summaries differ."""
    rows = [json.loads(line) for line in billsum_jsonl.read_text().splitlines()[:POOL]]
    documents = [r["text"][:600] for r in rows]
    files = []
    for i, doc in enumerate(documents):
        path = tmp_path_factory.mktemp("docs") / f"doc{i}.txt"
        path.write_text(doc)
        files += ["--file", str(path)]
    proc = subprocess.run([sys.executable, "-m", "sumtune", "summarize", str(run_dir), *files, "--device", "cpu"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.endswith("\n")
    lines = proc.stdout[:-1].split("\n")
    assert len(lines) == POOL, lines
    return list(zip(documents, lines))


@pytest.fixture(scope="module")
def chosen(summarized):
    picked, seen = [], set()
    for doc, summary in summarized:
        if summary and summary not in seen:
            picked.append((doc, summary))
            seen.add(summary)
    assert len(picked) >= DOCS, summarized  # input-dependent summaries, or the comparisons below are idle
    return picked[:DOCS]


@pytest.fixture(scope="module")
def documents(chosen):
    return [doc for doc, _ in chosen]


@pytest.fixture(scope="module")
def cli_summaries(chosen):
    return [summary for _, summary in chosen]


def test_summarize_reads_stdin_and_python_api_agrees(run_dir, documents, cli_summaries):
    import sumtune

    proc = subprocess.run([sys.executable, "-m", "sumtune", "summarize", str(run_dir), "--device", "cpu"],
                          input=documents[0], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip() == cli_summaries[0]
    assert sumtune.Summarizer.from_pretrained(run_dir, device="cpu").summarize(documents) == cli_summaries


def test_adapter_loads_with_plain_peft_and_generates_the_same_summary(run_dir, base_dir, documents, cli_summaries):
    """The adapter is a plain PEFT adapter: `PeftModel.from_pretrained` puts it on the base and transformers'
    own `generate` writes what `sumtune summarize` printed. The base must be quantized as sumtune quantized it
    (T5's `wo` in NF4 too, bitsandbytes' CPU repacking off): with transformers' defaults `wo` stays fp32, and
    this chaotic random model turns such differences into other tokens."""
    from peft import PeftModel
    from transformers import AutoTokenizer

    from sumtune.config import TrainConfig
    from sumtune.modeling import load_model

    tokenizer = AutoTokenizer.from_pretrained(run_dir)
    base = load_model(TrainConfig(model=str(base_dir), compute_dtype="fp32"), len(tokenizer), torch.device("cpu"))
    model = PeftModel.from_pretrained(base, str(run_dir)).eval()
    out = []
    for doc in documents:
        ids = tokenizer("summarize: " + doc, max_length=96, truncation=True, return_tensors="pt")
        with torch.no_grad():
            gen = model.generate(**ids, max_new_tokens=16, num_beams=1, do_sample=False)
        out.append(tokenizer.decode(gen[0], skip_special_tokens=True).strip())
    assert out == cli_summaries


def test_summarizer_makes_its_dense_copy_once(run_dir, monkeypatch):
    """A loaded run never changes, so repeated summarize calls reuse one inference copy."""
    from sumtune.generation import summaries
    from sumtune.inference import Summarizer

    calls = []
    real = summaries.inference_copy
    monkeypatch.setattr(summaries, "inference_copy", lambda model: calls.append(1) or real(model))
    summarizer = Summarizer.from_pretrained(run_dir, device="cpu")
    first = summarizer.summarize(["An act to fund roads.", "An act to rename a post office."], max_new_tokens=6)
    second = summarizer.summarize(["An act to fund roads."], max_new_tokens=6)
    assert len(calls) == 1 and summarizer._dense is not None  # T5: sumtune's decoder runs on the copy
    assert second[0] == first[0]
    summarizer.release()
    assert summarizer._dense is None
    assert summarizer.summarize(["An act to fund roads."], max_new_tokens=6) == second and len(calls) == 2


@pytest.fixture(scope="module")
def merged_dir(run_dir, tmp_path_factory):
    merged = tmp_path_factory.mktemp("merge") / "merged"
    assert main(["merge", str(run_dir), str(merged), "--dtype", "fp32", "--device", "cpu"]) == 0
    assert (merged / "model.safetensors").is_file() and not list(merged.glob("*.bin"))
    return merged


def test_merged_model_has_a_card_and_is_ready_to_push(merged_dir, run_dir):
    from huggingface_hub import ModelCard

    from sumtune.push import files_to_push

    card = ModelCard.load(merged_dir / "README.md")
    assert card.data.library_name == "transformers" and card.data.pipeline_tag == "summarization"
    assert card.data.base_model is None  # the base was a local directory: nothing on the hub to credit
    assert {"README.md", "config.json", "generation_config.json", "model.safetensors"} <= set(files_to_push(merged_dir))
    run_card = ModelCard.load(run_dir / "README.md")
    assert run_card.data.base_model is None and "not a hub repository" in run_card.text


def test_merged_model_loads_as_a_plain_transformers_model_with_the_same_summary(merged_dir, documents,
                                                                               cli_summaries):
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    model = AutoModelForSeq2SeqLM.from_pretrained(merged_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(merged_dir)
    assert not getattr(model.config, "quantization_config", None)
    assert model.generation_config.max_new_tokens == 16  # the run's, not transformers' 20-token default
    out = []
    for doc in documents:
        ids = tokenizer(model.config.prefix + doc, truncation=True, return_tensors="pt")
        with torch.no_grad():
            gen = model.generate(**ids, do_sample=False)
        out.append(tokenizer.decode(gen[0], skip_special_tokens=True).strip())
    assert out == cli_summaries


def test_merged_model_in_a_summarization_pipeline(merged_dir, documents, cli_summaries):
    from transformers import pipeline

    from sumtune.hf_pipeline import register_summarization_pipeline

    register_summarization_pipeline()  # transformers 5 has no summarization task; `import sumtune` adds it
    summarizer = pipeline("summarization", model=str(merged_dir), device="cpu")
    got = [summarizer(doc, truncation=True)[0]["summary_text"].strip() for doc in documents]
    assert got == cli_summaries
