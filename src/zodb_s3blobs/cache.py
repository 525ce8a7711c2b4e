"""The local blob cache: committed blob files on disk, shared by processes.

Layout under the cache directory (mode 0o700)::

    tmp/                      staged and downloading files, savepoints
    locks/NN.lock             256 lock files, striped by (oid, tid)
    locks/NN.use              hits (shared) against removals (exclusive)
    locks/evict.lock          held by whichever process is evicting
    locks/total               the total size of the cached files
    <xx>/<oid_hex>/<tid_hex>.blob

Files appear atomically (written under ``tmp/``, flushed to disk, then
renamed into place) and are read-only (0o400), so a reader never sees a
partial file, even after a power loss, and an accidental
``open(blob.committed(), "w")`` fails instead of truncating the cached copy.
Each file records its size at install; a hit on a file whose size differs is
not served. Downloads and deletions of one blob hold that blob's stripe lock
(``flock``, which also excludes other threads of this process), so two
loaders never race and eviction never removes a file half-installed; no
thread takes a lock it holds. ``locks/total`` counts every process's files,
so ``cache-size`` bounds the directory: an install over it starts a check in
a daemon thread, which evicts least-recently-used files down to 90% of the
size limit; only one process evicts at a time.

With ``cache-group``, the cache directory and its ``<xx>/`` and oid
directories are 0o750 and the files 0o440, all of that group, so that a
front-end web server in the group can serve the files (X-Sendfile); ``tmp/``
and ``locks/`` stay private. Eviction leaves files used within ``min_age``
seconds (``cache-min-age``), so a path handed out is not removed before the
web server opens it.

The directory is trusted only if this user alone can write it: at open, the
cache directory, ``tmp/`` and ``locks/`` must be real directories (no
symlinks) owned by the effective user and not writable by group or others,
or the cache refuses to open; the ``<xx>/`` and oid directories are checked
when a file is installed into them, and skipped by the scan otherwise. Lock,
ledger and temp files are opened with ``O_NOFOLLOW``, and a hit serves only a
regular file of this user (the ``lstat`` it costs replaces the ``stat`` it
made anyway), so another local user cannot substitute a cached blob.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import grp
import logging
import os
import stat
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
from .metrics import Metrics

log = logging.getLogger(__name__)

DIR_MODE = 0o700
FILE_MODE = 0o400
#: With cache-group: the group may read the cached files (a front-end web
#: server serving them), never write them; tmp/ and locks/ stay private.
GROUP_DIR_MODE = 0o750
GROUP_FILE_MODE = 0o440
LOCK_STRIPES = 256
#: Eviction brings the cache down to this fraction of its size limit.
EVICTION_TARGET = 0.9
#: The private directories of a cache; every other one holds blobs.
RESERVED = ("tmp", "locks")
_INSTALL_ATTEMPTS = 10
#: Temp files older than this (seconds) were left by a killed process.
ABANDONED_AFTER = 24 * 3600
#: The extended attribute holding a cached file's size at install.
SIZE_ATTRIBUTE = "user.zodb_s3blobs.size"
#: How often a waiting eviction check retries ``evict.lock`` (seconds).
_LOCK_POLL = 0.02
#: A file whose last use (see last_used) is this much newer (seconds) than
#: this process's last use of it was used by another process since: eviction
#: keeps it.
_USED_ELSEWHERE = 1.0
#: Eviction leaves files used within this many seconds. A path handed out
#: (loadBlob, committed()) is opened right after: Blob.open('r+'/'a') has
#: ZODB copy the file by path once the storage fetched it, and when that copy
#: fails ZODB keeps an empty working file, which a retried append would then
#: commit without the blob's old bytes. Front-end servers handed the path
#: (X-Sendfile) need it too.
MIN_AGE = 60.0
#: A hit on a file used within this fraction of the minimum age takes no lock
#: (see BlobCache._used_hit).
_FRESH = 0.25
#: Lock and ledger files: never through a symlink.
_LOCK_FLAGS = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC


class UntrustedCacheDirectory(S3BlobStorageError):
    """A directory of the cache could be written by another user (or is a
    symlink): files in it could be replaced, so it is not used."""


def _distrust(st: os.stat_result) -> str | None:
    """Why a directory with this ``lstat`` is not safe to keep blobs in, or
    None if it is: a symlink, not a directory, owned by another user, or
    writable by group or others."""
    if stat.S_ISLNK(st.st_mode):
        return "is a symlink"
    if not stat.S_ISDIR(st.st_mode):
        return "is not a directory"
    if st.st_uid != os.geteuid():
        return f"is owned by uid {st.st_uid}, not by this user (uid {os.geteuid()})"
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return (
            f"has mode {stat.S_IMODE(st.st_mode):#o}: group or others may write "
            "it (chmod 700 it)"
        )
    return None


def check_trusted_directory(path: str) -> None:
    """Raise :class:`UntrustedCacheDirectory` naming *path* and what is wrong
    unless it is a real directory only this user can write (OSError if it
    cannot be examined)."""
    problem = _distrust(os.lstat(path))  # FileNotFoundError: the caller's
    if problem is not None:
        raise UntrustedCacheDirectory(
            f"cache-dir: {path} {problem}; another user could replace cached "
            "blobs, so it is not used"
        )


def check_group(gid: int) -> None:
    """Raise, naming cache-group, unless this user may give files to group
    *gid*: root, or a member."""
    if os.geteuid() == 0 or gid in (os.getegid(), *os.getgroups()):
        return
    try:
        name = repr(grp.getgrgid(gid).gr_name)
    except KeyError:
        name = "(unknown on this host)"
    raise S3BlobStorageError(
        f"cache-group: this user is not a member of group {gid} {name}, so "
        "cannot give the cached files to it"
    )


@contextlib.contextmanager
def _flock(
    path: str,
    blocking: bool = True,
    stop: threading.Event | None = None,
    shared: bool = False,
) -> Iterator[bool]:
    """Hold an exclusive (or *shared*) ``flock`` on *path* through a
    descriptor of its own.

    Yields False if non-blocking and busy, or if *stop* is set while waiting
    (a wait with *stop* polls, so a closing cache's thread is not stuck in
    ``flock`` behind another process).
    """
    fd = os.open(path, _LOCK_FLAGS, 0o600)
    try:
        while True:
            try:
                fcntl.flock(
                    fd,
                    (fcntl.LOCK_SH if shared else fcntl.LOCK_EX)
                    | (fcntl.LOCK_NB if stop is not None or not blocking else 0),
                )
                break
            except BlockingIOError:
                if stop is None or stop.wait(_LOCK_POLL):
                    yield False
                    return
        try:
            yield True
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


class _Ledger:
    """The total size of the cache's blob files, shared by every process using
    the directory: one decimal number in ``locks/total``, read and changed
    under an ``flock`` on that file (taken under a stripe lock or
    ``evict.lock``, never the other way round).

    Changes are recorded after the rename or removal they count, so that a
    scan running meanwhile sees the file or the change (see :meth:`rewrite`);
    a process killed in between leaves it off by that one file until the next
    scan, which rewrites it. A new or unreadable ledger reads as unknown
    (None); changes then count from zero, which the scan at open adds to what
    it finds.
    """

    def __init__(self, path: str) -> None:
        self.path = path

    @contextlib.contextmanager
    def _locked(self) -> Iterator[int]:
        with contextlib.ExitStack() as stack:
            fd = os.open(self.path, _LOCK_FLAGS, 0o600)
            stack.callback(os.close, fd)
            fcntl.flock(fd, fcntl.LOCK_EX)
            stack.callback(fcntl.flock, fd, fcntl.LOCK_UN)
            yield fd

    @staticmethod
    def _get(fd: int) -> int | None:
        try:
            return max(0, int(os.pread(fd, 64, 0)))
        except ValueError:
            return None

    @staticmethod
    def _put(fd: int, total: int) -> None:
        # Fixed width: a shorter number never leaves digits of a longer one.
        os.pwrite(fd, f"{total:20d}\n".encode(), 0)

    def read(self) -> int | None:
        with self._locked() as fd:
            return self._get(fd)

    def add(self, delta: int) -> int | None:
        """Add *delta* bytes; return the new total."""
        with self._locked() as fd:
            total = max(0, (self._get(fd) or 0) + delta)
            self._put(fd, total)
            return total

    def rewrite(self, found: int, recorded_before: int | None) -> int:
        """Set the total a scan *found*, plus what the ledger recorded since it
        started (*recorded_before*): changes the walk missed are counted once,
        and additions it saw twice, which over-counts (evicts a little early)
        rather than under-counts (a cache over its limit). Only a removal the
        walk missed, by a discard in another process (evictions wait for the
        scan's ``evict.lock``), is subtracted twice."""
        with self._locked() as fd:
            total = max(0, found + (self._get(fd) or 0) - (recorded_before or 0))
            self._put(fd, total)
            return total


def _recorded_size(target: str | int) -> int | None:
    """The size a file had when the cache sealed it (see :func:`_seal`);
    None for a file without the record (older, or a file system without user
    extended attributes)."""
    try:
        return int(os.getxattr(target, SIZE_ATTRIBUTE))
    except FileNotFoundError:
        raise
    except (OSError, ValueError):
        return None


def last_used(st: os.stat_result) -> float:
    """When a cached file was last used, by any process: the later of its
    access time (a hit's ``utime``, a plain read) and its modification time
    (set to the moment of install, and by every hit). Eviction and the
    lock-free hit path judge by this one time, so that a file fresh enough
    for the one is young enough for the other, whatever the mount's atime
    policy."""
    return max(st.st_atime, st.st_mtime)


def _seal(fd: int, size: int) -> None:
    """Record *size* with the file and flush it to disk, before it is renamed
    into the cache: after a crash a cached file is then complete or absent,
    and a file whose size later differs from the record is never served."""
    with contextlib.suppress(OSError):  # no user xattrs here: the index checks
        os.setxattr(fd, SIZE_ATTRIBUTE, str(size).encode())
    os.fsync(fd)


def _mkdir(path: str) -> bool:
    """Create directory *path* (mode 0o700); False if it exists already."""
    try:
        os.mkdir(path, DIR_MODE)
    except FileExistsError:
        return False
    return True


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


def _trusted_entry(entry: os.DirEntry) -> bool:
    """Whether a directory met by the scan is only this user's to write; one
    that is not is skipped, with a warning (its files are not indexed, and
    installs into it are refused)."""
    try:
        problem = _distrust(entry.stat(follow_symlinks=False))
    except FileNotFoundError:
        return False
    if problem is not None:
        log.warning(
            "Blob cache directory %s %s; another user could replace its files: skipped",
            entry.path,
            problem,
        )
    return problem is None


class BlobCache:
    """Committed blob files keyed by (oid, tid), bounded by LRU eviction."""

    def __init__(
        self,
        directory: str,
        size_limit: int,
        min_age: float = MIN_AGE,
        group: int | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        if size_limit <= 0:
            raise ValueError(f"cache-size must be positive, not {size_limit}")
        if group is not None:
            check_group(group)
        self.directory = os.path.abspath(directory)
        self.size_limit = size_limit
        #: Files used within this many seconds are never evicted (MIN_AGE).
        self.min_age = min_age
        #: The group id that may read the cached files (cache-group), or None.
        self.group = group
        self.metrics = metrics if metrics is not None else Metrics()
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
        # Once at open: the hot path then trusts these three.
        for directory in (self.directory, self.temp_dir, self._locks_dir):
            check_trusted_directory(directory)
        # Once trusted (never hiding a wrong owner or a writable mode): the
        # storage's own mode, whoever made the directory (a deployment tool's
        # mkdir under umask 022 makes it 0755), as zodb-s3blobs check expects.
        if self.group is None:
            os.chmod(self.directory, DIR_MODE)
        self._share(self.directory)
        self._ledger = _Ledger(os.path.join(self._locks_dir, "total"))
        self._state_lock = threading.Lock()
        # Built by the check started at open (in the daemon thread, so opening
        # the storage does not wait for a walk of a large cache), and rebuilt
        # after each cache-size of loads to learn other processes' files.
        self._index: LRUIndex | None = None
        # Changes made while a scan walks the directory, replayed onto its
        # result: (revision, size) for an addition, (revision, None) a removal.
        self._during_scan: list[tuple[tuple[bytes, bytes], int | None]] | None = None
        self._bytes_since_scan = 0
        # The eviction thread, if one runs; it exits when no check is pending.
        self._evictor: threading.Thread | None = None
        self._check_pending = False
        # When a check stopped at files used within min_age: when to retry.
        self._recheck_at: float | None = None
        self._wakeup = threading.Condition(self._state_lock)
        self._stop_waiting = False
        self._closing = threading.Event()
        self._remove_abandoned_temp_files()
        self._start_check()  # builds the index in the background

    def __repr__(self) -> str:
        return f"<BlobCache {self.directory} limit={self.size_limit}>"

    def _share(self, path: str, mode: int = GROUP_DIR_MODE) -> None:
        """Give *path*, a directory or file of cached blobs this process has
        just made, to cache-group with *mode* (umask aside); nothing without
        a group."""
        if self.group is not None:
            os.chown(path, -1, self.group)
            os.chmod(path, mode)

    # -- paths -------------------------------------------------------------

    def path(self, oid: bytes, tid: bytes) -> str:
        return revision_path(self.directory, oid, tid)

    def _lock_path(self, oid: bytes, tid: bytes, kind: str = "lock") -> str:
        """The stripe's lock file: ``NN.lock`` serialises downloads, installs
        and removals; ``NN.use`` (*kind* "use") makes a hit and a removal
        exclusive without making hits wait for a download. Order: ``.lock``,
        then ``.use``, then the ledger."""
        stripe = zlib.crc32(oid + tid) % LOCK_STRIPES
        return os.path.join(self._locks_dir, f"{stripe:02x}.{kind}")

    def new_temp_file(self, prefix: str) -> str:
        """An empty private file under ``tmp/``, on the cache's file system
        (``mkstemp``: created with ``O_EXCL | O_NOFOLLOW``, mode 0600)."""
        fd, name = tempfile.mkstemp(dir=self.temp_dir, prefix=prefix)
        os.close(fd)
        return name

    # -- reading ---------------------------------------------------------

    def lookup(self, oid: bytes, tid: bytes) -> str | None:
        """The cached file's path, marked as just used; None when not cached,
        or when its size is no longer the size it was installed with (it is
        then removed, so the caller downloads it again)."""
        path, damaged = self._used_hit(oid, tid)
        if damaged:
            with _flock(self._lock_path(oid, tid)):
                path, damaged = self._hit(oid, tid)
                if damaged:
                    self._remove_damaged(oid, tid)
            self._remove_empty_dirs(os.path.dirname(self.path(oid, tid)))
        return path

    def _hit(
        self, oid: bytes, tid: bytes, fresh: os.stat_result | None = None
    ) -> tuple[str | None, bool]:
        """(path, False) for a sound cached file, marked as used; (None, True)
        for a file whose size differs from the one recorded at install (by
        the file itself, or this process's index); (None, False) if absent.
        Takes no lock, so callers may hold the stripe lock or not. *fresh* is
        the file's lstat, if the caller has it."""
        revision = (oid, tid)
        path = self.path(oid, tid)
        try:
            st = fresh or os.lstat(path)
            if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid():
                # A symlink or another user's file where a blob belongs: never
                # served; removed (the link, not its target) and downloaded.
                return None, True
            size = st.st_size
            recorded = _recorded_size(path)
            os.utime(path)  # other processes sharing the cache see the use
        except FileNotFoundError:
            return None, False
        with self._state_lock:
            indexed = None if self._index is None else self._index.touch(revision)
        # The file's own record is authoritative; this process's index (what
        # it installed or scanned) covers files sealed without one.
        expected = indexed if recorded is None else recorded
        if expected is not None and expected != size:
            return None, True
        if indexed != size:  # e.g. installed by another process since our scan
            self._record(revision, size)
        self.metrics.hit(oid, tid, size)
        return path, False

    def _used_hit(self, oid: bytes, tid: bytes) -> tuple[str | None, bool]:
        """:meth:`_hit` under the stripe's shared use lock: an eviction (which
        takes it exclusively to check a file's last use and remove it) either
        sees this use or has removed the file before this looks, so a path
        handed out is never evicted in the same instant (MIN_AGE holds).

        A file marked used (by this cache's ``utime``) within the last quarter
        of ``min_age`` needs no lock: an eviction deciding on it, now or
        before this looked, sees that recent use and keeps it (the hot path of
        a warm read). Freshness is judged by the modification time, which only
        the cache sets (at install and on each hit; the files are read-only),
        never by the access time, which any plain read of the file may move
        without the lock; eviction judges by :func:`last_used`, never earlier
        than the modification time, so what is fresh here is young there."""
        try:
            st = os.lstat(self.path(oid, tid))
        except FileNotFoundError:
            return None, False
        if time.time() - st.st_mtime < self.min_age * _FRESH:
            return self._hit(oid, tid, st)
        with _flock(self._lock_path(oid, tid, "use"), shared=True):
            return self._hit(oid, tid)

    def _remove_damaged(self, oid: bytes, tid: bytes) -> None:
        """Remove a file whose size changed since it was installed; the caller
        holds its stripe lock."""
        path = self.path(oid, tid)
        log.warning(
            "Cached blob %s is not the file installed (its size changed, or it "
            "is a symlink or another user's file): removed, to be downloaded "
            "again",
            path,
        )
        self._remove_locked(oid, tid)

    def fetch(self, oid: bytes, tid: bytes, download: Callable[[BinaryIO], int]) -> str:
        """Return the cached file for (oid, tid), calling *download* if absent.

        Under the blob's lock the cache is checked again, so concurrent loaders
        (threads or processes) download once. *download* writes into a temp
        file and returns the size it wrote; the file is renamed into place
        only when it has that size and is on disk.
        """
        path, _damaged = self._used_hit(oid, tid)
        if path is not None:
            return path
        with _flock(self._lock_path(oid, tid)):
            path, damaged = self._hit(oid, tid)
            if path is not None:
                return path
            if damaged:
                self._remove_damaged(oid, tid)
            path = self.path(oid, tid)
            # mkstemp's descriptor (O_EXCL | O_NOFOLLOW, read and write: the
            # download reads its bytes back through it to check them).
            fd, temp = tempfile.mkstemp(dir=self.temp_dir, prefix="download-")
            try:
                with open(fd, "w+b") as out:
                    size = download(out)
                    out.flush()
                    written = os.fstat(out.fileno()).st_size
                    if written != size:
                        raise S3BlobStorageError(
                            f"Download of blob {hex_id(oid)}/{hex_id(tid)} "
                            f"reported {size} bytes but wrote {written}"
                        )
                    _seal(out.fileno(), size)
                total = self._install(temp, path, size)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.remove(temp)
                raise
        self.metrics.miss(oid, tid, size)
        self._added((oid, tid), size, total)
        return path

    # -- writing ---------------------------------------------------------

    def take(self, filename: str) -> str:
        """Move a file the caller hands over into ``tmp/``; return its new path.

        ZODB's ``rename_or_copy_blob`` falls back to a copy when the file lives
        on another file system (and logs it, as ZODB's own storages do). The
        file is then sealed (its size recorded, flushed to disk), so that
        :meth:`install`, in ``tpc_finish``, only renames; and its mtime is
        set to now, so that no process takes it for abandoned while it waits.
        """
        staged = self.new_temp_file("staged-")
        rename_or_copy_blob(filename, staged, chmod=False)
        os.utime(staged)
        fd = os.open(staged, os.O_RDONLY)
        try:
            _seal(fd, os.fstat(fd).st_size)
        finally:
            os.close(fd)
        return staged

    def install(self, oid: bytes, tid: bytes, staged: str) -> bool:
        """Rename a file sealed by :meth:`take` into the cache as (oid, tid);
        return whether it was installed. Never waits: when another thread or
        process holds the revision's stripe lock (a reader downloading it, on
        a ZEO client perhaps waiting for its copy to land), it is left to
        that reader, and to later downloads (``tpc_finish`` must not block).

        Raises only OSError, e.g. when the staged file's size is no longer the
        one recorded when it was taken: it is then not installed, and will be
        downloaded when read.
        """
        size = os.stat(staged).st_size
        recorded = _recorded_size(staged)
        if recorded is not None and recorded != size:
            raise OSError(
                errno.EIO,
                f"staged blob has {size} bytes, not the {recorded} it was taken with",
                staged,
            )
        with _flock(self._lock_path(oid, tid), blocking=False) as acquired:
            if not acquired:
                return False
            total = self._install(staged, self.path(oid, tid), size)
        self._added((oid, tid), size, total)
        return True

    def _install(self, source: str, path: str, size: int) -> int:
        """Rename *source* (of *size* bytes) to *path*, under its stripe lock;
        return the ledger's new total."""
        os.chmod(source, FILE_MODE)
        self._share(source, GROUP_FILE_MODE)
        # Used from the moment it is installed, as every process sees it: the
        # file's times are those of the download's start or of storeBlob, and
        # a path handed out must not look evictable (MIN_AGE).
        os.utime(source)
        try:
            replaced = os.lstat(path).st_size
        except FileNotFoundError:
            replaced = 0
        self._rename_into_place(source, path)
        return self._ledger.add(size - replaced)

    def _rename_into_place(self, source: str, path: str) -> None:
        """Rename *source* to *path*, creating its ``<xx>/`` and oid
        directories if needed, and refusing them (UntrustedCacheDirectory)
        when another user could write them, before a file goes in: the two
        lstats an install costs, beside its fsync, cover the directories a
        hit later trusts without looking."""
        oid_dir = os.path.dirname(path)
        bucket_dir = os.path.dirname(oid_dir)
        for _attempt in range(_INSTALL_ATTEMPTS):
            try:
                # Missing when new, or removed as empty by an eviction (in any
                # process), which may happen again between these steps.
                for directory in (bucket_dir, oid_dir):
                    if _mkdir(directory):
                        self._share(directory)
                check_trusted_directory(bucket_dir)
                check_trusted_directory(oid_dir)
                os.replace(source, path)
                return
            except FileNotFoundError:
                continue
        os.replace(source, path)

    def discard(self, oid: bytes, tid: bytes) -> None:
        """Remove the cached copy of (oid, tid), if any, and empty directories."""
        with _flock(self._lock_path(oid, tid)):
            self._remove_locked(oid, tid)
        self._remove_empty_dirs(os.path.dirname(self.path(oid, tid)))

    def _remove_locked(self, oid: bytes, tid: bytes) -> int | None:
        """Remove the cached file of (oid, tid); the caller holds its stripe
        lock. Returns its size, or None if there was none."""
        self._record((oid, tid), None)
        path = self.path(oid, tid)
        try:
            with _flock(self._lock_path(oid, tid, "use")):
                size = os.lstat(path).st_size
                os.remove(path)
        except FileNotFoundError:
            return None
        self._ledger.add(-size)
        return size

    def _remove_empty_dirs(self, oid_dir: str) -> None:
        for directory in (oid_dir, os.path.dirname(oid_dir)):
            try:
                os.rmdir(directory)
            except OSError as exc:
                if exc.errno in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOENT):
                    return
                raise

    # -- eviction --------------------------------------------------------

    def indexed_files(self) -> int:
        """How many cached files this process's index knows: every file of
        the directory at its last scan, with this process's changes since."""
        with self._state_lock:
            return 0 if self._index is None else len(self._index)

    def recorded_bytes(self) -> int | None:
        """The total size of the cache's blob files as the shared ledger
        records it, for every process using the directory, without walking
        it; None until a first scan has written the ledger."""
        return self._ledger.read()

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

    def _added(self, revision: tuple[bytes, bytes], size: int, total: int) -> None:
        """Account a new file; start an eviction check when the directory's
        total (*total*, from the ledger) exceeds the limit."""
        with self._state_lock:
            self._apply(revision, size)
            self._bytes_since_scan += size
            if total <= self.size_limit:
                return
        self._start_check()

    def _start_check(self) -> None:
        """Have the eviction thread check the cache once more, starting it if
        it is not running. A check requested while one runs is not lost: the
        thread loops until none is pending."""
        with self._state_lock:
            self._check_pending = True
            self._wakeup.notify()
            if self._evictor is not None:
                return
            self._evictor = threading.Thread(
                target=self._check_until_done, name="zodb-s3blobs-evict", daemon=True
            )
            self._evictor.start()

    def _check_until_done(self) -> None:
        while True:
            with self._state_lock:
                # A check that stopped at files used within min_age, with the
                # cache over its limit, is repeated once the oldest may go;
                # close() stops the wait (it does not wait a minute).
                while (
                    self._recheck_at is not None
                    and not self._check_pending
                    and not self._stop_waiting
                ):
                    delay = self._recheck_at - time.time()
                    if delay <= 0:
                        self._check_pending = True
                    else:
                        self._wakeup.wait(delay)
                self._recheck_at = None
                if not self._check_pending or self._closing.is_set():
                    self._evictor = None
                    return
                self._check_pending = False
            try:
                lock = os.path.join(self._locks_dir, "evict.lock")
                # Waits for another thread or process that is evicting: the
                # total may still be over the limit when it has finished.
                with _flock(lock, stop=self._closing) as acquired:
                    if acquired:
                        self._evict_locked(None)
            except Exception:
                log.exception("Blob cache eviction in %s failed", self.directory)

    def _remove_abandoned_temp_files(self) -> None:
        """Remove downloads and staged uploads a killed process left in tmp/.

        A file still in tmp/ was never installed, so it is never served; one
        not written for a day belongs to no transaction or download still
        running (downloads write, and :meth:`take` sets the mtime of what it
        stages).
        """
        cutoff = time.time() - ABANDONED_AFTER
        for entry in _entries(self.temp_dir):
            if entry.name.startswith(("download-", "staged-", "fallback-")):
                with contextlib.suppress(FileNotFoundError):
                    if entry.stat().st_mtime < cutoff:
                        os.remove(entry.path)

    def files(self) -> Iterator[tuple[str, os.stat_result]]:
        """Every cached blob file with its stat (not staged or temp files)."""
        for _revision, path, st in self._walk():
            yield path, st

    def _walk(self) -> Iterator[tuple[tuple[bytes, bytes], str, os.stat_result]]:
        """Every cached file, skipping (with a warning) directories another
        user could write and anything but this user's regular files."""
        for revision, path, st in walk(self.directory, _trusted_entry):
            if st.st_uid == os.geteuid():
                yield revision, path, st

    def _scan(self) -> None:
        """Rebuild the index from the directory, in access-time order, and
        rewrite the shared ledger with the total found. Called under
        ``evict.lock``."""
        started = time.monotonic()
        with self._state_lock:
            self._during_scan = []
        try:
            recorded_before = self._ledger.read()
            found = sorted(self._walk(), key=lambda item: last_used(item[2]))
        except BaseException:
            with self._state_lock:
                self._during_scan = None
            raise
        index = LRUIndex(
            (revision, st.st_size, last_used(st)) for revision, _path, st in found
        )
        total = self._ledger.rewrite(index.total, recorded_before)
        with self._state_lock:
            # Replay what happened during the walk, which it may have missed.
            for revision, size in self._during_scan:
                index.apply(revision, size)
            self._during_scan = None
            self._index = index
            self._bytes_since_scan = 0
        log.debug(
            "Indexed %d cached files (%d bytes; ledger %d) in %s in %.3fs",
            len(index),
            index.total,
            total,
            self.directory,
            time.monotonic() - started,
        )

    def evict(self, target: int | None = None, wait: bool = True) -> int:
        """Delete least-recently-used files until the directory holds at most
        *target* bytes (default: 90% of the limit, if the limit is exceeded),
        counting every process's files. Returns the bytes freed. With *wait*
        false, returns 0 at once when another thread or process is evicting.

        Costs what it deletes: the directory is walked only to build the index,
        after each cache-size of loads, and when the index runs out of files
        before the shared total reaches *target* (other processes' files).
        """
        lock = os.path.join(self._locks_dir, "evict.lock")
        with _flock(lock, blocking=wait) as acquired:
            if not acquired:
                return 0
            return self._evict_locked(target)

    def _evict_locked(self, target: int | None) -> int:
        """:meth:`evict`, for a caller holding ``evict.lock``."""
        with self._state_lock:
            stale = self._index is None or self._bytes_since_scan >= self.size_limit
        total = None if stale else self._ledger.read()
        scanned = total is None
        if scanned:
            self._scan()
            total = self._ledger.read() or 0
        if target is None:
            if total <= self.size_limit:
                return 0
            target = int(self.size_limit * EVICTION_TARGET)
        freed = 0
        with self._state_lock:
            # Each revision is passed over at most once as used elsewhere.
            passes = len(self._index)
        while total > target and not self._closing.is_set():
            with self._state_lock:
                oldest = self._index.pop_oldest()
            if oldest is None:
                if scanned:
                    break
                # The index does not cover the directory (other processes'
                # files, or a stale total): learn it, and go on.
                self._scan()
                scanned = True
                total = self._ledger.read() or 0
                continue
            (oid, tid), size, used = oldest
            if used > time.time() - self.min_age:
                # Every file left was used within min_age: keep them all, and
                # check again once the oldest may go.
                with self._state_lock:
                    self._index.put_back_oldest((oid, tid), size, used)
                    self._recheck_at = used + self.min_age
                break
            removed, used_at, total_after = self._evict_one(
                oid, tid, used if passes > 0 else None
            )
            passes -= 1
            if used_at is not None:  # another process used it since
                with self._state_lock:
                    self._index.add((oid, tid), used_at[0], used_at[1])
                continue
            if removed is not None:
                freed += removed
                self.metrics.add(cache_evictions=1, cache_evicted_bytes=removed)
                self._remove_empty_dirs(os.path.dirname(self.path(oid, tid)))
            refreshed = total_after if total_after is not None else self._ledger.read()
            total = refreshed or 0
        log.debug("Evicted %d bytes from %s", freed, self.directory)
        return freed

    def _evict_one(
        self, oid: bytes, tid: bytes, used: float | None
    ) -> tuple[int | None, tuple[int, float] | None, int | None]:
        """Remove (oid, tid) under its stripe lock unless its last use
        (:func:`last_used`) says another process used it after *used* (None:
        whenever), or within
        ``min_age`` seconds. Returns (bytes removed or None, (size, last use)
        if kept, new total)."""
        path = self.path(oid, tid)
        with (
            _flock(self._lock_path(oid, tid)),
            _flock(self._lock_path(oid, tid, "use")),
        ):
            try:
                st = os.lstat(path)
            except FileNotFoundError:
                return None, None, None
            used_at = last_used(st)
            if (
                used is not None and used_at > used + _USED_ELSEWHERE
            ) or used_at > time.time() - self.min_age:
                return None, (st.st_size, used_at), None
            try:
                os.remove(path)
            except FileNotFoundError:
                return None, None, None
        return st.st_size, None, self._ledger.add(-st.st_size)

    def close(self) -> None:
        """Let a running eviction check finish (for up to 10 seconds, then ask
        it to stop), so that no thread outlives the storage."""
        with self._state_lock:
            evictor = self._evictor
            self._stop_waiting = True
            self._wakeup.notify()
        if evictor is not None:
            evictor.join(timeout=10)
            if evictor.is_alive():
                self._closing.set()
                evictor.join(timeout=1)
        with self._state_lock:
            self._stop_waiting = False


def revision_path(directory: str, oid: bytes, tid: bytes) -> str:
    """Where the cache in *directory* keeps revision *tid* of *oid*:
    ``xx/OID/TID.blob``, xx the oid's last two hex digits."""
    oid_hex = hex_id(oid)
    return os.path.join(
        directory, oid_hex[-2:].rjust(2, "0"), oid_hex, hex_id(tid) + ".blob"
    )


def walk(
    directory: str, trusted: Callable[[os.DirEntry], bool] = lambda entry: True
) -> Iterator[tuple[tuple[bytes, bytes], str, os.stat_result]]:
    """Every cached blob file of the cache in *directory*: its revision, path
    and ``lstat``; regular files only, in directories *trusted* accepts.
    Reads only: nothing is created, removed, locked or touched (operator
    tools walk a cache this way without opening it)."""
    for bucket in _subdirectories(directory):
        if bucket.name in RESERVED or not trusted(bucket):
            continue
        for oid_dir in _subdirectories(bucket.path):
            if not trusted(oid_dir):
                continue
            for entry in _entries(oid_dir.path):
                revision = _revision(oid_dir.name, entry.name)
                if revision is None:
                    continue
                try:
                    st = entry.stat(follow_symlinks=False)
                except FileNotFoundError:  # evicted meanwhile
                    continue
                if stat.S_ISREG(st.st_mode):
                    yield revision, entry.path, st


def _revision(oid_hex: str, filename: str) -> tuple[bytes, bytes] | None:
    """(oid, tid) of a cache file name, or None for a name that is not ours."""
    tid_hex, dot, extension = filename.partition(".")
    if extension != "blob" or not dot:
        return None
    try:
        return p64(int(oid_hex, 16)), p64(int(tid_hex, 16))
    except (ValueError, OverflowError):
        return None
