"""What the torture test (tests/torture.py) shares with its child processes,
and the child worker itself.

The shared part: blob contents generated from a label (so that a child and
the parent agree on bytes without sending them through a pipe), their digests,
a MappingStorage whose clock runs behind its last tid, and
:class:`ObservedS3BlobStorage`, which tells the caller the tid its commit got
and can hold a commit between vote and finish.

The worker: ``python torturechild.py JOB.json`` opens ``<s3blobstorage>``'s
Python equivalent around a RelStorage or ZEO client base named by ZConfig
text, keeps one connection, and answers one JSON request a line (see
:class:`Worker`). It imports no test server code, so it starts fast.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import sys
import threading
import time
import traceback
from collections.abc import Callable

import transaction
import ZODB
import ZODB.utils
from persistent.TimeStamp import TimeStamp
from ZODB.MappingStorage import MappingStorage
from ZODB.POSException import ConflictError, POSError, POSKeyError

from zodb_s3blobs import S3BlobStorage
from zodb_s3blobs.errors import BlobReadError, ObjectStoreError, S3BlobStorageError
from zodb_s3blobs.revisions import current_view, revision_exists
from zodb_s3blobs.settings import S3Settings

#: How long a child holds a commit between vote and finish before giving up
#: (the parent either kills it or lets it go long before).
PAUSE_LIMIT = 300.0


# -- contents ---------------------------------------------------------------


def blob_bytes(label: str, size: int) -> bytes:
    """*size* pseudo-random bytes determined by *label*: the parent and the
    children regenerate the same bytes instead of shipping them."""
    return random.Random(label).randbytes(size)


def fingerprint(data: bytes) -> tuple[int, str]:
    """(length, sha256 hex) of *data*: what the model keeps of a revision."""
    return len(data), hashlib.sha256(data).hexdigest()


# -- a base whose clock is behind -------------------------------------------


class LaggingMappingStorage(MappingStorage):
    """A MappingStorage whose clock is behind its last tid (stuck in 2000).

    ``MappingStorage.tpc_begin`` takes ``newTid(last committed tid)``: the
    current time, or one more than the last tid when the clock is behind it.
    With the clock behind, a transaction begun after an abort gets the very
    tid the aborted one had, the situation in which an abort's late DELETE
    hits the next transaction's objects. ``clock_behind`` switches it; only
    this storage's time source changes. :meth:`reopen` lets a test "restart"
    a process on the same in-memory data after ``close``.
    """

    clock_behind = True

    def tpc_begin(self, transaction, tid=None):
        """MappingStorage.tpc_begin, with the lagging clock when no tid is
        given (the lock dance is MappingStorage's own)."""
        if tid is not None or not self.clock_behind:
            return super().tpc_begin(transaction, tid)
        with self._lock:
            ZODB.utils.check_precondition(self.opened)
            if transaction is self._transaction:
                raise ZODB.POSException.StorageTransactionError(
                    "Duplicate tpc_begin calls for same transaction"
                )
        self._commit_lock.acquire()
        with self._lock:
            self._transaction = transaction
            self._tdata = {}
            old = self._transactions.maxKey() if self._transactions else None
            self._tid = _lagging_new_tid(old)

    def reopen(self) -> None:
        """Open again after close: the data never left memory."""
        self._opened = True


#: The lagging clock's time: always behind the last tid once one exists, so
#: every new tid is the last committed tid plus one.
LAGGING_CLOCK = TimeStamp(2000, 1, 1, 0, 0, 0.0)


def _lagging_new_tid(old: bytes | None) -> bytes:
    """``ZODB.utils.newTid`` with a clock stuck behind every tid: the first
    tid is the clock's, each later one the last committed tid plus one."""
    if old is None:
        return LAGGING_CLOCK.raw()
    return LAGGING_CLOCK.laterThan(TimeStamp(old)).raw()


# -- the observed storage ---------------------------------------------------

#: Per thread: a callable the committing thread sets to learn its tid. It is
#: called with the tid by the base's tpc_finish, under the base's commit lock,
#: so the model records commits in the order the base makes them.
on_commit = threading.local()
#: Per process: a callable ``hold(storage, transaction)`` run before
#: tpc_finish (after vote) when set; the kill tests pause there.
before_finish: list[Callable] = []


class ObservedS3BlobStorage(S3BlobStorage):
    """S3BlobStorage that reports each commit's tid to the committing thread
    (through :data:`on_commit`) and can be held between vote and finish
    (through :data:`before_finish`). Nothing else differs; MVCC instances
    are of this class too (``new_instance`` uses ``type(self)``)."""

    def tpc_finish(self, transaction, func=lambda tid: None):
        """Run the hold hooks, then finish, reporting the tid under the lock."""
        for hold in list(before_finish):
            hold(self, transaction)
        callback = getattr(on_commit, "callback", None)

        def observed(tid):
            func(tid)
            if callback is not None:
                callback(tid)

        return super().tpc_finish(transaction, observed)


#: Seconds within which a used cache file is not evicted: short, so that
#: files age out within a seed, yet far above the moment between a fetch and
#: ZODB opening the path, which the minimum age protects.
CACHE_MIN_AGE = 2.0


def open_storage(
    base,
    settings: S3Settings,
    cache_dir: str,
    cache_size: int,
    fast_stream: int,
    fallback_blob_dir: str | None = None,
) -> ObservedS3BlobStorage:
    """The storage under test, with the settings the torture test changes: a
    tiny *cache_size* and a cache minimum age of :data:`CACHE_MIN_AGE` seconds
    (so eviction runs all the time within a seed lasting seconds; the default
    minute is tested in test_cache.py), and the ObjectStore's ``fast_stream``
    (how fast a first part must arrive for a download to stream to the end;
    set higher than any loopback transfer, every download above the part size
    fetches the rest in parallel ranged GETs, the path whose failures are the
    hardest to get right). A legacy site's old blobs are read from
    *fallback_blob_dir*, if given."""
    storage = ObservedS3BlobStorage(
        base,
        settings,
        cache_dir,
        cache_size=cache_size,
        cache_min_age=CACHE_MIN_AGE,
        fallback_blob_dir=fallback_blob_dir,
    )
    storage._store.fast_stream = fast_stream
    return storage


#: The storage that answers "does the base still hold this revision?" when
#: the storage under test cannot: RelStorage's ``loadSerial`` answers from its
#: local cache first, even for a revision another process has since packed
#: away (relstorage/storage/load.py says so), so on RelStorage the oracle is a
#: second RelStorage on the same database with its local cache off.
ORACLE: list = []


def open_oracle(section: str) -> None:
    """Open the RelStorage oracle for the ``<relstorage>`` *section*."""
    import ZODB.config

    uncached = section.replace("<relstorage>", "<relstorage>\n  cache-local-mb 0", 1)
    ORACLE.append(ZODB.config.storageFromString(uncached))


def close_oracle() -> None:
    while ORACLE:
        ORACLE.pop().close()


def held_view(storage):
    """A current view of the database: the oracle's, or the base's."""
    return current_view(ORACLE[0] if ORACLE else storage._base)


def held(storage, oid: bytes, tid: bytes) -> bool:
    """Does the base still hold revision (oid, tid)? Asked of a current view,
    so an MVCC base answers from its latest commit (and RelStorage from its
    database, through the oracle)."""
    with held_view(storage) as view:
        return revision_exists(view, oid, tid)


def read_revision(storage, oid: bytes, tid: bytes) -> bytes:
    """The bytes of committed revision (oid, tid), through the storage."""
    with storage.openCommittedBlobFile(oid, tid) as f:
        return f.read()


#: The errors a read may fail with while S3 misbehaves (never a wrong answer);
#: with the faults off, a violation.
READ_ERRORS = (BlobReadError, ObjectStoreError)
#: The errors a read of a revision the base no longer holds may fail with
#: (the storage raises a ReadConflictError when a pack removed it after the
#: reader loaded it); a violation for a revision the base holds.
GONE_ERRORS = (POSKeyError, ConflictError)


def describe(exc: BaseException) -> str:
    """``Type: message`` of an exception, even if its ``str()`` fails."""
    try:
        text = str(exc)
    except Exception as failure:
        text = f"<str() of the error fails: {type(failure).__name__}: {failure}>"
    return f"{type(exc).__name__}: {text}"


def unprintable(exc: BaseException) -> str | None:
    """A violation if the error cannot be printed (a log or an error page
    showing it would fail in turn): an error must be clear."""
    try:
        str(exc)
    except Exception as failure:
        return (
            f"{type(exc).__name__} raised by a read cannot be printed: str() "
            f"fails with {type(failure).__name__}: {failure}"
        )
    return None


def check_read(
    storage, oid: bytes, tid: bytes, expected: tuple[int, str], strict: bool
) -> str | None:
    """Read (oid, tid) and compare with *expected*; return a violation, or None.

    A POSKeyError is a violation if the base still holds the revision (asked
    after the error: packs only remove). Other clear errors are allowed unless
    *strict* (faults off); any other exception is a violation.
    """
    name = f"{oid.hex()}/{tid.hex()}"
    try:
        data = read_revision(storage, oid, tid)
    except GONE_ERRORS as exc:
        if held(storage, oid, tid):
            return f"read {name}: {describe(exc)} for a revision the base holds"
        return unprintable(exc)
    except S3BlobStorageError as exc:
        if strict or not isinstance(exc, READ_ERRORS):
            return f"read {name} with faults off: {describe(exc)}"
        return unprintable(exc)
    except Exception as exc:
        return f"read {name}: unexpected {describe(exc)}"
    got = fingerprint(data)
    if got != tuple(expected):
        return (
            f"read {name}: WRONG CONTENT: {got[0]} bytes sha256 {got[1][:16]}, "
            f"expected {expected[0]} bytes sha256 {expected[1][:16]}"
        )
    return None


def record_staging_keys(storage, log_path: str) -> None:
    """Make *storage* append every staging key it names to *log_path* before
    any upload to it starts (flushed: a SIGKILL loses nothing written), so
    that a staging object a killed process left is known to be its own."""
    layout = storage._layout
    name_key = layout.staging_key
    log = open(log_path, "a")  # noqa: SIM115 -- open for the process's life

    def staging_key() -> str:
        key = name_key()
        log.write(key + "\n")
        log.flush()
        return key

    layout.staging_key = staging_key


# -- the child worker -------------------------------------------------------


class Worker:
    """One child process: a database on a RelStorage or ZEO client base, one
    connection, and the requests the parent sends (one method each)."""

    def __init__(self, job: dict) -> None:
        import ZODB.config

        self.job = job
        base = ZODB.config.storageFromString(job["section"])
        self.storage = open_storage(
            base,
            S3Settings(**job["settings"]),
            job["cache_dir"],
            job["cache_size"],
            job["fast_stream"],
        )
        if job.get("staging_log"):
            record_staging_keys(self.storage, job["staging_log"])
        self.db = ZODB.DB(self.storage)
        if job["oracle"]:
            open_oracle(job["section"])
        self.tm = transaction.TransactionManager()
        self.conn = self.db.open(self.tm)
        self.namespace = job["namespace"]

    def commit(self, writes: list, pause: bool = False, fail_after_vote=False):
        """Write blobs of this child's namespace; with *pause*, hold between
        vote and finish until the parent creates the ``go`` file (or kills us).
        Returns the committed revisions as [oid, tid, size, sha256]."""
        from ZODB.blob import Blob

        self.tm.begin()
        mapping = self.conn.root()[self.namespace]
        contents, based_on = {}, []
        for write in writes:
            blob = mapping.get(write["name"])
            if blob is None:
                blob = mapping[write["name"]] = Blob()
            piece = blob_bytes(write["label"], write["size"])
            old = contents.get(id(blob), (blob, None))[1]
            if write["mode"] == "a":
                if old is None and blob._p_oid is not None:
                    with blob.open("r") as f:
                        old = f.read()
                    based_on.append(
                        [blob._p_oid.hex(), blob._p_serial.hex(), *fingerprint(old)]
                    )
                new = (old or b"") + piece
                with blob.open("a") as f:
                    f.write(piece)
            else:
                new = piece
                with blob.open("w") as f:
                    f.write(piece)
            contents[id(blob)] = (blob, new)
        if fail_after_vote:
            self.tm.get().join(FailAfterVote())
        committed = []
        on_commit.callback = committed.append
        hook = self._pause if pause else None
        if hook:
            before_finish.append(hook)
        try:
            self.tm.commit()
        finally:
            on_commit.callback = None
            if hook:
                before_finish.remove(hook)
        (tid,) = committed
        return {
            "revisions": [
                [blob._p_oid.hex(), tid.hex(), *fingerprint(data)]
                for blob, data in contents.values()
            ],
            "based_on": based_on,
        }

    def _pause(self, storage, txn) -> None:
        commit = storage._commit
        keys = commit.attempted_keys + commit.staging_keys if commit else []
        pause_dir = self.job["pause_dir"]
        marker = os.path.join(pause_dir, "voted")
        with open(marker + ".tmp", "w") as f:
            json.dump(keys, f)
        os.replace(marker + ".tmp", marker)
        go = os.path.join(pause_dir, "go")
        deadline = time.monotonic() + PAUSE_LIMIT
        while not os.path.exists(go) and time.monotonic() < deadline:
            time.sleep(0.01)
        with contextlib.suppress(FileNotFoundError):
            os.remove(go)

    def read(self, revisions: list, strict: bool) -> dict:
        """Read revisions [oid, tid, size, sha256]; report violations."""
        wrong = []
        for oid, tid, size, sha in revisions:
            problem = check_read(
                self.storage,
                bytes.fromhex(oid),
                bytes.fromhex(tid),
                (size, sha),
                strict,
            )
            if problem:
                wrong.append(problem)
        return {"wrong": wrong}

    def read_namespace(self, strict: bool) -> dict:
        """Load every blob of this child's namespace through the connection
        (lazily), open a random half: what was read, as [oid, tid, size, sha]."""
        self.tm.begin()
        read, wrong = [], []
        rng = random.Random()
        for blob in list(self.conn.root()[self.namespace].values()):
            blob._p_activate()
            if rng.random() < 0.5:
                continue
            try:
                with blob.open("r") as f:
                    data = f.read()
            except (POSError, *READ_ERRORS) as exc:
                if strict:
                    wrong.append(f"read_namespace: {type(exc).__name__}: {exc}")
                continue
            read.append([blob._p_oid.hex(), blob._p_serial.hex(), *fingerprint(data)])
        self.tm.abort()
        return {"read": read, "wrong": wrong}

    def gc(self) -> dict:
        report = self.storage.collect_orphans()
        return {"deleted": report.deleted}

    def pack(self) -> dict:
        self.db.pack()
        return {}

    def evict(self) -> dict:
        return {"freed": self.storage._cache.evict(0)}

    def close(self) -> None:
        self.db.close()
        close_oracle()


class FailAfterVote:
    """A data manager that votes after the storages (it sorts last) and fails:
    the storage has uploaded its blobs and must delete them in tpc_abort."""

    def sortKey(self) -> str:
        return "\uffff fail after vote"

    def tpc_vote(self, transaction) -> None:
        raise VoteRefused("refused by the torture test after the storage voted")

    def abort(self, transaction) -> None:
        """Nothing to undo: this data manager holds no data."""

    tpc_begin = commit = tpc_finish = tpc_abort = abort


class VoteRefused(POSError):
    """Raised by :class:`FailAfterVote`."""


def serve(job_path: str) -> None:
    """Answer requests from stdin until ``quit`` or end of input."""
    replies = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # a library's print must not corrupt the answers
    with open(job_path) as f:
        worker = Worker(json.load(f))

    def answer(reply: dict) -> None:
        replies.write(json.dumps(reply) + "\n")
        replies.flush()

    answer({"ready": os.getpid()})
    for line in sys.stdin:
        request = json.loads(line)
        op = request.pop("op")
        if op == "quit":
            break
        try:
            answer({"ok": getattr(worker, op)(**request)})
        except Exception as exc:
            with contextlib.suppress(Exception):
                worker.tm.abort()
            answer(
                {
                    "error": f"{type(exc).__module__}.{type(exc).__name__}",
                    "message": str(exc)[:2000],
                    "traceback": traceback.format_exc()[-4000:],
                }
            )
    worker.close()


if __name__ == "__main__":
    serve(sys.argv[1])
