"""``zodb-s3blobs verify``: does every blob revision of the base storage have
its object in S3, with the right bytes (``--checksums``, see
:mod:`.checksums`)? And, when CONFIG reads through a fallback, can it go?

The base's last transaction is read before S3 is listed, and only revisions
up to it are checked: their objects were uploaded before they committed, so
a commit running meanwhile is never reported missing.
"""

from __future__ import annotations

import argparse
import contextlib
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from ..cache import revision_path
from ..keys import hex_id
from . import EXIT_FAILED, EXIT_OK, UsageError, add_operator_options
from .checksums import (
    GONE,
    MATCH,
    MISMATCH,
    SIZE_MATCH,
    UNREADABLE,
    CachedCopies,
    Check,
    Checked,
    Copies,
    Downloads,
    SourceCopies,
    StateFile,
    check_all,
)
from .history import blob_revisions, counted, keeps_history
from .migrate import add_source_options, open_source
from .output import (
    add_progress_option,
    emit,
    problem,
    table,
    use_progress_interval,
)
from .sources import BlobDirSource, BlobRevision, RelStorageSource
from .target import Target, load_target

DESCRIPTION = """\
Check that every blob revision the base storage in CONFIG holds has its
object in S3: the current revision of each blob by default, every revision
the base keeps with --all-revisions. Lists the missing ones (oid, tid, key)
and exits 1 if there are any. --sizes also compares each object's size with
the blob's local copy: the file in cache-dir, or with --from-blob-dir or
--from-relstorage the source a migration read (either implies --sizes); a
size that differs also makes it exit 1.

--checksums proves the bytes: each object's CRC32, recorded at upload, is
compared with the same reference (with a fallback-blob-dir or
fallback-blob-chunk in CONFIG and no source given, the fallback, as with
--from-blob-dir or --from-relstorage), or with --download with the CRC32 of
the object downloaded again. Objects written by zodb-s3blobs 1.x record no
CRC32: they are compared by size and counted apart. A CRC32 or size that
differs, or an object that cannot be read, makes it exit 1. With --state
FILE each object checked is recorded in FILE as it is checked; a rerun with
the same FILE skips those that passed, so an interrupted run resumes.

With a fallback in CONFIG, the report says whether the fallback can be
removed: every blob revision the base holds is in S3 (for a site copy's
fallback-s3-prefix, under CONFIG's own prefix; a history-preserving base
needs --all-revisions to know) and nothing else is wrong.

The base storage is opened read-only; cache-dir is only read. On a terminal,
progress bars count what was read.
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
    parser.add_argument(
        "--checksums",
        action="store_true",
        help="compare each object's recorded CRC32 with the source given, the "
        "fallback in CONFIG, or the cached copy (1.x objects by size)",
    )
    parser.add_argument(
        "--download",
        action="store_true",
        help="with --checksums: compare with the CRC32 of each object "
        "downloaded again (finds objects damaged in S3)",
    )
    parser.add_argument(
        "--state",
        metavar="FILE",
        help="with --checksums: record each object checked in FILE, and skip "
        "those an earlier run with this FILE verified (resumes a run)",
    )
    add_progress_option(parser)
    parser.set_defaults(run=run)
    return parser


def check_options(args: argparse.Namespace) -> None:
    """Refuse options that need --checksums without it, and --download
    with a source (it compares with S3's own bytes, not a copy)."""
    for option, given in (("--download", args.download), ("--state", args.state)):
        if given and not args.checksums:
            raise UsageError(f"{option} goes with --checksums")
    if args.download and (args.from_blob_dir is not None or args.from_relstorage):
        raise UsageError(
            "--download compares each object with its own recorded CRC32: "
            "leave out --from-blob-dir and --from-relstorage"
        )


@dataclass
class Report:
    """What verify found: missing objects, sizes that differ, and with
    --checksums what checking the bytes found."""

    revisions: int = 0
    present: int = 0
    missing: list[dict] = field(default_factory=list)
    compared_with: str | None = None
    compared: int = 0
    differing: list[dict] = field(default_factory=list)
    checksums: Checked | None = None
    #: Whether every revision the base holds was checked, not only current ones.
    whole_history: bool = False

    @property
    def ok(self) -> bool:
        failed = self.checksums is not None and self.checksums.failed
        return not self.missing and not self.differing and not failed


def _entry(target: Target, oid: bytes, tid: bytes) -> dict:
    return {"oid": hex_id(oid), "tid": hex_id(tid), "key": target.layout.key(oid, tid)}


def _report_skipped(source: BlobDirSource | RelStorageSource) -> None:
    """Name on stderr each file the source left out: it was not compared."""
    for entry in source.skipped:
        problem(f"skipped {entry['path']}: {entry['reason']}")


@contextlib.contextmanager
def _local_sizes(
    args: argparse.Namespace, target: Target, base: Any
) -> Iterator[tuple[str, Callable[[bytes, bytes], int | None]]]:
    """What --sizes compares with, and a function giving a revision's local
    size (None: no local copy): the source given, else the cached file."""
    if args.from_blob_dir is not None or args.from_relstorage:
        with open_source(args, target, base) as source:
            sizes = {(r.oid, r.tid): r.size for r in source.revisions()}
            _report_skipped(source)
            yield source.describe(), lambda oid, tid: sizes.get((oid, tid))
        return
    directory = target.cache_dir  # only read: no BlobCache is opened

    def cached_size(oid: bytes, tid: bytes) -> int | None:
        try:
            return os.lstat(revision_path(directory, oid, tid)).st_size
        except (FileNotFoundError, NotADirectoryError):
            return None

    yield f"cache-dir {target.cache_dir}", cached_size


def configured_fallback(target: Target) -> argparse.Namespace | None:
    """CONFIG's fallback (``fallback-blob-dir PATH`` or ``fallback-blob-chunk
    true``) as the source options that read it, or None without one."""
    config = target.section.config
    directory = getattr(config, "fallback_blob_dir", None)
    if directory:
        return argparse.Namespace(from_blob_dir=directory, from_relstorage=False)
    if getattr(config, "fallback_blob_chunk", False):
        return argparse.Namespace(from_blob_dir=None, from_relstorage=True)
    return None


def fallback_key(fallback: argparse.Namespace) -> str:
    """The configuration key that names *fallback*, with its value."""
    if fallback.from_blob_dir is not None:
        return f"fallback-blob-dir {fallback.from_blob_dir}"
    return "fallback-blob-chunk true"


@contextlib.contextmanager
def _copies(args: argparse.Namespace, target: Target, base: Any) -> Iterator[Copies]:
    """What --checksums compares with: downloads, the source given, the
    fallback in CONFIG, else the cached files."""
    if args.download:
        yield Downloads()
        return
    given = args.from_blob_dir is not None or args.from_relstorage
    options = args if given else configured_fallback(target)
    if options is None:
        yield CachedCopies(target.cache_dir)
        return
    with open_source(options, target, base) as source:
        yield SourceCopies(source)
        _report_skipped(source)


@contextlib.contextmanager
def _state(
    args: argparse.Namespace, target: Target, copies: Copies
) -> Iterator[StateFile | None]:
    """The --state file, for this destination and reference."""
    if args.state is None:
        yield None
        return
    header = {"destination": target.url(), "compared_with": copies.describe()}
    with StateFile(args.state, header).opened() as state:
        yield state


def _check_bytes(
    args: argparse.Namespace,
    target: Target,
    base: Any,
    store: Any,
    existing: dict[str, int],
    present: list[tuple[bytes, bytes]],
) -> Checked:
    """--checksums: check the objects of the *present* revisions."""
    listed = []
    for oid, tid in present:
        key = target.layout.key(oid, tid)
        listed.append((BlobRevision(oid, tid, existing[key]), key))
    with _copies(args, target, base) as copies, _state(args, target, copies) as state:
        concurrency = target.settings.max_concurrency
        return check_all(listed, store, copies, concurrency, state)


def _compare_sizes(
    args: argparse.Namespace,
    target: Target,
    base: Any,
    existing: dict[str, int],
    present: list[tuple[bytes, bytes]],
    report: Report,
) -> None:
    """--sizes: compare the listed sizes of the *present* revisions."""
    with _local_sizes(args, target, base) as (where, local_size):
        report.compared_with = where
        for oid, tid in counted(present, "compare sizes", "blobs"):
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


def verify(args: argparse.Namespace, target: Target) -> Report:
    """Check the base's blob revisions against one listing of S3."""
    report = Report()
    with target.base() as base, target.store() as store:
        until = base.lastTransaction()
        existing = dict(counted(store.list(target.layout.root), "list S3", "keys"))
        revisions = blob_revisions(base, until, args.all_revisions)
        report.revisions = len(revisions)
        report.whole_history = args.all_revisions or not keeps_history(base)
        present = []
        for oid, tid in revisions:
            if target.layout.key(oid, tid) in existing:
                present.append((oid, tid))
            else:
                report.missing.append(_entry(target, oid, tid))
        report.present = len(present)
        if args.checksums:
            report.checksums = _check_bytes(
                args, target, base, store, existing, present
            )
        elif args.sizes or args.from_blob_dir is not None or args.from_relstorage:
            _compare_sizes(args, target, base, existing, present, report)
    return report


@dataclass(frozen=True)
class Fallback:
    """CONFIG's fallback in words: the key(s) naming it, where the blobs
    must be before it can go, and the command that puts them there."""

    key: str
    destination: str
    migrate: str


def configured(target: Target) -> Fallback | None:
    """CONFIG's fallback (a blob directory, blob_chunk, or a parent prefix),
    or None without one."""
    config = target.section.config
    prefix = getattr(config, "fallback_s3_prefix", None)
    if prefix:
        key = f"fallback-s3-prefix {prefix}"
        bucket = getattr(config, "fallback_s3_bucket", None)
        if bucket:
            key += f" and fallback-s3-bucket {bucket}"
        command = f"zodb-s3blobs migrate --from-s3-prefix {prefix}"
        return Fallback(key, "this storage's own prefix", command)
    fallback = configured_fallback(target)
    if fallback is None:
        return None
    return Fallback(fallback_key(fallback), "S3", "zodb-s3blobs migrate")


def fallback_verdict(target: Target, report: Report) -> dict | None:
    """Whether CONFIG's fallback can be removed, and if not why; None when
    CONFIG has none."""
    fallback = configured(target)
    if fallback is None:
        return None
    if report.missing:
        reason = (
            f"{len(report.missing)} blob revision(s) are not in "
            f"{fallback.destination} yet, only in the fallback: run "
            f"{fallback.migrate}, then verify again"
        )
    elif not report.whole_history:
        reason = (
            "only current revisions were checked: verify --all-revisions "
            "tells whether the older ones the base keeps are in S3 too"
        )
    elif not report.ok:
        reason = "fix the problems found first"
    else:
        reason = None
    return {
        "key": fallback.key,
        "removable": reason is None,
        "not_in_s3": len(report.missing),
        "reason": reason,
    }


def _check_entry(target: Target, check: Check) -> dict:
    """A check that failed, for the JSON document: oid, tid, key, then what
    was found (CRC32s and sizes, or the error)."""
    oid, tid = target.layout.parse(check.key)
    found = {
        name: value
        for name, value in vars(check).items()
        if name not in ("key", "outcome") and value is not None
    }
    return {**_entry(target, oid, tid), "outcome": check.outcome, **found}


def _checksums_document(
    args: argparse.Namespace, target: Target, checked: Checked
) -> dict:
    """The ``checksums`` part of the JSON document."""
    by_size = checked.outcome(SIZE_MATCH)
    return {
        "compared_with": checked.compared_with,
        "state": args.state,
        "checked": len(checked.checks),
        "matching": len(checked.outcome(MATCH)),
        "compared_by_size": {
            "count": len(by_size),
            "keys": [check.key for check in by_size],
        },
        "verified_earlier": checked.verified_earlier,
        "no_copy": checked.no_copy,
        "differing": [_check_entry(target, c) for c in checked.outcome(MISMATCH)],
        "unreadable": [
            _check_entry(target, c) for c in checked.outcome(UNREADABLE, GONE)
        ],
    }


def _problems(report: Report, target: Target) -> None:
    """Name what is wrong on stderr, one line per kind of problem."""
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
    if report.checksums is None:
        return
    differing = report.checksums.outcome(MISMATCH)
    if differing:
        first = differing[0]
        problem(
            f"{len(differing)} object(s) differ from "
            f"{report.checksums.compared_with} (first: {first.key}, CRC32 "
            f"{first.s3_crc32 or 'not recorded'} and {first.s3_size} bytes in S3, "
            f"{first.local_crc32 or 'not computed'} and {first.local_size} local)"
        )
    unreadable = report.checksums.outcome(UNREADABLE, GONE)
    if unreadable:
        first = unreadable[0]
        problem(
            f"{len(unreadable)} object(s) could not be checked (first: "
            f"{first.key}: {first.error})"
        )


def run(args: argparse.Namespace) -> int:
    """Verify, print the report, and name the problems on stderr."""
    use_progress_interval(args)
    check_options(args)
    target = load_target(args.config, args.db)
    report = verify(args, target)
    scope = "all" if args.all_revisions else "current"
    _problems(report, target)
    fallback = fallback_verdict(target, report)
    document = {
        "ok": report.ok,
        "revisions_checked": scope,
        "destination": target.url(),
        "revisions": report.revisions,
        "present": report.present,
        "missing": report.missing,
        "fallback_removable": None if fallback is None else fallback["removable"],
        "fallback": fallback,
    }
    if report.compared_with is not None:
        document["sizes"] = {
            "compared_with": report.compared_with,
            "compared": report.compared,
            "differing": report.differing,
        }
    if report.checksums is not None:
        document["checksums"] = _checksums_document(args, target, report.checksums)
    lines = _lines(report, scope, target)
    lines[-1:-1] = _fallback_lines(fallback, target)
    emit(args, document, lines)
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
    if report.checksums is not None:
        rows += _checksum_rows(report.checksums)
    lines += table(["", "count"], rows)
    if report.compared_with is not None:
        lines.append(f"(sizes compared with {report.compared_with})")
    if report.checksums is not None:
        lines.append(f"(checksums compared with {report.checksums.compared_with})")
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
    if report.checksums is not None:
        lines += _failed_check_lines(report.checksums)
    lines += ["", "OK" if report.ok else "PROBLEMS FOUND"]
    return lines


def _checksum_rows(checked: Checked) -> list[list[object]]:
    """The counts of --checksums, for the table of the human report."""
    return [
        ["checksums matching", len(checked.outcome(MATCH))],
        ["sizes matching (1.x, no checksum)", len(checked.outcome(SIZE_MATCH))],
        ["checksums differing", len(checked.outcome(MISMATCH))],
        ["could not be checked", len(checked.outcome(UNREADABLE, GONE))],
        ["no copy to compare with", checked.no_copy],
        ["verified by an earlier run", checked.verified_earlier],
    ]


def _failed_check_lines(checked: Checked) -> list[str]:
    """The objects whose bytes differ, and those that could not be checked."""
    lines = []
    differing = checked.outcome(MISMATCH)
    if differing:
        lines += ["", "Checksum or size differs:"]
        lines += table(
            ["key", "S3 CRC32", "local CRC32", "S3 bytes", "local bytes"],
            [
                [
                    c.key,
                    c.s3_crc32 or "-",
                    c.local_crc32 or "-",
                    c.s3_size,
                    c.local_size,
                ]
                for c in differing
            ],
        )
    unreadable = checked.outcome(UNREADABLE, GONE)
    if unreadable:
        lines += ["", "Could not be checked:"]
        lines += table(["key", "cause"], [[c.key, c.error] for c in unreadable])
    return lines


def _fallback_lines(fallback: dict | None, target: Target) -> list[str]:
    """Whether the fallback can be removed, in plain words."""
    if fallback is None:
        return []
    if fallback["removable"]:
        return [
            "",
            "The fallback is no longer needed: every blob revision the base holds "
            f"is in S3. Remove {fallback['key']} from the <s3blobstorage> section "
            f"of {target.path}.",
        ]
    return [
        "",
        f"The fallback ({fallback['key']}) is still needed: {fallback['reason']}.",
    ]
