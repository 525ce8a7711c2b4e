"""A ZEO server whose storage is ``<s3blobstorage>``, and its clients.

The test starts ``runzeo -C zeo.conf`` as its own process on a free port of
127.0.0.1 and stops it with SIGTERM. The clients are ``ClientStorage``s with
blob cache directories of their own (``shared_blob_dir`` false): blobs travel
through the server, which keeps them in S3 and in its own cache-dir."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import transaction
import ZEO
import ZODB

import s3env
from deploy import blob_key, bucket_keys, payload
from ports import HOST
from test_gc import blob_revisions
from zeoserver import runzeo


@dataclass
class ZEOServer:
    port: int
    prefix: str

    def client_db(self, blob_dir: Path) -> ZODB.DB:
        """A database over a new ClientStorage with its own blob cache."""
        storage = ZEO.client(
            (HOST, self.port), blob_dir=str(blob_dir), shared_blob_dir=False
        )
        return ZODB.DB(storage)


@pytest.fixture
def zeo_server(tmp_path) -> Iterator[ZEOServer]:
    prefix = s3env.new_prefix()
    base = f"<filestorage>\n    path {tmp_path / 'Data.fs'}\n  </filestorage>"
    # gc-retention 0: the pack test checks what a pack deletes, at once.
    section = s3env.zconfig(
        base, str(tmp_path / "server-cache"), prefix, extra="gc-retention 0"
    )
    with runzeo(tmp_path, section) as port:
        yield ZEOServer(port, prefix)


def test_commits_from_one_client_are_read_by_another(zeo_server, tmp_path):
    writer = zeo_server.client_db(tmp_path / "client1")
    reader = zeo_server.client_db(tmp_path / "client2")
    try:
        contents = [payload() for _ in range(3)]
        revisions = blob_revisions(writer, contents)
        assert bucket_keys(zeo_server.prefix) == sorted(
            blob_key(zeo_server.prefix, oid, tid) for oid, tid, _ in revisions
        )
        tm = transaction.TransactionManager()
        with reader.open(tm).root()["b"].open() as f:
            assert f.read() == contents[-1]
        for (oid, tid, _), data in zip(revisions, contents, strict=True):
            with open(reader.storage.loadBlob(oid, tid), "rb") as f:
                assert f.read() == data
        received = (tmp_path / "client2").rglob("*.blob")
        assert sorted(p.read_bytes() for p in received) == sorted(contents)
        tm.abort()
    finally:
        writer.close()
        reader.close()


def test_pack_through_a_client_removes_what_the_server_no_longer_holds(
    zeo_server, tmp_path
):
    db = zeo_server.client_db(tmp_path / "client")
    try:
        revisions = blob_revisions(db, [payload() for _ in range(3)])
        (oid, _, _), (_, second, after_second), (_, third, _) = revisions
        assert len(bucket_keys(zeo_server.prefix)) == 3
        db.pack(after_second)  # the second revision was current then
        assert bucket_keys(zeo_server.prefix) == sorted(
            blob_key(zeo_server.prefix, oid, tid) for tid in (second, third)
        )
    finally:
        db.close()
