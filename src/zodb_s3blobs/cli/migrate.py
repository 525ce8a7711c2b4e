"""``zodb-s3blobs migrate``: upload the blobs of an existing database to S3.

S3 is listed once; a revision whose object is there with the same size is
skipped, so a run that was interrupted or failed can simply be run again.
Uploads go in parallel (``s3-max-concurrency`` at once), in batches that
bound the temporary space a RelStorage source needs.
"""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..errors import ObjectStoreError
from . import EXIT_FAILED, EXIT_OK, CommandError, add_operator_options
from .output import (
    add_progress_option,
    emit,
    human_size,
    problem,
    progress,
    table,
    use_progress_interval,
)
from .parentsource import ParentPrefixSource
from .sources import BlobDirSource, BlobRevision, RelStorageSource
from .target import Target, load_target

if TYPE_CHECKING:
    from ..objectstore import ObjectStore

#: A batch of uploads holds at most this many bytes (unless one blob is
#: larger), which bounds the temporary files of a RelStorage source.
BATCH_BYTES = 256 << 20
#: ... and at most this many blobs per upload slot, so progress shows often.
BATCH_PER_SLOT = 4

DESCRIPTION = """\
Upload the blobs of an existing ZODB database to the keys CONFIG's
<s3blobstorage> reads them from: from a blob directory (a FileStorage's
blob-dir or a ZEO server's blob directory, bushy or lawn layout) with
--from-blob-dir, or from the blob_chunk table of the RelStorage that is the
base storage in CONFIG with --from-relstorage. A copy of a site that reads
its parent's prefix (fallback-s3-prefix) copies every blob revision its base
storage holds from there into its own prefix with --from-s3-prefix PREFIX,
server-side (in CONFIG's fallback-s3-bucket, or the same bucket); the parent
is only read, and once verify says so it is no longer needed. Objects
already in S3 with the same size are skipped, so running it again resumes an
interrupted run and uploads only what is missing. Nothing is deleted.
"""


def register(
    subparsers: argparse._SubParsersAction[argparse.ArgumentParser],
) -> argparse.ArgumentParser:
    """Add the ``migrate`` command to the ``zodb-s3blobs`` parser."""
    parser = subparsers.add_parser(
        "migrate",
        help="upload the blobs of a blob directory or RelStorage to S3",
        description=DESCRIPTION,
    )
    add_operator_options(parser)
    sources = add_source_options(parser, required=True)
    sources.add_argument(
        "--from-s3-prefix",
        metavar="PREFIX",
        help="the parent site's s3-prefix, which a copy of the site reads "
        "through fallback-s3-prefix: copy server-side every revision its base "
        "storage holds",
    )
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="list what would be uploaded, upload nothing",
    )
    add_progress_option(parser)
    parser.set_defaults(run=run)
    return parser


def add_source_options(
    parser: argparse.ArgumentParser, required: bool
) -> argparse._MutuallyExclusiveGroup:
    """Add the mutually exclusive --from-blob-dir and --from-relstorage, and
    return their group."""
    group = parser.add_mutually_exclusive_group(required=required)
    group.add_argument(
        "--from-blob-dir",
        metavar="DIR",
        help="a ZODB blob directory: a FileStorage's blob-dir or a ZEO "
        "server's blob dir (not a ZEO client's blob cache)",
    )
    group.add_argument(
        "--from-relstorage",
        action="store_true",
        help="the blob_chunk table of the RelStorage base storage in CONFIG",
    )
    return group


#: What migrate reads from.
Source = BlobDirSource | RelStorageSource | ParentPrefixSource


@contextlib.contextmanager
def open_source(
    args: argparse.Namespace,
    target: Target,
    base: Any = None,
    store: ObjectStore | None = None,
    existing: dict[str, int] | None = None,
) -> Iterator[Source]:
    """The source the options name, closed on exit; --from-relstorage and
    --from-s3-prefix read *base* if given, else open CONFIG's base storage
    for the purpose. --from-s3-prefix also needs *store* and its listing
    *existing*."""
    if args.from_blob_dir is not None:
        yield BlobDirSource(args.from_blob_dir)
        return
    with contextlib.ExitStack() as stack:
        if base is None:
            base = stack.enter_context(target.base())
        prefix = getattr(args, "from_s3_prefix", None)
        if prefix is not None:
            assert store is not None and existing is not None
            source: Source = ParentPrefixSource(prefix, target, base, store, existing)
        else:
            source = RelStorageSource(base)
        stack.callback(source.close)
        yield source


@dataclass
class Plan:
    """What the source holds, what S3 has already, and what is left to upload."""

    found: int = 0
    found_bytes: int = 0
    present: int = 0
    present_bytes: int = 0
    uploads: list[tuple[BlobRevision, str]] = field(default_factory=list)
    #: Keys in S3 whose size differs from the source's: uploaded again.
    differing: list[str] = field(default_factory=list)

    @property
    def upload_bytes(self) -> int:
        return sum(revision.size for revision, _key in self.uploads)


def plan(
    revisions: Iterable[BlobRevision], existing: dict[str, int], target: Target
) -> Plan:
    """Sort the source's revisions into present (same size in S3) and to upload."""
    result = Plan()
    for revision in revisions:
        key = target.layout.key(revision.oid, revision.tid)
        result.found += 1
        result.found_bytes += revision.size
        size = existing.get(key)
        if size == revision.size:
            result.present += 1
            result.present_bytes += revision.size
            continue
        if size is not None:
            result.differing.append(key)
        result.uploads.append((revision, key))
    return result


def batches(
    uploads: list[tuple[BlobRevision, str]], count: int
) -> Iterator[list[tuple[BlobRevision, str]]]:
    """Split *uploads* into batches of at most *count* blobs and BATCH_BYTES."""
    batch: list[tuple[BlobRevision, str]] = []
    size = 0
    for upload in uploads:
        if batch and (len(batch) >= count or size + upload[0].size > BATCH_BYTES):
            yield batch
            batch, size = [], 0
        batch.append(upload)
        size += upload[0].size
    if batch:
        yield batch


def send(
    source: Source,
    store: ObjectStore,
    batch: list[tuple[BlobRevision, str]],
    replace: list[str],
) -> list[tuple[BlobRevision, str]]:
    """Upload (or copy server-side) one *batch*, writing over only the keys
    in *replace*; return what was sent (a source may skip files it can no
    longer open safely)."""
    if isinstance(source, ParentPrefixSource):
        store.transfer([], source.copies(batch), replace)
        return batch
    with source.files([revision for revision, _key in batch]) as paths:
        sent = [
            (path, revision, key)
            for path, (revision, key) in zip(paths, batch, strict=True)
            if path is not None
        ]
        store.transfer([(path, key) for path, _r, key in sent], [], replace)
    return [(revision, key) for _path, revision, key in sent]


def upload(
    todo: Plan,
    source: Source,
    store: ObjectStore,
    concurrency: int,
) -> tuple[int, int]:
    """Upload the planned revisions batch by batch, with a progress bar, and
    return how many were uploaded and their bytes (a source may skip files it
    can no longer open safely); a failure says how far it got and that
    running again resumes."""
    done = done_bytes = 0
    with progress(todo.upload_bytes, "upload") as bar:
        for batch in batches(todo.uploads, BATCH_PER_SLOT * concurrency):
            try:
                # An object of another size (a partial upload, a stale copy)
                # is what migrate replaces; any other key in S3 by now holds
                # the same bytes or stays.
                sent = send(source, store, batch, todo.differing)
            except ObjectStoreError as exc:
                raise CommandError(
                    f"{exc} (before this batch, {done} of {len(todo.uploads)} "
                    "uploads were done; run migrate again to resume)"
                ) from exc
            done += len(sent)
            done_bytes += sum(revision.size for revision, _key in sent)
            bar.update(sum(revision.size for revision, _key in batch))
    return done, done_bytes


def run(args: argparse.Namespace) -> int:
    """Plan from one listing of S3, then upload (or with --dry-run list)."""
    use_progress_interval(args)
    target = load_target(args.config, args.db)
    with contextlib.ExitStack() as stack:
        store = stack.enter_context(target.store())
        existing = dict(store.list(target.layout.root))
        source = stack.enter_context(open_source(args, target, None, store, existing))
        todo = plan(source.revisions(), existing, target)
        uploaded = (len(todo.uploads), todo.upload_bytes)
        if not args.dry_run:
            uploaded = upload(todo, source, store, target.settings.max_concurrency)
        skipped = source.skipped
        for entry in skipped:
            problem(f"skipped {entry['path']}: {entry['reason']}")
        document = {
            "ok": not skipped,
            "dry_run": args.dry_run,
            "source": source.describe(),
            "destination": target.url(),
            "found": {"count": todo.found, "bytes": todo.found_bytes},
            "present": {"count": todo.present, "bytes": todo.present_bytes},
            "to_upload" if args.dry_run else "uploaded": {
                "count": uploaded[0],
                "bytes": uploaded[1],
            },
            "replaced": todo.differing,
            "skipped": {"count": len(skipped), "entries": skipped},
        }
        if args.dry_run:
            document["uploads"] = [
                {"key": key, "size": revision.size} for revision, key in todo.uploads
            ]
        lines = _lines(args, todo, uploaded, source.describe(), target)
        if skipped:
            lines += ["", f"{len(skipped)} skipped (named on stderr)"]
        emit(args, document, lines)
    if skipped:
        one = len(skipped) == 1
        if isinstance(source, ParentPrefixSource):
            entries = "blob revision was" if one else "blob revisions were"
        else:
            entries = (
                "entry of the blob directory was"
                if one
                else "entries of the blob directory were"
            )
        problem(
            f"{len(skipped)} {entries} skipped (named above): the run is not complete"
        )
        return EXIT_FAILED
    return EXIT_OK


def _lines(
    args: argparse.Namespace,
    todo: Plan,
    uploaded: tuple[int, int],
    source: str,
    target: Target,
) -> list[str]:
    """The human report: counts and bytes, and with --dry-run the keys."""
    verb = "would upload" if args.dry_run else "uploaded"
    lines = [f"Migrate {source} -> {target.url()}", ""]
    lines += table(
        ["", "blobs", "bytes"],
        [
            ["found", todo.found, human_size(todo.found_bytes)],
            ["already in S3", todo.present, human_size(todo.present_bytes)],
            [verb, uploaded[0], human_size(uploaded[1])],
        ],
    )
    if todo.differing:
        lines += [
            "",
            f"{len(todo.differing)} object(s) in S3 had another size and "
            + ("would be" if args.dry_run else "were")
            + " uploaded again",
        ]
    if args.dry_run and todo.uploads:
        lines += ["", *table(["key", "size"], [[k, r.size] for r, k in todo.uploads])]
    return lines
