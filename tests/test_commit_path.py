"""The commit path per base storage: uploads that start at storeBlob where the
tid is known from tpc_begin, and on RelStorage staged uploads that are made
before its commit lock and copied server-side under it."""

from __future__ import annotations

import concurrent.futures
import os
import threading
import time
import zlib

import pytest
import ZODB
import ZODB.config
from ZODB.Connection import TransactionMetaData
from ZODB.DemoStorage import DemoStorage
from ZODB.FileStorage import FileStorage
from ZODB.MappingStorage import MappingStorage
from ZODB.utils import z64

import s3env
from dbprocess import DatabaseProcess
from deploy import payload, relstorage_section
from s3hooks import calling, failing, holding, requests
from test_storage import commit_blobs
from zodb_s3blobs import ObjectStoreError, S3BlobStorage, gc
from zodb_s3blobs.gc import IN_FLIGHT_GRACE
from zodb_s3blobs.keys import KeyLayout, hex_id
from zodb_s3blobs.objectstore import CHECKSUM_METADATA
from zodb_s3blobs.settings import MiB, S3Settings

#: Larger than the default s3-staged-copy-threshold (1MB).
LARGE = 2 * MiB


def all_keys(storage) -> list[str]:
    """Every key under the storage's prefix: revisions and staging objects."""
    layout = storage._layout
    found = [
        *storage._store.list(layout.root),
        *storage._store.list(layout.staging_root),
    ]
    return sorted(key for key, _size in found)


def staging_keys(storage) -> list[str]:
    return sorted(k for k, _s in storage._store.list(storage._layout.staging_root))


def eventually(condition, timeout: float = 30.0) -> None:
    """Wait until *condition()* is true (background uploads and deletes)."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition never became true"
        time.sleep(0.05)


def store_blob(storage, txn, data: bytes, oid: bytes | None = None) -> bytes:
    """storeBlob one blob file with *data* in *txn*; return its oid."""
    oid = oid or storage.new_oid()
    path = os.path.join(storage.temporaryDirectory(), f"incoming-{hex_id(oid)}")
    with open(path, "wb") as f:
        f.write(data)
    storage.storeBlob(oid, z64, b"record", path, "", txn)
    return oid


def read_back(storage, oid: bytes, tid: bytes) -> bytes:
    storage._cache.discard(oid, tid)
    with open(storage.loadBlob(oid, tid), "rb") as f:
        return f.read()


@pytest.fixture(params=["filestorage", "mappingstorage", "demostorage"])
def pipelined(request, make_storage, tmp_path):
    """An S3BlobStorage around each base that fixes the tid in tpc_begin."""
    if request.param == "filestorage":
        base = FileStorage(str(tmp_path / "pipelined.fs"))
    elif request.param == "mappingstorage":
        base = MappingStorage()
    else:
        base = DemoStorage()
    return make_storage(base=base)


# -- bases whose tid is known from tpc_begin: uploads start at storeBlob -----


@pytest.mark.s3_servers("moto", "rgw")
def test_uploads_start_before_vote_and_are_not_repeated(pipelined):
    storage = pipelined
    data = payload()
    with requests(storage._store) as seen:
        txn = TransactionMetaData()
        storage.tpc_begin(txn)
        oid = store_blob(storage, txn, data)
        key = storage._layout.key(oid, storage._commit.tid)
        # The server holds the object while tpc_vote has not been called.
        eventually(lambda: all_keys(storage) == [key])
        storage.tpc_vote(txn)
        tid = storage.tpc_finish(txn)
    assert key == storage._layout.key(oid, tid)
    assert [op for op, _url in seen].count("PutObject") == 1, "not again at vote"
    assert read_back(storage, oid, tid) == data


def test_a_failed_upload_fails_the_vote_and_the_abort_leaves_nothing(pipelined):
    storage = pipelined
    txn = TransactionMetaData()
    storage.tpc_begin(txn)
    victim = storage.new_oid()
    with failing(storage._store, "PutObject", lambda url: f"/{hex_id(victim)}/" in url):
        oids = [store_blob(storage, txn, payload()) for _ in range(4)]
        store_blob(storage, txn, payload(), victim)
        with pytest.raises(ObjectStoreError) as info:
            storage.tpc_vote(txn)
    assert storage._layout.key(victim, storage._commit.tid) in str(info.value)
    assert len(storage._commit.attempted_keys) == 5
    storage.tpc_abort(txn)
    assert all_keys(storage) == [], f"the uploads of {len(oids)} others deleted"


def test_a_base_vote_failing_after_the_uploads_leaves_nothing(pipelined, monkeypatch):
    storage = pipelined
    txn = TransactionMetaData()
    storage.tpc_begin(txn)
    for _ in range(3):
        store_blob(storage, txn, payload())
    eventually(lambda: len(all_keys(storage)) == 3)

    def refuse(transaction):
        raise RuntimeError("the base refuses the vote")

    monkeypatch.setattr(storage._base, "tpc_vote", refuse)
    with pytest.raises(RuntimeError):
        storage.tpc_vote(txn)
    storage.tpc_abort(txn)
    assert all_keys(storage) == []


def test_abort_cancels_queued_uploads_and_deletes_those_that_ran(pipelined):
    storage = pipelined
    running = storage._store.settings.max_concurrency
    with requests(storage._store) as seen, holding(storage._store, "PutObject") as gate:
        txn = TransactionMetaData()
        storage.tpc_begin(txn)
        for _ in range(running + 3):
            store_blob(storage, txn, payload())
        eventually(lambda: len(gate.held) == running)
        # The uploads that run are let through only once the abort waits for
        # them: a DELETE sent earlier would leave their objects behind.
        threading.Timer(0.5, gate.open).start()
        storage.tpc_abort(txn)
    puts = [url for op, url in seen if op == "PutObject"]
    assert len(puts) == running, "the queued uploads were never sent"
    assert all_keys(storage) == []


def test_a_blob_stored_twice_in_one_transaction_keeps_the_second(pipelined):
    storage = pipelined
    with holding(storage._store, "PutObject") as gate:
        txn = TransactionMetaData()
        storage.tpc_begin(txn)
        oid = store_blob(storage, txn, b"first version")
        gate.arrived.wait(30)
        # Storing it again waits for the first upload to the same key.
        threading.Timer(0.5, gate.open).start()
        store_blob(storage, txn, b"second version", oid)
    storage.tpc_vote(txn)
    tid = storage.tpc_finish(txn)
    assert read_back(storage, oid, tid) == b"second version"


# -- RelStorage: staged uploads before the commit lock, copies under it ------


def sqlite_relstorage(tmp_path):
    """A history-free RelStorage on SQLite, without blob support of its own."""
    data_dir = tmp_path / "sqlite"
    data_dir.mkdir(exist_ok=True)
    section = relstorage_section(f"<sqlite3>\n data-dir {data_dir}\n</sqlite3>", False)
    return ZODB.config.storageFromString(section)


@pytest.fixture
def make_relstorage(tmp_path):
    """Open S3BlobStorage around a new SQLite RelStorage with these settings."""
    opened = []

    def make(settings: S3Settings) -> S3BlobStorage:
        storage = S3BlobStorage(
            sqlite_relstorage(tmp_path), settings, str(tmp_path / "cache")
        )
        opened.append(storage)
        return storage

    yield make
    for storage in opened:
        storage.close()


@pytest.mark.s3_servers("moto", "rgw")
def test_a_large_blob_is_staged_then_copied_keeping_its_checksum(make_relstorage):
    storage = make_relstorage(s3env.settings())
    data = payload(LARGE)
    with requests(storage._store) as seen:
        refs = commit_blobs(ZODB.DB(storage), {"large": data, "small": b"small"})
    operations = [op for op, _url in seen]
    assert operations.count("CopyObject") == 1, "only the large one is staged"
    oid, tid = refs["large"]
    key = storage._layout.key(oid, tid)
    head = s3env.server().client().head_object(Bucket=s3env.BUCKET, Key=key)
    assert head["Metadata"][CHECKSUM_METADATA] == f"{zlib.crc32(data):08x}"
    assert read_back(storage, oid, tid) == data
    eventually(lambda: staging_keys(storage) == [])
    assert sorted(all_keys(storage)) == sorted(
        storage._layout.key(*ref) for ref in refs.values()
    )


def test_under_the_threshold_a_blob_is_one_put_under_the_lock(make_relstorage):
    storage = make_relstorage(s3env.settings())
    with requests(storage._store) as seen:
        commit_blobs(ZODB.DB(storage), {"small": payload(MiB - 1)})
    assert [op for op, _url in seen if op != "ListObjectsV2"] == ["PutObject"]


def test_a_failed_staged_upload_fails_the_vote_before_the_lock(make_relstorage):
    storage = make_relstorage(s3env.settings())
    instance = storage.new_instance()
    try:
        txn = TransactionMetaData()
        instance.tpc_begin(txn)
        with failing(instance._store, "PutObject"):
            store_blob(instance, txn, payload(LARGE))
            with pytest.raises(ObjectStoreError) as info:
                instance.tpc_vote(txn)
        assert "/staging/" in str(info.value)
        phase = instance._base._tpc_phase
        assert getattr(phase, "committing_tid_lock", None) is None, "not locked"
        instance.tpc_abort(txn)
    finally:
        instance.release()
    assert all_keys(storage) == []


def test_a_failed_copy_fails_the_vote_and_the_abort_leaves_nothing(make_relstorage):
    storage = make_relstorage(s3env.settings())
    instance = storage.new_instance()
    try:
        txn = TransactionMetaData()
        instance.tpc_begin(txn)
        store_blob(instance, txn, payload(LARGE))
        with (
            failing(instance._store, "CopyObject"),
            pytest.raises(ObjectStoreError) as info,
        ):
            instance.tpc_vote(txn)
        assert "copy" in str(info.value)
        instance.tpc_abort(txn)
    finally:
        instance.release()
    eventually(lambda: all_keys(storage) == [])


def test_sse_s3_applies_to_staging_and_copied_objects(make_relstorage):
    storage = make_relstorage(s3env.settings(sse="AES256"))
    client = s3env.server().client()
    staged = []

    def look_at_the_staging_object(url: str) -> None:
        for key in staging_keys(storage):
            head = client.head_object(Bucket=s3env.BUCKET, Key=key)
            staged.append(head.get("ServerSideEncryption"))

    with calling(storage._store, "CopyObject", look_at_the_staging_object):
        refs = commit_blobs(ZODB.DB(storage), {"large": payload(LARGE)})
    assert staged == ["AES256"], "the staging object is encrypted"
    head = client.head_object(
        Bucket=s3env.BUCKET, Key=storage._layout.key(*refs["large"])
    )
    assert head["ServerSideEncryption"] == "AES256"


def test_staging_objects_are_collected_only_after_the_grace_period(make_storage):
    storage = make_storage()
    client = s3env.server().client()
    left = storage._layout.staging_key()
    client.put_object(Bucket=s3env.BUCKET, Key=left, Body=b"left by a killed process")
    report = storage.collect_orphans()
    assert (report.staging, report.staging_expired) == (1, 0)
    assert staging_keys(storage) == [left], "a young staging object stays"
    assert IN_FLIGHT_GRACE >= 24 * 3600, "the default grace is at least a day"
    report = gc.collect_orphans(
        storage._base, storage._store, storage._layout, storage._cache, grace=0
    )
    assert (report.staging, report.staging_expired, report.deleted) == (0, 1, 1)
    assert staging_keys(storage) == []


def test_staging_keys_are_never_parsed_as_revisions():
    layout = KeyLayout("site")
    key = layout.staging_key()
    assert key.startswith("site/staging/") and key.endswith(".blob")
    assert layout.parse(key) is None
    assert layout.staging_key() != key


# -- RelStorage in two processes: no commit waits for another's upload -------


def test_another_process_commits_while_a_large_blob_uploads(relstorage_base, tmp_path):
    config = s3env.zconfig(relstorage_base.section, str(tmp_path / "cache"))
    storage = ZODB.config.storageFromString(config)
    instance = storage.new_instance()
    other_config = config.replace(str(tmp_path / "cache"), str(tmp_path / "other"))
    try:
        with DatabaseProcess(other_config, tmp_path / "process") as other:
            other.call("write", name="before", data="00")
            data = payload(LARGE)
            with holding(instance._store, "PutObject") as gate:
                txn = TransactionMetaData()
                instance.tpc_begin(txn)
                oid = store_blob(instance, txn, data)
                voting = concurrent.futures.ThreadPoolExecutor(1)
                voted = voting.submit(instance.tpc_vote, txn)
                assert gate.arrived.wait(30), "the upload started"
                # Our vote waits for its upload, which is held; the other
                # process commits (a small blob, under the commit lock)
                # meanwhile. Had our vote taken the lock before uploading,
                # this would wait for the held upload.
                other.call("write", name="during", data="11" * 100)
                assert not voted.done(), "our vote was still waiting"
                gate.open()
                voted.result(60)
                voting.shutdown()
            tid = instance.tpc_finish(txn)
            assert other.call("read", name="during")["data"] == "11" * 100
        assert read_back(instance, oid, tid) == data
        eventually(lambda: staging_keys(storage) == [])
    finally:
        instance.release()
        storage.close()
