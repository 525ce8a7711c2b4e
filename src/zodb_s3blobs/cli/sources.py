"""Where existing blobs come from when a database moves to S3: a ZODB blob
directory (FileStorage ``blob-dir``, a ZEO server's blob dir), or RelStorage's
``blob_chunk`` table.

Both list every blob revision with its size up front, so ``migrate`` can skip
what S3 already holds without reading it, and both hand out local files for a
batch of revisions to upload.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from ZODB.blob import BLOB_SUFFIX, LAYOUT_MARKER, LAYOUTS, auto_layout_select
from ZODB.utils import p64, repr_to_oid, u64

from . import UsageError


@dataclass(frozen=True)
class BlobRevision:
    """One blob revision of the source: object id, transaction id, byte size."""

    oid: bytes
    tid: bytes
    size: int


class BlobDirSource:
    """The blob files of a ZODB blob directory, in the bushy or lawn layout.

    A ZEO client's blob cache (layout ``zeocache``) is refused: it holds only
    the blobs that client happened to read.
    """

    def __init__(self, directory: str) -> None:
        self.directory = os.path.abspath(directory)
        if not os.path.isdir(self.directory):
            raise UsageError(f"--from-blob-dir {directory}: not a directory")
        marker = os.path.join(self.directory, LAYOUT_MARKER)
        self.layout_name = auto_layout_select(self.directory)
        if self.layout_name == "zeocache":
            raise UsageError(
                f"--from-blob-dir {directory}: {marker} says this is a ZEO client's "
                "blob cache, which holds only the blobs that client read; use the "
                "ZEO server's blob directory"
            )
        if self.layout_name not in LAYOUTS:
            raise UsageError(
                f"--from-blob-dir {directory}: {marker} names the unknown layout "
                f"{self.layout_name!r} (expected bushy or lawn)"
            )
        self._layout = LAYOUTS[self.layout_name]
        self._paths: dict[tuple[bytes, bytes], str] = {}

    def describe(self) -> str:
        """The source in words, for reports."""
        return f"blob directory {self.directory} ({self.layout_name} layout)"

    def revisions(self) -> Iterator[BlobRevision]:
        """Every committed blob file's revision and size, in a stable order."""
        for parent, dirs, names in os.walk(self.directory):
            dirs.sort()
            try:
                oid = self._layout.path_to_oid(os.path.relpath(parent, self.directory))
            except ValueError:
                continue  # the top directory, tmp/, or anything not an oid's
            for name in sorted(names):
                if not name.endswith(BLOB_SUFFIX):
                    continue  # e.g. a .tmp file of a transaction never finished
                try:
                    tid = repr_to_oid(name[: -len(BLOB_SUFFIX)])
                except ValueError:
                    continue
                path = self._paths[oid, tid] = os.path.join(parent, name)
                yield BlobRevision(oid, tid, os.stat(path).st_size)

    @contextlib.contextmanager
    def files(self, revisions: Sequence[BlobRevision]) -> Iterator[list[str]]:
        """The files of *revisions* (listed by :meth:`revisions`): here, the
        blob files themselves."""
        yield [self._paths[r.oid, r.tid] for r in revisions]


#: SQL for a blob's size in blob_chunk, by RelStorage adapter package. In
#: PostgreSQL each blob is one large object, whose end a seek finds.
_CHUNK_SIZE_SQL = {
    "sqlite": "LENGTH(chunk)",
    "mysql": "LENGTH(chunk)",
    "postgresql": "lo_lseek64(lo_open(chunk, 262144), 0, 2)",
    "oracle": "DBMS_LOB.GETLENGTH(chunk)",
}


class RelStorageSource:
    """The blob revisions RelStorage keeps in its ``blob_chunk`` table (with
    ``shared-blob-dir false``), read over one loading connection."""

    def __init__(self, storage: object) -> None:
        adapter = getattr(storage, "_adapter", None)
        package = type(adapter).__module__.split(".")
        if adapter is None or package[:2] != ["relstorage", "adapters"]:
            raise UsageError(
                f"--from-relstorage: the base storage is {type(storage).__name__}, "
                "not RelStorage"
            )
        if package[2] not in _CHUNK_SIZE_SQL:
            raise UsageError(
                f"--from-relstorage: RelStorage's {package[2]} adapter is not supported"
            )
        self._size_sql = _CHUNK_SIZE_SQL[package[2]]
        self._adapter = adapter
        self._name = storage.getName()
        self._conn, self._cursor = adapter.connmanager.open_for_load()

    def describe(self) -> str:
        """The source in words, for reports."""
        return f"blob_chunk table of RelStorage {self._name}"

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
    def files(self, revisions: Sequence[BlobRevision]) -> Iterator[list[str]]:
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
