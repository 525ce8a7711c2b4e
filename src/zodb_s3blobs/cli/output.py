"""How the operator commands speak: one JSON document with ``--json``, else a
short table; problems as one line each on stderr; a progress bar on stderr
when it is a terminal, and when it is not (a log), a progress line now and
then, so a long run shows it is alive."""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from datetime import datetime, timezone

from tqdm import tqdm

from . import PROG


def emit(args: argparse.Namespace, document: dict, lines: Iterable[str]) -> None:
    """Print *document* as JSON with ``--json``, otherwise the human *lines*."""
    if args.json:
        print(json.dumps({"command": args.command, **document}, indent=2))
    else:
        for line in lines:
            print(line)


def problem(message: str) -> None:
    """Report one problem found as one line on stderr."""
    print(f"{PROG}: {message}", file=sys.stderr)


def table(headers: Sequence[str], rows: Iterable[Sequence[object]]) -> list[str]:
    """Rows under *headers* in aligned columns (numbers to the right)."""
    rows = [[str(cell) for cell in row] for row in rows]
    numeric = [
        bool(rows) and all(row[i].isdigit() for row in rows)
        for i in range(len(headers))
    ]
    widths = [
        max([len(header)] + [len(row[i]) for row in rows])
        for i, header in enumerate(headers)
    ]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(
            cell.rjust(width) if right else cell.ljust(width)
            for cell, width, right in zip(cells, widths, numeric, strict=True)
        ).rstrip()

    return [line(headers), *(line(row) for row in rows)]


def human_size(size: int) -> str:
    """A byte count as B, KiB, MiB, GiB or TiB."""
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024:
            return f"{size} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"


def timestamp(seconds: float | None) -> str | None:
    """A POSIX time as an ISO 8601 UTC string, or None."""
    if seconds is None:
        return None
    return datetime.fromtimestamp(seconds, timezone.utc).isoformat(timespec="seconds")


#: Seconds between two progress lines when stderr is not a terminal, by
#: default; ``--progress-interval`` sets it for one run.
PROGRESS_INTERVAL = 60.0
_progress_interval = PROGRESS_INTERVAL


def add_progress_option(parser: argparse.ArgumentParser) -> None:
    """Add ``--progress-interval`` to a command doing long work."""
    parser.add_argument(
        "--progress-interval",
        metavar="SECONDS",
        type=float,
        default=PROGRESS_INTERVAL,
        help="when stderr is not a terminal (cron, CI), print a progress line "
        f"every SECONDS (default {PROGRESS_INTERVAL:g}; 0: after each step)",
    )


def use_progress_interval(args: argparse.Namespace) -> None:
    """Make this run's progress lines follow ``--progress-interval``."""
    global _progress_interval
    _progress_interval = args.progress_interval


class ProgressLines:
    """Progress for a log (stderr not a terminal: cron, CI): one line every
    *interval* seconds while the work goes on, counting what was done, so a
    log shows that a run of hours is alive. Used like a tqdm bar."""

    def __init__(
        self, description: str, unit: str, total: int | None, interval: float
    ) -> None:
        self._description = description
        self._unit = unit
        self._total = total
        self._interval = interval
        self._done = 0
        self._started = self._said = time.monotonic()

    def __enter__(self) -> ProgressLines:
        return self

    def __exit__(self, *exc_info: object) -> None:
        pass

    def update(self, count: int = 1) -> None:
        self._done += count
        now = time.monotonic()
        if now - self._said >= self._interval:
            self._said = now
            print(f"{PROG}: {self._description}: {self._line(now)}", file=sys.stderr)

    def _line(self, now: float) -> str:
        def amount(count: int) -> str:
            return human_size(count) if self._unit == "B" else f"{count} {self._unit}"

        done = amount(self._done)
        if self._total:
            share = 100 * self._done / self._total
            done = f"{done} of {amount(self._total)} ({share:.0f}%)"
        return f"{done} after {now - self._started:.0f} s"


def progress(total: int, description: str) -> tqdm | ProgressLines:
    """A byte progress bar on stderr when it is a terminal, else a line
    every ``--progress-interval`` seconds."""
    if not sys.stderr.isatty():
        return ProgressLines(description, "B", total, _progress_interval)
    return tqdm(
        total=total,
        desc=description,
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        file=sys.stderr,
        leave=False,
    )


def counter(
    description: str, unit: str, total: int | None = None
) -> tqdm | ProgressLines:
    """A progress bar counting *unit* (keys, transactions) on stderr when it
    is a terminal (for work whose length is known only at its end, it shows
    the count and the rate), else a line every ``--progress-interval``
    seconds."""
    if not sys.stderr.isatty():
        return ProgressLines(description, unit, total, _progress_interval)
    return tqdm(
        total=total,
        desc=description,
        unit=unit,
        file=sys.stderr,
        leave=False,
    )


#: A request that has not answered after this many seconds is named on a
#: terminal, so that an operator sees what a silent command waits for; when
#: stderr is piped (a log, CI), after :data:`WAITING_PIPED` seconds.
WAITING_AFTER = 1.0
WAITING_PIPED = 5.0


@contextlib.contextmanager
def waiting(what: str, limit: float) -> Iterator[None]:
    """Name *what* the command waits for, and for how long at most (*limit*
    seconds), on stderr once it takes longer than :data:`WAITING_AFTER` (on a
    terminal) or :data:`WAITING_PIPED` seconds (piped); nothing otherwise."""
    delay = WAITING_AFTER if sys.stderr.isatty() else WAITING_PIPED

    def say() -> None:
        print(f"{PROG}: waiting for {what} (up to {limit:g} s) ...", file=sys.stderr)

    timer = threading.Timer(delay, say)
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        timer.cancel()
        timer.join()  # a line being printed ends before the command goes on
