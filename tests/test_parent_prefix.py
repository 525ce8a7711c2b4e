"""fallback-s3-prefix: a copy of a site with its own s3-prefix reads what
its prefix lacks from the parent's, and never changes the parent."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import ZODB
import ZODB.config
from ZODB.FileStorage import FileStorage

import clitools
import s3env
from test_gc_retention import change_all, read_all
from test_storage import commit_blobs
from zodb_s3blobs.errors import S3BlobStorageError

pytestmark = pytest.mark.s3_servers("moto", "rgw")


def snapshot(prefix: str, bucket: str = s3env.BUCKET) -> dict[str, tuple]:
    """Every object under *prefix* (of *bucket*): key -> (size, ETag,
    LastModified)."""
    client = s3env.server().client()
    pages = client.get_paginator("list_objects_v2").paginate(
        Bucket=bucket, Prefix=f"{prefix}/"
    )
    return {
        item["Key"]: (item["Size"], item["ETag"], item["LastModified"])
        for page in pages
        for item in page.get("Contents", ())
    }


def test_a_site_copy_reads_commits_and_packs_leaving_the_parent_unchanged(
    make_storage, tmp_path
):
    parent_fs, copy_fs = tmp_path / "parent.fs", tmp_path / "copy.fs"
    parent = make_storage(base=FileStorage(str(parent_fs)))
    db = ZODB.DB(parent)
    payloads = {f"b{n}": bytes([n]) * (100 + n) for n in range(6)}
    commit_blobs(db, payloads)
    change_all(db, ["b0"])  # history: an older revision the copy holds too
    payloads["b0"] = b"changed during the day"
    db.close()
    parent_prefix = parent._layout.prefix
    before = snapshot(parent_prefix)
    shutil.copy(parent_fs, copy_fs)

    copy = make_storage(
        base=FileStorage(str(copy_fs)),
        settings=s3env.settings(),
        fallback_s3_prefix=parent_prefix,
        gc_retention=0,  # the copy's pack deletes at once: never the parent's
    )
    db = ZODB.DB(copy)
    assert read_all(db, list(payloads)) == payloads
    change_all(db, ["b1", "b2"])
    payloads["b1"] = payloads["b2"] = b"changed during the day"
    db.pack(days=0)
    db.close()

    reader = ZODB.DB(
        make_storage(
            base=FileStorage(str(copy_fs)),
            settings=copy._store.settings,
            fallback_s3_prefix=parent_prefix,
        )
    )
    assert read_all(reader, list(payloads)) == payloads
    reader.close()
    assert snapshot(parent_prefix) == before, "the parent is never changed"


def test_the_copy_s_own_prefix_is_refused(make_storage):
    settings = s3env.settings()
    with pytest.raises(ValueError, match="fallback-s3-prefix .* own s3-prefix"):
        make_storage(settings=settings, fallback_s3_prefix=settings.prefix)


def test_a_parent_bucket_that_does_not_exist_is_refused(make_storage):
    with pytest.raises(S3BlobStorageError, match="fallback-s3-bucket no-such-bucket"):
        make_storage(fallback_s3_prefix="live", fallback_s3_bucket="no-such-bucket")


def test_the_keys_are_read_from_zope_conf(tmp_path):
    text = s3env.zconfig(
        f"<filestorage>\n    path {tmp_path / 'Data.fs'}\n  </filestorage>",
        str(tmp_path / "cache"),
        extra="fallback-s3-prefix live/site\n  fallback-s3-bucket no-such-bucket",
    )
    with pytest.raises(S3BlobStorageError, match="fallback-s3-bucket no-such-bucket"):
        ZODB.config.storageFromString(text)
    bad = text.replace("fallback-s3-prefix live/site", "fallback-s3-prefix /abs")
    with pytest.raises(Exception, match="fallback-s3-prefix"):
        ZODB.config.storageFromString(bad)


def site_copy(tmp_path: Path, bucket: str | None = None):
    """A parent site (CONFIG ``parent.conf``, in *bucket* or the session's)
    with blobs and history, and a copy of it (CONFIG ``copy/s3.conf``): its
    Data.fs copied, its own s3-prefix, reading the parent's through
    fallback-s3-prefix. Returns both CONFIGs and ``(oid, tid) -> bytes`` of
    every revision the parent wrote."""
    parent_fs = tmp_path / "parent.fs"
    parent = clitools.write_config(
        tmp_path, clitools.filestorage(parent_fs), name="parent.conf"
    )
    extra = f"fallback-s3-prefix {clitools.prefix_of(parent)}"
    if bucket is not None:
        s3env.server().client().create_bucket(Bucket=bucket)
        parent.write_text(
            parent.read_text().replace(
                f"bucket-name {s3env.BUCKET}", f"bucket-name {bucket}"
            )
        )
        extra += f"\n  fallback-s3-bucket {bucket}"
    revisions = clitools.commit_blobs(clitools.open_storage(parent), [100, 2000], 1)
    (tmp_path / "copy").mkdir()
    copy_fs = tmp_path / "copy" / "Data.fs"
    shutil.copy(parent_fs, copy_fs)
    copy = clitools.write_config(
        tmp_path / "copy", clitools.filestorage(copy_fs), extra=extra
    )
    return parent, copy, revisions
