"""Who writes under a prefix: a guard against two databases sharing one.

Two databases committing under one ``s3-prefix`` (a staging copy of a site
pointed at the live bucket, a restored backup started beside the original)
is the one way the collector deletes live data: each one's orphans are the
other one's blobs. So every storage that may commit records, under
``[prefix/]writers/{id}.json``, the identity of its database and when it
wrote: *id* is a hash of the base storage's type and name (``getName()``:
for a FileStorage its path, with the host name, as a copy of ``Data.fs``
elsewhere or on another host is another database), never the name itself
(a RelStorage name may hold a DSN). The record says since when this
database writes there and its last commit; it is written when the storage
opens (a LIST, a GET per record and a PUT; a read-only base writes none)
and then after a commit at most every :data:`RECORD_INTERVAL` seconds, in
the background, by one PUT.

Two databases are *concurrent* when the other's record was updated after
this one started writing (its ``since``) and within the collector's
window: the collector then refuses to delete anything, naming both.
Opening logs a warning when another database's record was updated within
a day. A database that replaced
another (a restored backup, a FileStorage moved to another path or host,
a container with a new host name) started after the other stopped writing,
and is not refused.
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
from dataclasses import asdict, dataclass

from ZODB.FileStorage import FileStorage
from ZODB.utils import tid_repr

from .errors import ObjectNotFound, ObjectStoreError, S3BlobStorageError
from .objectstore import ObjectStore

log = logging.getLogger(__name__)

#: The folder of the writers' records, under the storage's prefix.
WRITERS_FOLDER = "writers"
#: Seconds between two writes of a process's record while it commits.
RECORD_INTERVAL = 3600.0
#: At a process's first commit, another database's record updated within
#: this many seconds (a day) is warned of: it may still write.
RECENT = 24 * 3600.0
#: An object's address in a repr: `` at 0x7f00deadbeef``.
_ADDRESS = re.compile(r" at (?:0x)?[0-9a-fA-F]{6,}\b")
#: A record is read only up to this many bytes (it holds a few fields).
_RECORD_LIMIT = 64 * 1024


def writers_root(prefix: str) -> str:
    """The folder of the writers' records under *prefix*."""
    top = f"{prefix}/" if prefix else ""
    return f"{top}{WRITERS_FOLDER}/"


def identity(base) -> tuple[str, str]:
    """The id (a hash) and a printable label of *base*'s database. Object
    addresses in the name (RelStorage's default name holds its adapter's,
    ``<PostgreSQLAdapter at 7f...``) differ from process to process and are
    left out."""
    kind = f"{type(base).__module__}.{type(base).__qualname__}"
    name = _ADDRESS.sub("", str(base.getName()))
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
    """What one database's record says."""

    id: str
    label: str
    #: Seconds since the epoch: the first write of this record, and the last.
    since: float
    updated: float
    last_commit: str
    host: str
    pid: int

    def describe(self) -> str:
        """The record in words, for errors and warnings."""
        return (
            f"{self.label} (last commit {self.last_commit}, recorded "
            f"{time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime(self.updated))}"
            f" by pid {self.pid})"
        )


class SecondWriter(S3BlobStorageError):
    """Another database writes under this storage's prefix."""


def read_records(store: ObjectStore, prefix: str) -> list[Record]:
    """Every writer's record under *prefix* (unreadable ones are skipped,
    with a warning)."""
    records = []
    for key, size in store.list(writers_root(prefix)):
        body = io.BytesIO()
        try:
            if size > _RECORD_LIMIT:
                raise ValueError(f"{size} bytes, more than a record holds")
            store.download(key, body)
            records.append(Record(**json.loads(body.getvalue())))
        except ObjectNotFound:
            continue  # deleted since the listing
        except (ValueError, TypeError) as exc:
            log.warning("Skipping the unreadable writer record %s: %s", key, exc)
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
    since = max([time.time() - window, *(r.since for r in own)])
    others = concurrent(records, mine, since)
    if others:
        this = own[0].describe() if own else label
        raise SecondWriter(
            f"Two databases write under {store.url(writers_root(prefix))}: this "
            f"one, {this}, and {others[0].describe()}"
            + (f" and {len(others) - 1} more" if len(others) > 1 else "")
            + ". Each one's collector would delete the other's blobs, so nothing "
            "is deleted: give each database its own s3-prefix. If the other no "
            f"longer writes here, delete {store.url(writers_root(prefix))}"
            f"{others[0].id}.json."
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
        self._since: float | None = None
        self._written = time.time()
        self._write(tid_repr(base.lastTransaction()), self._written)

    def committed(self, tid: bytes) -> None:
        """Note a commit; write the record if it is due. Never raises."""
        now = time.time()
        with self._lock:
            if now - self._written < RECORD_INTERVAL:
                return
            self._written = now
        with contextlib.suppress(RuntimeError):  # the store is closing
            self._store.submit(self._write, tid_repr(tid), now)

    def _write(self, last_commit: str, now: float) -> None:
        try:
            first = self._since is None
            if first:
                records = read_records(self._store, self._prefix)
                own = [r.since for r in records if r.id == self._id]
                self._since = min(own, default=now)
                others = concurrent(records, self._id, now - RECENT)
                if others:
                    log.warning(
                        "Another database wrote under %s within a day: %s. If "
                        "it still writes, each one's collector would delete the "
                        "other's blobs, and pack and gc refuse to delete: give "
                        "each database its own s3-prefix.",
                        self._store.url(writers_root(self._prefix)),
                        others[0].describe(),
                    )
            record = Record(
                self._id,
                self._label,
                self._since,
                now,
                last_commit,
                socket.gethostname(),
                os.getpid(),
            )
            body = io.BytesIO(json.dumps(asdict(record)).encode())
            key = f"{writers_root(self._prefix)}{self._id}.json"
            self._store.put_object(key, body)
        except ObjectStoreError as exc:
            with self._lock:
                self._written = 0.0  # tried again at the next commit
            log.warning("Could not record this database as a writer: %s", exc)
