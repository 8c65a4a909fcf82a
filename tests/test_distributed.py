"""Data-parallel training: the process group, and W processes == 1 process end to end (sharding and loss
weighting: test_batching; the sharded evaluation: test_evaluator).

The end-to-end tests launch real process groups (gloo on the CPU, NCCL on GPUs) with torchrun and with
`accelerate launch` and the shipped config, train a tiny NF4 T5 with LoRA, and compare the final adapter with a
one-process run of the same effective batch and data order.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sumtune import distributed

REPO_ROOT = Path(__file__).resolve().parents[1]


# ---- unit tests ------------------------------------------------------------------------------------------------

def test_single_process_context_is_a_no_op(monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    ctx = distributed.init_distributed(torch.device("cpu"))
    assert (ctx.rank, ctx.world_size, ctx.is_main, ctx.enabled) == (0, 1, True, False)
    model = torch.nn.Linear(2, 2)
    assert distributed.wrap_model(model, ctx) is model
    assert distributed.gather_objects({"a": 1}) == [{"a": 1}]
    assert distributed.reduce_for_log(ctx, 1.5, 10, 4) == (1.5, 10, 4)
    assert distributed.describe_batch(16, 2, 4) == "128 samples (16 × 2 accumulation × 4 processes)"


def test_shipped_accelerate_configs_parse():
    from accelerate.commands.config.config_args import load_config_from_file

    for n in (2, 4):
        cfg = load_config_from_file(str(REPO_ROOT / "configs" / "accelerate" / f"ddp-{n}gpu.yaml"))
        assert cfg.num_processes == n and cfg.distributed_type == "MULTI_GPU" and cfg.mixed_precision == "no"


# ---- end to end: W processes vs 1 process ------------------------------------------------------------------------

# Tolerance. The runs differ only in float summation order (rank-sliced vs whole batches, padding widths, the
# gloo all-reduce). Two things amplify that noise: T5's ReLU (a pre-activation at ~0 can flip, switching one
# hidden unit's gradient on or off for a token) and AdamW's division by sqrt(v) (a rarely active unit's LoRA
# row then moves by up to ~lr). Measured when this test was written (6 steps, lr 1e-3): correct runs agree on
# every logged loss to 1e-6 and differ by ||ΔB|| / ||B|| = 5e-6 (accumulation 1) up to 2.4e-3 (1 × 2
# accumulation, 98% of it in one flipped unit's row); elementwise most tensors agree to < 1e-5. A wrong run
# (DDP averaging per-rank means without token weighting, or another batch composition) differs everywhere:
# step-1 loss off by 1e-3 relative, ||ΔB|| / ||B|| = 4e-2, typical tensor max |Δw| ~ 3e-3.
# LoRA B starts at 0, so ||B|| is the size of what training moved.
LOSS_RTOL = 1e-5  # wrong runs: 1e-3
REL_NORM_TOL = 1e-2  # 4× above the worst correct run, 4× below a wrong one
MEDIAN_ATOL = 3e-4  # median over tensors of max |Δw|: correct runs <= 4e-5, wrong 2.4e-3 (a flip moves one tensor)

RUN_CONFIG = dict(model="tiny", dataset="demo", max_samples=40, eval_ratio=0.2, quantization="nf4",
                  compute_dtype="fp32", lora_dropout=0.0, optimizer="adamw", lr=1e-3, lr_schedule="constant",
                  max_steps=6, log_every_steps=1, eval_every_steps=1000, eval_max_samples=3, max_new_tokens=4,
                  max_source_tokens=64, max_target_tokens=32, progress=False, seed=7)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def write_config(path: Path, device: str, **overrides) -> Path:
    import yaml

    path.write_text(yaml.safe_dump({**RUN_CONFIG, "device": device, **overrides}), encoding="utf-8")
    return path


def launch_env() -> dict[str, str]:
    """Offline, one thread per process, NVLink multicast off (the lent GPU machines require it)."""
    return dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", NCCL_NVLS_ENABLE="0",
                TORCH_SYMM_MEM_DISABLE_MULTICAST="1", NVSHMEM_DISABLE_NVLS="1")


def launch(launcher: list[str], config: Path, out: Path, *, batch_size: int, accum: int) -> str:
    env = launch_env()
    cmd = launcher + ["-m", "sumtune", "train", "--config", str(config), "--output-dir", str(out),
                      "--batch-size", str(batch_size), "--grad-accum-steps", str(accum)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240, cwd=config.parent)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc.stdout + proc.stderr


def one_process(config: Path, out: Path, *, batch_size: int, accum: int) -> None:
    from sumtune.api import train

    train({**__import__("yaml").safe_load(config.read_text()), "output_dir": str(out), "batch_size": batch_size,
           "grad_accum_steps": accum})


def adapter(run: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(run / "adapter_model.safetensors"))


def train_losses(run: Path) -> list[float]:
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [line["loss"] for line in lines if line["split"] == "train"]


def assert_same_training(one: Path, many: Path) -> None:
    a, b = adapter(one), adapter(many)
    assert a.keys() == b.keys()
    ref_losses, losses = train_losses(one), train_losses(many)
    assert len(losses) == len(ref_losses) == RUN_CONFIG["max_steps"]  # one writer: no duplicated lines
    assert losses == pytest.approx(ref_losses, rel=LOSS_RTOL)
    moved = [k for k in a if "lora_B" in k]
    delta = torch.cat([(b[k] - a[k]).flatten() for k in moved]).norm()
    size = torch.cat([a[k].flatten() for k in moved]).norm()
    assert float(size) > 1e-2  # training moved the adapter, so the relative comparison means something
    assert float(delta / size) < REL_NORM_TOL
    assert torch.tensor([float((b[k] - a[k]).abs().max()) for k in a]).median() < MEDIAN_ATOL


def torchrun(n: int) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(n),
            "--master-port", str(free_port())]


@pytest.mark.slow
def test_two_gloo_processes_train_the_same_adapter_as_one(tmp_path):
    config = write_config(tmp_path / "run.yaml", "cpu")
    one_process(config, tmp_path / "one", batch_size=4, accum=1)
    log = launch(torchrun(2), config, tmp_path / "two", batch_size=2, accum=1)
    assert "6 steps of 4 samples (2 × 1 accumulation × 2 processes)" in log
    assert_same_training(tmp_path / "one", tmp_path / "two")
    assert (tmp_path / "two" / "eval" / "predictions.jsonl").read_text().count("\n") == 3  # gathered eval
    assert len(list((tmp_path / "two" / "tb").iterdir())) == 1  # one TensorBoard writer


@pytest.mark.slow
def test_accelerate_launch_with_the_shipped_config_and_accumulation(tmp_path):
    """`accelerate launch --config_file configs/accelerate/ddp-2gpu.yaml` (gloo here: no GPU), 1 × 2 accum × 2."""
    config = write_config(tmp_path / "run.yaml", "cpu")
    one_process(config, tmp_path / "one", batch_size=2, accum=2)
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                str(REPO_ROOT / "configs" / "accelerate" / "ddp-2gpu.yaml"), "--main_process_port", str(free_port())]
    log = launch(launcher, config, tmp_path / "two", batch_size=1, accum=2)
    assert "6 steps of 4 samples (1 × 2 accumulation × 2 processes)" in log
    assert_same_training(tmp_path / "one", tmp_path / "two")


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")
def test_two_nccl_gpus_train_the_same_adapter_as_one(tmp_path):
    config = write_config(tmp_path / "run.yaml", "cuda")
    one_process(config, tmp_path / "one", batch_size=4, accum=1)
    launch(torchrun(2), config, tmp_path / "two", batch_size=2, accum=1)
    assert_same_training(tmp_path / "one", tmp_path / "two")


def rank_pids(launcher: subprocess.Popen) -> dict[int, int]:
    """{rank: pid} of torchrun's worker processes (read from their environment)."""
    found = {}
    for child in Path("/proc").iterdir():
        try:
            if int((child / "stat").read_text().split(")")[-1].split()[1]) != launcher.pid:
                continue
            env = dict(item.split("=", 1) for item in (child / "environ").read_text().split("\0") if "=" in item)
        except (OSError, ValueError, IndexError):
            continue
        if "RANK" in env:
            found[int(env["RANK"])] = int(child.name)
    return found


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc").is_dir(), reason="finds the worker processes through /proc")
def test_sigterm_to_one_rank_stops_every_rank_at_the_same_step_and_resumes(tmp_path):
    """The stop request is agreed on in each step's optimizer sync: a signal to rank 1 alone stops both ranks
    after the same step (a rank that went on would wait in its next all-reduce, and the job would hang), rank 0
    writes the checkpoint of that step, and `--resume` on the same command finishes the run."""
    import signal
    import time

    from sumtune import checkpoint

    config = write_config(tmp_path / "run.yaml", "cpu", max_steps=40, log_every_steps=1)
    out = tmp_path / "run"
    env = launch_env()
    cmd = torchrun(2) + ["-m", "sumtune", "train", "--config", str(config), "--output-dir", str(out),
                         "--batch-size", "2"]
    # Output to files, not pipes: nobody reads a pipe while the run goes, and a full one would block the ranks.
    with open(tmp_path / "stdout.txt", "w") as stdout_file, open(tmp_path / "stderr.txt", "w") as stderr_file:
        proc = subprocess.Popen(cmd, env=env, stdout=stdout_file, stderr=stderr_file, text=True, cwd=tmp_path)
    deadline = time.monotonic() + 180
    while not ((out / "metrics.jsonl").is_file() and len(train_losses(out)) >= 3):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"the run ended (status {proc.poll()}) or timed out before step 3: "
                        f"{(tmp_path / 'stderr.txt').read_text()[-3000:]}")
        time.sleep(0.05)
    os.kill(rank_pids(proc)[1], signal.SIGTERM)
    proc.wait(timeout=120)
    stderr = (tmp_path / "stderr.txt").read_text()
    assert proc.returncode != 0  # torchrun reports its workers' status 143
    stopped = [line for line in stderr.splitlines() if "stopped by SIGTERM after step" in line]
    assert len(stopped) == 1, stderr[-3000:]  # rank 0 speaks for the job
    step = int(stopped[0].split("after step ")[1].split(";")[0])
    assert 3 <= step < 40
    saved = checkpoint.latest_checkpoint(out / "checkpoints")
    assert saved is not None and checkpoint.step_of(saved) == step == len(train_losses(out))
    assert not (out / "adapter_model.safetensors").exists()

    resumed = subprocess.run(cmd + ["--resume"], env=env, capture_output=True, text=True, timeout=240,
                             cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert len(train_losses(out)) == 40  # each step logged once: the resumed run began after `step`
    assert (out / "adapter_model.safetensors").is_file()
