"""Copies a commit still owes S3 after its base's ``tpc_finish``: for a base
that learns its tid only there (ZEO's ClientStorage, see
``tids.tid_at_finish``).

Such a transaction uploads its blobs to staging keys at ``storeBlob`` (the
vote waits for them, and fails if one failed). At vote, once the base voted,
a :class:`~zodb_s3blobs.journal.Journal` records the copies still to make,
durably, in the cache directory; when the base's ``tpc_finish`` returns the
tid, the tid is appended to it before anything else, and the :class:`Copier`
makes the server-side copies to the revisions' keys in a thread, retrying
until they are done; the journal is then removed, and the staging objects
deleted. A copy whose source is gone (a HEAD answers 404 after a failed
attempt) can never be made: it is given up, with an ERROR when its target
is absent too (the revision's blob is lost). ``tpc_finish`` itself never
waits for S3. Journals left by killed processes are completed by the next
process that opens a storage on the cache directory.

Another client learns of the revision when the server commits, before the
copy lands: :func:`zodb_s3blobs.freshread.download_fresh` waits for a young
revision's object rather than report it missing.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable, Iterable

from ZODB.utils import oid_repr, tid_repr

from .journal import Journal, PendingCopy
from .keys import KeyLayout
from .objectstore import Copy, ObjectStore

log = logging.getLogger(__name__)

#: Retries of a copy wait up to this long (seconds).
_MAX_RETRY_PAUSE = 60.0
#: Seconds close() spends at most on copies still owed (then left for the
#: next start: the journals are durable).
CLOSE_DEADLINE = 30.0
_FIRST_RETRY_PAUSE = 0.5


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
        abandoned: Callable[[], Iterable[Journal]] = tuple,
    ) -> None:
        self._store = store
        self._layout = layout
        self._find_tid = find_tid
        #: Called with the staging keys of a completed journal (to delete).
        self._done = done
        #: The journals of this storage nobody holds, now locked (adopt).
        self._abandoned = abandoned
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
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(
                    target=self._run, name="zodb-s3blobs-copier", daemon=True
                )
                self._thread.start()

    def adopt(self) -> None:
        """Take on the journals nobody holds: left by killed processes, or
        released by this one when its base's tpc_finish failed."""
        for journal in self._abandoned():
            log.info("Completing the blob copies left in %s", journal.path)
            self.add(journal)

    def _snapshot(self) -> list[Journal]:
        with self._lock:
            return list(self._journals)

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
            self._forget(journal)
        return all_done

    def _forget(self, journal: Journal) -> None:
        """Remove a completed journal and delete its staging objects; a
        journal that cannot be removed is only logged (its copies are made:
        completed again, they are found landed)."""
        try:
            journal.remove()
        except OSError:
            log.error("Could not remove %s", journal.path, exc_info=True)
            journal.release()
        self._done(journal.staging_keys())

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
            try:
                self._store.transfer([], copies)
            except Exception:
                # A copy whose source is gone would fail for ever: settle it.
                journal.done.update(c for c in owed if self._settled(c, journal.tid))
                if journal.owed():
                    raise
        journal.done.update(journal.copies)

    def _landed(self, copy: PendingCopy, tid: bytes) -> bool:
        """Is the copy there already (made before a kill)? Then its source,
        a staging object, may be gone."""
        if copy.checksum is None:
            return False
        info = self._store.stat(self._layout.key(copy.oid, tid))
        return info is not None and info.checksum == copy.checksum

    def _settled(self, copy: PendingCopy, tid: bytes) -> bool:
        """After a failed attempt: can *copy* no longer be made, because its
        source is gone? Its target exists (an earlier copy landed), or is
        absent too and the revision's blob is lost, which an ERROR says."""
        target = self._layout.key(copy.oid, tid)
        if self._store.stat(target) is not None:
            return True
        if self._store.stat(copy.source) is not None:
            return False  # S3 refused the copy: retried
        log.error(
            "Blob of oid %s, transaction %s is lost: its copy's source %s is "
            "gone and %s was never written (`zodb-s3blobs verify` lists the "
            "revision as missing); the copy is given up",
            oid_repr(copy.oid),
            tid_repr(tid),
            self._store.url(copy.source),
            self._store.url(target),
        )
        return True

    def close(self) -> None:
        """Try what is owed once more, for at most :data:`CLOSE_DEADLINE`
        seconds (a journal whose copies are running then goes on to its
        end), then stop; a journal left is released for the next process that
        opens this cache directory. With S3 unreachable, a shutdown waits for
        one journal's attempt at most, not for every journal's."""
        deadline = time.monotonic() + CLOSE_DEADLINE
        with self._lock:
            self._closing = True
            self._lock.notify_all()
            thread = self._thread
        if thread is not None:
            thread.join(CLOSE_DEADLINE)
            if thread.is_alive():
                log.error(
                    "Blob copies still running after %gs at close: the "
                    "journals not being copied are left for the next start",
                    CLOSE_DEADLINE,
                )
                thread.join()  # the journal it copies: one attempt's bound
        for journal in self._snapshot():
            if time.monotonic() > deadline:
                break
            self.complete([journal])
        with self._lock:
            left, self._journals = self._journals, []
        for journal in left:
            log.warning(
                "Blob copies of %s left for the next start: %s",
                tid_repr(journal.tid) if journal.tid else "a transaction",
                journal.path,
            )
            journal.release()
