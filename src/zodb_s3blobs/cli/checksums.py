"""``zodb-s3blobs verify --checksums``: prove the bytes of each object, not
only its key.

Each object's CRC32, recorded at upload in its metadata, is compared with a
reference copy: the source a migration read (a blob directory, RelStorage's
``blob_chunk``), the cached file, or a download of the object itself
(``--download``: finds an object damaged at rest, or a server that answers
other bytes than it stored). Objects written by zodb-s3blobs 1.x record no
CRC32: they are compared by size, and reported as such.

HEADs, downloads and local CRC32s run in a thread pool, one batch of
revisions at a time (a batch bounds the temporary files of a RelStorage
source or of downloads). With ``--state FILE`` every object checked is
recorded in FILE as it is checked, so a run interrupted can be resumed.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import asdict, dataclass
from typing import IO, TYPE_CHECKING, Protocol

from ..cache import revision_path
from ..errors import ChecksumMismatch, ObjectStoreError
from ..objectstore import ObjectInfo, file_crc32
from ..safefiles import UnsafeFileError, create_new, open_checked
from . import UsageError
from .migrate import BATCH_PER_SLOT, batches
from .output import counter
from .sources import BlobDirSource, BlobRevision, RelStorageSource

if TYPE_CHECKING:
    from ..objectstore import ObjectStore

#: Outcomes of one object's check, as reported and recorded in the state file.
MATCH = "match"  # the CRC32 and the size are the reference's
SIZE_MATCH = "size-match"  # no CRC32 recorded (1.x): the size is the reference's
MISMATCH = "mismatch"  # the CRC32 or the size differs
UNREADABLE = "unreadable"  # the object or its copy could not be read
GONE = "gone"  # the object was deleted after S3 was listed
#: Outcomes a rerun with the same state file does not check again.
PASSED = frozenset({MATCH, SIZE_MATCH})
#: The first line of a state file names what it is; the others are checks.
STATE_HEADER = "zodb-s3blobs verify --checksums"


@dataclass(frozen=True)
class Check:
    """What checking one object found (CRC32s as 8 hex digits)."""

    key: str
    outcome: str
    s3_size: int | None = None
    s3_crc32: str | None = None
    local_size: int | None = None
    local_crc32: str | None = None
    error: str | None = None


class Copies(Protocol):
    """Where the reference copies of the objects come from."""

    def describe(self) -> str:
        """The reference in words, for reports, and in a state file: one
        written comparing with a reference is not resumed with another."""

    def holds(self, oid: bytes, tid: bytes) -> bool:
        """Whether there is a copy of this revision to compare with."""

    def files(
        self, revisions: Sequence[BlobRevision]
    ) -> contextlib.AbstractContextManager[list[str | None]]:
        """A local path for each of *revisions*, valid inside the context
        (None: that copy could not be opened)."""

    def measure(
        self, store: ObjectStore, key: str, info: ObjectInfo, path: str
    ) -> tuple[int, str | None] | None:
        """Size and (when *info* records one) CRC32 of the copy at *path*, or
        None when it is gone (run in a worker thread)."""


def measure_file(path: str, with_crc: bool) -> tuple[int, str | None]:
    """Size of the file at *path* and, if *with_crc*, its CRC32."""
    return os.path.getsize(path), file_crc32(path) if with_crc else None


class SourceCopies:
    """The blob files of a migration source, listed once up front."""

    def __init__(self, source: BlobDirSource | RelStorageSource) -> None:
        self.source = source
        self._listed = {(r.oid, r.tid) for r in source.revisions()}

    def describe(self) -> str:
        return self.source.describe()

    def holds(self, oid: bytes, tid: bytes) -> bool:
        return (oid, tid) in self._listed

    def files(
        self, revisions: Sequence[BlobRevision]
    ) -> contextlib.AbstractContextManager[list[str | None]]:
        return self.source.files(revisions)

    def measure(
        self, store: ObjectStore, key: str, info: ObjectInfo, path: str
    ) -> tuple[int, str | None]:
        return measure_file(path, info.checksum is not None)


class CachedCopies:
    """The files of cache-dir, only read: one evicted meanwhile is no copy."""

    def __init__(self, directory: str) -> None:
        self.directory = directory

    def describe(self) -> str:
        return f"cache-dir {self.directory}"

    def _path(self, oid: bytes, tid: bytes) -> str:
        return revision_path(self.directory, oid, tid)

    def holds(self, oid: bytes, tid: bytes) -> bool:
        return os.path.isfile(self._path(oid, tid))

    def files(
        self, revisions: Sequence[BlobRevision]
    ) -> contextlib.AbstractContextManager[list[str | None]]:
        return contextlib.nullcontext([self._path(r.oid, r.tid) for r in revisions])

    def measure(
        self, store: ObjectStore, key: str, info: ObjectInfo, path: str
    ) -> tuple[int, str | None] | None:
        try:
            return measure_file(path, info.checksum is not None)
        except FileNotFoundError:
            return None


class Downloads:
    """Each object downloaded again, into a temporary file removed once
    measured: its bytes are compared with the CRC32 recorded with them."""

    def describe(self) -> str:
        return "a download of each object"

    def holds(self, oid: bytes, tid: bytes) -> bool:
        return True

    @contextlib.contextmanager
    def files(self, revisions: Sequence[BlobRevision]) -> Iterator[list[str | None]]:
        with tempfile.TemporaryDirectory(prefix="zodb-s3blobs-verify-") as tmp:
            yield [os.path.join(tmp, f"{n}.blob") for n in range(len(revisions))]

    def measure(
        self, store: ObjectStore, key: str, info: ObjectInfo, path: str
    ) -> tuple[int, str | None]:
        """Download *key* into *path* and measure what arrived.

        ``download`` refuses bytes whose CRC32 is not the recorded one (after
        one more try) with ChecksumMismatch: what it wrote is then all of the
        object's bytes, and measuring them turns the refusal into a mismatch
        naming both CRC32s. Any other failure (a ranged GET refused, leaving
        a hole) is raised: the object could not be checked."""
        try:
            with open(path, "wb") as out:
                try:
                    store.download(key, out)
                except ChecksumMismatch:
                    out.flush()  # ranges were written through another descriptor
            return measure_file(path, info.checksum is not None)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.remove(path)


def compare(key: str, info: ObjectInfo, local: tuple[int, str | None]) -> Check:
    """The outcome of comparing the object *info* describes with its copy."""
    size, crc = local
    if info.checksum is None:
        outcome = SIZE_MATCH if size == info.size else MISMATCH
    else:
        outcome = MATCH if (size, crc) == (info.size, info.checksum) else MISMATCH
    return Check(key, outcome, info.size, info.checksum, size, crc)


def check_one(store: ObjectStore, copies: Copies, key: str, path: str) -> Check | None:
    """HEAD *key* and compare it with the copy at *path* (run in a worker
    thread); None when the copy is gone. A failing request or an unreadable
    copy is an outcome, named with its cause, not an end to the run."""
    try:
        info = store.stat(key)
        if info is None:
            return Check(key, GONE, error="deleted from S3 after it was listed")
        local = copies.measure(store, key, info, path)
    except (ObjectStoreError, OSError) as exc:
        return Check(key, UNREADABLE, error=str(exc))
    return None if local is None else compare(key, info, local)


class StateFile:
    """The objects verified so far, one JSON line each, appended and flushed
    as they are checked.

    The first line names the destination and the reference compared with; a
    rerun with other ones is refused rather than trusting checks it did not
    make. A line torn by a crash is ignored (and ended, so the next line
    starts on its own); its object is simply checked again.
    """

    def __init__(self, path: str, header: dict[str, str]) -> None:
        self.path = path
        self.header = {"state": STATE_HEADER, **header}
        #: Keys whose last recorded check passed: not checked again.
        self.passed: set[str] = set()
        self._file: IO[bytes] | None = None

    @contextlib.contextmanager
    def opened(self) -> Iterator[StateFile]:
        """Read what earlier runs recorded, then keep FILE open to append."""
        with open(self._open(), "r+b") as file:
            text = file.read()
            if text:
                self._check_header(_json_lines(text.split(b"\n", 1)[0]))
                entries = _json_lines(text)
                outcomes = {entry.get("key"): entry.get("outcome") for entry in entries}
                self.passed = {key for key, out in outcomes.items() if out in PASSED}
            self._file = file
            if text and not text.endswith(b"\n"):
                file.write(b"\n")  # end the torn line
            if not text:
                self._write(self.header)
            yield self

    def _open(self) -> int:
        """A file descriptor of FILE, to read and append: a new file (mode
        0600: it names keys and the bucket), or an existing regular file of
        this user that no other user may write, never through a link. A file
        another user could plant or change could make a rerun skip damaged
        objects as verified; one with another name (a hard link) may be any
        file, another user's link to one of root's too."""
        flags = os.O_RDWR | os.O_APPEND
        try:
            try:
                return create_new(self.path, flags, 0o600)
            except FileExistsError:
                return open_checked(
                    self.path, flags, os.geteuid(), None, single_link=True
                )
        except UnsafeFileError as exc:
            raise UsageError(
                f"--state {exc}: give a file of your own that no other user "
                "may write, in a directory only you can write (not /tmp or "
                "/var/tmp)"
            ) from None
        except OSError as exc:
            raise UsageError(f"--state {self.path}: {exc.strerror}") from None

    def _check_header(self, first_line: list[dict]) -> None:
        """Refuse a file whose *first_line* (its JSON object, if it is one)
        is not the header of a state file (a mistyped --state must not get
        lines appended), or records checks of another destination or
        against another reference."""
        header = first_line[0] if first_line else {}
        if header.get("state") != STATE_HEADER:
            raise UsageError(
                f"--state {self.path}: not a state file of verify --checksums "
                "(its first line is not the header this command writes): give "
                "a new file, or an empty one"
            )
        for name, value in self.header.items():
            if header.get(name) != value:
                raise UsageError(
                    f"--state {self.path} records checks with {name} "
                    f"{header.get(name)!r}, this run's is {value!r}: give another "
                    "state file (or remove this one to start again)"
                )

    def _write(self, entry: dict) -> None:
        self._file.write(json.dumps(entry).encode() + b"\n")
        self._file.flush()

    def record(self, check: Check) -> None:
        """Append *check*, flushed, so an interruption right after keeps it."""
        self._write({k: v for k, v in asdict(check).items() if v is not None})


def _json_lines(text: bytes) -> list[dict]:
    """The JSON objects of *text*, one a line; a line that is not one (cut
    off by a crash mid-write) is left out."""
    entries = []
    for line in text.decode("utf-8", "replace").splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if isinstance(entry, dict):
            entries.append(entry)
    return entries


@dataclass
class Checked:
    """What one run of the checks found."""

    #: The reference, in words.
    compared_with: str
    #: The objects checked by this run.
    checks: list[Check]
    #: Not checked: verified by an earlier run (the state file says so).
    verified_earlier: int
    #: Not checked: no copy to compare with.
    no_copy: int

    def outcome(self, *outcomes: str) -> list[Check]:
        """The checks that ended in one of *outcomes*."""
        return [check for check in self.checks if check.outcome in outcomes]

    @property
    def failed(self) -> list[Check]:
        """The checks that found a problem: differing bytes, or none to read."""
        return self.outcome(MISMATCH, UNREADABLE, GONE)


def check_all(
    revisions: Iterable[tuple[BlobRevision, str]],
    store: ObjectStore,
    copies: Copies,
    concurrency: int,
    state: StateFile | None,
) -> Checked:
    """Check each ``(revision, key)`` (the revision's size: the object's
    listed one) against *copies*, *concurrency* at a time, with a progress
    bar; skip those *state* says passed, record the others in it."""
    passed = state.passed if state is not None else set()
    todo, earlier, no_copy = [], 0, 0
    for revision, key in revisions:
        if key in passed:
            earlier += 1
        elif not copies.holds(revision.oid, revision.tid):
            no_copy += 1
        else:
            todo.append((revision, key))
    checks: list[Check] = []
    with counter("verify checksums", "blobs", len(todo)) as bar:
        for batch in batches(todo, BATCH_PER_SLOT * concurrency):
            listed = [revision for revision, _key in batch]
            # The pool ends first: no job outlives the files it reads.
            with copies.files(listed) as paths, _pool(concurrency) as pool:
                futures = [
                    pool.submit(check_one, store, copies, key, path)
                    for (_revision, key), path in zip(batch, paths, strict=True)
                    if path is not None
                ]
                no_copy += len(batch) - len(futures)
                bar.update(len(batch) - len(futures))
                for future in as_completed(futures):
                    check = future.result()
                    bar.update(1)
                    if check is None:
                        no_copy += 1
                        continue
                    checks.append(check)
                    if state is not None:
                        state.record(check)
    checks.sort(key=lambda check: check.key)  # they end in any order
    return Checked(copies.describe(), checks, earlier, no_copy)


@contextlib.contextmanager
def _pool(workers: int) -> Iterator[ThreadPoolExecutor]:
    """A thread pool whose queued jobs are cancelled on the way out (Ctrl-C):
    only the running ones are waited for."""
    pool = ThreadPoolExecutor(workers, thread_name_prefix="zodb-s3blobs-verify")
    try:
        yield pool
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
