"""Loading a Blob object downloads nothing; opening it, committed() and
open('r+'/'a') download it. download-on-unghost restores eager loading."""

from __future__ import annotations

import os

import pytest
import transaction
import ZODB
from persistent.mapping import PersistentMapping
from ZODB.blob import Blob
from ZODB.MappingStorage import MappingStorage
from ZODB.tests.MVCCMappingStorage import MVCCMappingStorage

from s3hooks import requests
from zodb_s3blobs import unghost

PAYLOADS = {f"b{i}": os.urandom(2_000 + i) for i in range(64)}


@pytest.fixture(params=["FileStorage", "MVCCMappingStorage"])
def reopen(request, make_storage, tmp_path):
    """Commit 64 blobs, then return a function opening a second database on
    the same records with an empty cache: (connection, storage)."""
    writer = make_storage(
        base=None if request.param == "FileStorage" else MVCCMappingStorage()
    )
    db = ZODB.DB(writer)
    tm = transaction.TransactionManager()
    conn = db.open(tm)
    conn.root()["blobs"] = PersistentMapping(
        {name: Blob(data) for name, data in PAYLOADS.items()}
    )
    tm.commit()
    conn.close()
    if request.param == "FileStorage":
        db.close()
        path = writer._base.getName()

        def base():
            return ZODB.FileStorage.FileStorage(path, read_only=True)
    else:  # the records live in memory: share them through the writer's base

        def base():
            return writer._base

    opened = []

    def open_reader(**kw):
        storage = make_storage(
            base=base(),
            settings=writer._store.settings,
            cache_dir=tmp_path / f"empty{len(opened)}",
            **kw,
        )
        reader = ZODB.DB(storage)
        opened.append(reader)
        return reader.open(transaction.TransactionManager()), storage

    yield open_reader
    for reader in opened:
        reader.close()


def load_all(conn) -> list[Blob]:
    blobs = list(conn.root()["blobs"].values())
    for blob in blobs:
        blob._p_activate()  # what Connection.setstate does for any load
    return blobs


def test_unghosting_64_blobs_sends_no_request(reopen):
    conn, storage = reopen()
    with requests(storage._store) as sent:
        blobs = load_all(conn)
    assert sent == []
    assert all(b._p_changed is False for b in blobs), "they are unghosted"
    assert not any(os.path.exists(b._p_blob_committed) for b in blobs)


def test_opening_downloads_the_blob(reopen):
    conn, storage = reopen()
    blobs = conn.root()["blobs"]
    with requests(storage._store) as sent, blobs["b7"].open() as f:
        assert f.read() == PAYLOADS["b7"]
    assert [op for op, _url in sent] == ["GetObject"]


def test_committed_returns_an_existing_file(reopen):
    conn, _storage = reopen()
    blob = load_all(conn)[3]
    path = blob.committed()
    with open(path, "rb") as f:
        assert f.read() == PAYLOADS["b3"]


@pytest.mark.parametrize("mode", ["a", "r+"])
def test_updating_a_lazily_loaded_blob_starts_from_its_committed_bytes(
    make_storage, mode
):
    storage = make_storage()
    db = ZODB.DB(storage)
    tm = transaction.TransactionManager()
    conn = db.open(tm)
    conn.root()["b"] = Blob(b"committed")
    tm.commit()
    blob = conn.root()["b"]
    blob._p_activate()
    storage._cache.discard(blob._p_oid, blob._p_serial)  # as if evicted
    conn.cacheMinimize()
    blob = conn.root()["b"]
    blob._p_activate()  # lazily: nothing on disk
    assert not os.path.exists(blob._p_blob_committed)
    with blob.open(mode) as f:
        if mode == "r+":
            assert f.read() == b"committed"
        f.write(b"+more")
    tm.commit()
    with conn.root()["b"].open() as f:
        assert f.read() == b"committed+more"
    db.close()


def test_download_on_unghost_loads_eagerly(reopen):
    conn, storage = reopen(download_on_unghost=True)
    with requests(storage._store) as sent:
        blobs = load_all(conn)
    assert len(sent) == 64
    assert all(os.path.exists(b._p_blob_committed) for b in blobs)


def test_an_unrecognised_zodb_falls_back_to_eager_loading(reopen, monkeypatch):
    monkeypatch.setattr(unghost, "SUPPORTED", False)
    conn, storage = reopen()
    with requests(storage._store) as sent:
        load_all(conn)
    assert len(sent) == 64


def test_the_installed_zodb_is_recognised():
    assert unghost.SUPPORTED, "lazy loading is off: ZODB's code changed shape"


def test_other_callers_of_loadblob_still_get_a_file(make_storage, tmp_path):
    storage = make_storage()
    db = ZODB.DB(storage)
    tm = transaction.TransactionManager()
    conn = db.open(tm)
    conn.root()["b"] = Blob(b"direct")
    tm.commit()
    blob = conn.root()["b"]
    blob._p_activate()
    oid, tid = blob._p_oid, blob._p_serial
    db.close()
    other = make_storage(
        base=MappingStorage(),
        settings=storage._store.settings,
        cache_dir=tmp_path / "other",
    )
    with open(other.loadBlob(oid, tid), "rb") as f:
        assert f.read() == b"direct"
