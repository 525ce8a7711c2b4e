"""The measuring processes of ``bench.py --scale`` (see ``scale.py``).

``python bench/scaleprobe.py ROLE`` reads its job as one JSON line on stdin,
sets up, prints ``ready`` and waits for ``go`` (so that the parent starts
several at once), measures, and prints its result as one JSON line; a role
with several phases repeats the last three steps. Each measurement thus runs
in a process of its own, whose memory is its own. This module imports only
what the measurements need, so that a process starts quickly and its
memory is that of an application using the storage.
"""

from __future__ import annotations

import gc
import json
import sys
import time
from collections.abc import Callable
from typing import BinaryIO

import ZODB
import ZODB.config
from ZODB.blob import Blob
from ZODB.utils import p64

from zodb_s3blobs.cache import BlobCache
from zodb_s3blobs.cli.localserver import LocalS3

KiB = 1 << 10
#: The cached files: 1 KiB each, all of one revision.
CACHED_SIZE = KiB
CACHED_TID = p64(0x3C0FFEE)
#: A cache limit no measurement reaches: nothing is evicted unless asked.
NO_LIMIT = 1 << 50
#: Give up on a first hit after this long (seconds): the run then fails.
HIT_DEADLINE = 120.0
#: The fraction of the cache the eviction row removes.
EVICTED = 0.1
READY = "ready"
GO = "go"


class ProbeError(Exception):
    """A measurement went wrong: the process exits 1 and the run fails."""


# -- memory -------------------------------------------------------------------


def memory() -> dict[str, int]:
    """This process's resident memory now (``rss``) and at its peak
    (``hwm``), in bytes, from /proc/self/status."""
    found = {}
    with open("/proc/self/status") as status:
        for line in status:
            name, _, value = line.partition(":")
            if name in ("VmRSS", "VmHWM"):
                found[name] = int(value.split()[0]) * KiB
    return {"rss": found["VmRSS"], "hwm": found["VmHWM"]}


def reset_peak() -> bool:
    """Reset VmHWM to the current resident memory (Linux 4.0 and later);
    False where the kernel does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
    except OSError:
        return False
    return True


def wait_for_go() -> float:
    """Tell the parent this child is set up; return, by the system-wide
    monotonic clock, when the parent's ``go`` arrived."""
    print(READY, flush=True)
    if sys.stdin.readline().strip() != GO:
        raise ProbeError("the parent went away before the start")
    return time.monotonic()


def write_file(out: BinaryIO) -> int:
    """A download that writes one cached file's bytes."""
    out.write(b"x" * CACHED_SIZE)
    return CACHED_SIZE


def fill_cache(job: dict) -> dict:
    """Install ``count`` files through a BlobCache, as downloads would."""
    cache = BlobCache(job["directory"], NO_LIMIT)
    wait_for_go()
    started = time.perf_counter()
    for oid in range(1, job["count"] + 1):
        cache.fetch(p64(oid), CACHED_TID, write_file)
    seconds = time.perf_counter() - started
    cache.close()
    return {"seconds": seconds}


def ready_cache(directory: str) -> BlobCache:
    """Open the cache in *directory* and return once its index is built:
    an eviction with a target above everything waits for the check the open
    started (both take ``evict.lock``) and builds the index if none is."""
    cache = BlobCache(directory, NO_LIMIT, min_age=0)
    cache.evict(target=NO_LIMIT)
    return cache


def open_cache(job: dict) -> dict:
    """The memory of this process once the cache is open and indexed."""
    wait_for_go()
    cache = ready_cache(job["directory"])
    gc.collect()
    used = memory()
    cache.close()
    return used


def first_hit(job: dict) -> dict:
    """Open the cache and look up one cached file until it is served; when
    that happened."""
    oid, tid = p64(job["oid"]), CACHED_TID
    wait_for_go()
    cache = BlobCache(job["directory"], NO_LIMIT)
    deadline = time.monotonic() + HIT_DEADLINE
    while cache.lookup(oid, tid) is None:
        if time.monotonic() > deadline:
            raise ProbeError(f"no hit on {cache.path(oid, tid)} in {HIT_DEADLINE}s")
    served = time.monotonic()
    cache.close()
    return {"served": served}


def evict_tenth(job: dict) -> dict:
    """Seconds to evict EVICTED of the cache's bytes, once it is indexed."""
    wait_for_go()
    cache = ready_cache(job["directory"])
    total = job["count"] * CACHED_SIZE
    started = time.perf_counter()
    freed = cache.evict(target=int(total * (1 - EVICTED)))
    seconds = time.perf_counter() - started
    cache.close()
    return {"seconds": seconds, "freed": freed}


def list_prefix(job: dict) -> dict:
    """Seconds to list every key under the prefix, one page after another."""
    client = LocalS3(job["endpoint_url"]).client()
    paginator = client.get_paginator("list_objects_v2")
    wait_for_go()
    started = time.perf_counter()
    keys = sum(
        page.get("KeyCount", 0)
        for page in paginator.paginate(Bucket=job["bucket"], Prefix=job["prefix"])
    )
    seconds = time.perf_counter() - started
    client.close()
    return {"seconds": seconds, "keys": keys}


def collect(job: dict) -> dict:
    """Open the database, commit one blob (its last tid is then above the
    orphans'), and time a dry run and then a collection with retention 0;
    the peak memory the collection added."""
    db = ZODB.DB(ZODB.config.storageFromString(job["zconfig"]))
    try:
        with db.transaction() as conn:
            conn.root()["blob"] = Blob(b"live")
        wait_for_go()
        # A dry run first: the same listing and judging without the deletes,
        # whose cost on this machine is the local server's, not the
        # collector's (S3 deletes on its own machines).
        started = time.perf_counter()
        judged = db.storage.collect_orphans(retention=0, dry_run=True)
        dry_seconds = time.perf_counter() - started
        gc.collect()
        before = memory()
        reset = reset_peak()
        started = time.perf_counter()
        report = db.storage.collect_orphans(retention=0)
        seconds = time.perf_counter() - started
        after = memory()
    finally:
        db.close()
    growth = after["hwm"] - (before["rss"] if reset else before["hwm"])
    return {
        "seconds": seconds,
        "deleted": report.deleted,
        "growth": growth,
        "dry_seconds": dry_seconds,
        "judged": judged.orphans,
    }


def read_once(storage, revision: tuple[int, int]) -> None:
    """Read one blob revision through *storage*, as ZODB hands it out."""
    oid, tid = revision
    with open(storage.loadBlob(p64(oid), p64(tid)), "rb") as blob:
        blob.read()


def read_blobs(job: dict) -> dict:
    """Open the storage and read this child's revisions through it: first
    each once (cold, reported), then round and round for ``seconds``
    (warm); how many reads each phase made and when it ended. The first
    revision is read before the start, untimed, so that the cold reads find
    the client's connections open, as in a running process."""
    storage = ZODB.config.storageFromString(job["zconfig"])
    warmup, *revisions = job["revisions"]
    try:
        read_once(storage, warmup)
        wait_for_go()
        for revision in revisions:
            read_once(storage, revision)
        report({"reads": len(revisions), "ended": time.monotonic()})
        started, reads = wait_for_go(), 0
        while time.monotonic() - started < job["seconds"]:
            read_once(storage, revisions[reads % len(revisions)])
            reads += 1
        ended = time.monotonic()
    finally:
        storage.close()
    return {"reads": reads, "ended": ended}


ROLES: dict[str, Callable[[dict], dict]] = {
    "fill": fill_cache,
    "open": open_cache,
    "hit": first_hit,
    "evict": evict_tenth,
    "list": list_prefix,
    "collect": collect,
    "read": read_blobs,
}


def child_main(role: str) -> None:
    """Run *role* on the job read from stdin; print its result as JSON."""
    job = json.loads(sys.stdin.readline())
    report(ROLES[role](job))


def report(result: dict) -> None:
    """Hand *result* (a phase's) to the parent."""
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    child_main(sys.argv[1])
