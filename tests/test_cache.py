"""The local blob cache: atomic read-only files, LRU eviction, and safety
under concurrent readers in threads and in separate processes."""

from __future__ import annotations

import hashlib
import json
import os
import random
import stat
import subprocess
import sys
import textwrap
import threading
import time
import traceback
from dataclasses import asdict

import pytest
import ZODB
from ZODB.utils import p64

from test_storage import commit_blobs
from zodb_s3blobs.cache import MIN_AGE, BlobCache


def writer(data: bytes):
    def download(out):
        out.write(data)
        return len(data)

    return download


def cached_bytes(cache: BlobCache) -> int:
    return sum(st.st_size for _path, st in cache.files())


def test_fetch_installs_a_complete_read_only_file(tmp_path):
    cache = BlobCache(str(tmp_path), 10_000)
    path = cache.fetch(p64(1), p64(2), writer(b"abc"))
    with open(path, "rb") as f:
        assert f.read() == b"abc"
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o400
    assert os.listdir(cache.temp_dir) == []


def test_failed_download_leaves_nothing(tmp_path):
    cache = BlobCache(str(tmp_path), 10_000)

    def broken(out):
        out.write(b"partial")
        raise ConnectionResetError("peer went away")

    with pytest.raises(ConnectionResetError):
        cache.fetch(p64(1), p64(2), broken)
    assert cache.lookup(p64(1), p64(2)) is None
    assert os.listdir(cache.temp_dir) == []


def test_eviction_starts_by_itself_and_keeps_the_recently_used(tmp_path):
    """min_age 0: LRU order among files all used within the last minute (the
    default minimum age is tested below)."""
    cache = BlobCache(str(tmp_path), 100_000, min_age=0)
    data = b"x" * 10_000
    cache.fetch(p64(0), p64(1), writer(data))
    for oid in range(1, 30):
        cache.fetch(p64(oid), p64(1), writer(data))
        cache.lookup(p64(0), p64(1))  # keep blob 0 in use
    cache.close()  # waits for a running eviction
    assert len(list(cache.files())) < 30, "the daemon thread evicted"
    assert cache.lookup(p64(0), p64(1)) is not None, "recently used survives"
    assert cache.lookup(p64(1), p64(1)) is None, "least recently used went first"
    assert cache.lookup(p64(29), p64(1)) is not None
    # Over the limit whatever the checks left (they stop at or below 90%).
    cache.fetch(p64(30), p64(1), writer(data * 5))
    cache.close()
    cache.evict()
    assert cached_bytes(cache) <= 90_000, "down to 90% of the limit"


def test_files_of_an_older_cache_layout_are_ignored(tmp_path):
    (tmp_path / "1a").mkdir()
    (tmp_path / "1a" / "3f.blob").write_bytes(b"1.x layout: oid_hex/tid_hex.blob")
    cache = BlobCache(str(tmp_path), 1_000)
    cache.fetch(p64(0x1A), p64(1), writer(b"ours"))
    assert [path for path, _st in cache.files()] == [cache.path(p64(0x1A), p64(1))]
    cache.evict(target=0)
    assert (tmp_path / "1a" / "3f.blob").exists()


def test_installs_survive_eviction_removing_their_directories(tmp_path):
    """Eviction removes directories it empties; a download installing into
    the same directory at that moment must recreate it, not fail."""
    cache = BlobCache(str(tmp_path), 1 << 30)
    stop = threading.Event()
    errors = []

    def evict_everything():
        while not stop.is_set():
            cache.evict(target=0)

    def fetch(worker):
        try:
            for n in range(300):
                # One bucket directory (oid % 256 == 7) for every blob.
                oid = p64(7 + 256 * (n % 3))
                cache.fetch(oid, p64(worker * 1000 + n), writer(b"x"))
        except Exception:  # reported below, with where it happened
            errors.append(traceback.format_exc())

    evictor = threading.Thread(target=evict_everything)
    evictor.start()
    fetchers = [threading.Thread(target=fetch, args=(w,)) for w in range(3)]
    for t in fetchers:
        t.start()
    for t in fetchers:
        t.join()
    stop.set()
    evictor.join()
    assert errors == []


def test_eviction_removes_empty_directories(tmp_path):
    """min_age 0: the file is evicted at once."""
    cache = BlobCache(str(tmp_path), 1_000_000, min_age=0)
    cache.fetch(p64(0x1234), p64(1), writer(b"x"))
    cache.evict(target=0)
    assert sorted(os.listdir(tmp_path)) == ["locks", "tmp"]


def test_reads_under_eviction_never_see_a_missing_or_partial_file(
    make_storage, tmp_path
):
    """cache_min_age 0: eviction races the readers as it would files older than
    a minute (files used within it are kept)."""
    storage = make_storage(cache_size=60_000, cache_min_age=0)
    db = ZODB.DB(storage)
    payloads = {f"b{i}": os.urandom(15_000 + i) for i in range(16)}
    refs = commit_blobs(db, payloads)
    errors = []

    def reader(seed):
        rnd = random.Random(seed)
        try:
            for _ in range(40):
                name = rnd.choice(list(refs))
                with storage.openCommittedBlobFile(*refs[name]) as f:
                    assert f.read() == payloads[name]
        except Exception:  # reported below, with where it happened
            errors.append(traceback.format_exc())

    threads = [threading.Thread(target=reader, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    storage._cache.close()
    assert errors == []
    assert len(list(storage._cache.files())) < 16, "eviction did run"
    db.close()


CHILD = textwrap.dedent(
    """
    import hashlib, json, random, sys
    from ZODB.MappingStorage import MappingStorage
    from zodb_s3blobs import S3BlobStorage, S3Settings
    job = json.loads(sys.argv[1])
    storage = S3BlobStorage(MappingStorage(), S3Settings(**job["settings"]),
                            cache_dir=job["cache_dir"], cache_size=job["cache_size"])
    rnd = random.Random(job["seed"])
    blobs = job["blobs"]
    for _ in range(job["rounds"]):
        oid, tid, digest = rnd.choice(blobs)
        with storage.openCommittedBlobFile(bytes.fromhex(oid), bytes.fromhex(tid)) as f:
            assert hashlib.sha256(f.read()).hexdigest() == digest, (oid, tid)
    storage._cache.close()
    storage.close()
    print("ok")
    """
)


def test_two_processes_share_one_cache_dir(make_storage, tmp_path):
    storage = make_storage()
    db = ZODB.DB(storage)
    payloads = {f"b{i}": os.urandom(20_000 + 7 * i) for i in range(12)}
    refs = commit_blobs(db, payloads)
    db.close()
    shared = tmp_path / "shared-cache"
    job = {
        "settings": asdict(storage._store.settings),
        "cache_dir": str(shared),
        "cache_size": 100_000,  # about five of the twelve blobs: evicts often
        "rounds": 60,
        "blobs": [
            (oid.hex(), tid.hex(), hashlib.sha256(payloads[name]).hexdigest())
            for name, (oid, tid) in refs.items()
        ],
    }
    children = [
        subprocess.Popen(
            [sys.executable, "-c", CHILD, json.dumps({**job, "seed": seed})],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for seed in (1, 2)
    ]
    for child in children:
        out, err = child.communicate(timeout=300)
        assert child.returncode == 0, err
        assert out.strip() == "ok"
    cache = BlobCache(str(shared), 100_000)
    assert os.listdir(cache.temp_dir) == [], "no temp files left behind"
    sizes = {len(data) for data in payloads.values()}
    for _path, st in cache.files():
        assert st.st_size in sizes, "only complete files"
        assert stat.S_IMODE(st.st_mode) == 0o400


def test_the_index_survives_a_restart_and_checks_use_it_not_a_walk(
    tmp_path, monkeypatch
):
    """The directory's index is kept across restarts: a process opening the
    cache of a previous run, and its eviction checks, walk nothing. Fails
    before the fix: each process built an index of its own by a walk at open
    (and after each cache-size of loads). min_age 0: the files are all new."""
    earlier = BlobCache(str(tmp_path), 1 << 30)  # e.g. a previous run
    for oid in range(40):
        earlier.fetch(p64(oid), p64(1), writer(b"x" * 2_000))
    walks = []
    real_walk = BlobCache._walk
    monkeypatch.setattr(
        BlobCache, "_walk", lambda self: walks.append(1) or real_walk(self)
    )
    earlier.close()
    cache = BlobCache(str(tmp_path), 100_000, min_age=0)
    cache.evict()
    assert cache.recorded_bytes() == 80_000
    assert walks == [], "the index of the previous run is used"
    for oid in range(40, 50):
        cache.fetch(p64(oid), p64(1), writer(b"x" * 3_000))
        cache.close()  # let each check it starts finish
    cache.evict()
    assert walks == [], "checks use the index"
    assert cached_bytes(cache) <= 100_000
    assert cache.lookup(p64(49), p64(1)) is not None
    assert cache.lookup(p64(0), p64(1)) is None, "least recently used went"


def test_the_index_counts_other_processes_files_at_once(tmp_path):
    """min_age 0: the files are all new."""
    mine = BlobCache(str(tmp_path), 50_000, min_age=0)
    mine.close()  # its index is built, from an empty directory
    other = BlobCache(str(tmp_path), 1 << 30)  # another process, never evicting
    for oid in range(2, 10):
        other.fetch(p64(oid), p64(1), writer(b"o" * 10_000))
    # The index both share counts those files: mine's installs start checks.
    for oid in range(10, 15):
        mine.fetch(p64(oid), p64(1), writer(b"m" * 10_000))
        mine.close()
    mine.evict()
    assert cached_bytes(mine) <= 45_000


def test_files_installed_while_the_index_is_rebuilt_are_counted(tmp_path, monkeypatch):
    """An index missing (an earlier version's cache) is rebuilt by a walk; a
    file installed during the walk is counted all the same. min_age 0: both
    files are new, and the check must be free to evict."""
    earlier = BlobCache(str(tmp_path), 1 << 30)  # e.g. a previous run
    earlier.fetch(p64(1), p64(1), writer(b"x" * 10_000))
    earlier.close()
    os.remove(tmp_path / "locks" / "index.sqlite")
    real_walk = BlobCache._walk

    def walk_while_another_thread_installs(self):
        yield from real_walk(self)
        # Installed after the walk passed its directory: the walk misses it.
        self.fetch(p64(2), p64(1), writer(b"y" * 95_000))

    monkeypatch.setattr(BlobCache, "_walk", walk_while_another_thread_installs)
    cache = BlobCache(str(tmp_path), 100_000, min_age=0)
    cache.close()  # the index built at open; the install above lands during it
    monkeypatch.setattr(BlobCache, "_walk", real_walk)
    cache.evict()
    assert cached_bytes(cache) <= 90_000, "the file installed mid-walk was counted"


def test_a_file_whose_size_changed_is_not_served(make_storage):
    storage = make_storage()
    db = ZODB.DB(storage)
    oid, tid = commit_blobs(db, {"b": b"the whole content"})["b"]
    path = storage.loadBlob(oid, tid)
    storage._cache.close()  # the index is built
    os.chmod(path, 0o600)
    with open(path, "r+b") as f:  # damaged behind the cache's back
        f.truncate(3)
    with open(storage.loadBlob(oid, tid), "rb") as f:
        assert f.read() == b"the whole content", "downloaded again"
    db.close()


def test_temp_files_abandoned_by_a_killed_process_are_removed(tmp_path):
    cache = BlobCache(str(tmp_path), 1_000)
    old = cache.new_temp_file("download-")
    recent = cache.new_temp_file("staged-")
    day_ago = time.time() - 25 * 3600
    os.utime(old, (day_ago, day_ago))
    BlobCache(str(tmp_path), 1_000)  # the next process to open the cache
    assert not os.path.exists(old)
    assert os.path.exists(recent), "may belong to a transaction still voting"


def test_eviction_leaves_files_used_within_the_minimum_age(tmp_path, monkeypatch):
    """With the defaults, a file used within MIN_AGE seconds is never evicted
    (its path may just have been handed out); once a minute has passed, files
    are evicted least recently used first."""
    cache = BlobCache(str(tmp_path), 25_000)
    for oid in range(5):
        cache.fetch(p64(oid), p64(1), writer(b"x" * 10_000))
    cache.close()  # let the checks the fetches started finish
    assert len(list(cache.files())) == 5, "all were used just now"
    later = time.time() + MIN_AGE + 10
    monkeypatch.setattr(time, "time", lambda: later)  # a minute passes
    for oid in (3, 4):
        cache.lookup(p64(oid), p64(1))  # used again
    cache.evict(target=0)
    left = sorted(path for path, _st in cache.files())
    assert left == sorted(cache.path(p64(oid), p64(1)) for oid in (3, 4))
