"""Where a site copy's blobs come from when it stops reading its parent:
the parent site's prefix in S3 (``migrate --from-s3-prefix``).

The revisions are those the copy's base storage holds (its whole history),
found with their sizes in one listing of the parent prefix, and copied
server-side into the copy's own prefix. The parent is only listed and read.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ..errors import S3BlobStorageError
from ..keys import KeyLayout
from ..objectstore import Copy, ObjectStore
from ..parent import open_parent
from . import UsageError
from .history import blob_revisions, counted
from .sources import BlobRevision
from .target import Target

#: Why a revision the base holds is not copied (the ``reason`` reported).
NOWHERE = (
    "under neither the parent prefix nor this storage's own (zodb-s3blobs "
    "undelete may bring it back where the bucket is versioned)"
)


class ParentPrefixSource:
    """The blob revisions of the base storage *base*, under the parent
    *prefix* (in CONFIG's ``fallback-s3-bucket``, or the same bucket)."""

    def __init__(
        self,
        prefix: str,
        target: Target,
        base: Any,
        store: ObjectStore,
        existing: dict[str, int],
    ) -> None:
        bucket = getattr(target.section.config, "fallback_s3_bucket", None)
        try:
            _parent, self._own_store = open_parent(
                target.settings, store, prefix, bucket
            )
        except ValueError:
            raise UsageError(
                f"--from-s3-prefix {prefix}: that is the s3-prefix of "
                f"{target.path} itself: give the parent site's prefix"
            ) from None
        except S3BlobStorageError as exc:
            raise UsageError(str(exc)) from None
        self._store = self._own_store or store
        self._layout = KeyLayout(prefix)
        self._base = base
        self._target = target
        self._existing = existing
        #: Revisions found under neither prefix: ``{"path": ..., "reason": ...}``.
        self.skipped: list[dict[str, str]] = []

    def describe(self) -> str:
        """The source in words, for reports."""
        return f"parent prefix {self._store.url(self._layout.root)}"

    def revisions(self) -> list[BlobRevision]:
        """Every blob revision the base holds, with its size under the
        parent prefix, else under the copy's own (where ``plan`` finds it
        present); one under neither is recorded in :attr:`skipped`."""
        revisions = blob_revisions(self._base, self._base.lastTransaction(), True)
        listing = self._store.list(self._layout.root)
        parent = dict(counted(listing, "list parent", "keys"))
        found = []
        for oid, tid in revisions:
            key = self._layout.key(oid, tid)
            size = parent.get(key)
            if size is None:
                size = self._existing.get(self._target.layout.key(oid, tid))
            if size is None:
                self.skipped.append({"path": self._store.url(key), "reason": NOWHERE})
                continue
            found.append(BlobRevision(oid, tid, size))
        return found

    def copies(self, batch: Sequence[tuple[BlobRevision, str]]) -> list[Copy]:
        """The server-side copies of *batch* ``(revision, key)`` to its keys."""
        return [
            Copy(
                self._layout.key(revision.oid, revision.tid),
                key,
                source_bucket=self._store.bucket,
            )
            for revision, key in batch
        ]

    def close(self) -> None:
        """Close the parent bucket's own store, if it has one."""
        if self._own_store is not None:
            self._own_store.close()
