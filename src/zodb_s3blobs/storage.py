"""S3BlobStorage: a proxy storage that keeps object records in its base storage
and blob files in S3, with a local cache in front.

Modelled on ZODB's ``BlobStorage`` proxy and zc.zlibstorage's IStorageWrapper:
the base's methods are bound onto the instance, the base's interfaces are
provided, invalidations pass through, and the blob methods are overridden.

Two-phase commit: ``storeBlob`` stages the file in the cache's ``tmp/`` and
starts its upload in the background where the base has fixed the tid (on
RelStorage, a large blob goes to a staging key, see ``_stage``);
``tpc_vote`` waits for those uploads, then makes what needed the tid (the
other uploads, the copies of staged uploads and undo's copies) in parallel,
and fails the vote if any transfer fails; ``tpc_finish`` only renames staged
files into the cache and cannot fail; ``tpc_abort`` settles the uploads and
deletes every object this transaction created.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import sys
import threading
from base64 import decodebytes
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field

import zope.interface
from ZODB.blob import BlobFile, copyTransactionsFromTo, is_blob_record
from ZODB.FileStorage import FileStorage
from ZODB.interfaces import (
    IBlobStorage,
    IBlobStorageRestoreable,
    IMVCCStorage,
    IStorageRestoreable,
    IStorageWrapper,
)
from ZODB.POSException import (
    POSKeyError,
    ReadConflictError,
    StorageTransactionError,
)
from ZODB.serialize import referencesf
from ZODB.utils import oid_repr, tid_repr, z64

from . import gc, revisions, unghost, writers
from .cache import MIN_AGE, BlobCache
from .copier import Copier
from .errors import BlobReadError, ObjectNotFound, ObjectStoreError, S3BlobStorageError
from .exposition import MetricsFile
from .fallback import Fallback, not_in_either, open_fallback
from .freshread import download_fresh
from .journal import (
    JOURNAL_DIR,
    Journal,
    PendingCopy,
    abandoned_journals,
    find_commit,
    iterate_unmarked,
    mark_transaction,
    owed_copies,
    unmarked_log,
)
from .keys import KeyLayout
from .metrics import Metrics
from .objectstore import (
    Copy,
    ObjectStore,
    check_presign_arguments,
    file_crc32,
    raise_first,
    written_crc32,
)
from .parent import open_parent
from .redact import PresignedURL
from .settings import S3Settings
from .staging import PendingCommit, StagedBlob
from .tids import (
    check_supported,
    reuses_aborted_tid,
    tid_at_begin,
    tid_at_finish,
    tid_at_vote,
)

log = logging.getLogger(__name__)

DEFAULT_CACHE_SIZE = 1 << 30
#: Seconds between two writes of metrics-file.
DEFAULT_METRICS_INTERVAL = 15.0
#: How often openCommittedBlobFile reloads a file evicted before it was opened.
_OPEN_ATTEMPTS = 5

#: How many revisions found in S3 are remembered while a fallback is set.
_IN_S3_KEPT = 100_000
#: What a restored revision's key holds already (see _existing_restore_target).
_ABSENT, _SAME_BYTES, _UNCHECKED = object(), object(), object()

#: Base methods bound onto the wrapper so hot paths skip __getattr__.
_COPIED_METHODS = (
    "getName",
    "getSize",
    "history",
    "isReadOnly",
    "lastTransaction",
    "new_oid",
    "sortKey",
    "load",
    "loadBefore",
    "loadSerial",
    "store",
    "restore",
    "checkCurrentSerialInTransaction",
    "tpc_transaction",
    "supportsUndo",
    "undoLog",
    "undoInfo",
    "iterator",
    "record_iternext",
    "getTid",
    "prefetch",
    "poll_invalidations",
    "sync",
    "afterCompletion",
    "release",
    "lastInvalidations",
    "deleteObject",
)


@dataclass
class _Shared:
    """What every MVCC instance of one storage shares."""

    store: ObjectStore
    layout: KeyLayout
    cache: BlobCache
    pack_lock: threading.Lock
    download_on_unghost: bool
    metrics: Metrics
    #: Where revisions not yet in S3 are read from (see fallback.py).
    fallback: Fallback | None = None
    #: Upload what was read from the fallback to its S3 key.
    fallback_upload: bool = True
    #: Revisions a HEAD found in S3 while a fallback is configured.
    in_s3: set = field(default_factory=set)
    #: The base storage the storage was opened with (not an MVCC instance of
    #: it, which a connection may release): asked from background threads.
    base: object = None
    #: One MVCC instance of *base*, polled for each question about the
    #: database as of now (see S3BlobStorage._held_now), and its lock.
    view: object = None
    view_lock: threading.Lock = field(default_factory=threading.Lock)
    #: Makes the copies owed after tpc_finish, on a base that learns its tid
    #: only there (ZEO's ClientStorage); None on the others.
    copier: Copier | None = None
    #: Seconds an orphan is kept after it was first found (gc-retention).
    gc_retention: float = 0.0
    #: The orphans pending at the last collection: (count, bytes).
    orphans_pending: tuple[int, int] | None = None
    #: The parent bucket's store of fallback-s3-bucket (parent.py), if any.
    parent_store: ObjectStore | None = None
    #: This database's record as a writer under the prefix (writers.py).
    writer: writers.WriterRecord | None = None


class _FilesystemView:
    """The part of ZODB's ``FilesystemHelper`` that ZODB code uses on blob
    storages (``copyTransactionsFromTo`` needs ``temp_dir``), over the cache."""

    def __init__(self, cache: BlobCache) -> None:
        self.base_dir = cache.directory
        self.temp_dir = cache.temp_dir
        self.getBlobFilename = cache.path


def check_base(base) -> None:
    """Refuse, when opening, a base whose blobs would silently go elsewhere."""
    from .fallback import own_blob_dir_error

    check_supported(base)
    if isinstance(base, FileStorage) and base.blob_dir:
        raise own_blob_dir_error(base.getName(), base.blob_dir)


def _reach_bucket(store: ObjectStore, settings: S3Settings) -> None:
    """Check the bucket at open: raise for a configuration error; log one
    that may pass (S3 unreachable for now), since pages and cached blobs can
    still be served, and reads and votes fail clearly until S3 is back."""
    try:
        store.check_bucket()
        # Once the bucket answers, before any commit: the probe, if any, does
        # not delay the first vote.
        log.info("s3-conditional-writes %s", store.guard.describe())
    except ObjectStoreError as exc:
        if not exc.transient:
            raise
        log.error(
            "S3 is not reachable at %s (%s); starting anyway: blob reads "
            "that miss the cache and commits with blobs fail until it is",
            settings.endpoint_url or "AWS S3",
            exc,
        )


def _log_staging_failure(keys: list[str], done: Future | None) -> None:
    """Log staging objects left behind (*done*: their delete, if one ran)."""
    if done is not None and done.exception() is None:
        return
    log.warning(
        "Could not delete %d staging object(s); the orphan collection removes "
        "them once a day old: %s",
        len(keys),
        ", ".join(keys),
        exc_info=done and done.exception(),
    )


def _oids_stored_by(base, tid: bytes) -> list[bytes]:
    """The oids transaction *tid* stored, from the base's iterator. For undo:
    ``IStorageUndoable.undo`` may return None instead of the oids it undid
    (RelStorage does), and those are the oids the undone transaction stored."""
    transactions = base.iterator(tid, tid)
    try:
        return [record.oid for txn in transactions for record in txn]
    finally:
        if hasattr(transactions, "close"):
            transactions.close()


@zope.interface.implementer(IBlobStorage, IStorageWrapper)
class S3BlobStorage:
    """Wrap *base* so that its blobs are stored in S3 and cached in *cache_dir*.

    *download_on_unghost* makes loading a Blob object download its file at
    once, as ZODB's own storages have it on disk then; by default the download
    waits until the blob is opened or ``committed()`` is called. Eviction
    leaves files used within *cache_min_age* seconds. *cache_group* (a gid)
    may read the cached files. With *metrics_file*, this process's figures
    (:meth:`stats`) are written there every *metrics_interval* seconds,
    labelled with *metrics_database* (default: where the blobs are, e.g.
    ``s3://bucket/prefix/blobs/``; see :mod:`zodb_s3blobs.exposition`).
    *fallback_blob_dir* (a ZODB blob directory) or *fallback_blob_chunk*
    (RelStorage's ``blob_chunk`` table) is read for revisions S3 does not
    have (yet), and with *fallback_upload* what is read there is uploaded;
    so is *fallback_s3_prefix* (a parent site's prefix, in
    *fallback_s3_bucket* or the same bucket) for a copy of a site.
    Pack deletes an orphaned revision's object once it has been found
    orphaned for *gc_retention* seconds (see :mod:`zodb_s3blobs.gc`).
    """

    def __init__(
        self,
        base,
        settings: S3Settings,
        cache_dir: str,
        cache_size: int = DEFAULT_CACHE_SIZE,
        download_on_unghost: bool = False,
        cache_min_age: float = MIN_AGE,
        cache_group: int | None = None,
        metrics_file: str | None = None,
        metrics_interval: float = DEFAULT_METRICS_INTERVAL,
        metrics_database: str | None = None,
        fallback_blob_dir: str | None = None,
        fallback_blob_chunk: bool = False,
        fallback_upload: bool = True,
        gc_retention: float = gc.DEFAULT_RETENTION,
        fallback_s3_prefix: str | None = None,
        fallback_s3_bucket: str | None = None,
    ) -> None:
        check_base(base)
        gc_retention = gc.check_retention(gc_retention)
        layout = KeyLayout(settings.prefix)
        metrics = Metrics()
        # Checked before anything is created; written once the storage is set up.
        self._exporter = (
            MetricsFile(
                metrics_file,
                metrics_interval,
                self.stats,
                metrics_database or f"s3://{settings.bucket}/{layout.root}",
                os.path.abspath(cache_dir),
            )
            if metrics_file
            else None
        )
        cache = store = parent_store = None
        try:
            cache = BlobCache(
                cache_dir, cache_size, cache_min_age, cache_group, metrics
            )
            fallback = open_fallback(
                fallback_blob_dir, fallback_blob_chunk, base, cache.temp_dir
            )
            if fallback_s3_prefix is not None and fallback is not None:
                raise ValueError(
                    "fallback-s3-prefix excludes fallback-blob-dir and "
                    "fallback-blob-chunk: a revision is read from one place"
                )
            store = ObjectStore(settings, metrics)
            _reach_bucket(store, settings)
            if fallback_s3_prefix is not None:
                fallback, parent_store = open_parent(
                    settings, store, fallback_s3_prefix, fallback_s3_bucket
                )
        except BaseException:
            for part in (parent_store, store, cache, self._exporter):
                if part:
                    part.close()
            raise
        shared = _Shared(
            store,
            layout,
            cache,
            threading.Lock(),
            download_on_unghost,
            metrics,
            fallback,
            fallback_upload,
            base=base,
            gc_retention=gc_retention,
            parent_store=parent_store,
        )
        if not base.isReadOnly():
            shared.writer = writers.WriterRecord(store, layout.prefix, base)
        self._setup(base, shared, True)
        if tid_at_finish(base):
            self._start_copier()
        if self._exporter:
            self._exporter.start()

    def _start_copier(self) -> None:
        """Start copying what commits owe after tpc_finish, beginning with
        the journals killed processes left in this cache directory."""
        self._shared.copier = Copier(
            self._store,
            self._layout,
            functools.partial(find_commit, self._base),
            self._delete_staging_keys,
            functools.partial(
                abandoned_journals, self._journal_dir(), self._destination()
            ),
        )
        self._shared.copier.adopt()

    def _setup(self, base, shared: _Shared, owner: bool) -> None:
        self._base = base
        self._shared = shared
        self._store = shared.store
        self._layout = shared.layout
        self._cache = shared.cache
        self._owner = owner
        self._db = None
        self._commit: PendingCommit | None = None
        self.fshelper = _FilesystemView(shared.cache)
        for name in _COPIED_METHODS:
            method = getattr(base, name, None)
            if method is not None:
                setattr(self, name, method)
        if tid_at_finish(base):
            # Its transactions carry the journals' commit marker: not shown.
            self.iterator = lambda *a, **k: iterate_unmarked(base.iterator(*a, **k))
            self.undoLog = lambda *a, **k: unmarked_log(base.undoLog(*a, **k))
            self.undoInfo = lambda *a, **k: unmarked_log(base.undoInfo(*a, **k))
        provided = [zope.interface.providedBy(base), IBlobStorage, IStorageWrapper]
        if IStorageRestoreable.providedBy(base):
            provided.append(IBlobStorageRestoreable)
        zope.interface.directlyProvides(self, *provided)
        base.registerDB(self)
        # RelStorage.registerDB sets wrapper.copyTransactionsFrom to its own,
        # which restores blobs into RelStorage's blob-dir; ours puts them in S3.
        self.__dict__.pop("copyTransactionsFrom", None)

    def __getattr__(self, name: str):
        return getattr(self._base, name)

    def __len__(self) -> int:
        return len(self._base)

    def __repr__(self) -> str:
        return (
            f"<S3BlobStorage {self._store.url(self._layout.root)} "
            f"around {self._base!r}>"
        )

    def stats(self) -> dict:
        """This storage's figures since it opened (shared by its MVCC
        instances), under the stable names of :mod:`zodb_s3blobs.metrics`
        (docs/metrics.md): counters, the S3 request histogram, the bytes in
        the cache directory (all processes; None while its index is built)
        and the files there."""
        pending = self._shared.orphans_pending
        return {
            **self._shared.metrics.snapshot(),
            "cache_bytes": self._cache.recorded_bytes(),
            "cache_files": self._cache.indexed_files(),
            "orphans_pending": pending and pending[0],
            "orphans_pending_bytes": pending and pending[1],
        }

    # -- IStorageWrapper: pass the base's calls up to the database ---------

    def registerDB(self, db) -> None:
        self._db = db

    def invalidate(self, transaction_id, oids, version=""):
        if self._db is not None:
            self._db.invalidate(transaction_id, oids)

    def invalidateCache(self):
        if self._db is not None:
            self._db.invalidateCache()

    def references(self, record, oids=None):
        if self._db is not None:
            return self._db.references(record, oids)
        return referencesf(record, oids)

    def transform_record_data(self, data):
        if self._db is not None:
            return self._db.transform_record_data(data)
        return data

    def untransform_record_data(self, data):
        if self._db is not None:
            return self._db.untransform_record_data(data)
        return data

    # -- IMVCCStorage (when the base provides it) ---------------------------

    def new_instance(self) -> S3BlobStorage:
        instance = type(self).__new__(type(self))
        instance._setup(self._base.new_instance(), self._shared, False)
        instance._db = self._db
        return instance

    # -- IBlobStorage --------------------------------------------------------

    def temporaryDirectory(self) -> str:
        # Blob.open('r+'/'a') is about to copy the committed file by path.
        # Fetch it (a lazily loaded blob's file is not cached yet), or mark it
        # used if it is, in whatever mode: eviction then keeps it for
        # cache-min-age, while ZODB's copy runs (a copy that found no file
        # would leave an empty working file, see cache.MIN_AGE). Only a
        # committed revision: after a savepoint _p_blob_committed is the
        # savepoint's file (a new blob's serial is z64), copied from disk.
        blob = unghost.blob_about_to_copy(sys._getframe(1))
        if blob is not None and blob._p_blob_committed == self._cache.path(
            blob._p_oid, blob._p_serial
        ):
            self.loadBlob(blob._p_oid, blob._p_serial)
        return self._cache.temp_dir

    def storeBlob(self, oid, oldserial, data, blobfilename, version, transaction):
        assert not version, "Versions aren't supported."
        self._base.store(oid, oldserial, data, "", transaction)
        self._stage(transaction, StagedBlob(oid, self._cache.take(blobfilename)))

    def restoreBlob(self, oid, serial, data, blobfilename, prev_txn, transaction):
        self._base.restore(oid, serial, data, "", prev_txn, transaction)
        self._stage(
            transaction, StagedBlob(oid, self._cache.take(blobfilename), serial)
        )

    def _stage(self, transaction, blob: StagedBlob) -> None:
        """Stage *blob* and start its upload now, in the background, where its
        key allows: a restored revision's key is known; so is a new one's when
        the base fixed the tid in tpc_begin. On a base that chooses the tid at
        vote (RelStorage, under its commit lock), a transaction uploads at
        most ``s3-staged-copy-threshold`` bytes under the lock, in PUTs of
        blobs smaller than that; every other blob goes to a staging key now
        and is copied to its revision's key at vote."""
        commit = self._pending(transaction)
        commit.stage(blob)
        if blob.tid is not None:
            key = self._layout.key(blob.oid, blob.tid)
            # Without a tid before vote, a base restoring has locked its
            # database in tpc_begin already (RelStorage): the lock waits.
            urgent = commit.tid is None
            upload = self._store.submit(
                self._upload_restored, blob, key, urgent, urgent=urgent
            )
        elif commit.tid is not None:
            key = self._layout.key(blob.oid, commit.tid)
            # A blob stored again in this transaction replaces the object the
            # first one's upload wrote (conditional writes would refuse it).
            replace = key in commit.attempted_keys
            upload = self._store.submit(
                self._store.upload, blob.path, key, False, replace
            )
        elif self._shared.copier is None and commit.upload_at_vote(
            os.path.getsize(blob.path), self._store.settings.staged_copy_threshold
        ):
            return
        else:
            key = self._layout.staging_key()
            blob.staged = True
            if self._shared.copier is not None:
                # Copied after the commit, by the copier, which asks S3 for
                # the size itself: a HEAD now would only delay the vote.
                upload = self._store.submit(self._store.upload, blob.path, key)
            else:
                upload = self._store.submit(self._upload_staged, blob, key)
        # Only once submitted: a blob with an upload key counts as uploaded.
        blob.upload_key, blob.upload = key, upload

    def _upload_restored(self, blob: StagedBlob, key: str, urgent: bool) -> str | None:
        """Upload a restored revision unless its key holds these bytes already
        (see _existing_restore_target); return the CRC32 recorded, if any."""
        # Until a HEAD tells the key was free, an abort must not delete it: it
        # may hold the revision already (a repeated zodbconvert).
        blob.preexisting = True
        existing = self._existing_restore_target(key, blob.path)
        if existing is _SAME_BYTES:
            return None
        if existing is _ABSENT:
            blob.preexisting = False
        # Only bytes without a CRC32 (1.x) are written over, to record one.
        return self._store.upload(
            blob.path, key, urgent, replace=existing is _UNCHECKED
        )

    def _upload_staged(self, blob: StagedBlob, key: str) -> str:
        """Upload to a staging key; return the CRC32 recorded. Its size and
        ETag, learned now, before any lock, spare the copy a HEAD under it."""
        crc = self._store.upload(blob.path, key)
        try:
            blob.source_info = self._store.stat(key)
        except ObjectStoreError:
            blob.source_info = None  # the copy asks itself
        return crc

    def loadBlob(self, oid: bytes, serial: bytes) -> str:
        """Return the path of the cached, read-only file of this blob revision,
        downloading it if it is not cached; when ZODB merely loads a Blob object,
        return the path and download later (see :mod:`zodb_s3blobs.unghost`)."""
        if not self._shared.download_on_unghost and unghost.called_by_setstate(
            sys._getframe(1)
        ):
            self._shared.metrics.unghosted_lazily(oid, serial)
            return self._cache.path(oid, serial)
        self._shared.metrics.opened(oid, serial)
        key = self._layout.key(oid, serial)
        from_fallback: list[tuple[int, str]] = []
        try:
            path = self._cache.fetch(
                oid,
                serial,
                lambda out: self._download(oid, serial, key, out, from_fallback),
            )
        except ObjectNotFound as exc:
            fallback = self._shared.fallback
            raise POSKeyError(
                not_in_either(exc.key, fallback, oid, serial)
                if fallback
                else f"No blob file: {exc.key} does not exist",
                oid,
                serial,
            ) from exc
        except S3BlobStorageError as exc:  # S3, or a download that lied
            raise BlobReadError(
                f"Could not read blob {oid_repr(oid)} revision {tid_repr(serial)}: "
                f"{exc}"
            ) from exc
        if from_fallback and self._shared.fallback_upload:
            self._upload_later(oid, serial, key, *from_fallback[0])
        return path

    def _download(
        self, oid: bytes, serial: bytes, key: str, out, from_fallback: list
    ) -> int:
        """Download the revision into *out*; if S3 answers that it does not
        exist (a 404, never a transient failure), read it from the fallback,
        noting the size and CRC32 of what it read in *from_fallback*."""
        try:
            if self._shared.copier is not None:
                # The writer's copy may not have landed yet.
                return download_fresh(self._store, key, serial, out)
            return self._store.download(key, out)
        except ObjectNotFound as exc:
            if not self._held_now(oid, serial):
                # Packed away (with its object) since the caller loaded it:
                # lazy loading defers the download, so a connection may hold a
                # revision a pack has since removed. A conflict makes Zope
                # retry the request in a new transaction, which sees the
                # current revision; the fallback, which pack never touches,
                # must not serve it (nor upload it again).
                raise ReadConflictError(
                    f"blob revision {tid_repr(serial)} was removed by a pack "
                    f"after it was loaded ({exc.key})",
                    oid=oid,
                ) from exc
            fallback = self._shared.fallback
            if fallback is None:
                raise
            out.seek(0)
            out.truncate()
            size = fallback.read(oid, serial, out)
            if size is None:
                raise
            from_fallback.append((size, f"{written_crc32(out):08x}"))
            return size

    def _upload_later(
        self, oid: bytes, serial: bytes, key: str, size: int, crc: str
    ) -> None:
        """Upload a revision read from the fallback (*size* bytes of CRC32
        *crc* served) in the background: the bucket fills as the site is
        used. Best effort: until it succeeds (or ``migrate`` copies it), reads
        find it in the fallback. A migrate uploading the same revision writes
        the same bytes."""
        if not self._store.upload_soon(
            key, functools.partial(self._read_again, oid, serial, size, crc)
        ):
            log.debug("Not uploading %s now: too many uploads wait", key)

    def _held_now(self, oid: bytes, serial: bytes) -> bool:
        """:func:`revisions.revision_held` as of the base's latest commit (a pack may
        have removed the revision since a connection's snapshot; RelStorage's
        ``loadSerial`` would answer from its cache), through one instance of
        an MVCC base kept for these questions and polled each time, rather
        than a new one (on RelStorage, a new database connection) per
        question: presigned URLs are asked for by the page."""
        shared = self._shared
        if not IMVCCStorage.providedBy(shared.base):
            return revisions.revision_held(shared.base, oid, serial)
        with shared.view_lock:
            if shared.view is None:
                shared.view = shared.base.new_instance()
            shared.view.poll_invalidations()
            return revisions.revision_held(shared.view, oid, serial)

    def _release_view(self) -> None:
        shared = self._shared
        with shared.view_lock:
            view, shared.view = shared.view, None
        if view is not None:
            view.release()

    def _read_again(
        self, oid: bytes, serial: bytes, size: int, crc: str
    ) -> tuple[str, str] | None:
        """For a read-through upload, when its turn comes: the revision read
        from the fallback again into a private file, and its CRC32, if those
        bytes are the *size* bytes of CRC32 *crc* first read, and a pack has
        not removed the revision meanwhile (its key would be recreated for
        nothing). Never the cached copy, which may have been damaged while the
        upload waited."""
        if not self._held_now(oid, serial):
            return None
        temp, again, measured = self._read_fallback(oid, serial)
        if (again, measured) != (size, crc):
            log.error(
                "Not uploading blob %s revision %s: %s now holds %s bytes of "
                "CRC32 %s, not the %d bytes of CRC32 %s read from it before",
                oid_repr(oid),
                tid_repr(serial),
                self._shared.fallback.describe(),
                again,
                measured,
                size,
                crc,
            )
            os.remove(temp)
            return None
        return temp, crc

    def _read_fallback(
        self, oid: bytes, serial: bytes
    ) -> tuple[str, int | None, str | None]:
        """The revision read from the fallback into a new private file under
        the cache's ``tmp/``: (its path, its size and CRC32, or None and None
        when the fallback does not hold it)."""
        temp = self._cache.new_temp_file("fallback-upload-")
        try:
            with open(temp, "w+b") as out:
                size = self._shared.fallback.read(oid, serial, out)
                crc = f"{written_crc32(out):08x}" if size is not None else None
        except BaseException:
            os.remove(temp)
            raise
        return temp, size, crc

    def _in_fallback_only(self, oid: bytes, serial: bytes, quick: bool = False) -> bool:
        """Is this committed revision absent from S3 while a fallback is
        configured (so that it can only be read from there)? Asked of S3 with
        a HEAD (*quick*: one try, the download timeouts) until it is there;
        a committed revision's object stays until pack, so the answer is kept."""
        shared = self._shared
        if shared.fallback is None or (oid, serial) in shared.in_s3:
            return False
        if self._store.stat(self._layout.key(oid, serial), quick) is None:
            return True
        if len(shared.in_s3) >= _IN_S3_KEPT:
            shared.in_s3.clear()
        shared.in_s3.add((oid, serial))
        return False

    def openCommittedBlobFile(self, oid, serial, blob=None):
        for _attempt in range(_OPEN_ATTEMPTS):
            path = self.loadBlob(oid, serial)
            try:
                if blob is None:
                    return open(path, "rb")
                return BlobFile(path, "r", blob)
            except FileNotFoundError:
                # Evicted between loadBlob and open: load it again.
                continue
        raise S3BlobStorageError(
            f"Blob {oid_repr(oid)}/{tid_repr(serial)} was evicted from the cache "
            f"{_OPEN_ATTEMPTS} times before it could be opened; is cache-size "
            "too small?"
        )

    def presigned_url(
        self,
        oid: bytes,
        serial: bytes,
        expires: int = 3600,
        filename: str | None = None,
        content_type: str | None = None,
    ) -> PresignedURL | None:
        """A URL serving this committed blob revision straight from S3 (or a
        CDN in front of it) for *expires* seconds, or None if the revision is
        not committed. ``filename`` makes browsers save it under that name.

        ``str()`` of the result is the URL; its repr hides the signature.
        Refused under SSE-C, where the reader would need the key. None, with
        a logged reason, for a revision still only in the fallback: serve it
        through Zope, which reads it from there (and uploads it). ValueError
        for *expires* beyond 7 days (SigV4's limit) or below 1 second. A
        *content_type* a browser would render as a page (HTML, SVG, XML) is
        served as an attachment even without *filename*.
        """
        check_presign_arguments(expires, content_type)
        # Asked of the database as of now, not of loadSerial: RelStorage's
        # answers from its local cache, which keeps a revision another
        # process has packed away with its object (a URL that would 404).
        if not serial or serial == z64 or not self._held_now(oid, serial):
            return None
        try:
            only_in_fallback = self._in_fallback_only(oid, serial, quick=True)
        except ObjectStoreError as exc:
            log.warning("No presigned URL for %s: %s", oid_repr(oid), exc)
            return None
        if only_in_fallback:
            log.info(
                "No presigned URL for blob %s revision %s: it is not in S3 yet, "
                "only in %s",
                oid_repr(oid),
                tid_repr(serial),
                self._shared.fallback.describe(),
            )
            return None
        return self._store.presigned_url(
            self._layout.key(oid, serial), expires, filename, content_type
        )

    def copyTransactionsFrom(self, other) -> None:
        copyTransactionsFromTo(other, self)

    # -- undo ------------------------------------------------------------------

    def undo(self, transaction_id, transaction):
        """Undo through the base; each undone blob revision's object is copied
        (server-side, at vote) to the new revision's key, as ZODB's
        ``BlobStorage.undo`` copies the file."""
        undone_tid = decodebytes(transaction_id + b"\n")
        sources = None
        if self._shared.fallback is not None:
            # Before the base's undo, which takes RelStorage's database-wide
            # commit lock: the sources still only in the fallback are
            # uploaded to their own keys, so that the vote copies them.
            sources = self._undo_sources(undone_tid)
            self._upload_from_fallback(sources)
        result = self._base.undo(transaction_id, transaction)
        if sources is None:
            oids = result[1] if isinstance(result, tuple) else result
            sources = self._undo_sources(undone_tid, oids)
        self._pending(transaction).copies.update(sources)
        return result

    def _undo_sources(self, undone_tid: bytes, oids=None) -> dict[bytes, bytes]:
        """oid -> tid of the blob revision that undoing *undone_tid* restores,
        for the *oids* it stored (read from the base if not given)."""
        if oids is None:
            oids = _oids_stored_by(self._base, undone_tid)
        sources = {}
        for oid in oids:
            source = self._undo_source(oid, undone_tid)
            if source is not None:
                sources[oid] = source
        return sources

    def _upload_from_fallback(self, revisions: dict[bytes, bytes]) -> None:
        """Upload those of *revisions* (oid -> tid) still only in the fallback,
        read from there into a private file: never the cached copy, whose
        bytes nothing proves equal to the fallback's."""
        for oid, tid in revisions.items():
            if not self._in_fallback_only(oid, tid):
                continue
            key = self._layout.key(oid, tid)
            temp, size, crc = self._read_fallback(oid, tid)
            try:
                if size is None:
                    raise POSKeyError(
                        not_in_either(
                            self._store.url(key), self._shared.fallback, oid, tid
                        ),
                        oid,
                        tid,
                    )
                self._store.upload(temp, key, urgent=True, crc=crc)
            finally:
                os.remove(temp)

    def _undo_source(self, oid: bytes, undone_tid: bytes) -> bytes | None:
        """The tid of the blob revision that undoing *undone_tid* restores."""
        try:
            before = self._base.loadBefore(oid, undone_tid)
        except POSKeyError:
            # FileStorage: the revision before is itself an undone creation.
            return None
        if before is None:
            return None  # the undone transaction created it: no state remains
        data, serial, _end = before
        if data and is_blob_record(self.untransform_record_data(data)):
            return serial
        return None

    # -- two-phase commit ----------------------------------------------------

    def _pending(self, transaction) -> PendingCommit:
        commit = self._commit
        if commit is None or commit.transaction is not transaction:
            raise StorageTransactionError(self, transaction)
        return commit

    def tpc_begin(self, transaction, *args, **kw):
        marker = None
        if self._shared.copier is not None:
            # Sent to the server with the metadata by the base's tpc_begin:
            # finds the commit of a journal that learnt no tid (find_commit).
            marker = mark_transaction(transaction)
        result = self._base.tpc_begin(transaction, *args, **kw)
        self._commit = PendingCommit(transaction, tid_at_begin(self._base))
        self._commit.marker = marker
        return result

    def tpc_vote(self, transaction):
        commit = self._pending(transaction)
        # The uploads started at store time, first: one that failed fails the
        # vote before the base votes (and RelStorage locks rows).
        failures = commit.settle_uploads(cancel=False)
        raise_first(failures, len(commit.blobs))
        resolved = self._base.tpc_vote(transaction)
        if commit.has_transfers():
            if self._shared.copier is not None:
                self._journal_at_vote(commit, transaction)
            else:
                self._transfer_at_vote(commit)
            self._count_uploads(commit)
        return resolved

    def _journal_dir(self) -> str:
        return os.path.join(self._cache.directory, JOURNAL_DIR)

    def _destination(self) -> str:
        """Where this storage's copies go, as its journals record it."""
        return self._store.url(self._layout.root)

    def _journal_at_vote(self, commit: PendingCommit, transaction) -> None:
        """Record the copies owed after tpc_finish durably, on a base that
        learns the tid only there (see :mod:`zodb_s3blobs.copier`)."""
        copies = [
            PendingCopy(b.upload_key, b.oid, b.checksum, True)
            for b in commit.blobs.values()
            if b.staged
        ]
        copies += [
            PendingCopy(self._layout.key(oid, source), oid, None, False)
            for oid, source in commit.copies.items()
        ]
        if copies:
            commit.journal = Journal.create(
                self._journal_dir(),
                copies,
                self._base.lastTransaction(),
                commit.marker,
                self._destination(),
            )

    def _count_uploads(self, commit: PendingCommit) -> None:
        """Add the voted transaction's uploads to the metrics: every blob but
        the restored ones whose key held their bytes already."""
        sizes = [
            os.path.getsize(blob.path)
            for blob in commit.blobs.values()
            if not (blob.preexisting and blob.checksum is None)
        ]
        self._shared.metrics.add(uploads=len(sizes), upload_bytes=sum(sizes))

    def _transfer_at_vote(self, commit: PendingCommit) -> None:
        """Upload the blobs whose upload waited for the tid, copy the staged
        ones and undo's sources to their revisions' keys, in parallel."""
        later = [b for b in commit.blobs.values() if b.upload_key is None]
        staged = [b for b in commit.blobs.values() if b.staged]
        if not (later or staged or commit.copies):
            return
        # RelStorage takes its commit lock here (see tids._relstorage_tid).
        tid = commit.tid = commit.tid or tid_at_vote(self._base)
        key = self._layout.key
        uploads = [(b.path, key(b.oid, tid)) for b in later]
        copies = [
            Copy(b.upload_key, key(b.oid, tid), b.checksum, b.source_info)
            for b in staged
        ]
        copies += [
            Copy(key(oid, source), key(oid, tid))
            for oid, source in commit.copies.items()
        ]
        commit.attempted_keys += [k for _p, k in uploads] + [c.key for c in copies]
        self._store.transfer(uploads, copies)

    def _existing_restore_target(self, key: str, path: str) -> object:
        """What *key*, the target of the restored revision in *path*, holds
        already (a repeated zodbconvert, a rerun after a failure): _ABSENT;
        _SAME_BYTES (same size and CRC32: not uploaded again); or _UNCHECKED
        (same size, written without a CRC32, e.g. by 1.x: uploaded again,
        which records one). Other bytes under a committed revision's key fail
        the vote rather than be overwritten."""
        existing = self._store.stat(key)
        if existing is None:
            return _ABSENT
        size = os.path.getsize(path)
        checksum = file_crc32(path)
        if existing.size == size and existing.checksum == checksum:
            return _SAME_BYTES
        if existing.size == size and existing.checksum is None:
            return _UNCHECKED
        raise S3BlobStorageError(
            f"Restoring {self._store.url(key)} would overwrite an object with other "
            f"bytes ({existing.size} bytes, CRC32 {existing.checksum or 'unknown'}; "
            f"restored: {size} bytes, CRC32 {checksum}): the target bucket and "
            "prefix already hold another database's blobs"
        )

    def _take_commit(self, transaction) -> PendingCommit | None:
        # Taken out before the base's tpc_finish/tpc_abort: those release the
        # base's commit lock, after which another thread's tpc_begin may set
        # its own pending commit.
        try:
            commit = self._pending(transaction)
        except StorageTransactionError:
            return None
        self._commit = None
        return commit

    def tpc_finish(self, transaction, func=lambda tid: None):
        commit = self._take_commit(transaction)
        if commit is None:
            raise StorageTransactionError(self, transaction)
        journal = commit.journal
        try:
            tid = self._base.tpc_finish(transaction, func)
        except BaseException:
            if journal is not None:
                self._orphan_journal(commit)
            raise
        if journal is not None:
            try:
                journal.record_tid(tid)
            except OSError:
                log.error(
                    "Could not record tid %s in %s: a later start finds it",
                    tid_repr(tid),
                    journal.path,
                    exc_info=True,
                )
        if commit.tid is not None and commit.tid != tid:
            log.critical(
                "Base storage committed tid %s but blobs were uploaded under %s",
                tid_repr(tid),
                tid_repr(commit.tid),
            )
        if journal is not None:
            # First: a reader of the new revision may be waiting for its copy
            # (see freshread), holding the revision's lock the install takes.
            self._shared.copier.add(journal)
        # Nothing here may fail: the transaction is committed.
        for blob in commit.blobs.values():
            try:
                if not self._cache.install(blob.oid, blob.tid or tid, blob.path):
                    log.debug(
                        "Blob %s/%s is being fetched into the cache meanwhile: "
                        "not installed from its staged file",
                        oid_repr(blob.oid),
                        tid_repr(blob.tid or tid),
                    )
            except Exception:
                log.warning(
                    "Could not install blob %s/%s into the cache; it will be "
                    "downloaded when read",
                    oid_repr(blob.oid),
                    tid_repr(blob.tid or tid),
                    exc_info=True,
                )
        try:
            commit.discard_files()
        except OSError:
            log.warning("Could not remove staged files", exc_info=True)
        if journal is not None:
            # Its staging objects stay until their copies are made.
            owed = set(journal.staging_keys())
            commit.staging_keys = [k for k in commit.staging_keys if k not in owed]
        self._delete_staging(commit)
        if self._shared.writer is not None:
            self._shared.writer.committed(tid)
        return tid

    def _orphan_journal(self, commit: PendingCommit) -> None:
        """The base's tpc_finish raised (a ZEO connection lost while the
        server committed, or not): whether the transaction committed is
        unknown. Its journal is released, for the copier to adopt and
        resolve by its marker (or the next process on this cache directory,
        if this one ends first); its staging objects stay."""
        log.error(
            "The base's tpc_finish failed: the blob copies of the transaction "
            "are made if it committed (journal %s)",
            commit.journal.path,
        )
        commit.journal.release()
        try:
            commit.discard_files()
        except OSError:
            log.warning("Could not remove staged files", exc_info=True)
        self._shared.copier.adopt()

    def tpc_abort(self, transaction):
        commit = self._take_commit(transaction)
        if commit is None:
            self._base.tpc_abort(transaction)
            return
        if not (commit.restores() or reuses_aborted_tid(self._base)):
            # No later transaction can write these keys: delete patiently,
            # after the base's commit lock is released.
            try:
                self._base.tpc_abort(transaction)
            finally:
                self._abort(commit, quick=False)
            return
        # Delete before the base's tpc_abort releases its commit lock: this
        # base may give the next transaction this one's tid (MappingStorage:
        # last + 1; RelStorage: max(clock, last + 1)), and a DELETE sent later
        # would remove that commit's objects. Quickly (one try, the download
        # timeouts), so that S3 trouble does not hold the lock for minutes;
        # what is left is for pack or gc.
        try:
            self._abort(commit, quick=True)
        finally:
            self._base.tpc_abort(transaction)

    def _abort(self, commit: PendingCommit, quick: bool) -> None:
        """Settle the uploads started at store time, remove the staged files
        and delete the objects this transaction created; log, never raise
        (tpc_abort must not fail)."""
        created: list[str] = []
        if commit.journal is not None:
            try:
                commit.journal.remove()
            except OSError:
                log.error("Could not remove %s", commit.journal.path, exc_info=True)
        try:
            # An upload still running when its DELETE is sent would land after
            # it: wait for those, cancel those not started.
            commit.settle_uploads(cancel=True)
            created = commit.created_keys()
            commit.discard_files()
            if created:
                self._store.delete(created, quick=quick)
                self._shared.metrics.add(aborted_deletes=len(created))
        except Exception:
            log.error(
                "Aborted transaction left %d object(s) in S3 that the next pack "
                "or gc removes: %s",
                len(created),
                ", ".join(created),
                exc_info=True,
            )
        self._delete_staging(commit)

    def _delete_staging(self, commit: PendingCommit) -> None:
        """Delete the transaction's staging objects in the background, best
        effort: no later transaction writes their random keys, and the
        collector removes those left (older than a day)."""
        self._delete_staging_keys(commit.staging_keys)

    def _delete_staging_keys(self, keys: list[str]) -> None:
        if not keys:
            return
        try:
            self._store.submit(self._store.delete, keys).add_done_callback(
                functools.partial(_log_staging_failure, keys)
            )
        except RuntimeError:  # the store is closing
            _log_staging_failure(keys, None)

    # -- pack ------------------------------------------------------------------

    def pack(self, pack_time, referencesf, *args, **kw):
        """Pack the base storage, then delete the objects of every blob revision
        it no longer holds (see :mod:`zodb_s3blobs.gc`)."""
        lock = self._shared.pack_lock
        if not lock.acquire(blocking=False):
            raise S3BlobStorageError("Already packing")
        try:
            result = self._base.pack(pack_time, referencesf, *args, **kw)
            try:
                self.collect_orphans()
            except (
                ObjectStoreError,
                gc.OrphansNotDeleted,
                writers.SecondWriter,
                OSError,
            ) as exc:
                # The pack itself worked; orphans only cost storage until the
                # next pack or `zodb-s3blobs gc` removes them. Raising would
                # report a failed pack to the ZMI. (OSError: the journals in
                # the cache directory could not be read, so nothing was.)
                log.error(
                    "Packed %s, but its orphan collection failed: %s. The "
                    "orphans stay in S3 until the next pack or `zodb-s3blobs gc` "
                    "removes them.",
                    self.getName(),
                    exc,
                )
            return result
        finally:
            lock.release()

    def collect_orphans(
        self,
        dry_run: bool = False,
        stale_in_flight: bool = False,
        retention: float | None = None,
        on_orphan: Callable[[str], None] | None = None,
    ) -> gc.CollectionReport:
        """Delete (or with *dry_run* only list) objects no revision needs
        that have been found orphaned for *retention* seconds (default
        ``gc-retention``); with *stale_in_flight* also keys above the last
        commit that are more than a day old (see
        :func:`zodb_s3blobs.gc.collect_orphans`; pack never deletes those).
        *on_orphan* is called with each orphan's key once deleted (in a dry
        run, once found). The staging objects of every journal in this
        cache directory are kept: this process's, and those of processes
        killed before their copies were made."""
        if retention is None:
            retention = self._shared.gc_retention

        def settled(key: str) -> None:
            if not dry_run:  # no longer in S3
                self._shared.in_s3.discard(self._layout.parse(key))
            if on_orphan is not None:
                on_orphan(key)

        report = None
        try:
            report = gc.collect_orphans(
                self._base,
                self._store,
                self._layout,
                self._cache,
                dry_run=dry_run,
                stale_in_flight=stale_in_flight,
                owed=owed_copies(self._journal_dir(), self._destination()).keys,
                retention=gc.check_retention(retention),
                on_orphan=settled,
            )
        except gc.OrphansNotDeleted as exc:
            report = exc.report
            raise
        finally:
            if report is not None:
                self._shared.metrics.add(
                    orphans_found=report.orphans,
                    orphans_deleted=report.deleted,
                    orphans_deleted_bytes=report.deleted_bytes,
                )
                self._shared.orphans_pending = (report.pending, report.pending_bytes)
        return report

    # -- lifecycle -------------------------------------------------------------

    def close(self) -> None:
        """Close the base; the storage that opened the parts closes them too,
        each even if another fails: the metrics' last write first (all still
        open), then the copier of a ZEO client (it may ask the base), the
        store (background uploads that ask the database end), the parent
        prefix's store, the database view, the base, and the cache."""
        with contextlib.ExitStack() as closing:
            if self._owner:
                closing.callback(self._cache.close)
            closing.callback(self._base.close)
            if not self._owner:
                return
            closing.callback(self._release_view)
            if self._shared.parent_store is not None:
                closing.callback(self._shared.parent_store.close)
            closing.callback(self._store.close)
            if self._shared.copier is not None:
                closing.callback(self._shared.copier.close)
            if self._exporter:
                closing.callback(self._exporter.close)
