"""Using a trained run: load it (a tiny run brings its own base), summarize with `Summarizer`; no code runs that
nobody asked for, `evaluate --dataset` reads only that data, and an unwritable output is refused before the long
model load (CPU, tiny T5 in NF4, real PEFT)."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from sumtune import cli
from sumtune.data import load_rows
from sumtune.errors import SumtuneError
from sumtune.inference import Summarizer, base_model_source, load_run, read_run_config


def test_summarizer_writes_the_runs_own_eval_predictions(trained_run):
    """The same documents, the same greedy summaries as the recipe's final evaluation wrote (fp32 CPU)."""
    cfg = read_run_config(trained_run)
    rows = load_rows(cfg).eval[: cfg.eval_max_samples]
    records = [json.loads(line) for line in (trained_run / "eval" / "predictions.jsonl").read_text().splitlines()]
    assert [r["reference"] for r in records] == [r["summary"] for r in rows]
    summarizer = Summarizer.from_pretrained(trained_run, device="cpu")
    summaries = summarizer.summarize([r["text"] for r in rows])
    assert summaries == [r["prediction"] for r in records]
    assert len(set(summaries)) > 1 and all(summaries)  # input-dependent, non-empty: the equality is not idle
    summarizer.release()
    assert summarizer.summarize(rows[0]["text"]) == summaries[:1]  # a string is one document; the copy remade


def test_a_tiny_run_loads_the_base_it_saved(trained_run):
    """Random weights exist nowhere else: the run keeps its base under base_model/ and every command loads it."""
    from safetensors.torch import load_file

    cfg = read_run_config(trained_run)
    assert cfg.model == "tiny" and base_model_source(cfg, trained_run).model == str(trained_run / "base_model")
    saved = load_file(str(trained_run / "base_model" / "model.safetensors"))
    model, tokenizer, _ = load_run(trained_run, device="cpu")
    embeddings = model.get_base_model().shared.weight
    assert torch.equal(embeddings, saved["shared.weight"]) and len(tokenizer) == embeddings.shape[0]


# ---- what a run may not make sumtune do ----------------------------------------------------------------------

CORPUS = Path(__file__).parent / "bad_inputs"
TRAIN_ARGS = ["train", "--model", "tiny", "--device", "cpu", "--compute-dtype", "fp32", "--no-progress",
              "--max-steps", "2", "--batch-size", "2", "--max-source-tokens", "16", "--max-target-tokens", "8",
              "--lora-r", "8", "--optimizer", "adamw", "--eval-max-samples", "2", "--max-new-tokens", "4",
              "--log-every-steps", "1", "--eval-ratio", "0.25"]

# Model code a repository ships (transformers imports it with trust_remote_code): it leaves a mark when run.
REMOTE_CODE = '''
from pathlib import Path
from transformers import T5ForConditionalGeneration


class MarkedT5(T5ForConditionalGeneration):
    def __init__(self, config):
        Path({marker!r}).write_text("remote code ran")
        super().__init__(config)
'''


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict[str, Path]:
    """A finished run whose training data is then deleted, and a copy of it that asks for remote code."""
    root = tmp_path_factory.mktemp("runs")
    data = root / "train.jsonl"
    shutil.copy(CORPUS / "good.jsonl", data)
    run = root / "run"
    assert cli.main([*TRAIN_ARGS, "--dataset", str(data), "--output-dir", str(run)]) == 0
    data.unlink()  # the run's own training file is gone: `evaluate --dataset NEW` must not need it
    # The same run, as someone could hand it over: its base model's config names code of its own, and its
    # config.yaml says to trust it.
    marked = root / "run_with_remote_code"
    shutil.copytree(run, marked)
    marker = root / "remote_code_ran"
    base = marked / "base_model"
    (base / "marked_t5.py").write_text(REMOTE_CODE.format(marker=str(marker)))
    config = json.loads((base / "config.json").read_text())
    config["auto_map"] = {"AutoModelForSeq2SeqLM": "marked_t5.MarkedT5"}
    (base / "config.json").write_text(json.dumps(config))
    settings = yaml.safe_load((marked / "config.yaml").read_text())
    (marked / "config.yaml").write_text(yaml.safe_dump({**settings, "trust_remote_code": True}))
    return {"run": run, "marked": marked, "marker": marker, "root": root}


COMMANDS = {
    "evaluate": lambda run, out: ["evaluate", str(run), "--dataset", str(CORPUS / "good.jsonl"), "--device", "cpu",
                                  "--output-dir", str(out / "eval")],
    "summarize": lambda run, out: ["summarize", str(run), "the hawks beat the owls .", "--device", "cpu"],
    "merge": lambda run, out: ["merge", str(run), str(out / "merged"), "--device", "cpu", "--dtype", "fp32"],
}


@pytest.mark.parametrize("command", list(COMMANDS))
def test_a_runs_own_config_cannot_switch_on_remote_code(command, trained, tmp_path, capsys):
    """config.yaml travels with the run: its `trust_remote_code: true` is ignored (only the flag turns it on)."""
    marker = trained["marker"]
    marker.unlink(missing_ok=True)
    status = cli.main(COMMANDS[command](trained["marked"], tmp_path))
    assert status == 0, capsys.readouterr().err
    assert not marker.exists(), "the run's config.yaml made sumtune run the model repository's code"


def test_remote_code_runs_when_the_command_line_asks(trained, tmp_path, capsys):
    trained["marker"].unlink(missing_ok=True)
    status = cli.main([*COMMANDS["summarize"](trained["marked"], tmp_path), "--trust-remote-code"])
    assert status == 0, capsys.readouterr().err
    assert trained["marker"].read_text() == "remote code ran"


def test_evaluate_on_a_new_dataset_reads_only_that(trained, tmp_path, capsys):
    """The run's training file is gone; `--dataset NEW` evaluates every usable row of NEW and nothing else."""
    new = tmp_path / "new.jsonl"
    rows = [json.loads(line) for line in (CORPUS / "good.jsonl").read_text().splitlines()][:5]
    new.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "eval"
    status = cli.main(["evaluate", str(trained["run"]), "--dataset", str(new), "--device", "cpu",
                       "--output-dir", str(out)])
    assert status == 0, capsys.readouterr().err
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["num_samples"] == 5
    references = [json.loads(line)["reference"] for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert references == [r["summary"] for r in rows]


def test_merge_refuses_an_unwritable_output_before_loading_the_model(trained, tmp_path, monkeypatch):
    from sumtune import inference

    def never(*args, **kwargs):
        raise AssertionError("the model was loaded before the output path was checked")

    monkeypatch.setattr(inference, "load_model", never)
    a_file = tmp_path / "a_file"
    a_file.write_text("mine")
    for out in (a_file, a_file / "merged"):
        with pytest.raises(SumtuneError, match="a file, not a directory"):
            inference.merge_run(trained["run"], out, device="cpu")
    assert a_file.read_text() == "mine"


def test_merge_writes_the_model_whole_or_not_at_all(trained, tmp_path, monkeypatch):
    """A merge that dies while saving leaves no half model directory behind (it is renamed into place)."""
    from transformers import PreTrainedTokenizerBase

    from sumtune import inference

    def disk_full(self, *args, **kwargs):
        raise OSError(28, "No space left on device (injected)")

    monkeypatch.setattr(PreTrainedTokenizerBase, "save_pretrained", disk_full)  # the last file written
    with pytest.raises(OSError, match="injected"):
        inference.merge_run(trained["run"], tmp_path / "merged", device="cpu", dtype="fp32")
    assert sorted(p.name for p in tmp_path.iterdir()) == []


# ---- batch inference: `sumtune summarize RUN --input FILE --output FILE` --------------------------------------

@pytest.fixture(scope="module")
def eval_texts(trained_run) -> list[str]:
    return [r["text"] for r in load_rows(read_run_config(trained_run)).eval[:5]]


def test_summarize_a_table_in_batches_keeping_each_rows_id(trained_run, eval_texts, tmp_path, capsys):
    docs = tmp_path / "docs.jsonl"
    docs.write_text("".join(json.dumps({"id": f"doc-{i}", "text": t}) + "\n" for i, t in enumerate(eval_texts)))
    out = tmp_path / "preds.jsonl"
    assert cli.main(["summarize", str(trained_run), "--input", str(docs), "--output", str(out), "--batch-size", "2",
                     "--device", "cpu", "--no-progress"]) == 0
    assert f"sumtune: 5 summaries written to {out}" in capsys.readouterr().err
    expected = Summarizer.from_pretrained(trained_run, device="cpu").summarize(eval_texts, batch_size=2,
                                                                              progress=False)
    assert len(set(expected)) > 1  # input-dependent: the order and ids below mean something
    assert [json.loads(line) for line in out.read_text().splitlines()] == [
        {"id": f"doc-{i}", "summary": s} for i, s in enumerate(expected)]


def test_dash_reads_stdin_one_document_per_line(trained_run, eval_texts, monkeypatch, capsys):
    monkeypatch.setattr("sys.stdin", io.StringIO("\n".join(eval_texts[:3]) + "\n\n"))
    assert cli.main(["summarize", str(trained_run), "-", "--lines", "--device", "cpu", "--output", "-"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    expected = Summarizer.from_pretrained(trained_run, device="cpu").summarize(eval_texts[:3], progress=False)
    assert lines == [{"id": i, "summary": s} for i, s in enumerate(expected)]


def test_generation_options_reach_the_summaries(trained_run, eval_texts, capsys):
    """--no-repeat-ngram-size and --min-new-tokens change what is generated, on the CLI as in the API."""
    summarizer = Summarizer.from_pretrained(trained_run, device="cpu")
    tokens = summarizer.tokenizer.tokenize
    plain = summarizer.summarize(eval_texts, progress=False)
    banned = summarizer.summarize(eval_texts, no_repeat_ngram_size=1, min_new_tokens=12, progress=False)
    assert banned != plain and any(len(set(tokens(s))) < len(tokens(s)) for s in plain)
    assert all(len(set(tokens(s))) == len(tokens(s)) >= 12 for s in banned)
    assert cli.main(["summarize", str(trained_run), eval_texts[0], "--no-repeat-ngram-size", "1",
                     "--min-new-tokens", "12", "--device", "cpu"]) == 0
    assert capsys.readouterr().out.strip() == banned[0]


def test_a_hub_id_that_cannot_be_had_offline_is_one_sentence(capsys):
    message = ("Cannot load run 'someone/sumtune-run': there is no such local directory, and the hub is switched "
               "off (HF_HUB_OFFLINE=1) with no copy of it in the local cache.")
    with pytest.raises(SumtuneError) as err:
        Summarizer.from_pretrained("someone/sumtune-run", device="cpu")
    assert str(err.value) == message
    assert cli.main(["summarize", "someone/sumtune-run", "text", "--device", "cpu"]) == 2
    assert capsys.readouterr().err == f"sumtune: error: {message}\n"


def test_a_hub_id_loads_from_the_cache_offline(trained_run, eval_texts, tmp_path):
    """A run pushed to the hub and downloaded once loads by its id with the hub switched off: the cache is laid
    out as huggingface_hub lays it (refs/main → snapshots/COMMIT/), from the files `sumtune push` uploads."""
    import subprocess
    import sys

    from sumtune.push import files_to_push

    repo = tmp_path / "hf" / "hub" / "models--someone--sumtune-run"
    commit = "0123456789abcdef0123456789abcdef01234567"
    snapshot = repo / "snapshots" / commit
    for rel in files_to_push(trained_run):
        (snapshot / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(trained_run / rel, snapshot / rel)
    shutil.copytree(trained_run / "base_model", snapshot / "base_model")  # a tiny run's random base goes along
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    script = ("import json, sys, sumtune\n"
              "s = sumtune.Summarizer.from_pretrained('someone/sumtune-run', device='cpu')\n"
              "print(json.dumps(s.summarize(json.loads(sys.argv[1]), progress=False)))\n")
    env = {**__import__("os").environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-c", script, json.dumps(eval_texts[:2])], capture_output=True,
                            text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    expected = Summarizer.from_pretrained(trained_run, device="cpu").summarize(eval_texts[:2], progress=False)
    assert json.loads(result.stdout.strip().splitlines()[-1]) == expected


def test_running_out_of_gpu_memory_while_summarizing_is_one_sentence_and_the_output_is_left_alone(
        trained_run, eval_texts, tmp_path, monkeypatch, capsys):
    """A batch too big for the GPU (FLAN-T5-XL's kv cache at 128 rows x 4096 tokens took more than 80 GB, session 47)
    ends `summarize` with one sentence naming the batch and what to lower, exit status 2, no traceback, an existing
    output untouched; the summarizer frees its decoding buffers and summarizes the next, smaller call."""
    from sumtune.generation import summaries

    out = tmp_path / "preds.jsonl"
    out.write_text("earlier predictions\n")
    generate = summaries.generate_summaries
    sizes = []

    def out_of_memory(*args, **kwargs):
        sizes.append(kwargs["batch_size"])
        if kwargs["batch_size"] > 4:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (simulated)")
        return generate(*args, **kwargs)

    monkeypatch.setattr(summaries, "generate_summaries", out_of_memory)
    docs = tmp_path / "docs.jsonl"
    docs.write_text("".join(json.dumps({"text": t}) + "\n" for t in eval_texts))
    code = cli.main(["summarize", str(trained_run), "--input", str(docs), "--output", str(out), "--batch-size", "128",
                     "--device", "cpu", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert ("ran out of memory while generating summaries (128 documents × 64 source tokens, 1 beam(s), up to "
            "16 new tokens); lower --batch-size or --num-beams.") in err
    assert out.read_text() == "earlier predictions\n"
    summarizer = Summarizer.from_pretrained(trained_run, device="cpu")
    with pytest.raises(SumtuneError, match="lower --batch-size"):
        summarizer.summarize(eval_texts, batch_size=8, progress=False)
    assert summarizer._dense is None  # released
    assert len(summarizer.summarize(eval_texts, batch_size=2, progress=False)) == len(eval_texts)
    assert sizes == [128, 8, 2]


def test_running_out_of_gpu_memory_in_evaluate_is_one_sentence(trained_run, tmp_path, monkeypatch, capsys):
    """`sumtune evaluate` with a generation batch too big for the GPU: one sentence naming the batch and what to
    lower, exit status 2, no traceback, no metrics written."""
    from sumtune import evaluation

    def out_of_memory(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (simulated)")

    monkeypatch.setattr(evaluation, "evaluate_rows", out_of_memory)
    out = tmp_path / "eval"
    code = cli.main(["evaluate", str(trained_run), "--batch-size", "128", "--max-samples", "4", "--device", "cpu",
                     "--no-progress", "--output-dir", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err and err.strip().splitlines()[-1].startswith("sumtune: error: CUDA"), err
    assert "while generating summaries (128 documents × 64 source tokens" in err and "lower --batch-size" in err
    assert not (out / "metrics.json").exists()
