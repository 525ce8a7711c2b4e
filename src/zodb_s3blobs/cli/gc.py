"""``zodb-s3blobs gc``: the orphan collector of ``pack()``, without a pack.

It calls the same :func:`zodb_s3blobs.gc.collect_orphans`, so the same
safety rules hold: keys of transactions newer than the base's last commit
and keys not of the layout are never touched.
"""

from __future__ import annotations

import argparse
import dataclasses

from ..gc import CollectionReport, collect_orphans
from . import EXIT_OK, add_operator_options
from .output import emit, human_size, table
from .target import Target, load_target

DESCRIPTION = """\
Delete the S3 objects that no blob revision of the base storage in CONFIG
needs (what pack does after packing the base, without packing), or with
--dry-run only list them. The rules are pack's: an object is kept while the
base can load its revision; objects of transactions newer than the base's
last commit (still being committed) and keys that are not of the
[prefix/]blobs/OID/TID.blob layout are left alone; deleted objects' cached
copies are removed from cache-dir. The base storage is opened read-only.
"""


def register(
    subparsers: argparse._SubParsersAction[argparse.ArgumentParser],
) -> argparse.ArgumentParser:
    """Add the ``gc`` command to the ``zodb-s3blobs`` parser."""
    parser = subparsers.add_parser(
        "gc",
        help="delete S3 objects no blob revision needs (pack's collector)",
        description=DESCRIPTION,
    )
    add_operator_options(parser)
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="list the orphans, delete nothing",
    )
    parser.set_defaults(run=run)
    return parser


def run(args: argparse.Namespace) -> int:
    """Collect (or list) orphans and report the counts and bytes."""
    target = load_target(args.config, args.db)
    with target.base() as base, target.store() as store:
        cache = target.cache()
        try:
            report = collect_orphans(
                base, store, target.layout, cache, dry_run=args.dry_run
            )
        finally:
            cache.close()
    document = {
        "ok": True,
        "dry_run": args.dry_run,
        "destination": target.url(),
        **dataclasses.asdict(report),
    }
    emit(args, document, _lines(args, report, target))
    return EXIT_OK


def _lines(
    args: argparse.Namespace, report: CollectionReport, target: Target
) -> list[str]:
    """The human report: the collector's counts, and with --dry-run the keys."""
    title = "Orphans in" if args.dry_run else "Orphan collection in"
    note = " (dry run: nothing deleted)" if args.dry_run else ""
    lines = [f"{title} {target.url()}{note}", ""]
    lines += table(
        ["objects", "count"],
        [
            ["scanned", report.scanned],
            ["kept (a revision needs them)", report.kept],
            ["in flight (newer than the last commit)", report.in_flight],
            ["foreign (not of the layout, left alone)", report.foreign],
            [f"orphans ({human_size(report.orphan_bytes)})", len(report.orphans)],
            ["deleted", report.deleted],
        ],
    )
    if args.dry_run and report.orphans:
        lines += ["", "Would delete:", *(f"  {key}" for key in report.orphans)]
    return lines
