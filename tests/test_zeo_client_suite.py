"""ZODB's conformance suites through ``<s3blobstorage>`` around
``<zeoclient>``: the storage mixins ZEO runs against its own client
(``ZEO.tests.testZEO.FullGenericTests``, those that need no ZEO test
machinery) and ZODB's reusable blob-storage suite.

Each test gets a ZEO server of its own, started in this process with
``ZEO.server`` over a new FileStorage without blob-dir (the tests expect an
empty database), and stopped when the test ends.

Everything runs on moto's server and on Ceph's RADOS Gateway (the mixins as
``ZEOClientBaseTestsOnRGW``, the blob suite through the ``s3_servers``
mark). Measured on two shared cores: about 90 s on each server, the RGW run
included the cluster's start, so the whole set runs on RGW rather than a
subset. ZODB's two race tests that need ``_new_storage_client`` are skipped
on both, as ZODB skips them for any storage without it.
"""

from __future__ import annotations

import os

import pytest
import ZEO
import ZODB.config
from ZODB.tests import (
    BasicStorage,
    ConflictResolution,
    HistoryStorage,
    IteratorStorage,
    MTStorage,
    PackableStorage,
    RevisionStorage,
    Synchronization,
    TransactionalUndoStorage,
)

import s3env
from test_zodb_storage_suite import S3BlobStorageTestBase, collect_checks
from zodbsuite import blob_suite_cases, case_id, run_case

#: The stop functions of the servers the running test started.
_servers: list = []


def zeo_server(path: str) -> tuple[str, int]:
    """The address of a new ZEO server over the FileStorage at *path*."""
    address, stop = ZEO.server(path=path)
    _servers.append(stop)
    return address


def zeoclient_storage(
    address: tuple[str, int], cache_dir: str, prefix: str, server: str | None = None
):
    """``<s3blobstorage><zeoclient>`` on the ZEO server at *address*, on the
    S3 server of kind *server* (default: the active one). gc-retention 0:
    ZODB's packing tests expect a packed revision's file gone at once."""
    host, port = address
    base = f"<zeoclient>\n    server {host}:{port}\n  </zeoclient>"
    text = s3env.zconfig(
        base, cache_dir=cache_dir, prefix=prefix, server=server, extra="gc-retention 0"
    )
    return ZODB.config.storageFromString(text)


@pytest.fixture(autouse=True)
def _stop_servers():
    yield
    while _servers:
        _servers.pop()()


@collect_checks
class ZEOClientBaseTests(
    S3BlobStorageTestBase,
    BasicStorage.BasicStorage,
    PackableStorage.PackableStorage,
    PackableStorage.PackableUndoStorage,
    Synchronization.SynchronizedStorage,
    MTStorage.MTStorage,
    ConflictResolution.ConflictResolvingStorage,
    ConflictResolution.ConflictResolvingTransUndoStorage,
    RevisionStorage.RevisionStorage,
    TransactionalUndoStorage.TransactionalUndoStorage,
    HistoryStorage.HistoryStorage,
    IteratorStorage.IteratorStorage,
):
    def open(self, **kwargs):
        if not hasattr(self, "_address"):
            self._address = zeo_server(os.path.abspath("Data.fs"))
        self._storage = zeoclient_storage(
            self._address, os.path.abspath("blob-cache"), self.prefix, self.s3_kind
        )


class ZEOClientBaseTestsOnRGW(ZEOClientBaseTests):
    s3_kind = "rgw"


def storage_from_zconfig(name: str, blob_dir: str):
    prefix = f"{s3env.new_prefix()}/{name}"
    address = zeo_server(os.path.abspath(f"{name}.fs"))
    return zeoclient_storage(address, os.path.abspath(blob_dir), prefix)


CASES = blob_suite_cases("S3BlobStorageZEOClient", storage_from_zconfig)


@pytest.mark.s3_servers("moto", "rgw")
@pytest.mark.parametrize("case", CASES, ids=[case_id(t) for t, _ in CASES])
def test_zodb_blob_suite(case, tmp_path):
    test, layer = case
    run_case(test, layer, tmp_path)
