"""``zodb-s3blobs cache stats`` and ``cache prune``, run as a user would, on
a cache filled by real commits."""

from __future__ import annotations

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
    assert stats["hits"] is None and stats["misses"] is None

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
