"""Summarization data: read rows from anywhere a user keeps them, split, tokenize, batch.

Rows are plain `{"text": ..., "summary": ...}` dicts once read; everything after reading is source-agnostic.
"""

from __future__ import annotations

import csv
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable, Sequence

import torch

from sumtune.errors import SumtuneError

if TYPE_CHECKING:
    from sumtune.config import TrainConfig

BILLSUM_HUB_ID = "FiscalNote/billsum"
Row = dict[str, str]
# Texts are cut to max_tokens × this many characters before tokenizing: the kept tokens are unchanged in any
# real text, and a single huge document costs no more than a long one.
MAX_CHARS_PER_TOKEN = 64


# ---- reading ---------------------------------------------------------------------------------------------

def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8-sig")  # -sig: a leading byte-order mark is not data
    except UnicodeDecodeError as err:
        raise SumtuneError(f"{str(path)!r} is not UTF-8 text (bad byte at offset {err.start}).") from None
    except OSError as err:
        raise SumtuneError(f"Cannot read {str(path)!r}: {err.strerror or err}.") from None


def read_jsonl(path: Path) -> list[dict]:
    rows = []
    for number, line in enumerate(_read_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise SumtuneError(f"{str(path)!r} line {number} is not valid JSON ({err.msg}).") from None
        if not isinstance(row, dict):
            raise SumtuneError(f"{str(path)!r} line {number} is not a JSON object.")
        rows.append(row)
    return rows


def read_json(path: Path) -> list[dict]:
    try:
        data = json.loads(_read_text(path))
    except json.JSONDecodeError as err:
        raise SumtuneError(f"{str(path)!r} is not valid JSON (line {err.lineno}: {err.msg}).") from None
    if isinstance(data, dict) and len(data) == 1 and isinstance(next(iter(data.values())), list):
        data = next(iter(data.values()))
    if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
        raise SumtuneError(f"{str(path)!r} must hold a list of objects (or use JSON Lines, .jsonl).")
    return data


def read_csv(path: Path) -> list[dict]:
    text = _read_text(path)
    try:
        reader = csv.DictReader(text.splitlines(keepends=True), strict=True)
        rows = list(reader)
    except csv.Error as err:
        # line_num counts the lines completed before the failing one
        raise SumtuneError(f"{str(path)!r} is not valid CSV near line {reader.line_num + 1}: {err}.") from None
    for number, row in enumerate(rows, start=2):
        if None in row or any(v is None for v in row.values()):
            raise SumtuneError(f"{str(path)!r} line {number} has a different number of fields than the header.")
    return rows


def read_parquet(path: Path) -> list[dict]:
    try:
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    except OSError as err:
        raise SumtuneError(f"{str(path)!r} is not a readable Parquet file ({err}).") from None
    except Exception as err:  # pyarrow raises its own ArrowInvalid for corrupt files
        raise SumtuneError(f"{str(path)!r} is not a readable Parquet file ({type(err).__name__}).") from None


FILE_READERS: dict[str, Callable[[Path], list[dict]]] = {
    ".jsonl": read_jsonl, ".json": read_json, ".csv": read_csv, ".parquet": read_parquet,
}


def _hub_rows(name: str, split: str) -> list[dict]:
    import datasets

    try:
        ds = datasets.load_dataset(name, split=split)
    except ValueError as err:  # unknown split
        raise SumtuneError(f"Dataset {name!r} has no split {split!r} ({err}).") from None
    except Exception as err:  # offline, no such dataset: datasets raises several types
        raise SumtuneError(f"Could not load dataset {name!r} split {split!r} from the hub "
                           f"({type(err).__name__}); pass a local .jsonl/.csv/.parquet file instead.") from None
    return list(ds)


def _disk_rows(path: Path, split: str) -> list[dict]:
    import datasets

    ds = datasets.load_from_disk(str(path))
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise SumtuneError(f"Saved dataset {str(path)!r} has no split {split!r}; it has {', '.join(ds)}.")
        ds = ds[split]
    return list(ds)


def read_rows(source: str, split: str) -> list[dict]:
    """Raw rows from `source`: first match of demo / billsum / a file / a saved dataset dir / a hub name."""
    if source == "demo":
        from sumtune.demo_data import demo_records

        return demo_records()
    if source == "billsum":
        return _hub_rows(BILLSUM_HUB_ID, split)
    path = Path(source).expanduser()
    if path.suffix.lower() in FILE_READERS:
        if not path.exists():
            raise SumtuneError(f"Data file {str(path.resolve())!r} does not exist.")
        if not path.is_file():
            raise SumtuneError(f"Data file {str(path.resolve())!r} is not a regular file.")
        return FILE_READERS[path.suffix.lower()](path)
    if path.is_dir():
        if (path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file():
            return _disk_rows(path, split)
        raise SumtuneError(f"{str(path)!r} is a directory but not a dataset saved with `save_to_disk`.")
    if source.startswith((".", "/", "~")) or path.suffix:
        raise SumtuneError(f"Data source {source!r} does not exist or has an unsupported extension "
                           f"(use {', '.join(FILE_READERS)}, a save_to_disk directory, or a hub dataset name).")
    return _hub_rows(source, split)


def select_columns(rows: list[dict], text_column: str, summary_column: str, source: str) -> list[Row]:
    if not rows:
        raise SumtuneError(f"Dataset {source!r} has no rows.")
    columns = list(rows[0])
    missing = [c for c in (text_column, summary_column) if c not in columns]
    if missing:
        raise SumtuneError(f"Dataset {source!r} has no column {' or '.join(map(repr, missing))}; "
                           f"its columns are: {', '.join(map(str, columns))} "
                           f"(set text_column / summary_column).")
    out = []
    for row in rows:
        text, summary = row.get(text_column), row.get(summary_column)
        out.append({"text": "" if text is None else str(text), "summary": "" if summary is None else str(summary)})
    return out


def drop_empty(rows: list[Row], policy: str, source: str) -> tuple[list[Row], int]:
    kept = [r for r in rows if r["text"].strip() and r["summary"].strip()]
    dropped = len(rows) - len(kept)
    if dropped and policy == "error":
        raise SumtuneError(f"Dataset {source!r} has {dropped} row(s) with an empty text or summary "
                           f"(set empty_rows: skip to leave them out).")
    if not kept:
        raise SumtuneError(f"Dataset {source!r} has no usable rows: every row has an empty text or summary.")
    return kept, dropped


@dataclass
class LoadedData:
    train: list[Row]
    eval: list[Row]
    skipped_empty: int


def load_rows(cfg: "TrainConfig") -> LoadedData:
    """Read, clean, limit and split the rows the config names (deterministic for a given seed)."""
    rows, skipped = drop_empty(
        select_columns(read_rows(cfg.dataset, cfg.dataset_split), cfg.text_column, cfg.summary_column, cfg.dataset),
        cfg.empty_rows, cfg.dataset)
    if cfg.max_samples:
        rows = rows[: cfg.max_samples]
    if cfg.eval_dataset:
        eval_rows, skipped_eval = drop_empty(
            select_columns(read_rows(cfg.eval_dataset, cfg.dataset_split), cfg.text_column, cfg.summary_column,
                           cfg.eval_dataset), cfg.empty_rows, cfg.eval_dataset)
        return LoadedData(rows, eval_rows, skipped + skipped_eval)
    train, eval_ = split_rows(rows, cfg.eval_ratio, cfg.seed)
    return LoadedData(train, eval_, skipped)


def split_rows(rows: list[Row], eval_ratio: float, seed: int) -> tuple[list[Row], list[Row]]:
    if len(rows) < 2:
        raise SumtuneError(f"Need at least 2 rows to split into train and eval, got {len(rows)}.")
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    n_eval = min(len(rows) - 1, max(1, round(len(rows) * eval_ratio)))
    eval_idx = sorted(order[:n_eval])
    train_idx = sorted(order[n_eval:])
    return [rows[i] for i in train_idx], [rows[i] for i in eval_idx]


# ---- tokenizing and batching -----------------------------------------------------------------------------

@dataclass
class TokenizedExample:
    input_ids: list[int]
    labels: list[int]
    source_length: int = 0  # the whole document's tokens, before the cut (sumtune.truncation counts them)
    target_length: int = 0  # the whole summary's


def clip_chars(texts: list[str], max_tokens: int) -> list[str]:
    limit = max_tokens * MAX_CHARS_PER_TOKEN
    return [t if len(t) <= limit else t[:limit] for t in texts]


def tokenize_sources(tokenizer, texts: list[str], prefix: str, max_tokens: int) -> list[list[int]]:
    return tokenizer(clip_chars([prefix + t for t in texts], max_tokens), max_length=max_tokens,
                     truncation=True)["input_ids"]


def tokenize_rows(tokenizer, rows: list[Row], cfg: "TrainConfig") -> list[TokenizedExample]:
    """Training examples cut to the limits, carrying their full lengths (one tokenization gives both)."""
    from sumtune.truncation import tokenize_counting

    sources, source_lengths = tokenize_counting(tokenizer, [cfg.source_prefix + r["text"] for r in rows],
                                                cfg.max_source_tokens)
    targets, target_lengths = tokenize_counting(tokenizer, [r["summary"] for r in rows], cfg.max_target_tokens,
                                                target=True)
    return [TokenizedExample(*example) for example in zip(sources, targets, source_lengths, target_lengths)]


def pad_batch(sequences: Sequence[Sequence[int]], pad_id: int, multiple: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad to the longest sequence of this batch (dynamic padding), rounded up to `multiple`; ids and mask."""
    width = -(-max(len(s) for s in sequences) // multiple) * multiple
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, seq in enumerate(sequences):
        ids[i, : len(seq)] = torch.as_tensor(list(seq), dtype=torch.long)
        mask[i, : len(seq)] = 1
    return ids, mask


def collate(examples: list[TokenizedExample], pad_id: int) -> dict[str, torch.Tensor]:
    input_ids, attention_mask = pad_batch([e.input_ids for e in examples], pad_id)
    labels, label_mask = pad_batch([e.labels for e in examples], pad_id)
    labels[label_mask == 0] = -100  # ignored by the loss
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def epoch_batches(lengths: list[int], batch_size: int, *, seed: int, epoch: int, shuffle: bool = True,
                  group_by_length: bool = False) -> list[list[int]]:
    """The batches of indices for one epoch, fully determined by (seed, epoch).

    With `group_by_length`, indices are shuffled, cut into mega-batches of 50 batches, and sorted by length
    inside each, so every batch holds similar lengths while the epoch order stays random.
    """
    order = list(range(len(lengths)))
    if shuffle:
        random.Random(seed * 1_000_003 + epoch).shuffle(order)
    if group_by_length:
        mega = batch_size * 50
        order = [i for start in range(0, len(order), mega)
                 for i in sorted(order[start:start + mega], key=lambda j: -lengths[j])]
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    if group_by_length and shuffle:
        random.Random(seed * 7_919 + epoch).shuffle(batches)  # don't always start with the longest batch
    return batches


class BatchIterator:
    """Batches of one epoch, resumable at any batch index; collation can run in DataLoader workers."""

    def __init__(self, examples: list[TokenizedExample], batch_size: int, pad_id: int, *, seed: int,
                 group_by_length: bool, num_workers: int = 0, pin_memory: bool = False):
        self.examples = examples
        self.batch_size = batch_size
        self.pad_id = pad_id
        self.seed = seed
        self.group_by_length = group_by_length
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.lengths = [len(e.input_ids) + len(e.labels) for e in examples]

    def batches_per_epoch(self) -> int:
        return -(-len(self.examples) // self.batch_size)

    def epoch(self, epoch: int, start_batch: int = 0) -> Iterable[dict[str, torch.Tensor]]:
        batches = epoch_batches(self.lengths, self.batch_size, seed=self.seed, epoch=epoch,
                                group_by_length=self.group_by_length)[start_batch:]
        loader = torch.utils.data.DataLoader(
            self.examples, batch_sampler=batches, collate_fn=self._collate, num_workers=self.num_workers,
            pin_memory=self.pin_memory, persistent_workers=False)
        return loader

    def _collate(self, examples: list[TokenizedExample]) -> dict[str, torch.Tensor]:
        return collate(examples, self.pad_id)
