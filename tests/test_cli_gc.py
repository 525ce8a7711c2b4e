"""``zodb-s3blobs gc``, run as a user would: orphans are listed (dry run) or
deleted; objects revisions need, foreign keys and keys of transactions newer
than the last commit are left alone."""

from __future__ import annotations

import fcntl
import os
import pwd
import shutil
from pathlib import Path

import pytest
from ZODB.utils import p64, u64

import clitools
import s3env
from clitools import run, run_json
from zodb_s3blobs.journal import JOURNAL_DIR, Journal, PendingCopy

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
    listed = lines[lines.index("Would delete:") + 1 :]
    assert listed[: listed.index("")] == [f"  {keys['orphan'][0]}"]
    assert clitools.s3_objects(config) == before


def test_gc_deletes_orphans_and_leaves_foreign_keys_alone(bucket):
    config, keys = bucket
    code, report = run_json("gc", config, *AT_ONCE)
    assert code == 0
    assert report["orphans"] == len(keys["orphan"])
    assert report["orphan_bytes"] == 5
    assert report["deleted"] == 1
    assert report["foreign"] == 2
    assert report["in_flight"] == 1
    assert report["kept"] == len(keys["needed"])
    left = set(clitools.s3_objects(config))
    assert left == set(keys["needed"] + keys["foreign"] + keys["in flight"])

    code, again = run_json("gc", config, *AT_ONCE)
    assert code == 0
    assert again["orphans"] == 0


def test_gc_says_where_the_list_is_and_lists_with_list(bucket):
    """Without --list the summary says where the deleted keys are; with
    --list it lists them.

    Fails before the fix: only a dry run listed keys, and the summary did
    not say where to find those deleted."""
    config, keys = bucket
    # --retention 0: the orphans are deleted by this run (the default keeps
    # them for a week: test_gc_keeps_orphans_for_the_configured_retention).
    result = run("gc", config, "--retention", "0")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-1] == (
        "The keys deleted: run with --list to list them."
    )
    orphan = clitools.layout(config).key(p64(0x997), p64(1))
    s3env.server().client().put_object(Bucket=s3env.BUCKET, Key=orphan, Body=b"1")
    result = run("gc", config, "--list", "--retention", "0")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    listed = lines[lines.index("Deleted:") + 1 :]
    assert listed[: listed.index("")] == [f"  {orphan}"]
    assert orphan not in clitools.s3_objects(config)


def test_gc_keeps_orphans_for_the_configured_retention(bucket):
    """The default gc-retention (7d): the orphan is pending, recorded, kept."""
    config, keys = bucket
    code, report = run_json("gc", config)
    assert code == 0
    assert report["retention"] == 7 * 24 * 3600
    assert (report["orphans"], report["deleted"]) == (0, 0)
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


def test_gc_keeps_and_reports_the_copies_owed_by_journals_in_cache_dir(
    bucket, tmp_path
):
    """A ZEO client killed before its copies were made left a journal in
    cache-dir/locks/: gc counts its copies, keeps their staging objects and
    leaves the journal as it was, unlocked (gc never completes it).

    Fails before the fix: gc read no journal and said nothing of it."""
    config, _keys = bucket
    layout = clitools.layout(config)
    staged, client = layout.staging_key(), s3env.server().client()
    client.put_object(Bucket=s3env.BUCKET, Key=staged, Body=b"1")
    locks = tmp_path / "cache" / JOURNAL_DIR
    copies = [PendingCopy(staged, p64(7), None, True)]
    copies.append(PendingCopy(layout.key(p64(7), p64(1)), p64(8), None, False))
    destination = f"s3://{s3env.BUCKET}/{layout.root}"
    journal = Journal.create(str(locks), copies, p64(1), "marker", destination)
    journal.release()  # as a SIGKILL leaves it
    written = Path(journal.path).read_bytes()
    result = run("gc", config)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[2] == (
        f"2 copies owed by journals in {locks}/ (completed when a storage "
        "opens there); the objects they copy from are kept"
    )
    code, report = run_json("gc", config)
    assert code == 0
    assert (report["owed_copies"], report["owed_journals"]) == (2, 1)
    client.head_object(Bucket=s3env.BUCKET, Key=staged)  # still there
    assert Path(journal.path).read_bytes() == written
    fd = os.open(journal.path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # nobody holds it
    finally:
        os.close(fd)


def test_gc_refuses_to_run_without_reading_the_journals(bucket, tmp_path):
    """A cache-dir/locks/ that is not a directory (here a symbolic link)
    cannot be read safely: gc fails naming it, rather than collect staging
    objects that its journals may owe.

    Fails before the fix: gc read no journal and collected as if none."""
    config, _keys = bucket
    locks = tmp_path / "cache" / JOURNAL_DIR
    locks.rename(tmp_path / "elsewhere")
    locks.symlink_to(tmp_path / "elsewhere")
    result = run("gc", config, "--dry-run")
    assert result.returncode == 1
    assert result.stderr.startswith(
        f"zodb-s3blobs: error: cannot read the pending-copy journals in {locks} ("
    )
    assert "run gc as the owner of cache-dir" in result.stderr
