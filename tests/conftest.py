"""Fixtures: one real S3 server (moto's, over HTTP on loopback) per session."""

from __future__ import annotations

import contextlib
import itertools

import pytest

import s3env
from zodb_s3blobs.cli.localserver import local_s3_server

#: Fixtures of the deployment tests: PostgreSQL, and RelStorage bases.
pytest_plugins = ["pgserver", "deploy"]


@pytest.fixture(scope="session", autouse=True)
def s3_server():
    with local_s3_server() as server:
        s3env.start(server)
        yield server


@pytest.fixture
def s3_settings():
    """Settings for the session's bucket under a prefix no other test uses."""
    return s3env.settings()


_counter = itertools.count()


@pytest.fixture
def make_storage(tmp_path, s3_settings):
    """Open S3BlobStorage around a FileStorage; closes them after the test."""
    opened = []

    def make(base=None, cache_dir=None, settings=None, **kw):
        from ZODB.FileStorage import FileStorage

        from zodb_s3blobs import S3BlobStorage

        n = next(_counter)
        if base is None:
            base = FileStorage(str(tmp_path / f"data{n}.fs"))
        storage = S3BlobStorage(
            base,
            settings or s3_settings,
            cache_dir=str(cache_dir or tmp_path / f"cache{n}"),
            **kw,
        )
        opened.append(storage)
        return storage

    yield make
    for storage in opened:
        with contextlib.suppress(Exception):  # a test may have closed it
            storage.close()
