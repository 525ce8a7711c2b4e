"""The local blob cache: committed blob files on disk, shared by processes.

Layout under the cache directory (mode 0o700)::

    tmp/                      staged and downloading files, savepoints
    locks/NN.lock             256 lock files, striped by (oid, tid)
    locks/NN.use              hits (shared) against removals (exclusive)
    locks/evict.lock          held by whichever process is evicting
    locks/index.sqlite        the index of the cached files (cacheindex)
    locks/boot                the boot the cache was last checked in
    <xx>/<oid_hex>/<tid_hex>.blob

Files appear atomically (written under ``tmp/``, then renamed into place)
and are read-only (0o400), so a reader never sees a partial file, and an
accidental ``open(blob.committed(), "w")`` fails instead of truncating the
cached copy. Each file records its size at install; a hit on a file whose
size differs is not served. Downloads and deletions of one blob hold that
blob's stripe lock (``flock``, which also excludes other threads of this
process), so two loaders never race and eviction never removes a file
half-installed; no thread takes a lock it holds.

The index, one SQLite database shared by every process using the directory
(:mod:`.cacheindex`), has a row per file and their exact total: a row is
written before its file is renamed into place, and deleted after its file
is removed, so it always covers the files (a crash leaves at most rows
without files, which eviction drops). Hits never read it. An install over
``cache-size`` starts a check in the cache's background thread, which
evicts least-recently-used files down to 90% of the size limit, oldest rows
first, keeping (and moving the row of) any file used since its row was
written, by the file's own times; only one process evicts at a time. The
index outlives the processes: none walks the directory at start. A missing
index (an earlier version's cache) or a damaged one is rebuilt from the
files by a walk in the background thread, as are the files of an
install whose row could not be written (the index busy for seconds: the
file is installed anyway, a read or a commit never fails for the index),
and those of a process of an earlier version still using the directory
(noticed by its ledger, ``locks/total``, reappearing).

Nothing is flushed on the path of a read or a commit: the background
thread flushes (``fsync``) installed files a few seconds later, in batches,
and marks their rows durable. Each install carries a random token, in its
row and in an extended attribute of its file; a row is marked durable only
for the file carrying its token. ``locks/boot`` (:mod:`.bootrecord`)
records the machine's boot in which the cache was last checked; the first
process to open the cache after a restart (a power loss may have left
unflushed files empty or zero-filled under their final names) removes,
before serving any hit, every file whose row is not durable or carries
another token, and every file without a row (whose row a power loss rolled
back); with the index missing or damaged, nothing tells those files from
the others, and it removes them all (see :meth:`BlobCache._open_index`).

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
when a file is installed into them, and skipped by a walk otherwise. Lock
and temp files are opened with ``O_NOFOLLOW`` (the index is refused unless a
regular file of this user), and a hit serves only a
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
import sqlite3
import stat
import tempfile
import threading
import time
import weakref
import zlib
from collections.abc import Callable, Iterable, Iterator
from typing import BinaryIO, TypeVar

from ZODB.blob import rename_or_copy_blob
from ZODB.utils import p64

from . import bootrecord, cacheindex
from .cacheindex import CacheIndex, Flushed, Found, Row, Seen
from .errors import S3BlobStorageError
from .keys import hex_id
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
#: The extended attribute holding the random token of a file's install, which
#: its row holds too (see cacheindex).
TOKEN_ATTRIBUTE = "user.zodb_s3blobs.install"
#: The ledger of the cached bytes that earlier versions, without the shared
#: index, keep under locks/.
OLD_LEDGER = "total"
#: What a failed call to the index raises: SQLite's errors (the database busy
#: for BUSY_TIMEOUT), S3BlobStorageError (one of a newer release, or not a
#: regular file), and OSError (its file removed while reconnecting, no
#: descriptor left). Reads and installs go on without it.
_INDEX_ERRORS = (sqlite3.Error, S3BlobStorageError, OSError)
#: How often a waiting eviction check retries ``evict.lock`` (seconds).
_LOCK_POLL = 0.02
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
#: Lock files: never through a symlink.
_LOCK_FLAGS = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
#: A cached file opened to flush it: never through a symlink, never waiting
#: (a FIFO), checked by fstat before use.
_READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
#: The index of the cached files, under locks/ (see cacheindex).
INDEX_NAME = "index.sqlite"
#: Installed files are flushed to disk this many seconds later, in batches.
FLUSH_DELAY = 5.0
#: Rows read, written or evicted per transaction.
BATCH = 500
T = TypeVar("T")


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


def _recorded_token(target: str | int) -> int | None:
    """The token of a cached file's install (see :func:`_seal`); None for a
    file without one (an earlier version's, or where user extended
    attributes are not kept)."""
    try:
        if isinstance(target, int):
            return int(os.getxattr(target, TOKEN_ATTRIBUTE))
        return int(os.getxattr(target, TOKEN_ATTRIBUTE, follow_symlinks=False))
    except (OSError, ValueError):
        return None


def _seal(fd: int, size: int) -> None:
    """Record *size* and a new random install token with the file, before it
    is renamed into the cache: a file whose size later differs from the
    record is never served, and its row vouches for it only with its token
    (cacheindex). It is flushed to disk later, off the critical path
    (BlobCache._flush_installed), unless the token could not be recorded on
    a file system that keeps user extended attributes (then now, as nothing
    else could vouch for it after a power loss). Where none are kept, no
    file is ever vouched for: a machine restart removes them all."""
    token = int.from_bytes(os.urandom(8), "big", signed=True)  # SQLite's INTEGER
    try:
        os.setxattr(fd, SIZE_ATTRIBUTE, str(size).encode())
        os.setxattr(fd, TOKEN_ATTRIBUTE, str(token).encode())
    except OSError as exc:
        if exc.errno not in (errno.ENOTSUP, errno.EOPNOTSUPP):
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


def _any_entry(entry: os.DirEntry) -> bool:
    return True


def _trusted_entry(entry: os.DirEntry) -> bool:
    """Whether a directory met by a walk is only this user's to write; one
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
        self._evict_lock = os.path.join(self._locks_dir, "evict.lock")
        self._ledger = os.path.join(self._locks_dir, OLD_LEDGER)
        self._check_pending = False
        # When a check stopped at files used within min_age: when to retry.
        self._recheck_at: float | None = None
        # When the files installed since the last flush are to be flushed.
        self._flush_at: float | None = None
        self._stop_waiting = False
        self._new_background_state()
        _open_caches.add(self)
        # Whether the next check walks the files to give each one a row (an
        # install could not write its own, the index was replaced).
        self._adopt_pending = False
        # Until when installs do not wait for a busy index (time.monotonic).
        self._index_busy_until = 0.0
        self._warned_of_old_release = False
        self._open_index()
        self._remove_abandoned_temp_files()
        # Builds a new index (in the background: opening the storage does not
        # wait for a walk of a large cache) and flushes what a crash left.
        self._start_check()
        self._request(flush_at=time.time())

    def __repr__(self) -> str:
        return f"<BlobCache {self.directory} limit={self.size_limit}>"

    def _new_background_state(self) -> None:
        """No background thread, and new locks for one: at open, and in a
        child just forked (the parent's thread is not the child's, and may
        have held these locks at the fork)."""
        self._state_lock = threading.Lock()
        self._wakeup = threading.Condition(self._state_lock)
        self._closing = threading.Event()
        # The background thread, if one runs: eviction checks and flushes;
        # it exits when none is pending or due.
        self._background: threading.Thread | None = None

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
        then ``.use``; the index's transactions take no file lock."""
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
        the file itself); (None, False) if absent. Takes no lock and reads no
        index, so callers may hold the stripe lock or not. *fresh* is the
        file's lstat, if the caller has it."""
        path = self.path(oid, tid)
        try:
            st = fresh or os.lstat(path)
            if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid():
                # A symlink or another user's file where a blob belongs: never
                # served; removed (the link, not its target) and downloaded.
                return None, True
            size = st.st_size
            recorded = _recorded_size(path)
            now = time.time()  # other processes sharing the cache see the use
            os.utime(path, (now, now))
        except FileNotFoundError:
            return None, False
        if recorded is None:  # a file system without user xattrs: ask the index
            with contextlib.suppress(*_INDEX_ERRORS):  # busy: served unchecked
                recorded = self._index.size_of(oid, tid)
        if recorded is not None and recorded != size:
            return None, True
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
        only when it has that size (it is flushed to disk a few seconds later,
        in the background: see :meth:`_flush_installed`).
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
            # mkstemp's descriptor (O_EXCL | O_NOFOLLOW, read and write: a
            # copy from the fallback reads its bytes back to checksum them).
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
                total = self._install(oid, tid, temp, size)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.remove(temp)
                raise
        self.metrics.miss(oid, tid, size)
        self._added(total)
        return path

    # -- writing ---------------------------------------------------------

    def take(self, filename: str) -> str:
        """Move a file the caller hands over into ``tmp/``; return its new path.

        ZODB's ``rename_or_copy_blob`` falls back to a copy when the file lives
        on another file system (and logs it, as ZODB's own storages do). The
        file is then sealed (its size recorded), so that :meth:`install`, in
        ``tpc_finish``, only renames; and its mtime is set to now, so that no
        process takes it for abandoned while it waits. It is not flushed to
        disk: the vote makes the S3 object durable, and a crash before
        ``tpc_finish`` only loses this copy (the transaction aborts, or the
        blob is downloaded when read).
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
            total = self._install(oid, tid, staged, size)
        self._added(total)
        return True

    def _install(self, oid: bytes, tid: bytes, source: str, size: int) -> int:
        """Rename *source* (of *size* bytes) into the cache as (oid, tid),
        under its stripe lock; return the index's new total."""
        os.chmod(source, FILE_MODE)
        self._share(source, GROUP_FILE_MODE)
        # Used from the moment it is installed, as every process sees it: the
        # file's times are those of the download's start or of storeBlob, and
        # a path handed out must not look evictable (MIN_AGE).
        used = time.time()
        os.utime(source, (used, used))
        # Recorded before the rename, not yet durable: the index always
        # covers the files (a crash in between leaves a row without a file).
        path = self.path(oid, tid)
        total = self._record(oid, tid, size, used, _recorded_token(source), path)
        self._rename_into_place(source, path)
        return total

    def _record(
        self,
        oid: bytes,
        tid: bytes,
        size: int,
        used: float,
        token: int | None,
        path: str,
    ) -> int | None:
        """Write the row of a file about to be installed at *path*; return
        the index's new total, or None when the index could not be written
        (busy for BUSY_TIMEOUT, or replaced by a newer release's): the file
        is installed all the same, and the next check's walk gives it a row,
        so that the index never fails or stalls a read or a commit. After
        such a failure, installs do not wait for the index for FLUSH_DELAY
        seconds (a transaction of many blobs waits once)."""
        wait = 0.0 if time.monotonic() < self._index_busy_until else None
        try:
            return self._index.add(oid, tid, size, used, token, wait=wait)
        except _INDEX_ERRORS as exc:
            self._index_busy_until = time.monotonic() + FLUSH_DELAY
            self._adopt_pending = True
            log.warning(
                "Blob cache index %s could not be written (%s): %s is installed "
                "without its row, which the next eviction check gives it",
                self._index.path,
                exc,
                path,
            )
            return None

    def _rename_into_place(self, source: str, path: str) -> None:
        """Rename *source* to *path*, creating its ``<xx>/`` and oid
        directories if needed, and refusing them (UntrustedCacheDirectory)
        when another user could write them, before a file goes in: the two
        lstats an install costs cover the directories a
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

    def _remove_locked(self, oid: bytes, tid: bytes, forget: bool = True) -> int | None:
        """Remove the cached file of (oid, tid), and then (the index always
        covers the files) its row unless *forget* is false; the caller holds
        its stripe lock. Returns its size, or None if there was none."""
        path = self.path(oid, tid)
        try:
            with _flock(self._lock_path(oid, tid, "use")):
                size = os.lstat(path).st_size
                os.remove(path)
        except FileNotFoundError:
            size = None
        if forget:
            self._forget(oid, tid)
        return size

    def _forget(self, oid: bytes, tid: bytes) -> None:
        """Delete the row of a file removed; when the index cannot be written,
        leave it (a row without a file is dropped by eviction or a flush)."""
        try:
            self._index.forget(oid, tid)
        except _INDEX_ERRORS as exc:
            log.warning(
                "Blob cache index %s could not be written (%s): the row of the "
                "removed %s is left for eviction to drop",
                self._index.path,
                exc,
                self.path(oid, tid),
            )

    def _remove_empty_dirs(self, oid_dir: str) -> None:
        for directory in (oid_dir, os.path.dirname(oid_dir)):
            try:
                os.rmdir(directory)
            except OSError as exc:
                if exc.errno in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOENT):
                    return
                raise

    # -- the index -------------------------------------------------------

    def indexed_files(self) -> int:
        """How many cached files the directory's index records, for every
        process using it (with rows a crash left without their file, until
        eviction meets them)."""
        return self._index.totals()[0]

    def recorded_bytes(self) -> int | None:
        """The total size of the cache's blob files as the directory's index
        records it, for every process using it, without walking the
        directory; None while the index is being built from the files."""
        if self._index.fact("complete") is None:
            return None
        return self._index.totals()[1]

    def _new_index(self) -> CacheIndex:
        return CacheIndex(
            os.path.join(self._locks_dir, INDEX_NAME), on_replaced=self._index_replaced
        )

    def _index_replaced(self) -> None:
        """The index file was replaced under this cache (an operator removed
        it, a process set it aside as damaged): have the next check give
        every file a row again, so that the size limit holds."""
        self._adopt_pending = True
        self._start_check()

    def _holds_files(self) -> bool:
        return any(e.name not in RESERVED for e in _subdirectories(self.directory))

    def _open_index(self) -> None:
        """Open the directory's index (see :mod:`.cacheindex`); when the
        machine restarted since the cache was last checked (``locks/boot``,
        :mod:`.bootrecord`), first remove what a power loss may have
        damaged, before any hit can serve it. In the boot recorded, a
        missing or damaged index is rebuilt by the background walk, its
        files not durable (the page cache holds them: the flush marks them).
        """
        current = cacheindex.boot_id()
        recorded = bootrecord.read(self._locks_dir)
        if recorded == current:
            self._index = self._new_index()
        elif not current or recorded == bootrecord.UNKNOWN:
            # No evidence of a restart: a check now would remove files other
            # processes of this boot serve (unflushed for a few seconds).
            log.warning(
                "Blob cache %s: %s could not be read, so a machine restart "
                "since the cache was last checked cannot be told; not checked",
                self.directory,
                "the boot record" if current else cacheindex.BOOT_ID_FILE,
            )
            self._index = self._new_index()
        else:
            # Processes opening meanwhile wait, and find the boot recorded.
            with _flock(self._evict_lock):
                self._open_index_after_restart(current)
        if self._index.fact("complete") is None and not self._holds_files():
            self._index.set_fact("complete", "1")  # nothing to adopt

    def _open_index_after_restart(self, current: str) -> None:
        """:meth:`_open_index` when the boot recorded (if any) is not
        *current*, under ``evict.lock``. A sound index: the restart check. A
        missing index, no boot recorded and a ledger (``locks/total``): an
        earlier version's cache, whose files were flushed at install
        (adopted as durable). Otherwise an index missing or damaged, and no
        record of this boot: nothing tells the files a power loss may have
        damaged, all are removed. Then the boot is recorded."""
        recorded = bootrecord.read(self._locks_dir)
        existed = os.path.lexists(os.path.join(self._locks_dir, INDEX_NAME))
        # An earlier version kept a ledger and no index nor boot record.
        earlier_release = os.path.lexists(self._ledger)
        index = self._index = self._new_index()
        if recorded in (current, bootrecord.UNKNOWN):  # done meanwhile, or
            return  # no evidence (see _open_index)
        if not index.created:
            self._check_after_restart()
        elif not existed and recorded is None and earlier_release:
            index.set_fact("adopt_durable", "1")
        elif self._holds_files():
            # An index missing or damaged, with no record of this boot (or of
            # an earlier one: locks/ lost): nothing vouches for the files.
            self._remove_all_files()
        with contextlib.suppress(FileNotFoundError):
            os.remove(self._ledger)
        bootrecord.write(self._locks_dir, current)

    def _check_after_restart(self) -> None:
        """Remove the files a power loss may have left empty or zero-filled
        (with the right size) under their final names: those whose rows say
        they were not yet flushed, or were marked flushed for another file of
        the same revision (a row rolled back by the loss: its token is not
        the file's), and those without a row. Where user extended attributes
        are not kept (no tokens), every file. Runs at open under
        ``evict.lock``, by a walk."""
        started = time.monotonic()
        tokens = self._keeps_tokens()
        unflushed = unindexed = 0
        for batch in _batches(self._walk(trusted_only=False)):
            rows = self._index.vouchers([revision for revision, _p, _st in batch])
            for revision, path, _st in batch:
                row = rows.get(revision)
                if row is None:
                    unindexed += 1
                elif tokens and row[0] and row[1] == _recorded_token(path):
                    continue  # flushed, and this very file
                else:
                    unflushed += 1
                self.discard(*revision)
        # Every file left has a row: the index is complete, if it was not.
        self._index.set_fact("complete", "1")
        log.warning(
            "Blob cache %s: the machine restarted since it was last used; "
            "removed %d files not yet flushed to disk and %d not indexed, "
            "which a power loss may have damaged (%.1fs)%s",
            self.directory,
            unflushed,
            unindexed,
            time.monotonic() - started,
            ""
            if tokens
            else "; its file system keeps no user extended attributes, so no "
            "file could be vouched for",
        )

    def _keeps_tokens(self) -> bool:
        """Whether the cache's file system keeps user extended attributes
        (the install tokens), tried on a new file under ``tmp/``."""
        fd, probe = tempfile.mkstemp(dir=self.temp_dir, prefix="probe-")
        try:
            os.setxattr(fd, TOKEN_ATTRIBUTE, b"0")
        except OSError:
            return False
        finally:
            os.close(fd)
            os.remove(probe)
        return True

    def _remove_all_files(self) -> None:
        """Remove every cached file: the machine restarted and the index,
        which told the files flushed to disk from the others, is missing or
        damaged (or the boot record unreadable). Runs at open under
        ``evict.lock``, on a new index (no rows to delete)."""
        removed = 0
        for (oid, tid), _path, _st in self._walk(trusted_only=False):
            with _flock(self._lock_path(oid, tid)):
                if self._remove_locked(oid, tid, forget=False) is not None:
                    removed += 1
            self._remove_empty_dirs(os.path.dirname(self.path(oid, tid)))
        self._index.set_fact("complete", "1")
        log.warning(
            "Blob cache %s: the machine restarted since it was last used, and "
            "its index is missing or damaged, so nothing tells the files "
            "flushed to disk from those a power loss may have damaged: "
            "removed all %d cached files, to be downloaded again",
            self.directory,
            removed,
        )

    def _index_files(self) -> None:
        """Give every cached file a row (INSERT OR IGNORE), by a walk in
        batches under ``evict.lock`` (hits are served meanwhile, eviction
        waits for it), when the index is new (missing, damaged, replaced), an
        install could not write its row, or a process of an earlier version
        installs files here (it recreated ``locks/total``). The files are
        recorded as not durable (the flush then marks them), unless the
        index was created for an earlier version's cache, whose files were
        flushed at install. Interrupted (close()), it starts again next
        time."""
        if self._found_old_release():
            self._adopt_pending = True
        if not self._adopt_pending and self._index.fact("complete") is not None:
            return
        self._adopt_pending = False  # set again by what fails meanwhile
        try:
            self._walk_into_index()
        except BaseException:
            self._adopt_pending = True
            raise

    def _walk_into_index(self) -> None:
        durable = self._index.fact("adopt_durable") is not None
        started = time.monotonic()
        log.info("Indexing the files of blob cache %s", self.directory)
        adopted = 0
        for batch in _batches(self._found()):
            self._index.adopt(batch, durable)
            adopted += len(batch)
            if self._closing.is_set():
                self._adopt_pending = True
                return
        self._index.set_fact("complete", "1")
        self._index.drop_fact("adopt_durable")
        if not durable:
            self._request(flush_at=time.time())
        log.info(
            "Indexed %d files of blob cache %s in %.1fs",
            adopted,
            self.directory,
            time.monotonic() - started,
        )

    def _found(self) -> Iterator[Found]:
        for (oid, tid), path, st in self._walk():
            yield oid, tid, st.st_size, last_used(st), _recorded_token(path)

    def _found_old_release(self) -> bool:
        """Whether a process of an earlier version uses this directory: it
        recreates its ledger, ``locks/total``, which this removes. Its
        installs have no rows until a walk gives them theirs."""
        try:
            os.remove(self._ledger)
        except FileNotFoundError:
            return False
        if not self._warned_of_old_release:
            self._warned_of_old_release = True
            log.warning(
                "Blob cache %s is used by a process of an earlier zodb-s3blobs "
                "version (it keeps %s): its files are indexed by a walk at each "
                "eviction check; upgrade every process sharing the directory "
                "together",
                self.directory,
                self._ledger,
            )
        return True

    def _not_durable_batches(self, before: float) -> Iterator[list[Row]]:
        """The rows not yet known to be on disk, used before *before*, in
        batches."""
        rows = self._index.not_durable(before, limit=BATCH)
        while rows:
            yield rows
            rows = self._index.not_durable(before, rows[-1], limit=BATCH)

    # -- flushing --------------------------------------------------------

    def _flush_installed(self, before: float) -> None:
        """Flush to disk (``fsync``) the files installed before *before* that
        are not yet known to be, by any process, and mark them durable: a few
        seconds after their install, in this background thread, off the
        paths of reads and commits."""
        for rows in self._not_durable_batches(before):
            flushed = [
                done
                for oid, tid, _size, _used in rows
                if not self._closing.is_set() and (done := self._flush(oid, tid))
            ]
            self._index.mark_durable(flushed)

    def _flush(self, oid: bytes, tid: bytes) -> Flushed | None:
        """fsync the cached file of (oid, tid); return it with the token it
        carries (its row is marked durable only if it holds that token), or
        None if it is not there (its row is then dropped, unless an install
        holds its stripe lock) or not a regular file of this user (a hit
        removes it)."""
        path = self.path(oid, tid)
        try:
            fd = os.open(path, _READ_FLAGS)
        except FileNotFoundError:
            with _flock(self._lock_path(oid, tid), blocking=False) as acquired:
                if acquired and not os.path.lexists(path):
                    self._forget(oid, tid)  # a row a crash left
            return None
        except OSError:  # e.g. a symlink (ELOOP)
            return None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid():
                return None
            os.fsync(fd)
            return oid, tid, _recorded_token(fd)
        finally:
            os.close(fd)

    # -- the background thread -------------------------------------------

    def _added(self, total: int | None) -> None:
        """After an install: flush it in a few seconds, and start an eviction
        check if the directory's total (*total*) is over the limit, or
        unknown (the install's row could not be written)."""
        self._request(flush_at=time.time() + FLUSH_DELAY)
        if total is None or total > self.size_limit:
            self._start_check()

    def _start_check(self) -> None:
        """Have the background thread check the cache once more. A check
        requested while one runs is not lost: the thread loops until none is
        pending."""
        self._request(check=True)

    def _request(self, check: bool = False, flush_at: float | None = None) -> None:
        """Ask the background thread for an eviction check and/or a flush at
        *flush_at*, starting it if it is not running."""
        with self._state_lock:
            self._check_pending = self._check_pending or check
            if flush_at is not None and self._flush_at is None:
                self._flush_at = flush_at
            self._wakeup.notify()
            if self._background is not None:
                return
            self._background = threading.Thread(
                target=self._background_work, name="zodb-s3blobs-cache", daemon=True
            )
            self._background.start()

    def _next_work(self) -> tuple[bool, bool] | None:
        """Wait for the next work due: (check, flush), or None to exit (when
        nothing is pending, or close() asks it to stop waiting). A check that
        stopped at files used within min_age is repeated once the oldest may
        go; close() flushes at once rather than waiting."""
        with self._state_lock:
            while not self._closing.is_set():
                now = time.time()
                check = self._check_pending or (
                    self._recheck_at is not None and self._recheck_at <= now
                )
                flush = self._flush_at is not None and (
                    self._flush_at <= now or self._stop_waiting
                )
                if check or flush:
                    self._check_pending = False
                    if check:
                        self._recheck_at = None
                    if flush:
                        self._flush_at = None
                    return check, flush
                deadlines = [t for t in (self._recheck_at, self._flush_at) if t]
                if not deadlines or self._stop_waiting:
                    break
                self._wakeup.wait(min(deadlines) - now)
            self._recheck_at = None
            self._background = None
            return None

    def _background_work(self) -> None:
        while (work := self._next_work()) is not None:
            check, flush = work
            try:
                if flush:
                    self._flush_installed(time.time())
                if check:
                    # Waits for another thread or process that is evicting:
                    # the total may still be over the limit when it is done.
                    with _flock(self._evict_lock, stop=self._closing) as acquired:
                        if acquired:
                            self._evict_locked(None)
            except Exception:
                log.exception("Blob cache work in %s failed", self.directory)
                with self._state_lock:  # e.g. the index busy: try again later
                    if self._adopt_pending and self._recheck_at is None:
                        self._recheck_at = time.time() + FLUSH_DELAY

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

    def _walk(
        self, trusted_only: bool = True
    ) -> Iterator[tuple[tuple[bytes, bytes], str, os.stat_result]]:
        """Every cached file of this user (regular files only), skipping (with
        a warning) directories another user could write, unless not
        *trusted_only*: the restart check removes what a hit, which looks at
        the file alone, would serve from them."""
        trusted = _trusted_entry if trusted_only else _any_entry
        for revision, path, st in walk(self.directory, trusted):
            if st.st_uid == os.geteuid():
                yield revision, path, st

    # -- eviction --------------------------------------------------------

    def evict(self, target: int | None = None, wait: bool = True) -> int:
        """Delete least-recently-used files until the directory holds at most
        *target* bytes (default: 90% of the limit, if the limit is exceeded),
        counting every process's files. Returns the bytes freed. With *wait*
        false, returns 0 at once when another thread or process is evicting.

        Costs what it deletes, plus a look at each file used since its row
        was last updated: the oldest rows of the index come first, in
        batches, and no walk is made (but to build a new index).
        """
        with _flock(self._evict_lock, blocking=wait) as acquired:
            if not acquired:
                return 0
            return self._evict_locked(target)

    def _evict_locked(self, target: int | None) -> int:
        """:meth:`evict`, for a caller holding ``evict.lock``."""
        self._index_files()
        files, total = self._index.totals()
        if target is None:
            if total <= self.size_limit:
                return 0
            target = int(self.size_limit * EVICTION_TARGET)
        freed = 0
        # A round of as many files kept as used since, with none removed,
        # ends the benefit of that doubt (files hit all the time in other
        # processes do not keep a check going for ever).
        passes = files
        young = False
        while total > target and not young and not self._closing.is_set():
            rows = self._index.oldest(BATCH)
            if not rows:
                break
            gone: list[Seen] = []
            kept: list[tuple[Seen, int, float]] = []
            for oid, tid, size, used in rows:
                if total <= target or self._closing.is_set():
                    break
                if used > time.time() - self.min_age:
                    # Every file left was used within min_age: keep them all,
                    # and check again once the oldest may go.
                    with self._state_lock:
                        self._recheck_at = used + self.min_age
                    young = True
                    break
                removed, seen = self._evict_one(oid, tid, used if passes > 0 else None)
                passes -= 1
                if seen is not None:  # used since: its row moves on
                    kept.append(((oid, tid, used), *seen))
                    continue
                gone.append((oid, tid, used))
                passes = files
                total -= size
                if removed is not None:
                    freed += removed
                    self.metrics.add(cache_evictions=1, cache_evicted_bytes=removed)
                    self._remove_empty_dirs(os.path.dirname(self.path(oid, tid)))
            # After the files: the index always covers them.
            self._index.settle(gone, kept)
            files, total = self._index.totals()
        log.debug("Evicted %d bytes from %s", freed, self.directory)
        return freed

    def _evict_one(
        self, oid: bytes, tid: bytes, used: float | None
    ) -> tuple[int | None, tuple[int, float] | None]:
        """Remove (oid, tid) under its stripe lock unless its last use
        (:func:`last_used`) says it was used after *used* (its row's; None:
        whenever), or within ``min_age`` seconds. Returns (bytes removed, or
        None if there was no file; (size, last use) if kept, else None). The
        caller deletes or updates its row."""
        path = self.path(oid, tid)
        with (
            _flock(self._lock_path(oid, tid)),
            _flock(self._lock_path(oid, tid, "use")),
        ):
            try:
                st = os.lstat(path)
            except FileNotFoundError:
                return None, None
            used_at = last_used(st)
            # The row's use time is the file's own last use when it was
            # written: a later one is a hit (in any process) since.
            if (used is not None and used_at > used) or used_at > time.time() - (
                self.min_age
            ):
                return None, (st.st_size, used_at)
            try:
                os.remove(path)
            except FileNotFoundError:
                return None, None
        return st.st_size, None

    def close(self) -> None:
        """Let the background thread finish what is due (a running eviction
        check for up to 10 seconds, then ask it to stop; the flush of the
        files installed) without waiting for later work, so that no thread
        outlives the storage; close the index's connection (a later use
        opens another)."""
        with self._state_lock:
            background = self._background
            self._stop_waiting = True
            self._wakeup.notify()
        if background is not None:
            background.join(timeout=10)
            if background.is_alive():
                self._closing.set()
                background.join(timeout=1)
        with self._state_lock:
            self._stop_waiting = False
        self._index.close()


#: The caches of this process, for a forked child to give each one a
#: background state of its own.
_open_caches: weakref.WeakSet[BlobCache] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for cache in list(_open_caches):
        cache._new_background_state()


os.register_at_fork(after_in_child=_after_fork_in_child)


def _batches(items: Iterable[T]) -> Iterator[list[T]]:
    """*items* in lists of at most BATCH."""
    batch: list[T] = []
    for item in items:
        batch.append(item)
        if len(batch) >= BATCH:
            yield batch
            batch = []
    if batch:
        yield batch


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
