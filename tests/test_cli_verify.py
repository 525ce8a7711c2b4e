"""``zodb-s3blobs verify``, run as a user would: a database whose blobs were
committed through S3BlobStorage (FileStorage base), one migrated from
RelStorage (SQLite), and the same through a zope.conf with --db."""

from __future__ import annotations

import os
import time

import pytest

import clitools
import s3env
from clitools import run, run_json
from zodb_s3blobs.keys import hex_id

pytestmark = pytest.mark.s3_servers("moto", "rgw")

SIZES = [10, 2000, 30000]


@pytest.fixture
def database(tmp_path):
    """CONFIG of a FileStorage-based S3BlobStorage holding SIZES blobs, the
    first one updated once; and every revision's bytes."""
    config = clitools.write_config(tmp_path, clitools.filestorage(tmp_path / "Data.fs"))
    revisions = clitools.commit_blobs(clitools.open_storage(config), SIZES, 1)
    return config, revisions


def delete(key: str) -> None:
    s3env.server().client().delete_object(Bucket=s3env.BUCKET, Key=key)


def test_all_present(database):
    config, revisions = database
    result = run("verify", config)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    assert result.stdout.splitlines()[-1] == "OK"
    code, report = run_json("verify", config, "--all-revisions")
    assert code == 0
    assert report["revisions"] == report["present"] == len(revisions)
    assert report["missing"] == []


def test_a_deleted_object_is_listed(database):
    config, revisions = database
    oid, tid = max(clitools.current(revisions))
    key = clitools.layout(config).key(oid, tid)
    delete(key)

    result = run("verify", config)
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        f"zodb-s3blobs: 1 of {len(SIZES)} blob revisions have no object in "
        f"s3://{s3env.BUCKET}/ (first: {key})"
    ]
    lines = result.stdout.splitlines()
    missing = lines[lines.index("Missing from S3:") + 2]
    assert missing.split() == [hex_id(oid), hex_id(tid), key]
    assert lines[-1] == "PROBLEMS FOUND"

    code, report = run_json("verify", config)
    assert code == 1
    assert report["missing"] == [{"oid": hex_id(oid), "tid": hex_id(tid), "key": key}]


def test_history_is_checked_with_all_revisions(database):
    config, revisions = database
    old = min(revisions)  # the first blob's revision before its update
    assert old not in clitools.current(revisions)
    key = clitools.layout(config).key(*old)
    delete(key)

    assert run("verify", config).returncode == 0  # current revisions are there
    code, report = run_json("verify", config, "--all-revisions")
    assert code == 1
    assert report["revisions_checked"] == "all"
    assert [entry["key"] for entry in report["missing"]] == [key]


def test_sizes_are_compared_with_the_cache(database):
    config, revisions = database
    oid, tid = max(clitools.current(revisions))
    key = clitools.layout(config).key(oid, tid)
    s3env.server().client().put_object(Bucket=s3env.BUCKET, Key=key, Body=b"x")

    assert run("verify", config).returncode == 0  # the object is there
    code, report = run_json("verify", config, "--sizes")
    assert code == 1
    sizes = report["sizes"]
    assert sizes["compared_with"].startswith("cache-dir ")
    assert sizes["compared"] == len(SIZES)  # commits leave their blobs cached
    assert sizes["differing"] == [
        {
            "oid": hex_id(oid),
            "tid": hex_id(tid),
            "key": key,
            "s3_size": 1,
            "local_size": len(revisions[oid, tid]),
        }
    ]


def zope_conf(tmp_path, config) -> str:
    """A zope.conf with CONFIG's storage as <zodb_db main> and a second
    database, as Zope's own skeleton has."""
    instance = tmp_path / "instance"
    instance.mkdir()
    section = config.read_text().replace("%import zodb_s3blobs", "")
    path = tmp_path / "zope.conf"
    path.write_text(
        f"%define INSTANCE {instance}\n"
        "instancehome $INSTANCE\n"
        "%import zodb_s3blobs\n"
        f"<zodb_db main>\n  mount-point /\n{section}\n</zodb_db>\n"
        "<zodb_db temporary>\n  mount-point /temp_folder\n"
        "  <mappingstorage>\n  </mappingstorage>\n</zodb_db>\n"
    )
    return path


def test_a_zope_conf_with_db(tmp_path, database):
    config, revisions = database
    path = zope_conf(tmp_path, config)
    code, report = run_json("verify", path, "--db", "main")
    assert code == 0
    assert report["present"] == len(SIZES)

    result = run("verify", path)
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        f"zodb-s3blobs: error: {path} has several <zodb_db> sections: choose one "
        "with --db NAME (main, temporary)"
    ]
    result = run("verify", path, "--db", "temporary")
    assert result.returncode == 2
    assert "is a <mappingstorage> section, not <s3blobstorage>" in result.stderr
    result = run("verify", config, "--db", "main")
    assert result.returncode == 2
    assert f"--db main: {config} has no <zodb_db> sections" in result.stderr
    code, report = run_json("verify", path, "--db", "catalog")
    assert code == 2
    assert report == {
        "command": "verify",
        "ok": False,
        "error": f"--db catalog: {path} has no <zodb_db catalog> (it has main, "
        "temporary)",
    }


def test_a_relstorage_base_after_migrating_its_blob_chunks(tmp_path):
    adapter = clitools.sqlite3(tmp_path / "rs")
    revisions = clitools.relstorage_with_blob_chunks(tmp_path, SIZES, adapter)
    config = clitools.write_config(tmp_path, clitools.relstorage(adapter))
    assert run("migrate", config, "--from-relstorage").returncode == 0

    code, report = run_json("verify", config, "--all-revisions", "--from-relstorage")
    assert code == 0
    assert report["present"] == len(revisions)
    assert report["sizes"]["compared"] == len(revisions)
    assert report["sizes"]["differing"] == []

    oid, tid = max(clitools.current(revisions))
    delete(clitools.layout(config).key(oid, tid))
    code, report = run_json("verify", config)
    assert code == 1
    assert [(m["oid"], m["tid"]) for m in report["missing"]] == [
        (hex_id(oid), hex_id(tid))
    ]


def test_verify_sizes_leaves_the_cache_alone(database, tmp_path):
    """verify --sizes only reads cache-dir: no BlobCache is opened, so an
    abandoned download stays for the storage's own clean-up.

    Fails before the fix: the BlobCache opened removed the old file (and
    started an eviction check)."""
    config, revisions = database
    old = tmp_path / "cache" / "tmp" / "download-abandoned"
    old.write_bytes(b"x")
    os.utime(old, (time.time() - 3 * 86400,) * 2)
    code, report = run_json("verify", config, "--sizes")
    assert code == 0, report
    assert report["sizes"]["compared"] == len(clitools.current(revisions))
    assert old.exists()


def test_verify_shows_progress_on_a_terminal(database):
    """Fails before the fix: verify was silent until it had read everything."""
    config, _revisions = database
    code, shown = clitools.run_on_terminal("verify", config, "--sizes")
    assert code == 0
    assert b"\rread base: " in shown
    assert b"\rcompare sizes: " in shown
