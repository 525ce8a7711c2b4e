"""Which blob revisions the base storage still holds: the questions the
collector and the read path ask the base.

The rule is ZODB's own ``BlobStorage._packUndoing``: a revision is needed
while the base can load it with ``loadSerial``. :func:`revision_held` asks
that of one revision; :func:`revisions_of` answers it for a whole listing
page at once, with the same answer and far fewer questions:

- RelStorage: one query per page, on the view's load connection (the
  snapshot it polled), of ``object_state`` for the page's oids: every
  revision in a history-preserving database, the current one in a
  history-free one (RelStorage's own ``load_revision`` reads that table);
- FileStorage: each oid's chain of data records is walked once per page,
  from its current record down to the oldest tid the page asks about, where
  ``loadSerial`` walks it again for every revision (an object of R
  revisions cost O(R^2) reads, and now O(R));
- any other base (MappingStorage, DemoStorage, a ZEO ClientStorage):
  ``loadSerial`` per revision, as before.

The batched answers are tested equal to the per-revision rule
(tests/test_revisions.py) on FileStorage after undo and pack, and on
RelStorage, SQLite and PostgreSQL, history-free and history-preserving.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterable, Iterator, Sequence

from ZODB.FileStorage import FileStorage
from ZODB.interfaces import IMVCCStorage
from ZODB.POSException import POSKeyError
from ZODB.utils import p64, u64

#: One revision: (oid, tid), 8 bytes each.
Revision = tuple[bytes, bytes]


def revision_exists(base, oid: bytes, tid: bytes) -> bool:
    """Can *base* still load revision *tid* of *oid*? (ZODB's own pack rule.)"""
    try:
        base.loadSerial(oid, tid)
    except (POSKeyError, KeyError):
        return False
    return True


def _is_relstorage(view) -> bool:
    relstorage = sys.modules.get("relstorage.storage")
    return relstorage is not None and isinstance(view, relstorage.RelStorage)


def revision_held(view, oid: bytes, tid: bytes) -> bool:
    """:func:`revision_exists`, as the database itself answers it, for the
    collector's :func:`current_view`. RelStorage 4's ``loadSerial`` answers
    from its local cache first, even for a revision another process has
    packed away (relstorage/storage/load.py), so a process whose connections
    still viewed that revision would keep its object; its database is asked
    instead, through the view's load connection, which sees the snapshot the
    view polled (tested in tests/test_relstorage.py)."""
    if not _is_relstorage(view):
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


class Revisions:
    """The per-revision rule, asked of any base: ``loadSerial`` for each
    revision, ``load`` for an object's current one."""

    def __init__(self, view) -> None:
        self._view = view

    def held(self, revisions: Sequence[Revision]) -> set[Revision]:
        """Those of *revisions* the base can still load."""
        return {r for r in revisions if revision_held(self._view, *r)}

    def current(self, oid: bytes) -> bytes | None:
        """The tid of *oid*'s current revision; None if it no longer exists."""
        try:
            _data, serial = self._view.load(oid)
        except (POSKeyError, KeyError):
            return None
        return serial


def _oldest_asked(revisions: Iterable[Revision]) -> dict[bytes, bytes]:
    """oid -> the oldest tid asked about it."""
    oldest: dict[bytes, bytes] = {}
    for oid, tid in revisions:
        if oid not in oldest or tid < oldest[oid]:
            oldest[oid] = tid
    return oldest


class _FileStorageRevisions(Revisions):
    """A FileStorage's data record chains, each walked once per page, under
    the storage's lock, as ``loadSerial`` reads them: a record whose tid is
    asked is held if it has data, or a backpointer that leads to data (the
    undo of an object's creation leads nowhere)."""

    def held(self, revisions: Sequence[Revision]) -> set[Revision]:
        asked = set(revisions)
        held: set[Revision] = set()
        fs = self._view
        for oid, oldest in _oldest_asked(revisions).items():
            with fs._lock:
                pos = fs._index.get(oid, 0)
                while pos:
                    header = fs._read_data_header(pos, oid)
                    if header.tid < oldest:
                        break
                    if (oid, header.tid) in asked and self._has_data(oid, header):
                        held.add((oid, header.tid))
                    pos = header.prev
        return held

    def _has_data(self, oid: bytes, header) -> bool:
        if header.plen:
            return True
        try:
            self._view._loadBack_impl(oid, header.back)
        except POSKeyError:
            return False
        return True


#: Selects, for the page's oids, each revision RelStorage's ``load_revision``
#: finds in ``object_state`` and whether it has a state (a NULL one, the undo
#: of an object's creation, loads as None).
_STATE_QUERY = ("zoid", "tid", "CASE WHEN state IS NULL THEN 0 ELSE 1 END")


class _RelStorageRevisions(Revisions):
    """One query per page of ``object_state`` through the view's load
    connection; the rows also tell each object's current revision (its
    newest row: every revision in a history-preserving database, the current
    only in a history-free one), so the retention's question costs nothing."""

    def __init__(self, view) -> None:
        super().__init__(view)
        self._current: dict[bytes, bytes | None] = {}

    def held(self, revisions: Sequence[Revision]) -> set[Revision]:
        oids = sorted({u64(oid) for oid, _tid in revisions})
        cursor = self._view._load_connection.cursor
        batcher = self._view._adapter.mover.make_batcher(cursor)
        newest: dict[int, tuple[int, bool]] = {}
        loadable: set[tuple[int, int]] = set()
        for zoid, tid, has_state in batcher.select_from(
            _STATE_QUERY, "object_state", zoid=oids
        ):
            if has_state:
                loadable.add((zoid, tid))
            if zoid not in newest or tid > newest[zoid][0]:
                newest[zoid] = (tid, bool(has_state))
        self._current = {
            p64(zoid): p64(newest[zoid][0])
            if zoid in newest and newest[zoid][1]
            else None
            for zoid in oids
        }
        return {r for r in revisions if (u64(r[0]), u64(r[1])) in loadable}

    def current(self, oid: bytes) -> bytes | None:
        """Answered from the last page's rows when *oid* was on it."""
        if oid in self._current:
            return self._current[oid]
        return super().current(oid)


def revisions_of(view) -> Revisions:
    """The fastest exact way to ask *view* (see :func:`current_view`) which
    revisions it holds."""
    if _is_relstorage(view):
        return _RelStorageRevisions(view)
    if isinstance(view, FileStorage):
        return _FileStorageRevisions(view)
    return Revisions(view)
