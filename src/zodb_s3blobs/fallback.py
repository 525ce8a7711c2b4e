"""Read-through fallback: blob revisions not yet in S3, read from where the
site kept them before, so a site can switch to S3 first and copy its old blobs
afterwards (``zodb-s3blobs migrate``) with no downtime.

Two places are read, never written: a ZODB blob directory (FileStorage's
``blob-dir`` or a ZEO server's, bushy or lawn layout), and RelStorage's
``blob_chunk`` table, through the wrapped RelStorage's own adapter. The
storage asks a fallback only after S3 answered a definite 404.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
from typing import BinaryIO, Protocol

from ZODB.blob import LAYOUT_MARKER, FilesystemHelper
from ZODB.utils import oid_repr, tid_repr, u64

from .errors import S3BlobStorageError

#: SQL for a blob's size in ``blob_chunk``, by RelStorage adapter package. In
#: PostgreSQL each blob is one large object, whose end a seek finds.
CHUNK_SIZE_SQL = {
    "sqlite": "LENGTH(chunk)",
    "mysql": "LENGTH(chunk)",
    "postgresql": "lo_lseek64(lo_open(chunk, 262144), 0, 2)",
    "oracle": "DBMS_LOB.GETLENGTH(chunk)",
}
_COPY_BUFFER = 1 << 20


class Fallback(Protocol):
    """Where revisions absent from S3 may still be."""

    def describe(self) -> str:
        """The place, for messages (``fallback-blob-dir /var/blobs``)."""

    def where(self, oid: bytes, tid: bytes) -> str:
        """Where this revision would be, for a message saying it is not."""

    def read(self, oid: bytes, tid: bytes, out: BinaryIO) -> int | None:
        """Copy the revision into *out* and return its size, or return None if
        the fallback does not hold it."""


class FallbackReadError(S3BlobStorageError):
    """The fallback holds the revision but it could not be read whole."""


def own_blob_dir_error(name: str, blob_dir: str) -> S3BlobStorageError:
    """The refusal of a ``<filestorage>`` named *name* that keeps a blob-dir of
    its own, saying how to switch: that directory becomes the fallback, read
    until ``zodb-s3blobs migrate`` has uploaded its files."""
    return S3BlobStorageError(
        f"The wrapped filestorage {name!r} has blob-dir {blob_dir!r}: remove "
        "blob-dir from its section and name the directory in <s3blobstorage> "
        f"instead, as fallback-blob-dir {blob_dir}: its blobs are read from "
        "there until `zodb-s3blobs migrate` has uploaded them (switch first, "
        "migrate later: see docs/migration.md)"
    )


class BlobDirFallback:
    """The blob files of a ZODB blob directory, read-only.

    The layout is the one its ``.layout`` file names. Without that file (a
    directory copied with ``cp -r dir/*``) ZODB would guess lawn for any
    non-empty directory; here a revision is looked for in both layouts.
    """

    def __init__(self, directory: str) -> None:
        if not os.path.isabs(directory):
            raise ValueError(
                f"fallback-blob-dir must be an absolute path, not {directory!r}"
            )
        if not os.path.isdir(directory):
            raise ValueError(f"fallback-blob-dir {directory!r} is not a directory")
        # FilesystemHelper only reads .layout here; its create(), never
        # called, would write.
        if os.path.exists(os.path.join(directory, LAYOUT_MARKER)):
            helpers = [FilesystemHelper(directory)]
        else:
            helpers = [FilesystemHelper(directory, name) for name in ("bushy", "lawn")]
        if helpers[0].layout_name == "zeocache":
            raise ValueError(
                f"fallback-blob-dir {directory!r} is a ZEO client's blob cache, "
                "which holds only the blobs that client read: give the ZEO "
                "server's blob directory"
            )
        self.directory = directory
        self._helpers = helpers

    def describe(self) -> str:
        return f"fallback-blob-dir {self.directory}"

    def where(self, oid: bytes, tid: bytes) -> str:
        return " or ".join(h.getBlobFilename(oid, tid) for h in self._helpers)

    def read(self, oid: bytes, tid: bytes, out: BinaryIO) -> int | None:
        for helper in self._helpers:
            size = self._read(helper.getBlobFilename(oid, tid), out)
            if size is not None:
                return size
        return None

    @staticmethod
    def _read(path: str, out: BinaryIO) -> int | None:
        try:
            # Not through a symbolic link (the directory is the Zope user's,
            # and this copies the file into a cache that may be served), and
            # not blocking on a FIFO before it is found not to be a file.
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        except (FileNotFoundError, NotADirectoryError):
            return None
        except OSError as exc:
            raise FallbackReadError(f"Cannot read {path}: {exc}") from exc
        with open(fd, "rb") as source:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise FallbackReadError(f"{path} is not a regular file")
            shutil.copyfileobj(source, out, _COPY_BUFFER)
        return _checked(out, st.st_size, path)


class BlobChunkFallback:
    """The ``blob_chunk`` table of the wrapped RelStorage (blobs it kept in
    the database, ``shared-blob-dir false``), read on a connection of its
    own for each revision."""

    def __init__(self, relstorage: object, temp_dir: str) -> None:
        adapter = getattr(relstorage, "_adapter", None)
        package = type(adapter).__module__.split(".")
        if adapter is None or package[:2] != ["relstorage", "adapters"]:
            raise ValueError(
                "fallback-blob-chunk needs a RelStorage base storage, not "
                f"{type(relstorage).__name__}"
            )
        if package[2] not in CHUNK_SIZE_SQL:
            raise ValueError(
                f"fallback-blob-chunk: RelStorage's {package[2]} adapter is not "
                "supported"
            )
        self._adapter = adapter
        self._size_sql = CHUNK_SIZE_SQL[package[2]]
        # Not RelStorage's getName(): it holds the DSN, perhaps a password.
        self._name = f"RelStorage's blob_chunk table ({package[2]})"
        self._temp_dir = temp_dir

    def describe(self) -> str:
        return self._name

    def where(self, oid: bytes, tid: bytes) -> str:
        return f"blob_chunk rows zoid={u64(oid)} tid={u64(tid)}"

    def read(self, oid: bytes, tid: bytes, out: BinaryIO) -> int | None:
        connmanager = self._adapter.connmanager
        try:
            conn, cursor = connmanager.open_for_load()
        except Exception as exc:  # the database driver's own errors
            raise FallbackReadError(f"Cannot reach {self._name}: {exc}") from exc
        try:
            cursor.execute(
                f"SELECT COUNT(*), SUM({self._size_sql}) FROM blob_chunk "
                "WHERE zoid = %s AND tid = %s",
                (u64(oid), u64(tid)),
            )
            chunks, size = cursor.fetchone()
            if not chunks:
                return None
            return self._download(cursor, oid, tid, out, int(size))
        except FallbackReadError:
            raise
        except Exception as exc:  # the database driver's own errors
            raise FallbackReadError(
                f"Cannot read {self.where(oid, tid)}: {exc}"
            ) from exc
        finally:
            connmanager.close(conn, cursor)

    def _download(
        self, cursor, oid: bytes, tid: bytes, out: BinaryIO, size: int
    ) -> int:
        """RelStorage's movers write a blob to a path of their own opening:
        a temporary file, copied into *out* and removed."""
        temp = os.path.join(
            self._temp_dir, f"fallback-{os.getpid()}-{u64(oid):x}-{u64(tid):x}"
        )
        try:
            self._adapter.mover.download_blob(cursor, u64(oid), u64(tid), temp)
            with open(temp, "rb") as source:
                shutil.copyfileobj(source, out, _COPY_BUFFER)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.remove(temp)
        return _checked(out, size, self.where(oid, tid))


def _checked(out: BinaryIO, size: int, where: str) -> int:
    """*size*, if *out* received exactly that many bytes."""
    written = out.tell()
    if written != size:
        raise FallbackReadError(
            f"Read {written} bytes of {size} from {where}: it changed while read"
        )
    return size


def open_fallback(
    blob_dir: str | None, blob_chunk: bool, base: object, temp_dir: str
) -> Fallback | None:
    """The fallback the configuration names, or None."""
    if blob_dir and blob_chunk:
        raise ValueError(
            "fallback-blob-dir and fallback-blob-chunk exclude each other: a "
            "site kept its blobs in one of them"
        )
    if blob_dir:
        return BlobDirFallback(blob_dir)
    if blob_chunk:
        return BlobChunkFallback(base, temp_dir)
    return None


def not_in_either(key_url: str, fallback: Fallback, oid: bytes, tid: bytes) -> str:
    """The message for a revision in neither S3 nor the fallback."""
    return (
        f"No blob file for {oid_repr(oid)} revision {tid_repr(tid)}: {key_url} "
        f"does not exist, nor {fallback.where(oid, tid)} ({fallback.describe()})"
    )
