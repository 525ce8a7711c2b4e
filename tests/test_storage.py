"""S3BlobStorage's own contracts, beyond ZODB's suites: what vote, finish and
abort do in S3 and on disk, read errors, and the bases it wraps."""

from __future__ import annotations

import os
import stat
import threading

import pytest
import transaction
import ZODB
from ZODB.blob import Blob
from ZODB.Connection import TransactionMetaData
from ZODB.DemoStorage import DemoStorage
from ZODB.MappingStorage import MappingStorage
from ZODB.POSException import POSKeyError
from ZODB.tests.MVCCMappingStorage import MVCCMappingStorage
from ZODB.utils import oid_repr, tid_repr, z64

import s3env
from s3hooks import failing, requests
from zodb_s3blobs import BlobReadError, ObjectStoreError

pytestmark = pytest.mark.s3_servers("moto", "rgw")


def keys(storage) -> list[str]:
    return sorted(k for k, _size in storage._store.list(storage._layout.root))


def commit_blobs(db, payloads: dict[str, bytes]) -> dict[str, tuple[bytes, bytes]]:
    """Commit one Blob per payload; return name -> (oid, serial)."""
    tm = transaction.TransactionManager()
    conn = db.open(tm)
    for name, data in payloads.items():
        conn.root()[name] = Blob(data)
    tm.commit()
    refs = {}
    for name in payloads:
        blob = conn.root()[name]
        blob._p_activate()  # committed blobs are ghosts until activated
        refs[name] = blob._p_oid, blob._p_serial
    conn.close()
    return refs


def test_commit_uploads_every_blob_and_reads_back_with_an_empty_cache(
    make_storage, tmp_path
):
    storage = make_storage()
    db = ZODB.DB(storage)
    payloads = {f"b{i}": os.urandom(1000 * i + 1) for i in range(12)}
    refs = commit_blobs(db, payloads)
    assert len(keys(storage)) == 12
    db.close()

    reader = make_storage(
        settings=storage._store.settings,
        base=MappingStorage(),
        cache_dir=tmp_path / "empty",
    )
    for name, (oid, tid) in refs.items():
        with open(reader.loadBlob(oid, tid), "rb") as f:
            assert f.read() == payloads[name]


def stage_one_blob(storage, data: bytes) -> tuple[TransactionMetaData, bytes]:
    """tpc_begin and storeBlob one new blob; return the transaction and oid."""
    txn = TransactionMetaData()
    storage.tpc_begin(txn)
    oid = storage.new_oid()
    path = os.path.join(storage.temporaryDirectory(), "incoming")
    with open(path, "wb") as f:
        f.write(data)
    storage.storeBlob(oid, z64, b"record", path, "", txn)
    assert not os.path.exists(path), "storeBlob takes the file over"
    return txn, oid


def test_finish_installs_the_staged_file_by_rename_without_s3_requests(make_storage):
    storage = make_storage()
    txn, oid = stage_one_blob(storage, b"x" * 5000)
    storage.tpc_vote(txn)
    (staged,) = storage._commit.blobs.values()
    inode = os.stat(staged.path).st_ino
    with requests(storage._store) as sent:
        tid = storage.tpc_finish(txn)
    assert sent == []
    path = storage._cache.path(oid, tid)
    assert os.stat(path).st_ino == inode, "installed by rename, not copied"
    assert os.listdir(storage.temporaryDirectory()) == []
    assert keys(storage) == [storage._layout.key(oid, tid)]


def test_vote_uploads_under_the_tid_finish_commits(make_storage):
    for base in (MappingStorage(), DemoStorage()):
        storage = make_storage(base=base)
        txn, oid = stage_one_blob(storage, b"tid check")
        storage.tpc_vote(txn)
        uploaded = list(storage._commit.attempted_keys)
        tid = storage.tpc_finish(txn)
        assert uploaded == [storage._layout.key(oid, tid)]


def test_committed_files_are_read_only_and_private(make_storage):
    storage = make_storage()
    db = ZODB.DB(storage)
    path = storage.loadBlob(*commit_blobs(db, {"b": b"data"})["b"])
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o400
    for directory in (
        os.path.dirname(path),
        os.path.dirname(os.path.dirname(path)),
        storage._cache.directory,
        storage.temporaryDirectory(),
    ):
        assert stat.S_IMODE(os.stat(directory).st_mode) == 0o700
    db.close()


def test_failed_upload_fails_the_vote_naming_the_key_and_abort_leaves_nothing(
    make_storage,
):
    storage = make_storage()
    db = ZODB.DB(storage)
    commit_blobs(db, {"keep": b"already committed"})
    before = keys(storage)
    tm = transaction.TransactionManager()
    conn = db.open(tm)
    for i in range(8):
        conn.root()[f"b{i}"] = Blob(os.urandom(3000))
    conn.add(conn.root()["b3"])
    victim = f"/blobs/{conn.root()['b3']._p_oid.hex().lstrip('0')}/"
    with (
        failing(storage._store, "PutObject", lambda url: victim in url) as hit,
        pytest.raises(ObjectStoreError) as info,
    ):
        tm.commit()
    assert hit, "the injected failure was reached"
    message = str(info.value)
    assert victim in message and "AccessDenied" in message
    assert "s3://" in message
    tm.abort()
    assert keys(storage) == before, "abort deleted the 7 uploaded objects"
    assert os.listdir(storage.temporaryDirectory()) == []
    conn.close()
    db.close()


def test_abort_before_vote_uploads_nothing(make_storage):
    storage = make_storage()
    db = ZODB.DB(storage)
    tm = transaction.TransactionManager()
    conn = db.open(tm)
    conn.root()["b"] = Blob(b"never")
    with requests(storage._store) as sent:
        conn.root()._p_jar.transaction_manager.savepoint()
        tm.abort()
    assert sent == []
    assert keys(storage) == []
    db.close()


def test_missing_object_is_a_poskeyerror_naming_the_key(make_storage):
    storage = make_storage()
    db = ZODB.DB(storage)
    oid, tid = commit_blobs(db, {"b": b"gone soon"})["b"]
    storage._store.delete([storage._layout.key(oid, tid)])
    storage._cache.discard(oid, tid)
    with pytest.raises(POSKeyError) as info:
        storage.loadBlob(oid, tid)
    assert storage._layout.key(oid, tid) in str(info.value)
    db.close()


def test_refused_read_is_a_storage_error_not_a_missing_blob(make_storage):
    storage = make_storage()
    db = ZODB.DB(storage)
    oid, tid = commit_blobs(db, {"b": b"refused"})["b"]
    storage._cache.discard(oid, tid)
    with (
        failing(storage._store, "GetObject"),
        pytest.raises(BlobReadError) as info,
    ):
        storage.loadBlob(oid, tid)
    assert not isinstance(info.value, POSKeyError)
    assert "AccessDenied" in str(info.value)
    assert oid_repr(oid) in str(info.value) and tid_repr(tid) in str(info.value)
    assert storage._layout.key(oid, tid) in str(info.value)
    assert os.listdir(storage.temporaryDirectory()) == [], "no partial file left"
    assert not os.path.exists(storage._cache.path(oid, tid))
    with open(storage.loadBlob(oid, tid), "rb") as f:  # and it recovers
        assert f.read() == b"refused"
    db.close()


def test_threads_loading_one_blob_download_it_once(make_storage):
    storage = make_storage()
    db = ZODB.DB(storage)
    data = os.urandom(300_000)
    oid, tid = commit_blobs(db, {"b": data})["b"]
    storage._cache.discard(oid, tid)
    start = threading.Barrier(8)
    results, errors = [], []

    def load():
        start.wait()
        try:
            with open(storage.loadBlob(oid, tid), "rb") as f:
                results.append(f.read())
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    with requests(storage._store) as sent:
        threads = [threading.Thread(target=load) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert errors == []
    assert results == [data] * 8
    assert [op for op, _url in sent] == ["GetObject"]
    db.close()


def test_undo_of_a_blob_change_copies_the_object_server_side(make_storage):
    storage = make_storage()
    db = ZODB.DB(storage)
    tm = transaction.TransactionManager()
    conn = db.open(tm)
    conn.root()["b"] = Blob(b"first")
    tm.commit()
    with conn.root()["b"].open("w") as f:
        f.write(b"second")
    tm.commit()
    db.undo(db.undoLog(0, 1)[0]["id"], tm.get())
    with requests(storage._store) as sent:
        tm.commit()
    assert "CopyObject" in [op for op, _url in sent]
    assert "PutObject" not in [op for op, _url in sent]
    conn.sync()
    blob = conn.root()["b"]
    blob._p_activate()
    storage._cache.discard(blob._p_oid, blob._p_serial)
    with blob.open() as f:
        assert f.read() == b"first"
    db.close()


@pytest.mark.parametrize(
    "make_base",
    [MappingStorage, DemoStorage, MVCCMappingStorage],
    ids=["MappingStorage", "DemoStorage", "MVCCMappingStorage"],
)
def test_other_bases(make_storage, make_base):
    storage = make_storage(base=make_base())
    db = ZODB.DB(storage)
    ref = commit_blobs(db, {"b": b"on another base"})["b"]
    assert keys(storage) == [storage._layout.key(*ref)]
    conn = db.open()
    with conn.root()["b"].open() as f:
        assert f.read() == b"on another base"
    conn.close()
    db.close()


def test_mvcc_base_instances_share_the_cache_and_see_each_others_commits(
    make_storage,
):
    storage = make_storage(base=MVCCMappingStorage())
    db = ZODB.DB(storage)
    tm1, tm2 = transaction.TransactionManager(), transaction.TransactionManager()
    c1, c2 = db.open(tm1), db.open(tm2)
    assert c1._storage is not c2._storage
    assert c1._storage._cache is c2._storage._cache
    c1.root()["b"] = Blob(b"one")
    tm1.commit()
    tm2.begin()
    with c2.root()["b"].open() as f:
        assert f.read() == b"one"
    with c1.root()["b"].open("w") as f:
        f.write(b"two")
    tm1.commit()
    tm2.begin()  # polls invalidations through the wrapper
    with c2.root()["b"].open() as f:
        assert f.read() == b"two"
    c1.close()
    c2.close()
    db.close()


def test_demo_storage_over_s3_blob_storage_keeps_test_commits_local(make_storage):
    """The Plone/Zope test-layer pattern: a DemoStorage stacked on the real
    database reads its blobs and keeps its own commits out of S3."""
    storage = make_storage()
    db = ZODB.DB(storage)
    commit_blobs(db, {"base": b"from S3"})
    db.close()
    stored = keys(storage)
    demo_db = ZODB.DB(
        DemoStorage(
            base=make_storage(
                base=ZODB.FileStorage.FileStorage(storage._base.getName()),
                settings=storage._store.settings,
            )
        )
    )
    commit_blobs(demo_db, {"layer": b"test data"})
    conn = demo_db.open()
    with conn.root()["base"].open() as f:
        assert f.read() == b"from S3"
    with conn.root()["layer"].open() as f:
        assert f.read() == b"test data"
    conn.close()
    assert keys(storage) == stored
    demo_db.close()


SIZES = [0, 1, 5 << 20, (5 << 20) + 1, (17 << 20) + 3]


def cold_read(make_storage, tmp_path, size, fast_stream):
    """Commit a blob of *size*, read it through an empty cache; return the
    S3 operations the read sent."""
    settings = s3env.settings(part_size=5 << 20, multipart_threshold=6 << 20)
    storage = make_storage(settings=settings)
    db = ZODB.DB(storage)
    data = os.urandom(size)
    oid, tid = commit_blobs(db, {"b": data})["b"]
    db.close()
    reader = make_storage(
        base=MappingStorage(), settings=settings, cache_dir=tmp_path / "cold"
    )
    reader._store.fast_stream = fast_stream
    with requests(reader._store) as sent:
        path = reader.loadBlob(oid, tid)
    with open(path, "rb") as f:
        assert f.read() == data
    return [op for op, _url in sent]


@pytest.mark.parametrize("size", SIZES)
def test_cold_read_on_a_fast_connection_is_one_get(make_storage, tmp_path, size):
    assert cold_read(make_storage, tmp_path, size, fast_stream=0) == ["GetObject"]


@pytest.mark.parametrize("size", SIZES)
def test_cold_read_on_a_slow_connection_fetches_the_rest_in_parallel_parts(
    make_storage, tmp_path, size
):
    ops = cold_read(make_storage, tmp_path, size, fast_stream=float("inf"))
    parts = max(1, -(-size // (5 << 20)))  # the first part, then one GET each
    assert ops == ["GetObject"] * parts


@pytest.mark.parametrize("multipart", [True, False])
def test_large_blob_upload_in_parts_or_in_one_put(make_storage, multipart):
    settings = s3env.settings(
        part_size=5 << 20, multipart_threshold=6 << 20, multipart=multipart
    )
    storage = make_storage(settings=settings)
    db = ZODB.DB(storage)
    data = os.urandom(12 << 20)
    with requests(storage._store) as sent:
        oid, tid = commit_blobs(db, {"b": data})["b"]
    ops = [op for op, _url in sent]
    if multipart:
        assert ops.count("UploadPart") == 3 and "PutObject" not in ops
    else:
        assert ops.count("PutObject") == 1 and "UploadPart" not in ops
    storage._cache.discard(oid, tid)
    with open(storage.loadBlob(oid, tid), "rb") as f:
        assert f.read() == data
    db.close()


def test_uploads_do_not_wait_for_100_continue(make_storage):
    storage = make_storage()
    db = ZODB.DB(storage)
    seen = []

    def headers(request, **_kw):
        seen.append(dict(request.headers))

    storage._store._client.meta.events.register("before-send.s3.PutObject", headers)
    commit_blobs(db, {"b": os.urandom(2 << 20)})
    assert seen and all("Expect" not in h for h in seen)
    db.close()
