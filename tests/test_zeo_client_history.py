"""A database's history through ``<s3blobstorage><zeoclient>``: migrating
one in (``copyTransactionsFrom``, ``zodbconvert``), and reading it back with
undo, history and the iterator, as for the other bases.

Each test has a ZEO server of its own over an empty FileStorage without
blob-dir (a migration restores the source's transaction ids, which must be
later than the database's last one).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import transaction
import ZODB
from ZODB.blob import Blob, is_blob_record
from ZODB.FileStorage import FileStorage

from deploy import blob_key, bucket_keys, payload
from test_zeo_client import ZEOSite, commit_blob, site_of_its_own
from test_zodbconvert import (
    assert_blobs,
    filestorage_section,
    named,
    source_database,
    zodbconvert,
)


@pytest.fixture
def own_site(tmp_path) -> Iterator[ZEOSite]:
    with site_of_its_own(tmp_path) as site:
        yield site


def test_copy_transactions_from_a_filestorage_into_a_client_and_back(
    own_site, tmp_path
):
    """Every revision keeps its source tid, lands under its own key (no
    staging, no journal: a restore names its tid), reads back from S3, and
    copies out of the client into a FileStorage again."""
    revisions = source_database(tmp_path / "source")
    source = FileStorage(
        str(tmp_path / "source" / "Data.fs"),
        blob_dir=str(tmp_path / "source" / "blobs"),
        read_only=True,
    )
    storage = own_site.storage(own_site.directory / "cache")
    try:
        storage.copyTransactionsFrom(source)
        assert storage._shared.copier.pending() == 0
    finally:
        source.close()
        storage.close()
    prefix = own_site.prefix
    assert bucket_keys(prefix) == sorted(blob_key(prefix, *ref) for ref in revisions)
    assert own_site.staging_keys() == []
    reader = own_site.storage(own_site.directory / "empty-cache")
    out = FileStorage(str(tmp_path / "out.fs"), blob_dir=str(tmp_path / "out-blobs"))
    try:
        assert_blobs(reader, revisions)
        out.copyTransactionsFrom(reader)
        assert_blobs(out, revisions)
    finally:
        out.close()
        reader.close()


def test_zodbconvert_into_a_client(own_site, tmp_path):
    """zodbconvert, run as an operator runs it, with the client's
    ``<s3blobstorage><zeoclient>`` section as its destination."""
    revisions = source_database(tmp_path / "source")
    client = own_site.config(own_site.directory / "cache")
    zodbconvert(
        filestorage_section(tmp_path / "source", "source")
        + named(client, "destination"),
        tmp_path,
    )
    prefix = own_site.prefix
    assert bucket_keys(prefix) == sorted(blob_key(prefix, *ref) for ref in revisions)
    reader = own_site.storage(own_site.directory / "empty-cache")
    try:
        assert_blobs(reader, revisions)
    finally:
        reader.close()


def test_undo_through_a_client_copies_the_undone_to_revision(own_site):
    """Undoing a blob's last change makes a new revision whose object is the
    earlier one's, copied after the commit (the ZEO client learns the new
    tid only then); it reads back from another client's empty cache."""
    db = ZODB.DB(own_site.storage(own_site.directory / "cache"))
    first, second = payload(), payload(3000)
    try:
        oid, _ = commit_blob(db, "u", first)
        commit_blob(db, "u", second)
        tm = transaction.TransactionManager()
        tm.begin()
        (last,) = db.undoLog(0, 1)
        db.undo(last["id"], tm.get())
        tm.commit()
        root = db.open(tm).root()
        root["u"]._p_activate()
        undone = root["u"]._p_serial
        tm.abort()
        db.storage._shared.copier.close()  # waits for the copy
    finally:
        db.close()
    assert blob_key(own_site.prefix, oid, undone) in bucket_keys(own_site.prefix)
    assert own_site.staging_keys() == []
    reader = own_site.storage(own_site.directory / "empty-cache")
    try:
        with open(reader.loadBlob(oid, undone), "rb") as f:
            assert f.read() == first
    finally:
        reader.close()


def test_history_through_a_client_lists_each_blob_revision(own_site):
    db = ZODB.DB(own_site.storage(own_site.directory / "cache"))
    try:
        contents = [payload(1000 + i) for i in range(3)]
        tids = [commit_blob(db, "h", data)[1] for data in contents]
        oid = commit_blob(db, "h", contents[-1])[0]
        history = db.storage.history(oid, size=10)
        assert [entry["tid"] for entry in history][1:] == tids[::-1]
        for tid, data in zip(tids, contents, strict=True):
            with open(db.storage.loadBlob(oid, tid), "rb") as f:
                assert f.read() == data
    finally:
        db.close()


def test_iterator_through_a_client_yields_the_blob_records(own_site):
    """Every blob record the iterator yields loads its revision's bytes,
    from another client's empty cache (so from S3)."""
    db = ZODB.DB(own_site.storage(own_site.directory / "cache"))
    try:
        tm = transaction.TransactionManager()
        root = db.open(tm).root()
        contents = {f"i{n}": payload(2000 + n) for n in range(3)}
        for name, data in contents.items():
            root[name] = Blob(data)
        tm.commit()
        oids = {root[name]._p_oid: data for name, data in contents.items()}
        tm.abort()
        db.storage._shared.copier.close()
    finally:
        db.close()
    reader = own_site.storage(own_site.directory / "empty-cache")
    try:
        found = {}
        for txn in reader.iterator():
            for record in txn:
                if is_blob_record(record.data):
                    with open(reader.loadBlob(record.oid, record.tid), "rb") as f:
                        found[record.oid] = f.read()
        assert found == oids
    finally:
        reader.close()
