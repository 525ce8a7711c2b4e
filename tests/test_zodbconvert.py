"""Migrating a database with blobs into ``<s3blobstorage>`` and out again:
RelStorage's ``zodbconvert`` (run as an operator runs it, a process of its
own) and ``copyTransactionsFrom``. Every revision keeps its source tid, so
its object key is ``blobs/OID/SOURCE_TID.blob``, and reads back."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import ZODB
import ZODB.config
from ZODB.FileStorage import FileStorage

import s3env
from deploy import (
    blob_key,
    bucket_keys,
    console_script,
    new_relstorage_base,
    payload,
)
from test_gc import blob_revisions
from test_storage import commit_blobs

Revisions = dict[tuple[bytes, bytes], bytes]


def filestorage_section(directory: Path, name: str = "") -> str:
    """A ``<filestorage>`` section with a blob-dir, as databases are kept
    before they move their blobs to S3."""
    return f"""
<filestorage {name}>
  path {directory / "Data.fs"}
  blob-dir {directory / "blobs"}
</filestorage>
"""


def source_database(directory: Path) -> Revisions:
    """A FileStorage with a blob-dir holding several blob revisions, some
    committed together; return (oid, tid) -> content for every revision."""
    directory.mkdir()
    db = ZODB.DB(
        FileStorage(str(directory / "Data.fs"), blob_dir=str(directory / "blobs"))
    )
    together = {"x": payload(), "y": payload(70_000)}
    revisions = {
        ref: together[name] for name, ref in commit_blobs(db, together).items()
    }
    contents = [payload(1000 * i + 1) for i in range(3)]
    for (oid, tid, _), data in zip(blob_revisions(db, contents), contents, strict=True):
        revisions[oid, tid] = data
    db.close()
    return revisions


def assert_blobs(storage, revisions: Revisions) -> None:
    """Every revision loads from *storage* with its content."""
    for (oid, tid), data in revisions.items():
        with open(storage.loadBlob(oid, tid), "rb") as f:
            assert f.read() == data


def zodbconvert(config: str, directory: Path) -> None:
    """Run zodbconvert on *config*, which names a source and a destination."""
    path = directory / "zodbconvert.conf"
    path.write_text(config)
    done = subprocess.run(
        [console_script("zodbconvert"), str(path)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr


def named(s3_config: str, name: str) -> str:
    """*s3_config*'s ``<s3blobstorage>`` section named *name*: zodbconvert
    reads the sections named source and destination."""
    return s3_config.replace("<s3blobstorage>", f"<s3blobstorage {name}>", 1)


@pytest.fixture(params=["filestorage", "sqlite", "postgresql"])
def s3_base(request, tmp_path) -> str:
    """A history-preserving base for ``<s3blobstorage>``, keeping every
    revision: FileStorage, or RelStorage on SQLite or PostgreSQL."""
    if request.param == "filestorage":
        return f"<filestorage>\n path {tmp_path / 'target.fs'}\n</filestorage>"
    return new_relstorage_base(request, tmp_path, request.param, True).section


def test_zodbconvert_into_s3_and_back_out(s3_base, tmp_path):
    revisions = source_database(tmp_path / "source")
    prefix = s3env.new_prefix()
    s3_config = s3env.zconfig(s3_base, str(tmp_path / "cache"), prefix)
    zodbconvert(
        filestorage_section(tmp_path / "source", "source")
        + named(s3_config, "destination"),
        tmp_path,
    )
    assert bucket_keys(prefix) == sorted(blob_key(prefix, *ref) for ref in revisions)
    empty_cache = s3env.zconfig(s3_base, str(tmp_path / "empty"), prefix)
    storage = ZODB.config.storageFromString(empty_cache)
    try:
        assert_blobs(storage, revisions)
    finally:
        storage.close()

    (tmp_path / "out").mkdir()
    zodbconvert(
        named(empty_cache, "source")
        + filestorage_section(tmp_path / "out", "destination"),
        tmp_path,
    )
    out = FileStorage(
        str(tmp_path / "out" / "Data.fs"), blob_dir=str(tmp_path / "out" / "blobs")
    )
    try:
        assert_blobs(out, revisions)
    finally:
        out.close()


def test_copy_transactions_from_filestorage_and_back(make_storage, tmp_path):
    revisions = source_database(tmp_path / "source")
    source = FileStorage(
        str(tmp_path / "source" / "Data.fs"),
        blob_dir=str(tmp_path / "source" / "blobs"),
    )
    storage = make_storage()
    storage.copyTransactionsFrom(source)
    source.close()
    prefix = storage._layout.prefix
    assert bucket_keys(prefix) == sorted(blob_key(prefix, *ref) for ref in revisions)
    for oid, tid in revisions:
        storage._cache.discard(oid, tid)  # read back from S3
    assert_blobs(storage, revisions)

    out = FileStorage(str(tmp_path / "out.fs"), blob_dir=str(tmp_path / "out-blobs"))
    out.copyTransactionsFrom(storage)
    assert_blobs(out, revisions)
    out.close()
