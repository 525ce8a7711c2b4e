"""``zodb-s3blobs undelete``, run as a user would: in a versioned bucket
(one of its own, made for the test), the objects of revisions the base
holds but S3 lost come back from their non-current versions, checked
against their CRC32; in a bucket without versioning nothing can."""

from __future__ import annotations

import itertools

import pytest

import clitools
import s3env
from clitools import crc32, run, run_json
from s3hooks import failing
from zodb_s3blobs.errors import ObjectStoreError
from zodb_s3blobs.objectstore import CHECKSUM_METADATA, ObjectStore

pytestmark = pytest.mark.s3_servers("moto", "rgw")

_buckets = itertools.count()


@pytest.fixture
def versioned(tmp_path):
    """CONFIG on a new versioned bucket with three current blobs and one
    old revision (history the base keeps); returns CONFIG, the bucket's
    name and ``key -> bytes`` of every revision."""
    return versioned_config(tmp_path, [100, 200, 300], 1)


def versioned_config(tmp_path, sizes: list[int], updates: int, extra: str = ""):
    """CONFIG (with *extra* keys) on a new versioned bucket holding blobs of
    *sizes*, the first *updates* of them rewritten once; the fixture's
    answer."""
    client = s3env.server().client()
    bucket = f"zodb-s3blobs-versioned-{next(_buckets)}-{tmp_path.name[-8:].lower()}"
    bucket = bucket.replace("_", "-")
    client.create_bucket(Bucket=bucket)
    client.put_bucket_versioning(
        Bucket=bucket, VersioningConfiguration={"Status": "Enabled"}
    )
    config = clitools.write_config(
        tmp_path, clitools.filestorage(tmp_path / "Data.fs"), extra=extra
    )
    config.write_text(
        config.read_text().replace(
            f"bucket-name {s3env.BUCKET}", f"bucket-name {bucket}"
        )
    )
    revisions = clitools.commit_blobs(clitools.open_storage(config), sizes, updates)
    layout = clitools.layout(config)
    return config, bucket, {layout.key(*ref): data for ref, data in revisions.items()}


def test_every_missing_revision_is_restored_checked(versioned):
    config, bucket, revisions = versioned
    client = s3env.server().client()
    for key in revisions:
        client.delete_object(Bucket=bucket, Key=key)  # a delete marker
    dry_code, dry = run_json("undelete", config, "--dry-run")
    assert dry_code == 0 and sorted(dry["restored"]) == sorted(revisions)
    assert all(_missing(client, bucket, key) for key in revisions), "dry run"

    code, report = run_json("undelete", config)
    assert code == 0, report
    assert report["versioning"] == "Enabled"
    assert (report["revisions"], report["missing"]) == (4, 4)
    assert sorted(report["restored"]) == sorted(revisions)
    assert report["not_found"] == report["refused"] == []
    for key, data in revisions.items():
        restored = client.get_object(Bucket=bucket, Key=key)
        assert restored["Body"].read() == data
        assert restored["Metadata"][CHECKSUM_METADATA] == crc32(data)
    again_code, again = run_json("undelete", config)
    assert (again_code, again["missing"]) == (0, 0)


def test_a_version_whose_bytes_do_not_match_its_crc32_is_refused(versioned):
    """The newest version of one key holds other bytes than its recorded
    CRC32 says: refused, and the older, good one restored. Another key whose
    only version is bad stays missing: exit 1, named."""
    config, bucket, revisions = versioned
    client = s3env.server().client()
    good, lost = sorted(revisions)[:2]
    for key in (good, lost):
        if key == lost:  # its good version is gone for good
            for version in client.list_object_versions(Bucket=bucket, Prefix=key)[
                "Versions"
            ]:
                client.delete_object(
                    Bucket=bucket, Key=key, VersionId=version["VersionId"]
                )
        client.put_object(
            Bucket=bucket,
            Key=key,
            Body=b"bit rot",
            Metadata={CHECKSUM_METADATA: crc32(revisions[key])},
        )
        client.delete_object(Bucket=bucket, Key=key)
    result = run("undelete", config)
    assert result.returncode == 1
    assert f"not found: {lost}" in result.stderr
    assert f"of {good}: its bytes have CRC32 {crc32(b'bit rot')}" in result.stderr
    code, report = run_json("undelete", config)
    assert report["not_found"] == [lost]
    assert client.get_object(Bucket=bucket, Key=good)["Body"].read() == revisions[good]


def test_a_version_above_the_multipart_threshold_is_copied_in_parts(tmp_path):
    """A single CopyObject fails above 5 GB: a version larger than
    s3-multipart-threshold is copied in parts (UploadPartCopy of that
    version), with its CRC32 recorded. The threshold is lowered to 1 KB so
    that a small blob shows it; the default one is the same code path."""
    config, bucket, revisions = versioned_config(
        tmp_path, [3000], 0, extra="s3-multipart-threshold 1KB"
    )
    client = s3env.server().client()
    ((key, data),) = revisions.items()
    client.delete_object(Bucket=bucket, Key=key)
    code, report = run_json("undelete", config)
    assert code == 0 and report["restored"] == [key], report
    restored = client.get_object(Bucket=bucket, Key=key)
    assert restored["Body"].read() == data
    assert restored["Metadata"][CHECKSUM_METADATA] == crc32(data)
    assert restored["ETag"].strip('"').endswith("-1"), "a multipart copy's ETag"


def test_without_versioning_nothing_can_be_restored(tmp_path):
    config = clitools.write_config(tmp_path, clitools.filestorage(tmp_path / "Data.fs"))
    revisions = clitools.commit_blobs(clitools.open_storage(config), [100])
    (ref,) = revisions
    key = clitools.layout(config).key(*ref)
    s3env.server().client().delete_object(Bucket=s3env.BUCKET, Key=key)
    result = run("undelete", config)
    assert result.returncode == 1
    assert "the bucket is not versioned" in result.stderr
    assert f"not found: {key}" in result.stderr


def _missing(client, bucket: str, key: str) -> bool:
    try:
        client.head_object(Bucket=bucket, Key=key)
    except client.exceptions.ClientError:
        return True
    return False


def test_versioning_that_may_not_be_read_is_unknown_not_an_error(s3_settings):
    """Credentials without s3:GetBucketVersioning get AccessDenied: the
    status is unknown, and undelete still tries the versions."""
    store = ObjectStore(s3_settings)
    try:
        assert store.versioning() is None, "the session's bucket: never versioned"
        with failing(store, "GetBucketVersioning"):
            assert store.versioning_if_readable() == "unknown"
        broken = failing(store, "GetBucketVersioning", code="InternalError", status=500)
        with broken, pytest.raises(ObjectStoreError, match="GET versioning"):
            store.versioning_if_readable()
    finally:
        store.close()
