"""Where two correct paths meet: abort and the next commit with the same tid,
restore and abort, savepoints and lazy loading, pack and a loaded but unopened
blob, a pack whose orphan deletes fail, and a base whose tid is unknown at
vote. Each test names the defect it pins and fails on the code before its fix.
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass

import pytest
import transaction
import ZODB
from ZODB.BaseStorage import BaseStorage
from ZODB.blob import Blob
from ZODB.Connection import TransactionMetaData
from ZODB.MappingStorage import MappingStorage
from ZODB.POSException import POSKeyError, ReadConflictError
from ZODB.utils import p64, u64, z64

import s3env
from s3hooks import failing, requests
from test_storage import commit_blobs, keys
from zodb_s3blobs import BlobReadError, ObjectStoreError, S3BlobStorage
from zodb_s3blobs.tids import UnsupportedBaseStorage

pytestmark = pytest.mark.s3_servers("moto", "rgw")

#: A tid far in the future: a base whose last tid is this has a clock behind
#: it, and gives every new transaction last + 1 (ZODB.utils.newTid).
FUTURE_TID = p64(u64(b"\x7f" + b"\x00" * 7))


def store_blob(storage, txn, oid: bytes, data: bytes, tmp_path, serial=z64):
    path = tmp_path / f"blob-{os.urandom(4).hex()}"
    path.write_bytes(data)
    storage.storeBlob(oid, serial, b"blob record", str(path), "", txn)


def read_cold(storage, tmp_path, oid: bytes, tid: bytes) -> bytes:
    """The revision's bytes as a fresh process with an empty cache reads them."""
    reader = S3BlobStorage(
        MappingStorage(),
        s3env.settings(prefix=storage._store.settings.prefix),
        str(tmp_path / f"cold-{os.urandom(4).hex()}"),
    )
    try:
        with open(reader.loadBlob(oid, tid), "rb") as f:
            return f.read()
    finally:
        reader.close()


def test_abort_deletes_before_the_next_transaction_can_reuse_its_tid(
    make_storage, tmp_path
):
    """Defect 2. A MappingStorage whose clock is behind its last tid gives the
    next transaction the aborted one's tid. Fails before the fix: abort released
    the base's commit lock first and deleted afterwards, so the late DELETE
    removed the next transaction's acknowledged blob (POSKeyError)."""
    storage = make_storage(base=MappingStorage())
    oid = storage.new_oid()
    first = TransactionMetaData()
    storage.tpc_begin(first, FUTURE_TID)
    store_blob(storage, first, oid, b"v1", tmp_path)
    storage.tpc_vote(first)
    storage.tpc_finish(first)

    aborted = TransactionMetaData()
    storage.tpc_begin(aborted)
    store_blob(storage, aborted, oid, b"aborted", tmp_path, FUTURE_TID)
    storage.tpc_vote(aborted)
    reused_tid = storage._commit.tid

    committed: dict[str, bytes] = {}

    def next_commit():
        txn = TransactionMetaData()
        storage.tpc_begin(txn)  # waits for the base's commit lock
        store_blob(storage, txn, oid, b"acknowledged", tmp_path, FUTURE_TID)
        storage.tpc_vote(txn)
        committed["tid"] = storage.tpc_finish(txn)

    real_delete = storage._store.delete

    def delete_after_a_concurrent_commit(keys, quick=False):
        racer = threading.Thread(target=next_commit)
        racer.start()
        racer.join(timeout=3)  # commits now if the base's lock is free
        try:
            return real_delete(keys, quick=quick)
        finally:
            storage._store.delete = real_delete
            committed["racer"] = racer

    storage._store.delete = delete_after_a_concurrent_commit
    storage.tpc_abort(aborted)
    committed["racer"].join(timeout=30)
    assert committed["tid"] == reused_tid, "the next transaction reused the tid"
    assert read_cold(storage, tmp_path, oid, reused_tid) == b"acknowledged"


@dataclass
class Restore:
    """A restore into a second storage (a FileStorage: it restores) of a
    revision the source storage committed, voting next."""

    source: S3BlobStorage
    target: S3BlobStorage
    txn: TransactionMetaData
    oid: bytes
    tid: bytes


def begin_restore(make_storage, tmp_path, committed: bytes, restored: bytes):
    source = make_storage(base=MappingStorage())
    db = ZODB.DB(source)
    oid, tid = commit_blobs(db, {"b": committed})["b"]
    target = make_storage(settings=source._store.settings)
    txn = TransactionMetaData()
    target.tpc_begin(txn, tid)
    path = tmp_path / f"restored-{os.urandom(4).hex()}"
    path.write_bytes(restored)
    target.restoreBlob(oid, tid, b"record", str(path), None, txn)
    return Restore(source, target, txn, oid, tid)


def test_abort_after_restore_keeps_objects_that_existed_before(make_storage, tmp_path):
    """Defect 5. Restoring a revision whose object is already in S3 (a repeated
    zodbconvert, a rerun after a failure) and then aborting must leave the
    object. Fails before the fix: abort deleted every key it attempted."""
    r = begin_restore(make_storage, tmp_path, b"restored twice", b"restored twice")
    r.target.tpc_vote(r.txn)
    r.target.tpc_abort(r.txn)
    assert read_cold(r.source, tmp_path, r.oid, r.tid) == b"restored twice"


def test_restore_refuses_to_overwrite_different_bytes(make_storage, tmp_path):
    """A restored revision whose object exists with other bytes fails the vote
    naming the key, and the object is left as it was."""
    r = begin_restore(make_storage, tmp_path, b"the original", b"other bytes!")
    with pytest.raises(Exception, match=r.source._layout.key(r.oid, r.tid)):
        r.target.tpc_vote(r.txn)
    r.target.tpc_abort(r.txn)
    assert read_cold(r.source, tmp_path, r.oid, r.tid) == b"the original"


def test_restore_uploads_once_when_run_again(make_storage, tmp_path):
    """A rerun of a restore finds the object with the same bytes and sends no
    PUT for it."""
    r = begin_restore(make_storage, tmp_path, b"same bytes", b"same bytes")
    with requests(r.target._store) as sent:
        r.target.tpc_vote(r.txn)
    r.target.tpc_finish(r.txn)
    assert [op for op, _url in sent if op == "PutObject"] == []
    with open(r.target.loadBlob(r.oid, r.tid), "rb") as f:
        assert f.read() == b"same bytes"


@pytest.mark.parametrize("mode", ["r+", "a"])
def test_open_for_update_of_a_blob_that_exists_only_in_a_savepoint(make_storage, mode):
    """Defect 3, a new blob. Fails before the fix: the lazy-load hook downloaded
    serial z64 (POSKeyError .../0.blob) instead of leaving ZODB to copy the
    savepoint file."""
    db = ZODB.DB(make_storage())
    tm = transaction.TransactionManager()
    conn = db.open(tm)
    conn.root()["b"] = blob = Blob(b"in a savepoint")
    tm.savepoint()
    with blob.open(mode) as f:
        if mode == "a":
            f.write(b", appended")
    tm.commit()
    with blob.open() as f:
        expected = b"in a savepoint" + (b", appended" if mode == "a" else b"")
        assert f.read() == expected
    conn.close()
    db.close()


def test_open_for_update_after_a_savepoint_downloads_nothing(make_storage):
    """Defect 3, a changed blob: its working copy comes from the savepoint
    file. Fails before the fix: the hook downloaded the committed revision, which
    may be gone."""
    storage = make_storage()
    db = ZODB.DB(storage)
    commit_blobs(db, {"b": b"committed"})
    tm = transaction.TransactionManager()
    conn = db.open(tm)
    blob = conn.root()["b"]
    with blob.open("w") as f:
        f.write(b"changed")
    tm.savepoint()
    storage._cache.discard(blob._p_oid, blob._p_serial)
    with requests(storage._store) as sent, blob.open("a") as f:
        f.write(b" again")
    assert sent == []
    tm.commit()
    with blob.open() as f:
        assert f.read() == b"changed again"
    conn.close()
    db.close()


def test_a_revision_packed_away_after_loading_is_a_read_conflict(make_storage):
    """Defect 9. A connection loads a Blob (lazily: nothing downloaded), another
    commits a new revision and a pack removes the old one from the base and S3.
    Opening the loaded blob raises ReadConflictError, which Zope retries with a
    fresh transaction, never a hang or wrong bytes. (gc-retention 0: with the
    default the object outlives the pack and the old bytes read back.)"""
    storage = make_storage(base=MappingStorage(), gc_retention=0)
    db = ZODB.DB(storage)
    commit_blobs(db, {"b": b"old"})
    reader_tm = transaction.TransactionManager()
    reader = db.open(reader_tm)
    blob = reader.root()["b"]
    blob._p_activate()
    storage._cache.discard(blob._p_oid, blob._p_serial)
    commit_blobs(db, {"b": b"new"})
    db.pack()
    with pytest.raises(ReadConflictError) as info:
        blob.open().read()
    assert "removed by a pack" in str(info.value), "printable, naming the cause"
    reader_tm.abort()
    with reader.root()["b"].open() as f:
        assert f.read() == b"new"
    reader.close()
    db.close()


def test_a_revision_missing_from_s3_that_the_base_holds_is_a_poskeyerror(
    make_storage,
):
    """Data loss is not a conflict: the base still holds the revision, so a
    missing object is a POSKeyError naming the key."""
    storage = make_storage(base=MappingStorage())
    db = ZODB.DB(storage)
    oid, tid = commit_blobs(db, {"b": b"lost"})["b"]
    storage._cache.discard(oid, tid)
    storage._store.delete([storage._layout.key(oid, tid)])
    with pytest.raises(POSKeyError, match=storage._layout.key(oid, tid)):
        storage.loadBlob(oid, tid)
    db.close()


def test_pack_succeeds_when_only_the_orphan_deletes_fail(make_storage, caplog):
    """The base pack worked: pack() returns, logs an error with the count and
    the first keys, and leaves the orphans for `zodb-s3blobs gc`."""
    storage = make_storage(base=MappingStorage(), gc_retention=0)  # due at once
    db = ZODB.DB(storage)
    old = commit_blobs(db, {"b": b"old"})["b"]
    commit_blobs(db, {"b": b"new"})
    orphan = storage._layout.key(*old)
    with (
        failing(storage._store, "DeleteObjects", code="InternalError", status=500),
        caplog.at_level(logging.ERROR, logger="zodb_s3blobs"),
    ):
        db.pack()
    assert orphan in keys(storage)
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert any("1 orphan" in m and orphan in m and "gc" in m for m in errors), errors
    assert storage.collect_orphans().deleted == 1
    assert orphan not in keys(storage)
    db.close()


class _TidAtFinish(BaseStorage):
    """A BaseStorage subclass that chooses its tid in tpc_finish, as NEO's client
    storage does."""


def test_a_base_storage_subclass_without_a_tested_rule_is_refused(make_storage):
    """Defect 7. Fails before the fix: every BaseStorage subclass was accepted
    and its (stale) _tid used for the keys."""
    with pytest.raises(UnsupportedBaseStorage, match="_TidAtFinish"):
        make_storage(base=_TidAtFinish("tid-at-finish"))


def test_storage_opens_while_s3_is_unreachable_and_fails_reads_clearly(
    tmp_path, caplog
):
    """A short S3 outage during a restart must not take the site down: the
    storage opens with an ERROR naming the endpoint, serves what needs no S3,
    and fails a cold read and a vote with blobs clearly. Fails before the fix:
    any HeadBucket failure refused the open."""
    from ports import free_port

    endpoint = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    settings = s3env.settings(endpoint_url=endpoint)
    with caplog.at_level(logging.ERROR, logger="zodb_s3blobs"):
        storage = S3BlobStorage(MappingStorage(), settings, str(tmp_path / "c"))
    try:
        assert any(endpoint in r.getMessage() for r in caplog.records)
        db = ZODB.DB(storage)
        with db.transaction() as conn:
            conn.root()["plain"] = "pages still work"
        with pytest.raises(BlobReadError, match="127.0.0.1"):
            storage.loadBlob(p64(1), p64(2))
        with pytest.raises(ObjectStoreError):
            commit_blobs(db, {"b": b"cannot be stored yet"})
        transaction.abort()
        db.close()
    finally:
        storage.close()


def test_append_to_a_blob_larger_than_the_cache_keeps_its_bytes(make_storage):
    """Defect 11. Blob.open('a') downloads the committed file (the lazy-load
    hook), then ZODB copies it into a working file by path. An eviction in
    between (the blob is larger than the cache) made the copy fail after ZODB
    had already set an empty working file; a retried append then committed only
    the appended bytes, and a read in between returned 0 bytes without error.
    Eviction now leaves files used within the last minute. The eviction check
    runs synchronously here so the race is certain."""
    storage = make_storage(cache_size=1000)
    db = ZODB.DB(storage)
    original = os.urandom(50_000)
    oid, tid = commit_blobs(db, {"b": original})["b"]
    cache = storage._cache
    cache.discard(oid, tid)
    cache._start_check = lambda: cache.evict(wait=True)
    tm = transaction.TransactionManager()
    conn = db.open(tm)
    blob = conn.root()["b"]
    for _attempt in range(2):  # as code that retries a failed open would
        try:
            with blob.open("a") as f:
                f.write(b"appended")
            break
        except FileNotFoundError:
            continue
    tm.commit()
    cache.discard(oid, blob._p_serial)
    with blob.open() as f:
        assert f.read() == original + b"appended", "the committed bytes were cut"
    conn.close()
    db.close()


def test_restore_over_an_object_without_a_checksum_uploads_and_abort_keeps_it(
    make_storage, tmp_path
):
    """An object of the same size but no recorded CRC32 (written by 1.x or
    another tool) cannot be compared: the restore uploads its bytes (the same
    revision's), and an abort leaves the object, which existed before. Fails
    before the fix: it was taken as identical and its bytes served."""
    source = make_storage(base=MappingStorage())
    store, layout = source._store, source._layout
    oid, tid = p64(7), p64(u64(FUTURE_TID) - 1)
    key = layout.key(oid, tid)
    store._client.put_object(Bucket=store.bucket, Key=key, Body=b"STALE-BYTES!")
    restored = tmp_path / "restored"
    restored.write_bytes(b"restored-new")

    def restore(finish: bool) -> None:
        target = make_storage(settings=store.settings)
        txn = TransactionMetaData()
        target.tpc_begin(txn, tid)
        copy = tmp_path / f"copy-{finish}"
        copy.write_bytes(restored.read_bytes())
        target.restoreBlob(oid, tid, b"record", str(copy), None, txn)
        target.tpc_vote(txn)
        if finish:
            target.tpc_finish(txn)
        else:
            target.tpc_abort(txn)

    restore(finish=False)
    assert key in keys(source), "abort kept the object that existed before"
    restore(finish=True)
    assert read_cold(source, tmp_path, oid, tid) == b"restored-new"


def test_abort_on_a_tid_reusing_base_deletes_once_under_the_lock(make_storage):
    """MappingStorage may reuse an aborted tid, so abort deletes before the base
    releases its lock, but tries once with short timeouts: S3 trouble must not
    hold every other commit for minutes. What is left is logged for gc."""
    storage = make_storage(base=MappingStorage())
    db = ZODB.DB(storage)
    tm = transaction.TransactionManager()
    conn = db.open(tm)
    conn.root()["b"] = Blob(b"aborted")
    with failing(
        storage._store, "DeleteObjects", code="ServiceUnavailable", status=503
    ) as refused:
        txn = TransactionMetaData()
        storage.tpc_begin(txn)
        storage.storeBlob(storage.new_oid(), z64, b"r", _file(b"x"), "", txn)
        storage.tpc_vote(txn)
        storage.tpc_abort(txn)
    assert len(refused) == 1, "one try, not the upload client's five"
    tm.abort()
    db.close()


def test_abort_on_file_storage_deletes_after_releasing_the_lock(make_storage):
    """FileStorage never reuses a tid, so its abort deletes after the commit
    lock is released (patiently: retries do not block other commits)."""
    storage = make_storage()
    lock_free_while_deleting = []
    real_delete = storage._store.delete

    def delete(keys, quick=False):
        lock = storage._base._commit_lock
        lock_free_while_deleting.append((lock.acquire(blocking=False), quick))
        lock.release()
        return real_delete(keys, quick=quick)

    storage._store.delete = delete
    txn = TransactionMetaData()
    storage.tpc_begin(txn)
    storage.storeBlob(storage.new_oid(), z64, b"r", _file(b"x"), "", txn)
    storage.tpc_vote(txn)
    storage.tpc_abort(txn)
    assert lock_free_while_deleting == [(True, False)]


def _file(data: bytes) -> str:
    import tempfile

    fd, path = tempfile.mkstemp()
    os.write(fd, data)
    os.close(fd)
    return path


def test_a_vote_fails_only_after_every_upload_has_ended(make_storage, tmp_path):
    """One upload failing with an unexpected exception must not end the vote
    while others still run: the abort would delete their keys and the late
    uploads write them again, orphans no log names. Fails before the fix:
    transfer() waited only on failures it knew (ClientError, BotoCoreError,
    OSError) and raised at the first other one."""
    from concurrent.futures import Future

    storage = make_storage()
    store = storage._store
    real_upload = store._transfers.upload
    slow_done = threading.Event()

    def upload(path, bucket, key, extra_args=None):
        if key.endswith("/1.blob"):
            broken: Future = Future()
            broken.set_exception(ValueError("unexpected"))
            return broken
        return _Waited(real_upload(path, bucket, key, extra_args=extra_args))

    class _Waited:
        """A transfer future that notes when the vote waited for its end."""

        def __init__(self, future) -> None:
            self.future = future

        def result(self):
            try:
                return self.future.result()
            finally:
                slow_done.set()

    store._transfers.upload = upload
    files = []
    for n in (1, 2):
        f = tmp_path / f"f{n}"
        f.write_bytes(os.urandom(200_000))
        files.append((str(f), f"{storage._layout.root}x/{n}.blob"))
    with pytest.raises(ObjectStoreError, match="unexpected"):
        store.transfer(files, [])
    assert slow_done.is_set(), "the other upload had ended when the vote failed"
