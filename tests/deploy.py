"""What the deployment tests share: RelStorage base sections (SQLite, and the
session's PostgreSQL), the keys in the test bucket, random payloads, and the
console scripts of this environment."""

from __future__ import annotations

import os
import sysconfig
from dataclasses import dataclass

import pytest

import s3env
from zodb_s3blobs.keys import KeyLayout


@dataclass(frozen=True)
class RelStorageBase:
    """A ``<relstorage>`` section, and what kind of database it opens."""

    backend: str
    keep_history: bool
    section: str


def relstorage_section(adapter: str, keep_history: bool) -> str:
    """``<relstorage>`` around an adapter section; RelStorage's own blob
    support stays off (no blob-dir), as ``<s3blobstorage>`` requires."""
    return f"""
%import relstorage
<relstorage>
  keep-history {"true" if keep_history else "false"}
  {adapter}
</relstorage>
"""


def new_relstorage_base(
    request, tmp_path, backend: str, keep_history: bool
) -> RelStorageBase:
    """A new, empty database on SQLite or in the session's PostgreSQL server."""
    if backend == "sqlite":
        data_dir = tmp_path / "sqlite"
        data_dir.mkdir()
        adapter = f"<sqlite3>\n    data-dir {data_dir}\n  </sqlite3>"
    else:
        dsn = request.getfixturevalue("postgresql").create_database()
        adapter = f"<postgresql>\n    dsn {dsn}\n  </postgresql>"
    return RelStorageBase(
        backend, keep_history, relstorage_section(adapter, keep_history)
    )


@pytest.fixture(
    params=[
        ("sqlite", False),
        ("sqlite", True),
        ("postgresql", False),
        ("postgresql", True),
    ],
    ids=["sqlite-hf", "sqlite-hp", "postgresql-hf", "postgresql-hp"],
)
def relstorage_base(request, tmp_path) -> RelStorageBase:
    """A RelStorage database of each kind: SQLite and PostgreSQL,
    history-free and history-preserving."""
    return new_relstorage_base(request, tmp_path, *request.param)


@pytest.fixture(params=["sqlite", "postgresql"])
def history_preserving_base(request, tmp_path) -> RelStorageBase:
    """A history-preserving RelStorage database, for what needs undo."""
    return new_relstorage_base(request, tmp_path, request.param, True)


def bucket_keys(prefix: str) -> list[str]:
    """Every key under ``prefix/blobs/`` in the test bucket, sorted."""
    client = s3env.server().client()
    keys = []
    pages = client.get_paginator("list_objects_v2").paginate(
        Bucket=s3env.BUCKET, Prefix=KeyLayout(prefix).root
    )
    for page in pages:
        keys.extend(item["Key"] for item in page.get("Contents", ()))
    return sorted(keys)


def blob_key(prefix: str, oid: bytes, tid: bytes) -> str:
    """The key of one blob revision under *prefix*."""
    return KeyLayout(prefix).key(oid, tid)


def payload(size: int = 3000) -> bytes:
    """Random blob content, different in every call."""
    return os.urandom(size)


def console_script(name: str) -> str:
    """The path of a console script (runzeo, zodbconvert) installed into the
    environment running the tests, as an operator would run it."""
    path = os.path.join(sysconfig.get_path("scripts"), name)
    assert os.path.exists(path), f"{name} is not installed in {path}"
    return path
