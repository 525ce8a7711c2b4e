"""What one transaction has staged for S3 until it finishes or aborts."""

from __future__ import annotations

import contextlib
import os
from concurrent.futures import Future, wait
from dataclasses import dataclass, field

from .objectstore import ObjectInfo


@dataclass
class StagedBlob:
    """A blob file waiting in the cache's ``tmp/`` for its transaction's end.

    ``tid`` is None for a new revision (its tid is the transaction's) and set
    for a restored one (``restoreBlob`` names its revision). ``upload`` is the
    upload started when the blob was stored, if one was: to ``upload_key``,
    the revision's own key, or a staging key when ``staged`` (copied to the
    revision's key once the tid is known). Its result is the CRC32 recorded.
    """

    oid: bytes
    path: str
    tid: bytes | None = None
    upload: Future[str] | None = None
    upload_key: str | None = None
    staged: bool = False
    #: Set by a restore's upload when the key held this revision already: an
    #: abort never deletes it (this transaction did not create it).
    preexisting: bool = False
    #: The CRC32 the finished upload recorded.
    checksum: str | None = None
    #: A staged upload's object as a HEAD found it (size, ETag), for its copy.
    source_info: ObjectInfo | None = None


@dataclass
class PendingCommit:
    """The blobs, undo copies and uploaded keys of the transaction in progress."""

    transaction: object
    #: The tid, when the base tells it from tpc_begin on; else set at vote.
    tid: bytes | None = None
    blobs: dict[bytes, StagedBlob] = field(default_factory=dict)
    #: oid -> tid of the revision whose object the new revision copies (undo).
    copies: dict[bytes, bytes] = field(default_factory=dict)
    #: Every revision key an upload or copy was attempted for.
    attempted_keys: list[str] = field(default_factory=list)
    #: Keys of restored revisions that were in S3 before this transaction:
    #: abort never deletes them (it did not create them).
    preexisting_keys: set[str] = field(default_factory=set)
    #: Staging keys written (or perhaps written): deleted after finish or abort.
    staging_keys: list[str] = field(default_factory=list)
    #: Bytes of the blobs left to upload at vote (see upload_at_vote).
    bytes_at_vote: int = 0
    #: The copies owed after tpc_finish, where the base learns the tid only
    #: there (a journal.Journal, written at vote).
    journal: object | None = None
    #: The transaction's commit marker (journal.COMMIT_MARKER), on a base
    #: that learns its tid at finish.
    marker: str | None = None

    def upload_at_vote(self, size: int, budget: int) -> bool:
        """Should a blob of *size* bytes wait for the vote (True), or be
        staged now? At most *budget* bytes in all wait: where the vote holds
        a database-wide lock, the uploads under it stay short however many
        blobs the transaction has."""
        if self.bytes_at_vote + size >= budget:
            return False
        self.bytes_at_vote += size
        return True

    def stage(self, blob: StagedBlob) -> None:
        """Add *blob*; a blob stored again for the same oid replaces the
        earlier one, whose upload is settled first so it cannot land later."""
        replaced = self.blobs.pop(blob.oid, None)
        if replaced is not None:
            self._settle(replaced, cancel=True)
            _remove(replaced.path)
        self.copies.pop(blob.oid, None)
        self.blobs[blob.oid] = blob

    def settle_uploads(self, cancel: bool) -> list[BaseException]:
        """Wait for the uploads started at store time (with *cancel*, cancel
        those not yet started first), record the keys they may have written,
        and return the failures of those that ran."""
        if cancel:
            # All at once: an upload finishing while others are waited for
            # would let a queued one start.
            for blob in self.blobs.values():
                if blob.upload is not None and blob.upload.cancel():
                    blob.upload = None  # never started: it wrote nothing
        failures = []
        for blob in self.blobs.values():
            failure = self._settle(blob, cancel)
            if failure is not None:
                failures.append(failure)
        return failures

    def _settle(self, blob: StagedBlob, cancel: bool) -> BaseException | None:
        upload, blob.upload = blob.upload, None
        if upload is None or (cancel and upload.cancel()):
            return None  # never started: it wrote nothing
        wait([upload])
        if blob.staged:
            self.staging_keys.append(blob.upload_key)
        elif blob.preexisting:
            self.preexisting_keys.add(blob.upload_key)
        else:
            self.attempted_keys.append(blob.upload_key)
        failure = upload.exception()
        if failure is None:
            blob.checksum = upload.result()
        return failure

    def created_keys(self) -> list[str]:
        """The revision keys an abort deletes: attempted, and not there before."""
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
