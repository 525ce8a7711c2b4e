"""Fixtures: real S3 servers over HTTP on loopback, one of each kind per
session: moto's (always), and Ceph's RADOS Gateway for the tests marked
``s3_servers("moto", "rgw")``, which run once on each (``test_x[moto]``,
``test_x[rgw]``). The mark on a test function overrides its module's, so a
test that only moto can serve says so where it is defined."""

from __future__ import annotations

import contextlib
import itertools

import pytest

import s3env
from zodb_s3blobs.cli.localserver import local_s3_server

#: Fixtures of the deployment tests: PostgreSQL, and RelStorage bases; and
#: the Ceph cluster behind the RGW runs.
pytest_plugins = ["pgserver", "deploy", "rgwserver"]


def pytest_configure(config):
    config.addinivalue_line(
        "markers",
        "s3_servers(*kinds): run the test once on each kind of S3 server "
        f"named ({', '.join(s3env.KINDS)}); unmarked tests run on moto only",
    )


def pytest_collection_modifyitems(items):
    """Under pytest-xdist (``-n``, ``--dist loadgroup``), every test on Ceph's
    RGW runs in one worker, so that one Ceph cluster serves them all instead
    of one per worker."""
    for item in items:
        callspec = getattr(item, "callspec", None)
        if callspec is not None and callspec.params.get("s3_kind") == "rgw":
            item.add_marker(pytest.mark.xdist_group("rgw"))


def pytest_generate_tests(metafunc):
    marker = metafunc.definition.get_closest_marker("s3_servers")
    if marker is not None:
        unknown = set(marker.args) - set(s3env.KINDS)
        assert marker.args and not unknown, f"s3_servers{marker.args}"
        metafunc.parametrize("s3_kind", marker.args, indirect=True)


@pytest.fixture(scope="session", autouse=True)
def s3_server():
    with local_s3_server() as server:
        s3env.start(server, "moto")
        yield server


@pytest.fixture(autouse=True)
def s3_kind(request):
    """The kind of S3 server this test runs on, active in s3env for its
    duration (``moto`` unless parametrised by the ``s3_servers`` mark)."""
    kind = getattr(request, "param", "moto")
    s3env.require(request, kind)
    with s3env.active(kind):
        yield kind


@pytest.fixture
def s3_settings(s3_kind):
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
