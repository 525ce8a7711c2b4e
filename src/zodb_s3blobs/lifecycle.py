"""The bucket lifecycle rules a database's objects need, and how to add them
to a bucket's configuration without touching anybody else's.

Rules this package writes have IDs starting with :data:`RULE_ID_PREFIX` and
naming the folder they filter, so that databases sharing a bucket (each with
its ``s3-prefix``) keep rules of their own; one of ours an operator changed
is kept as changed. Every rule, ours for another folder too, is judged by
its filter against this database's blobs folder: one that expires its
current objects, or moves them where a restore is needed to read them, is
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


#: Filters on object size: every object has one, so such a rule is judged
#: as applying to every object under its prefix.
_SIZE_FILTERS = ("ObjectSizeGreaterThan", "ObjectSizeLessThan")


def _filter(rule: dict) -> dict | None:
    """*rule*'s filter as one flat dict (``Prefix`` always set, "" for the
    whole bucket), whichever way it is spelled; None when it filters on
    tags, which no object here has."""
    if "Prefix" in rule:  # the form before Filter existed
        return {"Prefix": rule["Prefix"]}
    rule_filter = dict(rule.get("Filter") or {})
    rule_filter.update(rule_filter.pop("And", None) or {})
    if "Tag" in rule_filter or "Tags" in rule_filter:
        return None
    return {"Prefix": "", **rule_filter}


def filter_prefix(rule: dict) -> str | None:
    """The key prefix *rule* applies to ("" for the whole bucket), size
    filters or not; None when it filters on tags."""
    found = _filter(rule)
    return None if found is None else found["Prefix"]


_ACTIONS = (
    "Expiration",
    "AbortIncompleteMultipartUpload",
    "NoncurrentVersionExpiration",
    "Transitions",
    "NoncurrentVersionTransitions",
)


def essentials(rule: dict) -> tuple:
    """What a rule does, in a form two servers' spellings of one rule share."""
    found = _filter(rule)
    return (
        rule.get("Status"),
        None if found is None else tuple(sorted(found.items())),
        tuple((name, repr(rule.get(name))) for name in _ACTIONS if rule.get(name)),
    )


#: Storage classes whose objects are read as any other: a transition to
#: one of them loses nothing. Any other class (GLACIER, DEEP_ARCHIVE, a
#: provider's own) is taken for one whose objects need a restore first.
READABLE_CLASSES = frozenset(
    {
        "STANDARD",
        "STANDARD_IA",
        "ONEZONE_IA",
        "INTELLIGENT_TIERING",
        "GLACIER_IR",
        "REDUCED_REDUNDANCY",
    }
)


def threat(rule: dict, layout: KeyLayout) -> str | None:
    """Why an enabled *rule*, whoever wrote it, would lose this database's
    blobs (it expires current objects under the blobs folder, or moves
    them to a class read only after a restore), or None."""
    if rule.get("Status") != "Enabled":
        return None
    prefix = filter_prefix(rule)
    if prefix is None or not (
        layout.root.startswith(prefix) or prefix.startswith(layout.root)
    ):
        return None
    expiration = rule.get("Expiration") or {}
    if "Days" in expiration or "Date" in expiration:
        return f"it expires objects under {layout.root}"
    archived = sorted(
        {
            str(transition.get("StorageClass"))
            for transition in rule.get("Transitions") or []
        }
        - READABLE_CLASSES
    )
    if archived:
        return (
            f"it moves objects under {layout.root} to storage class "
            f"{', '.join(archived)}, read only after a restore"
        )
    return None


def _threat_message(rule: dict, reason: str, own_ids: set[str]) -> str:
    """The problem a *rule* that would lose blobs for *reason* makes."""
    name = f"lifecycle rule {rule.get('ID')!r}"
    if rule.get("ID") in own_ids:
        return (
            f"{name}, changed since zodb-s3blobs init wrote it, would lose blobs: "
            f"{reason}; undo the change (zodb-s3blobs init --force writes it again)"
        )
    if is_ours(rule):
        return (
            f"{name}, written by zodb-s3blobs init for other objects, would lose "
            f"blobs: {reason}; the folders of two databases overlap: give this "
            "one an s3-prefix outside the other's (init never changes that rule)"
        )
    return (
        f"{name}, not written by zodb-s3blobs, would lose blobs: {reason}; "
        "remove it or narrow its filter (rules zodb-s3blobs did not write are "
        "never changed)"
    )


@dataclass
class Plan:
    """How a bucket's lifecycle configuration changes: the rules to add and
    to replace (ours, as init wrote them otherwise before), those already
    right, those of ours changed by hand (kept), and problems that stop the
    change (rules that would lose blobs, a staging folder holding other
    objects)."""

    add: list[dict] = field(default_factory=list)
    replace: list[dict] = field(default_factory=list)
    present: list[dict] = field(default_factory=list)
    #: Rules with the ID of one init writes, but changed by hand: kept.
    changed: list[dict] = field(default_factory=list)
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
    layout: KeyLayout,
    versioning: bool = False,
    staging_foreign: str | None = None,
    force: bool = False,
) -> Plan:
    """Add the :func:`recommended` rules (with *versioning*, those of a
    versioned bucket) to the *existing* ones. A rule of ours already there
    in either form init writes is kept (a plain init leaves the non-current
    expiry a ``--versioning`` run added), or replaced by the versioned form
    when *versioning*; one changed by hand is kept, unless *force*. Every
    other rule is kept as it is. With *staging_foreign* (a key under the
    staging folder that is not a staging object), the staging rule is left
    out: it would expire that object."""
    result = Plan()
    wanted = recommended(layout, versioning)
    written = {
        essentials(rule)
        for either in (False, True)
        for rule in recommended(layout, either)
    }
    own_ids = {rule["ID"] for rule in wanted}
    by_id = {rule.get("ID"): rule for rule in existing}
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
        elif essentials(old) == essentials(rule) or (
            not versioning and essentials(old) in written
        ):
            result.present.append(old)
        elif essentials(old) in written or force:
            result.replace.append(rule)
            replaced[rule["ID"]] = rule
        else:
            result.changed.append(old)
    result.rules = [replaced.get(rule.get("ID"), rule) for rule in existing]
    result.rules += result.add
    threats = [(rule, threat(rule, layout)) for rule in result.rules]
    result.problems[:0] = [
        _threat_message(rule, reason, own_ids) for rule, reason in threats if reason
    ]
    return result


def expires_noncurrent(rules: list[dict], layout: KeyLayout) -> bool:
    """Whether an enabled rule among *rules*, whoever wrote it, expires the
    non-current versions of every object under this database's blobs
    folder (a rule filtering on tags or sizes covers only some)."""
    for rule in rules:
        found = _filter(rule)
        if (
            rule.get("Status") == "Enabled"
            and rule.get("NoncurrentVersionExpiration")
            and found is not None
            and not any(name in found for name in _SIZE_FILTERS)
            and layout.root.startswith(found["Prefix"])
        ):
            return True
    return False


def noncurrent_rule(layout: KeyLayout) -> dict:
    """The rule ``zodb-s3blobs init --versioning`` writes for the blobs
    folder, which expires its non-current versions."""
    return recommended(layout, True)[1]
