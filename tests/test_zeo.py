"""A ZEO server whose storage is ``<s3blobstorage>``, and its clients.

The test starts ``runzeo -C zeo.conf`` as its own process on a free port of
127.0.0.1 and stops it with SIGTERM. The clients are ``ClientStorage``s with
blob cache directories of their own (``shared_blob_dir`` false): blobs travel
from the server, which reads them from S3 into its own cache-dir."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import transaction
import ZEO
import ZODB
from ZODB.blob import Blob

import s3env
from deploy import blob_key, bucket_keys, console_script, payload
from ports import HOST, free_port, wait_for_port


@dataclass
class ZEOServer:
    port: int
    prefix: str
    cache_dir: Path

    def client_db(self, blob_dir: Path) -> ZODB.DB:
        """A database over a new ClientStorage with its own blob cache."""
        storage = ZEO.client(
            (HOST, self.port), blob_dir=str(blob_dir), shared_blob_dir=False
        )
        return ZODB.DB(storage)


@pytest.fixture
def zeo_server(tmp_path) -> Iterator[ZEOServer]:
    port = free_port()
    prefix = s3env.new_prefix()
    cache_dir = tmp_path / "server-cache"
    base = f"<filestorage>\n    path {tmp_path / 'Data.fs'}\n  </filestorage>"
    config = tmp_path / "zeo.conf"
    config.write_text(
        f"<zeo>\n  address {HOST}:{port}\n</zeo>\n"
        + s3env.zconfig(base, str(cache_dir), prefix)
    )
    with open(tmp_path / "zeo.log", "w") as log:
        server = subprocess.Popen(
            [console_script("runzeo"), "-C", str(config)],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        wait_for_port(port, server)
        yield ZEOServer(port, prefix, cache_dir)
    finally:
        server.terminate()
        server.wait(timeout=30)


def committed(db: ZODB.DB, name: str, data: bytes) -> tuple[bytes, bytes, float]:
    """Write *data* into the blob root[name]; return its oid, the new tid and
    the time just after the commit."""
    tm = transaction.TransactionManager()
    conn = db.open(tm)
    root = conn.root()
    if name not in root:
        root[name] = Blob()
    with root[name].open("w") as f:
        f.write(data)
    tm.commit()
    blob = root[name]
    blob._p_activate()
    conn.close()
    time.sleep(0.05)
    return blob._p_oid, blob._p_serial, time.time()


def read(db: ZODB.DB, name: str) -> bytes:
    tm = transaction.TransactionManager()
    conn = db.open(tm)
    with conn.root()[name].open() as f:
        data = f.read()
    conn.close()
    return data


def test_a_commit_from_one_client_is_read_by_another(zeo_server, tmp_path):
    writer = zeo_server.client_db(tmp_path / "client1")
    reader = zeo_server.client_db(tmp_path / "client2")
    try:
        written, contents = [], []
        for _revision in range(3):
            contents.append(payload())
            written.append(committed(writer, "doc", contents[-1])[:2])
            assert read(reader, "doc") == contents[-1]
        assert bucket_keys(zeo_server.prefix) == sorted(
            blob_key(zeo_server.prefix, oid, tid) for oid, tid in written
        )
        received = (tmp_path / "client2").rglob("*.blob")
        assert sorted(p.read_bytes() for p in received) == sorted(contents)
    finally:
        writer.close()
        reader.close()


def test_pack_through_a_client_removes_what_the_server_no_longer_holds(
    zeo_server, tmp_path
):
    db = zeo_server.client_db(tmp_path / "client")
    try:
        revisions = [committed(db, "doc", payload()) for _ in range(3)]
        (oid, first, _), (_, second, after_second), (_, third, _) = revisions
        assert len(bucket_keys(zeo_server.prefix)) == 3
        db.pack(after_second)  # the second revision was current then
        assert bucket_keys(zeo_server.prefix) == sorted(
            blob_key(zeo_server.prefix, oid, tid) for tid in (second, third)
        )
    finally:
        db.close()
