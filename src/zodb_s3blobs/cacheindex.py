"""The blob cache's index: one SQLite database, ``locks/index.sqlite``, shared
by every process using a cache directory.

It holds a row per cached file -- (oid, tid), its size, when it was last
known to be used, and whether it is known to be on disk (``durable``) -- and
the exact count and total size of those rows, kept by triggers in the same
transactions: the total bounds the directory (``cache-size``) without a walk,
and eviction takes the oldest rows first. Memory stays bounded whatever the
number of files: the rows live on disk, SQLite keeps a small page cache, and
callers read them in batches.

The index is a hint that is never trusted over the files. The cache keeps it
a superset of them: a row is written before its file is renamed into place,
and a file is removed before its row is deleted, so a crash can leave a row
without a file (harmless: eviction meets it and drops it), never a file
without a row. Hits do not read it.

Each row also holds the random token of the install that wrote it, which
the file carries too (an extended attribute): a row marked durable vouches
for the file it was marked for, not for a later file of the same revision
whose row a power loss rolled back to the earlier one's.

Each :class:`CacheIndex` has one connection per process, reopened after a
fork and when the file was replaced (an operator removed it, another process
set it aside as damaged: *on_replaced* is then called, for the cache to
index its files again), used under a lock of its own by one thread at a
time, never held across a wait for another process's transaction (a busy
database is retried outside the lock, up to :data:`BUSY_TIMEOUT`). Writes
are short ``BEGIN IMMEDIATE`` transactions that never span I/O on blob
files; WAL journal mode with ``synchronous=NORMAL`` commits without
flushing: a process crash loses nothing (the page cache holds the WAL), a
power loss may roll back the last transactions, which the cache's restart
check (see :mod:`.bootrecord`) is there to catch. A database SQLite reports
damaged, or of an older schema, is renamed aside
(``index.sqlite.damaged-<time>-<pid>-<random>``, the newest few kept), with
a warning naming it, and an empty one takes its place, for the cache to
rebuild from its files. One of a newer schema is refused
(:class:`NewerIndexError`): a newer release shares the directory.
"""

from __future__ import annotations

import contextlib
import glob
import logging
import os
import secrets
import sqlite3
import stat
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import TypeVar

from .errors import S3BlobStorageError

log = logging.getLogger(__name__)

#: Seconds a call waits for other processes' transactions before it fails
#: (sqlite3.OperationalError): every transaction is short, so a longer wait
#: means a process stopped or stalled in one.
BUSY_TIMEOUT = 2.0
#: Seconds SQLite itself waits for the write lock, per attempt; attempts are
#: repeated, outside this process's lock, until BUSY_TIMEOUT.
_BUSY_SLICE = 0.05
#: The page cache of a connection, in KiB (SQLite's negative cache_size).
PAGE_CACHE_KIB = 1024
SCHEMA_VERSION = 2
#: Copies of damaged indexes kept (the newest), for a post-mortem.
KEEP_DAMAGED = 3
#: Where the boot id of the running kernel is read (Linux).
BOOT_ID_FILE = "/proc/sys/kernel/random/boot_id"
#: SQLite's result codes for a file that is not a sound database.
_DAMAGED = {11, 26}  # SQLITE_CORRUPT, SQLITE_NOTADB
#: SQLite's result codes for a database another connection holds.
_BUSY = {5, 6}  # SQLITE_BUSY, SQLITE_LOCKED

#: The statements that create the schema, in one transaction.
SCHEMA = (
    """CREATE TABLE files (
        oid BLOB NOT NULL,
        tid BLOB NOT NULL,
        size INTEGER NOT NULL,
        used REAL NOT NULL,
        durable INTEGER NOT NULL DEFAULT 0,
        token INTEGER,
        PRIMARY KEY (oid, tid)
    ) WITHOUT ROWID""",
    "CREATE INDEX files_by_use ON files (used)",
    "CREATE INDEX files_not_durable ON files (used) WHERE durable = 0",
    """CREATE TABLE totals (
        one INTEGER PRIMARY KEY CHECK (one = 1),
        files INTEGER NOT NULL,
        bytes INTEGER NOT NULL
    )""",
    "INSERT INTO totals VALUES (1, 0, 0)",
    "CREATE TABLE facts (name TEXT PRIMARY KEY, value TEXT NOT NULL)",
    """CREATE TRIGGER file_added AFTER INSERT ON files BEGIN
        UPDATE totals SET files = files + 1, bytes = bytes + NEW.size;
    END""",
    """CREATE TRIGGER file_removed AFTER DELETE ON files BEGIN
        UPDATE totals SET files = files - 1, bytes = bytes - OLD.size;
    END""",
    """CREATE TRIGGER file_resized AFTER UPDATE OF size ON files BEGIN
        UPDATE totals SET bytes = bytes - OLD.size + NEW.size;
    END""",
)

#: A row: (oid, tid, size, used).
Row = tuple[bytes, bytes, int, float]
#: A file found on disk: (oid, tid, size, used, token of its install or None).
Found = tuple[bytes, bytes, int, float, "int | None"]
#: A row as read, to change only if nobody changed it since: (oid, tid, used).
Seen = tuple[bytes, bytes, float]
#: A file flushed to disk: (oid, tid, the token it carries or None).
Flushed = tuple[bytes, bytes, "int | None"]
T = TypeVar("T")


class NewerIndexError(S3BlobStorageError):
    """The index was written by a newer release of zodb-s3blobs."""


def boot_id() -> str:
    """The id of the running boot of this machine: it changes when the
    machine restarts (when a power loss may have lost files not yet flushed).
    Empty where the kernel does not tell, or it cannot be read now: no
    evidence of a restart (where it never can be, none is ever noticed)."""
    try:
        with open(BOOT_ID_FILE) as f:
            return f.read().strip()
    except OSError:
        return ""


def _is_damage(exc: sqlite3.DatabaseError) -> bool:
    return getattr(exc, "sqlite_errorcode", None) in _DAMAGED or (
        type(exc) is sqlite3.DatabaseError
    )


def _is_busy(exc: sqlite3.Error) -> bool:
    code = getattr(exc, "sqlite_errorcode", None)
    if code is not None:
        return code in _BUSY
    return "locked" in str(exc) or "busy" in str(exc)  # Python < 3.11


class CacheIndex:
    """The rows of a cache directory's files, in the SQLite database *path*."""

    def __init__(
        self, path: str, on_replaced: Callable[[], None] | None = None
    ) -> None:
        self.path = path
        #: Called (under this index's lock) when the file at *path* turns out
        #: to be another than the one this process used: its rows may not
        #: cover the files.
        self.on_replaced = on_replaced
        #: Whether this process created the schema, when it first connected:
        #: the database was missing, empty, damaged or of an older schema.
        self.created = False
        self._lock = threading.Lock()
        self._pid = os.getpid()
        self._connection: sqlite3.Connection | None = None
        self._inode: int | None = None
        self._run(lambda connection: None)

    # -- connection --------------------------------------------------------

    def _check_file(self) -> None:
        """Refuse a symlink or anything but this user's regular file at the
        index's path (SQLite would follow a link)."""
        try:
            st = os.lstat(self.path)
        except FileNotFoundError:
            with contextlib.suppress(FileExistsError):
                flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                os.close(os.open(self.path, flags | os.O_CLOEXEC, 0o600))
            st = os.lstat(self.path)
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid():
            raise S3BlobStorageError(
                f"cache-dir: {self.path} is not a regular file of this user "
                "(a symlink?); remove it, the cache index is rebuilt"
            )

    def _connect(self) -> sqlite3.Connection:
        self._check_file()
        connection = sqlite3.connect(
            self.path,
            timeout=_BUSY_SLICE,
            isolation_level=None,
            check_same_thread=False,
        )
        try:
            connection.execute(f"PRAGMA cache_size=-{PAGE_CACHE_KIB}")
            connection.execute("PRAGMA journal_mode=WAL")
            connection.execute("PRAGMA synchronous=NORMAL")
            if self._version(connection) != SCHEMA_VERSION:
                with _transaction(connection):
                    self._create_schema(connection)
            inode = os.stat(self.path).st_ino
        except BaseException:
            connection.close()
            raise
        if self._inode is not None and inode != self._inode and self.on_replaced:
            self.on_replaced()
        self._inode = inode
        return connection

    def _create_schema(self, connection: sqlite3.Connection) -> None:
        """Create the schema in a new database; refuse one of a newer schema
        and report an older one as damage (set aside and rebuilt)."""
        version = self._version(connection)
        if version > SCHEMA_VERSION:
            raise NewerIndexError(
                f"cache-dir {os.path.dirname(os.path.dirname(self.path))}: its "
                f"index {self.path} has schema version {version}, written by a "
                f"newer zodb-s3blobs (this one knows version {SCHEMA_VERSION}); "
                "every process sharing a cache directory must run the same "
                "zodb-s3blobs version: upgrade this one too, or give it "
                "another cache-dir"
            )
        if version == SCHEMA_VERSION:  # another process created it meanwhile
            return
        if version != 0:
            raise sqlite3.DatabaseError(
                f"schema version {version} of an earlier version, not {SCHEMA_VERSION}"
            )
        for statement in SCHEMA:
            connection.execute(statement)
        connection.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        if self._inode is None:
            self.created = True

    @staticmethod
    def _version(connection: sqlite3.Connection) -> int:
        return connection.execute("PRAGMA user_version").fetchone()[0]

    def _current(self) -> sqlite3.Connection:
        """This process's connection to the file now at the path; the caller
        holds the lock."""
        try:
            replaced = os.stat(self.path).st_ino != self._inode
        except FileNotFoundError:
            replaced = True
        if self._connection is None or replaced:
            self._disconnect()
            self._connection = self._connect()
        return self._connection

    def _disconnect(self) -> None:
        if self._connection is not None:
            connection, self._connection = self._connection, None
            connection.close()

    def _set_aside(self, exc: sqlite3.DatabaseError) -> None:
        """Rename a damaged database aside (with its journal files removed,
        which belong to it) so that an empty one replaces it; keep only the
        newest KEEP_DAMAGED such copies."""
        self._disconnect()
        aside = (
            f"{self.path}.damaged-{time.time():.0f}-{os.getpid()}-"
            f"{secrets.token_hex(4)}"
        )
        log.warning(
            "Blob cache index %s is damaged (%s): moved to %s; the index is "
            "rebuilt from the cached files",
            self.path,
            exc,
            aside,
        )
        with contextlib.suppress(FileNotFoundError):
            os.replace(self.path, aside)
        for suffix in ("-wal", "-shm"):
            with contextlib.suppress(FileNotFoundError):
                os.remove(self.path + suffix)
        self._remove_old_copies()

    def _remove_old_copies(self) -> None:
        def age(path: str) -> float:
            try:
                return os.lstat(path).st_mtime
            except FileNotFoundError:
                return float("inf")

        copies = sorted(glob.glob(glob.escape(self.path) + ".damaged-*"), key=age)
        for old in copies[:-KEEP_DAMAGED]:
            with contextlib.suppress(FileNotFoundError):
                os.remove(old)

    def _run(
        self, work: Callable[[sqlite3.Connection], T], wait: float | None = None
    ) -> T:
        """Call *work* with the connection, under the lock; a damaged database
        is set aside and *work* done again on a new one. While another
        process holds the database, *work* is tried again, without holding
        the lock in between, for *wait* seconds (default BUSY_TIMEOUT); then
        sqlite3.OperationalError is raised. *work* must be one transaction,
        or only read."""
        if self._pid != os.getpid():  # forked: the parent's are not ours
            self._lock = threading.Lock()
            self._connection = None
            self._pid = os.getpid()
        give_up = time.monotonic() + (BUSY_TIMEOUT if wait is None else wait)
        while True:
            try:
                with self._lock:
                    return self._attempt(work)
            except sqlite3.OperationalError as exc:
                if not _is_busy(exc) or time.monotonic() >= give_up:
                    raise
            time.sleep(_BUSY_SLICE)

    def _attempt(self, work: Callable[[sqlite3.Connection], T]) -> T:
        try:
            return work(self._current())
        except sqlite3.DatabaseError as exc:
            if not _is_damage(exc):
                raise
            self._set_aside(exc)
        return work(self._current())

    def close(self) -> None:
        """Close this process's connection (a later call opens another)."""
        if self._pid == os.getpid():
            with self._lock:
                self._disconnect()

    # -- facts -------------------------------------------------------------

    def fact(self, name: str) -> str | None:
        """A recorded fact: ``complete`` (set once every file has a row),
        ``adopt_durable`` (the files to index are an earlier version's,
        flushed at install)."""
        row = self._run(
            lambda c: c.execute(
                "SELECT value FROM facts WHERE name = ?", (name,)
            ).fetchone()
        )
        return None if row is None else row[0]

    def set_fact(self, name: str, value: str) -> None:
        self._write([("INSERT OR REPLACE INTO facts VALUES (?, ?)", (name, value))])

    def drop_fact(self, name: str) -> None:
        self._write([("DELETE FROM facts WHERE name = ?", (name,))])

    # -- reading -----------------------------------------------------------

    def totals(self) -> tuple[int, int]:
        """(files, bytes) of all the rows."""
        return self._run(
            lambda c: c.execute("SELECT files, bytes FROM totals").fetchone()
        )

    def size_of(self, oid: bytes, tid: bytes) -> int | None:
        """The recorded size of (oid, tid), or None if it has no row."""
        row = self._run(
            lambda c: c.execute(
                "SELECT size FROM files WHERE oid = ? AND tid = ?", (oid, tid)
            ).fetchone()
        )
        return None if row is None else row[0]

    def vouchers(
        self, revisions: list[tuple[bytes, bytes]]
    ) -> dict[tuple[bytes, bytes], tuple[bool, int | None]]:
        """(durable, token) of those of *revisions* that have a row."""

        def read(connection: sqlite3.Connection) -> dict:
            query = "SELECT durable, token FROM files WHERE oid = ? AND tid = ?"
            found = {}
            for revision in revisions:
                row = connection.execute(query, revision).fetchone()
                if row is not None:
                    found[revision] = (bool(row[0]), row[1])
            return found

        return self._run(read)

    def oldest(self, limit: int) -> list[Row]:
        """The *limit* rows used longest ago, oldest first."""
        return self._run(
            lambda c: c.execute(
                "SELECT oid, tid, size, used FROM files ORDER BY used LIMIT ?",
                (limit,),
            ).fetchall()
        )

    def not_durable(
        self, before: float, after: Row | None = None, limit: int = 500
    ) -> list[Row]:
        """Up to *limit* rows not known to be on disk, used before *before*,
        in order of use; those past *after* (the last of a previous batch)."""
        start = (float("-inf"), b"", b"") if after is None else (after[3], *after[:2])
        return self._run(
            lambda c: c.execute(
                "SELECT oid, tid, size, used FROM files WHERE durable = 0 "
                "AND used < ? AND (used, oid, tid) > (?, ?, ?) "
                "ORDER BY used, oid, tid LIMIT ?",
                (before, *start, limit),
            ).fetchall()
        )

    # -- writing -----------------------------------------------------------

    def _write(self, statements: Iterable[tuple[str, tuple]]) -> None:
        """Run *statements* (sql, parameters) in one transaction."""
        statements = list(statements)  # run again if the first try met damage

        def write(connection: sqlite3.Connection) -> None:
            with _transaction(connection):
                for sql, parameters in statements:
                    connection.execute(sql, parameters)

        self._run(write)

    def add(
        self,
        oid: bytes,
        tid: bytes,
        size: int,
        used: float,
        token: int | None = None,
        wait: float | None = None,
    ) -> int:
        """Record a file about to be installed, not yet on disk, and the
        *token* it carries; return the new total of bytes. Waits *wait*
        seconds at most for other processes (default BUSY_TIMEOUT)."""

        def write(connection: sqlite3.Connection) -> int:
            with _transaction(connection):
                connection.execute(
                    "INSERT INTO files VALUES (?, ?, ?, ?, 0, ?) ON CONFLICT DO "
                    "UPDATE SET size = excluded.size, used = excluded.used, "
                    "durable = 0, token = excluded.token",
                    (oid, tid, size, used, token),
                )
                return connection.execute("SELECT bytes FROM totals").fetchone()[0]

        return self._run(write, wait)

    def adopt(self, found: list[Found], durable: bool) -> None:
        """Record files found on disk, keeping the rows that exist: with
        *durable*, those without an install token as durable (an earlier
        version's, flushed at install; a file of this one, not yet
        flushed, carries a token)."""
        self._write(
            (
                "INSERT OR IGNORE INTO files VALUES (?, ?, ?, ?, ?, ?)",
                (*f[:4], durable and f[4] is None, f[4]),
            )
            for f in found
        )

    def forget(self, oid: bytes, tid: bytes) -> None:
        """Delete the row of a file removed (the caller holds its stripe
        lock, so no install of it runs)."""
        self._write([("DELETE FROM files WHERE oid = ? AND tid = ?", (oid, tid))])

    def settle(
        self, gone: list[Seen], kept: list[tuple[Seen, int, float]] = ()
    ) -> None:
        """After an eviction batch: delete the rows of files removed (or
        missing), update those of files kept with their size and last use;
        each only if no install rewrote it since it was read."""
        where = "WHERE oid = ? AND tid = ? AND used = ?"
        self._write(
            [
                *((f"DELETE FROM files {where}", seen) for seen in gone),
                *(
                    (
                        f"UPDATE files SET size = ?, used = ? {where}",
                        (size, used, *seen),
                    )
                    for seen, size, used in kept
                ),
            ]
        )

    def mark_durable(self, flushed: list[Flushed]) -> None:
        """Record files flushed to disk: the rows whose token is the one the
        file flushed carries (not a row a later install wrote)."""
        self._write(
            (
                "UPDATE files SET durable = 1 WHERE oid = ? AND tid = ? AND token IS ?",
                done,
            )
            for done in flushed
        )


@contextlib.contextmanager
def _transaction(connection: sqlite3.Connection) -> Iterator[None]:
    connection.execute("BEGIN IMMEDIATE")
    try:
        yield
    except BaseException:
        with contextlib.suppress(sqlite3.Error):
            connection.execute("ROLLBACK")
        raise
    connection.execute("COMMIT")
