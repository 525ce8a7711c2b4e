"""The collector's record of pending orphans: when each was first found.

With a retention (``gc-retention``), an orphan's object is deleted only once
collections have found it orphaned for that long, so that a restored backup
of the base storage still finds its blobs. When each orphan was first found
is kept in the bucket itself, in one object, ``[prefix/]gc/pending.gz``: a
gzip text file whose first line names the format and whose other lines are
``key<TAB>first seen<TAB>LastModified<TAB>size``, in the order S3 lists
keys. Its writer and its reader both stream: a collection reads the previous
record alongside its listing (a merge of two sorted streams) and writes the
new one to a private temporary file, so neither holds more than one line in
memory, however many orphans are pending; the file costs about 30 bytes a
pending orphan on local disk and in the bucket.

Crash safety: the new record is written in one PUT (S3 replaces an object
whole or not at all), after every key has been judged; a collection deletes
only keys that the *previous* record already had as orphans for the
retention, and that are orphans still. Its deletes stream while it lists,
so some may go out before the new record is written: the previous record
then stays valid for every key still listed. A collection killed at any
point therefore leaves either the old record or the new one, and no key is
deleted earlier than the retention. The new record lists
every orphan found, those due too: should their delete fail, the next
collection deletes them without a new wait (keys deleted meanwhile are no
longer listed, and leave the record at the next run). A key whose object
changed since it was recorded (another LastModified: written again, e.g. by
a restore) counts as found anew. An unreadable record is reported and
counts as empty: every orphan then starts its retention again (later
deletion, never earlier).
"""

from __future__ import annotations

import gzip
import io
import logging
import tempfile
import zlib
from collections.abc import Iterator
from typing import IO, NamedTuple

from .errors import ObjectNotFound
from .objectstore import ObjectStore

log = logging.getLogger(__name__)

#: The folder of the collector's own objects, under the storage's prefix.
GC_FOLDER = "gc"
#: The record's name in that folder.
RECORD_NAME = "pending.gz"
_HEADER = "zodb-s3blobs pending orphans 1"


class Pending(NamedTuple):
    """One line of the record: an orphan, when it was first found (seconds
    since the epoch, the collector's clock) and its object as then listed."""

    key: str
    first_seen: float
    last_modified: str
    size: int


def stamp(last_modified: float) -> str:
    """A listed LastModified as the record writes it (milliseconds)."""
    return f"{last_modified:.3f}"


def record_key(prefix: str) -> str:
    """The key of the record of the storage under *prefix*."""
    top = f"{prefix}/" if prefix else ""
    return f"{top}{GC_FOLDER}/{RECORD_NAME}"


def _lines(body: IO[bytes], key: str) -> Iterator[Pending]:
    """The entries of a record streamed from *body*; an unreadable record
    ends with a warning (the rest counts as never seen)."""
    try:
        text = io.TextIOWrapper(gzip.GzipFile(fileobj=body), encoding="utf-8")
        if text.readline().rstrip("\n") != _HEADER:
            raise ValueError("not a record of pending orphans")
        for line in text:
            key_, first, modified, size = line.rstrip("\n").split("\t")
            yield Pending(key_, float(first), modified, int(size))
    except (OSError, EOFError, ValueError, zlib.error, UnicodeDecodeError) as exc:
        log.warning(
            "The record of pending orphans %s is unreadable (%s): the orphans "
            "it does not list start their retention again",
            key,
            exc,
        )


class PreviousRecord:
    """The record written by the last collection, looked up in key order.
    It is downloaded whole into a private temporary file first, so that a
    failed download fails the collection (before anything is judged) rather
    than pass for the end of the record."""

    def __init__(self, store: ObjectStore, key: str) -> None:
        self._body = tempfile.TemporaryFile()  # noqa: SIM115 -- until close()
        try:
            store.download(key, self._body)
        except ObjectNotFound:
            self._body.truncate(0)
            self.existed = False
        except BaseException:
            self._body.close()
            raise
        else:
            #: Whether there was a record (else an empty one need not be written).
            self.existed = True
        self._body.seek(0)
        self._entries = _lines(self._body, key) if self.existed else iter(())
        self._next = next(self._entries, None)

    def first_seen(self, key: str, last_modified: str) -> float | None:
        """When *key* was first found orphaned, if the record has it with this
        LastModified. Keys must be asked in listing order."""
        while self._next is not None and self._next.key < key:
            self._next = next(self._entries, None)
        entry = self._next
        if entry and entry.key == key and entry.last_modified == last_modified:
            return entry.first_seen
        return None

    def close(self) -> None:
        self._body.close()


class NewRecord:
    """The record a collection writes: built in a private temporary file,
    sent in one PUT by :meth:`save`."""

    def __init__(self) -> None:
        # Open until close(): the record is built across a whole collection.
        self._file = tempfile.TemporaryFile()  # noqa: SIM115
        self._gzip = gzip.GzipFile(fileobj=self._file, mode="wb")
        self._gzip.write(f"{_HEADER}\n".encode())
        self.entries = 0

    def add(self, entry: Pending) -> None:
        """Append *entry* (in listing order)."""
        first = f"{entry.first_seen:.3f}"
        line = f"{entry.key}\t{first}\t{entry.last_modified}\t{entry.size}\n"
        self._gzip.write(line.encode())
        self.entries += 1

    def save(self, store: ObjectStore, key: str) -> None:
        """Write the record to *key*, replacing the previous one whole."""
        self._gzip.close()
        self._file.seek(0)
        store.put_object(key, self._file)

    def close(self) -> None:
        self._gzip.close()
        self._file.close()
