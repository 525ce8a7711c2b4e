"""``zodb-s3blobs init``: set up the bucket CONFIG names, once, as the docs
recommend: create it if missing, add the lifecycle rules, and optionally
turn versioning on. Rules it did not write are kept as they are."""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, field

from ..lifecycle import Plan, is_ours, plan
from . import EXIT_FAILED, EXIT_OK, add_operator_options
from .output import emit, problem, table
from .target import Target, load_target

DESCRIPTION = """\
Set up the bucket of CONFIG's <s3blobstorage>: create it if it does not
exist (in s3-region), and add the lifecycle rules docs/reliability.md
recommends: objects under [prefix/]staging/ expire after 2 days, and
multipart uploads left unfinished there and under [prefix/]blobs/ are
aborted after 2 days. With --versioning, also turn versioning on and let
non-current versions expire after 30 days (only then: on a bucket whose
versioning is on already, a plain init adds no such expiry, which would
shorten a longer retention of the operator's). The rules it writes have IDs
starting with "zodb-s3blobs" and naming their folder; every other rule of
the bucket is kept as it is, and so is one of its own an operator changed
(named on stderr; --force writes it again). Any rule, one it wrote for
another database's folder too, that would expire objects under
[prefix/]blobs/ or move them to a storage class read only after a restore
(GLACIER, DEEP_ARCHIVE) is reported, not changed, and makes it exit 1, as
does an object under [prefix/]staging/ that is no staging object (the
staging rule would delete it; that rule is then not added). Running it again
changes nothing. Needs s3:CreateBucket, s3:PutLifecycleConfiguration and
their Get counterparts (and s3:PutBucketVersioning for --versioning),
rights the storage itself does not need.
"""


def register(
    subparsers: argparse._SubParsersAction[argparse.ArgumentParser],
) -> argparse.ArgumentParser:
    """Add the ``init`` command to the ``zodb-s3blobs`` parser."""
    parser = subparsers.add_parser(
        "init",
        help="create the bucket and add the recommended lifecycle rules",
        description=DESCRIPTION,
    )
    add_operator_options(parser)
    parser.add_argument(
        "--versioning",
        action="store_true",
        help="also turn the bucket's versioning on, with a rule expiring "
        "non-current versions after 30 days",
    )
    parser.add_argument(
        "--force",
        action="store_true",
        help="write again the rules of init's IDs an operator changed "
        "(by default they are kept as changed, and named)",
    )
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="print what would be done, change nothing",
    )
    parser.set_defaults(run=run)
    return parser


@dataclass
class Setup:
    """What init found and did (or, in a dry run, would do)."""

    region: str | None
    created: bool = False
    versioning: str | None = None
    versioning_enabled: bool = False
    plan: Plan = field(default_factory=Plan)


def set_up(target: Target, versioning: bool, force: bool, dry_run: bool) -> Setup:
    """Bring the bucket to the recommended set-up (unless *dry_run*); with
    *force*, rewrite rules of ours an operator changed."""
    with target.store() as store:
        setup = Setup(store.clients[0].meta.region_name)
        exists = store.bucket_exists()
        if not exists:
            setup.created = True
            if not dry_run:
                store.create_bucket()
        existing: list[dict] = []
        staging_foreign = None
        if exists:
            setup.versioning = store.versioning()
            existing = store.lifecycle_rules()
            layout = target.layout
            staging_foreign = next(
                (
                    key
                    for key, _size in store.list(layout.staging_root)
                    if not layout.is_staging_key(key)
                ),
                None,
            )
        if versioning and setup.versioning != "Enabled":
            setup.versioning_enabled = True
            if not dry_run:
                store.enable_versioning()
        setup.plan = plan(existing, target.layout, versioning, staging_foreign, force)
        if setup.plan.changes and not dry_run:
            store.put_lifecycle_rules(setup.plan.rules)
    return setup


def _rows(setup: Setup, bucket: str, dry_run: bool) -> list[list[str]]:
    """The table: the bucket, its versioning, then every lifecycle rule."""
    done = {"create": "created", "enable": "enabled", "add": "added"}
    if dry_run:
        done = {"create": "would create", "enable": "would enable", "add": "would add"}
    done["replace"] = "would replace" if dry_run else "replaced"
    where = f" in {setup.region}" if setup.region else ""
    rows = [
        ["bucket", done["create"] if setup.created else "exists", f"{bucket}{where}"]
    ]
    if setup.versioning_enabled:
        rows.append(["versioning", done["enable"], "Enabled"])
    elif setup.versioning:
        rows.append(["versioning", "unchanged", setup.versioning])
    changed = {id(rule) for rule in setup.plan.add + setup.plan.replace}
    for rule in setup.plan.rules:
        if id(rule) in changed:
            what = done["add"] if rule in setup.plan.add else done["replace"]
        elif is_ours(rule) and rule in setup.plan.present:
            what = "present"
        elif rule in setup.plan.changed:
            what = "kept (changed by hand)"
        else:
            what = "kept" if not is_ours(rule) else "kept (another prefix)"
        rows.append(["lifecycle rule", what, str(rule.get("ID", "(no ID)"))])
    return rows


def run(args: argparse.Namespace) -> int:
    """Create the bucket and add the rules; print what was done."""
    target = load_target(args.config, args.db)
    setup = set_up(target, args.versioning, args.force, args.dry_run)
    found = setup.plan
    for message in found.problems:
        problem(message)
    for rule in found.changed:
        problem(
            f"note: lifecycle rule {rule['ID']!r} differs from what zodb-s3blobs "
            "init writes: kept as it is (--force writes it again)"
        )
    bucket = target.settings.bucket
    document = {
        "ok": not found.problems,
        "dry_run": args.dry_run,
        "bucket": bucket,
        "region": setup.region,
        "created": setup.created,
        "versioning": "Enabled" if setup.versioning_enabled else setup.versioning,
        "versioning_enabled": setup.versioning_enabled,
        "rules_added": [rule["ID"] for rule in found.add],
        "rules_replaced": [rule["ID"] for rule in found.replace],
        "rules_present": [rule["ID"] for rule in found.present],
        "rules_changed": [rule["ID"] for rule in found.changed],
        "rules_kept": [
            rule.get("ID")
            for rule in found.rules
            if rule not in found.add + found.replace + found.present + found.changed
        ],
        "problems": found.problems,
        "lifecycle": {"Rules": found.rules},
    }
    lines = table(["what", "action", "name"], _rows(setup, bucket, args.dry_run))
    if args.dry_run and found.changes:
        lines += ["", "The lifecycle configuration it would write:"]
        lines += json.dumps({"Rules": found.rules}, indent=2).splitlines()
    if found.problems:
        lines += ["", f"{len(found.problems)} problem(s), each named on stderr"]
    else:
        lines += ["", "Nothing changed (dry run)" if args.dry_run else "OK"]
    emit(args, document, lines)
    return EXIT_FAILED if found.problems else EXIT_OK
