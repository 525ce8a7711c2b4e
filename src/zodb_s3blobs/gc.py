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

How it scales. The collection is a pipeline whose memory does not grow with
the bucket: one thread lists the next pages while the current one is judged
(:mod:`zodb_s3blobs.readahead`); each page's revisions are asked of the base
at once (:mod:`zodb_s3blobs.revisions`: one query a page on RelStorage, one
walk of each object's records on FileStorage); the orphans due go out in
DeleteObjects batches sent by a small pool while the listing goes on
(:mod:`zodb_s3blobs.batchdelete`), and the report counts them (the keys go
to the caller's ``on_orphan`` as S3 deletes them, never into a list). A
batch is sent only with keys already judged, and an error of the listing or
of the base stops the collection, waiting for the batches being sent and
cancelling those not sent: what was deleted was an orphan. No thread outlives
the collection.

Concurrent commits. ``pack()`` first packs the base, whose ``pack`` returns
having released its own locks (FileStorage's pack lock and commit lock,
RelStorage's pack lock), and only then collects, holding no lock of the
base: commits go on during the collection. They are safe by the in-flight
rule above. ZODB's transaction ids increase strictly (``IStorage``:
``lastTransaction`` is the id of the last committed transaction, and each
new transaction's id is above it: FileStorage takes it under its commit lock
in ``tpc_begin``, ``newTid(last)``; RelStorage under its database-wide
commit lock at vote, ``max(clock, last + 1)``), and uploads of a transaction
happen before its ``tpc_finish``; so every key a commit writes during the
collection, or a transaction voting when it starts, has a tid above the last
commit read at the start (from a snapshot polled then, on an MVCC base) and
is in flight, untouched while young. A revision that a concurrent pack of
the base removes after its page was judged is kept until the next
collection (the base only ever loses revisions: a kept key is the safe
error); one that a concurrent undo copies from is held by the base, hence
kept.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from persistent.TimeStamp import TimeStamp

from .batchdelete import BatchDeleter
from .cache import BlobCache
from .errors import ObjectStoreError, S3BlobStorageError
from .keys import KeyLayout
from .objectstore import ObjectStore
from .pending import NewRecord, Pending, PreviousRecord, record_key, stamp
from .readahead import ReadAhead
from .revisions import Revisions, current_view, revisions_of
from .writers import check as check_writers

log = logging.getLogger(__name__)

#: How many orphan keys an error message names.
_KEYS_SHOWN = 5
#: Keys judged together: a ListObjectsV2 page.
PAGE = 1000
#: Seconds an orphan's object is kept after it was first found orphaned
#: (``gc-retention``): a week, so that last week's backup of the base
#: storage, restored, still finds its blobs.
DEFAULT_RETENTION = 7 * 24 * 3600.0
#: Seconds after which a key above the last commit (its LastModified older)
#: is no longer taken for a transaction still voting: a day.
IN_FLIGHT_GRACE = 24 * 3600.0


@dataclass
class CollectionReport:
    """What one collection saw and did: counts only, however many keys (the
    keys themselves go to the caller's *on_orphan* as they are settled)."""

    scanned: int = 0
    kept: int = 0
    in_flight: int = 0
    #: Keys above the last commit, older than the grace period: orphans only
    #: when the collection is asked to delete them.
    stale_in_flight: int = 0
    #: Keys whose tid's timestamp is more than the grace period ahead of now.
    future: int = 0
    foreign: int = 0
    #: Staging objects younger than the grace period: left alone.
    staging: int = 0
    #: Staging objects older than it: orphans (also counted in ``orphans``).
    staging_expired: int = 0
    #: Orphans due for deletion (all of them without a retention).
    orphans: int = 0
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

    def __init__(
        self, report: CollectionReport, cause: ObjectStoreError, refused: list[str]
    ) -> None:
        self.report = report
        first = ", ".join(refused[:_KEYS_SHOWN])
        more = " ..." if len(refused) > _KEYS_SHOWN else ""
        super().__init__(
            f"{report.orphans - report.deleted} of {report.orphans} orphan(s) "
            f"({report.orphan_bytes} bytes in all) could not be deleted: {cause}; "
            f"the refused batch: {first}{more}"
        )


def check_retention(seconds: float) -> float:
    """*seconds* if it is a retention (0 or more, finite); ValueError naming
    ``gc-retention`` otherwise."""
    if not 0 <= seconds < float("inf"):
        raise ValueError(
            f"gc-retention must be 0 or more (e.g. 7d, 12h, 0), not {seconds!r}"
        )
    return float(seconds)


def tid_time(tid: bytes) -> float:
    """The time (seconds since the epoch) ZODB's TimeStamp encodes in *tid*."""
    return TimeStamp(tid).timeTime()


class _Due:
    """Where the orphans due go: counted, then deleted in batches as they
    come (listed to *on_orphan* once S3 deleted them, their cached copies
    dropped) or, in a dry run, listed at once. A context manager: no delete
    is still being sent once it is left."""

    def __init__(
        self,
        store: ObjectStore,
        layout: KeyLayout,
        cache: BlobCache,
        report: CollectionReport,
        on_orphan: Callable[[str], None],
        dry_run: bool,
    ) -> None:
        self._layout = layout
        self._cache = cache
        self._report = report
        self._on_orphan = on_orphan
        self._deleter = None if dry_run else BatchDeleter(store, self._deleted)

    def __enter__(self) -> _Due:
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._deleter is not None:
            self._deleter.close()

    def __call__(self, key: str, size: int) -> None:
        self._report.orphans += 1
        self._report.orphan_bytes += size
        if self._deleter is None:
            self._on_orphan(key)
        else:
            self._deleter.add(key, size)

    def finish(self) -> None:
        """Wait for the last deletes; OrphansNotDeleted if S3 refused any."""
        if self._deleter is None:
            return
        try:
            self._deleter.finish()
        except ObjectStoreError as exc:
            refused = self._deleter.failure[1]
            raise OrphansNotDeleted(self._report, exc, refused) from exc

    def _deleted(self, keys: list[str], size: int) -> None:
        """S3 deleted *keys* (*size* bytes)."""
        self._report.deleted += len(keys)
        self._report.deleted_bytes += size
        for key in keys:
            revision = self._layout.parse(key)
            if revision is not None:
                self._cache.discard(*revision)
            self._on_orphan(key)


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
        due: Callable[[str, int], None],
        superseded: Callable[[], float | None] = lambda: None,
    ) -> None:
        """*key* is an orphan: *due* now, or pending for the retention.

        The retention runs from the later of when a collection first found it
        orphaned and *superseded*() (when its object's current revision was
        committed, if the object still exists): a record written before a
        restore brought the revision back, or by another database on the
        same prefix, then never makes it due early, since an edit after the
        restore supersedes it anew."""
        if self._previous is None:
            due(key, size)
            return
        modified = stamp(last_modified)
        first = self._previous.first_seen(key, modified)
        if first is None:
            first = self._now
        self._record.add(Pending(key, first, modified, size))
        if self._now - first >= self._retention:
            first = max(first, superseded() or first)
        if self._now - first >= self._retention:
            due(key, size)
        else:
            self._report.pending += 1
            self._report.pending_bytes += size

    def save(self, store: ObjectStore) -> None:
        """Write the record of the orphans found."""
        record = self._record
        if record is not None and (record.entries or self._previous.existed):
            record.save(store, self._key)

    def close(self) -> None:
        for part in (self._previous, self._record):
            if part is not None:
                part.close()


def _current_revision_time(revisions: Revisions, oid: bytes) -> float | None:
    """When the current revision of *oid* was committed, per *revisions*;
    None if the object no longer exists."""
    serial = revisions.current(oid)
    return None if serial is None else tid_time(serial)


@dataclass
class _Rules:
    """What one collection judges listed keys by."""

    layout: KeyLayout
    report: CollectionReport
    orphans: _Orphans
    due: _Due
    last_committed: bytes
    now: float
    grace: float
    stale_in_flight: bool
    owed: frozenset[str] | set[str]


def _judge_page(rules: _Rules, revisions: Revisions, page: list) -> None:
    """Judge one listing page: its revisions at or below the last commit
    are asked of the base at once, then every orphan goes to the record
    and the deletes in listing order (the record is a sorted stream)."""
    report = rules.report
    judged: list[tuple[tuple, tuple[bytes, bytes] | None]] = []
    for item in page:
        report.scanned += 1
        parsed = rules.layout.parse(item[0])
        if parsed is None:
            report.foreign += 1
        elif parsed[1] > rules.last_committed:
            if tid_time(parsed[1]) > rules.now + rules.grace:
                report.future += 1
            if item[2] > rules.now - rules.grace:
                report.in_flight += 1  # may be voting: never touched
                continue
            report.stale_in_flight += 1
            if rules.stale_in_flight:
                judged.append((item, None))
        elif item[0] in rules.owed:
            report.kept += 1
        else:
            judged.append((item, parsed))
    held = revisions.held([revision for _, revision in judged if revision])
    for (key, size, last_modified), revision in judged:
        if revision is None:
            rules.orphans.found(key, size, last_modified, rules.due)
        elif revision in held:
            report.kept += 1
        else:
            superseded = functools.partial(
                _current_revision_time, revisions, revision[0]
            )
            rules.orphans.found(key, size, last_modified, rules.due, superseded)


def _ignore(key: str) -> None:
    """No one asked for the keys."""


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
    on_orphan: Callable[[str], None] = _ignore,
) -> CollectionReport:
    """Find, and unless *dry_run* delete, objects no revision of *base* needs.

    A key above the last commit is in flight while S3 modified it within
    *grace* seconds. After that it is stale: counted in the report, and an
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

    *on_orphan* is called with the key of each orphan once S3 deleted it
    (in a dry run, as it is found), in the caller's thread.
    """
    report = CollectionReport()
    # Nothing is judged while another database writes under this prefix:
    # its blobs would look like this one's orphans.
    check_writers(store, layout.prefix, base, max(retention, grace))
    now = time.time()
    orphans = _Orphans(store, layout, report, retention, now)
    try:
        with _Due(store, layout, cache, report, on_orphan, dry_run) as due:
            with current_view(base) as view:
                # Read before listing: anything committed later has a larger tid.
                rules = _Rules(
                    layout,
                    report,
                    orphans,
                    due,
                    view.lastTransaction(),
                    now,
                    grace,
                    stale_in_flight,
                    owed,
                )
                revisions = revisions_of(view)
                with ReadAhead(store.list_objects(layout.root), PAGE) as pages:
                    for page in pages:
                        _judge_page(rules, revisions, page)
            _collect_staging(store, layout, report, now - grace, owed, due)
            _abort_stale_uploads(store, layout, report, now - grace, dry_run)
            if not dry_run:
                orphans.save(store)
            due.finish()
    finally:
        orphans.close()
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
        report.orphans,
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
    due: Callable[[str, int], None],
) -> None:
    """Count the staging objects; those S3 last modified before *expired*
    are orphans, *due* at once (no revision's: no retention applies),
    unless a copy is still owed from them (*owed*)."""
    for key, size, last_modified in store.list_objects(layout.staging_root):
        report.scanned += 1
        if not layout.is_staging_key(key):
            report.foreign += 1
        elif last_modified > expired or key in owed:
            report.staging += 1
        else:
            report.staging_expired += 1
            due(key, size)
