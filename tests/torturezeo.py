"""What the torture test's ZEO-client base (tests/torture.py, ``base=zeo``)
needs besides the other bases': the server's storage, the copies the
processes still owe (their journals on disk), the staging keys each process
named, and the staging objects left in S3.

On this base a commit's blobs go to staging keys at ``storeBlob`` and are
copied to their revisions' keys after the server committed, by the
committing process's copier, or, if it was killed, by the next process that
opens a storage on its cache directory (:mod:`zodb_s3blobs.copier`). So a
held revision's object may be missing from S3 while a journal owes it, and a
staging object may stay only while a journal owes it or when the process
that named it was killed before its vote wrote a journal.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import s3env
from zodb_s3blobs.journal import JOURNAL_DIR, PREFIX, SUFFIX
from zodb_s3blobs.keys import KeyLayout


def server_storage_section(kind: str, directory: Path) -> str:
    """The ZEO server's storage: a FileStorage without blob-dir (undo, pack
    with history) or a MappingStorage (history-free); records only."""
    if kind == "file":
        return f"<filestorage>\n  path {directory / 'Data.fs'}\n</filestorage>"
    return "<mappingstorage>\n</mappingstorage>"


@dataclass
class Owed:
    """The copies the journals on disk still owe."""

    #: (oid, tid) of journals that recorded their tid.
    revisions: set[tuple[bytes, bytes]] = field(default_factory=set)
    #: oids of journals without a tid (their process died inside tpc_finish).
    oids_without_tid: set[bytes] = field(default_factory=set)
    staging_keys: set[str] = field(default_factory=set)
    journals: list[str] = field(default_factory=list)

    def owes(self, oid: bytes, tid: bytes) -> bool:
        return (oid, tid) in self.revisions or oid in self.oids_without_tid


def _journal_paths(directory: Path) -> Iterator[Path]:
    """The journal files under *directory*: os.walk skips what vanishes
    while it walks (another process evicting a cache), where a glob raises."""
    for parent, _dirs, names in os.walk(directory):
        if os.path.basename(parent) == JOURNAL_DIR:
            for name in names:
                if name.startswith(PREFIX) and name.endswith(SUFFIX):
                    yield Path(parent, name)


def owed(directory: Path) -> Owed:
    """Read (without locking: a live process holds its own) every journal in
    the cache directories under *directory*."""
    found = Owed()
    for path in sorted(_journal_paths(directory)):
        with contextlib.suppress(FileNotFoundError):  # completed meanwhile
            lines = path.read_bytes().splitlines()
        if not lines:
            continue
        found.journals.append(str(path))
        copies = json.loads(lines[0])["copies"]
        tid = None
        for line in lines[1:]:
            with contextlib.suppress(ValueError):  # cut off by a kill
                tid = bytes.fromhex(json.loads(line)["tid"])
        for source, oid_hex, _checksum, staged in copies:
            oid = bytes.fromhex(oid_hex)
            if tid is None:
                found.oids_without_tid.add(oid)
            else:
                found.revisions.add((oid, tid))
            if staged:
                found.staging_keys.add(source)
    return found


def listed_keys(root: str) -> set[str]:
    """Every key under *root*, listed past the fault server."""
    client = s3env.server().client()
    pages = client.get_paginator("list_objects_v2").paginate(
        Bucket=s3env.BUCKET, Prefix=root
    )
    return {item["Key"] for page in pages for item in page.get("Contents", ())}


def staging_keys(prefix: str) -> set[str]:
    """Every key under the prefix's staging folder."""
    return listed_keys(KeyLayout(prefix).staging_root)


def named_staging_keys(paths) -> set[str]:
    """The staging keys listed in the logs at *paths*."""
    keys: set[str] = set()
    for path in paths:
        with contextlib.suppress(FileNotFoundError):
            keys.update(Path(path).read_text().split())
    return keys
