"""ZODB's reusable blob-storage suite against S3BlobStorage over real S3.

``ZODB.tests.testblob.storage_reusable_suite`` is what ZODB runs against its
own blob storages: doctests for connections, import/export, transactions,
packing, savepoints, permissions, plus the undo and recovery test classes.
Each storage is built from zope.conf text, through ``%import zodb_s3blobs``,
on moto's server and on Ceph's RADOS Gateway (the factory serves the server
the ``s3_kind`` fixture makes active).
"""

from __future__ import annotations

import os

import pytest
import ZODB.config
from ZODB.tests.testblob import storage_reusable_suite

import s3env
from zodbsuite import case_id, flatten, run_case


def storage_from_zconfig(name: str, blob_dir: str):
    # Each test has its own working directory; its absolute path keeps the
    # S3 prefixes of different tests (and of 'data' and 'dest') apart.
    prefix = f"{s3env.new_prefix()}/{name}"
    text = s3env.zconfig(
        f"<filestorage>\n    path {name}.fs\n  </filestorage>",
        cache_dir=os.path.abspath(blob_dir),
        prefix=prefix,
        # ZODB's packing tests expect a packed revision's file gone at once.
        extra="gc-retention 0",
    )
    return ZODB.config.storageFromString(text)


ROOT_ONLY_FAILURE = "open(blob.committed(), 'w')"


def without_kernel_permission_example(test):
    """As root, drop the one example that relies on the kernel refusing a write
    to a read-only file (root may write anyway, and would truncate the cached
    copy the later examples read). test_cache.py asserts the mode bits that
    make committed files read-only instead."""
    doctest_ = getattr(test, "_dt_test", None)
    if os.geteuid() != 0 or doctest_ is None:
        return test
    kept = [e for e in doctest_.examples if ROOT_ONLY_FAILURE not in e.source]
    if len(kept) != len(doctest_.examples):
        assert len(doctest_.examples) - len(kept) == 1
        doctest_.examples = kept
    return test


CASES = [
    (without_kernel_permission_example(test), layer)
    for test, layer in flatten(
        storage_reusable_suite(
            "S3BlobStorage",
            storage_from_zconfig,
            test_blob_storage_recovery=True,
            test_packing=True,
            test_undo=True,
        )
    )
]


@pytest.mark.s3_servers("moto", "rgw")
@pytest.mark.parametrize("case", CASES, ids=[case_id(t) for t, _ in CASES])
def test_zodb_blob_suite(case, tmp_path):
    test, layer = case
    run_case(test, layer, tmp_path)
