"""Summarization data: read rows from anywhere a user keeps them, split, tokenize (batching: `sumtune.batching`).

Rows are plain `{"text": ..., "summary": ..., "id": ...}` dicts once read (the id: the source's `id` column, else the
row's 0-based position in the source); everything after reading is source-agnostic.
"""

from __future__ import annotations

import csv
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from sumtune.errors import SumtuneError

if TYPE_CHECKING:
    from sumtune.config import TrainConfig

BILLSUM_HUB_ID = "FiscalNote/billsum"
ID_COLUMN = "id"  # a source's own row ids, kept through the split into predictions; else the row's position
Row = dict[str, Any]  # {"text", "summary", "id"}
# Texts are cut to max_tokens × this many characters before tokenizing: the kept tokens are unchanged in any
# real text, and a single huge document costs no more than a long one.
MAX_CHARS_PER_TOKEN = 64
# Whole token lengths (what sumtune.truncation reports) are counted exactly up to this many tokens: texts are
# clipped at COUNT_LIMIT_TOKENS × MAX_CHARS_PER_TOKEN characters before the one tokenization that gives both the
# training ids and the lengths, so a pathological document costs no more than a 32k-token one. 4× the longest
# source setting sumtune trains (8192).
COUNT_LIMIT_TOKENS = 32_768


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
        header = reader.fieldnames or []
        seen: dict[str, int] = {}
        for number, name in enumerate(header, start=1):
            if name in seen:  # DictReader would keep the last column of the name and drop the other, silently
                raise SumtuneError(f"{str(path)!r} has two columns named {name!r} (columns {seen[name]} and "
                                   f"{number}); rename one.")
            seen[name] = number
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
    for number, row in enumerate(rows, start=1):
        for column in (text_column, summary_column):
            value = row.get(column)
            if value is not None and not isinstance(value, str):  # never train on str() of a number or a list
                raise SumtuneError(f"Dataset {source!r} row {number} has {_kind_of_value(value)} in column "
                                   f"{column!r}, not text.")
        text, summary = row.get(text_column), row.get(summary_column)
        out.append({"text": text or "", "summary": summary or "", "id": row_id(row, number - 1)})
    return out


def row_id(row: dict, position: int) -> Any:
    """A row's id: its `id` column when it holds text or an integer, else its 0-based position in the source."""
    value = row.get(ID_COLUMN)
    return value if isinstance(value, (str, int)) and not isinstance(value, bool) else position


def _kind_of_value(value) -> str:
    if isinstance(value, bool):
        return f"a true/false value ({value})"
    if isinstance(value, (int, float)):
        return f"a number ({value!r})"
    if isinstance(value, (list, tuple)):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    return f"a {type(value).__name__}"


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


def load_eval_rows(cfg: "TrainConfig", source: str) -> list[Row]:
    """Every usable row of `source` as evaluation rows (columns, split and empty-row policy of `cfg`); the
    run's own training data is not read."""
    rows, _ = drop_empty(select_columns(read_rows(source, cfg.dataset_split), cfg.text_column, cfg.summary_column,
                                        source), cfg.empty_rows, source)
    return rows


def split_rows(rows: list[Row], eval_ratio: float, seed: int) -> tuple[list[Row], list[Row]]:
    if len(rows) < 2:
        raise SumtuneError(f"Need at least 2 rows to split into train and eval, got {len(rows)}.")
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    n_eval = min(len(rows) - 1, max(1, round(len(rows) * eval_ratio)))
    eval_idx = sorted(order[:n_eval])
    train_idx = sorted(order[n_eval:])
    return [rows[i] for i in train_idx], [rows[i] for i in eval_idx]


# ---- tokenizing -----------------------------------------------------------------------------------------

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


def _encode(tokenizer, texts: list[str], target: bool, add_special_tokens: bool = True) -> list[list[int]]:
    key = "text_target" if target else "text"
    # verbose=False: whole documents are longer than the model's nominal maximum on purpose (no warning)
    return tokenizer(**{key: texts}, add_special_tokens=add_special_tokens, verbose=False)["input_ids"]


def special_token_layout(tokenizer, target: bool = False) -> tuple[int, int] | None:
    """(tokens the tokenizer adds before, after) a text's own tokens, or None when it does not add them as a
    plain prefix and suffix (then `tokenize_counting` lets the tokenizer truncate by itself)."""
    probe = "summary"
    with_specials = _encode(tokenizer, [probe], target)[0]
    bare = _encode(tokenizer, [probe], target, add_special_tokens=False)[0]
    for start in range(len(with_specials) - len(bare) + 1):
        if with_specials[start:start + len(bare)] == bare:
            return start, len(with_specials) - start - len(bare)
    return None


def cut_like_tokenizer(ids: list[int], max_tokens: int, head: int, tail: int, side: str = "right") -> list[int]:
    """`ids` (special tokens included) cut to `max_tokens` as the tokenizer's own truncation does: the text's
    tokens are cut (from the end, or from the start for `side="left"`), the added special tokens are kept."""
    if len(ids) <= max_tokens:
        return ids
    keep = max(0, max_tokens - head - tail)
    body = ids[head:len(ids) - tail]
    kept = body[:keep] if side != "left" else body[len(body) - keep:]
    return ids[:head] + kept + ids[len(ids) - tail:]


def tokenize_counting(tokenizer, texts: list[str], max_tokens: int, *, target: bool = False
                      ) -> tuple[list[list[int]], list[int]]:
    """Token ids cut to `max_tokens` (identical to `tokenizer(..., truncation=True, max_length=max_tokens)`) and
    each text's full length, from one tokenization of the texts clipped at COUNT_LIMIT_TOKENS' worth of
    characters. A tokenizer whose special tokens are not a plain prefix/suffix is asked to truncate again."""
    clipped = clip_chars(texts, max(max_tokens, COUNT_LIMIT_TOKENS))
    whole = _encode(tokenizer, clipped, target)
    lengths = [len(ids) for ids in whole]
    layout = special_token_layout(tokenizer, target)
    if layout is None:
        key = "text_target" if target else "text"
        cut = tokenizer(**{key: clip_chars(texts, max_tokens)}, max_length=max_tokens,
                        truncation=True)["input_ids"]
        return cut, lengths
    side = getattr(tokenizer, "truncation_side", "right")
    return [cut_like_tokenizer(ids, max_tokens, *layout, side=side) for ids in whole], lengths


def count_lengths(tokenizer, texts: list[str], *, target: bool = False) -> list[int]:
    """Full token lengths (exact up to COUNT_LIMIT_TOKENS) of `texts`, special tokens included."""
    return [len(ids) for ids in _encode(tokenizer, clip_chars(texts, COUNT_LIMIT_TOKENS), target)]


def tokenize_rows(tokenizer, rows: list[Row], *, prefix: str, max_source_tokens: int,
                  max_target_tokens: int) -> list[TokenizedExample]:
    """Source (`prefix` + text) and target ids of each row, truncated to the token limits, carrying their full
    lengths (one tokenization gives both; sumtune.truncation reports them)."""
    sources, source_lengths = tokenize_counting(tokenizer, [prefix + r["text"] for r in rows], max_source_tokens)
    targets, target_lengths = tokenize_counting(tokenizer, [r["summary"] for r in rows], max_target_tokens,
                                                target=True)
    return [TokenizedExample(*example) for example in zip(sources, targets, source_lengths, target_lengths)]
