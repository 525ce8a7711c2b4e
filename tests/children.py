"""Python child processes a test runs side by side: each runs one script
with its own job, and must end with exit status 0 and print ``ok``."""

from __future__ import annotations

import json
import subprocess
import sys


def run_side_by_side(script: str, jobs: list[dict], timeout: float = 300) -> None:
    """Start one ``python -c script`` per job (its JSON as the argument) at
    once, wait for all of them, and assert each printed ``ok``."""
    children = [
        subprocess.Popen(
            [sys.executable, "-c", script, json.dumps(job)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for job in jobs
    ]
    for child in children:
        out, err = child.communicate(timeout=timeout)
        assert child.returncode == 0, err
        assert out.strip() == "ok"
