"""Shared test set-up: offline hub, and the real fixtures in tests/data (BillSum rows, the T5 tokenizer)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

DATA = Path(__file__).resolve().parent / "data"  # what each file is and its license: data/SOURCES.md
BILLSUM_JSONL = DATA / "billsum" / "billsum_us_40.jsonl"
T5_TOKENIZER = DATA / "t5-tokenizer"


def _no_cuda() -> bool:
    import torch

    return not torch.cuda.is_available()


# sumtune's Triton kernels are tested on CPU in Triton's interpreter, which must be chosen before triton is first
# imported (peft and bitsandbytes import it; triton's own jit helpers are decorated then). Only without a GPU:
# on a CUDA machine the compiled kernels run (tests marked gpu).
if _no_cuda():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def _json_lines_compiled_for_hopper(code: str) -> tuple[list, str]:
    """Run ``code`` (which compiles kernels for sm_90 and prints JSON lines) in a Python process without Triton's
    interpreter; its JSON lines and the tail of its stderr."""
    import json
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    return [json.loads(line) for line in result.stdout.splitlines() if line[:1] in "{["], result.stderr[-2000:]


@pytest.fixture(scope="session")
def compiled_for_hopper():
    """`compiled_for_hopper(code) -> (json lines, stderr tail)`: kernels compiled for sm_90 on any machine."""
    return _json_lines_compiled_for_hopper


@pytest.fixture(scope="session")
def billsum_jsonl() -> Path:
    """40 real BillSum rows (text, summary), CC0."""
    return BILLSUM_JSONL


@pytest.fixture(scope="session")
def t5_tokenizer_dir() -> Path:
    """The real T5 SentencePiece tokenizer, Apache-2.0."""
    return T5_TOKENIZER


# A tiny T5 (random init, real NF4) QLoRA-trained on the demo corpus long enough that its summaries overlap the
# references (ROUGE-L about 35 on 16 held-out documents, measured): the evaluation, inference and recipe tests
# read this one run.
TRAINED_RUN = dict(model="tiny", dataset="demo", max_samples=400, compute_dtype="fp32", device="cpu", batch_size=8,
                   max_source_tokens=64, max_target_tokens=16, max_steps=40, lr=5e-3, lora_dropout=0.0,
                   warmup_steps=5, lr_schedule="cosine", eval_every_steps=20, eval_max_samples=16,
                   eval_batch_size=16, log_every_steps=10, progress=False, seed=0)


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory) -> Path:
    import sumtune

    out = tmp_path_factory.mktemp("trained") / "run"
    sumtune.train({**TRAINED_RUN, "output_dir": str(out)})
    return out


def _t5_attention_case(seed: int, batch: int = 3, heads: int = 4, length: int = 700, head_dim: int = 128,
                       radius: int = 128):
    """A training call of T5 self-attention on the GPU, bf16: q, k, v as (B, H, L, D) views of (B, L, H, D)
    projections (scores of a few units), a key mask with a right-padded row and a hole, T5's bias table (one value
    beyond +-radius) and an upstream gradient laid out as the output projection hands it back."""
    import torch

    gen = torch.Generator(device="cuda").manual_seed(seed)

    def rows():
        return torch.randn(batch, length, heads, head_dim, device="cuda", generator=gen,
                           dtype=torch.bfloat16).transpose(1, 2)

    q, k, v = rows() / 4, rows(), rows()
    mask = torch.ones(batch, length, dtype=torch.bool, device="cuda")
    mask[1, length * 5 // 7:] = False
    mask[2, 7] = False  # a hole
    offsets = torch.arange(1 - length, length, device="cuda").clamp(-radius, radius) + radius
    table = (torch.randn(heads, 2 * radius + 1, device="cuda", generator=gen) * 2)[:, offsets]
    return q, k, v, mask, table, radius, rows()


@pytest.fixture
def t5_attention_case():
    """`t5_attention_case(seed) -> (q, k, v, key_mask, bias_table, radius, grad_out)` on the GPU (see above)."""
    return _t5_attention_case


# sumtune's Triton T5 attention (sumtune.fast_t5.flash_attention) as tests/test_fast_t5_attention_*.py use it:
# `fa` in Triton's CPU interpreter, `compiled_fa` compiled for the GPU.
def _interpreting() -> bool:
    from sumtune.fast_t5 import flash_kernels

    return flash_kernels.INTERPRET


@pytest.fixture()
def fa():
    """flash_attention with its kernels in Triton's CPU interpreter (tests/conftest.py turns it on without CUDA;
    it must be on before triton is first imported, which peft and bitsandbytes do)."""
    pytest.importorskip("triton")
    if not _interpreting():
        pytest.skip("Triton's interpreter is off (a CUDA machine: run with TRITON_INTERPRET=1, or -m gpu)")
    from sumtune.fast_t5 import flash_attention

    return flash_attention


@pytest.fixture()
def compiled_fa():
    if _interpreting():
        pytest.skip("TRITON_INTERPRET=1: the GPU tests need the compiled kernels")
    from sumtune.fast_t5 import flash_attention

    return flash_attention


# The reliability tests' run config (tests/_reliability_helpers.py), written once per test module.
@pytest.fixture(scope="module")
def config_path(tmp_path_factory) -> Path:
    from _reliability_helpers import write_config

    return write_config(tmp_path_factory.mktemp("cfg") / "run.yaml")


# The generation tests' inputs and models (tests/test_generation_*.py; built with tests/_generation_helpers.py), once
# per test module; each of those modules runs on one torch thread (its `pytestmark`).
@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for the module's tests: their matmuls are tiny, so extra threads only add synchronisation,
    and on a busy 2-core box (with loader workers beside them) they spin (30x slower)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def inputs(billsum_jsonl, t5_tokenizer_dir) -> list[list[int]]:
    import json

    from _generation_helpers import SOURCE_LENGTHS
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(t5_tokenizer_dir))
    rows = [json.loads(line) for line in billsum_jsonl.read_text().splitlines()[: len(SOURCE_LENGTHS)]]
    return [tokenizer("summarize: " + row["text"], truncation=True, max_length=n)["input_ids"]
            for row, n in zip(rows, SOURCE_LENGTHS)]


@pytest.fixture(scope="module")
def peft_relu(tmp_path_factory, inputs):
    from _generation_helpers import _make_eos_reachable, _quantized_peft

    model = _quantized_peft(tmp_path_factory, "relu")
    _make_eos_reachable(model, inputs)
    return model


@pytest.fixture(scope="module")
def merged32(peft_relu):
    import torch

    from sumtune.generation import prepare_inference_model

    return prepare_inference_model(peft_relu, torch.float32)


@pytest.fixture(scope="module")
def expected32(merged32, inputs):
    """transformers greedy on the merged fp32 model: the reference for the greedy tests."""
    from _generation_helpers import MAX_NEW, hf_generate

    return hf_generate(merged32, inputs, max_new_tokens=MAX_NEW)
