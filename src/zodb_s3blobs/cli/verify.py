"""``zodb-s3blobs verify``: does every blob revision of the base storage have
its object in S3?

The base's last transaction is read before S3 is listed, and only revisions
up to it are checked: their objects were uploaded before they committed, so
a commit running meanwhile is never reported missing.
"""

from __future__ import annotations

import argparse
import contextlib
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar

from ZODB.blob import is_blob_record

from ..cache import revision_path
from ..keys import hex_id
from . import EXIT_FAILED, EXIT_OK, add_operator_options
from .migrate import add_source_options, open_source
from .output import counter, emit, problem, table
from .target import Target, load_target

T = TypeVar("T")

DESCRIPTION = """\
Check that every blob revision the base storage in CONFIG holds has its
object in S3: the current revision of each blob by default, every revision
the base keeps with --all-revisions. Lists the missing ones (oid, tid, key)
and exits 1 if there are any. --sizes also compares each object's size with
the blob's local copy: the file in cache-dir, or with --from-blob-dir or
--from-relstorage the source a migration read (either implies --sizes); a
size that differs also makes it exit 1. The base storage is opened read-only;
cache-dir is only read. On a terminal, progress bars count what was read.
"""


def register(
    subparsers: argparse._SubParsersAction[argparse.ArgumentParser],
) -> argparse.ArgumentParser:
    """Add the ``verify`` command to the ``zodb-s3blobs`` parser."""
    parser = subparsers.add_parser(
        "verify",
        help="check that every blob revision has its object in S3",
        description=DESCRIPTION,
    )
    add_operator_options(parser)
    parser.add_argument(
        "--all-revisions",
        action="store_true",
        help="check every revision the base keeps (history), not only current ones",
    )
    parser.add_argument(
        "--sizes",
        action="store_true",
        help="compare sizes with the cached copy, or the source given",
    )
    add_source_options(parser, required=False)
    parser.set_defaults(run=run)
    return parser


def blob_revisions(
    base: Any, until: bytes, all_revisions: bool
) -> list[tuple[bytes, bytes]]:
    """``(oid, tid)`` of the blob revisions *base* holds up to tid *until*:
    all of them, or only each object's current one (a progress bar counts
    the transactions read, on a terminal)."""
    current: dict[bytes, bytes] = {}
    every: list[tuple[bytes, bytes]] = []
    transactions = base.iterator(None, until)
    try:
        for transaction in _counted(transactions, "read base", "txn"):
            for record in transaction:
                if is_blob_record(record.data):
                    current[record.oid] = record.tid
                    every.append((record.oid, record.tid))
                else:  # deleted, or no longer a blob
                    current.pop(record.oid, None)
    finally:
        if hasattr(transactions, "close"):  # FileStorage's iterator holds a file
            transactions.close()
    return every if all_revisions else sorted(current.items())


def _counted(items: Iterable[T], description: str, unit: str) -> Iterator[T]:
    """*items*, each counted on a progress bar while it is worked on (shown
    only on a terminal)."""
    with counter(description, unit) as bar:
        for item in items:
            yield item
            bar.update(1)


@dataclass
class Report:
    """What verify found: missing objects, and sizes that differ."""

    revisions: int = 0
    present: int = 0
    missing: list[dict] = field(default_factory=list)
    compared_with: str | None = None
    compared: int = 0
    differing: list[dict] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.missing and not self.differing


def _entry(target: Target, oid: bytes, tid: bytes) -> dict:
    return {"oid": hex_id(oid), "tid": hex_id(tid), "key": target.layout.key(oid, tid)}


@contextlib.contextmanager
def _local_sizes(
    args: argparse.Namespace, target: Target, base: Any
) -> Iterator[tuple[str, Callable[[bytes, bytes], int | None]]]:
    """What --sizes compares with, and a function giving a revision's local
    size (None: no local copy): the source given, else the cached file."""
    if args.from_blob_dir is not None or args.from_relstorage:
        with open_source(args, target, base) as source:
            sizes = {(r.oid, r.tid): r.size for r in source.revisions()}
            for entry in source.skipped:  # not compared: say so
                problem(f"skipped {entry['path']}: {entry['reason']}")
            yield source.describe(), lambda oid, tid: sizes.get((oid, tid))
        return
    directory = target.cache_dir  # only read: no BlobCache is opened

    def cached_size(oid: bytes, tid: bytes) -> int | None:
        try:
            return os.lstat(revision_path(directory, oid, tid)).st_size
        except (FileNotFoundError, NotADirectoryError):
            return None

    yield f"cache-dir {target.cache_dir}", cached_size


def verify(args: argparse.Namespace, target: Target) -> Report:
    """Check the base's blob revisions against one listing of S3."""
    report = Report()
    with target.base() as base, target.store() as store:
        until = base.lastTransaction()
        existing = dict(_counted(store.list(target.layout.root), "list S3", "keys"))
        revisions = blob_revisions(base, until, args.all_revisions)
        report.revisions = len(revisions)
        present = []
        for oid, tid in revisions:
            if target.layout.key(oid, tid) in existing:
                present.append((oid, tid))
            else:
                report.missing.append(_entry(target, oid, tid))
        report.present = len(present)
        if args.sizes or args.from_blob_dir is not None or args.from_relstorage:
            with _local_sizes(args, target, base) as (where, local_size):
                report.compared_with = where
                for oid, tid in _counted(present, "compare sizes", "blobs"):
                    size = local_size(oid, tid)
                    if size is None:
                        continue
                    report.compared += 1
                    s3_size = existing[target.layout.key(oid, tid)]
                    if size != s3_size:
                        entry = _entry(target, oid, tid)
                        report.differing.append(
                            {**entry, "s3_size": s3_size, "local_size": size}
                        )
    return report


def run(args: argparse.Namespace) -> int:
    """Verify, print the report, and name the problems on stderr."""
    target = load_target(args.config, args.db)
    report = verify(args, target)
    scope = "all" if args.all_revisions else "current"
    if report.missing:
        first = report.missing[0]["key"]
        problem(
            f"{len(report.missing)} of {report.revisions} blob revisions have no "
            f"object in s3://{target.settings.bucket}/ (first: {first})"
        )
    if report.differing:
        first = report.differing[0]
        problem(
            f"{len(report.differing)} object(s) differ in size from "
            f"{report.compared_with} (first: {first['key']}, "
            f"{first['s3_size']} bytes in S3, {first['local_size']} local)"
        )
    document = {
        "ok": report.ok,
        "revisions_checked": scope,
        "destination": target.url(),
        "revisions": report.revisions,
        "present": report.present,
        "missing": report.missing,
    }
    if report.compared_with is not None:
        document["sizes"] = {
            "compared_with": report.compared_with,
            "compared": report.compared,
            "differing": report.differing,
        }
    emit(args, document, _lines(report, scope, target))
    return EXIT_OK if report.ok else EXIT_FAILED


def _lines(report: Report, scope: str, target: Target) -> list[str]:
    """The human report: counts, then the missing and differing objects."""
    lines = [f"Verify {scope} blob revisions against {target.url()}", ""]
    rows = [
        ["blob revisions", report.revisions],
        ["in S3", report.present],
        ["missing", len(report.missing)],
    ]
    if report.compared_with is not None:
        rows += [
            ["sizes compared", report.compared],
            ["sizes differing", len(report.differing)],
        ]
    lines += table(["", "count"], rows)
    if report.compared_with is not None:
        lines.append(f"(sizes compared with {report.compared_with})")
    if report.missing:
        lines += ["", "Missing from S3:"]
        lines += table(
            ["oid", "tid", "key"],
            [[m["oid"], m["tid"], m["key"]] for m in report.missing],
        )
    if report.differing:
        lines += ["", "Size differs:"]
        lines += table(
            ["key", "S3 bytes", "local bytes"],
            [[d["key"], d["s3_size"], d["local_size"]] for d in report.differing],
        )
    lines += ["", "OK" if report.ok else "PROBLEMS FOUND"]
    return lines
