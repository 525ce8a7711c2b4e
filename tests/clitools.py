"""Helpers for the operator command tests: run ``zodb-s3blobs`` in a
subprocess as a user would, write CONFIG files pointing at the session's S3
server, and build real databases with blobs to work on."""

from __future__ import annotations

import fcntl
import json
import os
import pty
import select
import signal
import struct
import subprocess
import sys
import termios
import zlib
from pathlib import Path

import ZODB
import ZODB.config
from ZODB.blob import Blob, FilesystemHelper

import s3env
from faultserver import Gate
from zodb_s3blobs.keys import KeyLayout
from zodb_s3blobs.objectstore import CHECKSUM_METADATA


def run(*args: str | Path, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run ``python -m zodb_s3blobs.cli ARGS``; stdout and stderr are pipes,
    so no progress bar is drawn."""
    env = dict(os.environ, NO_PROXY="127.0.0.1,localhost")
    return subprocess.run(
        [sys.executable, "-m", "zodb_s3blobs.cli", *map(str, args)],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def start(*args: str | Path) -> subprocess.Popen:
    """Start ``python -m zodb_s3blobs.cli ARGS`` without waiting for it."""
    return subprocess.Popen(
        [sys.executable, "-m", "zodb_s3blobs.cli", *map(str, args)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def interrupt(*args: str | Path, gate: Gate) -> tuple[int, str]:
    """Start ``zodb-s3blobs ARGS`` against a fault server holding requests at
    *gate*, press Ctrl-C (SIGINT) once the command waits there, then open the
    gate; return its exit code and stderr. The command cannot have finished
    before the interrupt, however busy the machine."""
    process = start(*args)
    try:
        assert gate.reached.wait(120), "the command never reached the gate"
        assert process.poll() is None, "the command ended before it was interrupted"
        process.send_signal(signal.SIGINT)
    finally:
        gate.open()
    _out, err = process.communicate(timeout=120)
    return process.returncode, err


def run_json(*args: str | Path) -> tuple[int, dict]:
    """Run with ``--json``; return the exit code and the one JSON document."""
    result = run(*args, "--json")
    return result.returncode, json.loads(result.stdout)


def run_on_terminal(*args: str | Path, timeout: float = 120) -> tuple[int, bytes]:
    """Run ``python -m zodb_s3blobs.cli ARGS`` with stderr on a terminal (a
    pty of 80 columns), stdout discarded; return the exit code and every byte
    written to the terminal."""
    terminal, stderr = pty.openpty()
    fcntl.ioctl(stderr, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 80, 0, 0))
    env = dict(os.environ, NO_PROXY="127.0.0.1,localhost")
    try:
        process = subprocess.Popen(
            [sys.executable, "-m", "zodb_s3blobs.cli", *map(str, args)],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=stderr,
        )
        os.close(stderr)  # the process has its own copy
        shown = b""
        while True:  # read as it is written: a closed pty may drop what is left
            if select.select([terminal], [], [], 0.1)[0]:
                try:
                    chunk = os.read(terminal, 4096)
                except OSError:  # EIO: the process has closed its end
                    break
                shown += chunk
            elif process.poll() is not None:
                break
    finally:
        os.close(terminal)
    return process.wait(timeout=timeout), shown


def filestorage(path: Path, blob_dir: Path | None = None) -> str:
    """A <filestorage> section."""
    blob_line = f"blob-dir {blob_dir}" if blob_dir else ""
    return f"<filestorage>\n  path {path}\n  {blob_line}\n</filestorage>"


def sqlite3(data_dir: Path) -> str:
    """RelStorage's <sqlite3> adapter section."""
    return f"<sqlite3>\n    data-dir {data_dir}\n  </sqlite3>"


def relstorage(
    adapter: str, keep_history: bool = True, blob_dir: Path | None = None
) -> str:
    """A <relstorage> section around *adapter*; with *blob_dir* it keeps its
    blobs in its blob_chunk table (shared-blob-dir false)."""
    blobs = f"blob-dir {blob_dir}\n  shared-blob-dir false" if blob_dir else ""
    history = "true" if keep_history else "false"
    return (
        f"<relstorage>\n  keep-history {history}\n  {blobs}\n  {adapter}\n</relstorage>"
    )


def write_config(
    tmp_path: Path,
    base_section: str,
    prefix: str | None = None,
    extra: str = "",
    name: str = "s3.conf",
) -> Path:
    """Write CONFIG: <s3blobstorage> around *base_section*, on the session's
    bucket under a new prefix (or *prefix*), cache in ``tmp_path/cache``."""
    text = s3env.zconfig(
        base_section, str(tmp_path / "cache"), prefix=prefix, extra=extra
    )
    if "<relstorage>" in base_section:
        text = "%import relstorage\n" + text
    path = tmp_path / name
    path.write_text(text)
    return path


def prefix_of(config: Path) -> str:
    """The s3-prefix written into CONFIG."""
    for line in config.read_text().splitlines():
        if line.strip().startswith("s3-prefix "):
            return line.split()[1]
    return ""


def layout(config: Path) -> KeyLayout:
    return KeyLayout(prefix_of(config))


def s3_objects(config: Path) -> dict[str, int]:
    """``key -> size`` of every object under CONFIG's blobs/ root."""
    client = s3env.server().client()
    pages = client.get_paginator("list_objects_v2").paginate(
        Bucket=s3env.BUCKET, Prefix=layout(config).root
    )
    return {
        item["Key"]: item["Size"] for page in pages for item in page.get("Contents", ())
    }


def s3_read(key: str) -> bytes:
    response = s3env.server().client().get_object(Bucket=s3env.BUCKET, Key=key)
    return response["Body"].read()


def crc32(data: bytes) -> str:
    """The CRC32 of *data* as recorded in an object's metadata."""
    return f"{zlib.crc32(data):08x}"


def s3_rewrite(key: str, data: bytes, checksum: str | None) -> None:
    """Replace the object under *key* by *data*, with *checksum* as its
    recorded CRC32 (None: none, as zodb-s3blobs 1.x wrote objects)."""
    metadata = {} if checksum is None else {CHECKSUM_METADATA: checksum}
    s3env.server().client().put_object(
        Bucket=s3env.BUCKET, Key=key, Body=data, Metadata=metadata
    )


def commit_blobs(
    storage, sizes: list[int], updates: int = 0
) -> dict[tuple[bytes, bytes], bytes]:
    """Commit one blob per size into ``root["blobs"]`` in one transaction,
    then rewrite the first *updates* of them in another; close the database.
    Returns every revision committed: ``(oid, tid) -> bytes``."""
    db = ZODB.DB(storage)
    try:
        with db.transaction() as conn:
            conn.root()["blobs"] = [
                _blob(bytes([n % 251]) * size) for n, size in enumerate(sizes)
            ]
        revisions = _revisions(db)
        if updates:
            with db.transaction() as conn:
                for n, blob in enumerate(conn.root()["blobs"][:updates]):
                    with blob.open("w") as file:
                        file.write(b"updated %d" % n)
            revisions.update(_revisions(db))
    finally:
        db.close()
    return revisions


def _blob(data: bytes) -> Blob:
    blob = Blob()
    with blob.open("w") as file:
        file.write(data)
    return blob


def _revisions(db: ZODB.DB) -> dict[tuple[bytes, bytes], bytes]:
    with db.transaction() as conn:
        result = {}
        for blob in conn.root()["blobs"]:
            with blob.open("r") as file:
                result[blob._p_oid, blob._p_serial] = file.read()
    return result


def current(
    revisions: dict[tuple[bytes, bytes], bytes],
) -> dict[tuple[bytes, bytes], bytes]:
    """The newest revision of each oid among *revisions*."""
    newest: dict[bytes, bytes] = {}
    for oid, tid in revisions:
        newest[oid] = max(tid, newest.get(oid, tid))
    return {(oid, tid): revisions[oid, tid] for oid, tid in newest.items()}


def relstorage_with_blob_chunks(
    tmp_path: Path, sizes: list[int], adapter: str, keep_history: bool = True
) -> dict[tuple[bytes, bytes], bytes]:
    """Commit blobs of *sizes* (two of them updated) into a RelStorage on
    *adapter* that keeps them in its blob_chunk table; return every revision
    committed."""
    section = relstorage(adapter, keep_history, blob_dir=tmp_path / "rs-blob-cache")
    storage = ZODB.config.storageFromString("%import relstorage\n" + section)
    return commit_blobs(storage, sizes, updates=2)


def filestorage_with_blob_dir(
    tmp_path: Path, sizes: list[int]
) -> tuple[dict[tuple[bytes, bytes], bytes], Path, Path]:
    """A FileStorage keeping blobs of *sizes* (two of them updated) in its own
    blob directory, as before a move to S3: (every revision, Data.fs, blob dir)."""
    data_fs, blob_dir = tmp_path / "Data.fs", tmp_path / "blobs"
    storage = ZODB.config.storageFromString(filestorage(data_fs, blob_dir))
    return commit_blobs(storage, sizes, updates=2), data_fs, blob_dir


def blob_dir_revisions(blob_dir: Path) -> dict[tuple[bytes, bytes], int]:
    """``(oid, tid) -> size`` of every blob file, as ZODB's own helper sees them."""
    helper = FilesystemHelper(str(blob_dir))
    found = {}
    for _oid, path in helper.listOIDs():
        for name in os.listdir(path):
            oid, tid = helper.splitBlobFilename(os.path.join(path, name))
            if oid is not None:
                found[oid, tid] = os.path.getsize(os.path.join(path, name))
    return found


def open_storage(config: Path):
    """The storage CONFIG describes, opened in this process."""
    return ZODB.config.storageFromFile(open(config))


def read_through(
    config: Path, revisions: dict[tuple[bytes, bytes], bytes]
) -> dict[tuple[bytes, bytes], bytes]:
    """Read *revisions* through the storage CONFIG describes (from S3)."""
    storage = open_storage(config)
    try:
        read = {}
        for oid, tid in revisions:
            with storage.openCommittedBlobFile(oid, tid) as file:
                read[oid, tid] = file.read()
        return read
    finally:
        storage.close()
