"""Tests for sumtune.profiling.runner: ProfileArgs and --profile-steps, and `sumtune profile` / `train
--profile-steps` on a real tiny QLoRA training config (the recipe, through the CLI and the API)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from sumtune.errors import SumtuneError
from sumtune.profiling import ProfileArgs, parse_profile_steps


def test_profile_args_validation_and_schedules(tmp_path):
    args = ProfileArgs()
    assert args.schedule() == (1, 1, 3) and args.stage_schedule() == (1, 1, 10)
    assert ProfileArgs(quick=True).schedule() == (0, 1, 2)
    for bad in ({"workload": "bert"}, {"active": 0}, {"wait": -1}, {"stages": ["base", "turbo"]},
                {"cifar10_dir": str(tmp_path / "missing")}, {"steps_per_stage": 0}):
        with pytest.raises(SumtuneError):
            ProfileArgs(**bad)
    assert ProfileArgs(workload="mobilenet-cifar10", stages=["base", "pinned"]).stages == ["base", "pinned"]


def test_parse_profile_steps():
    assert parse_profile_steps("3") == (1, 1, 3)
    assert parse_profile_steps("5,1,2") == (5, 1, 2)
    for bad in ("0", "a", "1,2", "1,1,0"):
        with pytest.raises(SumtuneError):
            parse_profile_steps(bad)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_profile_with_cuda_graphs_counts_the_memory_the_graphs_hold(tmp_path):
    """`sumtune profile` of a CUDA-graphed step: the activations live in the graphs' pool between replays, so the
    reported peak must include that pool (the shipped T5-3b config once read 2.3 GiB for a ~60 GiB step)."""
    from sumtune.cli import main

    out = tmp_path / "run"
    code = main(["profile", "--model", "tiny", "--dataset", "demo", "--max-samples", "200", "--compute-dtype", "bf16",
                 "--device", "cuda", "--batch-size", "64", "--max-source-tokens", "128", "--max-target-tokens", "32",
                 "--cuda-graphs", "--pad-to-buckets", "--wait", "2", "--warmup", "1", "--active", "2", "--no-progress",
                 "--output-dir", str(out)])
    assert code == 0
    summary = json.loads((out / "profile" / "summary.json").read_text())
    assert summary["graph_pool_gib"] > 0
    assert summary["peak_mem_gib"] >= summary["graph_pool_gib"]
    assert summary["host"]["syncs_per_step"] <= 2


def test_sumtune_profile_cli_on_a_tiny_qlora_config(tmp_path, capsys):
    from sumtune.cli import main

    out = tmp_path / "run"
    code = main(["profile", "--model", "tiny", "--dataset", "demo", "--max-samples", "200", "--compute-dtype", "fp32",
                 "--device", "cpu", "--batch-size", "8", "--max-source-tokens", "64", "--max-target-tokens", "16",
                 "--wait", "1", "--warmup", "1", "--active", "2", "--no-progress", "--output-dir", str(out)])
    assert code == 0
    summary = json.loads((out / "profile" / "summary.json").read_text())
    assert summary["steps_recorded"] == 2 and summary["samples_per_s"] > 0 and summary["tokens_per_s"] > 0
    parts = summary["breakdown_s"]
    assert abs(sum(parts.values()) - summary["step_time_mean_s"]) <= 0.05 * summary["step_time_mean_s"]
    assert parts["forward"] > 0 and parts["backward"] > 0 and parts["optimizer"] > 0
    trace = json.loads(Path(summary["trace_file"]).read_text())
    names = {e.get("name", "") for e in trace["traceEvents"]}
    assert {"sumtune/forward", "sumtune/backward", "sumtune/optimizer"} <= names
    printed = capsys.readouterr()
    assert "step breakdown" in printed.out + printed.err


def test_sumtune_profile_resolves_batch_size_auto_before_profiling(tmp_path):
    """The recipe resolves `batch_size: auto` and then tells the profiler what it profiles (the profile runner
    once computed FLOPs from the config's "auto" itself and crashed with a TypeError)."""
    from sumtune.cli import main

    out = tmp_path / "run"
    code = main(["profile", "--model", "tiny", "--dataset", "demo", "--max-samples", "60", "--compute-dtype", "fp32",
                 "--device", "cpu", "--batch-size", "auto", "--samples-per-step", "4", "--max-source-tokens", "32",
                 "--max-target-tokens", "8", "--quick", "--no-progress", "--output-dir", str(out)])
    assert code == 0
    summary = json.loads((out / "profile" / "summary.json").read_text())
    assert summary["steps_recorded"] == 2 and summary["samples_per_step"] == 4  # CPU: one micro-batch of 4
    assert summary["context"]["batch_size"] == 4 and summary["context"]["grad_accum_steps"] == 1
    assert summary["flops_per_step"] > 0 and summary["tokens_per_s"] > 0


def test_train_with_profile_steps_profiles_the_runs_own_steps(tmp_path):
    """`train --profile-steps` hands the same profiler to the same recipe as `sumtune profile`: one wiring."""
    from sumtune.api import train

    out = tmp_path / "run"
    train({"model": "tiny", "dataset": "demo", "max_samples": 60, "compute_dtype": "fp32", "device": "cpu",
           "batch_size": 4, "grad_accum_steps": 2, "max_source_tokens": 32, "max_target_tokens": 8, "max_steps": 4,
           "profile_steps": 2, "eval_max_samples": 2, "max_new_tokens": 4, "progress": False, "output_dir": str(out)})
    summary = json.loads((out / "profile" / "summary.json").read_text())
    assert summary["schedule"] == {"wait": 1, "warmup": 1, "active": 2} and summary["steps_recorded"] == 2
    assert summary["samples_per_step"] == 8 and summary["context"]["grad_accum_steps"] == 2
    assert summary["breakdown_s"]["forward"] > 0 and summary["flops_per_step"] > 0
