"""``zodb-s3blobs undelete``: bring back the objects of blob revisions the
base storage holds but S3 lost (a backup restored after its orphans were
collected), from the non-current versions of a versioned bucket.

For each missing revision the newest non-current version is read and its
bytes checked against the CRC32 recorded in its metadata at upload; a
version whose bytes do not match is refused and the next older one tried.
The one that matches is copied server-side over the key (S3 keeps the
versions; nothing is deleted).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from . import EXIT_FAILED, EXIT_OK, add_operator_options
from .history import blob_revisions
from .output import counter, emit, problem, table
from .target import Target, load_target

if TYPE_CHECKING:
    from ..objectstore import ObjectStore

DESCRIPTION = """\
For every blob revision the base storage in CONFIG holds whose object is
missing from S3, restore the newest non-current version of its key where the
bucket is versioned: its bytes are read and checked against the CRC32
recorded in its metadata at upload (a version that does not match is
refused, and the next older one tried; one written without a CRC32 is
restored unchecked), then copied server-side over the key. Reports what was
restored and what could not be found, and exits 1 if anything stays
missing. This is the recovery path for a backup of the base storage older
than gc-retention. The base storage is opened read-only; on a terminal a
progress bar counts the missing revisions.
"""


def register(
    subparsers: argparse._SubParsersAction[argparse.ArgumentParser],
) -> argparse.ArgumentParser:
    """Add the ``undelete`` command to the ``zodb-s3blobs`` parser."""
    parser = subparsers.add_parser(
        "undelete",
        help="restore missing blob objects from a versioned bucket",
        description=DESCRIPTION,
    )
    add_operator_options(parser)
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="check which versions would be restored, copy nothing",
    )
    parser.set_defaults(run=run)
    return parser


@dataclass
class Report:
    """What undelete found and did."""

    versioning: str | None = None
    revisions: int = 0
    missing: int = 0
    restored: list[str] = field(default_factory=list)
    #: Restored from a version written without a CRC32 (zodb-s3blobs 1.x).
    unchecked: list[str] = field(default_factory=list)
    #: Versions refused: their bytes do not match their recorded CRC32.
    refused: list[dict] = field(default_factory=list)
    not_found: list[str] = field(default_factory=list)


def undelete(store: ObjectStore, key: str, report: Report, dry_run: bool) -> None:
    """Restore *key* from its newest good version, or note it not found."""
    for version in store.old_versions(key):
        recorded, actual = store.version_checksum(key, version)
        if recorded is not None and recorded != actual:
            report.refused.append(
                {"key": key, "version": version, "recorded": recorded, "crc32": actual}
            )
            continue
        if not dry_run:
            store.restore_version(key, version, recorded)
        (report.restored if recorded else report.unchecked).append(key)
        return
    report.not_found.append(key)


def run(args: argparse.Namespace) -> int:
    """Find the missing revisions, restore them, and report."""
    target = load_target(args.config, args.db)
    report = Report()
    with target.base() as base, target.store() as store:
        report.versioning = store.versioning_if_readable()
        revisions = blob_revisions(base, base.lastTransaction(), True)
        report.revisions = len(revisions)
        present = {key for key, _size in store.list(target.layout.root)}
        missing = [
            key
            for key in (target.layout.key(*r) for r in revisions)
            if key not in present
        ]
        report.missing = len(missing)
        if report.versioning is None:
            report.not_found = missing
        else:
            with counter("undelete", "blobs", len(missing)) as bar:
                for key in missing:
                    undelete(store, key, report, args.dry_run)
                    bar.update(1)
    _problems(report)
    document = {
        "ok": not report.not_found,
        "dry_run": args.dry_run,
        "destination": target.url(),
        **report.__dict__,
    }
    emit(args, document, _lines(args, report, target))
    return EXIT_FAILED if report.not_found else EXIT_OK


def _problems(report: Report) -> None:
    """Name what could not be restored on stderr."""
    if report.versioning is None and report.missing:
        problem(
            "the bucket is not versioned: nothing can be restored (turn "
            "versioning on to make later deletes recoverable)"
        )
    for refused in report.refused:
        problem(
            f"refused version {refused['version']} of {refused['key']}: its bytes "
            f"have CRC32 {refused['crc32']}, recorded {refused['recorded']}"
        )
    for key in report.not_found:
        problem(f"not found: {key}")


def _lines(args: argparse.Namespace, report: Report, target: Target) -> list[str]:
    """The human report."""
    note = " (dry run: nothing copied)" if args.dry_run else ""
    lines = [f"Undelete in {target.url()}{note}", ""]
    lines += table(
        ["revisions", "count"],
        [
            ["held by the base storage", report.revisions],
            ["missing from S3", report.missing],
            ["restored (CRC32 checked)", len(report.restored)],
            ["restored unchecked (no CRC32 recorded)", len(report.unchecked)],
            ["versions refused (CRC32 mismatch)", len(report.refused)],
            ["not found", len(report.not_found)],
        ],
    )
    lines.append(f"Bucket versioning: {report.versioning or 'off'}")
    return lines
