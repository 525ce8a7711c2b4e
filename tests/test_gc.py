"""The orphan collector's rules: keep what the base can still load, drop the
rest in batches, and never touch in-flight or foreign keys."""

from __future__ import annotations

import fcntl
import os
import threading
import time
from pathlib import Path

import pytest
import transaction
import ZODB
from ZODB.blob import Blob
from ZODB.MappingStorage import MappingStorage
from ZODB.serialize import referencesf
from ZODB.utils import p64

import s3env
from s3hooks import requests
from test_storage import keys, stage_one_blob
from zodb_s3blobs import batchdelete, gc
from zodb_s3blobs import storage as storage_module
from zodb_s3blobs.errors import ObjectStoreError
from zodb_s3blobs.gc import IN_FLIGHT_GRACE
from zodb_s3blobs.journal import JOURNAL_DIR, Journal, PendingCopy

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
    assert report.in_flight == 1 and report.orphans == 0
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
    assert report.foreign == 4 and report.orphans == 0
    listed = {k for k, _ in storage._store.list(root[: -len("blobs/")])}
    assert set(foreign) <= listed
    db.close()


class _TwoDaysLater:
    """The collector's clock, two days ahead: every staging object is past
    the grace period (S3's LastModified cannot be set back)."""

    @staticmethod
    def time() -> float:
        return time.time() + 2 * IN_FLIGHT_GRACE


def test_staging_objects_owed_by_any_journal_in_the_cache_dir_are_kept(
    make_storage, monkeypatch
):
    """A journal of a live process (locked) and one of a killed process
    (unlocked) in the cache directory: a collection more than a day later
    keeps both journals' staging objects, deletes an unowed one, and
    leaves the journals as they were (read, not adopted).

    Fails before the fix: only the staging keys of journals this process's
    copier held were kept, so the killed process's was deleted."""
    storage = make_storage()
    layout, client = storage._layout, s3env.server().client()
    owed_live, owed_dead, unowed = (layout.staging_key() for _ in range(3))
    for key in (owed_live, owed_dead, unowed):
        client.put_object(Bucket=s3env.BUCKET, Key=key, Body=b"staged")
    directory = os.path.join(storage._cache.directory, JOURNAL_DIR)

    def journal_of(key: str) -> Journal:
        return Journal.create(
            directory,
            [PendingCopy(key, p64(7), None, True)],
            p64(1),
            "marker",
            storage._destination(),
        )

    live = journal_of(owed_live)
    dead = journal_of(owed_dead)
    dead.release()  # as a SIGKILL leaves it
    before = {path: Path(path).read_bytes() for path in (live.path, dead.path)}
    try:
        monkeypatch.setattr(gc, "time", _TwoDaysLater)
        deleted = []
        report = storage.collect_orphans(on_orphan=deleted.append)
        assert (report.staging, report.staging_expired) == (2, 1)
        assert deleted == [unowed]
        left = {key for key, _size in storage._store.list(layout.staging_root)}
        assert left == {owed_live, owed_dead}
        for path, content in before.items():
            assert Path(path).read_bytes() == content
        # Not adopted: the killed process's journal is free for the next open.
        fd = os.open(dead.path, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        finally:
            os.close(fd)
    finally:
        live.release()


def test_a_pack_whose_journals_cannot_be_read_collects_nothing(
    make_storage, monkeypatch, caplog
):
    """The base packs; the collection stops before listing anything (the
    staging objects the journals owe are unknown) and pack logs an ERROR
    instead of reporting a failed pack.

    Fails before the fix: the PermissionError reached pack's caller."""
    storage = make_storage()
    orphan = storage._layout.key(p64(10_000), p64(5))
    s3env.server().client().put_object(Bucket=s3env.BUCKET, Key=orphan, Body=b"o")

    def unreadable(directory: str, destination: str):
        raise PermissionError(13, "Permission denied", directory)

    monkeypatch.setattr(storage_module, "owed_copies", unreadable)
    storage.pack(time.time(), referencesf)
    assert "orphan collection failed: [Errno 13] Permission denied" in caplog.text
    assert keys(storage) == [orphan]


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
    assert dry.orphans == 2001 and dry.deleted == 0
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


def _collector_threads() -> list[str]:
    return [
        t.name
        for t in threading.enumerate()
        if t.name.startswith(("zodb-s3blobs-readahead", "zodb-s3blobs-delete"))
    ]


def test_a_listing_failure_stops_the_pipeline_after_judged_pages_only(
    make_storage, tmp_path, monkeypatch
):
    """Pages of two keys and deletes of one (the defaults are S3's 1000:
    small ones show the pipeline with few keys): the listing fails on its
    third page. The error reaches the caller, no collector thread is left,
    keys of the pages judged before the failure were deleted and reported,
    and no other key was."""
    storage = make_storage(base=MappingStorage(), gc_retention=0)
    db = ZODB.DB(storage)
    blob_revisions(db, [b"live"])
    f = tmp_path / "f"
    f.write_bytes(b"orphan")
    orphans = [storage._layout.key(p64(10_000 + n), p64(5)) for n in range(6)]
    storage._store.transfer([(str(f), k) for k in orphans], [])
    monkeypatch.setattr(gc, "PAGE", 2)
    monkeypatch.setattr(batchdelete, "DELETE_BATCH", 1)
    listing = storage._store.list_objects

    def failing(prefix):
        for n, item in enumerate(listing(prefix)):
            if n == 4:
                raise ObjectStoreError("LIST", prefix, "connection reset")
            yield item

    monkeypatch.setattr(storage._store, "list_objects", failing)
    deleted = []
    with pytest.raises(ObjectStoreError, match="connection reset"):
        storage.collect_orphans(on_orphan=deleted.append)
    assert _collector_threads() == []
    assert deleted and set(deleted) <= set(orphans[:3])
    monkeypatch.undo()
    assert set(orphans[3:]) <= set(keys(storage)), "never judged, never deleted"
    assert storage.collect_orphans(retention=0).deleted == 6 - len(deleted)
    assert _collector_threads() == []
    db.close()
