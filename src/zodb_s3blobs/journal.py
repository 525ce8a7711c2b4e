"""The journal of a commit whose blob copies are still owed after its base's
``tpc_finish``: for a base that learns its tid only there (ZEO's
ClientStorage, see ``tids.tid_at_finish``; the commit path is described in
:mod:`zodb_s3blobs.copier`).

At vote, once the base voted, a journal records the copies still to make --
staging key, oid, CRC32 -- in a file under the cache's private ``locks/``
(not ``tmp/``, which ZODB lists as the storage's temporary directory),
written and fsynced before it appears under its name
(``pending-*.journal``), and locked (``flock``) by its process for as long
as it is pending. When the base's ``tpc_finish`` returns the tid, the tid is
appended to the journal (fsynced).

A journal nobody holds locked was left by a killed process: whichever
process next opens a storage on the cache directory adopts and completes it
(:func:`abandoned_journals`). Until its copies are made, the collector
running with that cache directory keeps its staging objects
(:func:`owed_copies` reads every journal there without adopting it).
One without a tid (the process died inside the base's ``tpc_finish``, or
that call raised) is resolved exactly: every transaction through such a
storage carries a random marker in its extension (:data:`COMMIT_MARKER`,
set before the base's ``tpc_begin`` sends the metadata to the server), the
journal records it, and :func:`find_commit` looks for the transaction
after the last one the voting process had seen that carries it; none
means the transaction never committed.

A journal records the destination (``s3://bucket/[prefix/]blobs/``) it
owes copies to: databases sharing a cache directory adopt, and their
collectors keep, only their own journals' objects.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import secrets
import stat
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import BinaryIO

from ZODB.utils import p64, u64

log = logging.getLogger(__name__)

PREFIX, SUFFIX = "pending-", ".journal"
#: The directory of the cache directory that holds the journals: private,
#: and trusted when the cache opens.
JOURNAL_DIR = "locks"
#: A journal is never larger than this (a transaction of 100 000 blobs).
MAX_JOURNAL = 64 << 20
#: The key of the transaction extension that carries a commit's marker.
COMMIT_MARKER = "zodb-s3blobs-commit"


def mark_transaction(transaction) -> str:
    """Give *transaction*'s metadata a new random marker under
    :data:`COMMIT_MARKER` (a new extension dict: the application's is left
    as it was) and return it; call before the base's ``tpc_begin``."""
    marker = secrets.token_hex(16)
    transaction.extension = {**transaction.extension, COMMIT_MARKER: marker}
    return marker


@dataclass(frozen=True)
class PendingCopy:
    """One copy to *oid*'s new revision from *source*: a staging key (deleted
    once copied) or, for undo, an earlier revision's key."""

    source: str
    oid: bytes
    checksum: str | None
    staged: bool


@dataclass
class Journal:
    """One transaction's pending copies, in a file this process holds locked."""

    path: str
    #: The open journal, locked; None once released (or only read).
    file: BinaryIO | None
    copies: list[PendingCopy]
    #: The last transaction the voting process had seen: the commit is later.
    after: bytes
    #: The transaction's :data:`COMMIT_MARKER`.
    marker: str
    #: Where the copies go: ``s3://bucket/[prefix/]blobs/``.
    destination: str
    tid: bytes | None = None
    #: Copies made already (by this process, since it took the journal).
    done: set[PendingCopy] = field(default_factory=set)

    @classmethod
    def create(
        cls,
        directory: str,
        copies: list[PendingCopy],
        after: bytes,
        marker: str,
        destination: str,
    ) -> Journal:
        """Write a journal under *directory*: complete, fsynced and locked
        before it appears under its name. Raises OSError."""
        record = {
            "after": after.hex(),
            "marker": marker,
            "destination": destination,
            "copies": [[c.source, c.oid.hex(), c.checksum, c.staged] for c in copies],
        }
        fd, new = tempfile.mkstemp(dir=directory, prefix=PREFIX, suffix=".new")
        file = os.fdopen(fd, "ab")
        try:
            fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
            _append(file, record)
            path = new[: -len(".new")] + SUFFIX
            os.replace(new, path)
            _fsync_directory(directory)
        except BaseException:
            file.close()
            with contextlib.suppress(OSError):
                os.remove(new)
            raise
        return cls(path, file, copies, after, marker, destination)

    def record_tid(self, tid: bytes) -> None:
        """Append the committed tid, fsynced. Raises OSError."""
        self.tid = tid
        _append(self.file, {"tid": tid.hex()})

    def remove(self) -> None:
        """Remove the journal (its copies are done, or were never owed)."""
        with contextlib.suppress(FileNotFoundError):
            os.remove(self.path)
        _fsync_directory(os.path.dirname(self.path))
        self.release()

    def release(self) -> None:
        """Let go of the journal, leaving it for a later process to complete."""
        if self.file is not None:
            self.file.close()
            self.file = None

    def owed(self) -> list[PendingCopy]:
        return [c for c in self.copies if c not in self.done]

    def staging_keys(self) -> list[str]:
        return [c.source for c in self.copies if c.staged]

    def revision_sources(self) -> list[str]:
        """The earlier revisions' keys that undo copies read from."""
        return [c.source for c in self.copies if not c.staged]


@dataclass(frozen=True)
class Owed:
    """What the journals under a directory owe, as read at one moment."""

    journals: int = 0
    copies: int = 0
    #: Their staging objects: the collector must keep them, whatever their age.
    staging_keys: frozenset[str] = frozenset()
    #: The revisions' keys their undo copies read from: the collector must
    #: keep them even once the base no longer holds those revisions.
    revision_sources: frozenset[str] = frozenset()

    @property
    def keys(self) -> frozenset[str]:
        """Every object the copies read from."""
        return self.staging_keys | self.revision_sources


def owed_copies(directory: str, destination: str) -> Owed:
    """The copies owed to *destination* (``s3://bucket/[prefix/]blobs/``)
    by the journals under *directory*, whether a live process holds one or
    its writer was killed, read without adopting any:
    no lock is taken and nothing is written. A missing *directory* owes
    nothing; a file named like a journal that is not one of the directory
    owner's regular files, is too large or cannot be parsed is skipped with
    a warning (no process could complete it either). Raises OSError when
    *directory* cannot be read (another user's, private)."""
    flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        dir_fd = os.open(directory, flags)
    except FileNotFoundError:
        return Owed()
    journals = []
    try:
        owner = os.fstat(dir_fd).st_uid
        for name in _journal_names(os.listdir(dir_fd)):
            path = os.path.join(directory, name)
            try:
                journal = _read(path, name, dir_fd, owner)
            except FileNotFoundError:
                continue  # completed meanwhile
            except (OSError, ValueError, KeyError, TypeError) as exc:
                log.warning("Skipping pending-copy journal %s: %s", path, exc)
                continue
            if journal.destination == destination:
                journals.append(journal)
    finally:
        os.close(dir_fd)
    return Owed(
        len(journals),
        sum(len(j.copies) for j in journals),
        frozenset(key for j in journals for key in j.staging_keys()),
        frozenset(key for j in journals for key in j.revision_sources()),
    )


def _read(path: str, name: str, dir_fd: int, owner: int) -> Journal:
    """The journal *name* in *dir_fd*, read and closed again (not locked)."""
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    fd = os.open(name, flags, dir_fd=dir_fd)
    try:
        return _parse(path, None, _checked_lines(fd, owner))
    finally:
        os.close(fd)


def _journal_names(names: list[str]) -> list[str]:
    return sorted(n for n in names if n.startswith(PREFIX) and n.endswith(SUFFIX))


def _checked_lines(fd: int, owner: int) -> list[bytes]:
    """The lines of the journal open as *fd*: a regular file of *owner*
    within :data:`MAX_JOURNAL` bytes, or ValueError."""
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or st.st_uid != owner:
        raise ValueError("not a regular file of the directory's owner")
    if st.st_size > MAX_JOURNAL:
        raise ValueError(f"larger than {MAX_JOURNAL} bytes")
    with os.fdopen(os.dup(fd), "rb") as f:
        f.seek(0)  # an adopted journal is open for appending, at its end
        return f.read(MAX_JOURNAL).splitlines()


def abandoned_journals(directory: str, destination: str) -> Iterator[Journal]:
    """The journals owing copies to *destination* under *directory* that no
    process holds (their writer was killed, or let go of them), each now
    locked by this process. Anything else named like a journal (not a
    regular file of ours, too large, unreadable) is skipped with a
    warning."""
    for name in _journal_names(os.listdir(directory)):
        path = os.path.join(directory, name)
        try:
            journal = _adopt(path)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.warning("Skipping pending-copy journal %s: %s", path, exc)
            continue
        if journal is None:
            continue
        if journal.destination != destination:
            journal.release()  # another database's, sharing the directory
            continue
        yield journal


def _adopt(path: str) -> Journal | None:
    """The journal at *path*, locked, if no live process holds it."""
    flags = os.O_RDWR | os.O_APPEND | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    try:
        file = os.fdopen(os.open(path, flags), "ab")
    except FileNotFoundError:
        return None  # completed meanwhile
    try:
        try:
            fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            file.close()
            return None  # its process is alive and completing it
        if os.fstat(file.fileno()).st_nlink == 0:
            file.close()
            return None  # completed between our open and our lock
        return _parse(path, file, _checked_lines(file.fileno(), os.geteuid()))
    except BaseException:
        file.close()
        raise


def _parse(path: str, file: BinaryIO | None, lines: list[bytes]) -> Journal:
    record = json.loads(lines[0])
    journal = Journal(
        path,
        file,
        [
            PendingCopy(source, bytes.fromhex(oid), checksum, bool(staged))
            for source, oid, checksum, staged in record["copies"]
        ],
        bytes.fromhex(record["after"]),
        record["marker"],
        record["destination"],
    )
    for line in lines[1:]:
        # A line cut off by the kill recorded no tid.
        with contextlib.suppress(ValueError):
            journal.tid = bytes.fromhex(json.loads(line)["tid"])
    return journal


def find_commit(base, journal: Journal) -> bytes | None:
    """The tid under which *base* committed the transaction of *journal*
    (which recorded no tid), or None if it never committed: the transaction
    after ``journal.after`` whose extension carries the journal's marker
    (:data:`COMMIT_MARKER`)."""
    transactions = base.iterator(p64(u64(journal.after) + 1))
    try:
        for txn in transactions:
            if txn.extension.get(COMMIT_MARKER) == journal.marker:
                return txn.tid
    finally:
        if hasattr(transactions, "close"):
            transactions.close()
    return None


def _append(file: BinaryIO, record: dict) -> None:
    """Append *record* as a line of JSON to *file*, fsynced."""
    file.write(json.dumps(record).encode() + b"\n")
    file.flush()
    os.fsync(file.fileno())


def _fsync_directory(directory: str) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def iterate_unmarked(transactions: Iterable) -> Iterator:
    """*transactions* (a base's ``iterator()``) with :data:`COMMIT_MARKER`
    left out of each extension: applications, and ZODB's conformance tests,
    see the extension they committed."""
    try:
        for txn in transactions:
            txn.extension.pop(COMMIT_MARKER, None)
            yield txn
    finally:
        if hasattr(transactions, "close"):
            transactions.close()


def unmarked_log(entries: list[dict]) -> list[dict]:
    """``undoLog``/``undoInfo`` *entries* (the extension merged into each)
    without :data:`COMMIT_MARKER`."""
    for entry in entries:
        entry.pop(COMMIT_MARKER, None)
    return entries
