"""Read-through fallback: a site switches to S3 first, reads its old blobs from
where it kept them (a blob directory, RelStorage's blob_chunk table) while
``migrate`` copies them, and drops the fallback once ``verify`` passes."""

from __future__ import annotations

import concurrent.futures
import os
import time

import pytest
import transaction
import ZODB
import ZODB.config
from ZODB.blob import Blob
from ZODB.POSException import POSKeyError, ReadConflictError

import clitools
import s3env
from s3hooks import failing, holding, requests
from zodb_s3blobs import BlobReadError
from zodb_s3blobs.revisions import revision_exists

#: Blob sizes of the site before the switch: one empty, small ones, one in
#: several parts.
SIZES = [0, 1, 3000, 70_000, 9 * 1024 * 1024]


def eventually(condition, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition never became true"
        time.sleep(0.05)


def filestorage_site(tmp_path, **options) -> tuple[dict, object]:
    """A FileStorage site with blobs in a blob-dir (two of them updated, so
    non-current revisions exist), then switched to S3 with that directory as
    its fallback: (revisions, config path)."""
    data_fs, blob_dir = tmp_path / "Data.fs", tmp_path / "blobs"
    before = ZODB.config.storageFromString(clitools.filestorage(data_fs, blob_dir))
    revisions = clitools.commit_blobs(before, SIZES, updates=2)
    extra = f"fallback-blob-dir {blob_dir}\n" + "".join(
        f"{key} {value}\n" for key, value in options.items()
    )
    config = clitools.write_config(tmp_path, clitools.filestorage(data_fs), extra=extra)
    return revisions, config


def open_one_revision(tmp_path) -> tuple[object, bytes, bytes]:
    """The switched site of filestorage_site, opened, and one of its old
    revisions: (storage, oid, tid)."""
    revisions, config = filestorage_site(tmp_path)
    (oid, tid), _data = next(iter(revisions.items()))
    return clitools.open_storage(config), oid, tid


def read_all(storage, revisions) -> dict:
    read = {}
    for oid, tid in revisions:
        with storage.openCommittedBlobFile(oid, tid) as f:
            read[oid, tid] = f.read()
    return read


def commit_new_blob(db, name: str, data: bytes) -> tuple[bytes, bytes]:
    tm = transaction.TransactionManager()
    conn = db.open(tm)
    conn.root()[name] = Blob(data)
    tm.commit()
    blob = conn.root()[name]
    blob._p_activate()
    ref = blob._p_oid, blob._p_serial
    conn.close()
    return ref


def without_fallback(config, tmp_path):
    """CONFIG's storage with the fallback removed and an empty cache."""
    text = "\n".join(
        line for line in config.read_text().splitlines() if "fallback-" not in line
    ).replace(str(tmp_path / "cache"), str(tmp_path / "cache-after"))
    path = tmp_path / "after.conf"
    path.write_text(text)
    return path


def switch_copy_verify_drop(tmp_path, config, revisions, *source: str) -> None:
    """The no-downtime path: every old revision reads back through the
    fallback before anything is copied; migrate runs in another process while
    this one commits; verify passes; without the fallback all still reads."""
    site = clitools.open_storage(config)
    db = ZODB.DB(site)
    try:
        assert read_all(site, revisions) == revisions, "read through the fallback"
        migrate = clitools.start("migrate", config, *source)
        new = {}
        for n in range(3):
            data = b"committed while migrate runs %d" % n
            new[commit_new_blob(db, f"new{n}", data)] = data
        out, err = migrate.communicate(timeout=300)
        assert migrate.returncode == 0, out + err
        assert read_all(site, new) == new
    finally:
        db.close()
    code, report = clitools.run_json("verify", config, "--all-revisions")
    assert code == 0, report
    assert report["fallback_removable"] is True
    code, report = clitools.run_json("verify", config, "--all-revisions", "--checksums")
    assert code == 0, report
    # Against the fallback: the old revisions match, the new ones are not there.
    assert report["checksums"]["matching"] == len(revisions)
    assert report["checksums"]["no_copy"] == len(new)
    after = without_fallback(config, tmp_path)
    everything = {**revisions, **new}
    assert clitools.read_through(after, everything) == everything


def test_a_filestorage_site_switches_first_and_copies_afterwards(tmp_path):
    revisions, config = filestorage_site(tmp_path)
    switch_copy_verify_drop(
        tmp_path, config, revisions, "--from-blob-dir", str(tmp_path / "blobs")
    )


@pytest.mark.parametrize("keep_history", [True, False], ids=["hp", "hf"])
def test_a_relstorage_site_on_postgresql_reads_blob_chunk_meanwhile(
    postgresql, tmp_path, keep_history
):
    adapter = f"<postgresql>\n    dsn {postgresql.create_database()}\n  </postgresql>"
    committed = clitools.relstorage_with_blob_chunks(
        tmp_path, SIZES, adapter, keep_history
    )
    revisions = committed if keep_history else clitools.current(committed)
    config = clitools.write_config(
        tmp_path,
        clitools.relstorage(adapter, keep_history),
        extra="fallback-blob-chunk true\n",
    )
    switch_copy_verify_drop(tmp_path, config, revisions, "--from-relstorage")


def test_read_through_uploads_what_it_read(tmp_path):
    revisions, config = filestorage_site(tmp_path)
    site = clitools.open_storage(config)
    try:
        read_all(site, revisions)
        expected = {clitools.layout(config).key(*ref) for ref in revisions}
        eventually(lambda: set(clitools.s3_objects(config)) == expected)
        for (oid, tid), data in revisions.items():
            assert clitools.s3_read(site._layout.key(oid, tid)) == data
    finally:
        site.close()


def test_fallback_upload_false_uploads_nothing(tmp_path):
    """fallback-upload false: reads come from the fallback until migrate."""
    revisions, config = filestorage_site(tmp_path, **{"fallback-upload": "false"})
    site = clitools.open_storage(config)
    try:
        assert read_all(site, revisions) == revisions
        time.sleep(1)
        assert clitools.s3_objects(config) == {}
    finally:
        site.close()


def test_a_revision_in_neither_place_names_both(tmp_path):
    site, oid, tid = open_one_revision(tmp_path)
    try:
        path = site._shared.fallback.where(oid, tid)
        (tmp_path / path).unlink()
        with pytest.raises(POSKeyError) as info:
            site.loadBlob(oid, tid)
    finally:
        site.close()
    message = str(info.value)
    assert site._layout.key(oid, tid) in message and path in message


def test_only_a_404_reads_the_fallback(tmp_path):
    """S3 refusing access (403) or failing transiently is raised or retried,
    never answered from the fallback as if the object did not exist.
    fallback-upload false: a wrong fallback read would otherwise also
    overwrite S3's bytes, hiding which place answered."""
    revisions, config = filestorage_site(tmp_path, **{"fallback-upload": "false"})
    (oid, tid), data = max(revisions.items(), key=lambda item: len(item[1]))
    key = clitools.layout(config).key(oid, tid)
    # S3 holds other bytes than the fallback: which one answered shows.
    s3env.server().client().put_object(Bucket=s3env.BUCKET, Key=key, Body=b"in S3")
    site = clitools.open_storage(config)
    try:
        with failing(site._store, "GetObject"), pytest.raises(BlobReadError) as info:
            site.loadBlob(oid, tid)
        assert "AccessDenied" in str(info.value)
        flaky = iter([True, True])
        with failing(
            site._store,
            "GetObject",
            lambda url: next(flaky, False),
            code="SlowDown",
            status=503,
        ):
            path = site.loadBlob(oid, tid)
        with open(path, "rb") as f:
            assert f.read() == b"in S3"
    finally:
        site.close()
    assert data != b"in S3"


def test_undo_copies_a_revision_still_in_the_fallback(tmp_path):
    """Nothing was read before the undo, so the undone-to revisions are only
    in the fallback: the undo uploads them first, then copies them."""
    revisions, config = filestorage_site(tmp_path)
    site = clitools.open_storage(config)
    db = ZODB.DB(site)
    try:
        db.undo(db.undoLog(0, 1)[0]["id"])  # the updates of two blobs
        transaction.commit()
        with db.transaction() as conn:
            undone = {b._p_oid: b for b in conn.root()["blobs"][:2]}
            for oid, blob in undone.items():
                first = min(tid for o, tid in revisions if o == oid)
                with blob.open() as f:
                    assert f.read() == revisions[oid, first]
                key = site._layout.key(oid, blob._p_serial)
                assert clitools.s3_read(key) == revisions[oid, first]
    finally:
        db.close()


def test_pack_never_touches_the_fallback(tmp_path):
    revisions, config = filestorage_site(tmp_path)
    blob_dir = tmp_path / "blobs"
    before = clitools.blob_dir_revisions(blob_dir)
    site = clitools.open_storage(config)
    db = ZODB.DB(site)
    try:
        read_all(site, revisions)
        db.pack(time.time() + 1)
    finally:
        db.close()
    assert clitools.blob_dir_revisions(blob_dir) == before


@pytest.mark.parametrize(
    "extra, message",
    [
        ("fallback-blob-dir relative/blobs", "fallback-blob-dir"),
        ("fallback-blob-dir /nonexistent/blobs", "fallback-blob-dir"),
        ("fallback-blob-chunk maybe", "fallback-blob-chunk"),
    ],
)
def test_bad_fallback_settings_fail_at_startup_naming_the_key(tmp_path, extra, message):
    config = clitools.write_config(
        tmp_path, clitools.filestorage(tmp_path / "x.fs"), extra=extra + "\n"
    )
    with pytest.raises(Exception) as info:
        clitools.open_storage(config)
    assert message in str(info.value)


def test_blob_chunk_needs_relstorage_and_excludes_blob_dir(tmp_path):
    base = clitools.filestorage(tmp_path / "x.fs")
    for extra, message in [
        ("fallback-blob-chunk true", "needs a RelStorage"),
        (f"fallback-blob-chunk true\nfallback-blob-dir {tmp_path}", "exclude"),
    ]:
        config = clitools.write_config(tmp_path, base, extra=extra + "\n")
        with pytest.raises(ValueError, match=message):
            clitools.open_storage(config)


def test_lazily_loaded_blobs_open_through_the_fallback(tmp_path):
    revisions, config = filestorage_site(tmp_path)
    db = ZODB.DB(clitools.open_storage(config))
    try:
        appended = {}
        with db.transaction() as conn:
            for blob in conn.root()["blobs"]:  # loaded lazily: nothing read yet
                with blob.open() as f:
                    data = f.read()
                assert data == revisions[blob._p_oid, blob._p_serial]
                with blob.open("a") as f:  # the committed file is copied first
                    f.write(b"+")
                appended[blob._p_oid] = data + b"+"
        with db.transaction() as conn:
            for blob in conn.root()["blobs"]:
                with blob.open() as f:
                    assert f.read() == appended[blob._p_oid]
    finally:
        db.close()


def test_a_blob_dir_without_its_layout_file_is_read(tmp_path):
    """A directory copied with ``cp -r dir/*`` has no .layout: ZODB would
    guess lawn for it; the fallback looks in both layouts."""
    revisions, config = filestorage_site(tmp_path, **{"fallback-upload": "false"})
    os.remove(tmp_path / "blobs" / ".layout")
    site = clitools.open_storage(config)
    try:
        assert read_all(site, revisions) == revisions
    finally:
        site.close()


def test_a_fifo_in_the_fallback_is_refused_without_hanging(tmp_path):
    site, oid, tid = open_one_revision(tmp_path)
    path = site._shared.fallback.where(oid, tid)
    os.remove(path)
    os.mkfifo(path)
    loading = concurrent.futures.ThreadPoolExecutor(1)
    try:
        future = loading.submit(site.loadBlob, oid, tid)
        try:
            with pytest.raises(BlobReadError, match="not a regular file"):
                future.result(10)
        finally:
            if not future.done():  # let a hung open return
                with open(path, "wb"):
                    pass
    finally:
        loading.shutdown()
        site.close()


def test_read_through_uploads_never_delay_a_commit_or_a_close(tmp_path):
    """A backlog of read-through uploads (a crawler right after the switch)
    never makes a commit wait at vote, and close() drops it: only the
    uploads already running are finished."""
    revisions, config = filestorage_site(tmp_path)
    old_keys = {clitools.layout(config).key(*ref) for ref in revisions}
    site = clitools.open_storage(config)
    db = ZODB.DB(site)
    held = lambda url: any(key in url for key in old_keys)  # noqa: E731
    with holding(site._store, "PutObject", held) as gate:
        read_all(site, revisions)  # one upload queued per old revision
        assert gate.arrived.wait(10)
        committing = concurrent.futures.ThreadPoolExecutor(1)
        committed = committing.submit(commit_new_blob, db, "new", b"a new blob")
        committed.result(10)  # raises TimeoutError if it waited for them
        closing = committing.submit(db.close)
        time.sleep(0.5)
        gate.open()  # the running uploads end
        closing.result(30)
        committing.shutdown()
    assert 0 < len(gate.held) < len(revisions), "the backlog was dropped"


def test_a_packed_revision_is_never_served_from_the_fallback(tmp_path):
    """After a pack removed an old revision (and its object), reading it
    raises ReadConflictError as without a fallback, and nothing uploads it
    again."""
    # gc-retention 0: the pack deletes the packed revision's object at once.
    revisions, config = filestorage_site(tmp_path, **{"gc-retention": "0"})
    site = clitools.open_storage(config)
    db = ZODB.DB(site)
    try:
        read_all(site, revisions)
        layout = clitools.layout(config)
        expected = {layout.key(*ref) for ref in revisions}
        eventually(lambda: set(clitools.s3_objects(config)) == expected)
        db.pack(time.time() + 1)
        packed = [ref for ref in revisions if not revision_exists(site._base, *ref)]
        assert packed, "the pack removed the old revisions"
        site._cache.discard(*packed[0])
        with pytest.raises(ReadConflictError):
            site.loadBlob(*packed[0])
        assert layout.key(*packed[0]) not in clitools.s3_objects(config)
    finally:
        db.close()


def test_presigned_urls_wait_for_the_upload_ask_s3_once_and_never_raise(tmp_path):
    site, oid, tid = open_one_revision(tmp_path)
    try:
        with failing(site._store, "HeadObject", code="SlowDown", status=503):
            assert site.presigned_url(oid, tid) is None, "S3 trouble: no URL"
        assert site.presigned_url(oid, tid) is None, "only in the fallback"
        site.loadBlob(oid, tid)  # read through, and uploaded
        eventually(lambda: site.presigned_url(oid, tid) is not None)
        with requests(site._store) as seen:
            for _ in range(20):
                assert site.presigned_url(oid, tid) is not None
        assert [op for op, _url in seen] == [], "known to be in S3"
    finally:
        site.close()


def test_on_relstorage_a_revision_another_instance_packed_is_a_read_conflict(
    tmp_path,
):
    """RelStorage's loadSerial answers from its local cache, where a blob
    loaded lazily keeps the revision alive after another instance packed it:
    the storage asks the database itself, so the reader gets a
    ReadConflictError (Zope retries) and the fallback's copy is neither
    served nor uploaded again."""
    adapter = clitools.sqlite3(tmp_path / "rs")
    clitools.relstorage_with_blob_chunks(tmp_path, SIZES, adapter, keep_history=True)
    config = clitools.write_config(
        tmp_path, clitools.relstorage(adapter, True), extra="fallback-blob-chunk true\n"
    )
    writer_config = tmp_path / "writer.conf"
    writer_config.write_text(
        config.read_text().replace(str(tmp_path / "cache"), str(tmp_path / "writer"))
    )
    reader = ZODB.DB(clitools.open_storage(config))
    writer = ZODB.DB(clitools.open_storage(writer_config))
    tm = transaction.TransactionManager()
    try:
        blob = reader.open(tm).root()["blobs"][2]
        blob._p_activate()  # loaded lazily: nothing read yet
        with writer.transaction() as conn, conn.root()["blobs"][2].open("w") as f:
            f.write(b"a new revision")
        writer.pack(time.time() + 1)
        with pytest.raises(ReadConflictError):
            blob.open().close()
        old_key = clitools.layout(config).key(blob._p_oid, blob._p_serial)
        time.sleep(0.5)
        assert old_key not in clitools.s3_objects(config)
    finally:
        tm.abort()
        reader.close()
        writer.close()
