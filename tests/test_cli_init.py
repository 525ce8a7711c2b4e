"""``zodb-s3blobs init``, run as a user would, on moto and on Ceph RGW: a
fresh bucket is created with the recommended lifecycle rules, an existing
one gets the rules, a foreign rule is kept, a rule that would lose blobs is
reported and not changed; then ``check`` is clean."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest
import ZODB
from ZODB.FileStorage import FileStorage

import clitools
from clitools import run, run_json

pytestmark = pytest.mark.s3_servers("moto", "rgw")

FOREIGN_RULE = {
    "ID": "logs expire",
    "Status": "Enabled",
    "Filter": {"Prefix": "logs/"},
    "Expiration": {"Days": 7},
}


def new_bucket_config(tmp_path: Path, create: bool) -> tuple[Path, str]:
    """CONFIG on a bucket of this test alone (created if *create*), around
    an existing FileStorage; and the bucket's name."""
    bucket = f"zodb-init-{uuid.uuid4().hex[:12]}"
    if create:
        client().create_bucket(Bucket=bucket)
    return bucket_config(tmp_path, bucket, "db"), bucket


def bucket_config(directory: Path, bucket: str, prefix: str) -> Path:
    """CONFIG of a database under *prefix* of *bucket*, around an existing
    FileStorage, with its own cache, all in *directory*."""
    directory.mkdir(exist_ok=True)
    ZODB.DB(FileStorage(str(directory / "x.fs"))).close()
    config = clitools.write_config(
        directory, clitools.filestorage(directory / "x.fs"), prefix=prefix
    )
    text = config.read_text()
    config.write_text(
        text.replace(f"bucket-name {clitools.s3env.BUCKET}", f"bucket-name {bucket}")
    )
    return config


def client():
    return clitools.s3env.server().client()


def rules(bucket: str) -> dict[str, dict]:
    answer = client().get_bucket_lifecycle_configuration(Bucket=bucket)
    return {rule["ID"]: rule for rule in answer["Rules"]}


def assert_check_is_clean(config: Path) -> None:
    result = run("check", config)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    [lifecycle] = [line for line in result.stdout.splitlines() if "lifecycle" in line]
    assert lifecycle.split()[:2] == ["lifecycle", "ok"]
    assert result.stdout.splitlines()[-1] == "OK"


def failed_init(config: Path) -> list[str]:
    """The problems ``init`` names on stderr, after checking it exits 1."""
    result = run("init", config)
    assert result.returncode == 1, result.stdout
    return result.stderr.splitlines()


STAGING_ID = "zodb-s3blobs expire db/staging/"
BLOBS_ID = "zodb-s3blobs abort-multipart db/blobs/"


def test_a_fresh_bucket_is_created_with_the_rules(tmp_path):
    config, bucket = new_bucket_config(tmp_path, create=False)
    result = run("init", config)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    lines = result.stdout.splitlines()
    assert lines[1].split()[:2] == ["bucket", "created"]
    assert [line.split()[-2:] for line in lines[2:4]] == [
        ["expire", "db/staging/"],
        ["abort-multipart", "db/blobs/"],
    ]
    assert all(" added " in line for line in lines[2:4])
    assert lines[-1] == "OK"
    found = rules(bucket)
    assert set(found) == {STAGING_ID, BLOBS_ID}
    assert found[STAGING_ID]["Expiration"] == {"Days": 2}
    assert found[STAGING_ID]["AbortIncompleteMultipartUpload"] == {
        "DaysAfterInitiation": 2
    }
    assert found[BLOBS_ID]["AbortIncompleteMultipartUpload"] == {
        "DaysAfterInitiation": 2
    }
    assert "Expiration" not in found[BLOBS_ID]
    assert_check_is_clean(config)
    code, again = run_json("init", config)  # a second run changes nothing
    assert code == 0
    assert again["created"] is False
    assert again["rules_added"] == again["rules_replaced"] == []
    assert sorted(again["rules_present"]) == sorted([STAGING_ID, BLOBS_ID])


def test_an_existing_bucket_keeps_a_foreign_rule(tmp_path):
    config, bucket = new_bucket_config(tmp_path, create=True)
    client().put_bucket_lifecycle_configuration(
        Bucket=bucket, LifecycleConfiguration={"Rules": [FOREIGN_RULE]}
    )
    code, before = run_json("check", config)
    assert code == 0
    [lifecycle] = [c for c in before["checks"] if c["name"] == "lifecycle"]
    assert lifecycle["status"] == "warning"
    assert STAGING_ID in lifecycle["detail"] and BLOBS_ID in lifecycle["detail"]
    assert "zodb-s3blobs init" in lifecycle["detail"]

    code, report = run_json("init", config)
    assert code == 0, report
    assert report["created"] is False
    assert sorted(report["rules_added"]) == sorted([STAGING_ID, BLOBS_ID])
    assert report["rules_kept"] == ["logs expire"]
    found = rules(bucket)
    assert set(found) == {"logs expire", STAGING_ID, BLOBS_ID}
    assert found["logs expire"]["Expiration"] == {"Days": 7}
    assert_check_is_clean(config)


def test_a_dry_run_changes_nothing(tmp_path):
    config, bucket = new_bucket_config(tmp_path, create=False)
    result = run("init", config, "--dry-run")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[1].split()[:3] == ["bucket", "would", "create"]
    assert sum("would add" in line for line in lines) == 2
    assert "The lifecycle configuration it would write:" in lines
    assert '"Prefix": "db/staging/"' in result.stdout
    assert lines[-1] == "Nothing changed (dry run)"
    assert bucket not in {b["Name"] for b in client().list_buckets()["Buckets"]}


def test_a_foreign_rule_expiring_blobs_is_reported_not_changed(tmp_path):
    """A rule init did not write that expires objects under blobs/ would
    delete committed blobs: init names it and exits 1 without touching it,
    and check fails on it."""
    config, bucket = new_bucket_config(tmp_path, create=True)
    danger = {**FOREIGN_RULE, "ID": "tidy up", "Filter": {"Prefix": "db/"}}
    client().put_bucket_lifecycle_configuration(
        Bucket=bucket, LifecycleConfiguration={"Rules": [danger]}
    )
    assert failed_init(config) == [
        "zodb-s3blobs: lifecycle rule 'tidy up', not written by zodb-s3blobs, "
        "would lose blobs: it expires objects under db/blobs/; remove it or "
        "narrow its filter (rules zodb-s3blobs did not write are never changed)"
    ]
    found = rules(bucket)
    assert found["tidy up"]["Expiration"] == {"Days": 7}
    assert found["tidy up"]["Filter"] == {"Prefix": "db/"}
    code, report = run_json("check", config)
    assert code == 1
    [lifecycle] = [c for c in report["checks"] if c["name"] == "lifecycle"]
    assert lifecycle["status"] == "failed"
    assert "'tidy up'" in lifecycle["detail"]


def test_versioning_adds_non_current_expiry(tmp_path):
    config, bucket = new_bucket_config(tmp_path, create=True)
    code, report = run_json("init", config, "--versioning")
    assert code == 0, report
    assert report["versioning_enabled"] is True
    answer = client().get_bucket_versioning(Bucket=bucket)
    assert answer["Status"] == "Enabled"
    found = rules(bucket)
    for rule_id in (STAGING_ID, BLOBS_ID):
        assert found[rule_id]["NoncurrentVersionExpiration"]["NoncurrentDays"] == 30
    assert_check_is_clean(config)


@pytest.mark.s3_servers("moto")
def test_a_bucket_is_created_in_its_region(tmp_path):
    """Outside us-east-1, S3 needs the region as the bucket's location
    constraint."""
    config, bucket = new_bucket_config(tmp_path, create=False)
    config.write_text(
        config.read_text().replace("s3-region us-east-1", "s3-region eu-central-1")
    )
    code, report = run_json("init", config)
    assert code == 0, report
    assert report["region"] == "eu-central-1"
    location = client().get_bucket_location(Bucket=bucket)["LocationConstraint"]
    assert location == "eu-central-1"


def lifecycle_check(config: Path) -> dict:
    code, report = run_json("check", config)
    [lifecycle] = [c for c in report["checks"] if c["name"] == "lifecycle"]
    assert code == (1 if lifecycle["status"] == "failed" else 0), report
    return lifecycle


def test_the_staging_rule_of_one_database_is_named_for_another_s_blobs(tmp_path):
    """Failed before the fix: the staging rule init wrote for a database
    without s3-prefix (filter ``staging/``) expires the blobs of a database
    whose s3-prefix is ``staging`` (``staging/blobs/``), but every rule with
    init's IDs was skipped: init and check of the second said nothing."""
    config, bucket = new_bucket_config(tmp_path, create=True)
    production = bucket_config(tmp_path / "production", bucket, "")
    copy = bucket_config(tmp_path / "copy", bucket, "staging")
    assert run_json("init", production)[0] == 0
    assert failed_init(copy) == [
        "zodb-s3blobs: lifecycle rule 'zodb-s3blobs expire staging/', written by "
        "zodb-s3blobs init for other objects, would lose blobs: it expires "
        "objects under staging/blobs/; the folders of two databases overlap: "
        "give this one an s3-prefix outside the other's (init never changes "
        "that rule)"
    ]
    assert rules(bucket)["zodb-s3blobs expire staging/"]["Expiration"] == {"Days": 2}
    lifecycle = lifecycle_check(copy)
    assert lifecycle["status"] == "failed"
    assert "'zodb-s3blobs expire staging/'" in lifecycle["detail"]
    assert lifecycle_check(production)["status"] == "ok"
    lifecycle = lifecycle_check(config)  # db/: no overlap, no rules of its own
    assert lifecycle["status"] == "warning"
    assert lifecycle["detail"].startswith(f"bucket {bucket!r} lacks the recommended")


def test_plain_init_adds_no_non_current_expiry_to_a_versioned_bucket(tmp_path):
    """Failed before the fix: on a bucket whose versioning the operator
    turned on, keeping non-current versions a year, a plain init added a
    30-day non-current expiry to its rules (S3 applies the earliest)."""
    config, bucket = new_bucket_config(tmp_path, create=True)
    client().put_bucket_versioning(
        Bucket=bucket, VersioningConfiguration={"Status": "Enabled"}
    )
    year = {
        "ID": "keep a year",
        "Status": "Enabled",
        "Filter": {"Prefix": ""},
        "NoncurrentVersionExpiration": {"NoncurrentDays": 365},
    }
    client().put_bucket_lifecycle_configuration(
        Bucket=bucket, LifecycleConfiguration={"Rules": [year]}
    )
    code, report = run_json("init", config)
    assert code == 0, report
    assert sorted(report["rules_added"]) == sorted([STAGING_ID, BLOBS_ID])
    added = [rules(bucket)[rule_id] for rule_id in report["rules_added"]]
    assert not any("NoncurrentVersionExpiration" in rule for rule in added)
    assert_check_is_clean(config)
    code, report = run_json("init", config, "--versioning")  # asked for: added
    assert sorted(report["rules_replaced"]) == sorted([STAGING_ID, BLOBS_ID])
    assert rules(bucket)[BLOBS_ID]["NoncurrentVersionExpiration"] == {
        "NoncurrentDays": 30
    }
    code, report = run_json("init", config)  # and kept by a plain init
    assert (code, report["rules_replaced"], report["rules_changed"]) == (0, [], [])
    assert rules(bucket)[BLOBS_ID]["NoncurrentVersionExpiration"] == {
        "NoncurrentDays": 30
    }
    assert_check_is_clean(config)


def test_a_rule_of_init_changed_by_hand_is_kept_unless_forced(tmp_path):
    """Failed before the fix: init silently wrote back its own form of a
    rule with its ID that the operator had changed."""
    config, bucket = new_bucket_config(tmp_path, create=True)
    assert run_json("init", config)[0] == 0
    changed = rules(bucket)
    changed[BLOBS_ID]["AbortIncompleteMultipartUpload"] = {"DaysAfterInitiation": 7}
    client().put_bucket_lifecycle_configuration(
        Bucket=bucket, LifecycleConfiguration={"Rules": list(changed.values())}
    )
    result = run("init", config)
    assert result.returncode == 0, result.stderr
    assert result.stderr.splitlines() == [
        f"zodb-s3blobs: note: lifecycle rule {BLOBS_ID!r} differs from what "
        "zodb-s3blobs init writes: kept as it is (--force writes it again)"
    ]
    assert f"kept (changed by hand)  {BLOBS_ID}" in result.stdout
    days = rules(bucket)[BLOBS_ID]["AbortIncompleteMultipartUpload"]
    assert days == {"DaysAfterInitiation": 7}
    lifecycle = lifecycle_check(config)
    assert lifecycle["status"] == "warning"
    assert lifecycle["detail"].startswith(
        f"{BLOBS_ID!r} differ from what zodb-s3blobs init writes"
    )
    code, report = run_json("init", config, "--force")
    assert (code, report["rules_replaced"]) == (0, [BLOBS_ID])
    days = rules(bucket)[BLOBS_ID]["AbortIncompleteMultipartUpload"]
    assert days == {"DaysAfterInitiation": 2}
    assert_check_is_clean(config)
