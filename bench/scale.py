"""``bench.py --scale``: what the cache, the collector and the read path cost
as files, objects and processes grow.

For each count N of ``--scale-sizes`` (10,000 and 100,000 by default):

- **cache**: N files of 1 KiB installed through :class:`BlobCache` (in
  ``/dev/shm`` when it is writable, as the eviction row of bench.py); then,
  each in a fresh process, the resident memory a process adds by opening
  that cache and waiting for its index (against the same on an empty
  cache), the time until 8 processes started together all serve a hit, and
  the time to evict a tenth of the files;
- **collector**: N orphaned objects under a prefix of their own (put straight
  into the server, untimed), collected with retention 0 through the delay
  line, against one paginated listing of the same prefix through the same
  line, and the peak memory the collecting process grew by.

moto is made to serve each listing page from a sorted index of the
bucket's names (``s3fidelity.py``): left alone, it sorts every key of the
bucket for each page, and the collector rows would measure moto.

Then 1, 2, 4 and 8 processes read small blobs together through the delay
line: cold (every read a miss) and warm (every read a hit), as a total rate.

Every measurement runs in a process of its own (``bench/scaleprobe.py``),
so that memory is measured honestly and processes meet at a common start:
each child says ``ready`` once imported and set up, and waits for ``go``,
which the parent sends to all at once. The entry points are the public
ones (``BlobCache``, the storage's ``loadBlob`` and ``collect_orphans``),
so the harness measures the cache and the collector whatever their insides.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, replace
from functools import partial

import ZODB
import ZODB.config
from bench import RAM_DIR, BenchError, host_and_port, print_columns
from delayline import DelayLine
from moto.core import DEFAULT_ACCOUNT_ID
from moto.s3.models import s3_backends
from s3fidelity import listings_cost_their_page
from scaleprobe import CACHED_SIZE, GO, READY, KiB
from ZODB.blob import Blob
from ZODB.utils import p64, u64

from zodb_s3blobs.cli.localserver import LocalS3, local_s3_server
from zodb_s3blobs.keys import KeyLayout

MB = 1_000_000
DEFAULT_SIZES = (10_000, 100_000)
#: The processes that open the cache together and must each serve a hit.
HIT_PROCESSES = 8
#: Orphans: oids far above any a database of the bench allocates, and a tid
#: older than any transaction it commits.
ORPHAN_OIDS = 1 << 32
ORPHAN_TID = p64(5)
#: Process counts of the read rows, and the size of the blobs they read.
READERS = (1, 2, 4, 8)
READ_SIZE = 64 * KiB
#: Each cold reader reads this many blobs, each warm reader for this long.
COLD_READS = 32
WARM_SECONDS = 1.0
QUICK_COLD_READS = 4
QUICK_WARM_SECONDS = 0.2
SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "scaleprobe.py")
#: The issue's targets, met at 100,000 files and objects.
RSS_TARGET_MB = 5.0
HIT_TARGET = 2.0
EVICT_TARGET = 2.0
COLLECT_RATIO_TARGET = 1.2
COLLECT_RSS_TARGET_MB = 20.0
#: What the extrapolation line projects to.
PROJECTED_FILES = (1_000_000, 10_000_000)
PROJECTED_PROCESSES = 32


@dataclass(frozen=True)
class ScaleRow:
    """One measured value, its unit and the issue's bound on it (at most
    *limit*, or at least it with *at_least*); no limit: informative."""

    path: str
    value: float
    unit: str
    limit: float | None = None
    at_least: bool = False
    note: str = ""

    @property
    def ok(self) -> bool:
        if self.limit is None:
            return True
        return self.value >= self.limit if self.at_least else self.value <= self.limit

    def target(self) -> str:
        if self.limit is None:
            return "-"
        return f"{'>=' if self.at_least else '<='} {self.limit:g}{self.unit}"


@dataclass(frozen=True)
class Options:
    """What one ``--scale`` run measures."""

    sizes: tuple[int, ...]
    delay: float
    cold_reads: int = COLD_READS
    warm_seconds: float = WARM_SECONDS


def quick(options: Options) -> Options:
    """*options* with the read rows shortened, for a smoke run."""
    return replace(
        options, cold_reads=QUICK_COLD_READS, warm_seconds=QUICK_WARM_SECONDS
    )


# -- the parent's side --------------------------------------------------------


def run_together(
    role: str, jobs: list[dict], phases: int = 1
) -> list[tuple[float, list[dict]]]:
    """Start one child per job; for each of its *phases*, wait until all
    are ready and start them at once. For each phase, that moment
    (monotonic clock) and the children's results."""
    children = [
        subprocess.Popen(
            [sys.executable, SCRIPT, role],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in jobs
    ]
    measured = []
    try:
        for child, job in zip(children, jobs, strict=True):
            send(child, json.dumps(job))
        for _phase in range(phases):
            for child in children:
                expect(child, role, READY)
            started = time.monotonic()
            for child in children:
                send(child, GO)
            results = [json.loads(expect(child, role)) for child in children]
            measured.append((started, results))
        for child in children:
            if child.wait(timeout=60) != 0:
                raise BenchError(f"{role}: a child exited with {child.returncode}")
    finally:
        for child in children:
            if child.poll() is None:
                child.kill()
                child.wait()
    return measured


def send(child: subprocess.Popen, line: str) -> None:
    """Write one line to the child's stdin."""
    assert child.stdin is not None
    child.stdin.write(line + "\n")
    child.stdin.flush()


def run_one(role: str, job: dict) -> dict:
    """Run *role* in one fresh child; its result."""
    return run_together(role, [job])[0][1][0]


def expect(child: subprocess.Popen, role: str, line: str | None = None) -> str:
    """The child's next line of output (*line*, if given)."""
    assert child.stdout is not None
    got = child.stdout.readline().strip()
    if not got or (line is not None and got != line):
        child.wait()
        raise BenchError(
            f"{role}: a child exited with {child.returncode} (its error is above)"
        )
    return got


def megabytes(size: float) -> float:
    return size / MB


def cache_rows(workdir: str, count: int) -> list[ScaleRow]:
    """The cache's rows at *count* files: memory at open, first hits of 8
    processes started together, evicting a tenth."""
    parent = RAM_DIR if os.access(RAM_DIR, os.W_OK) else workdir
    directory = tempfile.mkdtemp(prefix="zodb-s3blobs-scale-", dir=parent)
    empty = tempfile.mkdtemp(prefix="zodb-s3blobs-scale-empty-", dir=parent)
    try:
        filled = run_one("fill", {"directory": directory, "count": count})
        full, bare = (run_one("open", {"directory": d}) for d in (directory, empty))
        jobs = [{"directory": directory, "oid": count // 2 + 1}] * HIT_PROCESSES
        [(started, hits)] = run_together("hit", jobs)
        evicted = run_one("evict", {"directory": directory, "count": count})
    finally:
        shutil.rmtree(directory)
        shutil.rmtree(empty)
    growth = megabytes(full["rss"] - bare["rss"])
    peak = megabytes(full["hwm"] - bare["hwm"])
    slowest = max(hit["served"] for hit in hits) - started
    files = evicted["freed"] // CACHED_SIZE
    where = f"{count} files of 1 KiB in {parent}"
    return [
        ScaleRow(
            f"cache RSS growth, {count} files",
            growth,
            " MB",
            RSS_TARGET_MB,
            note=f"{where} (installed in {filled['seconds']:.1f}s); resident "
            f"once open and indexed, minus the same on an empty cache; peak "
            f"{peak:+.1f} MB",
        ),
        ScaleRow(
            f"{HIT_PROCESSES} processes serve a hit, {count} files",
            slowest,
            " s",
            HIT_TARGET,
            note=f"the last of {HIT_PROCESSES} processes started together to "
            "open the cache and serve one cached file",
        ),
        ScaleRow(
            f"evict 10%, {count} files",
            evicted["seconds"],
            " s",
            EVICT_TARGET,
            note=f"{files} files evicted, after the index was built",
        ),
    ]


def put_orphans(bucket: str, keys: list[str]) -> None:
    """Store a few bytes under each key straight in the backend of the moto
    server this process runs (setup, untimed: N PUTs over HTTP would take
    minutes at 100,000)."""
    backend = s3_backends[DEFAULT_ACCOUNT_ID]["aws"]
    for key in keys:
        backend.put_object(bucket, key, b"orphan")


def collector_rows(
    server: LocalS3, line: DelayLine, workdir: str, count: int
) -> list[ScaleRow]:
    """Collect *count* orphans through *line* vs listing them through it."""
    bucket = f"zodb-s3blobs-scale-gc-{count}"
    prefix = "gc"
    server.create_bucket(bucket)
    layout = KeyLayout(prefix)
    put_orphans(
        bucket, [layout.key(p64(ORPHAN_OIDS + n), ORPHAN_TID) for n in range(count)]
    )
    listed = run_one(
        "list",
        {"endpoint_url": line.endpoint_url, "bucket": bucket, "prefix": prefix + "/"},
    )
    data_fs = os.path.join(workdir, f"gc-{count}.fs")
    zconfig = LocalS3(line.endpoint_url).zconfig(
        bucket,
        os.path.join(workdir, f"gc-cache-{count}"),
        f"<filestorage>\n  path {data_fs}\n</filestorage>",
        prefix=prefix,
    )
    collected = run_one("collect", {"zconfig": zconfig})
    if collected["deleted"] != count or collected["judged"] != count:
        raise BenchError(
            f"collector: found {collected['judged']} and deleted "
            f"{collected['deleted']} of {count}"
        )
    ratio = collected["seconds"] / listed["seconds"]
    return [
        ScaleRow(
            f"collector dry run vs listing, {count} objects",
            collected["dry_seconds"] / listed["seconds"],
            "",
            None,
            note=f"the same listing and judging without deletes (whose work "
            f"falls on the local server, sharing this machine's cores): "
            f"{collected['dry_seconds']:.2f}s",
        ),
        ScaleRow(
            f"collector vs listing, {count} objects",
            ratio,
            "",
            COLLECT_RATIO_TARGET,
            note=f"all orphans, retention 0: collected in "
            f"{collected['seconds']:.2f}s, {listed['keys']} keys listed in "
            f"{listed['seconds']:.2f}s, one page after another",
        ),
        ScaleRow(
            f"collector RSS growth, {count} objects",
            megabytes(collected["growth"]),
            " MB",
            COLLECT_RSS_TARGET_MB,
            note="peak resident memory of the collecting process over what it "
            "held before",
        ),
    ]


def commit_readable_blobs(
    server: LocalS3, workdir: str, count: int
) -> tuple[str, str, list[tuple[int, int]]]:
    """Commit *count* blobs of READ_SIZE (straight to the server) in one
    transaction; the bucket, the path of the database's Data.fs and the
    blobs' (oid, tid) as integers."""
    bucket = "zodb-s3blobs-scale-reads"
    server.create_bucket(bucket)
    data_fs = os.path.join(workdir, "reads.fs")
    base = f"<filestorage>\n  path {data_fs}\n</filestorage>"
    text = server.zconfig(
        bucket, os.path.join(workdir, "reads-setup"), base, prefix="reads"
    )
    db = ZODB.DB(ZODB.config.storageFromString(text))
    try:
        with db.transaction() as conn:
            blobs = [Blob(os.urandom(READ_SIZE)) for _ in range(count)]
            conn.root()["blobs"] = blobs
        tid = u64(db.lastTransaction())
        revisions = [(u64(blob._p_oid), tid) for blob in blobs]
    finally:
        db.close()
    return bucket, data_fs, revisions


def reader_jobs(
    line: DelayLine,
    bucket: str,
    data_fs: str,
    cache_dir: str,
    slices: list[list[tuple[int, int]]],
    seconds: float,
) -> list[dict]:
    """One job per slice of revisions: a storage on the database opened
    read-only (so that processes share it, and none records itself as a
    writer), all sharing *cache_dir*."""
    base = f"<filestorage>\n  path {data_fs}\n  read-only true\n</filestorage>"
    zconfig = LocalS3(line.endpoint_url).zconfig(
        bucket, cache_dir, base, prefix="reads"
    )
    return [
        {"zconfig": zconfig, "revisions": revisions, "seconds": seconds}
        for revisions in slices
    ]


def rate(started: float, results: list[dict]) -> float:
    """Reads per second of all the children of a phase together."""
    reads = sum(result["reads"] for result in results)
    return reads / (max(result["ended"] for result in results) - started)


def read_rows(
    server: LocalS3, line: DelayLine, workdir: str, options: Options
) -> list[ScaleRow]:
    """Total cold and warm read rates of 1, 2, 4 and 8 processes."""
    # Each child's slice starts with the revision it reads before the start.
    per_child = options.cold_reads + 1
    bucket, data_fs, revisions = commit_readable_blobs(
        server, workdir, per_child * max(READERS)
    )
    slices = [
        revisions[n * per_child : (n + 1) * per_child] for n in range(max(READERS))
    ]
    rows, cold_rates = [], {}
    for processes in READERS:
        cache_dir = os.path.join(workdir, f"reads-cache-{processes}")
        jobs = reader_jobs(
            line,
            bucket,
            data_fs,
            cache_dir,
            slices[:processes],
            options.warm_seconds,
        )
        cold_phase, warm_phase = run_together("read", jobs, phases=2)
        cold_rates[processes] = cold = rate(*cold_phase)
        warm = rate(*warm_phase)
        counted = f"{processes} process{'es' if processes > 1 else ''}"
        what = f"{counted}, {READ_SIZE // KiB} KiB blobs"
        rows.append(
            ScaleRow(
                f"cold reads, {counted}",
                cold,
                " /s",
                note=f"{what}, {options.cold_reads} misses each through the delay line",
            )
        )
        rows.append(
            ScaleRow(
                f"warm reads, {counted}",
                warm,
                " /s",
                note=f"{what}, hits for {options.warm_seconds:g}s each",
            )
        )
    rows.append(
        ScaleRow(
            "cold reads, 4 vs 2 processes",
            cold_rates[4] / cold_rates[2],
            "",
            1.0,
            at_least=True,
            note="the total miss rate of 4 processes over that of 2",
        )
    )
    return rows


def extrapolation(rows: list[ScaleRow], sizes: tuple[int, ...]) -> list[str]:
    """Lines projecting, linearly from the two largest sizes, the rows that
    grow with files or objects to PROJECTED_FILES, and the first hits to
    PROJECTED_PROCESSES processes (linear in processes)."""
    if len(sizes) < 2:
        return ["extrapolation: needs two sizes"]
    small, large = sorted(sizes)[-2:]
    values = {row.path: row for row in rows}
    lines = []
    for prefix, noun in (
        ("cache RSS growth", "files"),
        (f"{HIT_PROCESSES} processes serve a hit", "files"),
        ("evict 10%", "files"),
        ("collector RSS growth", "objects"),
    ):
        a = values[f"{prefix}, {small} {noun}"]
        b = values[f"{prefix}, {large} {noun}"]
        slope = (b.value - a.value) / (large - small)
        if slope <= 0:
            lines.append(
                f"  {prefix}: no growth from {small:,} to {large:,} "
                f"({a.value:.2f}{a.unit}, {b.value:.2f}{b.unit}): none projected"
            )
            continue
        projected = ", ".join(
            f"{target:,}: {b.value + slope * (target - large):.2f}{b.unit}"
            for target in PROJECTED_FILES
        )
        lines.append(f"  {prefix} at {projected}")
    hit = values[f"{HIT_PROCESSES} processes serve a hit, {large} files"]
    factor = PROJECTED_PROCESSES / HIT_PROCESSES
    lines.append(
        f"  {PROJECTED_PROCESSES} processes serve a hit, {large} files: "
        f"{hit.value * factor:.2f}{hit.unit} ({HIT_PROCESSES} processes x {factor:g})"
    )
    return [
        f"Extrapolation (not measured: linear from {small:,} to {large:,}; "
        "the processes linear in their count on this machine's cores):",
        *lines,
    ]


def run(options: Options) -> list[ScaleRow]:
    """Start the server and the delay line; measure every size, then reads."""
    rows: list[ScaleRow] = []
    with (
        listings_cost_their_page(),
        local_s3_server() as server,
        DelayLine(
            target=host_and_port(server.endpoint_url), delay=options.delay
        ) as line,
        tempfile.TemporaryDirectory(prefix="zodb-s3blobs-scale-") as workdir,
    ):
        for count in options.sizes:
            for step in (
                partial(cache_rows, workdir, count),
                partial(collector_rows, server, line, workdir, count),
            ):
                started = time.perf_counter()
                rows.extend(step())
                print(
                    f"{step.func.__name__} at {count}: "
                    f"{time.perf_counter() - started:.1f}s",
                    file=sys.stderr,
                    flush=True,
                )
        rows.extend(read_rows(server, line, workdir, options))
    return rows


def value_cell(row: ScaleRow) -> str:
    return (
        f"{row.value:.2f}{row.unit}"
        if row.value < 100
        else f"{row.value:.0f}{row.unit}"
    )


def print_table(rows: list[ScaleRow], options: Options) -> None:
    """Print the rows under a header, the targets met, and the extrapolation."""
    print(
        f"zodb-s3blobs at scale: moto on 127.0.0.1 behind a delay line of "
        f"{options.delay * 1000:g} ms each way (listings served a page at a "
        f"time from a sorted index, as by S3: see bench/s3fidelity.py); every "
        f"measurement in a fresh process"
    )
    header = ("path", "value", "target", "ok/MISS", "notes")
    cells = [
        (
            row.path,
            value_cell(row),
            row.target(),
            "-" if row.limit is None else "ok" if row.ok else "MISS",
            row.note,
        )
        for row in rows
    ]
    print_columns([header, *cells])
    targeted = [row for row in rows if row.limit is not None]
    print(f"{sum(row.ok for row in targeted)} of {len(targeted)} targets met")
    for line in extrapolation(rows, options.sizes):
        print(line)


def main(options: Options) -> int:
    """Run the scale measurements and print them; 1 on an error."""
    started = time.perf_counter()
    try:
        rows = run(options)
    except Exception:
        traceback.print_exc()
        print("bench --scale: failed", file=sys.stderr)
        return 1
    print_table(rows, options)
    print(f"--scale ran in {time.perf_counter() - started:.0f}s", file=sys.stderr)
    return 0
