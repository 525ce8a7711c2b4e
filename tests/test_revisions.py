"""The collector's batched question -- which of a page's revisions does the
base still hold? -- answers exactly as ZODB's per-revision rule
(``loadSerial``, or RelStorage's ``load_revision``): on FileStorage after
undo and pack, on RelStorage (SQLite and PostgreSQL, history-free and
history-preserving), and with one database query per page on RelStorage."""

from __future__ import annotations

import itertools
import time

import transaction
import ZODB
import ZODB.config
from persistent.mapping import PersistentMapping
from ZODB.FileStorage import FileStorage
from ZODB.MappingStorage import MappingStorage
from ZODB.utils import p64

from zodb_s3blobs.revisions import (
    Revisions,
    _FileStorageRevisions,
    _RelStorageRevisions,
    current_view,
    revision_held,
    revisions_of,
)

#: An oid no test database ever allocates.
UNKNOWN = p64(1 << 40)


def _commit(db, change) -> bytes:
    """Run *change*(root), which returns the object it changed, in one
    transaction; return its tid."""
    tm = transaction.TransactionManager()
    conn = db.open(tm)
    changed = change(conn.root())
    tm.commit()
    tid = changed._p_serial
    conn.close()
    time.sleep(0.01)  # distinct pack times
    return tid


def _create_a(root):
    root["a"] = PersistentMapping()
    return root


def _undo_last(db) -> bytes:
    """Undo the last transaction; return the undo's tid."""
    tm = transaction.TransactionManager()
    conn = db.open(tm)
    db.undo(db.undoLog(0, 1)[0]["id"], tm.get())
    tm.commit()
    tid = conn.root()._p_serial
    conn.close()
    return tid


def _history(db, history_preserving: bool) -> tuple[list[bytes], list[bytes]]:
    """Fill *db*: objects with many revisions, one created and undone, one
    change undone, one object dropped, then a pack in the middle; return
    (every oid, every tid) it ever had."""
    tids = []

    def new(name: str):
        def change(root):
            root[name] = PersistentMapping()
            return root

        return change

    def edit(name: str, value: int):
        def change(root):
            root[name]["v"] = value
            return root[name]

        return change

    def drop(root):
        del root["gone"]
        return root

    for name in ("a", "b", "c", "gone"):
        tids.append(_commit(db, new(name)))
    for value in range(5):
        for name in ("a", "b", "gone"):
            tids.append(_commit(db, edit(name, value)))
    middle = time.time()
    time.sleep(0.01)
    # After the pack time, so that the pack keeps their records:
    tids.append(_commit(db, new("undone")))
    if history_preserving:
        tids.append(_undo_last(db))  # the object's creation undone
    tids.append(_commit(db, edit("c", 99)))
    if history_preserving:
        tids.append(_undo_last(db))  # a change undone: a backpointer
    for value in range(5, 8):
        tids.append(_commit(db, edit("a", value)))
    tids.append(_commit(db, drop))
    db.pack(middle)
    tids.append(_commit(db, edit("b", 100)))
    oids = [p64(n) for n in range(8)] + [UNKNOWN]
    return oids, tids


def _same_as_per_revision_rule(view, oids, tids, page: int = 7) -> Revisions:
    """Assert the batched answers, asked page by page in key order, equal
    the per-revision rule for every (oid, tid) pair; return the lookup."""
    lookup = revisions_of(view)
    asked = sorted(itertools.product(oids, tids))
    expected = {r for r in asked if revision_held(view, *r)}
    assert expected, "the test database holds revisions"
    assert len(expected) < len(asked), "and has packed or undone some"
    held = set()
    for start in range(0, len(asked), page):
        chunk = asked[start : start + page]
        held |= lookup.held(chunk)
        for oid in {oid for oid, _ in chunk}:
            assert lookup.current(oid) == Revisions(view).current(oid), oid
    assert held == expected
    return lookup


def test_filestorage_after_undo_and_pack_answers_as_loadserial(tmp_path):
    db = ZODB.DB(FileStorage(str(tmp_path / "Data.fs")))
    oids, tids = _history(db, history_preserving=True)
    lookup = _same_as_per_revision_rule(db.storage, oids, tids)
    assert isinstance(lookup, _FileStorageRevisions)
    db.close()


def test_filestorage_walks_each_chain_once_per_page(tmp_path, monkeypatch):
    """An object of R revisions costs O(R) record reads per page, not O(R^2):
    fails with a per-revision ``loadSerial``, which walks back from the
    current record for every revision."""
    db = ZODB.DB(FileStorage(str(tmp_path / "Data.fs")))

    def edit(root, value):
        root["a"]["v"] = value
        return root["a"]

    root = _commit(db, _create_a)
    tids = [root] + [_commit(db, lambda r, v=v: edit(r, v)) for v in range(60)]
    storage = db.storage
    reads = []
    read_header = storage._read_data_header
    monkeypatch.setattr(
        storage,
        "_read_data_header",
        lambda *a, **kw: reads.append(1) or read_header(*a, **kw),
    )
    oid = p64(1)
    held = revisions_of(storage).held([(oid, tid) for tid in tids])
    assert len(held) == 61  # every revision of the object
    assert len(reads) <= 61
    db.close()


def test_other_bases_ask_loadserial_per_revision():
    db = ZODB.DB(MappingStorage())
    tid = _commit(db, _create_a)
    lookup = revisions_of(db.storage)
    assert type(lookup) is Revisions
    assert lookup.held([(p64(1), tid), (UNKNOWN, tid)]) == {(p64(1), tid)}
    db.close()


class _CountingCursor:
    """A DB-API cursor that counts the statements it executes."""

    def __init__(self, cursor) -> None:
        self._cursor = cursor
        self.statements: list[str] = []

    def execute(self, statement, *args, **kw):
        self.statements.append(statement)
        return self._cursor.execute(statement, *args, **kw)

    def __getattr__(self, name):
        return getattr(self._cursor, name)

    def __iter__(self):
        return iter(self._cursor)


def test_relstorage_answers_as_load_revision_in_one_query_a_page(relstorage_base):
    db = ZODB.DB(ZODB.config.storageFromString(relstorage_base.section))
    oids, tids = _history(db, relstorage_base.keep_history)
    with current_view(db.storage) as view:
        lookup = _same_as_per_revision_rule(view, oids, tids)
        assert isinstance(lookup, _RelStorageRevisions)
        # A listing page: up to 1000 keys, here every pair asked.
        page = sorted(itertools.product(oids, tids))[:1000]
        expected = {r for r in page if revision_held(view, *r)}
        connection = view._load_connection
        counting = _CountingCursor(connection.cursor)
        connection.cursor = counting
        assert lookup.held(page) == expected
        assert len(counting.statements) == 1, counting.statements
        counting.statements.clear()
        for oid in oids:
            lookup.current(oid)
        assert counting.statements == [], "the page's rows tell the current revision"
    db.close()
