"""gc-retention: an orphan's object outlives its revision by the retention,
so that a restored backup of the base storage reads every blob; the record
of pending orphans survives a collection killed at any point."""

from __future__ import annotations

import contextlib
import gzip
import io
import os
import shutil
import time

import pytest
import ZODB
from ZODB.blob import Blob
from ZODB.FileStorage import FileStorage
from ZODB.utils import p64

import s3env
from s3hooks import requests
from test_storage import commit_blobs, keys
from zodb_s3blobs import gc
from zodb_s3blobs.errors import ObjectStoreError
from zodb_s3blobs.gc import DEFAULT_RETENTION, OrphansNotDeleted
from zodb_s3blobs.pending import record_key
from zodb_s3blobs.revisions import Revisions

pytestmark = pytest.mark.s3_servers("moto", "rgw")

DAY = 24 * 3600.0


class _Clock:
    """Stands in for the ``time`` module in :mod:`zodb_s3blobs.gc`: its
    ``time()`` runs *offset* seconds ahead of the real clock, so a test can
    collect days later without waiting."""

    def __init__(self) -> None:
        self.offset = 0.0

    def time(self) -> float:
        return time.time() + self.offset


@pytest.fixture
def clock(monkeypatch) -> _Clock:
    fake = _Clock()
    monkeypatch.setattr(gc, "time", fake)
    return fake


def change_all(db, names: list[str]) -> None:
    """Commit a new revision of every blob named."""
    with db.transaction() as conn:
        for name in names:
            with conn.root()[name].open("w") as f:
                f.write(b"changed during the day")


def read_all(db, names: list[str]) -> dict[str, bytes]:
    with db.transaction() as conn:
        out = {}
        for name in names:
            with conn.root()[name].open() as f:
                out[name] = f.read()
        return out


def make_orphans(storage, tmp_path, count: int, first_oid: int) -> list[str]:
    """Upload objects of revisions the base never had (tid 5, older than
    any commit): orphans for the collector."""
    f = tmp_path / f"orphan{first_oid}"
    f.write_bytes(b"orphan")
    orphans = [storage._layout.key(p64(first_oid + n), p64(5)) for n in range(count)]
    storage._store.transfer([(str(f), k) for k in orphans], [])
    return orphans


def recorded(storage) -> dict[str, float]:
    """The record of pending orphans: key -> first seen."""
    body = io.BytesIO()
    storage._store.download(record_key(storage._layout.prefix), body)
    lines = gzip.decompress(body.getvalue()).decode().splitlines()[1:]
    return {line.split("\t")[0]: float(line.split("\t")[1]) for line in lines}


def test_a_restored_backup_reads_every_blob_after_changes_and_a_pack(
    make_storage, tmp_path
):
    """The operator's routine: a nightly copy of Data.fs, blobs changed in
    the day, a pack with days 0, then last night's copy restored. Fails
    before gc-retention: the pack deleted every object the backup needs
    (0 of 8 blobs read back). The default configuration."""
    data = tmp_path / "Data.fs"
    storage = make_storage(base=FileStorage(str(data)))
    assert storage._shared.gc_retention == DEFAULT_RETENTION
    db = ZODB.DB(storage)
    payloads = {f"b{n}": os.urandom(500 + n) for n in range(8)}
    commit_blobs(db, payloads)
    db.close()
    shutil.copy(data, tmp_path / "backup.fs")

    db = ZODB.DB(make_storage(base=FileStorage(str(data))))
    change_all(db, list(payloads))
    db.pack(days=0)
    report = db.storage.collect_orphans(dry_run=True)
    assert (report.pending, report.orphans) == (8, 0)
    assert db.storage.stats()["orphans_pending"] == 8
    db.close()

    shutil.copy(tmp_path / "backup.fs", data)  # the restore
    db = ZODB.DB(make_storage(base=FileStorage(str(data))))  # an empty cache
    assert read_all(db, list(payloads)) == payloads
    db.close()


def test_orphans_are_deleted_once_found_orphaned_for_the_retention(
    make_storage, tmp_path, clock
):
    storage = make_storage()
    db = ZODB.DB(storage)
    commit_blobs(db, {"live": b"live"})
    live = keys(storage)
    first = make_orphans(storage, tmp_path, 3, 10_000)
    report = storage.collect_orphans()
    assert (report.pending, report.pending_bytes, report.deleted) == (3, 18, 0)
    assert sorted(recorded(storage)) == first
    clock.offset = 3 * DAY
    second = make_orphans(storage, tmp_path, 2, 20_000)
    report = storage.collect_orphans()
    assert (report.pending, report.deleted) == (5, 0), "none old enough yet"
    clock.offset = DEFAULT_RETENTION + 60
    report = storage.collect_orphans()
    assert (report.deleted, report.deleted_bytes, report.pending) == (3, 18, 2)
    assert keys(storage) == sorted(live + second)
    # The deleted ones too, until the next run: should a delete fail, the
    # next collection deletes them without waiting again.
    assert sorted(recorded(storage)) == sorted(first + second)
    storage.collect_orphans()
    assert sorted(recorded(storage)) == second
    stats = storage.stats()
    assert (stats["orphans_deleted"], stats["orphans_deleted_bytes"]) == (3, 18)
    assert stats["orphans_found"] == 3, "pending orphans are not counted"
    assert (stats["orphans_pending"], stats["orphans_pending_bytes"]) == (2, 12)
    db.close()


class _HoldsEverything(Revisions):
    """A base that holds every revision asked of it (one restored)."""

    def held(self, revisions):
        return set(revisions)


def test_an_orphan_held_again_starts_its_retention_again(
    make_storage, tmp_path, clock, monkeypatch
):
    """A key found orphaned, then held again (a backup restored), then
    orphaned again (packed again) is kept for a whole retention from the
    second time: the record only keeps what was orphaned at the last run."""
    storage = make_storage()
    db = ZODB.DB(storage)
    commit_blobs(db, {"live": b"live"})
    (orphan,) = make_orphans(storage, tmp_path, 1, 10_000)
    storage.collect_orphans()
    with monkeypatch.context() as restored:
        restored.setattr(gc, "revisions_of", _HoldsEverything)  # the restore
        clock.offset = DAY
        assert storage.collect_orphans().pending == 0
    clock.offset = DEFAULT_RETENTION + 60
    report = storage.collect_orphans()
    assert (report.pending, report.deleted) == (1, 0)
    assert orphan in keys(storage)
    db.close()


def test_retention_0_deletes_at_once_and_reads_no_record(make_storage, tmp_path):
    """Today's behaviour, from the configuration (gc_retention=0) or for one
    collection (retention=0)."""
    storage = make_storage(gc_retention=0)
    db = ZODB.DB(storage)
    commit_blobs(db, {"live": b"live"})
    live = keys(storage)
    make_orphans(storage, tmp_path, 3, 10_000)
    with requests(storage._store) as sent:
        report = storage.collect_orphans()
    assert (report.deleted, report.pending) == (3, 0)
    assert not [url for _op, url in sent if "/gc/" in url], "no record"
    assert keys(storage) == live
    db.close()
    # The default retention, overridden once; a prefix of its own.
    storage = make_storage(settings=s3env.settings())
    db = ZODB.DB(storage)
    commit_blobs(db, {"live": b"live"})
    make_orphans(storage, tmp_path, 2, 20_000)
    assert storage.collect_orphans(retention=0).deleted == 2
    db.close()


def test_a_dry_run_writes_no_record(make_storage, tmp_path):
    storage = make_storage()
    db = ZODB.DB(storage)
    commit_blobs(db, {"live": b"live"})
    make_orphans(storage, tmp_path, 2, 10_000)
    assert storage.collect_orphans(dry_run=True).pending == 2
    key = record_key(storage._layout.prefix)
    assert storage._store.stat(key) is None
    db.close()


def test_a_collection_killed_at_any_point_deletes_nothing_early(
    make_storage, tmp_path, clock
):
    """Killed between writing its record and deleting, a collection leaves
    the record it wrote; killed while writing it, the previous one. Either
    way no key is deleted before it was orphaned for the retention."""
    storage = make_storage()
    db = ZODB.DB(storage)
    commit_blobs(db, {"live": b"live"})
    first = make_orphans(storage, tmp_path, 2, 10_000)
    storage.collect_orphans()
    found = clock.time()
    clock.offset = DEFAULT_RETENTION + 60
    second = make_orphans(storage, tmp_path, 2, 20_000)
    store = storage._store
    delete = store.delete

    def killed(*_args, **_kw):
        raise SystemExit("killed")

    store.delete = killed
    with pytest.raises(SystemExit):
        storage.collect_orphans()
    store.delete = delete
    seen = recorded(storage)
    assert set(seen) == {*first, *second}, "the record outlives the kill"
    assert all(seen[k] <= found for k in first)
    assert all(seen[k] > found for k in second)
    assert set(first + second) <= set(keys(storage)), "nothing deleted"

    clock.offset += 3600
    report = storage.collect_orphans()
    assert (report.deleted, report.pending) == (2, 2)
    assert not set(first) & set(keys(storage))

    clock.offset += DEFAULT_RETENTION  # the second orphans are due now
    store.put_object = killed  # killed while writing the record
    with pytest.raises(SystemExit):
        storage.collect_orphans()
    del store.put_object
    assert set(second) <= set(keys(storage))
    assert set(recorded(storage)) == {*first, *second}, "the previous record"
    db.close()


def test_a_failed_delete_is_reported_and_retried_later(make_storage, tmp_path, clock):
    storage = make_storage()
    db = ZODB.DB(storage)
    commit_blobs(db, {"live": b"live"})
    orphans = make_orphans(storage, tmp_path, 2, 10_000)
    storage.collect_orphans()
    clock.offset = DEFAULT_RETENTION + 60
    store = storage._store

    def refused(keys, quick=False):
        raise ObjectStoreError("DELETE", "s3://bucket/key", "AccessDenied")

    store.delete = refused
    with pytest.raises(OrphansNotDeleted):
        storage.collect_orphans()
    del store.delete
    assert set(orphans) <= set(keys(storage))
    assert storage.collect_orphans().deleted == 2, "no new wait"
    assert not set(orphans) & set(keys(storage))
    db.close()


def test_an_unreadable_record_restarts_the_retention(
    make_storage, tmp_path, clock, caplog
):
    storage = make_storage()
    db = ZODB.DB(storage)
    commit_blobs(db, {"live": b"live"})
    orphans = make_orphans(storage, tmp_path, 2, 10_000)
    storage.collect_orphans()
    garbage = tmp_path / "garbage"
    garbage.write_bytes(b"not gzip")
    with open(garbage, "rb") as f:
        storage._store.put_object(record_key(storage._layout.prefix), f)
    clock.offset = DEFAULT_RETENTION + 60
    report = storage.collect_orphans()
    assert (report.deleted, report.pending) == (0, 2)
    assert "unreadable" in caplog.text
    assert sorted(recorded(storage)) == orphans
    db.close()


def test_a_negative_retention_is_refused(make_storage):
    with pytest.raises(ValueError, match="gc-retention"):
        make_storage(gc_retention=-1)


def test_incomplete_multipart_uploads_are_aborted_only_past_the_grace(
    make_storage, clock
):
    """A process killed mid-upload leaves parts that are billed and never
    listed as objects. S3 servers set an upload's Initiated themselves (it
    cannot be backdated; moto reports a fixed date in 2010): the collector's
    clock is set a minute, then two days, after the Initiated reported."""
    storage = make_storage()
    db = ZODB.DB(storage)
    commit_blobs(db, {"live": b"live"})
    layout = storage._layout
    ours = [layout.key(p64(10_000), p64(5)), layout.staging_key()]
    foreign = f"{layout.root}README"
    client = s3env.server().client()
    for key in [*ours, foreign]:
        client.create_multipart_upload(Bucket=s3env.BUCKET, Key=key)
    listed = client.list_multipart_uploads(Bucket=s3env.BUCKET, Prefix=layout.prefix)
    initiated = max(u["Initiated"].timestamp() for u in listed["Uploads"])
    clock.offset = initiated + 60 - time.time()
    report = storage.collect_orphans()
    assert (report.uploads_running, report.uploads_stale) == (2, 0)
    clock.offset = initiated + 2 * DAY - time.time()
    dry = storage.collect_orphans(dry_run=True)
    assert (dry.uploads_stale, dry.uploads_aborted) == (2, 0)
    report = storage.collect_orphans()
    assert (report.uploads_stale, report.uploads_aborted) == (2, 2)
    listed = client.list_multipart_uploads(Bucket=s3env.BUCKET, Prefix=layout.prefix)
    assert [upload["Key"] for upload in listed.get("Uploads", ())] == [foreign]
    db.close()


class _ModuleClock(_Clock):
    """:class:`_Clock` standing in for a whole ``time`` module."""

    def __getattr__(self, name: str):
        return getattr(time, name)


def test_a_record_older_than_a_restore_never_makes_an_orphan_due_early(
    tmp_path, monkeypatch, s3_settings
):
    """Day 0 backup; day 1 an edit and a pack record the revision K as
    orphaned; day 2 the day-0 backup is restored (K current again) and no
    collection runs for a week; day 8 a backup; day 9 an edit and a pack.
    The day-8 backup, restored on day 10, reads K. Fails before the fix: the
    day-1 record made K due at once on day 9. One clock for the database's
    transaction ids and the collector, days ahead, as on one host."""
    import ZODB.BaseStorage

    from zodb_s3blobs import S3BlobStorage

    clock = _ModuleClock()
    monkeypatch.setattr(gc, "time", clock)
    monkeypatch.setattr(ZODB.BaseStorage, "time", clock)
    data_fs = tmp_path / "Data.fs"

    def opened():
        return ZODB.DB(
            S3BlobStorage(FileStorage(str(data_fs)), s3_settings, str(tmp_path / "c"))
        )

    def restore(backup):
        for extension in ("", ".index", ".lock", ".tmp"):
            with contextlib.suppress(FileNotFoundError):
                os.remove(f"{data_fs}{extension}")
        shutil.copy(backup, data_fs)

    db = opened()
    with db.transaction() as conn:
        conn.root()["x"] = Blob(b"K, committed on day 0")
    shutil.copy(data_fs, tmp_path / "day0.fs")
    clock.offset = DAY
    change_all(db, ["x"])
    db.pack(clock.time() + 1)
    db.close()
    clock.offset = 2 * DAY
    restore(tmp_path / "day0.fs")
    clock.offset = 8 * DAY
    shutil.copy(data_fs, tmp_path / "day8.fs")
    clock.offset = 9 * DAY
    db = opened()
    change_all(db, ["x"])
    db.pack(clock.time() + 1)
    db.close()
    clock.offset = 10 * DAY
    restore(tmp_path / "day8.fs")
    db = opened()
    assert read_all(db, ["x"]) == {"x": b"K, committed on day 0"}
    db.close()
