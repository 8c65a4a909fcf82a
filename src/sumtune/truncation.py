"""What the length limits cut, in one line: documents and summaries over `max_source_tokens` /
`max_target_tokens`, the share of their tokens thrown away, and the smallest settings that keep 95% whole.

Shown at the start of `sumtune train` and `sumtune evaluate`, saved in the run directory (truncation.json) for
the HTML report, and available alone as `sumtune inspect-data`.

Lengths are full (untruncated) token counts, special tokens included, the source with its prefix: what the
model would see without a limit. They come from the same tokenizer call as the training ids
(`data.tokenize_counting`): texts are tokenized whole and cut afterwards exactly as the tokenizer's own
truncation cuts, so counting costs no second tokenization. To bound the time a pathological document can take,
texts are clipped at data.COUNT_LIMIT_TOKENS × data.MAX_CHARS_PER_TOKEN characters first (training always
clipped at max_tokens × that): lengths are exact up to COUNT_LIMIT_TOKENS (32,768) tokens, and a longer document
is counted as at least that long (the report then says "at least" for what is cut).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from sumtune.data import COUNT_LIMIT_TOKENS, count_lengths, tokenize_counting

if TYPE_CHECKING:
    from sumtune.config import TrainConfig

KEEP_SHARE = 0.95            # the suggested settings keep this share of documents (and of summaries) whole
SOURCE_MULTIPLE = 256        # suggested max_source_tokens: a multiple of this (attention tiles, padding buckets)
TARGET_MULTIPLE = 64         # suggested max_target_tokens / max_new_tokens: a multiple of this
REPORT_FILE = "truncation.json"


# ---- counting -------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class LengthStats:
    """Token lengths of one side (documents or summaries) against its limit."""

    limit: int
    """The setting: texts longer than this many tokens are cut."""
    documents: int
    """How many texts were counted."""
    over_limit: int
    """Texts longer than `limit` (cut by it)."""
    tokens: int
    """Tokens of all texts, whole."""
    tokens_cut: int
    """Tokens beyond `limit`, summed over the texts that are cut."""
    keep_limit: int
    """The smallest multiple of the side's rounding step that keeps KEEP_SHARE of the texts whole."""
    median: int
    p90: int
    longest: int
    at_count_limit: int = 0
    """Texts longer than COUNT_LIMIT_TOKENS: counted as that long, so `tokens_cut` is a lower bound."""


def nearest_rank(sorted_lengths: Sequence[int], share: float) -> int:
    """The smallest length that at least `share` of the texts do not exceed (nearest-rank percentile)."""
    rank = max(1, math.ceil(share * len(sorted_lengths) - 1e-9))
    return sorted_lengths[rank - 1]


def round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def length_stats(lengths: Sequence[int], limit: int, multiple: int) -> LengthStats:
    """Counts for texts of these full token lengths under `limit` (suggestion rounded up to `multiple`)."""
    if not lengths:
        raise ValueError("no lengths to count")
    ordered = sorted(lengths)
    return LengthStats(
        limit=limit, documents=len(ordered), over_limit=sum(1 for n in ordered if n > limit),
        tokens=sum(ordered), tokens_cut=sum(n - limit for n in ordered if n > limit),
        keep_limit=round_up(nearest_rank(ordered, KEEP_SHARE), multiple), median=nearest_rank(ordered, 0.5),
        p90=nearest_rank(ordered, 0.9), longest=ordered[-1],
        at_count_limit=sum(1 for n in ordered if n >= COUNT_LIMIT_TOKENS))


def percent(part: int, whole: int) -> str:
    """A share for reading: whole percents, never "0%" for some nor "100%" for not all."""
    if part == 0 or whole == 0:
        return "0%"
    if part == whole:
        return "100%"
    value = round(100 * part / whole)
    return "<1%" if value < 1 else ">99%" if value > 99 else f"{value}%"


@dataclass(frozen=True)
class TruncationReport:
    """Both sides of a dataset against the run's limits, and how to say it in one line."""

    source: LengthStats
    target: LengthStats
    tokenizer: str = ""
    """Which tokenizer counted (as the user named it)."""
    target_flag: str = "--max-target-tokens"
    """The setting that limits summaries here: training's target length, or evaluation's `--max-new-tokens`."""

    def line(self) -> str:
        src, tgt = self.source, self.target
        if not src.over_limit and not tgt.over_limit:
            return (f"sumtune: nothing is cut: all {src.documents} documents fit {src.limit} source tokens "
                    f"(longest {src.longest}) and all summaries fit {tgt.limit} tokens (longest {tgt.longest}).")
        parts = [self._side(src, "documents", "document", "source tokens"),
                 self._side(tgt, "summaries", "summary", "tokens")]
        flags = [f"{flag} {stats.keep_limit}" + (" (or more)" if stats.keep_limit >= COUNT_LIMIT_TOKENS else "")
                 for flag, stats in (("--max-source-tokens", src), (self.target_flag, tgt))
                 if stats.keep_limit > stats.limit]
        keep = f"{round(100 * KEEP_SHARE)}%"
        advice = f"{' '.join(flags)} keep {keep}" if flags else f"these limits keep at least {keep} whole"
        return f"sumtune: {'; '.join(parts)} — {advice}"

    @staticmethod
    def _side(stats: LengthStats, plural: str, singular: str, unit: str) -> str:
        if not stats.over_limit:
            return f"no {singular} exceeds {stats.limit} {unit} (longest {stats.longest})"
        at_least = "at least " if stats.at_count_limit else ""
        return (f"{percent(stats.over_limit, stats.documents)} of {plural} exceed {stats.limit} {unit} "
                f"({at_least}{percent(stats.tokens_cut, stats.tokens)} of tokens cut)")

    def as_dict(self) -> dict:
        return {"source": asdict(self.source), "target": asdict(self.target), "tokenizer": self.tokenizer,
                "target_flag": self.target_flag, "line": self.line(), "count_limit_tokens": COUNT_LIMIT_TOKENS,
                "keep_share": KEEP_SHARE}

    @classmethod
    def from_dict(cls, data: dict) -> "TruncationReport":
        return cls(source=LengthStats(**data["source"]), target=LengthStats(**data["target"]),
                   tokenizer=str(data.get("tokenizer", "")), target_flag=str(data.get("target_flag",
                                                                                   "--max-target-tokens")))


def report_for(source_lengths: Sequence[int], target_lengths: Sequence[int], *, max_source_tokens: int,
               max_target_tokens: int, tokenizer: str = "", target_flag: str = "--max-target-tokens"
               ) -> TruncationReport:
    return TruncationReport(source=length_stats(source_lengths, max_source_tokens, SOURCE_MULTIPLE),
                            target=length_stats(target_lengths, max_target_tokens, TARGET_MULTIPLE),
                            tokenizer=tokenizer, target_flag=target_flag)


# ---- the run and the command -----------------------------------------------------------------------------

def tokenizer_name(cfg: "TrainConfig") -> str:
    """Which tokenizer a run with `cfg` counts (and trains) with, as the user would name it."""
    from sumtune.modeling import model_source

    if cfg.tokenizer:
        return f"the tokenizer {cfg.tokenizer}"
    if model_source(cfg.model).random:
        return f"a word-level tokenizer built from the training texts ({cfg.model} has none of its own)"
    return f"{cfg.model}'s own tokenizer"


def report_examples(examples: Sequence, cfg: "TrainConfig") -> TruncationReport:
    """The report for tokenized training examples (`data.TokenizedExample`, which carry their full lengths)."""
    return report_for([e.source_length for e in examples], [e.target_length for e in examples],
                      max_source_tokens=cfg.max_source_tokens, max_target_tokens=cfg.max_target_tokens,
                      tokenizer=tokenizer_name(cfg))


def announce(examples: Sequence, cfg: "TrainConfig", *, write, run_dir: Path | None) -> TruncationReport:
    """At the start of training: the one line, and REPORT_FILE in the run directory (None: not this process)."""
    report = report_examples(examples, cfg)
    write(report.line())
    if run_dir is not None:
        save(report, Path(run_dir) / REPORT_FILE)
    return report


def save(report: TruncationReport, path: Path) -> Path:
    from sumtune.safe_io import atomic_write_text  # a kept file: whole or not at all

    return atomic_write_text(path, json.dumps(report.as_dict(), indent=2, ensure_ascii=False) + "\n")


def load(run_dir: Path) -> TruncationReport | None:
    """The run's saved report, or None when it has none (older runs) or it cannot be read."""
    try:
        return TruncationReport.from_dict(json.loads((Path(run_dir) / REPORT_FILE).read_text(encoding="utf-8")))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def evaluation_report(tokenizer, rows: Sequence[dict], cfg: "TrainConfig", max_new_tokens: int
                      ) -> tuple[list[list[int]], TruncationReport]:
    """For `sumtune evaluate`: the documents' ids (cut at the run's max_source_tokens, for generation) and the
    report, whose summary limit is the generation length (reference summaries longer than it cannot be matched)."""
    ids, source_lengths = tokenize_counting(tokenizer, [cfg.source_prefix + r["text"] for r in rows],
                                            cfg.max_source_tokens)
    report = report_for(source_lengths, count_lengths(tokenizer, [r["summary"] for r in rows], target=True),
                        max_source_tokens=cfg.max_source_tokens, max_target_tokens=max_new_tokens,
                        tokenizer="the run's tokenizer", target_flag="--max-new-tokens")
    return ids, report


# ---- `sumtune inspect-data` ------------------------------------------------------------------------------

# The TrainConfig options that decide what is counted (the command's flags; a --config file may hold the rest).
DATA_OPTIONS = ("model", "tokenizer", "trust_remote_code", "dataset", "dataset_split", "text_column",
                "summary_column", "source_prefix", "max_source_tokens", "max_target_tokens", "max_samples",
                "empty_rows")


@dataclass(frozen=True)
class DataInspection:
    report: TruncationReport
    rows: int
    skipped_empty: int
    source: str

    def format(self, cfg: "TrainConfig") -> str:
        head = (f"sumtune: {self.rows} rows of {self.source} (columns {cfg.text_column!r} → {cfg.summary_column!r}"
                + (f"; {self.skipped_empty} empty skipped" if self.skipped_empty else "")
                + f"), counted with {self.report.tokenizer}, documents with the prefix {cfg.source_prefix!r}.")
        columns = ("", "limit", "over it", "tokens cut", "median", "p90", "longest", "keeps 95% whole")
        table = [columns]
        for label, s in (("documents", self.report.source), ("summaries", self.report.target)):
            table.append((label, str(s.limit), percent(s.over_limit, s.documents), percent(s.tokens_cut, s.tokens),
                          str(s.median), str(s.p90), str(s.longest) + ("+" if s.at_count_limit else ""),
                          str(s.keep_limit)))
        widths = [max(len(row[i]) for row in table) for i in range(len(columns))]
        lines = ["  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths)))
                 for row in table]
        return "\n".join([head, *lines, self.report.line()])

    def as_dict(self) -> dict:
        return {"rows": self.rows, "skipped_empty": self.skipped_empty, "source": self.source,
                **self.report.as_dict()}


def inspect_data(cfg: "TrainConfig") -> DataInspection:
    """Read the dataset as `train` would (columns, empty rows, max_samples; all rows, before the train/eval
    split), tokenize it with the tokenizer `train` would use, and count what the limits cut. No model is loaded."""
    from sumtune import data
    from sumtune.errors import SumtuneError
    from sumtune.modeling import load_tokenizer

    rows, skipped = data.drop_empty(
        data.select_columns(data.read_rows(cfg.dataset, cfg.dataset_split), cfg.text_column, cfg.summary_column,
                            cfg.dataset), cfg.empty_rows, cfg.dataset)
    rows = rows[: cfg.max_samples or None]
    try:  # random models: the word vocabulary train builds, from the text the model can see
        tokenizer = load_tokenizer(cfg, [t + " " + s for t, s in zip(
            data.clip_chars([r["text"] for r in rows], cfg.max_source_tokens),
            data.clip_chars([r["summary"] for r in rows], cfg.max_target_tokens))])
    except SumtuneError as err:
        raise SumtuneError(f"{str(err).rstrip('.')}; pass --tokenizer with a tokenizer directory to count with "
                           f"it instead.") from None
    report = report_for(count_lengths(tokenizer, [cfg.source_prefix + r["text"] for r in rows]),
                        count_lengths(tokenizer, [r["summary"] for r in rows], target=True),
                        max_source_tokens=cfg.max_source_tokens, max_target_tokens=cfg.max_target_tokens,
                        tokenizer=tokenizer_name(cfg))
    local = Path(cfg.dataset).expanduser()
    return DataInspection(report, len(rows), skipped, str(local.resolve()) if local.exists() else cfg.dataset)
