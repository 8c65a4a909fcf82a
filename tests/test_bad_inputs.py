"""Bad input: one clear sentence, exit status 2, nothing half-written (corpus: tests/bad_inputs/cases.yaml).

Every case runs the real `sumtune` CLI in-process on real files (tiny T5 in NF4, real PEFT); see cases.yaml for
the contract. A few inputs that look bad but are fine (empty rows skipped and counted, a huge document, a
byte-order mark) are checked to train normally.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path

import pytest
import yaml

from sumtune import cli

CORPUS = Path(__file__).parent / "bad_inputs"
CASES = yaml.safe_load((CORPUS / "cases.yaml").read_text(encoding="utf-8"))
BASE_TRAIN_ARGS = [
    "train", "--model", "tiny", "--dataset", "{corpus}/good.jsonl", "--output-dir", "{out}", "--device", "cpu",
    "--compute-dtype", "fp32", "--no-progress", "--max-steps", "2", "--batch-size", "2", "--max-source-tokens",
    "16", "--max-target-tokens", "8", "--lora-r", "8", "--lr", "0.003", "--optimizer", "adamw",
    "--checkpoint-every-steps", "1", "--eval-every-steps", "1000", "--eval-max-samples", "2",
    "--max-new-tokens", "4", "--log-every-steps", "1", "--eval-ratio", "0.25",
]


def fill(args: list[str], places: dict[str, str]) -> list[str]:
    return [a.format(**places) for a in args]


def _digest(path: Path) -> str:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except PermissionError:  # the unreadable data file of a case (when not root): its mode is what it has
        return f"unreadable {path.stat().st_mode:o} {path.stat().st_size}"


def snapshot(path: Path) -> dict[str, str] | None:
    """Every file under `path` with the hash of its bytes (None when `path` does not exist)."""
    if not path.exists():
        return None
    if path.is_file():
        return {".": _digest(path)}
    return {str(p.relative_to(path)): _digest(p) if p.is_file() else "dir" for p in sorted(path.rglob("*"))}


def make_user_dir(path: Path) -> None:
    """A folder of someone's own work: what `train --output-dir` once overwrote."""
    (path / "eval").mkdir(parents=True)
    (path / "plots").mkdir()
    (path / "README.md").write_text("# my project\n\nnotes I keep.\n")
    (path / "tokenizer.json").write_text('{"version": "mine"}\n')
    (path / "tokenizer_config.json").write_text('{"model_max_length": 512}\n')
    (path / "config.yaml").write_text("project: mine\nmodel: my-own-model\n")
    (path / "eval" / "metrics.json").write_text('{"rougeL": 41.0}\n')
    (path / "plots" / "loss.png").write_bytes(bytes(range(256)))


def make_read_only(path: Path, monkeypatch) -> None:
    """A folder nobody may write; root writes anywhere, so there the kernel's refusal is played by os.access."""
    path.mkdir()
    path.chmod(0o555)
    if os.geteuid() == 0:
        real_access = os.access

        def access(target, mode, *args, **kwargs):
            if mode & os.W_OK and Path(target).resolve() == path.resolve():
                return False
            return real_access(target, mode, *args, **kwargs)

        monkeypatch.setattr(os, "access", access)


def run_cli(argv: list[str], capsys) -> tuple[int, str]:
    try:
        status = cli.main(argv)
    except SystemExit as stop:  # argparse's own errors
        status = stop.code
    return status, capsys.readouterr().err


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    """A real finished 2-step run with checkpoints (the target of the output-dir and resume cases)."""
    run = tmp_path_factory.mktemp("finished") / "run"
    assert cli.main(fill(BASE_TRAIN_ARGS, {"corpus": str(CORPUS), "out": str(run)})) == 0
    return run


@pytest.fixture(scope="module")
def places(finished_run, tmp_path_factory) -> dict[str, str]:
    import torch
    from transformers import T5ForConditionalGeneration

    from sumtune.modeling import t5_config

    root = tmp_path_factory.mktemp("fixtures")
    base_config = json.loads((finished_run / "base_model" / "config.json").read_text())
    # the same run on a base model of other shapes: its adapter cannot fit
    mismatch = root / "run_mismatch"
    shutil.copytree(finished_run, mismatch)
    shutil.rmtree(mismatch / "base_model")
    torch.manual_seed(0)
    other = t5_config("tiny", vocab_size=base_config["vocab_size"], d_model=64, d_ff=256, d_kv=16)
    T5ForConditionalGeneration(other).save_pretrained(mismatch / "base_model")
    # the same run with its adapter as a pickle file
    pickled = root / "run_pickle_adapter"
    shutil.copytree(finished_run, pickled)
    (pickled / "adapter_model.safetensors").unlink()
    (pickled / "adapter_model.bin").write_bytes(b"\x80\x04not really a pickle")
    # model directories: config only, weights only, pickle weights only
    no_weights, no_config, pickle_only = root / "model_no_weights", root / "model_no_config", root / "model_pickle"
    for d in (no_weights, no_config, pickle_only):
        d.mkdir()
    other.save_pretrained(no_weights)
    other.save_pretrained(pickle_only)
    (pickle_only / "pytorch_model.bin").write_bytes(b"\x80\x04not really a pickle")
    (no_config / "model.safetensors").write_bytes(b"{}")
    plain_file = root / "a_file.txt"
    plain_file.write_text("not a directory")
    # damaged copies of the run: what a kill -9 or a full disk leaves in the middle of writing a file
    damaged = {name: root / name for name in ("run_damaged_adapter", "run_damaged_adapter_config",
                                              "run_damaged_base", "run_damaged_checkpoints")}
    for path in damaged.values():
        shutil.copytree(finished_run, path)
    cut_short(damaged["run_damaged_adapter"] / "adapter_model.safetensors")
    cut_short(damaged["run_damaged_adapter_config"] / "adapter_config.json")
    cut_short(damaged["run_damaged_base"] / "base_model" / "model.safetensors")
    steps = sorted((damaged["run_damaged_checkpoints"] / "checkpoints").glob("step-*"))
    assert [p.name for p in steps] == ["step-1", "step-2"]
    for step in steps:
        cut_short(step / "adapter_model.safetensors")
    model_damaged = root / "model_damaged"
    T5ForConditionalGeneration(other).save_pretrained(model_damaged)
    cut_short(model_damaged / "model.safetensors")
    # CIFAR10 in the Python format: pickle files (this one would leave a mark if it were ever unpickled)
    cifar = root / "cifar_pickle" / "cifar-10-batches-py"
    cifar.mkdir(parents=True)
    (cifar / "data_batch_1").write_bytes(pickle_that_marks(root / "cifar_pickle_ran"))
    return {"corpus": str(CORPUS), "run": str(finished_run), "run_mismatch": str(mismatch),
            "run_pickle_adapter": str(pickled), "model_no_weights": str(no_weights),
            "model_no_config": str(no_config), "model_pickle_only": str(pickle_only), "file": str(plain_file),
            **{name: str(path) for name, path in damaged.items()}, "model_damaged": str(model_damaged),
            "cifar_pickle": str(root / "cifar_pickle")}


def cut_short(path: Path) -> None:
    """Keep the first half of a file, as a kill in the middle of writing it would."""
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def pickle_that_marks(marker: Path) -> bytes:
    """A pickle that creates `marker` when loaded: any code would run the same way."""
    import pickle

    class Marks:
        def __reduce__(self):
            return (exec, (f"open({str(marker)!r}, 'w').write('pickle ran')",))

    return pickle.dumps(Marks())


def test_corpus_is_large_enough():
    ids = [c["id"] for c in CASES]
    assert len(ids) >= 100 and len(set(ids)) == len(ids)


@pytest.mark.parametrize("case", CASES, ids=[c["id"] for c in CASES])
def test_bad_input(case, places, tmp_path, capsys, monkeypatch):
    here = {**places, "tmp": str(tmp_path), "out": str(tmp_path / "out")}
    for name in [case.get("make_dir")] if case.get("make_dir") else []:
        (tmp_path / name).mkdir()
    if case.get("user_dir"):
        make_user_dir(tmp_path / case["user_dir"])
    if case.get("readonly"):
        make_read_only(tmp_path / case["readonly"], monkeypatch)
    if case.get("unreadable"):
        locked = tmp_path / case["unreadable"]
        locked.write_text((CORPUS / "good.jsonl").read_text())
        locked.chmod(0)
        if os.geteuid() == 0:  # root reads files whatever their permissions: refuse the read as the kernel would
            import errno

            real_read_text = Path.read_text

            def read_text(path, *args, **kwargs):
                if Path(path).resolve() == locked.resolve():
                    raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
                return real_read_text(path, *args, **kwargs)

            monkeypatch.setattr(Path, "read_text", read_text)
    command = case.get("command", "train")
    argv = fill(BASE_TRAIN_ARGS + case["args"] if command == "train" else [command, *case["args"]], here)
    watched = [tmp_path, *(Path(p) for name, p in places.items() if name != "corpus"), CORPUS]
    before = [snapshot(p) for p in watched]

    status, err = run_cli(argv, capsys)

    assert status == 2, err
    assert "Traceback" not in err
    if case.get("argparse"):
        last = err.strip().splitlines()[-1]
    else:
        errors = [line for line in err.splitlines() if line.startswith("sumtune: error: ")]
        assert len(errors) == 1 and err.rstrip().endswith(errors[0]), err
        last = errors[0]
        sentence = last.removeprefix("sumtune: error: ")
        assert sentence[0].isupper() or sentence[0] in "`'", sentence
        assert sentence.endswith("."), sentence
    for expected in case["expect"]:
        assert expected in last, f"{expected!r} not in {last!r}"
    assert [snapshot(p) for p in watched] == before, "a failed command changed files"


# ---- inputs that look bad but are fine ----------------------------------------------------------------------

def test_empty_rows_are_skipped_and_reported(tmp_path, capsys):
    argv = fill(BASE_TRAIN_ARGS, {"corpus": str(CORPUS), "out": str(tmp_path / "out")})
    argv[argv.index("--dataset") + 1] = str(CORPUS / "empty_rows.jsonl")
    status, err = run_cli(argv, capsys)
    assert status == 0, err
    assert "Skipped 2 row(s) with an empty text or summary." in err


def test_resolved_paths_are_reported(finished_run, tmp_path, capsys):
    out = tmp_path / "out"
    argv = fill(BASE_TRAIN_ARGS, {"corpus": os.path.relpath(CORPUS), "out": str(out)})
    status, err = run_cli(argv, capsys)
    assert status == 0, err
    assert f"run directory {out.resolve()}; data {(CORPUS / 'good.jsonl').resolve()}; model tiny." in err


def test_huge_document_and_byte_order_mark(tmp_path, capsys, monkeypatch):
    """A 16 MB document trains like any other: it is cut before tokenizing (at data.COUNT_LIMIT_TOKENS, up to
    which whole lengths are counted for the truncation report), so it costs no more than a long one."""
    from sumtune import data as data_module

    longest_in, longest_out = [0], [0]
    real_clip = data_module.clip_chars

    def watched_clip(texts, max_tokens):
        clipped = real_clip(texts, max_tokens)
        longest_in[0] = max([longest_in[0], *map(len, texts)])
        longest_out[0] = max([longest_out[0], *map(len, clipped)])
        return clipped

    monkeypatch.setattr(data_module, "clip_chars", watched_clip)
    good = [json.loads(line) for line in (CORPUS / "good.jsonl").read_text().splitlines()]
    huge = {"text": " ".join(["the hawks played the owls in oakdale ."] * 420_000), "summary": "the hawks played ."}
    data = tmp_path / "huge.jsonl"
    data.write_text("\ufeff" + "\n".join(json.dumps(r) for r in [huge, *good]) + "\n", encoding="utf-8")
    assert data.stat().st_size > 16_000_000
    argv = fill(BASE_TRAIN_ARGS, {"corpus": str(CORPUS), "out": str(tmp_path / "out")})
    argv[argv.index("--dataset") + 1] = str(data)
    start = time.perf_counter()
    status, err = run_cli(argv, capsys)
    assert status == 0, err
    assert time.perf_counter() - start < 120
    cut_at = data_module.MAX_CHARS_PER_TOKEN * data_module.COUNT_LIMIT_TOKENS  # 2 MiB
    assert longest_in[0] > 16_000_000 and longest_out[0] <= cut_at  # the tokenizer saw a cut copy


def test_tokenizing_a_huge_document_is_cut_early():
    from sumtune.data import MAX_CHARS_PER_TOKEN, clip_chars

    text = "word " * 1_000_000
    (clipped,) = clip_chars([text], 512)
    assert len(clipped) == 512 * MAX_CHARS_PER_TOKEN and text.startswith(clipped)
    assert clip_chars(["short"], 512) == ["short"]


def test_allow_pickle_is_needed_for_pickle_weights(places):
    from sumtune.config import TrainConfig
    from sumtune.errors import SumtuneError
    from sumtune.modeling import check_model_source

    with pytest.raises(SumtuneError, match="--allow-pickle"):
        check_model_source(places["model_pickle_only"])
    check_model_source(places["model_pickle_only"], allow_pickle=True)  # allowed: no error


def test_trust_remote_code_and_allow_pickle_default_off():
    from sumtune.config import TrainConfig

    cfg = TrainConfig()
    assert cfg.trust_remote_code is False and cfg.allow_pickle is False
