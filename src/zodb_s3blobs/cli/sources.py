"""Where existing blobs come from when a database moves to S3: a ZODB blob
directory (FileStorage ``blob-dir``, a ZEO server's blob dir), or RelStorage's
``blob_chunk`` table.

Both list every blob revision with its size up front, so ``migrate`` can skip
what S3 already holds without reading it, and both hand out local files for a
batch of revisions to upload.
"""

from __future__ import annotations

import binascii
import contextlib
import errno
import os
import shutil
import stat
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from ZODB.blob import BLOB_SUFFIX, LAYOUT_MARKER, LAYOUTS, auto_layout_select
from ZODB.utils import p64, repr_to_oid, u64

from ..fallback import CHUNK_SIZE_SQL
from . import UsageError


@dataclass(frozen=True)
class BlobRevision:
    """One blob revision of the source: object id, transaction id, byte size."""

    oid: bytes
    tid: bytes
    size: int


#: Why an entry of a blob directory was skipped (the ``reason`` reported).
SYMLINK = "a symbolic link, not a regular file"
NOT_REGULAR = "not a regular file"
BAD_NAME = "not a blob file name (TID.blob)"
VANISHED = "removed before it was read"
REMOVED = "removed before it was uploaded"
SWAPPED = (
    "cannot open it without following links (it, or a directory above it, was "
    "replaced by a symbolic link)"
)
HARD_LINKED = (
    "has other hard links (a link count above 1, beyond a pack's link from "
    "<blob-dir>.old): it may be a link to a file outside the blob directory"
)
#: Where a process may read an open file again by path (Linux): uploading
#: through it reads the very file opened, whatever its path points to now.
_FD_PATHS = "/proc/self/fd"


class _Refused(Exception):
    """A blob file opened is not one to read (``reason`` says why)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class BlobDirSource:
    """The blob files of a ZODB blob directory, in the bushy or lawn layout.

    A ZEO client's blob cache (layout ``zeocache``) is refused: it holds only
    the blobs that client happened to read. Without a ``.layout`` file (a
    directory copied with ``cp -r dir/*``) the layout is recognised from where
    the blob files are, not guessed.

    Only regular files are read: ``migrate`` typically runs as root, and the
    blob directory is writable by the Zope user, so a ``*.blob`` symlink could
    point at any file of the machine. Entries are checked with ``lstat`` when
    listed, and opened for the upload one directory at a time without
    following links (``O_NOFOLLOW``), so one swapped for a symlink meanwhile is
    not read either. An odd entry (a symlink, a malformed name, a file removed
    by a pack running meanwhile) does not stop the run: it is recorded in
    :attr:`skipped` for the caller to report.

    A hard link is a regular file too: the Zope user can link a file it may
    not read (on the same file system, where the kernel allows it) into the
    blob directory under a blob file's name. So a file with more than one link
    or owned by another user than the blob directory is skipped as well, both
    when listed and once opened. The top directory itself may be a symbolic
    link (the operator names it): it is resolved once, here.
    """

    def __init__(self, directory: str) -> None:
        self.directory = os.path.realpath(directory)
        if not os.path.isdir(self.directory):
            raise UsageError(f"--from-blob-dir {directory}: not a directory")
        #: The user owning the blob directory, who must own every blob file.
        self.owner = os.stat(self.directory).st_uid
        marker = os.path.join(self.directory, LAYOUT_MARKER)
        #: The layout, or None until the first blob file shows it.
        self.layout_name: str | None = None
        self.layout_source = "from its .layout file"
        if os.path.exists(marker):
            self.layout_name = auto_layout_select(self.directory)
        if self.layout_name == "zeocache":
            raise UsageError(
                f"--from-blob-dir {directory}: {marker} says this is a ZEO client's "
                "blob cache, which holds only the blobs that client read; use the "
                "ZEO server's blob directory"
            )
        if self.layout_name is not None and self.layout_name not in LAYOUTS:
            raise UsageError(
                f"--from-blob-dir {directory}: {marker} names the unknown layout "
                f"{self.layout_name!r} (expected bushy or lawn)"
            )
        self._paths: dict[tuple[bytes, bytes], str] = {}
        #: The entries left out: ``{"path": ..., "reason": ...}`` each.
        self.skipped: list[dict[str, str]] = []

    def describe(self) -> str:
        """The source in words, for reports."""
        if self.layout_name is None:
            return f"blob directory {self.directory} (no blob files found)"
        return (
            f"blob directory {self.directory} ({self.layout_name} layout, "
            f"{self.layout_source})"
        )

    def _skip(self, path: str, reason: str) -> None:
        self.skipped.append({"path": path, "reason": reason})

    def _refusal(self, path: str, st: os.stat_result) -> str | None:
        """Why the regular file *path* with status *st* is not read, or None.

        The one second link accepted is the one a FileStorage pack with
        ``pack-keep-old`` (the default) makes: the same file at the same place
        in ``<blob-dir>.old``, the copy of the blob directory before the pack.
        """
        if st.st_nlink > 1 and not (st.st_nlink == 2 and self._kept_by_pack(path, st)):
            return HARD_LINKED
        if st.st_uid != self.owner:
            return (
                f"owned by uid {st.st_uid}, not by the blob directory's owner "
                f"(uid {self.owner})"
            )
        return None

    def _kept_by_pack(self, path: str, st: os.stat_result) -> bool:
        """Whether *path* is also linked from ``<blob-dir>.old`` by a pack."""
        relative = os.path.relpath(path, self.directory)
        try:
            kept = os.lstat(os.path.join(self.directory + ".old", relative))
        except OSError:
            return False
        return (kept.st_dev, kept.st_ino) == (st.st_dev, st.st_ino)

    def _oid(self, relative: str) -> bytes | None:
        """The oid a directory (relative to the top) holds blobs of, in the
        layout of this directory; the first one decoded fixes the layout when
        no ``.layout`` file named it."""
        names = [self.layout_name] if self.layout_name else ["bushy", "lawn"]
        for name in names:
            try:
                oid = LAYOUTS[name].path_to_oid(relative)
            except (ValueError, TypeError, binascii.Error):
                continue
            if self.layout_name is None:
                self.layout_name = name
                self.layout_source = "recognised by its structure (no .layout file)"
            return oid
        return None

    def revisions(self) -> Iterator[BlobRevision]:
        """Every committed blob file's revision and size, in a stable order.

        Raises UsageError at the end if a directory with entries held no blob
        file at all: it is not a blob directory (or a wrong one)."""
        found = 0
        entries = [
            name
            for name in os.listdir(self.directory)
            if name not in (LAYOUT_MARKER, "tmp")
        ]

        def unreadable(exc: OSError) -> None:
            self._skip(exc.filename, f"cannot be read: {exc.strerror}")

        for parent, dirs, names in os.walk(self.directory, onerror=unreadable):
            relative = os.path.relpath(parent, self.directory)
            if relative == ".":
                dirs[:] = [name for name in dirs if name != "tmp"]  # uncommitted
            for name in list(dirs):
                if os.path.islink(os.path.join(parent, name)):
                    self._skip(os.path.join(parent, name), SYMLINK)
                    dirs.remove(name)
            dirs.sort()
            blob_names = sorted(name for name in names if name.endswith(BLOB_SUFFIX))
            if not blob_names:
                continue  # e.g. the .tmp file of a transaction never finished
            oid = None if relative == "." else self._oid(relative)
            for name in blob_names:
                path = os.path.join(parent, name)
                if oid is None:
                    layout = self.layout_name or "bushy or lawn"
                    self._skip(path, f"not in an OID directory of the {layout} layout")
                    continue
                try:
                    tid = repr_to_oid(name[: -len(BLOB_SUFFIX)])
                except (ValueError, TypeError, binascii.Error):
                    self._skip(path, BAD_NAME)
                    continue
                try:
                    st = os.lstat(path)
                except FileNotFoundError:
                    self._skip(path, VANISHED)
                    continue
                if stat.S_ISLNK(st.st_mode):
                    self._skip(path, SYMLINK)
                    continue
                if not stat.S_ISREG(st.st_mode):
                    self._skip(path, NOT_REGULAR)
                    continue
                refusal = self._refusal(path, st)
                if refusal is not None:
                    self._skip(path, refusal)
                    continue
                self._paths[oid, tid] = path
                found += 1
                yield BlobRevision(oid, tid, st.st_size)
        if not found and not self.skipped and entries:
            raise UsageError(
                f"--from-blob-dir {self.directory}: holds no blob files (OID "
                "directories of *.blob files, bushy or lawn layout): is it a blob "
                "directory?"
            )

    def _open(self, path: str) -> int:
        """Open *path* (inside the blob directory) for reading without
        following a symbolic link at any level below the top directory (itself
        resolved when the source was made); raise OSError if one is met or the
        file is not a regular file, _Refused if it is one not to read."""
        flags = os.O_RDONLY | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)
        parts = os.path.relpath(path, self.directory).split(os.sep)
        top_flags = os.O_RDONLY | os.O_DIRECTORY | getattr(os, "O_CLOEXEC", 0)
        fd = os.open(self.directory, top_flags)
        try:
            for part in parts[:-1]:
                child = os.open(part, flags | os.O_DIRECTORY, dir_fd=fd)
                os.close(fd)
                fd = child
            file_fd = os.open(
                parts[-1], flags | getattr(os, "O_NONBLOCK", 0), dir_fd=fd
            )
        finally:
            os.close(fd)
        st = os.fstat(file_fd)
        if not stat.S_ISREG(st.st_mode):
            os.close(file_fd)
            raise OSError(errno.EINVAL, NOT_REGULAR)
        refusal = self._refusal(path, st)
        if refusal is not None:
            os.close(file_fd)
            raise _Refused(refusal)
        return file_fd

    @contextlib.contextmanager
    def files(self, revisions: Sequence[BlobRevision]) -> Iterator[list[str | None]]:
        """The files of *revisions* (listed by :meth:`revisions`), each opened
        without following links and handed out by a path to the open file
        (``/proc/self/fd/N``, or a copy where there is none); None for one
        that could not be opened so, which is recorded in :attr:`skipped`."""
        with contextlib.ExitStack() as stack:
            tmp = None
            if not os.path.isdir(_FD_PATHS):
                tmp = stack.enter_context(
                    tempfile.TemporaryDirectory(prefix="zodb-s3blobs-migrate-")
                )
            paths: list[str | None] = []
            for revision in revisions:
                path = self._paths[revision.oid, revision.tid]
                try:
                    fd = self._open(path)
                except FileNotFoundError:
                    self._skip(path, REMOVED)
                    paths.append(None)
                    continue
                except _Refused as exc:
                    self._skip(path, exc.reason)
                    paths.append(None)
                    continue
                except OSError as exc:
                    if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                        reason = SWAPPED
                    elif exc.errno == errno.EINVAL:
                        reason = NOT_REGULAR
                    else:
                        reason = f"cannot be read: {exc.strerror}"
                    self._skip(path, reason)
                    paths.append(None)
                    continue
                file = stack.enter_context(os.fdopen(fd, "rb"))
                if tmp is None:
                    paths.append(f"{_FD_PATHS}/{fd}")
                    continue
                copy = os.path.join(tmp, f"{len(paths)}.blob")
                with open(copy, "wb") as out:
                    shutil.copyfileobj(file, out)
                paths.append(copy)
            yield paths


class RelStorageSource:
    """The blob revisions RelStorage keeps in its ``blob_chunk`` table (with
    ``shared-blob-dir false``), read over one loading connection."""

    #: Nothing is ever skipped here: a row that cannot be read fails the run.
    skipped: list[dict[str, str]] = []

    def __init__(self, storage: object) -> None:
        adapter = getattr(storage, "_adapter", None)
        package = type(adapter).__module__.split(".")
        if adapter is None or package[:2] != ["relstorage", "adapters"]:
            raise UsageError(
                f"--from-relstorage: the base storage is {type(storage).__name__}, "
                "not RelStorage"
            )
        if package[2] not in CHUNK_SIZE_SQL:
            raise UsageError(
                f"--from-relstorage: RelStorage's {package[2]} adapter is not supported"
            )
        self._size_sql = CHUNK_SIZE_SQL[package[2]]
        self._adapter = adapter
        # Not RelStorage's getName(): it holds the DSN, perhaps a password,
        # and an id() that differs in every run (--state compares this).
        self._name = f"RelStorage's blob_chunk table ({package[2]})"
        self._conn, self._cursor = adapter.connmanager.open_for_load()

    def describe(self) -> str:
        """The source in words, for reports."""
        return self._name

    def revisions(self) -> Iterator[BlobRevision]:
        """Every blob revision in blob_chunk with its size, from one query."""
        self._cursor.execute(
            f"SELECT zoid, tid, SUM({self._size_sql}) FROM blob_chunk "
            "GROUP BY zoid, tid ORDER BY zoid, tid"
        )
        rows = self._cursor.fetchall()  # the cursor is needed again to download
        for zoid, tid, size in rows:
            yield BlobRevision(p64(zoid), p64(tid), int(size))

    @contextlib.contextmanager
    def files(self, revisions: Sequence[BlobRevision]) -> Iterator[list[str | None]]:
        """Download *revisions* from the database into temporary files, removed
        on exit."""
        with tempfile.TemporaryDirectory(prefix="zodb-s3blobs-migrate-") as tmp:
            paths = []
            for revision in revisions:
                path = os.path.join(tmp, f"{len(paths)}.blob")
                self._adapter.mover.download_blob(
                    self._cursor, u64(revision.oid), u64(revision.tid), path
                )
                paths.append(path)
            yield paths

    def close(self) -> None:
        """Give the loading connection back."""
        self._adapter.connmanager.close(self._conn, self._cursor)
