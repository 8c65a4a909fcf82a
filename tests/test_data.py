"""Data: readers for each format, deterministic split, tokenization with truncation (batching: test_batching)."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from sumtune.config import TrainConfig
from sumtune.data import load_rows, read_rows, split_rows
from sumtune.demo_data import demo_records

ROWS = [{"article": f"document number {i} " + "word " * (i % 7), "highlights": f"summary {i}"} for i in range(30)]


def write(tmp_path, fmt):
    path = tmp_path / f"data.{fmt}"
    if fmt == "jsonl":
        path.write_text("\n".join(json.dumps(r) for r in ROWS) + "\n")
    elif fmt == "csv":
        import csv

        with path.open("w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=["article", "highlights"])
            writer.writeheader()
            writer.writerows(ROWS)
    elif fmt == "parquet":
        pq.write_table(pa.Table.from_pylist(ROWS), path)
    return path


@pytest.mark.parametrize("fmt", ["jsonl", "csv", "parquet"])
def test_local_files_load_with_custom_columns_and_split_deterministically(tmp_path, fmt):
    cfg = TrainConfig(dataset=str(write(tmp_path, fmt)), text_column="article", summary_column="highlights",
                      eval_ratio=0.2, seed=3)
    first, second = load_rows(cfg), load_rows(cfg)
    assert (len(first.train), len(first.eval)) == (24, 6)
    assert first.train == second.train and first.eval == second.eval
    assert {r["text"] for r in first.train}.isdisjoint({r["text"] for r in first.eval})
    assert sorted(r["summary"] for r in first.train + first.eval) == sorted(r["highlights"] for r in ROWS)


def test_saved_to_disk_dataset_loads(tmp_path):
    import datasets

    datasets.Dataset.from_list(ROWS).save_to_disk(str(tmp_path / "saved"))
    rows = read_rows(str(tmp_path / "saved"), "train")
    assert rows[0]["article"] == ROWS[0]["article"] and len(rows) == len(ROWS)


def test_split_depends_on_seed():
    rows = [{"text": str(i), "summary": str(i)} for i in range(50)]
    assert split_rows(rows, 0.2, 1)[1] != split_rows(rows, 0.2, 2)[1]


def test_demo_corpus_is_deterministic_and_summaries_come_from_the_text():
    assert demo_records(50, seed=0) == demo_records(50, seed=0)
    for row in demo_records(40):
        words = set(row["text"].replace(".", " ").split())
        assert len(set(row["summary"].replace(".", " ").split()) - words) <= 2  # verbs like "approves"
