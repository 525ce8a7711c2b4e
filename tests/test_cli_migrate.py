"""``zodb-s3blobs migrate``, run as a user would against the session's S3
server: from FileStorage blob directories (bushy and lawn), from RelStorage's
blob_chunk table on SQLite, idempotent, and resumed after an interruption."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest
import ZODB
from ZODB.FileStorage import FileStorage

import clitools
import s3env
from clitools import run, run_json
from faultserver import Faults, Gate, faulty_s3
from test_parent_prefix import site_copy, snapshot
from zodb_s3blobs.objectstore import CHECKSUM_METADATA

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

pytestmark = pytest.mark.s3_servers("moto", "rgw")

SIZES = [1, 1000, 5000, 20000, 70000]


def filestorage_with_blob_dir(tmp_path: Path, layout: str = "bushy"):
    """A FileStorage with *layout* blob-dir holding SIZES blobs, two of them
    updated once; returns (every revision's bytes, Data.fs, blob dir)."""
    data_fs, blob_dir = tmp_path / "Data.fs", tmp_path / "blobs"
    FileStorage(str(data_fs)).close()  # else it would empty the blob dir
    blob_dir.mkdir()
    (blob_dir / ".layout").write_text(layout)
    storage = FileStorage(str(data_fs), blob_dir=str(blob_dir))
    revisions = clitools.commit_blobs(storage, SIZES, updates=2)
    assert len(clitools.blob_dir_revisions(blob_dir)) == len(SIZES) + 2
    return revisions, data_fs, blob_dir


@pytest.mark.parametrize("layout", ["bushy", "lawn"])
def test_migrate_a_filestorage_blob_dir(tmp_path, layout):
    revisions, data_fs, blob_dir = filestorage_with_blob_dir(tmp_path, layout)
    config = clitools.write_config(tmp_path, clitools.filestorage(data_fs))

    dry = run("migrate", config, "--from-blob-dir", blob_dir, "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert clitools.s3_objects(config) == {}  # a dry run uploads nothing
    layout_ = clitools.layout(config)
    keys = {layout_.key(oid, tid) for oid, tid in revisions}
    lines = dry.stdout.splitlines()
    listed = {line.split()[0] for line in lines if line.startswith(layout_.root)}
    assert listed == keys
    assert f"({layout} layout, " in dry.stdout

    code, report = run_json("migrate", config, "--from-blob-dir", blob_dir)
    assert code == 0
    total = sum(len(data) for data in revisions.values())
    assert report["found"] == {"count": len(revisions), "bytes": total}
    assert report["uploaded"] == {"count": len(revisions), "bytes": total}
    for (oid, tid), data in revisions.items():
        assert clitools.s3_read(clitools.layout(config).key(oid, tid)) == data

    # The database reads its blobs from S3 now, through the migrated objects.
    assert clitools.read_through(config, revisions) == revisions


def test_migrate_again_uploads_nothing(tmp_path):
    revisions, data_fs, blob_dir = filestorage_with_blob_dir(tmp_path)
    config = clitools.write_config(tmp_path, clitools.filestorage(data_fs))
    first = run("migrate", config, "--from-blob-dir", blob_dir)
    assert first.returncode == 0
    assert first.stderr == ""  # no progress bar when stderr is a pipe

    again = run("migrate", config, "--from-blob-dir", blob_dir)
    assert again.returncode == 0, again.stderr
    assert again.stderr == ""
    rows = {
        line[:13].strip(): line[13:].split() for line in again.stdout.splitlines()[2:6]
    }
    assert rows["already in S3"][0] == str(len(revisions))
    assert rows["uploaded"][0] == "0"


def test_a_progress_bar_on_a_terminal(tmp_path):
    _revisions, data_fs, blob_dir = filestorage_with_blob_dir(tmp_path)
    config = clitools.write_config(tmp_path, clitools.filestorage(data_fs))
    code, shown = clitools.run_on_terminal(
        "migrate", config, "--from-blob-dir", blob_dir
    )
    assert code == 0
    assert b"\rupload:   0%|" in shown  # tqdm, redrawn in place
    assert b"B/s]" in shown


def test_progress_lines_when_not_on_a_terminal(tmp_path):
    """Piped (cron, CI), a long run prints a progress line every
    --progress-interval seconds (default 60), so a log shows it is alive; 0
    prints one per batch, which lets a short test see them. With the
    default, a run shorter than a minute prints none.

    Fails before the fix: nothing was printed until the end."""
    _revisions, data_fs, blob_dir = filestorage_with_blob_dir(tmp_path)
    config = clitools.write_config(tmp_path, clitools.filestorage(data_fs))
    result = clitools.run(
        "migrate", config, "--from-blob-dir", blob_dir, "--progress-interval", "0"
    )
    assert result.returncode == 0, result.stderr
    [line] = result.stderr.splitlines()
    assert line.startswith("zodb-s3blobs: upload: ")
    assert "(100%) after " in line
    result = clitools.run("migrate", config, "--from-blob-dir", blob_dir)
    assert result.returncode == 0
    assert result.stderr == ""


def test_an_object_of_another_size_is_uploaded_again(tmp_path):
    revisions, data_fs, blob_dir = filestorage_with_blob_dir(tmp_path)
    config = clitools.write_config(tmp_path, clitools.filestorage(data_fs))
    oid, tid = next(iter(revisions))
    key = clitools.layout(config).key(oid, tid)
    s3env.server().client().put_object(Bucket=s3env.BUCKET, Key=key, Body=b"stale")

    code, report = run_json("migrate", config, "--from-blob-dir", blob_dir)
    assert code == 0
    assert report["replaced"] == [key]
    assert report["uploaded"]["count"] == len(revisions)
    assert clitools.s3_read(key) == revisions[oid, tid]


def test_a_zeo_client_blob_cache_is_refused(tmp_path):
    cache = tmp_path / "zeo-cache"
    cache.mkdir()
    (cache / ".layout").write_text("zeocache")
    config = clitools.write_config(tmp_path, clitools.filestorage(tmp_path / "x.fs"))
    result = run("migrate", config, "--from-blob-dir", cache)
    assert result.returncode == 2
    assert f"--from-blob-dir {cache}:" in result.stderr
    assert "ZEO client's blob cache" in result.stderr
    assert len(result.stderr.splitlines()) == 1


def test_a_missing_blob_dir_is_bad_usage(tmp_path):
    config = clitools.write_config(tmp_path, clitools.filestorage(tmp_path / "x.fs"))
    result = run("migrate", config, "--from-blob-dir", tmp_path / "nowhere")
    assert result.returncode == 2
    assert f"{tmp_path / 'nowhere'}: not a directory" in result.stderr


def test_a_source_is_required(tmp_path):
    config = clitools.write_config(tmp_path, clitools.filestorage(tmp_path / "x.fs"))
    result = run("migrate", config)
    assert result.returncode == 2
    assert "one of the arguments --from-blob-dir --from-relstorage" in result.stderr


@pytest.mark.s3_servers("moto")  # the gate is the fault server's, over moto
def test_an_interrupted_migrate_resumes(tmp_path):
    """Ctrl-C in the middle, then run again: only the rest is uploaded. The
    server holds the uploads after the 16th until the command has been
    interrupted, so it cannot finish first; default settings throughout."""
    count = 120
    data_fs, blob_dir = tmp_path / "Data.fs", tmp_path / "blobs"
    storage = FileStorage(str(data_fs), blob_dir=str(blob_dir))
    revisions = clitools.commit_blobs(storage, [1024] * count)
    prefix = s3env.new_prefix()
    section = clitools.filestorage(data_fs)
    config = clitools.write_config(tmp_path, section, prefix=prefix)
    gate = Gate(after=16, applies=blob_puts)
    with faulty_s3(Faults(gate=gate)) as server:
        gated = clitools.write_config(tmp_path, section, prefix, name="gated.conf")
        gated.write_text(
            gated.read_text().replace(s3env.server().endpoint_url, server.endpoint_url)
        )
        code, err = clitools.interrupt(
            "migrate", gated, "--from-blob-dir", blob_dir, gate=gate
        )
    assert code == 130, err
    assert err.splitlines()[-1] == "zodb-s3blobs: interrupted"
    done = len(clitools.s3_objects(config))
    assert 0 < done < count

    code, report = run_json("migrate", config, "--from-blob-dir", blob_dir)
    assert code == 0
    assert report["present"]["count"] == done
    assert report["uploaded"]["count"] == count - done
    assert clitools.s3_objects(config) == {
        clitools.layout(config).key(oid, tid): len(data)
        for (oid, tid), data in revisions.items()
    }


def blob_puts(method: str, path: str) -> bool:
    """Uploads of revisions (not the conditional-write probe's staging keys)."""
    return method == "PUT" and "/blobs/" in path and path.endswith(".blob")


@pytest.mark.parametrize(
    "backend, keep_history",
    [("sqlite", True), ("sqlite", False), ("postgresql", True)],
    ids=["sqlite-hp", "sqlite-hf", "postgresql-hp"],
)
def test_migrate_from_relstorage_blob_chunk(request, tmp_path, backend, keep_history):
    if backend == "sqlite":
        adapter = clitools.sqlite3(tmp_path / "rs")
    else:  # each blob is a large object there: sizes come from another query
        dsn = request.getfixturevalue("postgresql").create_database()
        adapter = f"<postgresql>\n    dsn {dsn}\n  </postgresql>"
    committed = clitools.relstorage_with_blob_chunks(
        tmp_path, SIZES, adapter, keep_history
    )
    # A history-free database keeps only the current revisions.
    revisions = committed if keep_history else clitools.current(committed)
    section = clitools.relstorage(adapter, keep_history)
    config = clitools.write_config(tmp_path, section)

    code, dry = run_json("migrate", config, "--from-relstorage", "--dry-run")
    assert code == 0
    assert dry["source"] == "RelStorage's blob_chunk table (" + backend + ")"
    assert {u["key"]: u["size"] for u in dry["uploads"]} == {
        clitools.layout(config).key(oid, tid): len(data)
        for (oid, tid), data in revisions.items()
    }
    assert clitools.s3_objects(config) == {}

    code, report = run_json("migrate", config, "--from-relstorage")
    assert code == 0
    assert report["uploaded"]["count"] == len(revisions)
    for (oid, tid), data in revisions.items():
        assert clitools.s3_read(clitools.layout(config).key(oid, tid)) == data
    assert clitools.read_through(config, revisions) == revisions

    code, again = run_json("migrate", config, "--from-relstorage")
    assert code == 0
    assert again["uploaded"]["count"] == 0
    assert again["present"]["count"] == len(revisions)


def test_from_relstorage_needs_a_relstorage_base(tmp_path):
    FileStorage(str(tmp_path / "x.fs")).close()
    config = clitools.write_config(tmp_path, clitools.filestorage(tmp_path / "x.fs"))
    result = run("migrate", config, "--from-relstorage")
    assert result.returncode == 2
    assert "the base storage is FileStorage, not RelStorage" in result.stderr


def a_blob_file(blob_dir: Path) -> Path:
    """The first blob file of *blob_dir* (any layout)."""
    return next(path for path in sorted(blob_dir.rglob("*.blob")))


def test_a_symlinked_blob_is_not_uploaded(tmp_path):
    """A ``*.blob`` symlink to a file outside the blob directory (which the
    Zope user can write, while migrate runs as root) is skipped and named;
    the regular blob files are uploaded; the run exits 1.

    Fails before the fix: the symlink's target was read and uploaded, and the
    run exited 0."""
    revisions, data_fs, blob_dir = filestorage_with_blob_dir(tmp_path)
    config = clitools.write_config(tmp_path, clitools.filestorage(data_fs))
    secret = tmp_path / "shadow"
    secret.write_bytes(b"root:secret-hash:19000::::::\n")
    secret.chmod(0o600)
    oid_dir = a_blob_file(blob_dir).parent
    link = oid_dir / "0x0fffffffffffffff.blob"
    link.symlink_to(secret)

    result = run("migrate", config, "--from-blob-dir", blob_dir)
    assert result.returncode == 1
    assert f"skipped {link}: a symbolic link, not a regular file" in result.stderr
    uploaded = clitools.s3_objects(config)
    assert len(uploaded) == len(revisions)  # every regular blob file
    assert b"secret-hash" not in b"".join(clitools.s3_read(k) for k in uploaded)

    code, report = run_json("migrate", config, "--from-blob-dir", blob_dir)
    assert code == 1
    assert report["ok"] is False
    assert report["skipped"] == {
        "count": 1,
        "entries": [
            {"path": str(link), "reason": "a symbolic link, not a regular file"}
        ],
    }


def test_a_blob_file_swapped_for_a_symlink_after_listing_is_not_read(tmp_path):
    """A blob file replaced by a symlink between the listing and the upload
    (the blob directory is writable by the Zope user) is not followed: the
    file is opened without following links, and skipped.

    Fails before the fix: the upload opened the path, following the link."""
    from zodb_s3blobs.cli.sources import BlobDirSource

    _revisions, _data_fs, blob_dir = filestorage_with_blob_dir(tmp_path)
    secret = tmp_path / "shadow"
    secret.write_bytes(b"secret")
    source = BlobDirSource(str(blob_dir))
    revisions = list(source.revisions())
    swapped = a_blob_file(blob_dir)
    swapped.unlink()
    swapped.symlink_to(secret)
    removed = sorted(blob_dir.rglob("*.blob"))[-1]
    removed.unlink()  # as a pack running meanwhile does
    with source.files(revisions) as paths:
        contents = [None if p is None else Path(p).read_bytes() for p in paths]
    assert b"secret" not in contents
    assert contents.count(None) == 2
    assert [entry["path"] for entry in source.skipped] == [str(swapped), str(removed)]
    reasons = [entry["reason"] for entry in source.skipped]
    assert reasons[0].startswith("cannot open it without following links")
    assert reasons[1] == "removed before it was uploaded"


def test_a_bushy_dir_without_its_layout_file_is_recognised(tmp_path):
    """A bushy blob directory copied without its ``.layout`` file (``cp -r
    dir/*``) is recognised by its structure, not guessed as lawn.

    Fails before the fix: it was taken for a lawn directory, migrate found 0
    blobs and exited 0."""
    revisions, data_fs, blob_dir = filestorage_with_blob_dir(tmp_path)
    (blob_dir / ".layout").unlink()
    config = clitools.write_config(tmp_path, clitools.filestorage(data_fs))
    code, report = run_json("migrate", config, "--from-blob-dir", blob_dir)
    assert code == 0, report
    assert report["found"]["count"] == len(revisions)
    assert "bushy layout, recognised by its structure" in report["source"]
    assert len(clitools.s3_objects(config)) == len(revisions)


def test_a_directory_without_blobs_is_an_error(tmp_path):
    """Pointing --from-blob-dir at a directory that holds files but no blobs
    is bad usage, not a successful migration of nothing.

    Fails before the fix: "found 0", exit 0."""
    config = clitools.write_config(tmp_path, clitools.filestorage(tmp_path / "x.fs"))
    wrong = tmp_path / "var"
    (wrong / "log").mkdir(parents=True)
    (wrong / "log" / "instance.log").write_text("started\n")
    (wrong / "Data.fs").write_bytes(b"FS21")
    result = run("migrate", config, "--from-blob-dir", wrong)
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        f"zodb-s3blobs: error: --from-blob-dir {wrong}: holds no blob files "
        "(OID directories of *.blob files, bushy or lawn layout): is it a blob "
        "directory?"
    ]
    code, report = run_json("migrate", config, "--from-blob-dir", wrong)
    assert code == 2
    assert report["ok"] is False and "holds no blob files" in report["error"]
    # An empty blob directory (a database without blobs) is fine.
    (tmp_path / "empty").mkdir()
    result = run("migrate", config, "--from-blob-dir", tmp_path / "empty")
    assert result.returncode == 0, result.stderr


def test_odd_entries_are_skipped_counted_and_fail_the_run(tmp_path):
    """A dangling symlink and a malformed name do not abort the run: the
    other blobs are uploaded, each odd entry is named on stderr, counted in
    the report, and the run exits 1.

    Fails before the fix: the dangling symlink aborted the whole run with a
    FileNotFoundError (exit 1, nothing uploaded)."""
    revisions, data_fs, blob_dir = filestorage_with_blob_dir(tmp_path)
    config = clitools.write_config(tmp_path, clitools.filestorage(data_fs))
    oid_dir = a_blob_file(blob_dir).parent
    dangling = oid_dir / "0x0ffffffffffffff0.blob"
    dangling.symlink_to(tmp_path / "nowhere")
    malformed = oid_dir / "not-a-tid.blob"
    malformed.write_bytes(b"x")

    code, report = run_json("migrate", config, "--from-blob-dir", blob_dir)
    assert code == 1
    assert report["uploaded"]["count"] == len(revisions)
    assert report["skipped"]["count"] == 2
    assert {e["path"]: e["reason"] for e in report["skipped"]["entries"]} == {
        str(dangling): "a symbolic link, not a regular file",
        str(malformed): "not a blob file name (TID.blob)",
    }
    assert len(clitools.s3_objects(config)) == len(revisions)
    result = run("migrate", config, "--from-blob-dir", blob_dir)
    assert result.returncode == 1
    assert result.stderr.splitlines()[-1] == (
        "zodb-s3blobs: 2 entries of the blob directory were skipped (named "
        "above): the run is not complete"
    )


def test_a_hard_linked_file_is_not_uploaded(tmp_path):
    """A ``*.blob`` hard link to a file outside the blob directory (the Zope
    user can make one where the kernel allows it, and migrate runs as root) is
    skipped and named, whether it is there when listed or put there after;
    the regular blob files are uploaded; the run exits 1.

    Fails before the fix: only the file type was checked, so the linked file
    was read and uploaded, and the run exited 0."""
    from zodb_s3blobs.cli.sources import HARD_LINKED, BlobDirSource

    revisions, data_fs, blob_dir = filestorage_with_blob_dir(tmp_path)
    config = clitools.write_config(tmp_path, clitools.filestorage(data_fs))
    secret = tmp_path / "shadow"
    secret.write_bytes(b"root:secret-hash:19000::::::\n")
    secret.chmod(0o600)
    link = a_blob_file(blob_dir).parent / "0x0fffffffffffffff.blob"
    os.link(secret, link)

    code, report = run_json("migrate", config, "--from-blob-dir", blob_dir)
    assert code == 1
    assert report["skipped"] == {
        "count": 1,
        "entries": [{"path": str(link), "reason": HARD_LINKED}],
    }
    uploaded = clitools.s3_objects(config)
    assert len(uploaded) == len(revisions)
    assert b"secret-hash" not in b"".join(clitools.s3_read(k) for k in uploaded)

    # A blob file replaced by a hard link between the listing and the upload.
    link.unlink()
    source = BlobDirSource(str(blob_dir))
    listed = list(source.revisions())
    swapped = a_blob_file(blob_dir)
    swapped.unlink()
    os.link(secret, swapped)
    with source.files(listed) as paths:
        contents = [None if p is None else Path(p).read_bytes() for p in paths]
    assert secret.read_bytes() not in contents
    assert contents.count(None) == 1
    assert source.skipped == [{"path": str(swapped), "reason": HARD_LINKED}]


@pytest.mark.skipif(os.geteuid() != 0, reason="chown to another user needs root")
def test_a_file_of_another_owner_is_not_uploaded(tmp_path):
    """A blob file owned by another user than the blob directory (a hard link
    keeps the owner of the file linked) is skipped and named, when listed and
    when it changes owner after the listing; the run exits 1.

    Fails before the fix: the owner was never looked at, the file was
    uploaded and the run exited 0."""
    from zodb_s3blobs.cli.sources import BlobDirSource

    revisions, data_fs, blob_dir = filestorage_with_blob_dir(tmp_path)
    config = clitools.write_config(tmp_path, clitools.filestorage(data_fs))
    owner = blob_dir.stat().st_uid
    foreign = a_blob_file(blob_dir)
    os.chown(foreign, owner + 4242, -1)
    reason = f"owned by uid {owner + 4242}, not by the blob directory's owner"

    code, report = run_json("migrate", config, "--from-blob-dir", blob_dir)
    assert code == 1
    [entry] = report["skipped"]["entries"]
    assert entry["path"] == str(foreign)
    assert entry["reason"] == f"{reason} (uid {owner})"
    assert len(clitools.s3_objects(config)) == len(revisions) - 1

    os.chown(foreign, owner, -1)
    source = BlobDirSource(str(blob_dir))
    listed = list(source.revisions())
    assert source.skipped == []
    os.chown(foreign, owner + 4242, -1)  # after the listing
    with source.files(listed) as paths:
        assert paths.count(None) == 1
    assert source.skipped == [{"path": str(foreign), "reason": entry["reason"]}]


def test_blob_files_a_pack_kept_in_blob_dir_old_are_uploaded(tmp_path):
    """A FileStorage pack with pack-keep-old (the default) hard-links every
    remaining blob file into ``<blob-dir>.old``: that one second link is not
    a reason to skip the file (guards the hard link rule above)."""
    revisions, data_fs, blob_dir = filestorage_with_blob_dir(tmp_path)
    storage = FileStorage(str(data_fs), blob_dir=str(blob_dir))
    db = ZODB.DB(storage)
    try:
        db.pack(time.time() + 1)
    finally:
        db.close()
    kept = sorted(blob_dir.rglob("*.blob"))
    assert len(kept) == len(SIZES)  # the two older revisions are gone
    assert {path.stat().st_nlink for path in kept} == {2}
    config = clitools.write_config(tmp_path, clitools.filestorage(data_fs))
    code, report = run_json("migrate", config, "--from-blob-dir", blob_dir)
    assert code == 0, report
    assert report["uploaded"]["count"] == len(SIZES)


def test_a_blob_dir_named_through_a_symlink(tmp_path):
    """``--from-blob-dir`` may itself be a symbolic link to the blob
    directory (``/var/lib/zope/blobstorage`` -> ``/srv/blobs``): it is
    resolved once, and every blob file is uploaded.

    Fails before the fix: the top directory was opened without following
    links too, so every file was skipped ("cannot open it without following
    links") and the run exited 1."""
    revisions, data_fs, blob_dir = filestorage_with_blob_dir(tmp_path)
    config = clitools.write_config(tmp_path, clitools.filestorage(data_fs))
    named = tmp_path / "blobstorage"
    named.symlink_to(blob_dir)
    code, report = run_json("migrate", config, "--from-blob-dir", named)
    assert code == 0, report
    assert report["uploaded"]["count"] == len(revisions)
    assert str(blob_dir) in report["source"]


@pytest.mark.parametrize("other_bucket", [False, True], ids=["same", "other"])
def test_from_s3_prefix_copies_what_the_copy_holds_then_the_parent_can_go(
    tmp_path, other_bucket
):
    """A site copy's base holds the parent's revisions and one of its own:
    --from-s3-prefix copies the parent's server-side into the copy's prefix
    (CRC32 kept), skips what is there, never changes the parent; then the
    copy reads every revision with the parent gone."""
    bucket = f"zodb-s3blobs-parent-{tmp_path.name[-6:].lower()}".replace("_", "-")
    parent, copy, revisions = site_copy(tmp_path, bucket if other_bucket else None)
    parent_bucket = bucket if other_bucket else s3env.BUCKET
    parent_prefix = clitools.prefix_of(parent)
    own = clitools.commit_blobs(clitools.open_storage(copy), [300])
    before = snapshot(parent_prefix, parent_bucket)
    layout = clitools.layout(copy)

    dry = run("migrate", copy, "--from-s3-prefix", parent_prefix, "--dry-run")
    assert dry.returncode == 0, dry.stderr
    listed = {line.split()[0] for line in dry.stdout.splitlines() if line.strip()}
    assert {layout.key(*ref) for ref in revisions} <= listed
    assert set(clitools.s3_objects(copy)) == {layout.key(*ref) for ref in own}

    code, report = run_json("migrate", copy, "--from-s3-prefix", parent_prefix)
    assert code == 0, report
    assert (
        report["source"] == f"parent prefix s3://{parent_bucket}/{parent_prefix}/blobs/"
    )
    assert report["uploaded"]["count"] == len(revisions)
    assert report["present"]["count"] == len(own)
    for ref, data in revisions.items():
        copied = (
            s3env.server()
            .client()
            .get_object(Bucket=s3env.BUCKET, Key=layout.key(*ref))
        )
        assert copied["Body"].read() == data
        assert copied["Metadata"][CHECKSUM_METADATA] == clitools.crc32(data)
    code, again = run_json("migrate", copy, "--from-s3-prefix", parent_prefix)
    assert (code, again["uploaded"]["count"]) == (0, 0)
    assert again["present"]["count"] == len(revisions) + len(own)
    assert snapshot(parent_prefix, parent_bucket) == before, "the parent is only read"

    client = s3env.server().client()
    for key in before:
        client.delete_object(Bucket=parent_bucket, Key=key)
    assert clitools.read_through(copy, {**revisions, **own}) == {**revisions, **own}


def test_from_s3_prefix_names_a_revision_found_nowhere(tmp_path):
    """A revision the copy's base holds that the parent lost: the others are
    copied, it is named, and the run fails."""
    parent, copy, revisions = site_copy(tmp_path)
    parent_prefix = clitools.prefix_of(parent)
    lost = sorted(revisions)[0]
    lost_key = clitools.layout(parent).key(*lost)
    s3env.server().client().delete_object(Bucket=s3env.BUCKET, Key=lost_key)
    result = run("migrate", copy, "--from-s3-prefix", parent_prefix)
    assert result.returncode == 1
    assert f"skipped s3://{s3env.BUCKET}/{lost_key}: under neither" in result.stderr
    assert "1 blob revision was skipped" in result.stderr
    copied = clitools.s3_objects(copy)
    layout = clitools.layout(copy)
    assert set(copied) == {layout.key(*ref) for ref in revisions if ref != lost}


def test_from_s3_prefix_refuses_the_copy_s_own_prefix(tmp_path):
    _parent, copy, _revisions = site_copy(tmp_path)
    result = run("migrate", copy, "--from-s3-prefix", clitools.prefix_of(copy))
    assert result.returncode == 2
    assert "--from-s3-prefix" in result.stderr and "itself" in result.stderr
