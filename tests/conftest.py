"""Shared test set-up: offline hub, real data from ../shared/data (skipped cleanly when absent)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("SUMTUNE_SHARED_DATA", REPO.parent / "shared" / "data"))
BILLSUM_JSONL = SHARED_DATA / "billsum" / "us_train_subset200_cleantext.jsonl"
T5_TOKENIZER = SHARED_DATA / "t5-tokenizer"


@pytest.fixture(scope="session")
def billsum_jsonl() -> Path:
    if not BILLSUM_JSONL.is_file():
        pytest.skip(f"real BillSum rows not found at {BILLSUM_JSONL} (../shared/data is absent)")
    return BILLSUM_JSONL


@pytest.fixture(scope="session")
def t5_tokenizer_dir() -> Path:
    if not (T5_TOKENIZER / "spiece.model").is_file():
        pytest.skip(f"real T5 tokenizer not found at {T5_TOKENIZER} (../shared/data is absent)")
    return T5_TOKENIZER
