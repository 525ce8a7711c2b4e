"""Who writes under a prefix: a guard against two databases sharing one.

Two databases committing under one ``s3-prefix`` (a staging copy of a site
pointed at the live bucket, a restored backup started beside the original)
is the one way the collector deletes live data: each one's orphans are the
other one's blobs. So every storage that may commit records its database
under ``[prefix/]writers/{id}-{since}.json``: *id* is a hash of the base
storage's type and name (``getName()``: for a FileStorage its path, with
the host name, as a copy of ``Data.fs`` elsewhere or on another host is
another database), never the name itself (a RelStorage name may hold a
DSN); *since* says since when this database writes there, and the object's
LastModified when it last did; the body names the database, its last
commit, host and pid, for messages. Everything the guard compares is in the
listing. The record is written when the storage opens (a LIST and a PUT; a
read-only base writes none) and then after a commit at most every
:data:`RECORD_INTERVAL` seconds, in the background, by one PUT; a
collection costs one LIST more, and a GET only when it reports another
database.

Two databases are *concurrent* when the other's record was updated after
this one started writing (its *since*) and within the collector's window:
the collector then refuses to delete anything, naming both (at the
resolution of LastModified, whole seconds: a write in the second after this
database started counts from the next). Opening logs a warning when another
database's record was updated within a day. A
database that replaced another (a restored backup, a FileStorage moved to
another path or host, a container with a new host name) started after the
other stopped writing, and is not refused.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import re
import socket
import threading
import time
from dataclasses import dataclass

from ZODB.FileStorage import FileStorage
from ZODB.utils import tid_repr

from .errors import ObjectStoreError, S3BlobStorageError
from .objectstore import ObjectStore

log = logging.getLogger(__name__)

#: The folder of the writers' records, under the storage's prefix.
WRITERS_FOLDER = "writers"
#: Seconds between two writes of a process's record while it commits.
RECORD_INTERVAL = 3600.0
#: When the storage opens, another database's record updated within this
#: many seconds (a day) is warned of: it may still write.
RECENT = 24 * 3600.0
#: An object's address in a repr: `` at 0x7f00deadbeef``.
_ADDRESS = re.compile(r" at (?:0x)?[0-9a-fA-F]{6,}\b")
#: ZEO's ClientStorage names itself with its connection's state, which
#: changes while it runs: ``('zeo', 8100) (disconnected)``.
_CONNECTION_STATE = re.compile(r" \((?:dis)?connected\)$")
#: A record's name: the database's id and since when it writes there.
_RECORD = re.compile(r"([0-9a-f]{16})-([0-9]{1,12})\.json")


def writers_root(prefix: str) -> str:
    """The folder of the writers' records under *prefix*."""
    top = f"{prefix}/" if prefix else ""
    return f"{top}{WRITERS_FOLDER}/"


def identity(base) -> tuple[str, str]:
    """The id (a hash) and a printable label of *base*'s database. Object
    addresses in the name (RelStorage's default name holds its adapter's,
    ``<PostgreSQLAdapter at 7f...``) differ from process to process and are
    left out, and so is a ZEO client's connection state."""
    kind = f"{type(base).__module__}.{type(base).__qualname__}"
    name = _CONNECTION_STATE.sub("", _ADDRESS.sub("", str(base.getName())))
    host = socket.gethostname()
    if isinstance(base, FileStorage):
        key, label = f"{kind}\0{name}\0{host}", f"FileStorage {name} on {host}"
    else:
        key = f"{kind}\0{name}"
        label = f"{type(base).__name__} (name hash {_hash(key)[:8]}) on {host}"
    return _hash(key), label


def _hash(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Record:
    """One database's record as the listing shows it: its key, its id, since
    when it writes (in the key's name) and its last update (LastModified,
    by the S3 server's clock)."""

    key: str
    id: str
    since: float
    updated: float

    def describe(self, store: ObjectStore) -> str:
        """The record in words, for errors and warnings: what its body says
        (one GET, only when something is reported)."""
        body = io.BytesIO()
        try:
            store.download(self.key, body)
            details = json.loads(body.getvalue())
            what = (
                f"{details['label']} (last commit {details['last_commit']}, "
                f"pid {details['pid']})"
            )
        except (ObjectStoreError, ValueError, TypeError, KeyError):
            what = f"database {self.id}"
        return f"{what}, {self.brief(store)}"

    def brief(self, store: ObjectStore) -> str:
        """Where and when the record was written, from the listing alone."""
        when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(self.updated))
        return f"recorded {when} at {store.url(self.key)}"


class SecondWriter(S3BlobStorageError):
    """Another database writes under this storage's prefix."""


def read_records(store: ObjectStore, prefix: str) -> list[Record]:
    """Every writer's record under *prefix*, from one listing (keys of
    another form are left out)."""
    records = []
    for item in store.list_objects(writers_root(prefix)):
        found = _RECORD.fullmatch(item.key.rpartition("/")[2])
        if found:
            ident, since = found.groups()
            records.append(Record(item.key, ident, float(since), item.last_modified))
    return records


def concurrent(records: list[Record], mine: str, since: float) -> list[Record]:
    """The records of other databases than *mine* updated after *since*."""
    return [r for r in records if r.id != mine and r.updated > since]


def check(store: ObjectStore, prefix: str, base, window: float) -> None:
    """Raise :class:`SecondWriter` if another database wrote under *prefix*
    since this one started writing there, within the last *window* seconds
    (without a record of this database: within the window)."""
    mine, label = identity(base)
    records = read_records(store, prefix)
    own = [r for r in records if r.id == mine]
    since = max([time.time() - window, min((r.since for r in own), default=0)])
    others = concurrent(records, mine, since)
    if others:
        this = own[0].describe(store) if own else label
        raise SecondWriter(
            f"Two databases write under {store.url(writers_root(prefix))}: this "
            f"one, {this}, and {others[0].describe(store)}"
            + (f" and {len(others) - 1} more" if len(others) > 1 else "")
            + ". Each one's collector would delete the other's blobs, so nothing "
            "is deleted: give each database its own s3-prefix. If the other no "
            "longer writes here, delete its record"
        )


class WriterRecord:
    """This process's side of the record of its database: written when the
    storage opens (which warns of another database writing there) and then
    after a commit at most every :data:`RECORD_INTERVAL` seconds, in the
    background (so that no commit waits for it)."""

    def __init__(self, store: ObjectStore, prefix: str, base) -> None:
        self._store = store
        self._prefix = prefix
        self._id, self._label = identity(base)
        self._lock = threading.Lock()
        self._written = now = time.time()
        try:
            records = read_records(store, prefix)
        except ObjectStoreError as exc:
            records = []
            log.warning("Could not read the writers' records: %s", exc)
        own = [r.since for r in records if r.id == self._id]
        # The next whole second: LastModified has whole seconds on some
        # servers, and a record written in the second this one opened (by a
        # database this one replaces) must not look written after it.
        since = int(min(own, default=now + 1))
        self._key = f"{writers_root(prefix)}{self._id}-{since}.json"
        others = concurrent(records, self._id, now - RECENT)
        if others:
            log.warning(
                "Another database wrote under %s within a day (%s). If it still "
                "writes, each one's collector would delete the other's blobs, "
                "and pack and gc refuse to delete: give each database its own "
                "s3-prefix.",
                store.url(writers_root(prefix)),
                others[0].brief(store),
            )
        self._write(tid_repr(base.lastTransaction()))

    def committed(self, tid: bytes) -> None:
        """Note a commit; write the record if it is due. Never raises."""
        now = time.time()
        with self._lock:
            if now - self._written < RECORD_INTERVAL:
                return
            self._written = now
        with contextlib.suppress(RuntimeError):  # the store is closing
            self._store.submit(self._write, tid_repr(tid))

    def _write(self, last_commit: str) -> None:
        details = {
            "label": self._label,
            "last_commit": last_commit,
            "host": socket.gethostname(),
            "pid": os.getpid(),
        }
        try:
            self._store.put_object(self._key, io.BytesIO(json.dumps(details).encode()))
        except ObjectStoreError as exc:
            with self._lock:
                self._written = 0.0  # tried again at the next commit
            log.warning("Could not record this database as a writer: %s", exc)
