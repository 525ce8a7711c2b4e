"""The bucket lifecycle rules a database's objects need, and how to add them
to a bucket's configuration without touching anybody else's.

Rules this package writes have IDs starting with :data:`RULE_ID_PREFIX` and
naming the folder they filter, so that databases sharing a bucket (each with
its ``s3-prefix``) keep rules of their own. Any other rule is foreign: it is
kept as it is, and one that expires current objects of the blobs folder is
reported, never changed. No S3 client here: ``objectstore.py`` reads and
writes the configuration; this module only computes it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .keys import KeyLayout

#: The start of the ID of every rule zodb-s3blobs writes.
RULE_ID_PREFIX = "zodb-s3blobs"
#: Staging objects (and unfinished multipart uploads) older than this are
#: left by a process that died mid-transaction; a transaction copies its own
#: within seconds. The collector's grace period is a day: this is later.
STAGING_DAYS = 2
#: Unfinished multipart uploads of blobs older than this are abandoned.
ABORT_MULTIPART_DAYS = 2
#: Non-current versions (objects the collector deleted, in a versioned
#: bucket) are kept this long: a window to restore from, then freed.
NONCURRENT_DAYS = 30


def recommended(layout: KeyLayout, versioned: bool) -> list[dict]:
    """The rules docs/reliability.md recommends for the database under
    *layout*, in S3's format: staging objects expire, unfinished multipart
    uploads are aborted under both folders, and in a *versioned* bucket
    non-current versions expire (and the delete markers left alone then)."""
    abort = {
        "AbortIncompleteMultipartUpload": {"DaysAfterInitiation": ABORT_MULTIPART_DAYS}
    }
    noncurrent = (
        {"NoncurrentVersionExpiration": {"NoncurrentDays": NONCURRENT_DAYS}}
        if versioned
        else {}
    )
    staging = {
        "ID": rule_id(layout.staging_root, "expire"),
        "Status": "Enabled",
        "Filter": {"Prefix": layout.staging_root},
        "Expiration": {"Days": STAGING_DAYS},
        **abort,
        **noncurrent,
    }
    blobs = {
        "ID": rule_id(layout.root, "abort-multipart"),
        "Status": "Enabled",
        "Filter": {"Prefix": layout.root},
        **abort,
        **noncurrent,
    }
    if versioned:
        blobs["Expiration"] = {"ExpiredObjectDeleteMarker": True}
    return [staging, blobs]


def rule_id(folder: str, purpose: str) -> str:
    """The ID of the rule with *purpose* for objects under *folder*."""
    return f"{RULE_ID_PREFIX} {purpose} {folder}"


def is_ours(rule: dict) -> bool:
    """Was *rule* written by zodb-s3blobs (by its ID)?"""
    return str(rule.get("ID", "")).startswith(RULE_ID_PREFIX)


def filter_prefix(rule: dict) -> str | None:
    """The key prefix *rule* applies to ("" for the whole bucket), or None
    when it also filters on tags or sizes, which no object here has."""
    if "Prefix" in rule:  # the form before Filter existed
        return rule["Prefix"]
    rule_filter = rule.get("Filter") or {}
    if set(rule_filter) - {"Prefix", "And"}:
        return None
    both = rule_filter.get("And")
    if both is not None:
        return both.get("Prefix", "") if set(both) <= {"Prefix"} else None
    return rule_filter.get("Prefix", "")


_ACTIONS = (
    "Expiration",
    "AbortIncompleteMultipartUpload",
    "NoncurrentVersionExpiration",
    "Transitions",
    "NoncurrentVersionTransitions",
)


def essentials(rule: dict) -> tuple:
    """What a rule does, in a form two servers' spellings of one rule share."""
    return (
        rule.get("Status"),
        filter_prefix(rule),
        tuple((name, repr(rule.get(name))) for name in _ACTIONS if rule.get(name)),
    )


def threat(rule: dict, layout: KeyLayout) -> str | None:
    """Why an enabled foreign *rule* would lose blobs (it expires or moves
    to an archive class current objects under the blobs folder), or None."""
    if is_ours(rule) or rule.get("Status") != "Enabled":
        return None
    prefix = filter_prefix(rule)
    if prefix is None or not (
        layout.root.startswith(prefix) or prefix.startswith(layout.root)
    ):
        return None
    expiration = rule.get("Expiration") or {}
    if "Days" in expiration or "Date" in expiration:
        return f"it expires objects under {layout.root}"
    if rule.get("Transitions"):
        return f"it moves objects under {layout.root} to another storage class"
    return None


@dataclass
class Plan:
    """How a bucket's lifecycle configuration changes: the rules to add and
    to replace (ours, written differently before), those already right, and
    problems that stop the change (foreign rules that would lose blobs,
    a staging folder holding other objects)."""

    add: list[dict] = field(default_factory=list)
    replace: list[dict] = field(default_factory=list)
    present: list[dict] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    #: The whole configuration to write: every existing rule, ours changed.
    rules: list[dict] = field(default_factory=list)

    @property
    def changes(self) -> bool:
        return bool(self.add or self.replace)

    @property
    def missing(self) -> list[str]:
        """The IDs of the recommended rules the bucket lacks or has otherwise."""
        return [rule["ID"] for rule in self.add + self.replace]


def plan(
    existing: list[dict],
    wanted: list[dict],
    layout: KeyLayout,
    staging_foreign: str | None = None,
) -> Plan:
    """Add *wanted* to the *existing* rules: a rule of ours with a wanted ID
    is replaced when it differs, every other rule is kept as it is. With
    *staging_foreign* (a key under the staging folder that is not a staging
    object), the staging rule is left out: it would expire that object."""
    result = Plan()
    by_id = {rule.get("ID"): rule for rule in existing}
    for rule in existing:
        reason = threat(rule, layout)
        if reason:
            result.problems.append(
                f"lifecycle rule {rule.get('ID')!r}, not written by zodb-s3blobs, "
                f"would lose blobs: {reason}; remove it (rules zodb-s3blobs did "
                "not write are never changed)"
            )
    if staging_foreign is not None:
        result.problems.append(
            f"{staging_foreign} is under {layout.staging_root} but is no staging "
            "object: a rule expiring that folder would delete it; move it, or "
            "leave the staging objects to the collector (pack, zodb-s3blobs gc)"
        )
        wanted = [r for r in wanted if filter_prefix(r) != layout.staging_root]
    replaced = {}
    for rule in wanted:
        old = by_id.get(rule["ID"])
        if old is None:
            result.add.append(rule)
        elif essentials(old) == essentials(rule):
            result.present.append(old)
        else:
            result.replace.append(rule)
            replaced[rule["ID"]] = rule
    result.rules = [replaced.get(rule.get("ID"), rule) for rule in existing]
    result.rules += result.add
    return result
