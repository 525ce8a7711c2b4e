"""Copies a commit still owes S3 after its base's ``tpc_finish``: for a base
that learns its tid only there (ZEO's ClientStorage, see ``tids.tid_at_finish``).

Such a transaction uploads its blobs to staging keys at ``storeBlob`` (the
vote waits for them, and fails if one failed). At vote, once the base voted,
a *journal* records the copies still to make -- staging key, oid, CRC32 --
in a file under the cache's private ``locks/`` (not ``tmp/``, which ZODB
lists as the storage's temporary directory), written and fsynced before it
appears under its name (``pending-*.journal``), and locked (``flock``) by
its process for as long as it is pending. When the base's ``tpc_finish``
returns the tid, the tid is appended to the journal (fsynced) before
anything else, and the :class:`Copier` makes the server-side copies to the
revisions' keys in a thread, retrying until they are done; the journal is
then removed, and the staging objects deleted. ``tpc_finish`` itself never
waits for S3.

A journal nobody holds locked was left by a killed process: whichever
process next opens a storage on the cache directory adopts and completes
it. One without a tid (the process died inside the base's ``tpc_finish``)
is resolved by asking the base which transaction, after the last one the
voting process had seen, stored the journal's oids with its user and
description (:func:`find_commit`); none means the transaction never
committed, and its staging objects are deleted.

Another client learns of the revision when the server commits, before the
copy lands: :func:`download_fresh` waits for a young revision's object
rather than report it missing.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import random
import stat
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import BinaryIO

from ZODB.POSException import POSKeyError
from ZODB.utils import p64, tid_repr, u64

from .errors import ObjectNotFound
from .gc import tid_time
from .keys import KeyLayout
from .objectstore import Copy, ObjectStore

log = logging.getLogger(__name__)

PREFIX, SUFFIX = "pending-", ".journal"
#: The directory of the cache directory that holds the journals: private,
#: and trusted when the cache opens.
JOURNAL_DIR = "locks"
#: A journal is never larger than this (a transaction of 100 000 blobs).
MAX_JOURNAL = 64 << 20
#: A revision younger than this (by its tid's timestamp) whose object S3 does
#: not have yet may be waiting for its writer's copy: readers wait for it.
FRESH = 600.0
#: Retries of a copy wait up to this long (seconds).
_MAX_RETRY_PAUSE = 60.0
_FIRST_RETRY_PAUSE = 0.5


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


def abandoned_journals(directory: str) -> Iterator[Journal]:
    """The journals under *directory* that no process holds (their writer
    was killed), each now locked by this process. Anything else named like a
    journal (not a regular file of ours, too large, unreadable) is skipped
    with a warning."""
    for name in sorted(os.listdir(directory)):
        if not (name.startswith(PREFIX) and name.endswith(SUFFIX)):
            continue
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
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid():
            raise ValueError("not a regular file of this user")
        if st.st_size > MAX_JOURNAL:
            raise ValueError(f"larger than {MAX_JOURNAL} bytes")
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None  # its process is alive and completing it
        if os.fstat(fd).st_nlink == 0:
            os.close(fd)
            return None  # completed between our open and our lock
        with os.fdopen(os.dup(fd), "rb") as f:
            lines = f.read(MAX_JOURNAL).splitlines()
        journal = _parse(path, fd, lines)
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
                text(txn.user) == journal.user
                and text(txn.description) == journal.description
                and oids <= {record.oid for record in txn}
            ):
                return txn.tid
    finally:
        if hasattr(transactions, "close"):
            transactions.close()
    return None


def text(value: str | bytes) -> str:
    """Transaction metadata as text (ZODB gives bytes or str)."""
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else value


class Copier:
    """Makes the copies of journals in a thread of its own, with retries,
    until each journal is done; the thread runs while there is work and
    ends at :meth:`close`."""

    def __init__(
        self,
        store: ObjectStore,
        layout: KeyLayout,
        find_tid: Callable[[Journal], bytes | None],
        done: Callable[[list[str]], None],
    ) -> None:
        self._store = store
        self._layout = layout
        self._find_tid = find_tid
        #: Called with the staging keys of a completed journal (to delete).
        self._done = done
        self._journals: list[Journal] = []
        self._lock = threading.Condition()
        self._closing = False
        self._thread: threading.Thread | None = None
        self._attempt = 0

    def add(self, journal: Journal) -> None:
        with self._lock:
            if self._closing:
                journal.release()  # for the next process to complete
                return
            self._journals.append(journal)
            self._lock.notify()
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="zodb-s3blobs-copier", daemon=True
                )
                self._thread.start()

    def staging_keys(self) -> set[str]:
        """The staging keys whose copies are still owed (never collected)."""
        with self._lock:
            return {key for j in self._journals for key in j.staging_keys()}

    def pending(self) -> int:
        with self._lock:
            return len(self._journals)

    def _run(self) -> None:
        while True:
            with self._lock:
                if not self._journals or self._closing:
                    self._thread = None
                    return
                journals = list(self._journals)
            if self.complete(journals):
                self._attempt = 0
                continue
            self._attempt += 1
            pause = random.uniform(
                0, min(_MAX_RETRY_PAUSE, _FIRST_RETRY_PAUSE * 2**self._attempt)
            )
            with self._lock:
                self._lock.wait_for(lambda: self._closing, pause)

    def complete(self, journals: list[Journal]) -> bool:
        """Try each of *journals* once; True if all of them are done."""
        all_done = True
        for journal in journals:
            try:
                self._complete(journal)
            except Exception as exc:
                all_done = False
                log.warning(
                    "Blob copies of transaction %s not made yet (retrying): %s",
                    tid_repr(journal.tid) if journal.tid else "(unknown tid)",
                    exc,
                )
                continue
            with self._lock:
                self._journals.remove(journal)
            journal.remove()
            self._done(journal.staging_keys())
        return all_done

    def _complete(self, journal: Journal) -> None:
        if journal.tid is None:
            tid = self._find_tid(journal)
            if tid is None:
                log.warning(
                    "Transaction with pending blob copies %s never committed",
                    journal.path,
                )
                return
            journal.record_tid(tid)
        owed = [c for c in journal.owed() if not self._landed(c, journal.tid)]
        copies = [
            Copy(c.source, self._layout.key(c.oid, journal.tid), c.checksum)
            for c in owed
        ]
        if copies:
            self._store.transfer([], copies)
        journal.done.update(journal.copies)

    def _landed(self, copy: PendingCopy, tid: bytes) -> bool:
        """Is the copy there already (made before a kill)? Then its source,
        a staging object, may be gone."""
        if copy.checksum is None:
            return False
        info = self._store.stat(self._layout.key(copy.oid, tid))
        return info is not None and info.checksum == copy.checksum

    def close(self) -> None:
        """Try what is owed once more, then stop; a journal left is
        released for the next process that opens this cache directory."""
        with self._lock:
            self._closing = True
            self._lock.notify_all()
            thread = self._thread
        if thread is not None:
            thread.join()
        with self._lock:
            journals = list(self._journals)
        self.complete(journals)
        with self._lock:
            left, self._journals = self._journals, []
        for journal in left:
            log.warning(
                "Blob copies of %s left for the next start: %s",
                tid_repr(journal.tid) if journal.tid else "a transaction",
                journal.path,
            )
            journal.release()


def download_fresh(store: ObjectStore, key: str, serial: bytes, out: BinaryIO) -> int:
    """Download *key* into *out*; a 404 for a revision committed within
    :data:`FRESH` seconds (its writer's copy may not have landed yet) is
    retried until ``s3-download-deadline`` has passed since the call."""
    deadline = time.monotonic() + store.settings.download_deadline
    attempt = 0
    while True:
        try:
            return store.download(key, out)
        except ObjectNotFound:
            attempt += 1
            pause = random.uniform(0, min(2.0, 0.05 * 2**attempt))
            if (
                tid_time(serial) < time.time() - FRESH
                or time.monotonic() + pause > deadline
            ):
                raise
            log.debug("Waiting for %s, committed %s ago", key, serial)
            time.sleep(pause)


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
