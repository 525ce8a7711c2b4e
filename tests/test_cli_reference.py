"""The command reference in docs/cli.md is what the parser renders, every
command answers --help, and the pages are in the documentation's toctree."""

from __future__ import annotations

from pathlib import Path

import pytest

from clitools import run
from zodb_s3blobs import cli
from zodb_s3blobs.cli import reference

ROOT = Path(__file__).resolve().parent.parent
REFERENCE = ROOT / "docs" / "cli.md"
COMMANDS = [
    ["demo"],
    ["init"],
    ["check"],
    ["migrate"],
    ["verify"],
    ["gc"],
    ["undelete"],
    ["cache", "stats"],
    ["cache", "prune"],
]


def test_the_reference_is_what_the_parser_renders():
    assert REFERENCE.read_text(encoding="utf-8") == reference.reference(), (
        "docs/cli.md differs from the parser: regenerate it with "
        "python -m zodb_s3blobs.cli.reference > docs/cli.md"
    )


@pytest.mark.parametrize("command", COMMANDS, ids=" ".join)
def test_every_command_answers_help_and_is_documented(command, capsys):
    assert cli.main([*command, "--help"]) == 0
    usage = f"usage: zodb-s3blobs {' '.join(command)} "
    assert capsys.readouterr().out.startswith(usage)
    heading = f"## `zodb-s3blobs {' '.join(command)}`"
    assert heading in REFERENCE.read_text(encoding="utf-8").splitlines()


def test_help_from_the_shell():
    result = run("cache", "prune", "--help")
    assert result.returncode == 0
    assert "--to SIZE" in result.stdout


@pytest.mark.parametrize("page", ["cli", "migration"])
def test_the_pages_are_in_the_toctree(page):
    index = (ROOT / "docs" / "index.md").read_text(encoding="utf-8")
    toctree = index.split("```{toctree}", 1)[1].split("```", 1)[0]
    assert page in toctree.split()
