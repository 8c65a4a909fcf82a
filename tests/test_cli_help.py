"""`sumtune --help` and every subcommand's help: they render, and every option says what it does."""

from __future__ import annotations

import argparse
import subprocess
import sys

import pytest

from sumtune.cli import build_parser


def subcommands() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def choices_help() -> dict[str, str]:
    parser = build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return {c.dest: c.help or "" for c in action._choices_actions}


SUBCOMMANDS = sorted(subcommands())


def test_expected_subcommands_exist():
    assert {"train", "evaluate", "summarize", "merge", "memory", "demo", "profile", "report", "push"} <= set(SUBCOMMANDS)


def test_top_level_help_lists_every_subcommand_with_a_summary():
    result = subprocess.run([sys.executable, "-m", "sumtune", "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.startswith("usage: sumtune")
    summaries = choices_help()  # argparse lists only subcommands added with a help text
    listing = " ".join(result.stdout.split())  # argparse wraps long summaries
    for name in SUBCOMMANDS:
        summary = summaries.get(name, "")
        assert len(summary.split()) >= 4, f"`{name}` has no real one-line summary"
        assert " ".join(summary.split()) in listing, f"`{name}`'s summary is not in --help"
    assert "examples:" in result.stdout and "sumtune report" in result.stdout and "sumtune push" in result.stdout


@pytest.mark.parametrize("name", SUBCOMMANDS)
def test_subcommand_help_renders_and_documents_every_option(name, capsys):
    parser = subcommands()[name]
    with pytest.raises(SystemExit) as exit_:
        parser.parse_args(["--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    assert text.startswith(f"usage: sumtune {name}") and parser.description and len(parser.description) > 30
    undocumented = [a.option_strings[-1] if a.option_strings else a.dest for a in parser._actions
                    if a.help is None or a.help == argparse.SUPPRESS or not str(a.help).strip()]
    assert not undocumented, f"`sumtune {name}` options without help: {undocumented}"
    for action in parser._actions:
        for option in action.option_strings:
            assert option in text, f"{option} missing from `sumtune {name} --help`"
