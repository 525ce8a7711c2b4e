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
One without a tid (the process died inside the base's ``tpc_finish``) is
resolved by asking the base which transaction, after the last one the
voting process had seen, stored the journal's oids with its user and
description (:func:`find_commit`); none means the transaction never
committed.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import stat
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field

from ZODB.POSException import POSKeyError
from ZODB.utils import p64, u64

log = logging.getLogger(__name__)

PREFIX, SUFFIX = "pending-", ".journal"
#: The directory of the cache directory that holds the journals: private,
#: and trusted when the cache opens.
JOURNAL_DIR = "locks"
#: A journal is never larger than this (a transaction of 100 000 blobs).
MAX_JOURNAL = 64 << 20


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
    fd: int
    copies: list[PendingCopy]
    #: The last transaction the voting process had seen: the commit is later.
    after: bytes
    user: str
    description: str
    tid: bytes | None = None
    #: Copies made already (by this process, since it took the journal).
    done: set[PendingCopy] = field(default_factory=set)

    @classmethod
    def create(
        cls,
        directory: str,
        copies: list[PendingCopy],
        after: bytes,
        user: str,
        description: str,
    ) -> Journal:
        """Write a journal under *directory*: complete, fsynced and locked
        before it appears under its name. Raises OSError."""
        record = {
            "after": after.hex(),
            "user": user,
            "description": description,
            "copies": [[c.source, c.oid.hex(), c.checksum, c.staged] for c in copies],
        }
        fd, new = tempfile.mkstemp(dir=directory, prefix=PREFIX, suffix=".new")
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            _write_all(fd, json.dumps(record).encode() + b"\n")
            os.fsync(fd)
            path = new[: -len(".new")] + SUFFIX
            os.replace(new, path)
            _fsync_directory(directory)
        except BaseException:
            os.close(fd)
            with contextlib.suppress(OSError):
                os.remove(new)
            raise
        return cls(path, fd, copies, after, user, description)

    def record_tid(self, tid: bytes) -> None:
        """Append the committed tid, fsynced. Raises OSError."""
        self.tid = tid
        _write_all(self.fd, json.dumps({"tid": tid.hex()}).encode() + b"\n")
        os.fsync(self.fd)

    def remove(self) -> None:
        """Remove the journal (its copies are done, or were never owed)."""
        with contextlib.suppress(FileNotFoundError):
            os.remove(self.path)
        _fsync_directory(os.path.dirname(self.path))
        self.release()

    def release(self) -> None:
        """Let go of the journal, leaving it for a later process to complete."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def owed(self) -> list[PendingCopy]:
        return [c for c in self.copies if c not in self.done]

    def staging_keys(self) -> list[str]:
        return [c.source for c in self.copies if c.staged]


@dataclass(frozen=True)
class Owed:
    """What the journals under a directory owe, as read at one moment."""

    journals: int = 0
    copies: int = 0
    #: Their staging objects: the collector must keep them, whatever their age.
    staging_keys: frozenset[str] = frozenset()


def owed_copies(directory: str) -> Owed:
    """The copies owed by every journal under *directory*, whether a live
    process holds it or its writer was killed, read without adopting any:
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
                journals.append(_read(path, name, dir_fd, owner))
            except FileNotFoundError:
                continue  # completed meanwhile
            except (OSError, ValueError, KeyError, TypeError) as exc:
                log.warning("Skipping pending-copy journal %s: %s", path, exc)
    finally:
        os.close(dir_fd)
    return Owed(
        len(journals),
        sum(len(j.copies) for j in journals),
        frozenset(key for j in journals for key in j.staging_keys()),
    )


def _read(path: str, name: str, dir_fd: int, owner: int) -> Journal:
    """The journal *name* in *dir_fd*, read and closed again (not locked)."""
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    fd = os.open(name, flags, dir_fd=dir_fd)
    try:
        return _parse(path, -1, _checked_lines(fd, owner))
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
        return f.read(MAX_JOURNAL).splitlines()


def abandoned_journals(directory: str) -> Iterator[Journal]:
    """The journals under *directory* that no process holds (their writer
    was killed), each now locked by this process. Anything else named like a
    journal (not a regular file of ours, too large, unreadable) is skipped
    with a warning."""
    for name in _journal_names(os.listdir(directory)):
        path = os.path.join(directory, name)
        try:
            journal = _adopt(path)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.warning("Skipping pending-copy journal %s: %s", path, exc)
            continue
        if journal is not None:
            yield journal


def _adopt(path: str) -> Journal | None:
    """The journal at *path*, locked, if no live process holds it."""
    flags = os.O_RDWR | os.O_APPEND | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        return None  # completed meanwhile
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None  # its process is alive and completing it
        if os.fstat(fd).st_nlink == 0:
            os.close(fd)
            return None  # completed between our open and our lock
        journal = _parse(path, fd, _checked_lines(fd, os.geteuid()))
    except BaseException:
        with contextlib.suppress(OSError):
            os.close(fd)
        raise
    return journal


def _parse(path: str, fd: int, lines: list[bytes]) -> Journal:
    record = json.loads(lines[0])
    journal = Journal(
        path,
        fd,
        [
            PendingCopy(source, bytes.fromhex(oid), checksum, bool(staged))
            for source, oid, checksum, staged in record["copies"]
        ],
        bytes.fromhex(record["after"]),
        record["user"],
        record["description"],
    )
    for line in lines[1:]:
        # A line cut off by the kill recorded no tid.
        with contextlib.suppress(ValueError):
            journal.tid = bytes.fromhex(json.loads(line)["tid"])
    return journal


def find_commit(base, journal: Journal) -> bytes | None:
    """The tid under which *base* committed the transaction of *journal*
    (which recorded no tid), or None if it never committed.

    The transaction is later than ``journal.after``, stored every oid of the
    journal and carries its user and description. A new oid (allocated for
    this transaction alone) that the base cannot load shows at once that it
    did not commit; otherwise the transactions after ``journal.after`` are
    read until one matches.
    """
    oids = {c.oid for c in journal.copies}
    for oid in oids:
        try:
            base.load(oid)
        except POSKeyError:
            return None  # created by this transaction, which never committed
    transactions = base.iterator(p64(u64(journal.after) + 1))
    try:
        for txn in transactions:
            if (
                metadata_text(txn.user) == journal.user
                and metadata_text(txn.description) == journal.description
                and oids <= {record.oid for record in txn}
            ):
                return txn.tid
    finally:
        if hasattr(transactions, "close"):
            transactions.close()
    return None


def metadata_text(value: str | bytes) -> str:
    """Transaction metadata as text (ZODB gives bytes or str)."""
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else value


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _fsync_directory(directory: str) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
