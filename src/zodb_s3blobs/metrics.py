"""What a storage has done, for operators: counters, two gauges and a latency
histogram of S3 requests, kept in this process's memory per storage (its MVCC
instances share them) and returned by :meth:`S3BlobStorage.stats` as a plain
dict under the names below, which are stable: dashboards and alerts use them.

Plain ints under one lock: an increment costs a lock and a dict update, which
a warm read (an ``lstat``, a ``utime`` and an ``open``) does not notice.
Nothing here needs prometheus_client: :mod:`zodb_s3blobs.exposition` turns
the same dict into Prometheus metrics named ``zodb_s3blobs_<name>`` (with
``_total`` after a counter's name), and docs/metrics.md lists them all.
"""

from __future__ import annotations

import bisect
import math
import threading
from collections import OrderedDict

#: Counters without labels: name -> meaning.
COUNTERS = {
    "cache_hits": "Blob reads served from the local cache.",
    "cache_misses": "Blob reads that downloaded the blob from S3 into the cache.",
    "cache_hit_bytes": "Bytes of the blobs served from the local cache.",
    "download_bytes": "Bytes downloaded from S3 into the local cache.",
    "cache_evictions": "Cached files this process removed to keep cache-size.",
    "cache_evicted_bytes": "Bytes of the cached files this process removed.",
    "uploads": "Blob files uploaded to S3 for committing transactions.",
    "upload_bytes": "Bytes of the blob files uploaded to S3.",
    "aborted_deletes": (
        "Keys an aborted transaction sent to DELETE (every key its uploads "
        "were started for, failed uploads included), once the DELETE succeeded."
    ),
    "orphans_found": (
        "Objects no revision needs, found by pack or gc and due for deletion "
        "(orphaned for gc-retention; pending ones are not counted)."
    ),
    "orphans_deleted": "Orphaned objects deleted by pack or gc.",
    "orphans_deleted_bytes": "Bytes of the orphaned objects deleted by pack or gc.",
    "lazy_unghosts": (
        "Blob revisions loaded without downloading their file (each once, "
        "however many connections load it)."
    ),
    "lazy_unghosts_opened": (
        "Blob revisions loaded lazily whose file was downloaded when first "
        "opened afterwards (opened from the cache: not counted); "
        "lazy_unghosts minus this is at most the downloads lazy loading saved."
    ),
}
#: Gauges: name -> meaning (read when the figures are taken, not counted).
GAUGES = {
    "cache_bytes": (
        "Bytes of the blob files in the cache directory (all processes: the "
        "same in each; aggregate with max, not sum)."
    ),
    "orphans_pending": (
        "Orphans the last collection of this process kept for gc-retention "
        "(None before its first collection)."
    ),
    "orphans_pending_bytes": "Bytes of those pending orphans.",
    "cache_files": (
        "Blob files in the cache directory (all processes: the same in "
        "each; aggregate with max, not sum)."
    ),
}
#: What an S3 request did, from botocore's operation (see s3metrics).
OPERATIONS = (
    "get",
    "ranged_get",
    "put",
    "multipart",
    "copy",
    "delete",
    "list",
    "head",
    "other",
)
#: Why an S3 request failed or was tried again.
CAUSES = (
    "throttled",
    "5xx",
    "timeout",
    "connection",
    "checksum_mismatch",
    "not_found",
    "other",
)
#: Counters by one label: name -> (label, its values, meaning).
LABELLED = {
    "s3_requests": (
        "operation",
        OPERATIONS,
        "S3 requests by operation (a request botocore retries counts once).",
    ),
    "s3_retries": (
        "cause",
        CAUSES,
        "Failed S3 attempts that were tried again, by the cause of the failure.",
    ),
    "s3_failures": (
        "cause",
        CAUSES,
        "S3 requests that failed (after botocore's own retries), download "
        "attempts whose body broke off or stalled, and downloads whose bytes "
        "did not match their checksum, by cause.",
    ),
}
#: The latency histogram of S3 requests, by operation.
HISTOGRAM = "s3_request_duration_seconds"
HISTOGRAM_HELP = (
    "Seconds an S3 request took, from the call to its answer (retries "
    "included; for a GET, to its headers: not reading the body), by operation."
)
#: Upper bounds of the histogram's buckets, seconds: from a cached GET on a
#: LAN to a multipart completion that a loaded provider answers in minutes.
BUCKETS = (
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1,
    2.5,
    5,
    10,
    30,
    60,
    120,
    math.inf,
)
#: How many lazily loaded revisions are remembered to tell whether they are
#: opened later (a blob opened after this many other lazy loads counts as
#: never opened, and a lazy load of it again counts anew).
LAZY_REMEMBERED = 10_000


def bucket_label(bound: float) -> str:
    """A bucket's upper bound as Prometheus writes it (``le``)."""
    return "+Inf" if bound == math.inf else repr(float(bound))


class Metrics:
    """The figures of one storage; every method is thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts = dict.fromkeys(COUNTERS, 0)
        self._labelled = {
            name: dict.fromkeys(values, 0)
            for name, (_label, values, _help) in LABELLED.items()
        }
        # Per operation: requests per bucket (not cumulative), and their sum.
        self._buckets = {op: [0] * len(BUCKETS) for op in OPERATIONS}
        self._seconds = dict.fromkeys(OPERATIONS, 0.0)
        # Revisions loaded lazily -> whether they are being opened since.
        self._lazy: OrderedDict[tuple[bytes, bytes], bool] = OrderedDict()

    def add(self, **amounts: int) -> None:
        """Add to counters of :data:`COUNTERS`, e.g. ``add(uploads=3,
        upload_bytes=4096)``."""
        with self._lock:
            for name, amount in amounts.items():
                self._counts[name] += amount

    def hit(self, oid: bytes, tid: bytes, size: int) -> None:
        """A read served from the cache (the hot path: one lock, no kwargs)."""
        self._read("cache_hits", "cache_hit_bytes", (oid, tid), size, False)

    def miss(self, oid: bytes, tid: bytes, size: int) -> None:
        """A read that downloaded *size* bytes into the cache."""
        self._read("cache_misses", "download_bytes", (oid, tid), size, True)

    def _read(
        self,
        reads: str,
        read_bytes: str,
        revision: tuple[bytes, bytes],
        size: int,
        downloaded: bool,
    ) -> None:
        """Count a read of *size* bytes; the first opening of a lazily loaded
        blob counts as opened only if it *downloaded* the file."""
        with self._lock:
            self._counts[reads] += 1
            self._counts[read_bytes] += size
            if self._lazy and self._lazy.get(revision):
                del self._lazy[revision]
                self._counts["lazy_unghosts_opened"] += downloaded

    def request(self, operation: str, seconds: float) -> None:
        """An S3 request of *operation* (one of :data:`OPERATIONS`) answered,
        or failed, after *seconds*."""
        index = bisect.bisect_left(BUCKETS, seconds)
        with self._lock:
            self._labelled["s3_requests"][operation] += 1
            self._buckets[operation][index] += 1
            self._seconds[operation] += seconds

    def retried(self, cause: str) -> None:
        """A failed S3 attempt, of *cause* (:data:`CAUSES`), tried again."""
        with self._lock:
            self._labelled["s3_retries"][cause] += 1

    def failed(self, cause: str) -> None:
        """An S3 request that failed for *cause* (:data:`CAUSES`)."""
        with self._lock:
            self._labelled["s3_failures"][cause] += 1

    def unghosted_lazily(self, oid: bytes, tid: bytes) -> None:
        """A Blob object loaded without its file (see :mod:`.unghost`);
        counted once per revision remembered."""
        revision = (oid, tid)
        with self._lock:
            if revision in self._lazy:
                self._lazy.move_to_end(revision)
                return
            self._counts["lazy_unghosts"] += 1
            self._lazy[revision] = False
            if len(self._lazy) > LAZY_REMEMBERED:
                self._lazy.popitem(last=False)

    def opened(self, oid: bytes, tid: bytes) -> None:
        """A blob's file asked for: the cache's :meth:`hit` or :meth:`miss`
        that follows tells whether a lazily loaded blob was downloaded."""
        if not self._lazy:  # read without the lock: nothing was loaded lazily
            return
        with self._lock:
            if (oid, tid) in self._lazy:
                self._lazy[(oid, tid)] = True

    def snapshot(self) -> dict:
        """Every counter and the histogram, as plain data (see the module)."""
        with self._lock:
            figures: dict = dict(self._counts)
            for name, counts in self._labelled.items():
                figures[name] = dict(counts)
            buckets = {op: list(counts) for op, counts in self._buckets.items()}
            seconds = dict(self._seconds)
        figures[HISTOGRAM] = {
            op: _histogram(counts, seconds[op]) for op, counts in buckets.items()
        }
        return figures


def _histogram(counts: list[int], seconds: float) -> dict:
    """One operation's histogram: cumulative bucket counts by ``le``, the
    number of requests and their total seconds."""
    cumulative, running = {}, 0
    for bound, count in zip(BUCKETS, counts, strict=True):
        running += count
        cumulative[bucket_label(bound)] = running
    return {"count": running, "sum": seconds, "buckets": cumulative}
