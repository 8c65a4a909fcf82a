"""Documents to summarize, from where people keep them, and the summaries written back (`sumtune summarize`).

- a table (`.jsonl`, `.json`, `.csv`, `.parquet`): one document per row, from the text column; each keeps the row's
  `id` column when there is one, else its 0-based row number;
- plain text (`.txt`, or `-` for stdin): the whole text is one document, or with `lines=True` each non-blank line
  is one (its id: its 0-based line number).
Summaries go to JSON Lines, one `{"id": ..., "summary": ...}` per document in input order, written whole or not at
all (or to stdout for `-`).
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Sequence

from sumtune.data import FILE_READERS, ID_COLUMN, row_id
from sumtune.errors import SumtuneError

STDIN = "-"
TEXT_SUFFIXES = (".txt", ".text", ".md")


@dataclass(frozen=True)
class Document:
    id: Any
    text: str


def split_text(text: str, *, lines: bool, first_id: int = 0) -> list[Document]:
    """One document for the whole text, or one per non-blank line (ids: line numbers from `first_id`)."""
    if not lines:
        return [Document(first_id, text)]
    return [Document(first_id + number, line) for number, line in enumerate(text.splitlines()) if line.strip()]


def read_stdin(stream: IO[str] | None = None) -> str:
    stream = sys.stdin if stream is None else stream
    if stream is None or stream.isatty():
        raise SumtuneError("Nothing on stdin to summarize: pipe the text in, or give a file.")
    return stream.read()


def read_table(path: Path, text_column: str) -> list[Document]:
    rows = FILE_READERS[path.suffix.lower()](path)
    if not rows:
        raise SumtuneError(f"{str(path)!r} has no rows.")
    if text_column not in rows[0]:
        raise SumtuneError(f"{str(path)!r} has no column {text_column!r}; its columns are: "
                           f"{', '.join(map(str, rows[0]))} (choose one with --text-column).")
    docs = []
    for number, row in enumerate(rows):
        text = row.get(text_column)
        if not isinstance(text, str):
            raise SumtuneError(f"{str(path)!r} row {number + 1} has no text in column {text_column!r}.")
        docs.append(Document(row_id(row, number), text))
    return docs


def read_documents(source: str | Path, *, lines: bool = False, text_column: str = "text",
                   stdin: IO[str] | None = None) -> list[Document]:
    """The documents in `source` (a table, a text file, or `-` for stdin), in order; none may be empty."""
    if str(source) == STDIN:
        docs = split_text(read_stdin(stdin), lines=lines)
    else:
        from sumtune.safe_io import require_file

        path = require_file(source, "Input file")
        suffix = path.suffix.lower()
        if suffix in FILE_READERS:
            if lines:
                raise SumtuneError(f"--lines splits plain text; {str(path)!r} is a table (one document per row).")
            docs = read_table(path, text_column)
        elif suffix in TEXT_SUFFIXES or not suffix:
            try:
                docs = split_text(path.read_text(encoding="utf-8-sig"), lines=lines)
            except UnicodeDecodeError:
                raise SumtuneError(f"Input file {str(path)!r} is not UTF-8 text.") from None
        else:
            raise SumtuneError(f"Input file {str(path)!r} has an extension sumtune does not read; use "
                               f"{', '.join(FILE_READERS)} (one document per row) or .txt (text).")
    check_documents(docs)
    return docs


def check_documents(docs: Sequence[Document]) -> None:
    if not docs:
        raise SumtuneError("Nothing to summarize: the input holds no document.")
    empty = next((d for d in docs if not d.text.strip()), None)
    if empty is not None:
        raise SumtuneError(f"Input document {empty.id!r} is empty.")


def prediction_lines(docs: Sequence[Document], summaries: Sequence[str]) -> str:
    if len(docs) != len(summaries):
        raise ValueError("one summary per document")
    return "".join(json.dumps({ID_COLUMN: d.id, "summary": s}, ensure_ascii=False) + "\n"
                   for d, s in zip(docs, summaries))


def write_predictions(output: str | Path, docs: Sequence[Document], summaries: Sequence[str],
                      stdout: IO[str] | None = None) -> Path | None:
    """JSON Lines to `output` (whole or not at all), or to stdout for `-`; returns the file written."""
    text = prediction_lines(docs, summaries)
    if str(output) == STDIN:
        (stdout or sys.stdout).write(text)
        return None
    from sumtune.safe_io import atomic_write_text

    return atomic_write_text(output, text)
