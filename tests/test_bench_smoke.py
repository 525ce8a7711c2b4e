"""``python bench/bench.py --quick`` runs to the end and prints every row.

A smoke run only: its timings are not checked, the machine is noisy.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

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
)


def test_quick_run_exits_0_and_prints_every_row(tmp_path):
    env = dict(os.environ, TMPDIR=str(tmp_path), NO_PROXY="127.0.0.1,localhost")
    result = subprocess.run(
        [sys.executable, str(BENCH), "--quick"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    for row in ROWS:
        assert any(line.startswith(row + " ") for line in lines), row
    assert os.listdir(tmp_path) == [], "the run removes its working directory"
