"""The benchmarks' shared parts: bench_common's patch tokens (each names a setting that sumtune has, so an A/B row
measures what its name says; a renamed constant would otherwise be patched onto the module as a new, unread
attribute) and kernel_table's per-step kernel breakdown, as train_throughput and generate_profile save it."""

from __future__ import annotations

import importlib
import shutil
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import bench_common as bc  # noqa: E402
import kernel_table  # noqa: E402


@pytest.mark.parametrize("token", sorted(bc.PATCH_TOKENS))
def test_every_patch_token_names_an_existing_setting(token):
    module_name, name, _ = bc.PATCH_TOKENS[token]
    assert hasattr(importlib.import_module(module_name), name), f"{token}: {module_name}.{name} does not exist"


def test_patches_set_their_settings_for_the_block_only():
    from sumtune.fast_t5 import flash_attention, modules

    before = (modules.FUSED_LINEAR_RELU, flash_attention.PRECISE_PV_WITHOUT_GRAD)
    with bc.patched("nolinearrelu:pvnograd"):
        assert (modules.FUSED_LINEAR_RELU, flash_attention.PRECISE_PV_WITHOUT_GRAD) == (False, True)
    assert (modules.FUSED_LINEAR_RELU, flash_attention.PRECISE_PV_WITHOUT_GRAD) == before


def test_an_unknown_patch_token_ends_the_run_with_its_name():
    with pytest.raises(SystemExit, match="nosuchtoken"):
        bc.patch_strings("nolinearrelu,pvnograd:nosuchtoken")


def test_the_profiled_step_s_kernel_breakdown_sums_by_family_and_per_step():
    kernels = [{"name": "t5_flash_attention_bwd_dkdv", "dur": 3000.0},
               {"name": "t5_flash_attention_fwd", "dur": 1000.0},
               {"name": "sm90_xmma_gemm_bf16bf16_bf16f32", "dur": 4000.0},
               {"name": "sm90_xmma_gemm_bf16bf16_bf16f32", "dur": 1000.0},
               {"name": "void at::native::vectorized_elementwise_kernel", "dur": 1000.0}]
    breakdown = kernel_table.kernel_breakdown(kernels, steps=2, wall_s=0.02, top=2)
    assert breakdown["kernel_s_per_step"] == pytest.approx(0.005)
    assert breakdown["busy_share"] == pytest.approx(0.5)
    assert breakdown["family_ms_per_step"] == pytest.approx({"matmul": 2.5, "attention": 2.0, "other": 0.5})
    assert list(breakdown["family_ms_per_step"]) == ["matmul", "attention", "other"]
    assert [(k["name"], k["calls"], k["total_ms"]) for k in breakdown["top_kernels"]] == [
        ("sm90_xmma_gemm_bf16bf16_bf16f32", 1.0, pytest.approx(2.5)), ("t5_flash_attention_bwd_dkdv", 0.5, 1.5)]


def test_generate_profile_quick_saves_the_encoder_s_and_eager_decode_steps_kernel_breakdowns(
        capsys, monkeypatch, tmp_path, billsum_jsonl, t5_tokenizer_dir):
    import generate_profile

    # the benchmarks read ../shared/data's layout: the fixture's bills and tokenizer in it, so a fresh clone runs this
    (tmp_path / "billsum").mkdir()
    shutil.copy(billsum_jsonl, tmp_path / "billsum" / "us_train_subset200_cleantext.jsonl")
    shutil.copytree(t5_tokenizer_dir, tmp_path / "t5-tokenizer")
    monkeypatch.setenv("SUMTUNE_SHARED_DATA", str(tmp_path))
    assert generate_profile.main(["--quick", "--profile-steps", "2"]) == 0
    printed = capsys.readouterr().out
    assert "'decode_hidden_eager_step_kernels': {'steps': 2," in printed
    assert "'encoder_fast_kernels': {'steps': 1," in printed


def test_lora_dropout_quick_runs_the_kernels_in_the_interpreter_without_being_told_to():
    """`benchmarks/lora_dropout.py --quick` sets TRITON_INTERPRET itself, before Triton's import (it failed with
    "Cannot call @triton.jit'd outside of the scope of a kernel" unless the shell had set it), and times the
    `--patches` rows beside the plain ones."""
    import os
    import subprocess

    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1] / "src")
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "lora_dropout.py"
    done = subprocess.run([sys.executable, str(script), "--quick", "--tiles", "64x64x8x3", "--patches", "noldscratch"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.count("kernels [noldscratch]") == 2 and done.stdout.count("native_dropout") == 2, done.stdout


def test_a_second_result_of_the_same_day_and_machine_does_not_overwrite_the_first(tmp_path, monkeypatch):
    import datetime
    import json

    monkeypatch.setattr(bc, "RESULTS_DIR", tmp_path)
    paths = [bc.save_result("train_throughput", {"rows": [{"setting": s}]}, slug="testgpu")
             for s in ("seed", "shipped", "long")]
    stem = f"train_throughput-{datetime.date.today().isoformat()}-testgpu"
    assert [p.name for p in paths] == [f"{stem}.json", f"{stem}-2.json", f"{stem}-3.json"]
    assert [json.loads(p.read_text())["rows"][0]["setting"] for p in paths] == ["seed", "shipped", "long"]


def test_a_run_cut_by_sigint_saves_the_rows_it_finished_and_says_so(tmp_path, monkeypatch):
    """The device calls stop a step over its time limit with SIGINT: what it measured is saved once, marked cut;
    a run that saved its own file, or has no row yet, writes nothing more."""
    import json

    monkeypatch.setattr(bc, "RESULTS_DIR", tmp_path)
    rows = [{"setting": "a", "samples_per_s": 1.0}]
    with pytest.raises(KeyboardInterrupt), bc.saved_if_interrupted("cut", {"model": "t5-3b", "rows": rows}):
        rows.append({"setting": "b", "samples_per_s": 2.0})
        raise KeyboardInterrupt
    (saved,) = tmp_path.glob("cut-*.json")
    record = json.loads(saved.read_text())
    assert [r["setting"] for r in record["rows"]] == ["a", "b"] and "SIGINT" in record["interrupted"]
    for partial in ({"rows": rows, "saved": True}, {"rows": []}):
        with pytest.raises(KeyboardInterrupt), bc.saved_if_interrupted("cut", partial):
            raise KeyboardInterrupt
    with bc.saved_if_interrupted("cut", {"rows": rows}):
        pass
    assert len(list(tmp_path.glob("cut-*.json"))) == 1


def test_profiled_calls_the_step_as_often_as_asked_and_breaks_down_its_kernels():
    calls = []
    breakdown, prof = kernel_table.profiled(lambda: calls.append(torch.ones(4).sum()), 3, torch.device("cpu"))
    assert len(calls) == 3 and breakdown["steps"] == 3 and breakdown["wall_s_per_step"] > 0
    assert breakdown["kernel_s_per_step"] == 0 and breakdown["top_kernels"] == []  # a CPU runs no kernels
    assert any(event.name == "aten::sum" for event in prof.events())  # its CPU ops were recorded


def test_generate_throughput_quick_times_patches_and_the_hidden_mode_in_the_mode_asked(
        capsys, monkeypatch, tmp_path, billsum_jsonl, t5_tokenizer_dir):
    """`generate_throughput.py --quick --hidden --patches …`: a --patches row runs in the default attention mode
    (it forced the fused kernel before, so on FLAN-T5-XL, whose default is kv, it timed a mode change, not the patch),
    the --hidden row in the hidden mode, and each one's tokens are checked against transformers'."""
    import generate_throughput

    (tmp_path / "billsum").mkdir()
    shutil.copy(billsum_jsonl, tmp_path / "billsum" / "us_train_subset200_cleantext.jsonl")
    shutil.copytree(t5_tokenizer_dir, tmp_path / "t5-tokenizer")
    monkeypatch.setenv("SUMTUNE_SHARED_DATA", str(tmp_path))
    modes = []
    fast_generate = generate_throughput.fast_generate
    monkeypatch.setattr(generate_throughput, "fast_generate",
                        lambda *a, **k: modes.append(k.get("attention", "auto")) or fast_generate(*a, **k))
    assert generate_throughput.main(["--quick", "--greedy-only", "--hidden", "--patches", "nows64",
                                     "--reference-batches", "", "--agreement-inputs", "2"]) == 0
    printed = capsys.readouterr().out
    assert "greedy eager, nows64" in printed and "greedy eager, hidden" in printed
    assert "sumtune_auto_nows64_vs_transformers_b32: sequences 1.000" in printed
    assert "fused, nows64" not in printed and modes.count("hidden") >= 3  # its row's warm-up, timed run, agreement
