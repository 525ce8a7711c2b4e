"""The orphan collector's rules: keep what the base can still load, drop the
rest in batches, and never touch in-flight or foreign keys."""

from __future__ import annotations

import os
import time

import pytest
import transaction
import ZODB
from ZODB.blob import Blob
from ZODB.MappingStorage import MappingStorage
from ZODB.serialize import referencesf
from ZODB.utils import p64

from s3hooks import requests
from test_storage import keys, stage_one_blob

pytestmark = pytest.mark.s3_servers("moto", "rgw")


def blob_revisions(db, contents: list[bytes]) -> list[tuple[bytes, bytes, float]]:
    """Commit one blob object with each content in turn; return
    (oid, tid, time just after the commit) per revision."""
    tm = transaction.TransactionManager()
    conn = db.open(tm)
    conn.root()["b"] = blob = Blob()
    revisions = []
    for data in contents:
        with blob.open("w") as f:
            f.write(data)
        tm.commit()
        blob._p_activate()
        time.sleep(0.02)
        revisions.append((blob._p_oid, blob._p_serial, time.time()))
        time.sleep(0.02)
    conn.close()
    return revisions


def test_history_preserving_pack_keeps_what_the_base_keeps(make_storage):
    storage = make_storage(gc_retention=0)  # what pack deletes, at once
    db = ZODB.DB(storage)
    (o, t1, _), (_, t2, after2), (_, t3, _) = blob_revisions(db, [b"1", b"2", b"3"])
    key = storage._layout.key
    db.pack(after2)  # revision 2 was current then: undo may still need it
    assert keys(storage) == sorted([key(o, t2), key(o, t3)])
    assert storage._cache.lookup(o, t1) is None, "cached copy dropped"
    assert storage._cache.lookup(o, t2) is not None
    conn = db.open()
    del conn.root()["b"]
    transaction.commit()
    conn.close()
    db.pack(time.time() + 1)
    assert keys(storage) == [], "an unreachable object loses every revision"
    db.close()


def test_history_free_pack_keeps_only_current_revisions(make_storage):
    # Retention 0: what pack deletes, at once (test_gc_retention: the default).
    storage = make_storage(base=MappingStorage(), gc_retention=0)
    db = ZODB.DB(storage)
    revisions = blob_revisions(db, [b"1", b"2", b"3"])
    oid, current, _ = revisions[-1]
    db.pack(time.time() + 1)
    assert keys(storage) == [storage._layout.key(oid, current)]
    db.close()


def test_keys_of_a_transaction_still_voting_are_never_collected(make_storage):
    storage = make_storage()
    txn, oid = stage_one_blob(storage, b"in flight")
    storage.tpc_vote(txn)
    (in_flight,) = storage._commit.attempted_keys
    report = storage.collect_orphans()
    assert report.in_flight == 1 and report.orphans == []
    tid = storage.tpc_finish(txn)
    assert keys(storage) == [in_flight]
    with open(storage.loadBlob(oid, tid), "rb") as f:
        assert f.read() == b"in flight"


def test_foreign_keys_are_left_alone(make_storage, tmp_path):
    storage = make_storage()
    db = ZODB.DB(storage)
    blob_revisions(db, [b"1"])
    root = storage._layout.root
    foreign = [
        root + "01/2.blob",  # leading zero
        root + "1/2.blob.tmp",
        root + "1/2/3.blob",
        root + "README",
        root[: -len("blobs/")] + "elsewhere/1/2.blob",
    ]
    f = tmp_path / "f"
    f.write_bytes(b"not ours")
    storage._store.transfer([(str(f), k) for k in foreign], [])
    report = storage.collect_orphans()
    assert report.foreign == 4 and report.orphans == []
    listed = {k for k, _ in storage._store.list(root[: -len("blobs/")])}
    assert set(foreign) <= listed
    db.close()


def test_orphans_are_deleted_1000_keys_a_request(make_storage, tmp_path):
    storage = make_storage(gc_retention=0)  # the batches of an immediate delete
    db = ZODB.DB(storage)
    blob_revisions(db, [b"live"])
    live = keys(storage)
    f = tmp_path / "f"
    f.write_bytes(b"orphan")
    # Revisions of objects the base never had, older than its last commit.
    orphans = [storage._layout.key(p64(10_000 + n), p64(5)) for n in range(2001)]
    storage._store.transfer([(str(f), k) for k in orphans], [])
    dry = storage.collect_orphans(dry_run=True)
    assert len(dry.orphans) == 2001 and dry.deleted == 0
    assert len(keys(storage)) == 2002
    with requests(storage._store) as sent:
        report = storage.collect_orphans()
    deletes = [op for op, _url in sent if op == "DeleteObjects"]
    assert len(deletes) == 3
    assert report.deleted == 2001 and report.orphan_bytes == 2001 * len(b"orphan")
    assert keys(storage) == live
    db.close()


def test_pack_refuses_to_run_twice_at_once(make_storage):
    storage = make_storage()
    storage._shared.pack_lock.acquire()
    try:
        try:
            storage.pack(time.time(), referencesf)
        except Exception as exc:
            assert "Already packing" in str(exc)
        else:
            raise AssertionError("a second pack ran")
    finally:
        storage._shared.pack_lock.release()
    assert os.path.isdir(storage.temporaryDirectory())
