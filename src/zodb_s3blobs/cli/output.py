"""How the operator commands speak: one JSON document with ``--json``, else a
short table; problems as one line each on stderr; a progress bar on stderr
only when it is a terminal, so piped and scripted runs stay clean."""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import threading
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


def progress(total: int, description: str) -> tqdm:
    """A byte progress bar on stderr, shown only when stderr is a terminal."""
    return tqdm(
        total=total,
        desc=description,
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        file=sys.stderr,
        disable=not sys.stderr.isatty(),
        leave=False,
    )


def counter(description: str, unit: str, total: int | None = None) -> tqdm:
    """A progress bar counting *unit* (keys, transactions) on stderr, shown
    only when stderr is a terminal: for work whose length is known only at
    its end, it shows the count and the rate."""
    return tqdm(
        total=total,
        desc=description,
        unit=unit,
        file=sys.stderr,
        disable=not sys.stderr.isatty(),
        leave=False,
    )


#: A request that has not answered after this many seconds is named on a
#: terminal, so that an operator sees what a silent command waits for.
WAITING_AFTER = 1.0


@contextlib.contextmanager
def waiting(what: str, limit: float) -> Iterator[None]:
    """Name *what* the command waits for, and for how long at most (*limit*
    seconds), on stderr if it takes longer than :data:`WAITING_AFTER` and
    stderr is a terminal; nothing is printed otherwise."""
    if not sys.stderr.isatty():
        yield
        return

    def say() -> None:
        print(f"{PROG}: waiting for {what} (up to {limit:g} s) ...", file=sys.stderr)

    timer = threading.Timer(WAITING_AFTER, say)
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        timer.cancel()
