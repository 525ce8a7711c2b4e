"""Benchmark S3BlobStorage against plain boto3, both through the same delay line.

``python bench/bench.py`` starts moto's S3 server in this process, puts a
:class:`delayline.DelayLine` (5 ms each way by default) in front of it, and
times the storage's common paths next to what plain boto3 needs for the same
bytes, so that the storage's overhead shows as a ratio with a target. A missed
target prints MISS and still exits 0 (this is a measurement); an error exits 1.
``--quick`` shrinks every size and count for a smoke run.

The commits are also measured through a second delay line that caps the
bandwidth as a WAN link does (``--bandwidth``, 100 Mbit/s by default), and on
RelStorage with PostgreSQL (started as the tests start it, see
``tests/pgserver.py``) the bench measures what one large blob's commit costs
the other processes of a site: the longest commit a second OS process
(``committer.py``) makes meanwhile, as a ratio to the blob commit's duration;
and, for smaller blobs, that longest commit with ``s3-staged-copy-threshold``
staging every blob and staging none, to help choose its default. Last, the
commits are made from ZEO clients (``runzeo`` processes on 127.0.0.1): one
wrapping its own storage against boto3 and against a plain client whose
server wraps its storage.

Everything listens on 127.0.0.1 only and the working directory is temporary.
moto is made to serve ranged GETs at the cost of the range, as S3 does
(``s3fidelity.py``); otherwise eight ranges of one object cost eight copies of
all of it.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import logging
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Collection, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TypeVar
from urllib.parse import urlsplit

import boto3
import transaction
import ZEO
import ZODB
import ZODB.config
from boto3.s3.transfer import TransferConfig
from botocore.config import Config
from committer import TICKS, Committer
from delayline import DEFAULT_DELAY, DelayLine, megabits
from persistent.mapping import PersistentMapping
from s3fidelity import ranges_cost_their_size
from ZODB.blob import Blob
from ZODB.FileStorage import FileStorage
from ZODB.utils import p64

from zodb_s3blobs.cache import BlobCache, revision_path
from zodb_s3blobs.cli.localserver import (
    ACCESS_KEY,
    REGION,
    SECRET_KEY,
    LocalS3,
    local_s3_server,
)
from zodb_s3blobs.objectstore import DELETE_BATCH
from zodb_s3blobs.settings import S3Settings

T = TypeVar("T")
KiB = 1 << 10
MiB = 1 << 20
BUCKET = "zodb-s3blobs-bench"
#: The storage's defaults: plain boto3 uploads with the same concurrency
#: and the same transfer settings (one PUT below the multipart threshold).
DEFAULTS = S3Settings(bucket=BUCKET)
PUT_WORKERS = DEFAULTS.max_concurrency
MANAGED_UPLOAD = TransferConfig(
    max_concurrency=DEFAULTS.max_concurrency,
    multipart_threshold=DEFAULTS.multipart_threshold,
    multipart_chunksize=DEFAULTS.part_size,
    preferred_transfer_client="classic",
)
#: The capped line's bandwidth unless --bandwidth says otherwise: a WAN link.
DEFAULT_MEGABITS = 100.0
#: The tests' helpers: the PostgreSQL server and the RelStorage section.
TESTS = Path(__file__).resolve().parents[1] / "tests"
#: How long the second process sleeps between its commits: often enough to
#: be caught by a lock held for a few tens of milliseconds.
PROBE_INTERVAL = 0.02
#: s3-staged-copy-threshold values, as in a zope.conf, that put every blob
#: (of the sizes measured) under the commit lock, or stage every blob before it.
STAGE_NOTHING = "1024GB"
STAGE_EVERYTHING = "1"
#: The RelStorage database's name: its S3 prefix.
RELSTORAGE = "relstorage"
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
LOCK_RATIO = "lock ratio, RelStorage"
COMMIT_LOCK = "commit lock"
ZEO_CLIENT = "ZEO client"


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
    #: Repeats of the commits through the capped line and of the lock ratio,
    #: fewer than uncapped: 64 MiB takes 5.4 s at 100 Mbit/s.
    wan_repeats: int
    #: The blob sizes of the s3-staged-copy-threshold rows.
    lock_sizes: tuple[int, ...]


FULL = Scale(
    blobs=64,
    blob_size=256 * KiB,
    large_size=64 * MiB,
    warm_reads=2000,
    orphans=10_000,
    cached_files=100_000,
    repeats=5,
    large_repeats=7,
    wan_repeats=3,
    lock_sizes=(256 * KiB, 1 * MiB, 4 * MiB),
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
    wan_repeats=1,
    lock_sizes=(64 * KiB,),
)


@dataclass(frozen=True)
class Row:
    """One line of the result table: two timings, the value the target bounds
    (a ratio, or a request count when *unit* is given) and a note. A row
    without a *limit* informs and has no target."""

    path: str
    storage: float | None
    baseline: float | None
    value: float
    limit: float | None
    unit: str = ""
    note: str = ""

    @property
    def ok(self) -> bool:
        """Whether the target is met (a row without one always is)."""
        return self.limit is None or self.value <= self.limit


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


class Link:
    """A delay line to the S3 server, a plain boto3 client through it, and
    what the table adds to the name of a row measured through it."""

    def __init__(
        self, name: str, line: DelayLine, label: str, pool: ThreadPoolExecutor
    ) -> None:
        #: The database's name (its Data.fs and S3 prefix) on this line.
        self.name = name
        self.line = line
        self.label = label
        self.local = LocalS3(line.endpoint_url)
        self.client = plain_client(line.endpoint_url)
        self._pool = pool

    def close(self) -> None:
        """Close the client."""
        self.client.close()

    def plain_key(self, name: str) -> str:
        """The key plain boto3 writes *name* to on this line."""
        return f"plain/{self.name}/{name}"

    def put(self, key: str, data: bytes) -> None:
        """PUT *data* under *key* with the plain client."""
        self.client.put_object(Bucket=BUCKET, Key=key, Body=data)

    def put_parallel(self, keys: list[str], data: bytes) -> None:
        """PUT *data* under every key, PUT_WORKERS requests at a time."""
        list(self._pool.map(self.put, keys, [data] * len(keys)))

    def upload_file(self, path: str, key: str) -> None:
        """Upload the file at *path* with boto3's managed upload, configured
        as the storage configures its own."""
        self.client.upload_file(path, BUCKET, key, Config=MANAGED_UPLOAD)

    def get(self, key: str) -> bytes:
        """GET the object at *key* with the plain client and read it all."""
        return self.client.get_object(Bucket=BUCKET, Key=key)["Body"].read()

    def get_each(self, keys: list[str]) -> list[bytes]:
        """GET every key, one after another."""
        return [self.get(key) for key in keys]


@dataclass(frozen=True)
class Site:
    """A RelStorage database on PostgreSQL (its ``<relstorage>`` section),
    and a second process committing to it in a loop."""

    base: str
    committer: Committer


class Bench:
    """One run's delay lines, clients, data and working directory."""

    def __init__(
        self,
        server: LocalS3,
        lines: tuple[DelayLine, DelayLine],
        workdir: str,
        scale: Scale,
    ) -> None:
        self.workdir = workdir
        self.scale = scale
        self.pool = ThreadPoolExecutor(PUT_WORKERS, thread_name_prefix="bench-put")
        plain, capped = lines
        assert capped.bandwidth is not None
        self.link = Link("main", plain, "", self.pool)
        self.wan = Link(
            "wan", capped, f", {capped.bandwidth * 8e-6:g} Mbit/s", self.pool
        )
        # Bulk setup goes straight to the server: it is not measured.
        self.setup_client = plain_client(server.endpoint_url)
        self.small = os.urandom(scale.blob_size)
        self.large = os.urandom(scale.large_size)
        self.large_file = os.path.join(workdir, "large.bin")
        with open(self.large_file, "wb") as f:
            f.write(self.large)
        self._caches = 0
        self._site: Site | None = None
        self._stack = contextlib.ExitStack()
        self.link.client.create_bucket(Bucket=BUCKET)

    def close(self) -> None:
        """Stop the second process and PostgreSQL if they were started, the
        worker threads, and close the clients."""
        self._stack.close()
        self.pool.shutdown()
        self.link.close()
        self.wan.close()
        self.setup_client.close()

    def new_cache_dir(self) -> str:
        """A path for an empty cache directory no database used before."""
        self._caches += 1
        return os.path.join(self.workdir, f"cache-{self._caches}")

    def zconfig(self, name: str, link: Link, base: str | None, extra: str) -> str:
        """ZConfig text, as in a zope.conf, for database *name* through
        *link*: S3 prefix *name*, a new empty cache, and the *base* section
        (by default a FileStorage of its own)."""
        if base is None:
            data_fs = os.path.join(self.workdir, f"{name}.fs")
            base = f"<filestorage>\n  path {data_fs}\n</filestorage>"
        return link.local.zconfig(
            BUCKET, self.new_cache_dir(), base, prefix=name, extra=extra
        )

    @contextlib.contextmanager
    def database(
        self,
        name: str = "main",
        link: Link | None = None,
        base: str | None = None,
        extra: str = "",
    ) -> Iterator[ZODB.DB]:
        """Open database *name* through *link* (the uncapped line by
        default); see :meth:`zconfig`."""
        text = self.zconfig(name, link or self.link, base, extra)
        db = ZODB.DB(ZODB.config.storageFromString(text))
        try:
            yield db
        finally:
            db.close()

    def site(self) -> Site:
        """The RelStorage site, started at the first call: PostgreSQL, a
        database holding the root's TICKS object, and the second process."""
        if self._site is None:
            self._site = self._start_site()
        return self._site

    def _start_site(self) -> Site:
        pgserver, deploy = test_helper("pgserver"), test_helper("deploy")
        try:
            bindir = pgserver.find_bindir()
        except pgserver.PostgreSQLMissing as exc:
            raise BenchError(f"the RelStorage rows need PostgreSQL: {exc}") from None
        server = self._stack.enter_context(pgserver.postgresql_server(bindir))
        adapter = f"<postgresql>\n    dsn {server.create_database()}\n  </postgresql>"
        base = deploy.relstorage_section(adapter, keep_history=True)
        # The first open creates the schema, before the second process opens.
        with self.database(RELSTORAGE, base=base) as db:
            commit(db, TICKS, PersistentMapping())
        text = self.zconfig(RELSTORAGE, self.link, base, "")
        directory = Path(self.workdir, "committer")
        committer = Committer(text, directory, PROBE_INTERVAL)
        self._stack.callback(committer.close)
        return Site(base, committer)


def test_helper(name: str):
    """The module ``tests/{name}.py`` (pgserver, deploy, ports), imported as
    the tests import it (their folder on sys.path): the bench starts
    PostgreSQL and ZEO servers and writes ``<relstorage>`` as the tests do."""
    if str(TESTS) not in sys.path:
        sys.path.append(str(TESTS))
    return importlib.import_module(name)


@contextlib.contextmanager
def zeo_server(workdir: str, name: str, storage_section: str) -> Iterator[int]:
    """``runzeo`` serving *storage_section*, in a process of its own on a
    free port of 127.0.0.1 (its config and log in *workdir*); the port."""
    ports, deploy = test_helper("ports"), test_helper("deploy")
    port = ports.free_port()
    config = os.path.join(workdir, f"{name}-zeo.conf")
    with open(config, "w") as f:
        f.write(f"<zeo>\n  address {ports.HOST}:{port}\n</zeo>\n{storage_section}")
    with open(os.path.join(workdir, f"{name}-zeo.log"), "w") as log:
        server = subprocess.Popen(
            [deploy.console_script("runzeo"), "-C", config],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        ports.wait_for_port(port, server)
        yield port
    finally:
        server.terminate()
        server.wait(timeout=30)


def commit_window(db: ZODB.DB, name: str, value: object) -> tuple[float, float]:
    """When storing *value* as root[*name*] and committing it began and
    ended, in ``time.monotonic()`` seconds: the second process's clock."""
    tm = transaction.TransactionManager()
    conn = db.open(tm)
    try:
        root = conn.root()
        started = time.monotonic()
        root[name] = value
        tm.commit()
        return started, time.monotonic()
    finally:
        conn.close()


def commit(db: ZODB.DB, name: str, value: object) -> float:
    """Seconds to store *value* as root[*name*] and commit it."""
    started, ended = commit_window(db, name, value)
    return ended - started


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
    path: str,
    storage: list[float],
    plain: list[float],
    limit: float | None,
    note: str,
) -> Row:
    """A row comparing the best storage time with the best baseline time
    (boto3's, unless the note says otherwise); the note adds the ratio of
    the medians, which a lucky round does not move."""
    best, baseline = min(storage), min(plain)
    median = statistics.median(storage) / statistics.median(plain)
    note = f"{note}; medians {median:.2f}"
    return Row(path, best, baseline, best / baseline, limit, note=note)


# -- the steps, in table order ------------------------------------------------


def link_and_repeats(bench: Bench, wan: bool, repeats: int) -> tuple[Link, int]:
    """The capped line and its repeats if *wan*, else the uncapped line and
    *repeats*."""
    return (bench.wan, bench.scale.wan_repeats) if wan else (bench.link, repeats)


def commit_small(bench: Bench, wan: bool = False) -> Row:
    """Commit many small blobs in one transaction vs the same PUTs from
    PUT_WORKERS threads, as the storage's vote uploads them in parallel."""
    scale = bench.scale
    link, repeats = link_and_repeats(bench, wan, scale.repeats)
    storage, plain = [], []
    with bench.database(link.name, link) as db:
        for attempt in range(repeats):
            blobs = {str(n): Blob(bench.small) for n in range(scale.blobs)}
            storage.append(commit(db, f"small-{attempt}", PersistentMapping(blobs)))
            keys = [link.plain_key(f"small-{attempt}/{n}") for n in range(scale.blobs)]
            plain.append(timed(partial(link.put_parallel, keys, bench.small)))
    note = f"{scale.blobs} x {human(scale.blob_size)}; boto3: {PUT_WORKERS} threads"
    return ratio_row(COMMIT_SMALL + link.label, storage, plain, 1.1, note)


def cold_read_small(bench: Bench, wan: bool = False) -> Row:
    """Read every small blob that :func:`commit_small` committed through the
    same line, through an empty cache, vs GETs one after another."""
    scale = bench.scale
    link, repeats = link_and_repeats(bench, wan, scale.repeats)
    keys = [link.plain_key(f"small-0/{n}") for n in range(scale.blobs)]
    storage, plain = [], []
    with bench.database(link.name, link) as db:
        for _attempt in range(repeats):
            seconds, read = cold_read(db, "small-0")
            check(read, bench.small, COLD_SMALL)
            storage.append(seconds)
            seconds, read = measure(partial(link.get_each, keys))
            check(read, bench.small, "GET")
            plain.append(seconds)
    note = f"{scale.blobs} x {human(scale.blob_size)}, one after another"
    return ratio_row(COLD_SMALL + link.label, storage, plain, 1.1, note)


def commit_large(bench: Bench, wan: bool = False) -> Row:
    """Commit one large blob vs boto3's managed upload of the same file,
    with the storage's transfer settings (one PUT below its multipart
    threshold, parts of its part size above)."""
    scale = bench.scale
    link, repeats = link_and_repeats(bench, wan, scale.large_repeats)
    storage, plain = [], []
    with bench.database(link.name, link) as db:
        for attempt in range(repeats):
            storage.append(commit(db, f"large-{attempt}", Blob(bench.large)))
            key = link.plain_key(f"large-{attempt}")
            plain.append(timed(partial(link.upload_file, bench.large_file, key)))
    note = f"{human(scale.large_size)}; boto3: upload_file"
    return ratio_row(COMMIT_LARGE + link.label, storage, plain, 1.1, note)


def cold_read_large(bench: Bench, wan: bool = False) -> Row:
    """Read the large blob that :func:`commit_large` committed through the
    same line, through an empty cache, vs one plain GET."""
    scale = bench.scale
    link, repeats = link_and_repeats(bench, wan, scale.large_repeats)
    storage, plain = [], []
    with bench.database(link.name, link) as db:
        for _attempt in range(repeats):
            seconds, read = cold_read(db, "large-0")
            check(read, bench.large, COLD_LARGE)
            storage.append(seconds)
            key = link.plain_key("large-0")
            seconds, data = measure(partial(link.get, key))
            check([data], bench.large, "GET")
            plain.append(seconds)
    note = human(scale.large_size)
    return ratio_row(COLD_LARGE + link.label, storage, plain, 1.1, note)


def unghost(bench: Bench) -> Row:
    """Load (not open) Blob objects through an empty cache: listing a folder
    of files should download none of them."""
    with bench.database() as db:
        conn = db.open()
        try:
            blobs = list(conn.root()["small-0"].values())
            line = bench.link.line
            before = line.counters().server_to_client
            with sent_requests(db.storage._store) as sent:
                seconds = timed(lambda: [blob._p_activate() for blob in blobs])
            downloaded = line.counters().server_to_client - before
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
            # Retention 0: this step measures the deletes (bench/retention.py
            # measures what gc-retention adds).
            seconds, report = measure(partial(storage.collect_orphans, retention=0))
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
    used within a minute), as an earlier version's cache with its ledger
    and no index (which a cache adopts, indexing its files at open); return
    their total size."""
    locks = os.path.join(directory, "locks")
    os.makedirs(locks, 0o700, exist_ok=True)
    with open(os.path.join(locks, "total"), "w") as ledger:
        ledger.write(f"{count * len(TINY)}\n")
    used = time.time() - 3600
    made: set[str] = set()
    for oid in range(1, count + 1):
        path = revision_path(directory, p64(oid), TINY_TID)
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
        try:
            # Waits for the check the open started: it indexes the files.
            first = timed(partial(cache.evict, total))
            target = total - EVICTED * len(TINY)
            seconds, freed = measure(partial(cache.evict, target))
        finally:
            cache.close()
    finally:
        shutil.rmtree(directory)
    if freed != EVICTED * len(TINY):
        raise BenchError(f"{EVICTION}: freed {freed} bytes, not {EVICTED} files")
    note = (
        f"{EVICTED} of {scale.cached_files} files in {parent}; files of an "
        f"unindexed cache indexed at open in {first:.3f}s; boto3 column: "
        "os.walk + stat"
    )
    return Row(EVICTION, seconds, walk, seconds / walk, 0.1, note=note)


def stage_and_install(directory: str, data: bytes, count: int) -> float:
    """Seconds to take and install *count* files of *data* into a new cache
    in *directory*, as tpc_vote and tpc_finish do for a transaction's blobs
    (not the background flush that follows)."""
    cache = BlobCache(directory, 1 << 40)
    cache.evict(1 << 40)  # waits for the check the open started: not measured
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
    """Time staging and installing small blobs against the same with fsync
    made a no-op: the milliseconds per blob the commit path spends flushing.
    About 0 since the cache flushes installed files in its background
    thread (earlier versions fsynced each blob before the vote's uploads).

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


def held_up(
    db: ZODB.DB, committer: Committer, name: str, data: bytes
) -> tuple[float, float]:
    """Commit *data* as a blob root[*name*]; return the longest commit the
    second process made meanwhile (0 if it made none) and the blob commit's
    own duration."""
    started, ended = commit_window(db, name, Blob(data))
    return max(committer.overlapping(started, ended), default=0.0), ended - started


def lock_ratio(bench: Bench, wan: bool = False) -> Row:
    """On RelStorage with PostgreSQL, the longest commit of a second process
    while this one commits the large blob, over that commit's duration:
    about 1 while the database-wide commit lock is held for the upload.

    The median of the repeats' ratios: noise can lengthen either side."""
    scale = bench.scale
    link, repeats = link_and_repeats(bench, wan, scale.wan_repeats)
    site = bench.site()
    runs = []
    with bench.database(RELSTORAGE, link, site.base) as db:
        for attempt in range(repeats):
            runs.append(held_up(db, site.committer, f"locked-{attempt}", bench.large))
    runs.sort(key=lambda run: run[0] / run[1])
    longest, seconds = runs[len(runs) // 2]
    typical = site.committer.typical() * 1000
    note = (
        f"{human(scale.large_size)} blob, median of {repeats}; storage column: "
        f"the second process's longest commit (typically {typical:.0f} ms, "
        f"{PROBE_INTERVAL * 1000:g} ms apart); boto3 column: the blob's commit"
    )
    return Row(
        LOCK_RATIO + link.label, longest, seconds, longest / seconds, 0.1, note=note
    )


def staged_copy_threshold(bench: Bench) -> list[Row]:
    """For each of a few blob sizes on RelStorage through the capped line,
    the second process's longest commit with every blob staged before the
    commit lock vs with every blob uploaded under it: what choosing
    ``s3-staged-copy-threshold`` trades. No target; the worst of the repeats,
    as a short lock hold is caught only by a commit that tries meanwhile."""
    scale = bench.scale
    link, site = bench.wan, bench.site()
    longest: dict[tuple[str, int], float] = {}
    seconds: dict[tuple[str, int], float] = {}
    for threshold in (STAGE_EVERYTHING, STAGE_NOTHING):
        extra = f"s3-staged-copy-threshold {threshold}"
        with bench.database(RELSTORAGE, link, site.base, extra) as db:
            for size in scale.lock_sizes:
                data = os.urandom(size)
                runs = [
                    held_up(db, site.committer, f"size-{threshold}-{size}-{n}", data)
                    for n in range(scale.wan_repeats)
                ]
                longest[threshold, size] = max(run[0] for run in runs)
                seconds[threshold, size] = min(run[1] for run in runs)
    rows = []
    for size in scale.lock_sizes:
        staged, locked = longest[STAGE_EVERYTHING, size], longest[STAGE_NOTHING, size]
        note = (
            f"the second process's longest commit, worst of {scale.wan_repeats}, "
            f"with s3-staged-copy-threshold {STAGE_EVERYTHING} (storage column: "
            f"all staged) and {STAGE_NOTHING} (boto3 column: none); the blob's "
            "own commit "
            f"{seconds[STAGE_EVERYTHING, size]:.3f}s staged, "
            f"{seconds[STAGE_NOTHING, size]:.3f}s not"
        )
        path = f"{COMMIT_LOCK}, {human(size)} blob{link.label}"
        value = staged / locked if locked else math.inf
        rows.append(Row(path, staged, locked, value, None, note=note))
    return rows


def zeo_client_commits(bench: Bench) -> list[Row]:
    """Commit the small blobs (one transaction) and the large blob from a ZEO
    client wrapping its own storage (``<s3blobstorage>`` around
    ``<zeoclient>``: the client talks to S3, its server keeps records) vs
    plain boto3, and vs the server-side topology (a plain ZEO client with a
    blob cache, whose server's storage is ``<s3blobstorage>``: every blob
    byte travels through the ZEO server). Both servers are ``runzeo``
    processes of their own, and S3 is reached through the uncapped line. A
    client-side commit returns before its server-side copies land: the bench
    waits for them after each commit, untimed."""
    scale, link, workdir = bench.scale, bench.link, bench.workdir
    records = os.path.join(workdir, "zeo-records.fs")
    wrapped = bench.zconfig("zeo-server-side", link, None, "")
    with (
        zeo_server(
            workdir, "records", f"<filestorage>\n  path {records}\n</filestorage>"
        ) as records_port,
        zeo_server(workdir, "server-side", wrapped) as wrapped_port,
    ):
        client_section = f"<zeoclient>\n  server 127.0.0.1:{records_port}\n</zeoclient>"
        server_side_cache = os.path.join(workdir, "zeo-blob-cache")
        server_side_storage = ZEO.client(
            ("127.0.0.1", wrapped_port),
            blob_dir=server_side_cache,
            shared_blob_dir=False,
        )
        with (
            bench.database("zeo-client-side", link, client_section) as client_side,
            contextlib.closing(ZODB.DB(server_side_storage)) as server_side,
        ):
            small = zeo_commit_rows(
                bench,
                client_side,
                server_side,
                lambda: PersistentMapping(
                    {str(n): Blob(bench.small) for n in range(scale.blobs)}
                ),
                lambda attempt: link.put_parallel(
                    [link.plain_key(f"zeo-{attempt}/{n}") for n in range(scale.blobs)],
                    bench.small,
                ),
                COMMIT_SMALL,
                f"{scale.blobs} x {human(scale.blob_size)}",
            )
            large = zeo_commit_rows(
                bench,
                client_side,
                server_side,
                lambda: Blob(bench.large),
                lambda attempt: link.upload_file(
                    bench.large_file, link.plain_key(f"zeo-large-{attempt}")
                ),
                COMMIT_LARGE,
                human(scale.large_size),
            )
    return small + large


def zeo_commit_rows(
    bench: Bench,
    client_side: ZODB.DB,
    server_side: ZODB.DB,
    value: Callable[[], object],
    plain: Callable[[int], object],
    path: str,
    what: str,
) -> list[Row]:
    """Time committing *value()* through each topology and *plain(attempt)*
    with boto3, ``scale.repeats`` times in turn; a row against boto3 and
    one against the server-side topology."""
    copier = client_side.storage._shared.copier
    times: dict[str, list[float]] = {"client": [], "server": [], "boto3": []}
    for attempt in range(bench.scale.repeats):
        name = f"{path}-{attempt}"
        times["client"].append(commit(client_side, name, value()))
        while copier.pending():
            time.sleep(0.01)
        times["server"].append(commit(server_side, name, value()))
        times["boto3"].append(timed(partial(plain, attempt)))
    best = f"best of {bench.scale.repeats}"
    return [
        ratio_row(
            f"{path}, {ZEO_CLIENT}",
            times["client"],
            times["boto3"],
            1.1,
            f"{what}, {best}; the server keeps records only",
        ),
        ratio_row(
            f"{path}, {ZEO_CLIENT} vs server-side",
            times["client"],
            times["server"],
            None,
            f"{what}, {best}; boto3 column: a ZEO client whose server wraps "
            "its storage in <s3blobstorage>",
        ),
    ]


STEPS: tuple[Callable[[Bench], Row | list[Row]], ...] = (
    commit_small,
    cold_read_small,
    commit_large,
    cold_read_large,
    unghost,
    warm_read,
    collect_orphans,
    eviction_check,
    install_fsync,
    partial(commit_small, wan=True),
    partial(cold_read_small, wan=True),
    partial(commit_large, wan=True),
    partial(cold_read_large, wan=True),
    partial(lock_ratio, wan=True),
    lock_ratio,
    staged_copy_threshold,
    zeo_client_commits,
)


# -- running and reporting ---------------------------------------------------


def step_name(step: Callable[[Bench], object]) -> str:
    """A step's function name, ending in ``_capped`` when it runs through the
    capped line: what ``--only`` selects it by."""
    if isinstance(step, partial):
        return step.func.__name__ + ("_capped" if step.keywords.get("wan") else "")
    return getattr(step, "__name__", repr(step))


def run(
    scale: Scale,
    delay: float,
    bandwidth: float,
    only: Collection[str] = (),
) -> list[Row]:
    """Start the server and the two delay lines (the second capped at
    *bandwidth* bytes per second), run every step (those named in *only*,
    if any), clean up."""
    rows: list[Row] = []
    with (
        ranges_cost_their_size(),
        local_s3_server() as server,
        DelayLine(target=host_and_port(server.endpoint_url), delay=delay) as line,
        DelayLine(
            target=host_and_port(server.endpoint_url),
            delay=delay,
            bandwidth=bandwidth,
        ) as capped,
        tempfile.TemporaryDirectory(prefix="zodb-s3blobs-bench-") as workdir,
    ):
        bench = Bench(server, (line, capped), workdir, scale)
        try:
            for step in STEPS:
                if only and step_name(step) not in only:
                    continue
                seconds, result = measure(partial(step, bench))
                print(f"{step_name(step)}: {seconds:.1f}s", file=sys.stderr, flush=True)
                rows.extend(result if isinstance(result, list) else [result])
        finally:
            bench.close()
    return rows


@contextlib.contextmanager
def bucket_behind_line(delay: float, name: str) -> Iterator[tuple[str, str, object]]:
    """A local S3 server with the bench's bucket, a delay line of *delay*
    seconds each way in front of it and a temporary directory named after
    *name*: (the line's endpoint, the directory, a plain client of the
    server itself, for untimed setup)."""
    with (
        local_s3_server() as server,
        DelayLine(target=host_and_port(server.endpoint_url), delay=delay) as line,
        tempfile.TemporaryDirectory(prefix=f"zodb-s3blobs-{name}-") as workdir,
    ):
        setup = plain_client(server.endpoint_url)
        setup.create_bucket(Bucket=BUCKET)
        try:
            yield line.endpoint_url, workdir, setup
        finally:
            setup.close()


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


def print_table(rows: list[Row], scale: Scale, delay: float, megabits: float) -> None:
    """Print the rows under a header naming the delay, the cap and the repeats."""
    print(
        f"S3BlobStorage vs plain boto3 through a delay line of {delay * 1000:g} ms "
        f"each way to moto on 127.0.0.1 (ranged GETs served at the cost of the "
        f"range, as by S3: see bench/s3fidelity.py); best of {scale.repeats} "
        f"({scale.large_repeats} for the large blob). Rows ending in "
        f"'{megabits:g} Mbit/s' go through a second line of the same delay "
        f"capped at that bandwidth each way, shared by all connections; best of "
        f"{scale.wan_repeats}. RelStorage rows: PostgreSQL on 127.0.0.1, and a "
        f"second process committing without blobs in a loop. ZEO rows: "
        f"runzeo processes on 127.0.0.1"
    )
    header = ("path", "storage s", "boto3 s", "ratio", "target", "ok/MISS", "notes")
    cells = [
        (
            row.path,
            seconds_cell(row.storage),
            seconds_cell(row.baseline),
            value_cell(row),
            "-" if row.limit is None else f"<= {row.limit:g}{row.unit}",
            "-" if row.limit is None else "ok" if row.ok else "MISS",
            row.note,
        )
        for row in rows
    ]
    print_columns([header, *cells])
    targeted = [row for row in rows if row.limit is not None]
    met = sum(row.ok for row in targeted)
    print(f"{met} of {len(targeted)} targets met")


def print_columns(lines: list[tuple[str, ...]]) -> None:
    """Print *lines* of cells in aligned columns; the last (the notes) is
    left as long as it is."""
    widths = [max(len(cell) for cell in column) for column in zip(*lines, strict=True)][
        :-1
    ]
    for *padded, note in lines:
        print(
            "  ".join(c.ljust(w) for c, w in zip(padded, widths, strict=True)),
            note,
            sep="  ",
        )


def sizes(text: str) -> tuple[int, ...]:
    """The counts of --scale-sizes: positive integers separated by commas."""
    try:
        counts = tuple(int(part) for part in text.split(","))
    except ValueError:
        counts = ()
    if not counts or min(counts) <= 0:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a list of positive counts such as 10000,100000"
        )
    return counts


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line's options: --quick, --delay, --bandwidth, --only,
    --scale and --scale-sizes."""
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
    parser.add_argument(
        "--bandwidth",
        type=float,
        default=DEFAULT_MEGABITS,
        metavar="MBIT",
        help="the capped line's bandwidth each way, in Mbit/s "
        f"(default {DEFAULT_MEGABITS:g})",
    )
    parser.add_argument(
        "--only",
        nargs="+",
        default=[],
        choices=[step_name(step) for step in STEPS],
        metavar="STEP",
        help="run these steps only (a cold read reads what the commit step of "
        "its line wrote: name both); one of: %(choices)s",
    )
    parser.add_argument(
        "--scale",
        action="store_true",
        help="measure the cache, the collector and concurrent reads as files, "
        "objects and processes grow (bench/scale.py) instead",
    )
    parser.add_argument(
        "--scale-sizes",
        type=sizes,
        default=None,
        metavar="N,N,...",
        help="the file and object counts of --scale (default 10000,100000)",
    )
    args = parser.parse_args(argv)
    if args.scale_sizes is not None and not args.scale:
        parser.error("--scale-sizes needs --scale")
    if args.delay < 0:
        parser.error("--delay must not be negative")
    if not 0 < args.bandwidth < math.inf:
        parser.error("--bandwidth must be a positive number")
    return args


def run_scale(args: argparse.Namespace) -> int:
    """The --scale mode: bench/scale.py, which builds on this module (hence
    imported here, once this module is loaded)."""
    import scale

    options = scale.Options(
        sizes=args.scale_sizes or scale.DEFAULT_SIZES, delay=args.delay
    )
    if args.quick:
        options = scale.quick(options)
    return scale.main(options)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; 0 when it ran (targets met or not), 1 on an error."""
    args = parse_args(argv)
    # The server's HTTP layer logs every request at INFO.
    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    if args.scale:
        return run_scale(args)
    scale = QUICK if args.quick else FULL
    try:
        rows = run(scale, args.delay, megabits(args.bandwidth), args.only)
    except Exception:
        traceback.print_exc()
        print("bench: failed", file=sys.stderr)
        return 1
    print_table(rows, scale, args.delay, args.bandwidth)
    return 0


if __name__ == "__main__":
    sys.exit(main())
