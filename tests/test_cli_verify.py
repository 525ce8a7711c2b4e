"""``zodb-s3blobs verify``, run as a user would: a database whose blobs were
committed through S3BlobStorage (FileStorage base), one migrated from
RelStorage (SQLite), and the same through a zope.conf with --db; the bytes
proved with --checksums, a run resumed from its state file, and whether a
read-through fallback can be removed."""

from __future__ import annotations

import json
import os
import time

import pytest

import clitools
import s3env
from clitools import run, run_json
from faultserver import Faults, Gate, faulty_s3
from s3hooks import calling, error_response
from test_downloads import PART, put_object, ranged_store
from test_parent_prefix import site_copy
from zodb_s3blobs.cli.checksums import Downloads, check_one
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
    code, shown = clitools.run_on_terminal("verify", config, "--checksums")
    assert code == 0
    assert b"\rverify checksums: " in shown


def test_verify_prints_progress_lines_when_not_on_a_terminal(database):
    """Piped, --progress-interval 0 prints a line per step (the default, 60
    seconds, prints none in a run this short).

    Fails before the fix: nothing was printed until the end."""
    config, _revisions = database
    result = clitools.run("verify", config, "--checksums", "--progress-interval", "0")
    assert result.returncode == 0, result.stderr
    lines = result.stderr.splitlines()
    assert any(line.startswith("zodb-s3blobs: read base: ") for line in lines)
    assert any(line.startswith("zodb-s3blobs: verify checksums: ") for line in lines)
    result = clitools.run("verify", config, "--checksums")
    assert result.stderr == ""


def other_bytes(data: bytes) -> bytes:
    """*data* with its first byte changed: the same size, another CRC32."""
    return bytes([data[0] ^ 0xFF]) + data[1:]


@pytest.fixture
def migrated_blob_dir(tmp_path):
    """A FileStorage's blob directory migrated to S3: CONFIG (without the blob
    directory), every revision's bytes, and the blob directory."""
    revisions, data_fs, blob_dir = clitools.filestorage_with_blob_dir(tmp_path, SIZES)
    config = clitools.write_config(tmp_path, clitools.filestorage(data_fs))
    assert run("migrate", config, "--from-blob-dir", blob_dir).returncode == 0
    return config, revisions, blob_dir


def test_a_wrong_upload_is_found_against_the_blob_dir(migrated_blob_dir):
    """An object whose bytes (and the CRC32 recorded with them) are not the
    blob file's: --checksums against the blob directory finds it; a download
    cannot (the object agrees with its own CRC32)."""
    config, revisions, blob_dir = migrated_blob_dir
    source = ("--from-blob-dir", blob_dir, "--all-revisions")
    code, report = run_json("verify", config, "--checksums", *source)
    assert code == 0, report
    checksums = report["checksums"]
    assert checksums["compared_with"].startswith(f"blob directory {blob_dir}")
    assert checksums["checked"] == checksums["matching"] == len(revisions)
    assert checksums["differing"] == checksums["unreadable"] == []

    (oid, tid), data = max(revisions.items())
    key = clitools.layout(config).key(oid, tid)
    wrong = other_bytes(data)
    clitools.s3_rewrite(key, wrong, clitools.crc32(wrong))

    code, report = run_json("verify", config, "--checksums", *source)
    assert code == 1
    assert report["ok"] is False
    assert report["checksums"]["matching"] == len(revisions) - 1
    assert report["checksums"]["differing"] == [
        {
            "oid": hex_id(oid),
            "tid": hex_id(tid),
            "key": key,
            "outcome": "mismatch",
            "s3_size": len(wrong),
            "s3_crc32": clitools.crc32(wrong),
            "local_size": len(data),
            "local_crc32": clitools.crc32(data),
        }
    ]
    result = run("verify", config, "--checksums", *source)
    assert result.returncode == 1
    assert (
        f"1 object(s) differ from blob directory {blob_dir}" in result.stderr
        and f"(first: {key}, CRC32 {clitools.crc32(wrong)} and {len(data)} bytes "
        f"in S3, {clitools.crc32(data)} and {len(data)} local)"
        in result.stderr
    ), result.stderr
    assert result.stdout.splitlines()[-1] == "PROBLEMS FOUND"
    assert run("verify", config, "--checksums", "--download").returncode == 0


def test_bytes_damaged_in_s3_are_found_by_download(database):
    """Bytes changed in S3 under the CRC32 recorded at upload (damage at rest,
    or a server answering other bytes): the recorded CRC32 still agrees with
    every copy; only --download, which reads the bytes, finds them."""
    config, revisions = database
    (oid, tid), data = max(clitools.current(revisions).items())
    key = clitools.layout(config).key(oid, tid)
    damaged = other_bytes(data)
    clitools.s3_rewrite(key, damaged, clitools.crc32(data))

    assert run("verify", config, "--checksums").returncode == 0  # the cache agrees
    code, report = run_json("verify", config, "--checksums", "--download")
    assert code == 1
    checksums = report["checksums"]
    assert checksums["compared_with"] == "a download of each object"
    assert checksums["matching"] == len(SIZES) - 1
    [entry] = checksums["differing"]
    assert entry["key"] == key
    assert (entry["s3_crc32"], entry["local_crc32"]) == (
        clitools.crc32(data),
        clitools.crc32(damaged),
    )
    assert entry["s3_size"] == entry["local_size"] == len(data)


def test_objects_of_1x_are_compared_by_size(database):
    """Objects written by zodb-s3blobs 1.x record no CRC32: compared by size,
    counted and listed apart, not a failure; a size that differs is one."""
    config, revisions = database
    newest = sorted(clitools.current(revisions).items())
    keys = [clitools.layout(config).key(oid, tid) for (oid, tid), _data in newest]
    clitools.s3_rewrite(keys[0], newest[0][1], None)  # the 1.x object
    clitools.s3_rewrite(keys[1], newest[1][1] + b"more", None)

    code, report = run_json("verify", config, "--checksums")
    assert code == 1
    checksums = report["checksums"]
    assert checksums["compared_by_size"] == {"count": 1, "keys": [keys[0]]}
    assert checksums["matching"] == len(SIZES) - 2
    [entry] = checksums["differing"]
    assert entry["key"] == keys[1]
    assert "s3_crc32" not in entry
    assert entry["s3_size"] == entry["local_size"] + len(b"more")
    # A download of a 1.x object can only be compared with its listed size.
    code, report = run_json("verify", config, "--checksums", "--download")
    assert code == 0
    assert report["checksums"]["compared_by_size"] == {"count": 2, "keys": keys[:2]}
    result = run("verify", config, "--checksums")
    row = "sizes matching (1.x, no checksum)"
    assert [line.split() for line in result.stdout.splitlines() if row in line] == [
        [*row.split(), "1"]
    ]


def state_lines(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_a_run_resumes_from_its_state_file(database, tmp_path):
    """With --state, a rerun skips the objects an earlier run verified: it does
    not see damage done to them since; a line torn by a crash is ignored and
    its object checked again; a state file of another reference is refused."""
    config, revisions = database
    state = tmp_path / "verify.state"
    args = ("verify", config, "--all-revisions", "--checksums", "--download")
    code, report = run_json(*args, "--state", state)
    assert code == 0
    assert report["checksums"]["checked"] == len(revisions)
    assert report["checksums"]["state"] == str(state)
    header, *checks = state_lines(state)
    assert header["compared_with"] == "a download of each object"
    assert {check["outcome"] for check in checks} == {"match"}
    assert len(checks) == len(revisions)

    last = checks[-1]["key"]
    oid, tid = clitools.layout(config).parse(last)
    clitools.s3_rewrite(last, other_bytes(revisions[oid, tid]), checks[-1]["s3_crc32"])
    code, report = run_json(*args, "--state", state)
    assert code == 0  # every object was verified before: none is checked
    assert report["checksums"]["checked"] == 0
    assert report["checksums"]["verified_earlier"] == len(revisions)
    assert run_json(*args)[0] == 1  # without the state file, the damage shows

    text = state.read_bytes()
    state.write_bytes(text[:-9])  # a crash while writing the last line
    code, report = run_json(*args, "--state", state)
    assert code == 1
    assert report["checksums"]["checked"] == 1
    assert report["checksums"]["verified_earlier"] == len(revisions) - 1
    assert [entry["key"] for entry in report["checksums"]["differing"]] == [last]
    assert state.read_bytes().startswith(text[:-9] + b"\n")  # the torn line ended
    assert json.loads(state.read_text().splitlines()[-1])["outcome"] == "mismatch"
    code, report = run_json(*args, "--state", state)
    assert (code, report["checksums"]["checked"]) == (1, 1)  # failed: checked again

    code, report = run_json("verify", config, "--checksums", "--state", state)
    assert code == 2
    assert report["error"].startswith(
        f"--state {state} records checks with compared_with 'a download of each "
        f"object', this run's is 'cache-dir {tmp_path / 'cache'}'"
    )


@pytest.mark.s3_servers("moto")  # the gate is the fault server's, over moto
def test_a_run_interrupted_with_ctrl_c_resumes(tmp_path):
    """Ctrl-C in the middle of a run: what it checked is in the state file,
    and the rerun checks only the rest. The server holds the downloads after
    the 20th until the command has been interrupted, so it cannot finish
    first; default settings throughout."""
    count = 300
    section = clitools.filestorage(tmp_path / "Data.fs")
    config = clitools.write_config(tmp_path, section)
    clitools.commit_blobs(clitools.open_storage(config), [1] * count)
    state = tmp_path / "verify.state"
    gate = Gate(
        after=20,
        applies=lambda method, path: method == "GET" and path.endswith(".blob"),
    )
    with faulty_s3(Faults(gate=gate)) as server:
        gated = tmp_path / "gated.conf"
        gated.write_text(
            config.read_text().replace(s3env.server().endpoint_url, server.endpoint_url)
        )
        code, err = clitools.interrupt(
            "verify", gated, "--checksums", "--download", "--state", state, gate=gate
        )
    assert code == 130, err
    done = len(state_lines(state)) - 1  # after the header line
    assert 0 < done < count

    args = ["verify", str(config), "--checksums", "--download", "--state", str(state)]
    code, report = run_json(*args)
    assert code == 0
    assert report["checksums"]["verified_earlier"] == done
    assert report["checksums"]["checked"] == count - done


@pytest.mark.s3_servers("moto")
def test_options_that_go_with_checksums(database, tmp_path):
    config, _revisions = database
    for args, error in [
        (["--download"], "--download goes with --checksums"),
        (["--state", tmp_path / "s"], "--state goes with --checksums"),
        (
            ["--checksums", "--download", "--from-relstorage"],
            "--download compares each object with its own recorded CRC32: leave "
            "out --from-blob-dir and --from-relstorage",
        ),
    ]:
        code, report = run_json("verify", config, *args)
        assert (code, report["error"]) == (2, error)


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_checksums_against_relstorage_blob_chunk(request, tmp_path, backend):
    if backend == "sqlite":
        adapter = clitools.sqlite3(tmp_path / "rs")
    else:  # each blob is one large object there
        dsn = request.getfixturevalue("postgresql").create_database()
        adapter = f"<postgresql>\n    dsn {dsn}\n  </postgresql>"
    revisions = clitools.relstorage_with_blob_chunks(tmp_path, SIZES, adapter)
    config = clitools.write_config(tmp_path, clitools.relstorage(adapter))
    assert run("migrate", config, "--from-relstorage").returncode == 0
    args = ("verify", config, "--all-revisions", "--checksums", "--from-relstorage")
    code, report = run_json(*args)
    assert code == 0, report
    assert report["checksums"]["compared_with"].startswith("RelStorage's blob_chunk")
    assert report["checksums"]["matching"] == len(revisions)

    (oid, tid), data = min(revisions.items())
    key = clitools.layout(config).key(oid, tid)
    clitools.s3_rewrite(key, other_bytes(data), clitools.crc32(other_bytes(data)))
    code, report = run_json(*args)
    assert code == 1
    [entry] = report["checksums"]["differing"]
    assert (entry["key"], entry["local_crc32"]) == (key, clitools.crc32(data))


def test_verify_says_when_the_fallback_blob_dir_can_go(tmp_path):
    """A history-preserving base: the fallback can go only once every
    revision, old ones too (--all-revisions), is in S3; --checksums compares
    with the fallback when no source is given."""
    revisions, data_fs, blob_dir = clitools.filestorage_with_blob_dir(tmp_path, SIZES)
    config = clitools.write_config(
        tmp_path, clitools.filestorage(data_fs), extra=f"fallback-blob-dir {blob_dir}"
    )
    code, report = run_json("verify", config, "--all-revisions")
    assert code == 1
    assert report["fallback_removable"] is False
    assert report["fallback"]["not_in_s3"] == len(revisions)
    result = run("verify", config, "--all-revisions")
    assert (
        f"The fallback (fallback-blob-dir {blob_dir}) is still needed: "
        f"{len(revisions)} blob revision(s) are not in S3 yet" in result.stdout
    )

    assert run("migrate", config, "--from-blob-dir", blob_dir).returncode == 0
    code, report = run_json("verify", config)
    assert code == 0
    assert report["fallback_removable"] is False  # older revisions not checked
    assert "--all-revisions" in report["fallback"]["reason"]

    code, report = run_json("verify", config, "--all-revisions", "--checksums")
    assert code == 0, report
    assert report["fallback_removable"] is True
    assert report["checksums"]["compared_with"].startswith(f"blob directory {blob_dir}")
    assert report["checksums"]["matching"] == len(revisions)
    result = run("verify", config, "--all-revisions")
    assert (
        "The fallback is no longer needed: every blob revision the base holds is "
        f"in S3. Remove fallback-blob-dir {blob_dir} from the <s3blobstorage> "
        f"section of {config}." in " ".join(result.stdout.split())
    )


def test_a_history_free_base_needs_no_all_revisions(tmp_path):
    """fallback-blob-chunk on a history-free RelStorage: it holds only current
    revisions, so verify alone tells that the fallback can go."""
    adapter = clitools.sqlite3(tmp_path / "rs")
    clitools.relstorage_with_blob_chunks(tmp_path, SIZES, adapter, keep_history=False)
    config = clitools.write_config(
        tmp_path,
        clitools.relstorage(adapter, keep_history=False),
        extra="fallback-blob-chunk true",
    )
    code, report = run_json("verify", config, "--checksums")
    assert (code, report["fallback_removable"]) == (1, False)
    assert report["fallback"]["key"] == "fallback-blob-chunk true"
    assert run("migrate", config, "--from-relstorage").returncode == 0
    code, report = run_json("verify", config, "--checksums")
    assert (code, report["fallback_removable"]) == (0, True)
    assert report["checksums"]["compared_with"].startswith("RelStorage's blob_chunk")
    assert report["checksums"]["matching"] == len(SIZES)


def test_a_download_that_fails_midway_is_unreadable_not_a_mismatch():
    """verify --checksums --download: a ranged GET refused after a later
    range was written leaves a file of full size with a hole; that is an
    object that could not be checked, never one reported damaged."""
    key = f"{s3env.new_prefix()}/blobs/1/123456789abcdef.blob"
    put_object(key, os.urandom(3 * PART))
    store = ranged_store(s3env.server().endpoint_url)
    middle = f"bytes={PART}-{2 * PART - 1}"

    def refuse_the_middle_range(request):
        if request.headers.get("Range") in (middle, middle.encode()):
            time.sleep(1.5)  # the last range is written meanwhile
            return error_response(request)
        return None

    copies = Downloads()
    try:
        with (
            calling(store, "GetObject", refuse_the_middle_range),
            copies.files([None]) as paths,
        ):
            check = check_one(store, copies, key, paths[0])
    finally:
        store.close()
    assert check.outcome == "unreadable", check


def test_a_state_file_resumes_against_blob_chunk_on_postgresql(postgresql, tmp_path):
    """The state file's header names the source: for RelStorage's blob_chunk
    that name is the same in every run (and holds no DSN)."""
    adapter = f"<postgresql>\n    dsn {postgresql.create_database()}\n  </postgresql>"
    clitools.relstorage_with_blob_chunks(tmp_path, [10, 20, 30], adapter)
    config = clitools.write_config(
        tmp_path, clitools.relstorage(adapter), extra="fallback-blob-chunk true\n"
    )
    assert clitools.run("migrate", config, "--from-relstorage").returncode == 0
    state = tmp_path / "verify.state"
    args = ("verify", config, "--all-revisions", "--checksums", "--state", state)
    code, first = run_json(*args)
    assert code == 0, first
    assert "dsn" not in state.read_text() and "password" not in state.read_text()
    code, again = run_json(*args)
    assert code == 0, again
    assert again["checksums"]["verified_earlier"] == first["checksums"]["checked"]


def test_verify_says_when_the_parent_prefix_can_go(tmp_path):
    """A site copy reading its parent's prefix: the parent can go only once
    every revision its base holds is under the copy's own prefix, which
    migrate --from-s3-prefix does."""
    parent, copy, revisions = site_copy(tmp_path)
    prefix = clitools.prefix_of(parent)
    code, report = run_json("verify", copy, "--all-revisions")
    assert code == 1
    assert report["fallback_removable"] is False
    assert report["fallback"]["key"] == f"fallback-s3-prefix {prefix}"
    assert report["fallback"]["not_in_s3"] == len(revisions)
    assert f"migrate --from-s3-prefix {prefix}" in report["fallback"]["reason"]

    assert run("migrate", copy, "--from-s3-prefix", prefix).returncode == 0
    code, report = run_json("verify", copy)
    assert (code, report["fallback_removable"]) == (0, False)  # history unchecked
    code, report = run_json("verify", copy, "--all-revisions")
    assert (code, report["fallback_removable"]) == (0, True)
    result = run("verify", copy, "--all-revisions")
    assert f"Remove fallback-s3-prefix {prefix} from" in " ".join(result.stdout.split())
