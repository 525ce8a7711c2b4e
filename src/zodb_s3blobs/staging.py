"""What one transaction has staged for S3 until it finishes or aborts."""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field


@dataclass
class StagedBlob:
    """A blob file waiting in the cache's ``tmp/`` for its transaction's vote.

    ``tid`` is None for a new revision (its tid is the transaction's, known at
    vote) and set for a restored one (``restoreBlob`` names its revision).
    """

    oid: bytes
    path: str
    tid: bytes | None = None


@dataclass
class PendingCommit:
    """The blobs, undo copies and uploaded keys of the transaction in progress."""

    transaction: object
    blobs: dict[bytes, StagedBlob] = field(default_factory=dict)
    #: oid -> tid of the revision whose object the new revision copies (undo).
    copies: dict[bytes, bytes] = field(default_factory=dict)
    #: Every key an upload or copy was attempted for.
    attempted_keys: list[str] = field(default_factory=list)
    #: Keys of restored revisions that were in S3 before this transaction:
    #: abort never deletes them (it did not create them).
    preexisting_keys: set[str] = field(default_factory=set)
    tid: bytes | None = None

    def stage(self, blob: StagedBlob) -> None:
        replaced = self.blobs.pop(blob.oid, None)
        if replaced is not None:
            _remove(replaced.path)
        self.copies.pop(blob.oid, None)
        self.blobs[blob.oid] = blob

    def created_keys(self) -> list[str]:
        """The keys an abort deletes: attempted, and not there before."""
        return [k for k in self.attempted_keys if k not in self.preexisting_keys]

    def restores(self) -> bool:
        """Does this transaction restore revisions (tids chosen elsewhere)?"""
        return any(blob.tid is not None for blob in self.blobs.values())

    def has_transfers(self) -> bool:
        return bool(self.blobs or self.copies)

    def discard_files(self) -> None:
        for blob in self.blobs.values():
            _remove(blob.path)
        self.blobs.clear()


def _remove(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.remove(path)
