"""A run survives being killed and never destroys what it produced (CPU, tiny T5 in real NF4, real PEFT/bnb).

- SIGKILL at several points, then `--resume`: the same adapter tensors (torch.equal) and the same logged
  losses as an uninterrupted run;
- SIGTERM / SIGINT: the current step finishes, a checkpoint is written, exit status 143 / 130;
- a crash in the middle of a checkpoint write leaves the previous checkpoint whole, the partial one ignored;
- checkpoint contents (8-bit optimizer state, no pickle), pruning; the dequantized-weight cache trains the same
  adapter as the uninterrupted run.

Non-finite steps: tests/test_reliability_nonfinite.py; `batch_size: auto` and memory: tests/test_reliability_memory.py.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from _reliability_helpers import config
from safetensors.torch import load_file

from sumtune import api, checkpoint, faults
from sumtune.metrics import read_metrics
from sumtune.modeling import PICKLE_SUFFIXES
from sumtune.recipe import TrainRecipe


VOLATILE = {"tokens_per_s", "samples_per_s", "step_time_s", "peak_mem_gib", "time_s", "mfu", "mfu_measured",
            "graph_captures", "graph_warm_up_s", "graph_record_s"}


ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def logged(run: Path) -> list[dict]:
    """metrics.jsonl without the wall-clock numbers (which differ between any two runs)."""
    return [{k: v for k, v in r.items() if k not in VOLATILE} for r in read_metrics(run)]


def assert_same_run(run: Path, reference: Path) -> None:
    got, want = (load_file(str(run / "adapter_model.safetensors")),
                 load_file(str(reference / "adapter_model.safetensors")))
    assert got.keys() == want.keys()
    different = [k for k in want if not torch.equal(got[k], want[k])]
    assert not different, f"{len(different)} adapter tensors differ, e.g. {different[0]}"
    assert logged(run) == logged(reference)


def start_train(config_path: Path, out: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "sumtune", "train", "--config", str(config_path),
                             "--output-dir", str(out)], env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def wait_until(proc: subprocess.Popen, ready, timeout_s: float = 240.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not ready():
        if proc.poll() is not None:
            raise AssertionError(f"training ended (status {proc.returncode}) before the kill point:\n"
                                 f"{proc.stderr.read()[-2000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError("kill point not reached in time")
        time.sleep(0.02)


def train_steps_logged(run: Path) -> int:
    return sum(1 for r in read_metrics(run) if r["split"] == "train") if (run / "metrics.jsonl").is_file() else 0


@pytest.fixture(scope="module")
def reference(config_path, tmp_path_factory) -> Path:
    """The uninterrupted run every interrupted one must reproduce exactly."""
    out = tmp_path_factory.mktemp("ref") / "run"
    api.train(config(config_path, out))
    return out


def test_dequantized_weight_cache_trains_the_same_adapter(config_path, reference, tmp_path):
    """`cache_dequantized_weights` is a speed option: same maths as bitsandbytes' per-call dequantization."""
    out = tmp_path / "cached"
    recipe = TrainRecipe(config(config_path, out, cache_dequantized_weights=True))
    recipe.setup()
    try:
        cached = [m for m in recipe.model.modules() if hasattr(m, "_sumtune_dequantized_weight")]
        assert cached  # the option really reached the model
        import bitsandbytes.functional as bnbf

        dequantized = []  # and the forward reads the cache: bitsandbytes never dequantizes during training
        real = bnbf.dequantize_4bit
        bnbf.dequantize_4bit = lambda *a, **k: dequantized.append(1) or real(*a, **k)
        try:
            recipe.train()
        finally:
            bnbf.dequantize_4bit = real
        assert not dequantized
        recipe.finish()
    finally:
        recipe.cleanup()
    # The cache computes bitsandbytes' own dequantization once instead of per call, then the same GEMM:
    # on the CPU in fp32 the runs are identical (measured), so any difference is a bug.
    want, got = read_metrics(reference), read_metrics(out)
    losses = [r["loss"] for r in want if r["split"] == "train"], [r["loss"] for r in got if r["split"] == "train"]
    assert losses[1] == losses[0]
    a, b = load_file(str(reference / "adapter_model.safetensors")), load_file(str(out / "adapter_model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


# ---- kill -9 and resume -------------------------------------------------------------------------------------
KILL_POINTS = {
    # right after the first checkpoint landed
    "first-checkpoint": lambda run: (run / "checkpoints" / "step-3").is_dir(),
    # at an arbitrary step between checkpoints (step 7 logged: killed at step 7 or 8, resumed from step 6)
    "between-checkpoints": lambda run: train_steps_logged(run) >= 7,
    # after the last step, during the final evaluation and save
    "final-evaluation": lambda run: (run / "checkpoints" / "step-10").is_dir(),
}


@pytest.mark.slow
@pytest.mark.parametrize("point", list(KILL_POINTS))
def test_sigkill_then_resume_equals_uninterrupted_run(point, config_path, reference, tmp_path):
    out = tmp_path / "run"
    proc = start_train(config_path, out)
    wait_until(proc, lambda: KILL_POINTS[point](out))
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=60) == -signal.SIGKILL
    assert checkpoint.latest_checkpoint(out / "checkpoints") is not None
    api.train(config(config_path, out, resume="latest"))
    assert_same_run(out, reference)


# ---- SIGTERM / SIGINT ---------------------------------------------------------------------------------------
@pytest.mark.slow
def test_sigterm_finishes_the_step_checkpoints_and_exits_143(config_path, reference, tmp_path):
    out = tmp_path / "run"
    proc = start_train(config_path, out)
    wait_until(proc, lambda: train_steps_logged(out) >= 4)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 143, stderr[-2000:]
    assert "stopped by SIGTERM" in stderr and "--resume" in stderr
    last_step = train_steps_logged(out)
    saved = checkpoint.latest_checkpoint(out / "checkpoints")
    assert saved is not None and checkpoint.step_of(saved) == last_step  # the step in flight was finished
    assert not (out / "adapter_model.safetensors").exists()  # no final save: the run is not done
    api.train(config(config_path, out, resume=str(saved)))
    assert_same_run(out, reference)


def test_sigint_in_process_checkpoints_and_exits_130(config_path, tmp_path, monkeypatch):
    """Ctrl-C through the CLI entry point: a checkpoint at the step reached, status 130, handlers restored."""
    from sumtune import cli
    from sumtune.metrics import MetricsLogger

    log = MetricsLogger.log

    def log_then_interrupt(self, split, step, values):
        record = log(self, split, step, values)
        if split == "train" and step == 2:
            os.kill(os.getpid(), signal.SIGINT)  # delivered before the next bytecode: mid-step 2's bookkeeping
        return record

    monkeypatch.setattr(MetricsLogger, "log", log_then_interrupt)
    out = tmp_path / "run"
    # what the process had before (Python's default_int_handler, or SIG_IGN when a shell starts it in the background)
    handlers_before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    with pytest.raises(SystemExit) as stopped:
        cli.main(["train", "--config", str(config_path), "--output-dir", str(out)])
    assert stopped.value.code == 130
    assert isinstance(stopped.value, faults.TrainingInterrupted)
    assert [p.name for p in checkpoint.step_checkpoints(out / "checkpoints")] == ["step-2"]
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == handlers_before


# ---- atomic checkpoint writes -------------------------------------------------------------------------------
def test_crash_during_checkpoint_write_keeps_previous_one(config_path, reference, tmp_path, monkeypatch):
    import safetensors.torch

    out = tmp_path / "run"
    real_save = safetensors.torch.save_file

    def crash_at_step_6(tensors, filename, *args, **kwargs):
        if "step-6" in str(filename) and filename.endswith(checkpoint.OPTIMIZER_FILE):
            raise OSError(28, "No space left on device (injected)")
        return real_save(tensors, filename, *args, **kwargs)

    monkeypatch.setattr(safetensors.torch, "save_file", crash_at_step_6)
    with pytest.raises(OSError, match="injected"):
        api.train(config(config_path, out))
    monkeypatch.setattr(safetensors.torch, "save_file", real_save)
    root = out / "checkpoints"
    assert [p.name for p in root.iterdir()] == ["step-3"]  # no step-6, no hidden half-written directory
    checkpoint.read_state(root / "step-3")
    # A hard crash (kill -9, power loss) leaves its temporary directory behind: it must be ignored and cleaned.
    partial = root / ".step-6.tmp-12345"
    partial.mkdir()
    (partial / checkpoint.ADAPTER_FILE).write_bytes(b"\0" * 100)
    assert checkpoint.latest_checkpoint(root) == root / "step-3"
    api.train(config(config_path, out, resume="latest"))
    assert not partial.exists()
    assert_same_run(out, reference)


def cut_short(path: Path) -> None:
    """Keep the first half of a file, as a kill in the middle of copying or writing it would."""
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


@pytest.mark.parametrize("damaged", [checkpoint.ADAPTER_FILE, checkpoint.STATE_FILE])
def test_resume_skips_a_damaged_checkpoint_for_the_newest_intact_one(damaged, config_path, reference, tmp_path,
                                                                      capsys):
    """The newest checkpoint was cut short (a disk filled up, a copy was killed): --resume says so, continues from
    the one before, and ends exactly where the uninterrupted run ended."""
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    cut_short(out / "checkpoints" / "step-10" / damaged)
    api.train(config(config_path, out, resume="latest"))
    err = capsys.readouterr().err
    assert f"sumtune: skipped checkpoint step-10 (Checkpoint {str(out / 'checkpoints' / 'step-10')!r} is damaged: " \
           f"{damaged}" in err
    assert "resuming from the newest intact one, step-9." in err
    assert "step-9 at step 9 of 10." in err
    assert_same_run(out, reference)
    checkpoint.read_state(out / "checkpoints" / "step-10")  # written again, whole


def test_a_failed_final_save_keeps_the_previous_adapter(config_path, tmp_path):
    """The final adapter replaces the previous one by renames: a save that dies halfway (disk full) leaves the
    previous adapter byte for byte, never a missing or half-written one."""
    out = tmp_path / "run"
    recipe = TrainRecipe(config(config_path, out, max_steps=2))
    recipe.setup()
    try:
        recipe.train()
        earlier = {name: b"the earlier adapter: " + name.encode() for name in
                   ("adapter_config.json", "adapter_model.safetensors")}
        for name, data in earlier.items():
            (out / name).write_bytes(data)
        real_save = recipe.model.save_pretrained

        def save_then_disk_full(directory, *args, **kwargs):
            real_save(directory, *args, **kwargs)
            weights = Path(directory) / "adapter_model.safetensors"
            weights.write_bytes(weights.read_bytes()[:100])
            raise OSError(28, "No space left on device (injected)")

        recipe.model.save_pretrained = save_then_disk_full
        with pytest.raises(OSError, match="injected"):
            recipe.finish()
        assert {name: (out / name).read_bytes() for name in earlier} == earlier
        assert not [p.name for p in out.iterdir() if p.name.startswith(".sumtune-writing")]
        recipe.model.save_pretrained = real_save
        recipe.finish()
        checkpoint.read_state(out / "checkpoints" / "step-2")
        from sumtune.safe_io import safetensors_problem

        assert safetensors_problem(out / "adapter_model.safetensors") is None
        assert (out / "adapter_config.json").read_bytes() != earlier["adapter_config.json"]
    finally:
        recipe.cleanup()


def test_interrupted_replacement_of_best_is_repaired(tmp_path):
    root = tmp_path / "checkpoints"
    (root / ".best.old-7").mkdir(parents=True)  # crash between "best → .best.old" and ".best.tmp → best"
    (root / ".best.old-7" / "marker").write_text("old best")
    (root / ".best.tmp-7").mkdir()
    assert checkpoint.recover_partials(root) == [".best.tmp-7"]
    assert (root / "best" / "marker").read_text() == "old best"
    assert sorted(p.name for p in root.iterdir()) == ["best"]


# ---- what a checkpoint holds, what is kept --------------------------------------------------------------
def test_checkpoints_hold_full_state_without_pickle(reference):
    root = reference / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["best", "step-10", "step-9"]  # last 2 + best
    step = root / "step-10"
    files = {p.name for p in step.iterdir()}
    assert {"adapter_config.json", checkpoint.ADAPTER_FILE, checkpoint.OPTIMIZER_FILE, checkpoint.RNG_FILE,
            checkpoint.STATE_FILE} <= files
    assert not [f for f in files if f.endswith(PICKLE_SUFFIXES)]
    state = json.loads((step / checkpoint.STATE_FILE).read_text())
    assert state["step"] == 10 and state["samples_seen"] == 40 and state["micro_batch_size"] == 4
    assert state["config"]["lora_r"] == 8 and state["rng"]["python"]
    optimizer = load_file(str(step / checkpoint.OPTIMIZER_FILE))
    assert any(t.dtype == torch.uint8 for t in optimizer.values()), "8-bit optimizer state must be saved"
    assert json.loads((root / "best" / "checkpoint.json").read_text())["step"] == 10
    assert (reference / "config.yaml").is_file() and "resume: null" in (reference / "config.yaml").read_text()


def test_encode_decode_round_trip():
    state = {"state": {0: {"step": 3, "__bnb_optimizer_quant_state__": {"state1": torch.arange(4, dtype=torch.uint8)}},
                       1: {"exp_avg": torch.randn(3)}},
             "param_groups": [{"betas": (0.9, 0.999), "lr": 1e-4, "params": [0, 1], "fused": None,
                               "eps": float("inf")}]}
    tensors: dict = {}
    layout = json.loads(json.dumps(checkpoint.encode(state, tensors, "o")))
    back = checkpoint.decode(layout, tensors)
    assert back["param_groups"][0]["betas"] == (0.9, 0.999) and isinstance(back["param_groups"][0]["betas"], tuple)
    assert list(back["state"]) == [0, 1] and back["state"][0]["step"] == 3
    assert torch.equal(back["state"][0]["__bnb_optimizer_quant_state__"]["state1"], torch.arange(4, dtype=torch.uint8))
    assert torch.equal(back["state"][1]["exp_avg"], state["state"][1]["exp_avg"])
    group = back["param_groups"][0]
    assert group["eps"] == float("inf") and group["fused"] is None and group["lr"] == 1e-4  # JSON's hard cases
    assert group["params"] == [0, 1]
