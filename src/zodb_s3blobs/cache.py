"""The local blob cache: committed blob files on disk, shared by processes.

Layout under the cache directory (mode 0o700)::

    tmp/                      staged and downloading files, savepoints
    locks/NN.lock             256 lock files, striped by (oid, tid)
    locks/evict.lock          held by whichever process is evicting
    <xx>/<oid_hex>/<tid_hex>.blob

Files appear atomically (written under ``tmp/``, then renamed into place) and
are read-only (0o400), so a reader never sees a partial file and an
accidental ``open(blob.committed(), "w")`` fails instead of truncating the
cached copy. Downloads and deletions of one blob hold that blob's stripe lock
(``flock``, which also excludes other threads of this process), so two
loaders never race and eviction never removes a file half-installed. As in
ZEO's blob cache, a daemon thread evicts least-recently-used files down to
90% of the size limit once enough bytes were loaded since the last check;
only one process evicts at a time.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import tempfile
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from typing import BinaryIO

from ZODB.blob import rename_or_copy_blob
from ZODB.utils import p64

from .errors import S3BlobStorageError
from .keys import hex_id
from .lru import LRUIndex

log = logging.getLogger(__name__)

DIR_MODE = 0o700
FILE_MODE = 0o400
LOCK_STRIPES = 256
#: Eviction brings the cache down to this fraction of its size limit.
EVICTION_TARGET = 0.9
#: An eviction check starts after loading this fraction of the size limit.
CHECK_FRACTION = 0.1
_RESERVED = ("tmp", "locks")
_INSTALL_ATTEMPTS = 10
#: Temp files older than this (seconds) were left by a killed process.
ABANDONED_AFTER = 24 * 3600


@contextlib.contextmanager
def _flock(path: str, blocking: bool = True) -> Iterator[bool]:
    """Hold an exclusive ``flock`` on *path*; yield False if non-blocking and busy."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def _mkdir(path: str) -> None:
    with contextlib.suppress(FileExistsError):
        os.mkdir(path, DIR_MODE)


def _entries(directory: str) -> list[os.DirEntry]:
    """The entries of *directory*; none if another process just removed it."""
    try:
        with os.scandir(directory) as entries:
            return list(entries)
    except (FileNotFoundError, NotADirectoryError):
        return []


def _subdirectories(directory: str) -> list[os.DirEntry]:
    # Files where directories belong (e.g. a 1.x cache's oid/tid.blob layout)
    # are not ours: skip them rather than fail eviction.
    return [e for e in _entries(directory) if e.is_dir(follow_symlinks=False)]


class BlobCache:
    """Committed blob files keyed by (oid, tid), bounded by LRU eviction."""

    def __init__(self, directory: str, size_limit: int) -> None:
        if size_limit <= 0:
            raise ValueError(f"cache-size must be positive, not {size_limit}")
        self.directory = os.path.abspath(directory)
        self.size_limit = size_limit
        self.temp_dir = os.path.join(self.directory, "tmp")
        self._locks_dir = os.path.join(self.directory, "locks")
        try:
            os.makedirs(self.directory, DIR_MODE, exist_ok=True)
            _mkdir(self.temp_dir)
            _mkdir(self._locks_dir)
        except OSError as exc:
            raise S3BlobStorageError(
                f"cache-dir {self.directory!r} cannot be used: {exc.strerror}"
            ) from exc
        self._check_threshold = max(1, int(size_limit * CHECK_FRACTION))
        self._state_lock = threading.Lock()
        self._bytes_since_check = 0
        # Built by the check started at open (in the daemon thread, so opening
        # the storage does not wait for a walk of a large cache), and rebuilt
        # after each cache-size of loads to count other processes' files.
        self._index: LRUIndex | None = None
        # Changes made while a scan walks the directory, replayed onto its
        # result: (revision, size) for an addition, (revision, None) a removal.
        self._during_scan: list[tuple[tuple[bytes, bytes], int | None]] | None = None
        self._bytes_since_scan = 0
        self._evictor: threading.Thread | None = None
        self._remove_abandoned_temp_files()
        self._start_check()  # builds the index in the background

    def __repr__(self) -> str:
        return f"<BlobCache {self.directory} limit={self.size_limit}>"

    # -- paths -------------------------------------------------------------

    def path(self, oid: bytes, tid: bytes) -> str:
        oid_hex = hex_id(oid)
        return os.path.join(
            self.directory, oid_hex[-2:].rjust(2, "0"), oid_hex, hex_id(tid) + ".blob"
        )

    def _lock_path(self, oid: bytes, tid: bytes) -> str:
        stripe = zlib.crc32(oid + tid) % LOCK_STRIPES
        return os.path.join(self._locks_dir, f"{stripe:02x}.lock")

    def new_temp_file(self, prefix: str) -> str:
        """An empty private file under ``tmp/``, on the cache's file system."""
        fd, name = tempfile.mkstemp(dir=self.temp_dir, prefix=prefix)
        os.close(fd)
        return name

    # -- reading ---------------------------------------------------------

    def lookup(self, oid: bytes, tid: bytes) -> str | None:
        """The cached file's path, marked as just used; None when not cached,
        or when its size is no longer the size it was installed with (it is
        then removed, so the caller downloads it again)."""
        path = self.path(oid, tid)
        try:
            size = os.stat(path).st_size
            os.utime(path)  # other processes sharing the cache see the use
        except FileNotFoundError:
            return None
        with self._state_lock:
            if self._index is None:
                return path
            expected = self._index.touch((oid, tid))
        if expected is None:  # installed by another process since our last scan
            self._record((oid, tid), size)
        elif expected != size:
            log.warning(
                "Cached blob %s has %d bytes, not the %d it was installed with: "
                "removed, to be downloaded again",
                path,
                size,
                expected,
            )
            self.discard(oid, tid)
            return None
        return path

    def fetch(self, oid: bytes, tid: bytes, download: Callable[[BinaryIO], int]) -> str:
        """Return the cached file for (oid, tid), calling *download* if absent.

        Under the blob's lock the cache is checked again, so concurrent loaders
        (threads or processes) download once. *download* writes into a temp
        file that is renamed into place only when complete.
        """
        cached = self.lookup(oid, tid)
        if cached is not None:
            return cached
        with _flock(self._lock_path(oid, tid)):
            cached = self.lookup(oid, tid)
            if cached is not None:
                return cached
            path = self.path(oid, tid)
            temp = self.new_temp_file("download-")
            try:
                with open(temp, "wb") as out:
                    size = download(out)
                self._install(temp, path)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.remove(temp)
                raise
        self._added((oid, tid), size)
        return path

    # -- writing ---------------------------------------------------------

    def take(self, filename: str) -> str:
        """Move a file the caller hands over into ``tmp/``; return its new path.

        ZODB's ``rename_or_copy_blob`` falls back to a copy when the file lives
        on another file system (and logs it, as ZODB's own storages do).
        """
        staged = self.new_temp_file("staged-")
        rename_or_copy_blob(filename, staged, chmod=False)
        return staged

    def install(self, oid: bytes, tid: bytes, staged: str) -> None:
        """Rename a staged, complete file into the cache as (oid, tid)."""
        size = os.stat(staged).st_size
        with _flock(self._lock_path(oid, tid)):
            self._install(staged, self.path(oid, tid))
        self._added((oid, tid), size)

    def _install(self, source: str, path: str) -> None:
        os.chmod(source, FILE_MODE)
        oid_dir = os.path.dirname(path)
        for _attempt in range(_INSTALL_ATTEMPTS):
            try:
                os.replace(source, path)
                return
            except FileNotFoundError:
                # The directories are missing: new, or removed as empty by an
                # eviction (in any process) since we last created them, which
                # may happen again between the two mkdirs.
                with contextlib.suppress(FileNotFoundError):
                    _mkdir(os.path.dirname(oid_dir))
                    _mkdir(oid_dir)
        os.replace(source, path)

    def discard(self, oid: bytes, tid: bytes) -> None:
        """Remove the cached copy of (oid, tid), if any, and empty directories."""
        self._record((oid, tid), None)
        self._delete(oid, tid)

    def _delete(self, oid: bytes, tid: bytes) -> bool:
        path = self.path(oid, tid)
        deleted = False
        with _flock(self._lock_path(oid, tid)), contextlib.suppress(FileNotFoundError):
            os.remove(path)
            deleted = True
        self._remove_empty_dirs(os.path.dirname(path))
        return deleted

    def _remove_empty_dirs(self, oid_dir: str) -> None:
        for directory in (oid_dir, os.path.dirname(oid_dir)):
            try:
                os.rmdir(directory)
            except OSError as exc:
                if exc.errno in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOENT):
                    return
                raise

    # -- eviction --------------------------------------------------------

    def _record(self, revision: tuple[bytes, bytes], size: int | None) -> None:
        """Index an added file (its size) or a removed one (None)."""
        with self._state_lock:
            self._apply(revision, size)

    def _apply(self, revision: tuple[bytes, bytes], size: int | None) -> None:
        """:meth:`_record`, for a caller holding the state lock."""
        if self._during_scan is not None:
            self._during_scan.append((revision, size))
        if self._index is not None:
            self._index.apply(revision, size)

    def _added(self, revision: tuple[bytes, bytes], size: int) -> None:
        """Account a new file; start an eviction check every CHECK_FRACTION of
        the size limit loaded, as ZEO's blob cache does."""
        with self._state_lock:
            self._apply(revision, size)
            self._bytes_since_scan += size
            self._bytes_since_check += size
            if self._bytes_since_check < self._check_threshold:
                return
        self._start_check()

    def _start_check(self) -> None:
        """Run an eviction check in the daemon thread, unless one is running."""
        with self._state_lock:
            if self._evictor is not None and self._evictor.is_alive():
                return
            self._bytes_since_check = 0
            self._evictor = threading.Thread(
                target=self._evict_quietly, name="zodb-s3blobs-evict", daemon=True
            )
            self._evictor.start()

    def _remove_abandoned_temp_files(self) -> None:
        """Remove downloads and staged uploads a killed process left in tmp/.

        A file still in tmp/ was never installed, so it is never served; one a
        day old belongs to no transaction or download still running.
        """
        cutoff = time.time() - ABANDONED_AFTER
        for entry in _entries(self.temp_dir):
            if entry.name.startswith(("download-", "staged-")):
                with contextlib.suppress(FileNotFoundError):
                    if entry.stat().st_mtime < cutoff:
                        os.remove(entry.path)

    def _evict_quietly(self) -> None:
        try:
            self.evict(wait=False)
        except Exception:
            log.exception("Blob cache eviction in %s failed", self.directory)

    def files(self) -> Iterator[tuple[str, os.stat_result]]:
        """Every cached blob file with its stat (not staged or temp files)."""
        for _revision, path, st in self._walk():
            yield path, st

    def _walk(self) -> Iterator[tuple[tuple[bytes, bytes], str, os.stat_result]]:
        for bucket in _subdirectories(self.directory):
            if bucket.name in _RESERVED:
                continue
            for oid_dir in _subdirectories(bucket.path):
                for entry in _entries(oid_dir.path):
                    revision = _revision(oid_dir.name, entry.name)
                    if revision is None or not entry.is_file():
                        continue
                    with contextlib.suppress(FileNotFoundError):
                        yield revision, entry.path, entry.stat()

    def _scan(self) -> None:
        """Rebuild the index from the directory, in access-time order."""
        started = time.monotonic()
        with self._state_lock:
            self._during_scan = []
        try:
            found = sorted(self._walk(), key=lambda item: item[2].st_atime)
        except BaseException:
            with self._state_lock:
                self._during_scan = None
            raise
        index = LRUIndex((revision, st.st_size) for revision, _path, st in found)
        with self._state_lock:
            # Replay what happened during the walk, which it may have missed.
            for revision, size in self._during_scan:
                index.apply(revision, size)
            self._during_scan = None
            self._index = index
            self._bytes_since_scan = 0
        log.debug(
            "Indexed %d cached files (%d bytes) in %s in %.3fs",
            len(index),
            index.total,
            self.directory,
            time.monotonic() - started,
        )

    def evict(self, target: int | None = None, wait: bool = True) -> int:
        """Delete least-recently-used files until at most *target* bytes remain
        (default: 90% of the limit, if the limit is exceeded). Returns the bytes
        freed. With *wait* false (the daemon thread), returns 0 at once when
        another thread or process is evicting already.

        Costs what it deletes: the directory is walked only to build the index
        and after each cache-size of loads.
        """
        lock = os.path.join(self._locks_dir, "evict.lock")
        with _flock(lock, blocking=wait) as acquired:
            if not acquired:
                return 0
            with self._state_lock:
                stale = self._index is None or self._bytes_since_scan >= self.size_limit
            if stale:
                self._scan()
            with self._state_lock:
                if target is None:
                    if self._index.total <= self.size_limit:
                        return 0
                    target = int(self.size_limit * EVICTION_TARGET)
                victims = self._index.pop_oldest_until(target)
            freed = sum(size for (oid, tid), size in victims if self._delete(oid, tid))
            log.debug("Evicted %d bytes from %s", freed, self.directory)
            return freed

    def close(self) -> None:
        """Wait briefly for a running eviction so the process exits cleanly."""
        evictor = self._evictor
        if evictor is not None:
            evictor.join(timeout=10)


def _revision(oid_hex: str, filename: str) -> tuple[bytes, bytes] | None:
    """(oid, tid) of a cache file name, or None for a name that is not ours."""
    tid_hex, dot, extension = filename.partition(".")
    if extension != "blob" or not dot:
        return None
    try:
        return p64(int(oid_hex, 16)), p64(int(tid_hex, 16))
    except (ValueError, OverflowError):
        return None
