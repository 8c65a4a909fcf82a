"""Truncation made visible: exact counts on a hand-checkable fixture, the one-line format, the 95% suggestion,
the line at the start of train and evaluate and in the report, `sumtune inspect-data` (and its bad input), and
the single tokenization giving the same training ids as the tokenizer's own truncation (real T5 tokenizer)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sumtune import cli, data, truncation
from sumtune.data import COUNT_LIMIT_TOKENS
from sumtune.truncation import LengthStats, TruncationReport, length_stats, percent, report_for

# ---- a fixture to check by hand ----------------------------------------------------------------------------
# With `--model tiny` sumtune counts with a word-level tokenizer: one token per word, ":" is a word of its own,
# and "</s>" is appended. A document of w words with the prefix "summarize: " is w + 3 tokens; a summary of
# w words is w + 1.
DOC_WORDS = [1, 3, 5, 7, 9, 11, 13, 15, 17, 19]      # → 4, 6, 8, ..., 22 source tokens
SUMMARY_WORDS = [1, 1, 1, 1, 1, 1, 1, 1, 2, 3]       # → 2 (×8), 3, 4 target tokens
LIMITS = ["--max-source-tokens", "10", "--max-target-tokens", "3"]
# By hand, at 10 / 3 tokens:
#   documents over 10: 12, 14, 16, 18, 20, 22 → 6 of 10 = 60%; tokens 4 + 6 + ... + 22 = 130;
#   cut (12-10) + (14-10) + ... + (22-10) = 2 + 4 + ... + 12 = 42 → 42/130 = 32%;
#   95% of 10 documents = the 10th shortest (22 tokens) → rounded up to a multiple of 256: 256.
#   summaries over 3: one (4 tokens) → 10%; tokens 8·2 + 3 + 4 = 23; cut 1 → 1/23 = 4%;
#   95% → the 10th shortest (4) → rounded up to a multiple of 64: 64.
EXPECTED_LINE = ("sumtune: 60% of documents exceed 10 source tokens (32% of tokens cut); 10% of summaries exceed "
                 "3 tokens (4% of tokens cut) — --max-source-tokens 256 --max-target-tokens 64 keep 95%")


def words(count: int, start: int) -> str:
    return " ".join(f"word{start + i}" for i in range(count))


@pytest.fixture(scope="module")
def fixture_jsonl(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("lengths") / "rows.jsonl"
    rows = [{"text": words(d, 100 * i), "summary": words(s, 100 * i + 50)}
            for i, (d, s) in enumerate(zip(DOC_WORDS, SUMMARY_WORDS))]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def run_cli(argv: list[str], capsys) -> tuple[int, str, str]:
    try:
        status = cli.main(argv)
    except SystemExit as stop:
        status = stop.code
    captured = capsys.readouterr()
    return status, captured.out, captured.err


# ---- the pure parts -----------------------------------------------------------------------------------------

def test_length_stats_by_hand():
    stats = length_stats([4, 6, 8, 10, 12, 14, 16, 18, 20, 22], limit=10, multiple=256)
    assert (stats.documents, stats.over_limit, stats.tokens, stats.tokens_cut) == (10, 6, 130, 42)
    assert (stats.median, stats.p90, stats.longest, stats.keep_limit) == (12, 20, 22, 256)
    assert length_stats([5, 300, 700, 1000], limit=512, multiple=128).keep_limit == 1024  # 4th of 4 → 1000 → 1024


def test_keep_95_suggestion_is_the_smallest_rounded_limit_keeping_95_percent():
    lengths = list(range(1, 101))  # 95 of 100 documents have at most 95 tokens
    assert length_stats(lengths, limit=10, multiple=1).keep_limit == 95
    assert length_stats(lengths, limit=10, multiple=32).keep_limit == 96
    assert length_stats(lengths, limit=10, multiple=256).keep_limit == 256
    # with 20 documents, 95% is 19 of them: the 19th shortest decides, the longest (an outlier) does not
    assert length_stats([10] * 19 + [10_000], limit=8, multiple=64).keep_limit == 64


def test_percent_never_rounds_some_to_none_or_all():
    assert [percent(0, 9), percent(1, 1000), percent(1, 2), percent(999, 1000), percent(7, 7)] == \
        ["0%", "<1%", "50%", ">99%", "100%"]


def stats(limit: int, lengths: list[int], multiple: int = 64) -> LengthStats:
    return length_stats(lengths, limit, multiple)


def test_line_when_nothing_is_cut_is_calm():
    report = TruncationReport(stats(1024, [100, 812]), stats(128, [20, 96]))
    assert report.line() == ("sumtune: nothing is cut: all 2 documents fit 1024 source tokens (longest 812) and all "
                             "summaries fit 128 tokens (longest 96).")


def test_line_names_only_the_settings_that_need_to_grow():
    report = TruncationReport(stats(1024, [100, 812]), stats(128, [20, 300, 400]))
    assert report.line() == ("sumtune: no document exceeds 1024 source tokens (longest 812); 67% of summaries "
                             "exceed 128 tokens (62% of tokens cut) — --max-target-tokens 448 keep 95%")  # 444 of 720
    evaluation = TruncationReport(stats(1024, [100, 812]), stats(128, [20, 300, 400]), target_flag="--max-new-tokens")
    assert evaluation.line().endswith("— --max-new-tokens 448 keep 95%")


def test_line_when_the_limits_already_keep_95_percent():
    report = TruncationReport(stats(100, [50] * 99 + [150]), stats(64, [10] * 100))
    assert report.line() == ("sumtune: 1% of documents exceed 100 source tokens (1% of tokens cut); no summary "
                             "exceeds 64 tokens (longest 10) — these limits keep at least 95% whole")


def test_documents_past_the_counting_bound_say_at_least():
    huge = COUNT_LIMIT_TOKENS
    report = TruncationReport(stats(1024, [500, huge]), stats(128, [10, 10]))
    # 31,744 of 33,268 tokens cut, a lower bound; so is the suggestion drawn from the document at the bound
    assert "(at least 95% of tokens cut)" in report.line()
    assert report.line().endswith(f"--max-source-tokens {huge} (or more) keep 95%")


def test_report_round_trips_through_json(tmp_path):
    report = report_for([4, 30], [2, 9], max_source_tokens=10, max_target_tokens=3, tokenizer="t")
    truncation.save(report, tmp_path / truncation.REPORT_FILE)
    assert truncation.load(tmp_path) == report
    assert truncation.load(tmp_path / "nowhere") is None


# ---- inspect-data -------------------------------------------------------------------------------------------

def test_inspect_data_counts_the_fixture_exactly(fixture_jsonl, capsys):
    status, out, err = run_cli(["inspect-data", "--model", "tiny", "--dataset", str(fixture_jsonl), *LIMITS], capsys)
    assert status == 0, err
    lines = out.splitlines()
    assert lines[0].startswith(f"sumtune: 10 rows of {fixture_jsonl}") and "word-level tokenizer" in lines[0]
    assert lines[2].split() == ["documents", "10", "60%", "32%", "12", "20", "22", "256"]
    assert lines[3].split() == ["summaries", "3", "10%", "4%", "2", "3", "4", "64"]
    assert lines[-1] == EXPECTED_LINE


def test_inspect_data_json(fixture_jsonl, capsys):
    status, out, _ = run_cli(["inspect-data", "--model", "tiny", "--dataset", str(fixture_jsonl), "--json", *LIMITS],
                             capsys)
    assert status == 0
    result = json.loads(out)
    assert result["rows"] == 10 and result["line"] == EXPECTED_LINE
    assert result["source"] | {} == dict(limit=10, documents=10, over_limit=6, tokens=130, tokens_cut=42,
                                         keep_limit=256, median=12, p90=20, longest=22, at_count_limit=0)
    assert (result["target"]["over_limit"], result["target"]["tokens"], result["target"]["tokens_cut"]) == (1, 23, 1)


def test_inspect_data_reads_a_config_file(fixture_jsonl, tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_text(f"model: tiny\ndataset: {fixture_jsonl}\nmax_source_tokens: 10\nmax_target_tokens: 3\n"
                      "lr: 0.001\nbatch_size: auto\n", encoding="utf-8")
    status, out, err = run_cli(["inspect-data", "--config", str(config)], capsys)
    assert status == 0, err
    assert out.splitlines()[-1] == EXPECTED_LINE


@pytest.mark.parametrize("args, expect", [
    (["--dataset", "{tmp}/missing.jsonl"], ["missing.jsonl", "does not exist"]),
    (["--dataset", "{fixture}", "--text-column", "article"], ["no column 'article'", "its columns are: text, summary"]),
    (["--dataset", "{fixture}", "--model", "t5-3b"], ["Could not load a tokenizer from 't5-3b'", "--tokenizer"]),
    (["--dataset", "{fixture}", "--max-source-tokens", "0"], ["`max_source_tokens` must be greater than 0"]),
])
def test_inspect_data_bad_input_is_one_sentence_and_exit_2(fixture_jsonl, tmp_path, capsys, args, expect):
    argv = ["inspect-data", "--model", "tiny"] + [a.format(tmp=tmp_path, fixture=fixture_jsonl) for a in args]
    status, out, err = run_cli(argv, capsys)
    assert status == 2 and not out
    assert len(err.strip().splitlines()) == 1 and err.startswith("sumtune: error: ")
    for text in expect:
        assert text in err


# ---- train, evaluate, report ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def lengths_run(fixture_jsonl, tmp_path_factory):
    """A 2-step tiny run on the fixture; the fixture is also its eval set, so training sees all 10 rows."""
    import contextlib
    import io

    out = tmp_path_factory.mktemp("run") / "run"
    argv = ["train", "--model", "tiny", "--dataset", str(fixture_jsonl), "--eval-dataset", str(fixture_jsonl),
            *LIMITS, "--output-dir", str(out), "--device", "cpu", "--compute-dtype", "fp32", "--no-progress",
            "--max-steps", "2", "--batch-size", "2", "--lora-r", "4", "--optimizer", "adamw",
            "--eval-max-samples", "2", "--max-new-tokens", "3", "--log-every-steps", "1"]
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        assert cli.main(argv) == 0
    return out, err.getvalue()


def test_train_prints_the_line_after_reading_the_data_and_saves_it(lengths_run):
    run, err = lengths_run
    lines = err.splitlines()
    assert EXPECTED_LINE in lines
    assert lines.index(EXPECTED_LINE) < next(i for i, line in enumerate(lines) if "trainable of" in line)
    saved = json.loads((run / truncation.REPORT_FILE).read_text(encoding="utf-8"))
    assert saved["line"] == EXPECTED_LINE and saved["source"]["tokens_cut"] == 42
    assert "word-level tokenizer" in saved["tokenizer"]


def test_evaluate_prints_the_line_against_the_generation_length(lengths_run, capsys):
    run, _ = lengths_run
    status, out, err = run_cli(["evaluate", str(run), "--device", "cpu", "--max-samples", "10",
                                "--max-new-tokens", "3"], capsys)
    assert status == 0, err
    assert EXPECTED_LINE.replace("--max-target-tokens", "--max-new-tokens") in err.splitlines()
    assert json.loads(out)["num_samples"] == 10


def test_report_shows_the_lengths(lengths_run, tmp_path):
    from html import escape

    from sumtune.report import render_report

    run, _ = lengths_run
    html = render_report(run, tmp_path / "report.html").read_text(encoding="utf-8")
    assert "Document and summary lengths" in html and escape(EXPECTED_LINE) in html
    assert "<td>documents (source)</td><td class=\"num\">10</td><td>60%</td><td>32%</td>" in html


def test_report_of_a_run_without_lengths_says_so(lengths_run, tmp_path):
    import shutil

    from sumtune.report import build_html

    run = tmp_path / "old"
    shutil.copytree(lengths_run[0], run)
    (run / truncation.REPORT_FILE).unlink()
    assert "truncation.json is missing" in build_html(run)


# ---- the real tokenizer on real rows --------------------------------------------------------------------------

def test_training_ids_equal_the_tokenizers_own_truncation(billsum_jsonl, t5_tokenizer_dir):
    from transformers import AutoTokenizer

    from sumtune.data import read_jsonl, tokenize_rows

    tokenizer = AutoTokenizer.from_pretrained(str(t5_tokenizer_dir))
    rows = read_jsonl(billsum_jsonl)[:30]
    for source_limit, target_limit in ((64, 16), (1024, 128), (4096, 512)):
        examples = tokenize_rows(tokenizer, rows, prefix="summarize: ", max_source_tokens=source_limit,
                                 max_target_tokens=target_limit)
        sources = tokenizer(["summarize: " + r["text"] for r in rows], max_length=source_limit,
                            truncation=True)["input_ids"]
        targets = tokenizer(text_target=[r["summary"] for r in rows], max_length=target_limit,
                            truncation=True)["input_ids"]
        assert [e.input_ids for e in examples] == sources
        assert [e.labels for e in examples] == targets
        whole = tokenizer(["summarize: " + r["text"] for r in rows], verbose=False)["input_ids"]
        assert [e.source_length for e in examples] == [len(ids) for ids in whole]


def test_left_truncation_and_a_prefix_special_token_are_cut_as_the_tokenizer_cuts(t5_tokenizer_dir):
    from tokenizers import processors
    from transformers import AutoTokenizer

    texts = ["summarize: " + " ".join(f"clause {i} of the bill" for i in range(n)) for n in (1, 8, 40)]
    for side, template in (("right", "<pad> $A </s>"), ("left", "$A </s>"), ("left", "<pad> $A </s>")):
        tokenizer = AutoTokenizer.from_pretrained(str(t5_tokenizer_dir), truncation_side=side)
        tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
            single=template, special_tokens=[("<pad>", 0), ("</s>", 1)])
        assert data.special_token_layout(tokenizer) == (template.startswith("<pad>"), 1)
        ids, lengths = data.tokenize_counting(tokenizer, texts, 24)
        assert ids == tokenizer(texts, max_length=24, truncation=True)["input_ids"]
        assert lengths == [len(x) for x in tokenizer(texts, verbose=False)["input_ids"]]


def test_inspect_data_on_billsum_matches_an_independent_count(billsum_jsonl, t5_tokenizer_dir, capsys):
    from transformers import AutoTokenizer

    status, out, err = run_cli(["inspect-data", "--dataset", str(billsum_jsonl), "--tokenizer", str(t5_tokenizer_dir),
                                "--json"], capsys)
    assert status == 0, err
    result = json.loads(out)
    tokenizer = AutoTokenizer.from_pretrained(str(t5_tokenizer_dir))
    rows = [json.loads(line) for line in billsum_jsonl.read_text(encoding="utf-8").splitlines() if line.strip()]
    sources = [len(ids) for ids in tokenizer(["summarize: " + r["text"] for r in rows], verbose=False)["input_ids"]]
    summaries = [len(ids) for ids in tokenizer(text_target=[r["summary"] for r in rows], verbose=False)["input_ids"]]
    assert result["rows"] == len(rows)
    for side, lengths, limit in (("source", sources, 1024), ("target", summaries, 128)):
        assert result[side]["over_limit"] == sum(n > limit for n in lengths)
        assert result[side]["tokens"] == sum(lengths)
        assert result[side]["tokens_cut"] == sum(max(0, n - limit) for n in lengths)
        assert result[side]["longest"] == max(lengths)
    assert result["source"]["over_limit"] > len(rows) // 2  # BillSum: most bills are longer than 1024 tokens
