"""The torture test's legacy site (tests/torture.py): blobs committed into a
FileStorage with a ``blob-dir`` before the site switched to S3, then read
through the storage's ``fallback-blob-dir``.

A revision read from the fallback is uploaded in the background (a
read-through upload). :class:`HeldUploads` holds some of those uploads back
for a while, as a busy upload queue would, so that what the test does
meanwhile (damage the cached copy, pack the revision away) races them;
:func:`damage` rewrites a cached file the way a stray writer would.
"""

from __future__ import annotations

import os
import random
import stat
import threading
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import ZODB
from persistent.mapping import PersistentMapping
from ZODB.blob import Blob
from ZODB.FileStorage import FileStorage

from torturechild import blob_bytes

#: Blobs per namespace in the legacy site, and how many of them are
#: rewritten once more before the switch (so non-current revisions exist).
BLOBS = 4
UPDATED = 2


def build_site(
    data_fs: Path,
    blob_dir: Path,
    namespaces: list[str],
    seed: int,
    draw_size: Callable[[random.Random], int],
) -> list[tuple[bytes, bytes, bytes, str]]:
    """Commit :data:`BLOBS` blobs into ``root[namespace]`` of a FileStorage at
    *data_fs* keeping its blobs in *blob_dir*, rewrite :data:`UPDATED` of each
    namespace in a second transaction, and close it. Returns every revision
    committed: (oid, tid, bytes, namespace)."""
    rng = random.Random(f"legacy:{seed}")
    db = ZODB.DB(FileStorage(str(data_fs), blob_dir=str(blob_dir)))
    try:
        written = {}
        with db.transaction() as conn:
            for name in namespaces:
                conn.root()[name] = mapping = PersistentMapping()
                for n in range(BLOBS):
                    data = blob_bytes(f"{seed}:{name}:{n}", draw_size(rng))
                    mapping[f"b{n}"] = Blob(data)
                    written[name, f"b{n}"] = data
        revisions = _committed(db, written)
        written = {}
        with db.transaction() as conn:
            for name in namespaces:
                for n in range(UPDATED):
                    data = blob_bytes(f"{seed}:{name}:{n}:updated", draw_size(rng))
                    with conn.root()[name][f"b{n}"].open("w") as f:
                        f.write(data)
                    written[name, f"b{n}"] = data
        revisions += _committed(db, written)
    finally:
        db.close()
    return revisions


def _committed(db, written: dict) -> list[tuple[bytes, bytes, bytes, str]]:
    """The revisions (oid, tid, bytes, namespace) that *written* (namespace,
    name) -> bytes now shows."""
    with db.transaction() as conn:
        revisions = []
        for (name, key), data in written.items():
            blob = conn.root()[name][key]
            blob._p_activate()
            revisions.append((blob._p_oid, blob._p_serial, data, name))
        return revisions


class HeldUploads:
    """Holds back a share (*rate*) of a storage's read-through uploads until
    :meth:`release`; the others are queued at once. Wraps the ObjectStore's
    ``upload_soon`` whatever its arguments, as tests/test_read_through.py
    does. Counts both kinds in *counts*."""

    def __init__(
        self, storage, rng: random.Random, rate: float, counts: Counter
    ) -> None:
        self.store = storage._store
        self._queue = self.store.upload_soon
        self._rng = rng
        self._rate = rate
        self._lock = threading.Lock()
        self._held: list[tuple] = []
        self._counts = counts
        self.store.upload_soon = self._upload_soon

    def _upload_soon(self, *args) -> bool:
        with self._lock:
            hold = self._rng.random() < self._rate
            what = "held back" if hold else "queued at once"
            self._counts[f"read-through uploads {what}"] += 1
            if hold:
                self._held.append(args)
                return True
        return self._queue(*args)

    def release(self) -> int:
        """Queue the uploads held back; how many there were."""
        with self._lock:
            held, self._held = self._held, []
        for args in held:
            self._queue(*args)
        return len(held)

    def settle(self) -> None:
        """Queue the uploads held back and wait until every queued upload
        has ended; the store queues no more read-through uploads after."""
        self.release()
        self.store._spare.shutdown(wait=True)


#: Bytes a stray writer leaves in a cached file.
DAMAGE = b"BAD!"


def damage(path: str, size: int) -> bool:
    """Rewrite the cached file at *path* (installed with *size* bytes) with
    bytes of another size, after making it writable, as a stray writer (a
    script, root) would. False if there was no such file (never cached, or
    evicted meanwhile)."""
    bad = DAMAGE if size != len(DAMAGE) else DAMAGE * 2
    try:
        os.chmod(path, stat.S_IRUSR | stat.S_IWUSR)
        with open(path, "r+b") as f:
            f.write(bad)
            f.truncate(len(bad))
    except FileNotFoundError:
        return False
    return True


def damaged(path: str) -> bool:
    """Is the cached file at *path* one :func:`damage` left (the cache's own
    files are never writable)?"""
    try:
        return bool(os.lstat(path).st_mode & stat.S_IWUSR)
    except FileNotFoundError:
        return False
