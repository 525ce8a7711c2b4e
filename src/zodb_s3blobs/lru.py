"""The cache's in-memory index: cached revisions in least-recently-used order
with their sizes and when this process last knew them to be used, so an
eviction check costs what it evicts, not a walk of the cache directory. Not
thread-safe: the cache guards it with its lock."""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Iterable

Revision = tuple[bytes, bytes]  # (oid, tid)


class LRUIndex:
    """Sizes and use times of cached revisions, oldest use first, and their
    total size."""

    def __init__(self, entries: Iterable[tuple[Revision, int, float]] = ()) -> None:
        self._entries: OrderedDict[Revision, tuple[int, float]] = OrderedDict()
        self.total = 0
        for revision, size, used in entries:
            self.add(revision, size, used)

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, revision: Revision) -> bool:
        return revision in self._entries

    def add(self, revision: Revision, size: int, used: float | None = None) -> None:
        """Record *revision* as the most recently used, with its size; *used*
        is when it was used (default: now)."""
        self.remove(revision)
        self._entries[revision] = (size, time.time() if used is None else used)
        self.total += size

    def touch(self, revision: Revision) -> int | None:
        """Mark *revision* as just used and return its size; None if it is not
        indexed."""
        entry = self._entries.pop(revision, None)
        if entry is None:
            return None
        self._entries[revision] = (entry[0], time.time())
        return entry[0]

    def remove(self, revision: Revision) -> None:
        entry = self._entries.pop(revision, None)
        if entry is not None:
            self.total -= entry[0]

    def apply(self, revision: Revision, size: int | None) -> None:
        """Record an added file (its size) or a removed one (None)."""
        if size is None:
            self.remove(revision)
        else:
            self.add(revision, size)

    def put_back_oldest(self, revision: Revision, size: int, used: float) -> None:
        """Undo :meth:`pop_oldest`: *revision* is again the least recently
        used."""
        self.add(revision, size, used)
        self._entries.move_to_end(revision, last=False)

    def pop_oldest(self) -> tuple[Revision, int, float] | None:
        """Remove and return the least recently used entry (revision, size,
        use time); None when the index is empty."""
        if not self._entries:
            return None
        revision, (size, used) = self._entries.popitem(last=False)
        self.total -= size
        return revision, size, used
