"""The cache's in-memory index: cached revisions in least-recently-used order
with their sizes, so an eviction check costs what it evicts, not a walk of
the cache directory. Not thread-safe: the cache guards it with its lock."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable

Revision = tuple[bytes, bytes]  # (oid, tid)


class LRUIndex:
    """Sizes of cached revisions, oldest use first, and their total."""

    def __init__(self, entries: Iterable[tuple[Revision, int]] = ()) -> None:
        self._sizes: OrderedDict[Revision, int] = OrderedDict()
        self.total = 0
        for revision, size in entries:
            self.add(revision, size)

    def __len__(self) -> int:
        return len(self._sizes)

    def __contains__(self, revision: Revision) -> bool:
        return revision in self._sizes

    def add(self, revision: Revision, size: int) -> None:
        """Record *revision* as just used, with its size."""
        self.remove(revision)
        self._sizes[revision] = size
        self.total += size

    def touch(self, revision: Revision) -> int | None:
        """Mark *revision* as just used and return its size; None if it is not
        indexed."""
        try:
            self._sizes.move_to_end(revision)
        except KeyError:
            return None
        return self._sizes[revision]

    def remove(self, revision: Revision) -> None:
        self.total -= self._sizes.pop(revision, 0)

    def apply(self, revision: Revision, size: int | None) -> None:
        """Record an added file (its size) or a removed one (None)."""
        if size is None:
            self.remove(revision)
        else:
            self.add(revision, size)

    def pop_oldest_until(self, target: int) -> list[tuple[Revision, int]]:
        """Remove and return least-recently-used entries until at most *target*
        bytes remain indexed."""
        popped = []
        while self.total > target and self._sizes:
            revision, size = self._sizes.popitem(last=False)
            self.total -= size
            popped.append((revision, size))
        return popped
