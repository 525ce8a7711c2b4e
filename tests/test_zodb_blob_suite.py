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

import s3env
from zodbsuite import blob_suite_cases, case_id, run_case


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


CASES = blob_suite_cases("S3BlobStorage", storage_from_zconfig)


@pytest.mark.s3_servers("moto", "rgw")
@pytest.mark.parametrize("case", CASES, ids=[case_id(t) for t, _ in CASES])
def test_zodb_blob_suite(case, tmp_path):
    test, layer = case
    run_case(test, layer, tmp_path)
