"""How ``lifecycle`` judges a bucket's rules against one database's blobs
folder, without a server: which filters apply to it, which actions lose
blobs. ``init`` and ``check`` act on it (tests/test_cli_init.py)."""

from __future__ import annotations

import pytest

from zodb_s3blobs.keys import KeyLayout
from zodb_s3blobs.lifecycle import plan, threat

LAYOUT = KeyLayout("")


def rule(rule_filter: dict, **actions) -> dict:
    return {"ID": "theirs", "Status": "Enabled", "Filter": rule_filter, **actions}


EXPIRE = {"Expiration": {"Days": 90}}


@pytest.mark.parametrize(
    "rule_filter",
    [
        {"ObjectSizeGreaterThan": 0},
        {"ObjectSizeLessThan": 1 << 40},
        {"And": {"Prefix": "blobs/", "ObjectSizeGreaterThan": 1048576}},
        {"And": {"ObjectSizeGreaterThan": 0, "ObjectSizeLessThan": 1 << 30}},
    ],
)
def test_a_size_filter_applies_to_the_prefix_it_names(rule_filter):
    """Failed before the fix: a rule filtering on object size was taken for
    one no object here matches, though every object has a size."""
    assert threat(rule(rule_filter, **EXPIRE), LAYOUT) == (
        "it expires objects under blobs/"
    )
    assert (
        plan([rule(rule_filter, **EXPIRE)], LAYOUT)
        .problems[0]
        .startswith(
            "lifecycle rule 'theirs', not written by zodb-s3blobs, would lose blobs"
        )
    )


@pytest.mark.parametrize(
    "rule_filter",
    [
        {"And": {"Prefix": "logs/", "ObjectSizeGreaterThan": 0}},
        {"Tag": {"Key": "tmp", "Value": "1"}},
        {"And": {"Prefix": "", "Tags": [{"Key": "tmp", "Value": "1"}]}},
    ],
)
def test_a_rule_for_other_objects_is_no_threat(rule_filter):
    """Another folder, or tags (no object of the storage carries one)."""
    assert threat(rule(rule_filter, **EXPIRE), LAYOUT) is None


@pytest.mark.parametrize(
    "storage_class", ["INTELLIGENT_TIERING", "STANDARD_IA", "ONEZONE_IA", "GLACIER_IR"]
)
def test_a_transition_to_a_class_read_as_any_is_no_threat(storage_class):
    """Failed before the fix: any transition under blobs/ was a threat,
    though these classes are read without a restore."""
    transitions = [{"Days": 30, "StorageClass": storage_class}]
    assert threat(rule({"Prefix": ""}, Transitions=transitions), LAYOUT) is None


@pytest.mark.parametrize("storage_class", ["GLACIER", "DEEP_ARCHIVE"])
def test_a_transition_to_an_archive_class_is_a_threat(storage_class):
    transitions = [
        {"Days": 30, "StorageClass": "STANDARD_IA"},
        {"Days": 90, "StorageClass": storage_class},
    ]
    assert threat(rule({"Prefix": "blobs/"}, Transitions=transitions), LAYOUT) == (
        f"it moves objects under blobs/ to storage class {storage_class}, "
        "read only after a restore"
    )


def test_a_rule_of_ours_for_another_folder_is_judged_too():
    """Failed before the fix: every rule whose ID starts with zodb-s3blobs
    was skipped, so the staging rule of a database without s3-prefix
    expired the blobs of one whose s3-prefix is ``staging``."""
    [production_staging, _blobs] = plan([], LAYOUT).add
    other = KeyLayout("staging")
    reason = threat(production_staging, other)
    assert reason == "it expires objects under staging/blobs/"
    [message] = plan([production_staging], other).problems
    assert message.startswith(
        "lifecycle rule 'zodb-s3blobs expire staging/', written by zodb-s3blobs "
        "init for other objects, would lose blobs: it expires objects under "
        "staging/blobs/; the folders of two databases overlap"
    )
    assert plan(plan([], other).add, other).problems == []
