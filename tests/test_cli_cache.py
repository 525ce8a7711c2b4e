"""``zodb-s3blobs cache stats`` and ``cache prune``, run as a user would, on
a cache filled by real commits."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time

import pytest

import clitools
from clitools import run, run_json

SIZES = [1000, 2000, 4000]


@pytest.fixture
def config(tmp_path):
    return clitools.write_config(tmp_path, clitools.filestorage(tmp_path / "Data.fs"))


def test_stats_of_a_cache_not_created_yet(config, tmp_path):
    code, stats = run_json("cache", "stats", config)
    assert code == 0
    assert stats["command"] == "cache stats"
    assert stats["exists"] is False
    assert stats["files"] == 0
    assert not (tmp_path / "cache").exists()  # looking does not create it


def test_stats_then_prune(config, tmp_path):
    clitools.commit_blobs(clitools.open_storage(config), SIZES)

    result = run("cache", "stats", config)
    assert result.returncode == 0, result.stderr
    rows = dict(line.split(None, 1) for line in result.stdout.splitlines()[1:3])
    assert rows == {"blob": "files     3", "bytes": "6.8 KiB (0% of cache-size)"}
    code, stats = run_json("cache", "stats", config)
    assert code == 0
    assert stats["cache_dir"] == str(tmp_path / "cache")
    assert (stats["files"], stats["bytes"]) == (len(SIZES), sum(SIZES))
    assert stats["oldest_access"] <= stats["newest_access"]
    assert stats["hits"] is None and stats["misses"] is None  # no metrics-file

    # With the default --min-age, files used within the last minute stay: a
    # running Zope may just have handed out their paths.
    result = run("cache", "prune", config, "--to", "5000")
    assert result.returncode == 1
    assert "used within the last 60 seconds are kept (--min-age)" in result.stderr
    code, pruned = run_json("cache", "prune", config, "--to", "5000")
    assert pruned["removed"] == {"files": 0, "bytes": 0}

    # --min-age 0 (no process uses this cache): least recently used first.
    code, pruned = run_json("cache", "prune", config, "--to", "5000", "--min-age", "0")
    assert code == 0
    assert pruned["removed"] == {"files": 2, "bytes": 3000}  # least recently used
    assert pruned["remaining"] == {"files": 1, "bytes": 4000}

    result = run("cache", "prune", config)  # below cache-size: nothing to do
    assert result.returncode == 0
    assert result.stdout.startswith(
        f"Pruned {tmp_path / 'cache'}: removed 0 files (0 B); 1 files"
    )
    code, pruned = run_json("cache", "prune", config, "--to", "0", "--min-age", "0")
    assert pruned["remaining"] == {"files": 0, "bytes": 0}


def test_a_bad_min_age_is_bad_usage(config):
    result = run("cache", "prune", config, "--min-age", "-1")
    assert result.returncode == 2
    assert "--min-age: '-1' is not a number of seconds" in result.stderr


def test_a_bad_size_is_bad_usage(config):
    result = run("cache", "prune", config, "--to", "lots")
    assert result.returncode == 2
    assert "--to: 'lots' is not a size" in result.stderr


def test_stats_is_a_read_only_walk(config, tmp_path):
    """cache stats changes nothing: an abandoned download in tmp/ stays (for
    the storage's own clean-up), no locks/ is created, no file touched.

    Fails before the fix: stats opened a BlobCache, which removed the old
    temporary file, created locks/ and started an eviction check."""
    clitools.commit_blobs(clitools.open_storage(config), SIZES)
    cache = tmp_path / "cache"
    shutil.rmtree(cache / "locks")
    old = cache / "tmp" / "download-abandoned"
    old.write_bytes(b"x" * 10)
    os.utime(old, (time.time() - 3 * 86400,) * 2)
    before = {p: p.stat().st_mtime for p in cache.rglob("*")}
    code, stats = run_json("cache", "stats", config)
    assert code == 0
    assert (stats["files"], stats["bytes"]) == (len(SIZES), sum(SIZES))
    assert (stats["tmp_files"], stats["tmp_bytes"]) == (1, 10)
    assert {p: p.stat().st_mtime for p in cache.rglob("*")} == before


def test_prune_reports_the_bytes_it_removed(config, tmp_path):
    """prune --to SIZE on a cache over cache-size removes least recently used
    files down to SIZE, not further, and reports the files and bytes that
    went.

    Fails before the fix: the eviction check the cache starts when opened
    also evicted, down to 90% of cache-size, and its bytes were not counted:
    the report said 0 or 3000 bytes for the 3 files removed."""
    text = config.read_text()
    config.write_text(
        text.replace("</s3blobstorage>", "  cache-size 3000\n</s3blobstorage>")
    )
    clitools.commit_blobs(clitools.open_storage(config), SIZES)
    code, pruned = run_json("cache", "prune", config, "--to", "5000", "--min-age", "0")
    assert code == 0
    assert pruned["removed"] == {"files": 2, "bytes": 3000}
    assert pruned["remaining"] == {"files": 1, "bytes": 4000}


#: A process using the cache: opens CONFIG's storage, reads the revisions
#: given (oid and tid in hex), says "ready" and waits for a line to close.
READER = """
import sys, ZODB.config
storage = ZODB.config.storageFromFile(open(sys.argv[1]))
for ref in sys.argv[2:]:
    oid, tid = (bytes.fromhex(part) for part in ref.split(":"))
    storage.loadBlob(oid, tid)
print("ready", flush=True)
sys.stdin.readline()
storage.close()
"""


def start_reader(config, *refs: str) -> subprocess.Popen:
    """A process running READER on CONFIG and *refs*."""
    return subprocess.Popen(
        [sys.executable, "-c", READER, str(config), *refs],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )


def wait_for_counts(config, hits: int, misses: int) -> dict:
    """``cache stats --json`` once the processes' files count *hits* and
    *misses* (they are written every 0.1 seconds)."""
    deadline = time.monotonic() + 20
    while True:
        code, stats = run_json("cache", "stats", config)
        assert code == 0
        if (stats["hits"], stats["misses"]) == (hits, misses):
            return stats
        assert time.monotonic() < deadline, stats
        time.sleep(0.1)


def test_stats_sums_the_counters_of_the_processes_using_the_cache(tmp_path):
    """Two OS processes read through one cache-dir, each writing its metrics
    file (every 0.1 seconds: metrics-interval, so that the counts show while
    the processes run; with the default 15 s a process writes its figures
    at the latest when it closes, see tests/test_exposition.py);
    cache stats sums their hits, misses and bytes, and leaves out the files
    of processes that have stopped."""
    metrics = tmp_path / "metrics"
    metrics.mkdir()
    base = "<mappingstorage>\n</mappingstorage>"
    config = clitools.write_config(
        tmp_path,
        base,
        extra=f"metrics-file {metrics}/zodb-{{pid}}.prom\n  metrics-interval 0.1",
    )
    (tmp_path / "writer").mkdir()
    writer = clitools.write_config(
        tmp_path / "writer", base, prefix=clitools.prefix_of(config)
    )
    revisions = clitools.commit_blobs(clitools.open_storage(writer), [1000, 3000])
    first, second = (f"{oid.hex()}:{tid.hex()}" for oid, tid in revisions)
    children = []
    try:
        for refs in ([first, first], [first, second]):
            child = start_reader(config, *refs)
            children.append(child)
            assert child.stdout.readline() == "ready\n"
        stats = wait_for_counts(config, hits=2, misses=2)
        assert stats["hit_ratio"] == 0.5
        assert stats["hit_bytes"] == 2000
        assert stats["download_bytes"] == 4000
        assert stats["evictions"] == 0
        assert sorted(p["pid"] for p in stats["processes"]) == sorted(
            c.pid for c in children
        )
        result = run("cache", "stats", config)
        assert "2 / 2 (50.0% hits)" in result.stdout
    finally:
        for child in children:
            child.communicate("close\n", timeout=60)
    assert len(list(metrics.iterdir())) == 2, "a last write at close"
    code, stats = run_json("cache", "stats", config)
    assert (stats["processes"], stats["stopped_processes"]) == ([], 2)
    assert (stats["hits"], stats["misses"]) == (0, 0)


def test_stats_skips_a_metrics_file_whose_counts_are_not_numbers(tmp_path):
    """A file forged (or damaged) with +Inf for a counter is left out of the
    sum, with a note on stderr and in --json."""
    metrics = tmp_path / "metrics"
    metrics.mkdir()
    config = clitools.write_config(
        tmp_path,
        clitools.filestorage(tmp_path / "Data.fs"),
        extra=f"metrics-file {metrics}/zodb-{{pid}}.prom",
    )
    pid = os.getpid()  # running: its file counts
    labels = f'database="main",host="{socket.gethostname()}",pid="{pid}"'
    forged = metrics / f"zodb-{pid}.prom"
    forged.write_text(
        "# TYPE zodb_s3blobs_info gauge\n"
        f'zodb_s3blobs_info{{{labels},cache_dir="{tmp_path / "cache"}"}} 1.0\n'
        "# TYPE zodb_s3blobs_cache_hits_total counter\n"
        f"zodb_s3blobs_cache_hits_total{{{labels}}} +Inf\n"
    )
    note = f"{forged}: cache_hits is inf, not a count"
    code, stats = run_json("cache", "stats", config)
    assert code == 0
    assert (stats["hits"], stats["processes"]) == (0, [])
    assert stats["skipped_files"] == [note]
    result = run("cache", "stats", config)
    assert result.returncode == 0
    assert result.stderr == f"zodb-s3blobs: metrics file skipped: {note}\n"


def test_stats_without_metrics_file_reports_the_counters_unknown(config):
    code, stats = run_json("cache", "stats", config)
    assert code == 0
    assert stats["hits"] is None and stats["processes"] is None
    assert "set metrics-file" in run("cache", "stats", config).stdout


def metrics_config(tmp_path):
    """CONFIG of a MappingStorage whose processes write their metrics files,
    at the default metrics-interval, in ``tmp_path/metrics``."""
    metrics = tmp_path / "metrics"
    metrics.mkdir()
    return clitools.write_config(
        tmp_path,
        "<mappingstorage>\n</mappingstorage>",
        extra=f"metrics-file {metrics}/zodb-{{pid}}.prom",
    )


def test_stats_shows_a_process_as_soon_as_its_storage_opened(tmp_path):
    """A process is seen from its start, with the default metrics-interval
    (15 s). Failed before the fix: the first write came one interval after
    the open, so stats right after a restart showed no process."""
    config = metrics_config(tmp_path)
    child = start_reader(config)
    try:
        assert child.stdout.readline() == "ready\n"
        code, stats = run_json("cache", "stats", config)
        result = run("cache", "stats", config)
    finally:
        child.communicate("close\n", timeout=60)
    assert code == 0
    assert [p["pid"] for p in stats["processes"]] == [child.pid]
    assert "1 running" in result.stdout


def test_stats_says_when_no_process_runs_and_what_it_ignored(tmp_path):
    """Without a running process, the plain output says so and counts the
    files of processes that stopped. Failed before the fix: it said
    "processes 0", and only --json told of the stopped ones."""
    config = metrics_config(tmp_path)
    children = [start_reader(config) for _ in range(2)]
    for child in children:  # both open, so neither sweeps the other's file
        assert child.stdout.readline() == "ready\n"
    for child in children:
        child.communicate("close\n", timeout=60)
    result = run("cache", "stats", config)
    assert result.returncode == 0
    [row] = [line for line in result.stdout.splitlines() if "processes" in line]
    assert row.split(None, 1)[1] == (
        "none running (ignored: 2 files of processes that stopped)"
    )
