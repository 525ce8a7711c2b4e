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
from ZODB.utils import p64, z64

import s3env
from dbprocess import DatabaseProcess
from deploy import payload, relstorage_section
from s3hooks import calling, failing, holding, requests
from test_storage import commit_blobs
from zodb_s3blobs import ObjectStoreError, S3BlobStorage, gc, staging
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


def test_abort_cancels_queued_uploads_and_deletes_those_that_ran(
    pipelined, monkeypatch
):
    storage = pipelined
    running = storage._store.settings.max_concurrency
    with requests(storage._store) as seen, holding(storage._store, "PutObject") as gate:
        txn = TransactionMetaData()
        storage.tpc_begin(txn)
        for _ in range(running + 3):
            store_blob(storage, txn, payload())
        eventually(lambda: len(gate.held) == running)

        def open_then_wait(futures):
            # The uploads that run are let through only once the abort has
            # cancelled the queued ones and waits: a DELETE sent earlier
            # would leave their objects behind.
            gate.open()
            return concurrent.futures.wait(futures)

        monkeypatch.setattr(staging, "wait", open_then_wait)
        storage.tpc_abort(txn)
    puts = [url for op, url in seen if op == "PutObject"]
    assert len(puts) == running, "the queued uploads were never sent"
    assert all_keys(storage) == []


def test_a_blob_stored_twice_in_one_transaction_keeps_the_second(pipelined):
    storage = pipelined
    first = iter([True])
    with holding(storage._store, "PutObject", lambda url: next(first, False)) as gate:
        txn = TransactionMetaData()
        storage.tpc_begin(txn)
        oid = store_blob(storage, txn, b"first version")
        assert gate.arrived.wait(30)
        again = concurrent.futures.ThreadPoolExecutor(1)
        stored = again.submit(store_blob, storage, txn, b"second version", oid)
        # Storing it again waits for the first upload to the same key, held:
        # the second must not be sent before the first has landed.
        time.sleep(0.5)
        assert not stored.done(), "stored again while the first upload ran"
        gate.open()
        stored.result(30)
        again.shutdown()
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
    copies = []
    with calling(storage._store, "CopyObject", copies.append):
        refs = commit_blobs(ZODB.DB(storage), {"large": data, "small": b"small"})
    assert len(copies) == 1, "only the large one is staged"
    headers = {k.lower(): v for k, v in copies[0].headers.items()}
    # Recorded on the copy, not merely kept from the staging object.
    assert headers["x-amz-metadata-directive"] in ("REPLACE", b"REPLACE")
    crc = f"{zlib.crc32(data):08x}"
    assert headers[f"x-amz-meta-{CHECKSUM_METADATA}"] in (crc, crc.encode())
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
    # The record of this database as a writer (writers.py) is written after
    # the commit, in the background: not one of the commit's requests.
    blob_requests = [op for op, url in seen if "/writers/" not in url]
    assert [op for op in blob_requests if op != "ListObjectsV2"] == ["PutObject"]


def failed_vote(storage, operation: str) -> tuple[ObjectStoreError, bool]:
    """Store one large blob and vote with *operation* failing, then abort:
    the vote's error, and whether RelStorage's commit lock was taken."""
    instance = storage.new_instance()
    try:
        txn = TransactionMetaData()
        instance.tpc_begin(txn)
        with failing(instance._store, operation):
            store_blob(instance, txn, payload(LARGE))
            with pytest.raises(ObjectStoreError) as info:
                instance.tpc_vote(txn)
        phase = instance._base._tpc_phase
        locked = getattr(phase, "committing_tid_lock", None) is not None
        instance.tpc_abort(txn)
    finally:
        instance.release()
    return info.value, locked


def test_a_failed_staged_upload_fails_the_vote_before_the_lock(make_relstorage):
    storage = make_relstorage(s3env.settings())
    error, locked = failed_vote(storage, "PutObject")
    assert "/staging/" in str(error)
    assert not locked
    assert all_keys(storage) == []


def test_a_failed_copy_fails_the_vote_and_the_abort_leaves_nothing(make_relstorage):
    storage = make_relstorage(s3env.settings())
    error, locked = failed_vote(storage, "CopyObject")
    assert "copy" in str(error)
    assert locked
    eventually(lambda: all_keys(storage) == [])


def test_sse_s3_applies_to_staging_and_copied_objects(make_relstorage):
    storage = make_relstorage(s3env.settings(sse="AES256"))
    client = s3env.server().client()
    staged = []

    def look_at_the_staging_object(request) -> None:
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


# -- what a commit lock never waits for; what an abort never deletes -----


def test_gc_never_deletes_foreign_keys_under_staging(make_storage):
    """With an empty s3-prefix the staging root is the bucket's top-level
    ``staging/`` folder: the collector deletes only the keys it makes there,
    never another object, however old (keys not of the layout are never
    touched)."""
    storage = make_storage(settings=s3env.settings(prefix=""))
    client = s3env.server().client()
    foreign = "staging/index.html"  # e.g. a website's staging copy
    client.put_object(Bucket=s3env.BUCKET, Key=foreign, Body=b"<html>")
    try:
        # grace=0 stands for "a day later" (what pack() does then).
        gc.collect_orphans(
            storage._base, storage._store, storage._layout, storage._cache, grace=0
        )
        keys = [k for k, _s in storage._store.list("staging/")]
        assert foreign in keys, "gc deleted an object that is not a staging key"
    finally:
        client.delete_object(Bucket=s3env.BUCKET, Key=foreign)


def test_gc_of_one_database_never_deletes_another_databases_committed_blobs(
    make_storage, tmp_path
):
    """Database A (prefix P) and database B (prefix P/staging) in one bucket:
    B's committed blobs lie under A's staging folder, and A's collector
    leaves them alone."""
    top = s3env.new_prefix()
    a = make_storage(settings=s3env.settings(prefix=top))
    b = make_storage(settings=s3env.settings(prefix=f"{top}/staging"))
    db = ZODB.DB(b)
    refs = commit_blobs(db, {"x": b"committed in database B"})
    key = b._layout.key(*refs["x"])
    assert key.startswith(a._layout.staging_root)
    gc.collect_orphans(a._base, a._store, a._layout, a._cache, grace=0)
    still = [k for k, _s in b._store.list(b._layout.root)]
    db.close()
    assert key in still, f"A's collector deleted B's committed blob {key}"


def test_many_small_blobs_upload_at_most_the_threshold_under_the_lock(
    make_relstorage,
):
    """Blobs each under s3-staged-copy-threshold, but many: at most the
    threshold's worth of bytes is uploaded while RelStorage's database-wide
    commit lock is held; the rest is staged before it."""
    storage = make_relstorage(s3env.settings())
    instance = storage.new_instance()
    under_the_lock = []

    def look(request) -> None:
        phase = instance._base._tpc_phase
        if getattr(phase, "committing_tid_lock", None) is not None:
            under_the_lock.append(int(request.headers["Content-Length"]))

    try:
        with calling(instance._store, "PutObject", look):
            txn = TransactionMetaData()
            instance.tpc_begin(txn)
            for _ in range(8):
                store_blob(instance, txn, payload(MiB - 1))
            instance.tpc_vote(txn)
        instance.tpc_finish(txn)
    finally:
        instance.release()
    threshold = storage._store.settings.staged_copy_threshold
    assert 0 < sum(under_the_lock) < threshold, under_the_lock


def test_a_vote_time_transfer_does_not_wait_behind_ranged_downloads(make_storage):
    """transfer(), run at vote (under RelStorage's commit lock), computes its
    CRCs apart from the pool that fills with one job per range of every
    download over a slow link: it never waits for other readers' bytes.
    s3-max-concurrency 2 and 5MB parts, so that one 30 MB download fills the
    pool; with the defaults a 112 MB one would, and the vote's checksums run
    on threads of their own whatever the pools' sizes."""
    storage = make_storage(
        settings=s3env.settings(max_concurrency=2, part_size=5 * MiB)
    )
    store = storage._store
    part = store.settings.part_size
    big = payload(part * (store.settings.max_concurrency + 4))
    key = storage._layout.root + "big/1.blob"
    s3env.server().client().put_object(Bucket=s3env.BUCKET, Key=key, Body=big)
    store.fast_stream = float("inf")  # a slow (WAN) link: always ranged GETs
    release = threading.Event()

    def hold_ranges(request) -> None:
        if request.headers.get("Range"):
            release.wait(60)

    small = os.path.join(storage.temporaryDirectory(), "small")
    with open(small, "wb") as f:
        f.write(b"small blob")
    pool = concurrent.futures.ThreadPoolExecutor(2)
    download = os.path.join(storage.temporaryDirectory(), "download")
    with calling(store, "GetObject", hold_ranges), open(download, "wb+") as out:
        reading = pool.submit(store.download, key, out)
        time.sleep(2)  # the ranged GETs fill _pool
        voting = pool.submit(
            store.transfer, [(small, storage._layout.root + "small/1.blob")], []
        )
        try:
            voting.result(10)
            waited = False
        except concurrent.futures.TimeoutError:
            waited = True
        release.set()
        reading.result(60)
        voting.result(60)
    pool.shutdown()
    assert not waited, "the vote's transfer waited behind another thread's download"


def test_a_restore_under_the_lock_does_not_wait_behind_another_instances_upload(
    make_relstorage,
):
    """RelStorage takes its commit lock in tpc_begin(txn, tid) when
    restoring: the restored blob's upload must not queue behind another
    instance's staged uploads (made with no lock held), which fill the
    background pool and transfer queue here."""
    storage = make_relstorage(s3env.settings())
    other = storage.new_instance()
    restorer = storage.new_instance()
    n = storage._store.settings.max_concurrency
    try:
        txn = TransactionMetaData()
        other.tpc_begin(txn)
        with holding(storage._store, "PutObject", lambda url: "/staging/" in url) as g:
            for _ in range(n + 2):
                store_blob(other, txn, payload(LARGE))
            deadline = time.monotonic() + 30
            while len(g.held) < n and time.monotonic() < deadline:
                time.sleep(0.05)
            rtxn = TransactionMetaData()
            tid = p64(0x03E0000000000000)
            restorer.tpc_begin(rtxn, tid)
            # RelStorage's Restore phase locked the database in tpc_begin.
            assert type(restorer._base._tpc_phase).__name__ == "Restore"
            oid = p64(99)
            path = os.path.join(restorer.temporaryDirectory(), "restored")
            with open(path, "wb") as f:
                f.write(b"restored")
            restorer.restoreBlob(oid, tid, b"record", path, None, rtxn)
            blob = restorer._commit.blobs[oid]
            done = concurrent.futures.wait([blob.upload], timeout=5).done
            g.open()
            restorer.tpc_abort(rtxn)
        other.tpc_abort(txn)
    finally:
        other.release()
        restorer.release()
    assert done, "the restore (holding the commit lock) waited behind staged uploads"


def test_a_failed_head_does_not_make_the_abort_delete_an_existing_object(
    make_storage, tmp_path
):
    """zodbconvert rerun: the revision's object is already in the bucket, and
    the restore's HEAD fails: the vote fails, and the abort must not delete
    the object, which this transaction cannot tell it created.

    Two attempts (s3-max-attempts 2): the HEAD fails every time, and the
    default's ten, with their backoff, would take about a minute to give up;
    the retries of 503 SlowDown with the default are tested in
    test_zeo_client.py."""
    storage = make_storage(
        base=FileStorage(str(tmp_path / "r.fs")),
        settings=s3env.settings(max_attempts=2),
    )
    tid = p64(0x03E0000000000000)
    oid = p64(7)
    key = storage._layout.key(oid, tid)
    s3env.server().client().put_object(
        Bucket=s3env.BUCKET, Key=key, Body=b"committed before"
    )
    txn = TransactionMetaData()
    storage.tpc_begin(txn, tid)
    path = os.path.join(storage.temporaryDirectory(), "restored")
    with open(path, "wb") as f:
        f.write(b"committed before")
    with failing(storage._store, "HeadObject", code="SlowDown", status=503):
        storage.restoreBlob(oid, tid, b"record", path, None, txn)
        with pytest.raises(ObjectStoreError):
            storage.tpc_vote(txn)
    storage.tpc_abort(txn)
    assert all_keys(storage) == [key], "the abort deleted an object it did not create"


def test_a_staged_copy_is_one_request_under_the_lock(make_relstorage):
    """s3transfer's copy() would HEAD the source for its size and ETag before
    CopyObject: learned before the lock, they spare that round trip under it."""
    storage = make_relstorage(s3env.settings())
    instance = storage.new_instance()
    try:
        txn = TransactionMetaData()
        instance.tpc_begin(txn)
        store_blob(instance, txn, payload(LARGE))
        # The staged upload (and its HEAD) first: only the vote is recorded.
        instance._commit.settle_uploads(cancel=False)
        with requests(instance._store) as seen:
            instance.tpc_vote(txn)
        instance.tpc_finish(txn)
    finally:
        instance.release()
    ops = [op for op, _u in seen]
    assert ops == ["CopyObject"], ops
