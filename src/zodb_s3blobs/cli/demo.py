"""``zodb-s3blobs demo``: a round trip through S3BlobStorage, on this machine.

It shows a new user (and a packager checking an install) that blobs go to S3,
come back through an empty cache intact, and how fast, without an S3 account.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import shutil
import stat
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass

import ZODB
import ZODB.config
from ZConfig.datatypes import stock_datatypes
from ZODB.blob import Blob

from . import EXIT_OK, CommandError
from .localserver import (
    LocalS3,
    MissingServerError,
    local_s3_server,
)

BUCKET = "zodb-s3blobs-demo"
DEFAULT_BLOBS = 8
SMALLEST = 1 << 10
DEFAULT_LARGEST = 4 << 20
UPDATED = "blob-1"
#: The cache's own subdirectories, summarised instead of listed file by file.
CACHE_INTERNALS = ("locks", "tmp")
DESCRIPTION = """\
Start an S3 server inside this process (moto's, on 127.0.0.1), commit blobs
through an <s3blobstorage> configuration around a FileStorage, reopen the
database with an empty cache, read every blob back and compare the bytes.
Prints the bucket's keys, the cache's files and the timings. Needs no account
and sends nothing beyond the loopback interface. Exits 1 if a blob does not
read back as written.
"""


@dataclass(frozen=True)
class Timing:
    """How long one step took to move *size* bytes of *count* blobs."""

    step: str
    count: int
    size: int
    seconds: float


def register(
    subparsers: argparse._SubParsersAction[argparse.ArgumentParser],
) -> argparse.ArgumentParser:
    """Add the ``demo`` command to the ``zodb-s3blobs`` parser."""
    parser = subparsers.add_parser(
        "demo",
        help="commit and read back blobs through a local S3 server",
        description=DESCRIPTION,
    )
    parser.add_argument(
        "--blobs",
        type=_positive_int,
        default=DEFAULT_BLOBS,
        metavar="N",
        help=f"how many blobs to commit (default {DEFAULT_BLOBS})",
    )
    parser.add_argument(
        "--max-size",
        type=_byte_size,
        default=DEFAULT_LARGEST,
        metavar="SIZE",
        help="the largest blob's size, e.g. 500KB or 16MB; the sizes grow "
        "geometrically from 1KB up to it (default 4MB)",
    )
    parser.add_argument(
        "--keep",
        action="store_true",
        help="keep the temporary directory (Data.fs and both caches)",
    )
    parser.set_defaults(run=run)
    return parser


def _positive_int(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a number") from None
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {number}")
    return number


def _byte_size(value: str) -> int:
    try:
        size = stock_datatypes["byte-size"](value)
    except ValueError:
        size = 0
    if size < 1:
        raise argparse.ArgumentTypeError(
            f"{value!r} is not a size such as 4096, 500KB or 16MB"
        )
    return size


def run(args: argparse.Namespace) -> int:
    """Run the round trip in a temporary directory, removed afterwards unless
    ``--keep``; the server stops even when a step fails."""
    sizes = blob_sizes(args.blobs, args.max_size)
    if not args.debug:
        # The server's HTTP layer logs every request at INFO.
        logging.getLogger("werkzeug").setLevel(logging.WARNING)
    workdir = tempfile.mkdtemp(prefix="zodb-s3blobs-demo-")
    try:
        with local_s3_server() as server:
            print(f"S3 endpoint:  {server.endpoint_url} (moto, in this process)")
            print(f"Working dir:  {workdir}{' (kept)' if args.keep else ''}")
            _round_trip(server, workdir, sizes)
    except MissingServerError as exc:
        raise CommandError(str(exc)) from None
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    print(
        f"demo OK: {len(sizes)} blobs committed, read back with an empty cache, "
        "and verified"
    )
    return EXIT_OK


def blob_sizes(count: int, largest: int) -> list[int]:
    """*count* sizes growing geometrically from 1 KiB (or *largest*, if
    smaller) to *largest*, so the timings cover small and large files."""
    smallest = min(SMALLEST, largest)
    if count == 1:
        return [largest]
    ratio = largest / smallest
    return [round(smallest * ratio ** (i / (count - 1))) for i in range(count)]


def _round_trip(server: LocalS3, workdir: str, sizes: list[int]) -> None:
    """Commit, reopen with an empty cache, read back twice, and print it all."""
    server.create_bucket(BUCKET)
    with _database(server, workdir, "cache-commit") as db:
        expected, commit = _commit(db, sizes)
        _update(db, expected, UPDATED)
    read_cache = os.path.join(workdir, "cache-read")
    with _database(server, workdir, "cache-read") as db:
        cold = _read_back(db, expected, "cold read")
        warm = _read_back(db, expected, "warm read")
    _print_bucket(server)
    _print_cache(read_cache)
    _print_timings([commit, cold, warm])


def storage_config(server: LocalS3, workdir: str, cache_dir: str) -> str:
    """ZConfig text for a FileStorage wrapped in ``<s3blobstorage>``, as a
    zope.conf would contain it."""
    data_fs = os.path.join(workdir, "Data.fs")
    return server.zconfig(
        BUCKET, cache_dir, f"<filestorage>\n    path {data_fs}\n  </filestorage>"
    )


@contextlib.contextmanager
def _database(server: LocalS3, workdir: str, cache_name: str) -> Iterator[ZODB.DB]:
    """Open the demo database with the cache in *workdir*/*cache_name*."""
    cache_dir = os.path.join(workdir, cache_name)
    storage = ZODB.config.storageFromString(storage_config(server, workdir, cache_dir))
    db = ZODB.DB(storage)
    try:
        yield db
    finally:
        db.close()


def _commit(db: ZODB.DB, sizes: list[int]) -> tuple[dict[str, bytes], Timing]:
    """Commit one blob of random bytes per size in one transaction."""
    expected = {f"blob-{n}": os.urandom(size) for n, size in enumerate(sizes, 1)}
    started = time.perf_counter()
    with db.transaction("zodb-s3blobs demo: add blobs") as conn:
        conn.root()["blobs"] = {name: Blob(data) for name, data in expected.items()}
    seconds = time.perf_counter() - started
    return expected, Timing("commit", len(sizes), sum(sizes), seconds)


def _update(db: ZODB.DB, expected: dict[str, bytes], name: str) -> None:
    """Replace one blob's bytes in a second transaction (a new revision, so a
    new object; the first stays in S3 until a pack removes it)."""
    data = os.urandom(len(expected[name]))
    with db.transaction("zodb-s3blobs demo: update one blob") as conn:
        blob = conn.root()["blobs"][name]
        with blob.open("w") as file:
            file.write(data)
    expected[name] = data


def _read_back(db: ZODB.DB, expected: dict[str, bytes], step: str) -> Timing:
    """Read every blob and compare it with what was committed."""
    conn = db.open()
    try:
        blobs = conn.root()["blobs"]
        started = time.perf_counter()
        for name, data in expected.items():
            with blobs[name].open("r") as file:
                if file.read() != data:
                    raise CommandError(
                        f"{step}: {name} does not hold the bytes committed"
                    )
        seconds = time.perf_counter() - started
    finally:
        conn.close()
    size = sum(len(data) for data in expected.values())
    return Timing(step, len(expected), size, seconds)


def _print_bucket(server: LocalS3) -> None:
    """List the bucket's keys and sizes, as S3 reports them."""
    pages = server.client().get_paginator("list_objects_v2").paginate(Bucket=BUCKET)
    objects = [
        (item["Key"], item["Size"])
        for page in pages
        for item in page.get("Contents", ())
    ]
    total = sum(size for _key, size in objects)
    print(f"\nBucket {BUCKET} ({len(objects)} objects, {_human(total)}):")
    width = max((len(key) for key, _size in objects), default=0)
    for key, size in objects:
        print(f"  {key:<{width}}  {_human(size):>10}")
    print(f"  ({UPDATED} was updated: two revisions until a pack deletes the old one)")


def _print_cache(cache_dir: str) -> None:
    """List the blob files of the cache filled by the cold read, with modes."""
    files = sorted(_cache_files(cache_dir))
    mode = stat.S_IMODE(os.stat(cache_dir).st_mode)
    print(f"\nCache filled by the cold read ({cache_dir}, mode {mode:#o}):")
    width = max((len(path) for path, _size, _mode in files), default=0)
    for path, size, file_mode in files:
        print(f"  {path:<{width}}  {_human(size):>10}  {file_mode:#o}")
    for name in CACHE_INTERNALS:
        count = len(os.listdir(os.path.join(cache_dir, name)))
        print(f"  {name}/ ({count} files)")


def _cache_files(cache_dir: str) -> Iterator[tuple[str, int, int]]:
    """``(relative path, size, mode bits)`` of each cached blob file."""
    for parent, dirs, names in os.walk(cache_dir):
        if parent == cache_dir:
            dirs[:] = [d for d in dirs if d not in CACHE_INTERNALS]
        for name in names:
            path = os.path.join(parent, name)
            st = os.stat(path)
            yield os.path.relpath(path, cache_dir), st.st_size, stat.S_IMODE(st.st_mode)


def _print_timings(timings: list[Timing]) -> None:
    """One line per step: blobs, bytes, seconds and throughput."""
    print("\nTimings:")
    for t in timings:
        rate = t.size / t.seconds / (1 << 20) if t.seconds else float("inf")
        print(
            f"  {t.step:<10} {t.count:>4} blobs  {_human(t.size):>10}  "
            f"{t.seconds:8.3f} s  {rate:10.1f} MiB/s"
        )


def _human(size: int) -> str:
    """A byte count in B, KiB or MiB."""
    if size < 1 << 10:
        return f"{size} B"
    if size < 1 << 20:
        return f"{size / (1 << 10):.1f} KiB"
    return f"{size / (1 << 20):.1f} MiB"
