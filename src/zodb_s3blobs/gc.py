"""Orphan collection: delete the objects of blob revisions the base storage no
longer holds (after a pack, or on demand).

The rule is ZODB's own ``BlobStorage._packUndoing``: a revision is needed
while the base can still load it (``loadSerial``). That one rule keeps what a
history-preserving base keeps for undo and drops all but the current revision
on a history-free base. Safety rules:

- keys newer than the base's last committed transaction are "in flight":
  they may belong to transactions still voting (uploads happen before
  finish), and are never touched while young. But in flight is bounded by
  time: such a key whose object S3 last modified more than
  :data:`IN_FLIGHT_GRACE` (a day) ago is an orphan -- no vote lasts a day,
  and without the bound a key with a tid from the far future (a stray
  ``ffffffffffffffff.blob``, a clock that was wrong once) would be above
  every commit for ever. A key whose tid's timestamp lies more than the
  grace period in the future is counted as ``future`` in the report (it is
  an orphan by the same age rule: a young one is still left alone, since a
  process whose clock is ahead may be voting it);
- keys that do not match the layout exactly are never touched;
- incomplete multipart uploads to this storage's keys (a process killed
  mid-upload leaves parts that are billed and never listed) are aborted
  once started more than the same grace period ago;
- staging objects (``staging/{32 hex digits}.blob``: uploads made before
  their transaction's id was known, copied to their revision's key at vote
  and deleted after the transaction ends) are orphans once S3 last modified
  them more than the same grace period ago: no vote lasts a day, and nothing
  ever reads them otherwise. Younger ones are never touched, nor any other
  key under ``staging/`` (foreign);
- an MVCC base (RelStorage) is read through a new instance synced to its
  latest commit: the main instance, which ``pack()`` runs on, keeps the
  snapshot it last polled, and its ``lastTransaction()`` would hide every
  later revision from the collector;
- with a retention (``gc-retention``, a week by default), a revision's
  orphaned object is deleted only once collections have found it orphaned
  for that long (recorded in the bucket: :mod:`zodb_s3blobs.pending`), so a
  restored backup of the base storage finds the blobs it refers to;
- while another database writes under the same prefix (see
  :mod:`zodb_s3blobs.writers`), nothing is judged nor deleted;
- deletes go out in DeleteObjects batches of 1000 keys, and the cached copies
  of deleted revisions are dropped.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from persistent.TimeStamp import TimeStamp
from ZODB.interfaces import IMVCCStorage
from ZODB.POSException import POSKeyError
from ZODB.utils import u64

from .cache import BlobCache
from .errors import ObjectStoreError, S3BlobStorageError
from .keys import KeyLayout
from .objectstore import ObjectStore
from .pending import NewRecord, Pending, PreviousRecord, record_key, stamp
from .writers import check as check_writers

log = logging.getLogger(__name__)

#: How many orphan keys an error message names.
_KEYS_SHOWN = 5
#: Seconds an orphan's object is kept after it was first found orphaned
#: (``gc-retention``): a week, so that last week's backup of the base
#: storage, restored, still finds its blobs.
DEFAULT_RETENTION = 7 * 24 * 3600.0
#: Seconds after which a key above the last commit (its LastModified older)
#: is no longer taken for a transaction still voting: a day.
IN_FLIGHT_GRACE = 24 * 3600.0


@dataclass
class CollectionReport:
    """What one collection saw and did."""

    scanned: int = 0
    kept: int = 0
    in_flight: int = 0
    #: Keys above the last commit, older than the grace period: orphans only
    #: when the collection is asked to delete them.
    stale_in_flight: int = 0
    stale: list[str] = field(default_factory=list)
    #: Keys whose tid's timestamp is more than the grace period ahead of now.
    future: int = 0
    foreign: int = 0
    #: Staging objects younger than the grace period: left alone.
    staging: int = 0
    #: Staging objects older than it: orphans (also in ``orphans``).
    staging_expired: int = 0
    #: Orphans due for deletion (all of them without a retention).
    orphans: list[str] = field(default_factory=list)
    orphan_bytes: int = 0
    #: Incomplete multipart uploads to this storage's keys: younger than the
    #: grace period (may be running), and older (aborted unless a dry run).
    uploads_running: int = 0
    uploads_stale: int = 0
    uploads_aborted: int = 0
    deleted: int = 0
    deleted_bytes: int = 0
    #: Orphans found for less than the retention: kept for now.
    pending: int = 0
    pending_bytes: int = 0


class OrphansNotDeleted(S3BlobStorageError):
    """The collector found orphans but S3 refused (some of) their deletes; they
    stay until a later collection removes them."""

    def __init__(self, report: CollectionReport, cause: ObjectStoreError) -> None:
        self.report = report
        first = ", ".join(report.orphans[:_KEYS_SHOWN])
        more = " ..." if len(report.orphans) > _KEYS_SHOWN else ""
        super().__init__(
            f"{len(report.orphans)} orphan(s) ({report.orphan_bytes} bytes) could "
            f"not all be deleted: {cause}; first: {first}{more}"
        )


def check_retention(seconds: float) -> float:
    """*seconds* if it is a retention (0 or more, finite); ValueError naming
    ``gc-retention`` otherwise."""
    if not 0 <= seconds < float("inf"):
        raise ValueError(
            f"gc-retention must be 0 or more (e.g. 7d, 12h, 0), not {seconds!r}"
        )
    return float(seconds)


def revision_exists(base, oid: bytes, tid: bytes) -> bool:
    """Can *base* still load revision *tid* of *oid*? (ZODB's own pack rule.)"""
    try:
        base.loadSerial(oid, tid)
    except (POSKeyError, KeyError):
        return False
    return True


def revision_held(view, oid: bytes, tid: bytes) -> bool:
    """:func:`revision_exists`, as the database itself answers it, for the
    collector's :func:`current_view`. RelStorage 4's ``loadSerial`` answers
    from its local cache first, even for a revision another process has
    packed away (relstorage/storage/load.py), so a process whose connections
    still viewed that revision would keep its object; its database is asked
    instead, through the view's load connection, which sees the snapshot the
    view polled (tested in tests/test_relstorage.py)."""
    relstorage = sys.modules.get("relstorage.storage")
    if relstorage is None or not isinstance(view, relstorage.RelStorage):
        return revision_exists(view, oid, tid)
    state = view._adapter.mover.load_revision(
        view._load_connection.cursor, u64(oid), u64(tid)
    )
    return state is not None


@contextlib.contextmanager
def current_view(base) -> Iterator:
    """*base* as of its latest commit: an IMVCCStorage through a new instance
    polled now (released afterwards), so that ``lastTransaction`` and
    ``loadSerial`` answer from one current snapshot; any other base as is."""
    if not IMVCCStorage.providedBy(base):
        yield base
        return
    view = base.new_instance()
    try:
        view.poll_invalidations()
        yield view
    finally:
        view.release()


def tid_time(tid: bytes) -> float:
    """The time (seconds since the epoch) ZODB's TimeStamp encodes in *tid*."""
    return TimeStamp(tid).timeTime()


class _Orphans:
    """The orphans of one collection, judged against the retention: each is
    recorded with when it was first found (see :mod:`zodb_s3blobs.pending`),
    and due for deletion once that lies *retention* seconds back."""

    def __init__(
        self,
        store: ObjectStore,
        layout: KeyLayout,
        report: CollectionReport,
        retention: float,
        now: float,
    ) -> None:
        self._report = report
        self._retention = retention
        self._now = now
        self._key = record_key(layout.prefix)
        self._previous = PreviousRecord(store, self._key) if retention > 0 else None
        self._record = NewRecord() if retention > 0 else None

    def found(
        self,
        key: str,
        size: int,
        last_modified: float,
        superseded: Callable[[], float | None] = lambda: None,
    ) -> None:
        """*key* is an orphan: due now, or pending for the retention.

        The retention runs from the later of when a collection first found it
        orphaned and *superseded*() (when its object's current revision was
        committed, if the object still exists): a record written before a
        restore brought the revision back, or by another database on the
        same prefix, then never makes it due early, since an edit after the
        restore supersedes it anew."""
        report = self._report
        if self._previous is None:
            report.orphans.append(key)
            report.orphan_bytes += size
            return
        modified = stamp(last_modified)
        first = self._previous.first_seen(key, modified)
        if first is None:
            first = self._now
        self._record.add(Pending(key, first, modified, size))
        if self._now - first >= self._retention:
            first = max(first, superseded() or first)
        if self._now - first >= self._retention:
            report.orphans.append(key)
            report.orphan_bytes += size
        else:
            report.pending += 1
            report.pending_bytes += size

    def save(self, store: ObjectStore) -> None:
        """Write the record of the orphans found, before any is deleted."""
        record = self._record
        if record is not None and (record.entries or self._previous.existed):
            record.save(store, self._key)

    def close(self) -> None:
        for part in (self._previous, self._record):
            if part is not None:
                part.close()


def _current_revision_time(view, oid: bytes) -> float | None:
    """When the current revision of *oid* was committed, per *view*; None if
    the object no longer exists."""
    try:
        _data, serial = view.load(oid)
    except (POSKeyError, KeyError):
        return None
    return tid_time(serial)


def collect_orphans(
    base,
    store: ObjectStore,
    layout: KeyLayout,
    cache: BlobCache,
    dry_run: bool = False,
    grace: float = IN_FLIGHT_GRACE,
    stale_in_flight: bool = False,
    owed: frozenset[str] | set[str] = frozenset(),
    retention: float = 0.0,
) -> CollectionReport:
    """Find, and unless *dry_run* delete, objects no revision of *base* needs.

    A key above the last commit is in flight while S3 modified it within
    *grace* seconds. After that it is stale: listed in the report, and an
    orphan only with *stale_in_flight* (the operator's explicit choice): run
    from an older copy of the database (a restored backup, a staging clone
    on the live prefix), the collector would otherwise delete every blob the
    live database committed since that copy was made. Keys in *owed* (the
    sources of copies still to make, see :mod:`zodb_s3blobs.copier`: staging
    keys, and the revisions undo copies from) are kept whatever their age,
    and whether or not the base still holds their revision.

    With a *retention* (seconds), a revision's orphaned object is deleted
    only once collections have found it orphaned for that long; until then
    it is pending (see :mod:`zodb_s3blobs.pending`). Staging objects are no
    revision's and keep their own rule, the *grace*. With 0 every orphan is
    deleted at once and no record is read or written.
    """
    report = CollectionReport()
    # Nothing is judged while another database writes under this prefix:
    # its blobs would look like this one's orphans.
    check_writers(store, layout.prefix, base, max(retention, grace))
    now = time.time()
    orphans = _Orphans(store, layout, report, retention, now)
    try:
        with current_view(base) as view:
            # Read before listing: anything committed later has a larger tid.
            last_committed = view.lastTransaction()
            for key, size, last_modified in store.list_objects(layout.root):
                report.scanned += 1
                parsed = layout.parse(key)
                if parsed is None:
                    report.foreign += 1
                    continue
                oid, tid = parsed
                if tid > last_committed:
                    if tid_time(tid) > now + grace:
                        report.future += 1
                    if last_modified > now - grace:
                        report.in_flight += 1  # may be voting: never touched
                        continue
                    report.stale_in_flight += 1
                    report.stale.append(key)
                    if stale_in_flight:
                        orphans.found(key, size, last_modified)
                elif key in owed or revision_held(view, oid, tid):
                    report.kept += 1
                else:
                    orphans.found(
                        key,
                        size,
                        last_modified,
                        functools.partial(_current_revision_time, view, oid),
                    )
        _collect_staging(store, layout, report, now - grace, owed)
        _abort_stale_uploads(store, layout, report, now - grace, dry_run)
        if not dry_run:
            orphans.save(store)
    finally:
        orphans.close()
    if not dry_run and report.orphans:
        try:
            report.deleted = store.delete(report.orphans)
        except ObjectStoreError as exc:
            raise OrphansNotDeleted(report, exc) from exc
        report.deleted_bytes = report.orphan_bytes
        for key in report.orphans:
            revision = layout.parse(key)
            if revision is not None:
                cache.discard(*revision)
    log.info(
        "Orphan collection in %s: %d objects scanned, %d kept, %d in flight, "
        "%d foreign, %d staging, %d orphans (%d bytes, %d of them above the "
        "last commit and %d staging, for more than %g s) %s, %d pending "
        "(%d bytes) for the retention of %g s; %d incomplete multipart "
        "uploads older than that grace %s",
        store.url(layout.root),
        report.scanned,
        report.kept,
        report.in_flight,
        report.foreign,
        report.staging,
        len(report.orphans),
        report.orphan_bytes,
        report.stale_in_flight,
        report.staging_expired,
        grace,
        "listed" if dry_run else "deleted",
        report.pending,
        report.pending_bytes,
        retention,
        report.uploads_stale,
        "found" if dry_run else "aborted",
    )
    return report


def _abort_stale_uploads(
    store: ObjectStore,
    layout: KeyLayout,
    report: CollectionReport,
    expired: float,
    dry_run: bool,
) -> None:
    """Abort the multipart uploads to this storage's keys started before
    *expired*: left by a process killed mid-upload, their parts are billed
    and never listed as objects. Younger ones may still be running."""
    for root in (layout.root, layout.staging_root):
        for key, upload_id, initiated in store.list_uploads(root):
            if layout.parse(key) is None and not layout.is_staging_key(key):
                continue  # not ours
            if initiated > expired:
                report.uploads_running += 1
                continue
            report.uploads_stale += 1
            if not dry_run:
                store.abort_upload(key, upload_id)
                report.uploads_aborted += 1


def _collect_staging(
    store: ObjectStore,
    layout: KeyLayout,
    report: CollectionReport,
    expired: float,
    owed: frozenset[str] | set[str],
) -> None:
    """Count the staging objects; those S3 last modified before *expired*
    are orphans (no revision's: no retention applies), unless a copy is
    still owed from them (*owed*)."""
    for key, size, last_modified in store.list_objects(layout.staging_root):
        report.scanned += 1
        if not layout.is_staging_key(key):
            report.foreign += 1
        elif last_modified > expired or key in owed:
            report.staging += 1
        else:
            report.staging_expired += 1
            report.orphans.append(key)
            report.orphan_bytes += size
