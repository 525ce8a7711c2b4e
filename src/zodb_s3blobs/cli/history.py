"""The blob revisions a base storage holds, read from its history: what
``verify``, ``undelete`` and ``migrate --from-s3-prefix`` compare with S3."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any, TypeVar

from ZODB.blob import is_blob_record

from .output import counter

T = TypeVar("T")


def keeps_history(base: Any) -> bool:
    """Whether *base* may hold non-current revisions (only a history-free
    RelStorage says it does not)."""
    return bool(getattr(base, "keep_history", True))


def blob_revisions(
    base: Any, until: bytes, all_revisions: bool
) -> list[tuple[bytes, bytes]]:
    """``(oid, tid)`` of the blob revisions *base* holds up to tid *until*:
    all of them, or only each object's current one (a progress bar counts
    the transactions read, on a terminal)."""
    current: dict[bytes, bytes] = {}
    every: list[tuple[bytes, bytes]] = []
    transactions = base.iterator(None, until)
    try:
        for transaction in counted(transactions, "read base", "txn"):
            for record in transaction:
                if is_blob_record(record.data):
                    current[record.oid] = record.tid
                    every.append((record.oid, record.tid))
                else:  # deleted, or no longer a blob
                    current.pop(record.oid, None)
    finally:
        if hasattr(transactions, "close"):  # FileStorage's iterator holds a file
            transactions.close()
    return every if all_revisions else sorted(current.items())


def counted(items: Iterable[T], description: str, unit: str) -> Iterator[T]:
    """*items*, each counted on a progress bar while it is worked on (shown
    only on a terminal)."""
    with counter(description, unit) as bar:
        for item in items:
            yield item
            bar.update(1)
