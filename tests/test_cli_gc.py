"""``zodb-s3blobs gc``, run as a user would: orphans are listed (dry run) or
deleted; objects revisions need, foreign keys and keys of transactions newer
than the last commit are left alone."""

from __future__ import annotations

import os
import pwd
import shutil

import pytest
from ZODB.utils import p64, u64

import clitools
import s3env
from clitools import run, run_json

pytestmark = pytest.mark.s3_servers("moto", "rgw")


@pytest.fixture
def bucket(tmp_path):
    """CONFIG of a FileStorage-based S3BlobStorage with two blobs (one
    updated: its old revision is history the base keeps), plus an orphan, two
    foreign keys and an in-flight key put beside them; returns CONFIG and
    {role: keys}."""
    config = clitools.write_config(tmp_path, clitools.filestorage(tmp_path / "Data.fs"))
    revisions = clitools.commit_blobs(clitools.open_storage(config), [100, 200], 1)
    layout = clitools.layout(config)
    last = max(tid for _oid, tid in revisions)
    keys = {
        "needed": [layout.key(oid, tid) for oid, tid in revisions],
        "orphan": [layout.key(p64(0x999), last)],  # no such revision
        "foreign": [
            f"{layout.root}0999/{u64(last):x}.blob",  # a leading zero
            f"{layout.root}README.txt",
        ],
        "in flight": [layout.key(p64(0x998), p64(u64(last) + 1))],
    }
    client = s3env.server().client()
    for role in ("orphan", "foreign", "in flight"):
        for key in keys[role]:
            client.put_object(Bucket=s3env.BUCKET, Key=key, Body=b"12345")
    return config, keys


#: Orphans due at once, as before gc-retention existed: the tests of what is
#: deleted (the default retention's own: the tests after them).
AT_ONCE = ("--retention", "0")


def test_dry_run_lists_and_deletes_nothing(bucket):
    config, keys = bucket
    before = clitools.s3_objects(config)
    result = run("gc", config, "--dry-run", *AT_ONCE)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    lines = result.stdout.splitlines()
    assert lines[0].endswith("(dry run: nothing deleted)")
    assert lines[lines.index("Would delete:") + 1 :] == [f"  {keys['orphan'][0]}"]
    assert clitools.s3_objects(config) == before


def test_gc_deletes_orphans_and_leaves_foreign_keys_alone(bucket):
    config, keys = bucket
    code, report = run_json("gc", config, *AT_ONCE)
    assert code == 0
    assert report["orphans"] == keys["orphan"]
    assert report["orphan_bytes"] == 5
    assert report["deleted"] == 1
    assert report["foreign"] == 2
    assert report["in_flight"] == 1
    assert report["kept"] == len(keys["needed"])
    left = set(clitools.s3_objects(config))
    assert left == set(keys["needed"] + keys["foreign"] + keys["in flight"])

    code, again = run_json("gc", config, *AT_ONCE)
    assert code == 0
    assert again["orphans"] == []


def test_gc_keeps_orphans_for_the_configured_retention(bucket):
    """The default gc-retention (7d): the orphan is pending, recorded, kept."""
    config, keys = bucket
    code, report = run_json("gc", config)
    assert code == 0
    assert report["retention"] == 7 * 24 * 3600
    assert (report["orphans"], report["deleted"]) == ([], 0)
    assert (report["pending"], report["pending_bytes"]) == (1, 5)
    assert set(keys["orphan"]) <= set(clitools.s3_objects(config))
    result = run("gc", config)
    assert result.returncode == 0, result.stderr
    assert "Retention: 604800 s" in result.stdout
    assert "pending: orphaned for less than the retention (5 B, kept)" in (
        " ".join(result.stdout.split())
    )


def test_a_bad_retention_is_refused_naming_the_option(bucket):
    config, _keys = bucket
    result = run("gc", config, "--retention=-1d")
    assert result.returncode == 2
    assert "--retention: must be a time interval of 0 or more" in result.stderr


def test_gc_does_not_create_the_cache_dir(bucket, tmp_path):
    """gc run as root must not create a missing cache-dir (owned by root,
    Zope could not start); without one there are no cached copies to drop.

    Fails before the fix: both runs created cache-dir."""
    config, keys = bucket
    shutil.rmtree(tmp_path / "cache")
    result = run("gc", config, "--dry-run")
    assert result.returncode == 0, result.stderr
    assert not (tmp_path / "cache").exists()
    code, report = run_json("gc", config, *AT_ONCE)
    assert code == 0
    assert report["deleted"] == 1
    assert not (tmp_path / "cache").exists()


def test_gc_warns_when_the_cache_belongs_to_another_user(bucket, tmp_path):
    """Fails before the fix: no warning; the cache's lock files were
    created by the user running gc."""
    config, _keys = bucket
    cache = tmp_path / "cache"
    if os.geteuid() != 0:
        pytest.skip("needs root to give the cache to another user")
    nobody = pwd.getpwnam("nobody")
    for path in [cache, *cache.rglob("*")]:
        os.chown(path, nobody.pw_uid, nobody.pw_gid, follow_symlinks=False)
    result = run("gc", config, "--dry-run")
    assert result.returncode == 0
    assert result.stderr.splitlines() == [
        f"zodb-s3blobs: warning: cache-dir {cache} belongs to nobody, not to "
        "root running this command: run it as nobody (e.g. sudo -u nobody) if "
        "it must change the cache"
    ]
    owners = {path.stat().st_uid for path in [cache, *cache.rglob("*")]}
    assert owners == {nobody.pw_uid}


def test_gc_shows_progress_on_a_terminal(bucket):
    """Fails before the fix: gc was silent until it had checked every key."""
    config, _keys = bucket
    code, shown = clitools.run_on_terminal("gc", config, "--dry-run")
    assert code == 0
    assert b"\rcheck keys: " in shown
    assert b"keys/s]" in shown or b"s/keys]" in shown
