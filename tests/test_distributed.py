"""Data-parallel training: sharding, loss weighting, resume position, and W processes == 1 process.

The end-to-end tests launch real process groups (gloo on the CPU, NCCL on GPUs) with torchrun and with
`accelerate launch` and the shipped config, train a tiny NF4 T5 with LoRA, and compare the final adapter with a
one-process run of the same effective batch and data order.
"""

from __future__ import annotations

import json
import os
import random
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sumtune import distributed
from sumtune.data import BatchIterator, TokenizedExample, epoch_batches

REPO_ROOT = Path(__file__).resolve().parents[1]


# ---- unit tests: pure functions -------------------------------------------------------------------------------

def make_examples(n: int, seed: int = 0) -> list[TokenizedExample]:
    """Examples whose first input id is their index (so batches can be traced back) and random lengths."""
    rng = random.Random(seed)
    return [TokenizedExample([i + 10] + [5] * rng.randint(0, 12), [7] * rng.randint(1, 9) + [1]) for i in range(n)]


def sample_ids(batch: dict[str, torch.Tensor]) -> list[int]:
    return [int(x) - 10 for x in batch["input_ids"][:, 0]]


@pytest.mark.parametrize("n", [1, 2, 3, 7, 8, 9, 16])
@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_shard_indices_partition_the_global_batch(n, world):
    batch = list(range(100, 100 + n))
    shards = [distributed.shard_indices(batch, r, world) for r in range(world)]
    real = [s for s, padding in shards if not padding]
    assert [i for s in real for i in s] == batch  # contiguous slices, in order, nothing lost or repeated
    sizes = [len(s) for s in real]
    assert max(sizes) - min(sizes) <= 1
    padded = [s for s, padding in shards if padding]
    assert len(padded) == max(0, world - n) and all(s == batch[:1] for s in padded)


@pytest.mark.parametrize("group_by_length", [False, True])
@pytest.mark.parametrize("world", [2, 3])
def test_ranks_together_see_the_one_process_batches(group_by_length, world):
    examples = make_examples(23)
    micro = 2
    single = BatchIterator(examples, micro * world, pad_id=0, seed=3, group_by_length=group_by_length)
    ranks = [distributed.shard_batches(BatchIterator(examples, micro, pad_id=0, seed=3,
                                                     group_by_length=group_by_length), r, world)
             for r in range(world)]
    assert all(r.batches_per_epoch() == single.batches_per_epoch() for r in ranks)
    for epoch in (0, 1):
        expected = [sample_ids(b) for b in single.epoch(epoch)]
        per_rank = [list(r.epoch(epoch)) for r in ranks]
        for step, want in enumerate(expected):
            got = [i for r in range(world) if per_rank[r][step]["loss_scale"] > 0
                   for i in sample_ids(per_rank[r][step])]
            assert got == want


def test_loss_scale_gives_the_global_token_mean():
    """Σ_r scale_r × mean_r / W == mean over all label tokens of the global batch (what DDP's mean computes)."""
    examples = make_examples(11, seed=5)
    world, micro = 3, 2
    ranks = [distributed.shard_batches(BatchIterator(examples, micro, 0, seed=1, group_by_length=False), r, world)
             for r in range(world)]
    token_loss = {i: torch.rand(len(e.labels), generator=torch.Generator().manual_seed(i), dtype=torch.float64)
                  for i, e in enumerate(examples)}
    streams = [list(r.epoch(0)) for r in ranks]
    for step, global_batch in enumerate(ranks[0].global_batches(0)):
        expected = torch.cat([token_loss[i] for i in global_batch]).mean()
        combined = 0.0
        for r in range(world):
            batch = streams[r][step]
            ids = sample_ids(batch)
            local_mean = torch.cat([token_loss[i] for i in ids]).mean()  # T5's loss: mean over label tokens
            combined += float(batch["loss_scale"]) * float(local_mean)
        assert combined / world == pytest.approx(float(expected), rel=1e-6)  # loss_scale is float32


def test_one_process_batches_are_untouched():
    examples = make_examples(9)
    plain = BatchIterator(examples, 4, pad_id=0, seed=2, group_by_length=False)
    wrapped = distributed.shard_batches(BatchIterator(examples, 4, pad_id=0, seed=2, group_by_length=False), 0, 1)
    for a, b in zip(plain.epoch(1), wrapped.epoch(1), strict=True):
        assert a.keys() == b.keys()  # no loss_scale key: the single-GPU path computes exactly what it did
        assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("new_world,new_micro", [(1, 3), (2, 2), (4, 1), (3, 2)])
def test_resume_on_another_world_size_continues_at_the_same_sample(new_world, new_micro):
    """2 ranks × 2 run 6 steps across the end of epoch 0 (17 samples: 4+4+4+4+1, then 4): 21 samples seen.

    Any new layout (processes × micro-batch) then continues with sample 22 of the same order.
    """
    examples = make_examples(17)
    old = [distributed.shard_batches(BatchIterator(examples, 2, 0, seed=4, group_by_length=False), r, 2)
           for r in range(2)]
    old_streams = [o.stream() for o in old]
    for _ in range(6):
        for s in old_streams:
            next(s)
    seen = old[0].samples_seen
    assert seen == 21 and old[1].samples_seen == 21
    order = [i for e in range(3) for b in epoch_batches([0] * 17, 1, seed=4, epoch=e) for i in b]
    new = [distributed.shard_batches(BatchIterator(examples, new_micro, 0, seed=4, group_by_length=False), r,
                                     new_world) for r in range(new_world)]
    new_streams = [n.stream(start_sample=seen) for n in new]
    got: list[int] = []
    while len(got) < 20:
        batches = [next(s) for s in new_streams]
        got += [i for b in batches if float(b.get("loss_scale", 1.0)) > 0 for i in sample_ids(b)]
    assert got[:20] == order[21:41]
    assert new[0].samples_seen == seen + len(got)


def test_resume_mid_batch_recuts_the_rest_in_order():
    batches = [[5, 6, 7], [1, 2, 3], [4, 0]]
    assert distributed.batches_from(batches, 3, 3) == [[1, 2, 3], [4, 0]]  # at a boundary: as they were
    assert distributed.batches_from(batches, 4, 2) == [[2, 3], [4, 0]]
    assert distributed.batches_from(batches, 0, 2) == batches


def test_assemble_eval_restores_row_order_and_weights_the_loss():
    rows = [{"text": f"t{i}", "summary": f"the cat sat {i}"} for i in range(5)]
    parts = [([0, 2, 4], ["the cat sat 0", "x", "the cat sat 4"], [4, 1, 4], 6.0, 3),
             ([1, 3], ["the cat sat 1", "y"], [4, 1], 3.0, 1)]  # token-weighted 2.25; a mean of means: 2.5
    metrics, records = distributed.assemble_eval(parts, rows)
    assert [r["prediction"] for r in records] == ["the cat sat 0", "the cat sat 1", "x", "y", "the cat sat 4"]
    assert metrics["loss"] == pytest.approx(9.0 / 4)
    assert metrics["gen_len"] == pytest.approx(14 / 5) and metrics["num_samples"] == 5
    assert 0 < metrics["rouge1"] < 100
    with pytest.raises(RuntimeError):
        distributed.assemble_eval(parts[:1], rows)


def test_single_process_context_is_a_no_op(monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    ctx = distributed.init_distributed(torch.device("cpu"))
    assert (ctx.rank, ctx.world_size, ctx.is_main, ctx.enabled) == (0, 1, True, False)
    model = torch.nn.Linear(2, 2)
    assert distributed.wrap_model(model, ctx) is model
    assert distributed.gather_objects({"a": 1}) == [{"a": 1}]
    assert distributed.reduce_for_log(ctx, torch.tensor(1.5), 10, 4) == (1.5, 10, 4)
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
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=tmp_path)
    deadline = time.monotonic() + 180
    while not ((out / "metrics.jsonl").is_file() and len(train_losses(out)) >= 3):
        assert proc.poll() is None and time.monotonic() < deadline, "the run ended before step 3"
        time.sleep(0.05)
    os.kill(rank_pids(proc)[1], signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
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
