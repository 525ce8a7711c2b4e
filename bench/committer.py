"""A second OS process that commits a small change without blobs in a loop,
as another Zope instance on the same database does, and reports when each
commit started and ended.

The bench starts ``python committer.py CONFIG INTERVAL`` through
:class:`Committer`. The process opens the storage from the ZConfig text in
CONFIG, then sets ``root["ticks"]["n"]`` (an object the bench created, so
that these commits never conflict with the bench's own, which change the
root) and commits, sleeps INTERVAL seconds, and again, until its standard
input closes. Each commit is one JSON line ``{"start": s, "end": e}`` on
standard output, in ``time.monotonic()`` seconds: on Linux that clock is
one for all processes, so the bench can tell which commits overlapped one of
its own. A failure is one line ``{"error": traceback}``, and the process
exits.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path

#: The object each commit changes; the bench creates it before the process
#: starts.
TICKS = "ticks"
#: Seconds to wait for the process to open the database and commit once, and
#: for a commit after the one awaited (a commit waiting for a lock held
#: during an upload of a large blob over a slow link takes as long).
TIMEOUT = 300.0


class CommitterError(RuntimeError):
    """The process failed, or did not commit in time."""


class Committer:
    """The bench's side: start the process and collect what it reports."""

    def __init__(self, config: str, directory: Path, interval: float) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        config_path = directory / "storage.conf"
        config_path.write_text(config)
        self._log_path = directory / "committer.log"
        with open(self._log_path, "w") as log:
            self._process = subprocess.Popen(
                [sys.executable, __file__, str(config_path), str(interval)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=log,
                text=True,
            )
        self._commits: list[tuple[float, float]] = []
        self._error: str | None = None
        self._ended = False
        self._changed = threading.Condition()
        threading.Thread(target=self._read, name="committer", daemon=True).start()
        self._wait_for(lambda: bool(self._commits), "its first commit")

    def _read(self) -> None:
        """Collect the process's lines until it exits."""
        assert self._process.stdout is not None
        for line in self._process.stdout:
            report = json.loads(line)
            with self._changed:
                if "error" in report:
                    self._error = report["error"]
                else:
                    self._commits.append((report["start"], report["end"]))
                self._changed.notify_all()
        with self._changed:
            self._ended = True
            self._changed.notify_all()

    def _wait_for(self, reported, what: str) -> None:
        """Wait until *reported()* is true; raise if the process fails first."""
        deadline = time.monotonic() + TIMEOUT
        with self._changed:
            while not reported():
                if self._error is not None or self._ended:
                    raise CommitterError(f"the committer failed: {self._why()}")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise CommitterError(f"no {what} in {TIMEOUT:g}s: {self._why()}")
                self._changed.wait(left)

    def _why(self) -> str:
        """The process's error, or the end of its log."""
        return self._error or self._log_path.read_text()[-3000:]

    def overlapping(self, start: float, end: float) -> list[float]:
        """The durations of the commits that overlapped [start, end]
        (``time.monotonic()`` seconds), once the process has begun a commit
        after *end*: a commit waiting for a lock in that span has ended."""
        self._wait_for(
            lambda: self._commits[-1][0] >= end, "commit after the one awaited"
        )
        with self._changed:
            return [e - s for s, e in self._commits if s < end and e > start]

    def typical(self) -> float:
        """The median duration of the commits so far: what one costs when
        nothing holds the lock, most of the time."""
        with self._changed:
            return statistics.median(e - s for s, e in self._commits)

    def close(self) -> None:
        """Close the process's input; it ends after its current commit."""
        assert self._process.stdin is not None
        self._process.stdin.close()
        try:
            self._process.wait(TIMEOUT)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()


# -- the process side -------------------------------------------------------


def commit_in_a_loop(config_path: str, interval: float) -> None:
    """Commit ``root[TICKS]["n"] += 1`` every *interval* seconds until
    standard input closes, reporting each commit's start and end."""
    import transaction
    import ZODB
    import ZODB.config

    stop = threading.Event()

    def wait_for_eof() -> None:
        sys.stdin.read()
        stop.set()

    threading.Thread(target=wait_for_eof, daemon=True).start()
    with open(config_path) as f:
        db = ZODB.DB(ZODB.config.storageFromFile(f))
    tm = transaction.TransactionManager()
    conn = db.open(tm)
    try:
        while not stop.is_set():
            tm.begin()  # sees the bench's commits: no conflict on the root
            ticks = conn.root()[TICKS]
            started = time.monotonic()
            ticks["n"] = ticks.get("n", 0) + 1
            tm.commit()
            ended = time.monotonic()
            print(json.dumps({"start": started, "end": ended}), flush=True)
            stop.wait(interval)
    finally:
        conn.close()
        db.close()


def main(argv: list[str]) -> int:
    """Run the loop; report any failure as one JSON line."""
    config_path, interval = argv
    try:
        commit_in_a_loop(config_path, float(interval))
    except Exception:
        print(json.dumps({"error": traceback.format_exc()}), flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
