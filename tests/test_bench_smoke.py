"""``python bench/bench.py --quick`` runs to the end and prints every row:
uncapped, through the capped line, and on RelStorage with PostgreSQL and a
second committing process; and ``--scale`` at a tiny size prints its rows.

Smoke runs only: their timings are not checked, the machine is noisy. The
first needs PostgreSQL like the deployment tests (it asks for their
``postgresql`` fixture): skipped without it, failed under CI.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench" / "bench.py"
ROWS = (
    "commit small blobs",
    "cold read small blobs",
    "commit large blob",
    "cold read large blob",
    "unghost blobs, empty cache",
    "warm read, cached blob",
    "collect orphans",
    "eviction check",
    "cache install, fsync",
    "commit small blobs, 100 Mbit/s",
    "cold read small blobs, 100 Mbit/s",
    "commit large blob, 100 Mbit/s",
    "cold read large blob, 100 Mbit/s",
    "lock ratio, RelStorage, 100 Mbit/s",
    "lock ratio, RelStorage",
    "commit lock, 64.0 KiB blob, 100 Mbit/s",
    "commit small blobs, ZEO client",
    "commit small blobs, ZEO client vs server-side",
    "commit large blob, ZEO client",
    "commit large blob, ZEO client vs server-side",
)


@pytest.fixture
def run_tmpdir() -> Iterator[str]:
    """An empty TMPDIR for the run, in the system's temporary directory and
    traversable by others: as root, the PostgreSQL cluster the run makes
    there is used by the ``postgres`` user, who cannot enter pytest's
    private tmp_path."""
    directory = tempfile.mkdtemp(prefix="zodb-s3blobs-bench-smoke-")
    os.chmod(directory, 0o711)
    try:
        yield directory
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def run_bench(directory, *args: str) -> list[str]:
    """Run bench.py with *args* in *directory* (its TMPDIR too); assert it
    exits 0 and return the lines it printed."""
    env = dict(os.environ, TMPDIR=str(directory), NO_PROXY="127.0.0.1,localhost")
    result = subprocess.run(
        [sys.executable, str(BENCH), *args],
        cwd=directory,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.splitlines()


def test_quick_run_exits_0_and_prints_every_row(run_tmpdir, postgresql):
    # The session's server is not used: the fixture skips the test (fails it
    # under CI) where the bench could not start its own PostgreSQL.
    lines = run_bench(run_tmpdir, "--quick")
    for row in ROWS:
        assert any(line.startswith(row + " ") for line in lines), row
    assert lines[-1].endswith(" targets met")
    assert os.listdir(run_tmpdir) == [], "the run removes its directories"


SCALE_ROWS = (
    "cache RSS growth, 200 files",
    "8 processes serve a hit, 200 files",
    "evict 10%, 200 files",
    "collector dry run vs listing, 200 objects",
    "collector vs listing, 200 objects",
    "collector RSS growth, 200 objects",
    "cold reads, 1 process",
    "warm reads, 1 process",
    "cold reads, 8 processes",
    "warm reads, 8 processes",
    "cold reads, 4 vs 2 processes",
)


def test_scale_run_exits_0_and_prints_every_row(tmp_path):
    """``--scale`` at one tiny size, with the shortened reads of --quick:
    every row and the targets line are printed, and an extrapolation is
    declined (it needs two sizes). No timing is checked."""
    lines = run_bench(tmp_path, "--scale", "--quick", "--scale-sizes", "200")
    for row in SCALE_ROWS:
        assert any(line.startswith(row + " ") for line in lines), row
    assert any(line.endswith(" targets met") for line in lines)
    assert lines[-1] == "extrapolation: needs two sizes"
    assert os.listdir(tmp_path) == [], "the run removes its directories"


def test_scale_sizes_must_be_positive_counts():
    result = subprocess.run(
        [sys.executable, str(BENCH), "--scale", "--scale-sizes", "10,x"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "--scale-sizes" in result.stderr and "positive counts" in result.stderr
