"""``zodb-s3blobs demo`` and the command line's exit codes, run as a user would.

The demo runs in a subprocess, both as ``python -m zodb_s3blobs.cli`` and
through the installed console script; its S3 server listens on 127.0.0.1.
"""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from zodb_s3blobs import cli
from zodb_s3blobs.cli import demo
from zodb_s3blobs.cli.localserver import MissingServerError

SCRIPT = Path(sys.executable).with_name("zodb-s3blobs")
KEY_LINE = re.compile(r"^\s+blobs/[0-9a-f]+/[0-9a-f]+\.blob\s", re.MULTILINE)
CACHE_LINE = re.compile(
    r"^\s+[0-9a-f]{2}/[0-9a-f]+/[0-9a-f]+\.blob\s.*\s0o400$", re.MULTILINE
)
OK_LINE = "demo OK: 8 blobs committed, read back with an empty cache, and verified"


def launcher(kind: str) -> list[str]:
    """The command that starts the CLI: the module, or the console script."""
    if kind == "module":
        return [sys.executable, "-m", "zodb_s3blobs.cli"]
    if not SCRIPT.exists():
        pytest.skip(f"no console script at {SCRIPT}")
    return [str(SCRIPT)]


@pytest.fixture
def run_cli(tmp_path):
    """Run the CLI in a private working and temporary directory; return the
    completed process and that temporary directory."""
    workdir = tmp_path / "cwd"
    tempdir = tmp_path / "tmp"
    workdir.mkdir()
    tempdir.mkdir()
    env = dict(os.environ, TMPDIR=str(tempdir), NO_PROXY="127.0.0.1,localhost")

    def run(*args: str, kind: str = "module") -> subprocess.CompletedProcess:
        return subprocess.run(
            [*launcher(kind), *args],
            cwd=workdir,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )

    run.tempdir = tempdir
    return run


@pytest.mark.parametrize("kind", ["module", "script"])
def test_demo_round_trip(run_cli, kind):
    result = run_cli("demo", kind=kind)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    out = result.stdout
    assert len(KEY_LINE.findall(out)) == 9  # 8 blobs, one of them updated
    assert len(CACHE_LINE.findall(out)) == 8
    assert re.search(r"^\s+cold read\s+8 blobs", out, re.MULTILINE)
    assert out.splitlines()[-1] == OK_LINE
    assert list(run_cli.tempdir.iterdir()) == []  # removed without --keep


def test_demo_keep(run_cli):
    result = run_cli("demo", "--keep", "--blobs", "2", "--max-size", "4KB")
    assert result.returncode == 0, result.stderr
    [kept] = run_cli.tempdir.iterdir()
    assert f"Working dir:  {kept} (kept)" in result.stdout
    assert (kept / "Data.fs").exists()
    assert len(CACHE_LINE.findall(result.stdout)) == 2


@pytest.mark.parametrize("args", [["--help"], ["demo", "--help"]])
def test_help(run_cli, args):
    result = run_cli(*args)
    assert result.returncode == 0
    assert result.stdout.startswith("usage: zodb-s3blobs")


@pytest.mark.parametrize(
    "args, message",
    [
        (["frobnicate"], "invalid choice: 'frobnicate'"),
        ([], "the following arguments are required: COMMAND"),
        (["demo", "--blobs", "0"], "--blobs: must be at least 1"),
        (["demo", "--max-size", "big"], "--max-size: 'big' is not a size"),
    ],
)
def test_bad_usage_exits_2(run_cli, args, message):
    result = run_cli(*args)
    assert result.returncode == 2
    assert message in result.stderr


def test_missing_moto_is_one_line_and_exit_1(monkeypatch, capsys):
    def no_server():
        raise MissingServerError(
            "The embedded S3 server needs moto: pip install 'zodb-s3blobs[demo]'"
        )

    monkeypatch.setattr(demo, "local_s3_server", no_server)
    assert cli.main(["demo"]) == 1
    err = capsys.readouterr().err
    assert err.splitlines() == [
        "zodb-s3blobs: error: The embedded S3 server needs moto: "
        "pip install 'zodb-s3blobs[demo]'"
    ]


@pytest.fixture
def restore_log_level():
    """--debug lowers the package logger's level; give other tests it back."""
    logger = logging.getLogger("zodb_s3blobs")
    level = logger.level
    yield
    logger.setLevel(level)


def test_debug_shows_the_traceback(monkeypatch, capsys, restore_log_level):
    def fail(count, largest):
        raise RuntimeError("boom")

    monkeypatch.setattr(demo, "blob_sizes", fail)
    assert cli.main(["demo", "--debug"]) == 1
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err
    assert err.splitlines()[-1] == "zodb-s3blobs: error: RuntimeError: boom"
