"""Documents for `sumtune summarize --input`: tables keep their ids, text splits by line on request, stdin is `-`,
and the predictions file is JSON Lines in input order (no model needed here)."""

from __future__ import annotations

import io
import json

import pytest

from sumtune.documents import Document, read_documents, write_predictions
from sumtune.errors import SumtuneError


def test_a_jsonl_table_keeps_its_id_column(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in [{"id": "bill-7", "text": "first"},
                                                           {"id": 12, "text": "second", "summary": "s"}]))
    assert read_documents(path) == [Document("bill-7", "first"), Document(12, "second")]


def test_a_csv_without_ids_numbers_its_rows_and_the_text_column_is_chosen(tmp_path):
    path = tmp_path / "docs.csv"
    path.write_text("title,article\nA,\"one, with a comma\"\nB,two\n")
    assert read_documents(path, text_column="article") == [Document(0, "one, with a comma"), Document(1, "two")]
    with pytest.raises(SumtuneError, match=r"has no column 'text'; its columns are: title, article \(choose one "
                                           r"with --text-column\)"):
        read_documents(path)


def test_text_is_one_document_or_one_per_line(tmp_path):
    path = tmp_path / "docs.txt"
    path.write_text("first line\n\nsecond line\nthird line\n")
    assert read_documents(path) == [Document(0, "first line\n\nsecond line\nthird line\n")]
    assert read_documents(path, lines=True) == [Document(0, "first line"), Document(2, "second line"),
                                                Document(3, "third line")]  # ids: line numbers, blanks skipped


def test_dash_reads_stdin():
    assert read_documents("-", lines=True, stdin=io.StringIO("a\nb\n")) == [Document(0, "a"), Document(1, "b")]
    assert read_documents("-", stdin=io.StringIO("a\nb\n")) == [Document(0, "a\nb\n")]


@pytest.mark.parametrize("name, content, kwargs, message", [
    ("docs.jsonl", '{"text": "ok"}\n{"text": "  "}\n', {}, "Input document 1 is empty."),
    ("docs.txt", "  \n", {"lines": True}, "Nothing to summarize: the input holds no document."),
    ("docs.pdf", "x", {}, "has an extension sumtune does not read"),
    ("docs.csv", "text\na\n", {"lines": True}, "--lines splits plain text"),
    ("docs.jsonl", '{"text": 5}\n', {}, "row 1 has no text in column 'text'"),
])
def test_bad_inputs_are_one_sentence(tmp_path, name, content, kwargs, message):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(SumtuneError, match=message):
        read_documents(path, **kwargs)


def test_predictions_are_json_lines_in_input_order(tmp_path, capsys):
    docs = [Document("b-1", "x"), Document(0, "y")]
    out = write_predictions(tmp_path / "preds.jsonl", docs, ["sum x", "sum ü"])
    assert [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()] == [
        {"id": "b-1", "summary": "sum x"}, {"id": 0, "summary": "sum ü"}]
    assert write_predictions("-", docs, ["a", "b"]) is None
    assert capsys.readouterr().out == '{"id": "b-1", "summary": "a"}\n{"id": 0, "summary": "b"}\n'
