"""The guard against two databases writing under one prefix: a staging copy
of a site on the live prefix that edits and packs deletes nothing."""

from __future__ import annotations

import io
import json
import logging
import shutil

import pytest
import ZODB
from ZODB.FileStorage import FileStorage

from test_commit_path import eventually
from test_gc_retention import change_all, read_all
from test_storage import commit_blobs, keys
from zodb_s3blobs import writers
from zodb_s3blobs.writers import SecondWriter, writers_root

pytestmark = pytest.mark.s3_servers("moto", "rgw")


def records(storage) -> list[writers.Record]:
    return writers.read_records(storage._store, storage._layout.prefix)


def wait_for_records(storage, count: int) -> list[writers.Record]:
    """The writers' records once *count* exist (they are written in the
    background after a commit)."""
    eventually(lambda: len(records(storage)) == count)
    return records(storage)


def updated_since(storage, since: float) -> bool:
    """Was the record of *storage*'s database updated after *since*?"""
    mine, _label = writers.identity(storage._base)
    return any(r.id == mine and r.updated > since for r in records(storage))


def test_a_staging_copy_that_edits_and_packs_deletes_none_of_the_live_blobs(
    make_storage, tmp_path, caplog, monkeypatch
):
    """The operator copies Data.fs to a staging site that keeps the live
    bucket and prefix, edits there and packs, while the live site goes on
    committing. Fails before the guard (with gc-retention 0, as before it
    existed): 0 of 10 blobs still readable on the live site.

    A process records its commits at most every RECORD_INTERVAL (an hour);
    here every commit, so that the live site's commit after the copy started
    is on record without waiting an hour (with the default gc-retention the
    orphans wait a week, far longer)."""
    monkeypatch.setattr(writers, "RECORD_INTERVAL", 0.0)
    live_fs, staging_fs = tmp_path / "live.fs", tmp_path / "staging.fs"
    live = make_storage(base=FileStorage(str(live_fs)), gc_retention=0)
    live_db = ZODB.DB(live)
    payloads = {f"b{n}": bytes([n]) * 100 for n in range(10)}
    commit_blobs(live_db, payloads)
    shutil.copy(live_fs, staging_fs)
    settings = live._store.settings
    with caplog.at_level(logging.WARNING, logger="zodb_s3blobs.writers"):
        staging = make_storage(
            base=FileStorage(str(staging_fs)), settings=settings, gc_retention=0
        )
    assert "Another database wrote under" in caplog.text, "a warning at start"
    staging_id, _label = writers.identity(staging._base)
    (staging_record,) = [r for r in records(staging) if r.id == staging_id]
    staging_db = ZODB.DB(staging)
    change_all(staging_db, list(payloads))

    def live_commits() -> bool:
        """The live site goes on committing, until its record (LastModified:
        whole seconds on some servers) is later than the copy's start."""
        commit_blobs(live_db, {"later": b"the live site goes on"})
        return updated_since(live, staging_record.since)

    eventually(live_commits)
    before = keys(live)

    with caplog.at_level(logging.ERROR, logger="zodb_s3blobs"):
        staging_db.pack(days=0)
    assert "Two databases write under" in caplog.text
    assert f"FileStorage {staging_fs}" in caplog.text
    assert f"FileStorage {live_fs}" in caplog.text
    with pytest.raises(SecondWriter, match="give each database its own s3-prefix"):
        staging.collect_orphans()
    assert keys(live) == before
    live_db.close()
    staging_db.close()
    reader = ZODB.DB(make_storage(base=FileStorage(str(live_fs)), settings=settings))
    assert read_all(reader, list(payloads)) == payloads
    reader.close()


def test_a_restored_backup_is_not_a_second_writer(make_storage, tmp_path):
    """The same Data.fs restored in place is the same database: its
    collections go on."""
    data = tmp_path / "Data.fs"
    storage = make_storage(base=FileStorage(str(data)), gc_retention=0)
    db = ZODB.DB(storage)
    commit_blobs(db, {"a": b"1"})
    db.close()
    shutil.copy(data, tmp_path / "backup.fs")
    db = ZODB.DB(
        make_storage(base=FileStorage(str(data)), settings=storage._store.settings)
    )
    commit_blobs(db, {"a": b"2"})
    db.close()
    shutil.copy(tmp_path / "backup.fs", data)
    restored = make_storage(
        base=FileStorage(str(data)), settings=storage._store.settings, gc_retention=0
    )
    db = ZODB.DB(restored)
    commit_blobs(db, {"b": b"3"})
    (record,) = wait_for_records(restored, 1)
    assert restored.collect_orphans().kept >= 2
    db.close()


def test_a_database_that_replaced_another_is_not_refused(make_storage, tmp_path):
    """A site moved to another path (or host) starts writing after the old
    one stopped: the old record is older than the new one's start."""
    old = make_storage(base=FileStorage(str(tmp_path / "old.fs")), gc_retention=0)
    db = ZODB.DB(old)
    commit_blobs(db, {"a": b"1"})
    wait_for_records(old, 1)
    db.close()
    shutil.copy(tmp_path / "old.fs", tmp_path / "new.fs")
    new = make_storage(
        base=FileStorage(str(tmp_path / "new.fs")),
        settings=old._store.settings,
        gc_retention=0,
    )
    db = ZODB.DB(new)
    commit_blobs(db, {"a": b"2"})
    wait_for_records(new, 2)
    db.pack(days=0)
    assert len(keys(new)) == 1, "the first revision of a was collected"
    db.close()


def test_the_record_names_no_secret(make_storage, tmp_path):
    """A base's name may hold a DSN with a password: only its hash is kept."""
    storage = make_storage(base=FileStorage(str(tmp_path / "Data.fs")))
    db = ZODB.DB(storage)
    commit_blobs(db, {"a": b"1"})
    (record,) = wait_for_records(storage, 1)
    assert record.key.startswith(writers_root(storage._layout.prefix))
    raw = io.BytesIO()
    storage._store.download(record.key, raw)
    body = json.loads(raw.getvalue())
    assert set(body) == {"label", "last_commit", "host", "pid"}
    assert body["label"].startswith(f"FileStorage {tmp_path / 'Data.fs'} on ")
    other = writers.identity(type("Secret", (), {"getName": lambda s: "pw=hunter2"})())
    assert "hunter2" not in other[1]
    db.close()


def test_a_zeo_clients_identity_does_not_change_with_its_connection():
    """ClientStorage's name ends in its connection's state: a client opened
    while disconnected must not count as another database (every other
    client's pack would refuse). Fails before the fix."""
    from zodb_s3blobs.writers import identity

    class Client:
        def __init__(self, state: str) -> None:
            self.state = state

        def getName(self) -> str:  # noqa: N802 -- ZODB's name
            return f"('zeo', 8100) ({self.state})"

    assert identity(Client("connected")) == identity(Client("disconnected"))
