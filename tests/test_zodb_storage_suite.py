"""ZODB's storage conformance mixins against S3BlobStorage over real S3.

The same classes ZODB runs against FileStorage (``testFileStorage``) and
MappingStorage (``testMappingStorage``), with each storage opened from
zope.conf text through ``%import zodb_s3blobs``. ZODB names its tests
``check*``; :func:`collect_checks` exposes them to pytest as ``test_check*``.
Each class runs on moto's server and, as its ``...OnRGW`` subclass, on Ceph's
RADOS Gateway (pytest cannot parametrise unittest classes; the class names
its server instead).
"""

from __future__ import annotations

import os

import pytest
import ZODB.config
from ZODB.tests import (
    BasicStorage,
    ConflictResolution,
    HistoryStorage,
    IteratorStorage,
    MTStorage,
    PackableStorage,
    PersistentStorage,
    RevisionStorage,
    StorageTestBase,
    Synchronization,
    TransactionalUndoStorage,
)

import s3env


def collect_checks(cls):
    for name in dir(cls):
        if name.startswith("check") and callable(getattr(cls, name)):
            setattr(cls, "test_" + name, getattr(cls, name))
    return cls


class S3BlobStorageTestBase(StorageTestBase.StorageTestBase):
    base_section = ""
    #: The kind of S3 server (s3env.KINDS) the class runs on.
    s3_kind = "moto"

    @pytest.fixture(autouse=True)
    def _s3_server(self, request):
        """Start the class's server the first time it is needed."""
        s3env.require(request, self.s3_kind)

    def open(self, **kwargs):
        self._storage = ZODB.config.storageFromString(
            s3env.zconfig(
                self.base_section,
                cache_dir=os.path.abspath("blob-cache"),
                prefix=self.prefix,
                server=self.s3_kind,
            )
        )

    def setUp(self):
        StorageTestBase.StorageTestBase.setUp(self)
        self.prefix = s3env.new_prefix()
        self.open()


@collect_checks
class FileStorageBaseTests(
    S3BlobStorageTestBase,
    BasicStorage.BasicStorage,
    TransactionalUndoStorage.TransactionalUndoStorage,
    RevisionStorage.RevisionStorage,
    PackableStorage.PackableStorage,
    PackableStorage.PackableUndoStorage,
    Synchronization.SynchronizedStorage,
    ConflictResolution.ConflictResolvingStorage,
    ConflictResolution.ConflictResolvingTransUndoStorage,
    HistoryStorage.HistoryStorage,
    IteratorStorage.IteratorStorage,
    IteratorStorage.ExtendedIteratorStorage,
    PersistentStorage.PersistentStorage,
    MTStorage.MTStorage,
):
    base_section = "<filestorage>\n    path Data.fs\n  </filestorage>"
    use_extension_bytes = True


@collect_checks
class MappingStorageBaseTests(
    S3BlobStorageTestBase,
    BasicStorage.BasicStorage,
    HistoryStorage.HistoryStorage,
    IteratorStorage.ExtendedIteratorStorage,
    IteratorStorage.IteratorStorage,
    MTStorage.MTStorage,
    PackableStorage.PackableStorageWithOptionalGC,
    RevisionStorage.RevisionStorage,
    Synchronization.SynchronizedStorage,
):
    base_section = "<mappingstorage>\n  </mappingstorage>"

    # Undo tests ZODB does not run against MappingStorage either (its
    # testMappingStorage collects check* methods only): it cannot undo.
    testUndoZombie = None
    testLoadBeforeUndo = None


class FileStorageBaseTestsOnRGW(FileStorageBaseTests):
    s3_kind = "rgw"


class MappingStorageBaseTestsOnRGW(MappingStorageBaseTests):
    s3_kind = "rgw"
