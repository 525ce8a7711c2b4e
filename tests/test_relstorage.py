"""RelStorage as the base of ``<s3blobstorage>``, in one process: the tid
learned at vote (the rule in tids.py, pinned against the installed RelStorage
on SQLite and PostgreSQL, history-free and history-preserving), what is
refused at open, undo, and the orphan collector's view of RelStorage."""

from __future__ import annotations

import importlib.metadata
import re
import shutil
import subprocess
import time
import urllib.request

import pytest
import relstorage.storage.tpc.vote
import transaction
import ZODB
import ZODB.config
from ZODB.blob import Blob
from ZODB.Connection import TransactionMetaData
from ZODB.serialize import referencesf
from ZODB.utils import z64

import s3env
from deploy import (
    bucket_keys,
    console_script,
    new_relstorage_base,
    payload,
    relstorage_section,
)
from test_gc import blob_revisions
from test_gc_retention import change_all, read_all
from test_storage import commit_blobs, stage_one_blob
from zodb_s3blobs import tids

#: For the tests of what a pack deletes: at once, not after gc-retention
#: (the default's own tests: test_gc_retention.py and the restore test here).
AT_ONCE = "gc-retention 0"


def open_storage(
    base_section: str, cache_dir, prefix: str | None = None, extra: str = ""
):
    """``<s3blobstorage>`` around *base_section*, opened from ZConfig text."""
    return ZODB.config.storageFromString(
        s3env.zconfig(base_section, str(cache_dir), prefix=prefix, extra=extra)
    )


def prefix_of(storage) -> str:
    return storage._layout.prefix


@pytest.mark.parametrize("lock_early", [False, True], ids=["late", "lock-early"])
def test_blobs_upload_under_the_tid_tpc_finish_returns(
    relstorage_base, tmp_path, monkeypatch, lock_early
):
    # RELSTORAGE_LOCK_EARLY is read once, at import; this is its effect.
    monkeypatch.setattr(relstorage.storage.tpc.vote, "LOCK_EARLY", lock_early)
    storage = open_storage(relstorage_base.section, tmp_path / "cache")
    instance = storage.new_instance()  # what ZODB.DB commits through
    try:
        data = payload()
        txn, oid = stage_one_blob(instance, data)
        instance.tpc_vote(txn)
        voted_tid = instance._commit.tid
        uploaded = list(instance._commit.attempted_keys)
        assert bucket_keys(prefix_of(storage)) == uploaded, "uploaded at vote"
        tid = instance.tpc_finish(txn)
        assert voted_tid == tid
        assert uploaded == [storage._layout.key(oid, tid)]
        with open(instance.loadBlob(oid, tid), "rb") as f:
            assert f.read() == data
    finally:
        instance.release()
        storage.close()


def test_a_transaction_without_blobs_keeps_relstorage_locking_late(
    relstorage_base, tmp_path
):
    storage = open_storage(relstorage_base.section, tmp_path / "cache")
    instance = storage.new_instance()
    try:
        txn = TransactionMetaData()
        instance.tpc_begin(txn)
        instance.store(instance.new_oid(), z64, b"no blob", "", txn)
        instance.tpc_vote(txn)
        assert instance._base._tpc_phase.committing_tid_lock is None
        instance.tpc_finish(txn)
    finally:
        instance.release()
        storage.close()


def test_undo_copies_the_blob_under_the_undo_transactions_tid(
    history_preserving_base, tmp_path
):
    storage = open_storage(history_preserving_base.section, tmp_path / "cache")
    db = ZODB.DB(storage)
    (oid, first, _), (_, second, _) = blob_revisions(db, [b"first", b"second"])
    db.undo(db.undoLog(0, 1)[0]["id"])
    transaction.commit()
    reader = open_storage(
        history_preserving_base.section, tmp_path / "empty", prefix_of(storage)
    )
    try:
        tm = transaction.TransactionManager()
        blob = ZODB.DB(reader).open(tm).root()["b"]
        with blob.open() as f:
            assert f.read() == b"first"
        undo_tid = blob._p_serial
        assert undo_tid > second
        key = storage._layout.key
        assert bucket_keys(prefix_of(storage)) == sorted(
            [key(oid, first), key(oid, second), key(oid, undo_tid)]
        )
    finally:
        tm.abort()
        reader.close()
        db.close()


def test_an_untested_relstorage_major_version_is_refused(tmp_path, monkeypatch):
    (tmp_path / "sqlite").mkdir()
    section = relstorage_section(
        f"<sqlite3>\n data-dir {tmp_path / 'sqlite'}\n</sqlite3>", False
    )
    monkeypatch.setattr(tids, "TESTED_RELSTORAGE_MAJORS", (99,))
    installed = importlib.metadata.version("RelStorage")
    with pytest.raises(tids.UnsupportedBaseStorage) as info:
        open_storage(section, tmp_path / "cache")
    message = str(info.value)
    assert f"cannot wrap RelStorage {installed}" in message
    assert "tested with for RelStorage 99.x only" in message


def test_the_installed_relstorage_is_a_tested_version():
    major = int(importlib.metadata.version("RelStorage").split(".")[0])
    assert major in tids.TESTED_RELSTORAGE_MAJORS


def test_a_relstorage_with_its_own_blob_dir_is_refused(tmp_path):
    (tmp_path / "sqlite").mkdir()
    section = relstorage_section(
        f"blob-dir {tmp_path / 'blobs'}\n"
        f"<sqlite3>\n data-dir {tmp_path / 'sqlite'}\n</sqlite3>",
        True,
    )
    with pytest.raises(tids.UnsupportedBaseStorage, match="remove blob-dir"):
        open_storage(section, tmp_path / "cache")


def test_pack_collects_revisions_committed_after_the_main_instance_polled(
    relstorage_base, tmp_path
):
    storage = open_storage(relstorage_base.section, tmp_path / "cache", extra=AT_ONCE)
    db = ZODB.DB(storage)
    polled = storage.lastTransaction()  # the main instance's snapshot
    (oid, _, _), (_, second, after_second), (_, third, _) = blob_revisions(
        db, [b"1", b"2", b"3"]
    )
    assert storage.lastTransaction() == polled < second, "the main one is stale"
    key = storage._layout.key
    if relstorage_base.keep_history:
        db.pack(after_second)  # undo may still need the second revision
        assert bucket_keys(prefix_of(storage)) == [key(oid, second), key(oid, third)]
    else:
        db.pack(time.time() + 1)
        assert bucket_keys(prefix_of(storage)) == [key(oid, third)]
    db.close()


def test_presigned_url_for_a_revision_newer_than_the_main_snapshot(
    relstorage_base, tmp_path
):
    storage = open_storage(relstorage_base.section, tmp_path / "cache")
    db = ZODB.DB(storage)
    polled = storage.lastTransaction()
    ((oid, tid, _),) = blob_revisions(db, [b"just committed"])
    assert storage.lastTransaction() == polled < tid, "the main one is stale"
    url = storage.presigned_url(oid, tid, expires=60)
    assert url is not None
    with urllib.request.urlopen(str(url), timeout=30) as response:
        assert response.read() == b"just committed"
    db.close()


def test_the_collector_leaves_a_voting_transactions_blob_alone(
    relstorage_base, tmp_path
):
    storage = open_storage(relstorage_base.section, tmp_path / "cache")
    db = ZODB.DB(storage)
    blob_revisions(db, [b"committed"])
    instance = storage.new_instance()
    try:
        txn, oid = stage_one_blob(instance, b"voting")
        instance.tpc_vote(txn)  # uploaded; the commit lock is held
        (in_flight,) = instance._commit.attempted_keys
        report = storage.collect_orphans()
        assert report.in_flight == 1 and report.orphans == 0
        tid = instance.tpc_finish(txn)
        assert in_flight in bucket_keys(prefix_of(storage))
        assert storage.collect_orphans().orphans == 0
        with open(instance.loadBlob(oid, tid), "rb") as f:
            assert f.read() == b"voting"
    finally:
        instance.release()
        db.close()


def test_a_database_commits_and_reads_blobs(relstorage_base, tmp_path):
    storage = open_storage(relstorage_base.section, tmp_path / "cache")
    db = ZODB.DB(storage)
    tm = transaction.TransactionManager()
    conn = db.open(tm)
    data = {f"b{i}": payload(1000 * i + 1) for i in range(5)}
    for name, content in data.items():
        conn.root()[name] = Blob(content)
    tm.commit()
    assert len(bucket_keys(prefix_of(storage))) == 5
    conn.close()
    db.close()
    reader = ZODB.DB(
        open_storage(relstorage_base.section, tmp_path / "empty", prefix_of(storage))
    )
    conn = reader.open(tm)
    for name, content in data.items():
        with conn.root()[name].open() as f:
            assert f.read() == content
    tm.abort()
    reader.close()


def test_relstorages_zodbpack_packs_and_collects(relstorage_base, tmp_path):
    config = s3env.zconfig(
        relstorage_base.section, str(tmp_path / "cache"), extra=AT_ONCE
    )
    storage = ZODB.config.storageFromString(config)
    db = ZODB.DB(storage)
    revisions = blob_revisions(db, [b"1", b"2", b"3"])
    db.close()
    (tmp_path / "pack.conf").write_text(config)
    done = subprocess.run(
        [console_script("zodbpack"), "--days", "-1", str(tmp_path / "pack.conf")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    oid, current, _ = revisions[-1]
    assert bucket_keys(prefix_of(storage)) == [storage._layout.key(oid, current)]


def test_the_collector_asks_the_database_not_relstorages_cache(
    relstorage_base, tmp_path
):
    """RelStorage's loadSerial answers from its local cache first, even for a
    revision another process has since packed away (relstorage/storage/
    load.py). Fails before the fix: the collector asked loadSerial, so while
    a connection of this process still viewed the packed revision (keeping it
    in the cache), its object was kept."""
    mine = open_storage(relstorage_base.section, tmp_path / "mine", extra=AT_ONCE)
    prefix = prefix_of(mine)
    mine_db = ZODB.DB(mine)
    with mine_db.transaction() as conn:
        conn.root()["b"] = Blob(b"first")
    viewer_tm = transaction.TransactionManager()
    viewer = mine_db.open(viewer_tm)  # stays on this snapshot
    blob = viewer.root()["b"]
    with blob.open() as f:
        assert f.read() == b"first"
    oid, first = blob._p_oid, blob._p_serial
    other = open_storage(relstorage_base.section, tmp_path / "other", prefix)
    other_db = ZODB.DB(other)
    with other_db.transaction() as conn, conn.root()["b"].open("w") as f:
        f.write(b"second")
    other._base.pack(time.time() + 1, referencesf)  # the base alone
    other_db.close()
    assert mine._layout.key(oid, first) in bucket_keys(prefix)
    found = []
    mine.collect_orphans(dry_run=True, on_orphan=found.append)
    assert found == [mine._layout.key(oid, first)]
    viewer.close()
    mine_db.close()


def test_no_presigned_url_for_a_revision_another_process_packed(
    relstorage_base, tmp_path
):
    """This process loaded revision 1 (RelStorage's local cache keeps it);
    another one commits revision 2 and packs revision 1 away with its object.
    Fails before the fix: ``presigned_url`` asked ``loadSerial``, which
    answered from the local cache, and signed a URL for a deleted object."""
    storage = open_storage(relstorage_base.section, tmp_path / "cache")
    db = ZODB.DB(storage)
    ((oid, first, _),) = blob_revisions(db, [b"revision 1"])
    assert storage.presigned_url(oid, first, expires=60) is not None
    other = ZODB.DB(
        open_storage(
            relstorage_base.section, tmp_path / "other", prefix_of(storage), AT_ONCE
        )
    )
    with other.transaction() as conn, conn.root()["b"].open("w") as f:
        f.write(b"revision 2")
    other.pack(time.time() + 1)
    other.close()
    assert storage._layout.key(oid, first) not in bucket_keys(prefix_of(storage))
    assert storage.presigned_url(oid, first, expires=60) is None
    db.close()


def test_presigned_urls_share_one_view_of_the_database(
    relstorage_base, tmp_path, monkeypatch
):
    """Fifty presigned URLs ask the database through one RelStorage instance
    kept for that (polled each time), not a new instance, which on
    PostgreSQL is a new database connection, per URL."""
    storage = open_storage(relstorage_base.section, tmp_path / "cache")
    db = ZODB.DB(storage)
    ((oid, tid, _),) = blob_revisions(db, [b"x"])
    created = []
    new_instance = type(storage._base).new_instance

    def counted(self):
        created.append(self)
        return new_instance(self)

    monkeypatch.setattr(type(storage._base), "new_instance", counted)
    conn = db.open()
    instance = conn._storage
    created.clear()  # the connection's own
    for _ in range(50):
        assert instance.presigned_url(oid, tid, expires=60) is not None
    assert len(created) <= 1
    conn.close()
    db.close()


def copy_of(request, base, tmp_path) -> str:
    """A ``<relstorage>`` section of a copy of *base*'s database, as a
    backup holds it (taken while no process uses the database)."""
    if base.backend == "sqlite":
        shutil.copytree(tmp_path / "sqlite", tmp_path / "sqlite-copy")
        return base.section.replace(
            str(tmp_path / "sqlite"), str(tmp_path / "sqlite-copy")
        )
    dsn = re.search(r"dsn (.+)", base.section).group(1)
    name = re.search(r"dbname=(\S+)", dsn).group(1)
    copy = request.getfixturevalue("postgresql").create_database(template=name)
    return base.section.replace(dsn, copy)


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_a_restored_copy_of_a_history_free_database_reads_every_blob(
    request, tmp_path, backend
):
    """A copy of the database (pg_dump, a file copy) taken before blobs
    changed and a pack ran, restored, reads every blob with the default
    configuration. Fails before gc-retention: 0 of 8 read back."""
    base = new_relstorage_base(request, tmp_path, backend, keep_history=False)
    storage = open_storage(base.section, tmp_path / "cache")
    prefix = prefix_of(storage)
    db = ZODB.DB(storage)
    payloads = {f"b{n}": payload() for n in range(8)}
    commit_blobs(db, payloads)
    db.close()
    backup = copy_of(request, base, tmp_path)

    db = ZODB.DB(open_storage(base.section, tmp_path / "cache2", prefix))
    change_all(db, list(payloads))
    db.pack()  # days 0
    assert db.storage.collect_orphans(dry_run=True).pending == 8
    db.close()

    db = ZODB.DB(open_storage(backup, tmp_path / "cache3", prefix))  # restored
    assert read_all(db, list(payloads)) == payloads
    db.close()
