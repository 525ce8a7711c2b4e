"""``zodb-s3blobs gc``: the orphan collector of ``pack()``, without a pack.

It calls the same :func:`zodb_s3blobs.gc.collect_orphans`, so the same
safety rules hold: keys of transactions newer than the base's last commit
and keys not of the layout are never touched.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from collections.abc import Iterator
from typing import Any

from ..config import retention_interval
from ..gc import CollectionReport, collect_orphans
from ..journal import JOURNAL_DIR, Owed, owed_copies
from . import EXIT_OK, CommandError, add_operator_options
from .output import counter, emit, human_size, problem, table
from .target import Target, load_target

DESCRIPTION = """\
Delete the S3 objects that no blob revision of the base storage in CONFIG
needs (what pack does after packing the base, without packing), or with
--dry-run only list them (--list lists those deleted, as they are deleted;
with --json the document counts them). The rules are
pack's: an object is kept while the base can load its revision; objects
of transactions newer than the base's last commit (still being committed)
and keys that are not of the [prefix/]blobs/OID/TID.blob layout are left
alone; deleted objects' cached
copies are removed from cache-dir if it exists and belongs to the user
running gc (it is never created, and only the files of deleted orphans are
removed; another user's cache is left to its own eviction). The base storage is opened
read-only. An orphan is deleted only once it has been found orphaned for
gc-retention (default 7d; --retention overrides it for one run): until then
it is pending, recorded with the time it was first found in
[prefix/]gc/pending.gz. A warning says when cache-dir belongs to another user
than the one running gc; on a terminal, a progress bar counts the keys
checked. The sources of the copies still owed to this bucket and prefix by
the journals in cache-dir/locks/ (a ZEO client killed before its commits'
copies were made) are kept, whatever their age: staging objects, and the
earlier revisions an undo copies from. They are counted: gc reads those
journals, never completes them (the next storage opened on cache-dir does).
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
    parser.add_argument(
        "--stale-in-flight",
        action="store_true",
        help="also delete keys newer than the base's last commit whose objects "
        "are more than a day old (left by a writer that never finished, or a "
        "far-future tid). Only from the live database: run from an older copy "
        "(a restored backup), this deletes the blobs committed since",
    )
    parser.add_argument(
        "--list",
        action="store_true",
        help="list the keys of the orphans as they are deleted (a dry run "
        "always lists those it would delete); not with --json",
    )
    parser.add_argument(
        "--retention",
        type=_retention,
        metavar="INTERVAL",
        help="for this run, keep orphans until found orphaned for INTERVAL "
        "(7d, 12h, 0: delete at once) instead of the configuration's "
        "gc-retention",
    )
    parser.set_defaults(run=run)
    return parser


def _retention(value: str) -> float:
    """``--retention``'s value in seconds; a clear usage error otherwise."""
    try:
        return retention_interval(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


class _NoCache:
    """Stands in for a cache-dir that does not exist (or that a dry run must
    not open): there is no cached copy of an orphan to discard."""

    def discard(self, oid: bytes, tid: bytes) -> None:
        """Nothing is cached: nothing to do."""


class _CountingStore:
    """The ObjectStore, with each key its listings yield counted on a
    progress bar: the collector checks each key as it is listed, so the bar
    shows how far it got (12 000 keys take half a minute)."""

    def __init__(self, store: Any, bar: Any) -> None:
        self._store = store
        self._bar = bar

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)

    def _counted(self, items: Iterator) -> Iterator:
        for item in items:
            self._bar.update(1)
            yield item

    def list(self, prefix: str) -> Iterator:
        """:meth:`ObjectStore.list`, counted."""
        return self._counted(self._store.list(prefix))

    def list_objects(self, prefix: str) -> Iterator:
        """:meth:`ObjectStore.list_objects`, counted."""
        return self._counted(self._store.list_objects(prefix))


class _KeyLines:
    """The orphans' keys printed as the collector settles them (deleted, or
    found by a dry run), under a heading printed with the first: a
    collection of millions of orphans never holds their keys."""

    def __init__(self, heading: str) -> None:
        self._heading = heading
        self.printed = 0

    def __call__(self, key: str) -> None:
        if not self.printed:
            print(f"\n{self._heading}")
        self.printed += 1
        print(f"  {key}", flush=True)


def _no_key(key: str) -> None:
    """Keys not asked for (or in a --json document: only counted)."""


def run(args: argparse.Namespace) -> int:
    """Collect (or list) orphans and report the counts and bytes."""
    if args.json and args.list:
        raise CommandError(
            "--list prints the keys as lines while they are deleted; with "
            "--json the document counts them: drop one of the two"
        )
    target = load_target(args.config, args.db)
    warning = target.cache_owner_warning()
    if warning:
        problem(warning)
    journals = os.path.join(target.cache_dir, JOURNAL_DIR)
    owed = _owed(journals, target.url())
    retention = args.retention
    if retention is None:
        retention = target.section.config.gc_retention
    with target.base() as base, target.store() as store:
        # A dry run deletes nothing, so has no cached copy to drop; nor is
        # another user's cache opened (its locks would become this user's):
        # a deleted orphan's cached copy is never read again, and is evicted
        # as the least recently used in time.
        mine = warning is None
        cache = target.existing_cache() if mine and not args.dry_run else None
        on_orphan = _no_key
        if not args.json:
            for line in _heading(args, target, retention, owed, journals):
                print(line)
            if args.dry_run or args.list:
                on_orphan = _KeyLines("Would delete:" if args.dry_run else "Deleted:")
        try:
            with counter("check keys", "keys") as bar:
                report = collect_orphans(
                    base,
                    _CountingStore(store, bar),
                    target.layout,
                    cache or _NoCache(),
                    dry_run=args.dry_run,
                    stale_in_flight=args.stale_in_flight,
                    owed=owed.keys,
                    retention=retention,
                    on_orphan=on_orphan,
                )
        finally:
            if cache is not None:
                cache.close()
    document = {
        "ok": True,
        "dry_run": args.dry_run,
        "retention": retention,
        "destination": target.url(),
        **dataclasses.asdict(report),
        "owed_copies": owed.copies,
        "owed_journals": owed.journals,
    }
    emit(args, document, _lines(args, report))
    return EXIT_OK


def _owed(journals: str, destination: str) -> Owed:
    """The copies owed to *destination* by the journals in *journals* (none
    if it does not exist); CommandError if it cannot be read: the objects
    they read from would not be kept."""
    try:
        return owed_copies(journals, destination)
    except OSError as exc:
        raise CommandError(
            f"cannot read the pending-copy journals in {journals} "
            f"({exc.strerror or exc}): the staging objects they owe could be "
            "deleted; run gc as the owner of cache-dir"
        ) from exc


def _heading(
    args: argparse.Namespace,
    target: Target,
    retention: float,
    owed: Owed,
    journals: str,
) -> list[str]:
    """The human report's first lines, printed before any key."""
    if args.dry_run:
        lines = [f"Orphans in {target.url()} (dry run: nothing deleted)"]
    else:
        lines = [f"Orphan collection in {target.url()}"]
    lines.append(f"Retention: {retention:g} s")
    if owed.copies:
        lines.append(
            f"{owed.copies} copies owed by journals in {journals}/ (completed "
            "when a storage opens there); the objects they copy from are kept"
        )
    return lines


def _lines(args: argparse.Namespace, report: CollectionReport) -> list[str]:
    """The human report after the keys: the collector's counts (and where
    to find the keys when they were not listed)."""
    lines = [""]
    lines += table(
        ["objects", "count"],
        [
            ["scanned", report.scanned],
            ["kept (a revision needs them)", report.kept],
            ["in flight (newer than the last commit)", report.in_flight],
            [
                "stale: above the last commit for over a day"
                + ("" if args.stale_in_flight else " (kept; --stale-in-flight)"),
                report.stale_in_flight,
            ],
            ["foreign (not of the layout, left alone)", report.foreign],
            ["staging (younger than a day, left alone)", report.staging],
            ["staging older than a day (orphans)", report.staging_expired],
            [
                f"pending: orphaned for less than the retention "
                f"({human_size(report.pending_bytes)}, kept)",
                report.pending,
            ],
            [f"orphans ({human_size(report.orphan_bytes)})", report.orphans],
            [f"deleted ({human_size(report.deleted_bytes)})", report.deleted],
            [
                "incomplete multipart uploads older than a day"
                + (" (to abort)" if args.dry_run else " (aborted)"),
                report.uploads_stale,
            ],
        ],
    )
    if report.deleted and not args.list:
        lines += ["", "The keys deleted: run with --list to list them."]
    return lines
