"""The storage's figures (``S3BlobStorage.stats()``): each counter moves as
its operation happens, against a real S3 server, with faults injected by the
fault server or answered by botocore hooks for the causes it cannot make."""

from __future__ import annotations

import os

import pytest
import transaction
import ZODB
from ZODB.blob import Blob
from ZODB.MappingStorage import MappingStorage
from ZODB.utils import p64

import s3env
from faultserver import Faults, faulty_s3
from s3hooks import failing
from test_storage import commit_blobs
from zodb_s3blobs import BlobReadError, ObjectStoreError
from zodb_s3blobs.metrics import (
    BUCKETS,
    CAUSES,
    COUNTERS,
    GAUGES,
    LABELLED,
    OPERATIONS,
)
from zodb_s3blobs.objectstore import CHECKSUM_METADATA


def changed(before: dict, after: dict) -> dict:
    """The plain counters and labelled counts that differ, as differences."""
    moved = {}
    for name in COUNTERS:
        if after[name] != before[name]:
            moved[name] = after[name] - before[name]
    for name in LABELLED:
        for value, count in after[name].items():
            if count != before[name][value]:
                moved[f"{name}[{value}]"] = count - before[name][value]
    return moved


@pytest.fixture
def committed(make_storage):
    """Two blobs committed under a new prefix: (settings, {name: ref, data})."""
    storage = make_storage()
    db = ZODB.DB(storage)
    payloads = {"a": os.urandom(3_000), "b": os.urandom(5_000)}
    refs = commit_blobs(db, payloads)
    db.close()
    return storage._store.settings, {n: (refs[n], payloads[n]) for n in payloads}


def reader(make_storage, tmp_path, settings, **kw):
    """A storage with an empty cache reading *settings*' blobs."""
    name = f"reader{len(list(tmp_path.glob('reader*')))}"
    return make_storage(
        base=MappingStorage(), settings=settings, cache_dir=tmp_path / name, **kw
    )


def test_stats_names_are_the_documented_ones(make_storage):
    stats = make_storage().stats()
    histogram = stats.pop("s3_request_duration_seconds")
    assert set(stats) == {*COUNTERS, *LABELLED, *GAUGES}
    assert set(stats["s3_requests"]) == set(OPERATIONS)
    assert set(stats["s3_failures"]) == set(stats["s3_retries"]) == set(CAUSES)
    assert set(histogram) == set(OPERATIONS)
    assert len(histogram["get"]["buckets"]) == len(BUCKETS)
    assert stats["s3_requests"]["head"] == 1, "the bucket check at open"


def test_a_miss_then_a_hit(make_storage, tmp_path, committed):
    settings, blobs = committed
    (ref, data) = blobs["a"]
    storage = reader(make_storage, tmp_path, settings)
    before = storage.stats()
    storage.loadBlob(*ref)
    after_miss = storage.stats()
    assert changed(before, after_miss) == {
        "cache_misses": 1,
        "download_bytes": len(data),
        "s3_requests[get]": 1,
    }
    get = after_miss["s3_request_duration_seconds"]["get"]
    assert get["count"] == 1 and 0 < get["sum"] < 10
    assert get["buckets"]["+Inf"] == 1
    assert after_miss["cache_files"] == 1
    with storage.openCommittedBlobFile(*ref) as f:
        assert f.read() == data
    assert changed(after_miss, storage.stats()) == {
        "cache_hits": 1,
        "cache_hit_bytes": len(data),
    }


def test_evictions_are_counted(make_storage, tmp_path, committed):
    """A cache of 6000 bytes with cache-min-age 0, so that the second blob
    read (3000 and 5000 bytes) evicts the first at once."""
    settings, blobs = committed
    storage = reader(make_storage, tmp_path, settings, cache_size=6_000)
    storage._cache.min_age = 0
    for name in ("a", "b"):
        storage.loadBlob(*blobs[name][0])
    storage._cache.close()  # waits for the eviction check the install started
    stats = storage.stats()
    assert stats["cache_evictions"] == 1
    assert stats["cache_evicted_bytes"] == len(blobs["a"][1])
    assert stats["cache_bytes"] == len(blobs["b"][1])


def test_lazily_loaded_blobs_and_those_opened_later(make_storage, tmp_path):
    storage = make_storage()
    db = ZODB.DB(storage)
    with db.transaction() as conn:
        conn.root()["blobs"] = [Blob(b"x" * n) for n in (10, 20, 30)]
    db.cacheMinimize()
    before = storage.stats()
    conn = db.open()
    blobs = conn.root()["blobs"]
    for blob in blobs:
        blob._p_activate()  # loads the Blob object: no download
        storage._cache.discard(blob._p_oid, blob._p_serial)  # cached at commit
    with blobs[1].open("r") as f:
        assert f.read() == b"x" * 20
    with blobs[1].open("r") as f:  # counted once
        f.read()
    moved = changed(before, storage.stats())
    assert moved["lazy_unghosts"] == 3
    assert moved["lazy_unghosts_opened"] == 1
    conn.close()
    db.close()


def test_a_lazy_load_counts_once_and_opened_only_when_it_downloads(make_storage):
    """One blob loaded lazily in two connections is one blob loaded lazily;
    opening a blob that is cached downloads nothing, so it is not counted as
    opened (a download lazy loading did not save)."""
    storage = make_storage()
    db = ZODB.DB(storage)
    with db.transaction() as conn:
        conn.root()["blobs"] = [Blob(b"cached"), Blob(b"evicted")]
    db.cacheMinimize()
    before = storage.stats()
    with db.transaction() as conn:
        evicted = conn.root()["blobs"][1]
        evicted._p_activate()  # loaded lazily: counted
        storage._cache.discard(evicted._p_oid, evicted._p_serial)
    db.cacheMinimize()
    first, second = db.open(), db.open()
    for conn in (first, second):
        for blob in conn.root()["blobs"]:
            blob._p_activate()
    assert changed(before, storage.stats()) == {"lazy_unghosts": 2}
    for blob in first.root()["blobs"]:
        with blob.open("r") as f:
            f.read()
    moved = changed(before, storage.stats())
    assert (moved["cache_hits"], moved["cache_misses"]) == (1, 1)
    assert moved["lazy_unghosts_opened"] == 1, "the one downloaded"
    first.close()
    second.close()
    db.close()


def test_request_operations(make_storage, tmp_path):
    """Multipart and ranged GETs need a blob over the 5 MB part size; the
    thresholds are lowered to the smallest S3 allows, to keep it small (the
    default 100 MB threshold and 8 MB parts take the same code with other
    numbers; no test uploads 100 MB)."""
    settings = s3env.settings(part_size=5 << 20, multipart_threshold=5 << 20)
    storage = make_storage(settings=settings)
    db = ZODB.DB(storage)
    before = storage.stats()
    refs = commit_blobs(db, {"big": os.urandom((5 << 20) + 1), "small": b"s"})
    moved = changed(before, storage.stats())
    assert moved["s3_requests[put]"] == 1
    assert moved["s3_requests[multipart]"] == 4  # create, 2 parts, complete
    db.close()
    cold = reader(make_storage, tmp_path, settings)
    cold._store.fast_stream = float("inf")  # every part in a ranged GET
    before = cold.stats()
    cold.loadBlob(*refs["big"])
    moved = changed(before, cold.stats())
    assert moved["s3_requests[get]"] == 1
    assert moved["s3_requests[ranged_get]"] == 1


def test_pack_lists_and_deletes_orphans(make_storage):
    storage = make_storage(gc_retention=0)  # at once (default: test_gc_retention)
    db = ZODB.DB(storage)
    commit_blobs(db, {"a": b"first"})
    commit_blobs(db, {"a": b"second"})
    before = storage.stats()
    db.pack()
    moved = changed(before, storage.stats())
    assert moved["orphans_found"] == moved["orphans_deleted"] == 1
    assert moved["orphans_deleted_bytes"] == len(b"first")
    assert moved["s3_requests[list]"] >= 1
    assert moved["s3_requests[delete]"] == 1
    db.close()


def test_undo_is_a_copy(make_storage):
    storage = make_storage()
    db = ZODB.DB(storage)
    commit_blobs(db, {"a": b"first"})
    with db.transaction() as conn, conn.root()["a"].open("w") as f:
        f.write(b"second")
    before = storage.stats()
    db.undo(db.undoLog(0, 1)[0]["id"])
    transaction.commit()
    assert changed(before, storage.stats())["s3_requests[copy]"] == 1
    db.close()


def test_throttled_uploads_are_retried_then_fail(make_storage):
    """Three attempts (s3-max-attempts 3, to keep it short), every one
    answered 503 SlowDown by the fault server."""
    faults = Faults(
        error_rate=1.0, applies=lambda m, path: m == "PUT" and path.endswith(".blob")
    )
    with faulty_s3(faults) as server:
        settings = s3env.settings(endpoint_url=server.endpoint_url, max_attempts=3)
        storage = make_storage(settings=settings)
        db = ZODB.DB(storage)
        before = storage.stats()
        with pytest.raises(ObjectStoreError):
            commit_blobs(db, {"a": b"throttled"})
        transaction.abort()
        moved = changed(before, storage.stats())
        db.close()
    assert moved["s3_retries[throttled]"] == 2
    assert moved["s3_failures[throttled]"] == 1


@pytest.mark.parametrize(
    "faults, cause",
    [
        (Faults(stall=2), "timeout"),
        (Faults(reset_rate=1.0), "connection"),
        (Faults(error_rate=1.0), "throttled"),
        (Faults(cut_rate=1.0), "connection"),
        (Faults(body_stall=2), "timeout"),
    ],
    ids=["timeout", "connection", "throttled", "body cut", "body stalled"],
)
def test_failed_downloads_by_cause(make_storage, tmp_path, committed, faults, cause):
    """Two attempts (s3-download-max-attempts 2) with a short read timeout, so
    that a stall times out in a second. A body cut off or stalled fails after
    its GET was answered: the download counts that failure, as botocore's
    hooks count one before the answer."""
    settings, blobs = committed
    faults.applies = lambda method, path: method == "GET" and path.endswith(".blob")
    with faulty_s3(faults) as server:
        storage = reader(
            make_storage,
            tmp_path,
            s3env.settings(
                prefix=settings.prefix,
                endpoint_url=server.endpoint_url,
                download_read_timeout=0.5,
                download_max_attempts=2,
            ),
        )
        before = storage.stats()
        with pytest.raises(BlobReadError):
            storage.loadBlob(*blobs["a"][0])
        moved = changed(before, storage.stats())
    assert moved == {
        "s3_requests[get]": 2,
        f"s3_failures[{cause}]": 2,
        f"s3_retries[{cause}]": 1,
    }


def test_5xx_and_not_found(make_storage, tmp_path, committed):
    """The fault server answers 500 only to ranged GETs: a botocore hook
    answers this plain GET with 500 InternalError instead.
    s3-download-max-attempts 2 makes the counts exact; with the defaults a
    500 is retried within s3-download-deadline (tests/test_downloads.py)."""
    settings, blobs = committed
    storage = reader(
        make_storage,
        tmp_path,
        s3env.settings(prefix=settings.prefix, download_max_attempts=2),
    )
    before = storage.stats()
    with (
        failing(storage._store, "GetObject", code="InternalError", status=500),
        pytest.raises(BlobReadError),
    ):
        storage.loadBlob(*blobs["a"][0])
    after = storage.stats()
    assert changed(before, after) == {
        "s3_requests[get]": 2,
        "s3_failures[5xx]": 2,
        "s3_retries[5xx]": 1,
    }
    oid, tid = blobs["a"][0]
    with pytest.raises(Exception, match="No blob file|removed by a pack"):
        storage.loadBlob(oid, p64(1))
    assert changed(after, storage.stats()) == {
        "s3_requests[get]": 1,
        "s3_failures[not_found]": 1,
    }


def test_checksum_mismatch(make_storage, tmp_path, committed):
    settings, blobs = committed
    (oid, tid), data = blobs["a"]
    storage = reader(make_storage, tmp_path, settings)
    key = storage._layout.key(oid, tid)
    client = s3env.server().client()
    head = client.head_object(Bucket=s3env.BUCKET, Key=key)
    assert CHECKSUM_METADATA in head["Metadata"]
    client.put_object(
        Bucket=s3env.BUCKET, Key=key, Body=b"x" * len(data), Metadata=head["Metadata"]
    )
    before = storage.stats()
    with pytest.raises(BlobReadError, match="checksum mismatch"):
        storage.loadBlob(oid, tid)
    assert changed(before, storage.stats()) == {
        "s3_requests[get]": 2,
        "s3_failures[checksum_mismatch]": 2,
        "s3_retries[checksum_mismatch]": 1,
    }


def test_uploads_and_their_bytes_are_counted_at_vote(make_storage):
    storage = make_storage()
    db = ZODB.DB(storage)
    before = storage.stats()
    commit_blobs(db, {"a": b"x" * 3_000, "b": b"y" * 5_000})
    moved = changed(before, storage.stats())
    db.close()
    assert moved["uploads"] == 2
    assert moved["upload_bytes"] == 8_000


def test_an_aborted_transactions_deletes_are_counted(make_storage):
    storage = make_storage()
    db = ZODB.DB(storage)
    before = storage.stats()
    refused = lambda url: url.endswith("/2/" + url.rsplit("/", 1)[-1])  # noqa: E731
    with failing(storage._store, "PutObject", refused), pytest.raises(ObjectStoreError):
        commit_blobs(db, {"a": b"uploaded", "b": b"refused", "c": b"uploaded"})
    transaction.abort()
    moved = changed(before, storage.stats())
    db.close()
    assert moved["aborted_deletes"] == 3, "every key the vote attempted"
    assert "uploads" not in moved, "nothing was voted"
