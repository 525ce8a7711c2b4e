"""Benchmark S3BlobStorage against plain boto3, both through one delay line.

``python bench/bench.py`` starts moto's S3 server in this process, puts a
:class:`delayline.DelayLine` (5 ms each way by default) in front of it, and
times the storage's common paths next to what plain boto3 needs for the same
bytes, so that the storage's overhead shows as a ratio with a target. A missed
target prints MISS and still exits 0 (this is a measurement); an error exits 1.
``--quick`` shrinks every size and count for a smoke run.

Everything listens on 127.0.0.1 only and the working directory is temporary.
moto is made to serve ranged GETs at the cost of the range, as S3 does
(``s3fidelity.py``); otherwise eight ranges of one object cost eight copies of
all of it.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import math
import os
import shutil
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from typing import TypeVar
from urllib.parse import urlsplit

import boto3
import transaction
import ZODB
import ZODB.config
from botocore.config import Config
from delayline import DEFAULT_DELAY, DelayLine
from persistent.mapping import PersistentMapping
from s3fidelity import ranges_cost_their_size
from ZODB.blob import Blob
from ZODB.FileStorage import FileStorage
from ZODB.utils import p64

from zodb_s3blobs.cache import BlobCache
from zodb_s3blobs.cli.localserver import (
    ACCESS_KEY,
    REGION,
    SECRET_KEY,
    LocalS3,
    local_s3_server,
)
from zodb_s3blobs.objectstore import DELETE_BATCH

T = TypeVar("T")
KiB = 1 << 10
MiB = 1 << 20
BUCKET = "zodb-s3blobs-bench"
#: Matches the storage's default s3-max-concurrency.
PUT_WORKERS = 10
#: Parallel uploads that only set up a step (the orphans); not timed.
SETUP_WORKERS = 32
#: Orphans get oids far above any the benchmark's databases allocate, and the
#: tid 5, older than any transaction they commit.
ORPHAN_OIDS = 1 << 32
ORPHAN_TID = p64(5)
#: The cached files of the eviction step: tiny, all of one revision.
TINY = b"x" * 100
TINY_TID = p64(0x3C0FFEE)
#: How many files each eviction call of that step removes.
EVICTED = 5
#: Where that step's files go if it is writable: a RAM-backed file system.
#: The step compares the check with a walk over cached metadata, which costs
#: the same there, while creating 100,000 files on a busy disk can take minutes.
RAM_DIR = "/dev/shm"

COMMIT_SMALL = "commit small blobs"
COLD_SMALL = "cold read small blobs"
COMMIT_LARGE = "commit large blob"
COLD_LARGE = "cold read large blob"
UNGHOST = "unghost blobs, empty cache"
WARM_READ = "warm read, cached blob"
ORPHANS = "collect orphans"
EVICTION = "eviction check"
INSTALL_FSYNC = "cache install, fsync"


@dataclass(frozen=True)
class Scale:
    """How much each step moves; the quick scale is for smoke runs."""

    blobs: int
    blob_size: int
    large_size: int
    warm_reads: int
    orphans: int
    cached_files: int
    repeats: int
    large_repeats: int


FULL = Scale(
    blobs=64,
    blob_size=256 * KiB,
    large_size=64 * MiB,
    warm_reads=2000,
    orphans=10_000,
    cached_files=100_000,
    repeats=5,
    large_repeats=7,
)
QUICK = Scale(
    blobs=8,
    blob_size=16 * KiB,
    large_size=1 * MiB,
    warm_reads=50,
    orphans=1_100,
    cached_files=2_000,
    repeats=1,
    large_repeats=1,
)


@dataclass(frozen=True)
class Row:
    """One line of the result table: two timings, the value the target bounds
    (a ratio, or a request count when *unit* is given) and a note."""

    path: str
    storage: float | None
    baseline: float | None
    value: float
    limit: float
    unit: str = ""
    note: str = ""

    @property
    def ok(self) -> bool:
        """Whether the target is met."""
        return self.value <= self.limit


class BenchError(Exception):
    """A step went wrong (not merely slow): the run exits 1."""


def plain_client(endpoint_url: str):
    """A boto3 S3 client as an application without this storage would make it."""
    return boto3.session.Session().client(
        "s3",
        endpoint_url=endpoint_url,
        region_name=REGION,
        aws_access_key_id=ACCESS_KEY,
        aws_secret_access_key=SECRET_KEY,
        config=Config(max_pool_connections=64, s3={"addressing_style": "path"}),
    )


def measure(action: Callable[[], T]) -> tuple[float, T]:
    """Seconds *action* took, by the performance counter, and its result."""
    started = time.perf_counter()
    result = action()
    return time.perf_counter() - started, result


def timed(action: Callable[[], object]) -> float:
    """Seconds *action* took, by the performance counter."""
    return measure(action)[0]


@contextlib.contextmanager
def sent_requests(store) -> Iterator[list[str]]:
    """Record the operation name of every request the storage's ObjectStore
    sends in the block (through any of its clients)."""
    sent: list[str] = []

    def record(event_name: str, **_kw) -> None:
        sent.append(event_name.rsplit(".", 1)[-1])

    for client in store.clients:
        client.meta.events.register("before-send.s3", record)
    try:
        yield sent
    finally:
        for client in store.clients:
            client.meta.events.unregister("before-send.s3", record)


def human(size: float) -> str:
    """A byte count in B, KiB or MiB."""
    if size < KiB:
        return f"{size:.0f} B"
    if size < MiB:
        return f"{size / KiB:.1f} KiB"
    return f"{size / MiB:.1f} MiB"


class Bench:
    """One run's delay line, clients, data and working directory."""

    def __init__(
        self, server: LocalS3, line: DelayLine, workdir: str, scale: Scale
    ) -> None:
        self.line = line
        self.workdir = workdir
        self.scale = scale
        self.local = LocalS3(line.endpoint_url)
        self.client = plain_client(line.endpoint_url)
        # Bulk setup goes straight to the server: it is not measured.
        self.setup_client = plain_client(server.endpoint_url)
        self.pool = ThreadPoolExecutor(PUT_WORKERS, thread_name_prefix="bench-put")
        self.small = os.urandom(scale.blob_size)
        self.large = os.urandom(scale.large_size)
        self._caches = 0
        self.client.create_bucket(Bucket=BUCKET)

    def close(self) -> None:
        """Stop the worker threads and close the clients."""
        self.pool.shutdown()
        self.client.close()
        self.setup_client.close()

    def new_cache_dir(self) -> str:
        """A path for an empty cache directory no database used before."""
        self._caches += 1
        return os.path.join(self.workdir, f"cache-{self._caches}")

    @contextlib.contextmanager
    def database(self, name: str = "main") -> Iterator[ZODB.DB]:
        """Open database *name* (its own Data.fs and S3 prefix) with a new,
        empty cache, through ZConfig text as a zope.conf would."""
        data_fs = os.path.join(self.workdir, f"{name}.fs")
        text = self.local.zconfig(
            BUCKET,
            self.new_cache_dir(),
            f"<filestorage>\n  path {data_fs}\n</filestorage>",
            prefix=name,
        )
        db = ZODB.DB(ZODB.config.storageFromString(text))
        try:
            yield db
        finally:
            db.close()

    def put(self, key: str, data: bytes) -> None:
        """PUT *data* under *key* with the plain client."""
        self.client.put_object(Bucket=BUCKET, Key=key, Body=data)

    def put_parallel(self, keys: list[str], data: bytes) -> None:
        """PUT *data* under every key, PUT_WORKERS requests at a time."""
        list(self.pool.map(self.put, keys, [data] * len(keys)))

    def get(self, key: str) -> bytes:
        """GET the object at *key* with the plain client and read it all."""
        return self.client.get_object(Bucket=BUCKET, Key=key)["Body"].read()

    def get_each(self, keys: list[str]) -> list[bytes]:
        """GET every key, one after another."""
        return [self.get(key) for key in keys]


def commit(db: ZODB.DB, name: str, value: object) -> float:
    """Seconds to store *value* as root[*name*] and commit it."""
    tm = transaction.TransactionManager()
    conn = db.open(tm)
    try:
        root = conn.root()
        started = time.perf_counter()
        root[name] = value
        tm.commit()
        return time.perf_counter() - started
    finally:
        conn.close()


def read_all(blobs: list[Blob]) -> list[bytes]:
    """The bytes of each blob, opened one after another."""
    data = []
    for blob in blobs:
        with blob.open("r") as file:
            data.append(file.read())
    return data


def cold_read(db: ZODB.DB, name: str) -> tuple[float, list[bytes]]:
    """Seconds to read root[*name*] (a blob or a mapping of blobs) after
    emptying the cache, and the bytes read.

    The database stays open across repetitions, as in a running Zope: a cache
    miss there reuses the storage's warm connections, as plain boto3 does here.
    The cache is emptied with no minimum age: the blobs were read moments ago,
    and eviction otherwise keeps files used within a minute.
    """
    cache = db.storage._cache
    cache.min_age, min_age = 0, cache.min_age
    try:
        cache.evict(target=0)
    finally:
        cache.min_age = min_age
    if any(True for _ in cache.files()):
        raise BenchError("the cache was not emptied before a cold read")
    conn = db.open()
    try:
        value = conn.root()[name]
        blobs = (
            list(value.values()) if isinstance(value, PersistentMapping) else [value]
        )
        return measure(partial(read_all, blobs))
    finally:
        conn.close()


def check(read: list[bytes], expected: bytes, what: str) -> None:
    """Fail the run if a read did not return what was written."""
    if any(data != expected for data in read):
        raise BenchError(f"{what}: read back different bytes than were written")


def ratio_row(
    path: str, storage: list[float], plain: list[float], limit: float, note: str
) -> Row:
    """A row comparing the best storage time with the best boto3 time."""
    best, baseline = min(storage), min(plain)
    return Row(path, best, baseline, best / baseline, limit, note=note)


# -- the steps, in table order ------------------------------------------------


def commit_small(bench: Bench) -> Row:
    """Commit many small blobs in one transaction vs the same PUTs from
    PUT_WORKERS threads, as the storage's vote uploads them in parallel."""
    scale = bench.scale
    storage, plain = [], []
    with bench.database() as db:
        for attempt in range(scale.repeats):
            blobs = {str(n): Blob(bench.small) for n in range(scale.blobs)}
            storage.append(commit(db, f"small-{attempt}", PersistentMapping(blobs)))
            keys = [f"plain/small-{attempt}/{n}" for n in range(scale.blobs)]
            plain.append(timed(partial(bench.put_parallel, keys, bench.small)))
    note = f"{scale.blobs} x {human(scale.blob_size)}; boto3: {PUT_WORKERS} threads"
    return ratio_row(COMMIT_SMALL, storage, plain, 1.3, note)


def cold_read_small(bench: Bench) -> Row:
    """Read every small blob through an empty cache vs GETs one after another."""
    scale = bench.scale
    keys = [f"plain/small-0/{n}" for n in range(scale.blobs)]
    storage, plain = [], []
    with bench.database() as db:
        for _attempt in range(scale.repeats):
            seconds, read = cold_read(db, "small-0")
            check(read, bench.small, COLD_SMALL)
            storage.append(seconds)
            seconds, read = measure(partial(bench.get_each, keys))
            check(read, bench.small, "GET")
            plain.append(seconds)
    note = f"{scale.blobs} x {human(scale.blob_size)}, one after another"
    return ratio_row(COLD_SMALL, storage, plain, 1.1, note)


def commit_large(bench: Bench) -> Row:
    """Commit one large blob vs one plain PUT of its bytes."""
    scale = bench.scale
    storage, plain = [], []
    with bench.database() as db:
        for attempt in range(scale.large_repeats):
            storage.append(commit(db, f"large-{attempt}", Blob(bench.large)))
            plain.append(
                timed(partial(bench.put, f"plain/large-{attempt}", bench.large))
            )
    return ratio_row(COMMIT_LARGE, storage, plain, 1.2, human(scale.large_size))


def cold_read_large(bench: Bench) -> Row:
    """Read the large blob through an empty cache vs one plain GET."""
    scale = bench.scale
    storage, plain = [], []
    with bench.database() as db:
        for _attempt in range(scale.large_repeats):
            seconds, read = cold_read(db, "large-0")
            check(read, bench.large, COLD_LARGE)
            storage.append(seconds)
            seconds, data = measure(partial(bench.get, "plain/large-0"))
            check([data], bench.large, "GET")
            plain.append(seconds)
    return ratio_row(COLD_LARGE, storage, plain, 1.2, human(scale.large_size))


def unghost(bench: Bench) -> Row:
    """Load (not open) Blob objects through an empty cache: listing a folder
    of files should download none of them."""
    with bench.database() as db:
        conn = db.open()
        try:
            blobs = list(conn.root()["small-0"].values())
            before = bench.line.counters().server_to_client
            with sent_requests(db.storage._store) as sent:
                seconds = timed(lambda: [blob._p_activate() for blob in blobs])
            downloaded = bench.line.counters().server_to_client - before
        finally:
            conn.close()
    note = f"{len(blobs)} Blob objects; {human(downloaded)} downloaded"
    return Row(UNGHOST, seconds, None, len(sent), 0, " requests", note)


def read_repeatedly(blob: Blob, reads: int) -> None:
    """Open and read *blob* *reads* times, keeping none of the bytes."""
    for _ in range(reads):
        with blob.open("r") as file:
            file.read()


def per_read(blob: Blob, reads: int, repeats: int) -> float:
    """The best, over *repeats* rounds, of the mean seconds of one open and read."""
    rounds = [timed(partial(read_repeatedly, blob, reads)) for _ in range(repeats)]
    return min(rounds) / reads


def warm_read(bench: Bench) -> Row:
    """Read a cached blob many times vs the same blob in a FileStorage
    blob-dir: the cost of a cache hit over opening a local file."""
    scale = bench.scale
    base = FileStorage(
        os.path.join(bench.workdir, "blobdir.fs"),
        blob_dir=os.path.join(bench.workdir, "blobdir"),
    )
    local_db = ZODB.DB(base)
    try:
        commit(local_db, "blob", Blob(bench.small))
        conn = local_db.open()
        baseline = per_read(conn.root()["blob"], scale.warm_reads, scale.repeats)
        conn.close()
    finally:
        local_db.close()
    with bench.database() as db:
        conn = db.open()
        try:
            blob = conn.root()["small-0"]["0"]
            check(read_all([blob]), bench.small, WARM_READ)  # now it is cached
            seconds = per_read(blob, scale.warm_reads, scale.repeats)
        finally:
            conn.close()
    note = (
        f"per read of {human(scale.blob_size)}, best of {scale.warm_reads} x "
        f"{scale.repeats}; boto3 column: FileStorage blob-dir"
    )
    return Row(WARM_READ, seconds, baseline, seconds / baseline, 1.5, note=note)


def collect_orphans(bench: Bench) -> Row:
    """Delete many orphaned objects: DeleteObjects should carry up to 1000
    keys each, so the request count follows the orphans / 1000."""
    scale = bench.scale
    with bench.database("gc") as db:
        commit(db, "blob", Blob(b"live"))  # the base's last tid is now > 5
        storage = db.storage
        keys = [
            storage._layout.key(p64(ORPHAN_OIDS + n), ORPHAN_TID)
            for n in range(scale.orphans)
        ]
        with ThreadPoolExecutor(SETUP_WORKERS) as pool:
            list(pool.map(upload_orphan, [bench.setup_client] * len(keys), keys))
        with sent_requests(storage._store) as sent:
            seconds, report = measure(storage.collect_orphans)
    if report.deleted != scale.orphans:
        raise BenchError(
            f"{ORPHANS}: deleted {report.deleted} of {scale.orphans} orphans"
        )
    deletes = sent.count("DeleteObjects")
    note = f"{scale.orphans} orphans; {len(sent)} requests in all"
    limit = math.ceil(scale.orphans / DELETE_BATCH)
    return Row(ORPHANS, seconds, None, deletes, limit, " DeleteObjects", note)


def upload_orphan(client, key: str) -> None:
    """PUT a few bytes under *key*, bypassing the delay line (setup only)."""
    client.put_object(Bucket=BUCKET, Key=key, Body=b"orphan")


def fill_cache(directory: str, count: int) -> int:
    """Write *count* tiny read-only files where a BlobCache on *directory*
    keeps them, one oid each, last used an hour ago (eviction leaves files
    used within a minute); return their total size."""
    layout = BlobCache(directory, 1 << 30)
    used = time.time() - 3600
    made: set[str] = set()
    for oid in range(1, count + 1):
        path = layout.path(p64(oid), TINY_TID)
        oid_dir = os.path.dirname(path)
        bucket = os.path.dirname(oid_dir)
        if bucket not in made:
            os.makedirs(bucket, 0o700, exist_ok=True)
            made.add(bucket)
        os.mkdir(oid_dir, 0o700)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o400)
        try:
            os.write(fd, TINY)
        finally:
            os.close(fd)
        os.utime(path, (used, used))
    return count * len(TINY)


def walk_and_stat(directory: str) -> int:
    """Stat every file under *directory*, as a cache without an index must
    to find what to evict; return how many there are."""
    files = 0
    for parent, _dirs, names in os.walk(directory):
        for name in names:
            os.stat(os.path.join(parent, name))
            files += 1
    return files


def eviction_check(bench: Bench) -> Row:
    """Time an eviction check that removes a few of many cached files, against
    a walk that stats them all: the check should cost what it evicts.

    The cache's limit is the total, so the check the cache starts when it
    opens only builds its index (untimed; its time is in the note). The timed
    check then evicts down to an explicit target, not the default 90% of the
    limit, so that only EVICTED files go.
    """
    scale = bench.scale
    parent = RAM_DIR if os.access(RAM_DIR, os.W_OK) else bench.workdir
    directory = tempfile.mkdtemp(prefix="zodb-s3blobs-bench-", dir=parent)
    try:
        total = fill_cache(directory, scale.cached_files)
        walk = min(
            timed(lambda: walk_and_stat(directory)) for _ in range(scale.repeats)
        )
        cache = BlobCache(directory, total)
        first = timed(cache.close)  # waits for the index the open started
        target = total - EVICTED * len(TINY)
        seconds, freed = measure(partial(cache.evict, target))
        cache.close()
    finally:
        shutil.rmtree(directory)
    if freed != EVICTED * len(TINY):
        raise BenchError(f"{EVICTION}: freed {freed} bytes, not {EVICTED} files")
    note = (
        f"{EVICTED} of {scale.cached_files} files in {parent}; index built at "
        f"open in {first:.3f}s; boto3 column: os.walk + stat"
    )
    return Row(EVICTION, seconds, walk, seconds / walk, 0.1, note=note)


def stage_and_install(directory: str, data: bytes, count: int) -> float:
    """Seconds to take and install *count* files of *data* into a new cache
    in *directory*, as tpc_vote and tpc_finish do for a transaction's blobs."""
    cache = BlobCache(directory, 1 << 40)
    cache.close()  # the index the open builds is not what is measured
    names = []
    for n in range(count):
        name = os.path.join(directory, f"savepoint-{n}")
        with open(name, "wb") as f:
            f.write(data)
        names.append(name)
    started = time.perf_counter()
    for n, name in enumerate(names):
        cache.install(p64(n + 1), TINY_TID, cache.take(name))
    seconds = time.perf_counter() - started
    cache.close()
    return seconds


@contextlib.contextmanager
def without_fsync() -> Iterator[None]:
    """Make os.fsync a no-op: what the cache cost before it flushed files."""
    real = os.fsync
    os.fsync = lambda fd: None
    try:
        yield
    finally:
        os.fsync = real


def install_fsync(bench: Bench) -> Row:
    """Time staging and installing small blobs with the fsync that makes a
    cached file complete after a power loss, against the same without it:
    the added milliseconds per blob, paid before the vote's uploads.

    Runs in the working directory (a disk, not RAM, where fsync is free).
    """
    scale = bench.scale
    count = scale.blobs * 4

    def best(synced: bool) -> float:
        times = []
        for _ in range(scale.repeats):
            directory = tempfile.mkdtemp(prefix="install-", dir=bench.workdir)
            try:
                if synced:
                    times.append(stage_and_install(directory, bench.small, count))
                else:
                    with without_fsync():
                        times.append(stage_and_install(directory, bench.small, count))
            finally:
                shutil.rmtree(directory)
        return min(times)

    synced, unsynced = best(True), best(False)
    added_ms = (synced - unsynced) / count * 1000
    note = (
        f"{count} blobs of {human(scale.blob_size)}: {count / synced:.0f} installs/s "
        f"with fsync, {count / unsynced:.0f}/s without; boto3 column: no fsync"
    )
    return Row(INSTALL_FSYNC, synced, unsynced, added_ms, 10, " ms/blob", note)


STEPS: tuple[Callable[[Bench], Row], ...] = (
    commit_small,
    cold_read_small,
    commit_large,
    cold_read_large,
    unghost,
    warm_read,
    collect_orphans,
    eviction_check,
    install_fsync,
)


# -- running and reporting ---------------------------------------------------


def run(scale: Scale, delay: float) -> list[Row]:
    """Start the server and the delay line, run every step, clean up."""
    rows = []
    with (
        ranges_cost_their_size(),
        local_s3_server() as server,
        DelayLine(target=host_and_port(server.endpoint_url), delay=delay) as line,
        tempfile.TemporaryDirectory(prefix="zodb-s3blobs-bench-") as workdir,
    ):
        bench = Bench(server, line, workdir, scale)
        try:
            for step in STEPS:
                seconds, row = measure(partial(step, bench))
                print(f"{step.__name__}: {seconds:.1f}s", file=sys.stderr, flush=True)
                rows.append(row)
        finally:
            bench.close()
    return rows


def host_and_port(url: str) -> tuple[str, int]:
    """The host and port of an http:// URL."""
    parts = urlsplit(url)
    if parts.hostname is None or parts.port is None:
        raise BenchError(f"no host and port in {url!r}")
    return parts.hostname, parts.port


def seconds_cell(value: float | None) -> str:
    """A timing for the table, or a dash where a row has none."""
    return "-" if value is None else f"{value:.6f}"


def value_cell(row: Row) -> str:
    """The value the target bounds: a ratio, or a count with its unit."""
    return f"{row.value:.0f}{row.unit}" if row.unit else f"{row.value:.2f}"


def print_table(rows: list[Row], scale: Scale, delay: float) -> None:
    """Print the rows under a header naming the delay and the repeats."""
    print(
        f"S3BlobStorage vs plain boto3 through a delay line of {delay * 1000:g} ms "
        f"each way to moto on 127.0.0.1 (ranged GETs served at the cost of the "
        f"range, as by S3: see bench/s3fidelity.py); best of {scale.repeats} "
        f"({scale.large_repeats} for the large blob)"
    )
    header = ("path", "storage s", "boto3 s", "ratio", "target", "ok/MISS", "notes")
    cells = [
        (
            row.path,
            seconds_cell(row.storage),
            seconds_cell(row.baseline),
            value_cell(row),
            f"<= {row.limit:g}{row.unit}",
            "ok" if row.ok else "MISS",
            row.note,
        )
        for row in rows
    ]
    widths = [max(len(line[i]) for line in [header, *cells]) for i in range(6)]
    for *padded, note in [header, *cells]:
        print(
            "  ".join(c.ljust(w) for c, w in zip(padded, widths, strict=True)),
            note,
            sep="  ",
        )
    met = sum(row.ok for row in rows)
    print(f"{met} of {len(rows)} targets met")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line's options: --quick and --delay."""
    parser = argparse.ArgumentParser(
        description="Benchmark S3BlobStorage against plain boto3 through a "
        "delay line to a local S3 server."
    )
    parser.add_argument(
        "--quick", action="store_true", help="small sizes and counts (a smoke run)"
    )
    parser.add_argument(
        "--delay",
        type=float,
        default=DEFAULT_DELAY,
        metavar="SECONDS",
        help=f"one-way delay of the line (default {DEFAULT_DELAY})",
    )
    args = parser.parse_args(argv)
    if args.delay < 0:
        parser.error("--delay must not be negative")
    return args


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; 0 when it ran (targets met or not), 1 on an error."""
    args = parse_args(argv)
    scale = QUICK if args.quick else FULL
    # The server's HTTP layer logs every request at INFO.
    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    try:
        rows = run(scale, args.delay)
    except Exception:
        traceback.print_exc()
        print("bench: failed", file=sys.stderr)
        return 1
    print_table(rows, scale, args.delay)
    return 0


if __name__ == "__main__":
    sys.exit(main())
