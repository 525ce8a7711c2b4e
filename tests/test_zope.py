"""Zope loads a zope.conf with ``%import zodb_s3blobs`` and ``<zodb_db main>``
holding ``<s3blobstorage>``, and runs on it. Each Zope instance is a process
of its own (tests/zopeinstance.py), as in a deployment."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import s3env
from deploy import bucket_keys, payload

INSTANCE = Path(__file__).with_name("zopeinstance.py")


def zope_conf(instance: Path, prefix: str, name: str) -> Path:
    """A zope.conf as mkwsgiinstance writes it, with the blobs in S3 and a
    blob cache of its own, ``$INSTANCE/var/NAME-cache``."""
    (instance / "var").mkdir(parents=True, exist_ok=True)
    storage = s3env.zconfig(
        "<filestorage>\n      path $INSTANCE/var/Data.fs\n    </filestorage>",
        f"$INSTANCE/var/{name}-cache",
        prefix,
    )
    path = instance / f"{name}.conf"
    path.write_text(
        f"""%define INSTANCE {instance}
instancehome $INSTANCE
%import zodb_s3blobs

<zodb_db main>
    mount-point /
    cache-size 5000
    {storage}
</zodb_db>
"""
    )
    return path


def zope(config: Path, action: str, data: bytes = b"") -> dict:
    """Run one action in a new Zope process started from *config*."""
    done = subprocess.run(
        [sys.executable, str(INSTANCE), str(config), action, data.hex()],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_zope_runs_on_s3blobstorage_from_zope_conf(tmp_path):
    prefix = s3env.new_prefix()
    data = payload(50_000)
    written = zope(zope_conf(tmp_path, prefix, "client1"), "write", data)
    assert written == {"storage": "S3BlobStorage", "application": "Zope"}
    assert len(bucket_keys(prefix)) == 1
    # Another Zope client with an empty blob cache reads it from S3.
    read = zope(zope_conf(tmp_path, prefix, "client2"), "read")
    assert bytes.fromhex(read["data"]) == data
    assert list((tmp_path / "var" / "client2-cache").rglob("*.blob"))


def test_a_demostorage_test_layer_reads_s3_and_keeps_its_commits_local(tmp_path):
    prefix = s3env.new_prefix()
    config = zope_conf(tmp_path, prefix, "client")
    base_data, layer_data = payload(), payload()
    zope(config, "write", base_data)
    before = bucket_keys(prefix)
    result = zope(config, "demo", layer_data)
    assert bytes.fromhex(result["base_data"]) == base_data
    assert bytes.fromhex(result["layer_data"]) == layer_data
    assert bucket_keys(prefix) == before, "the layer's commit stayed out of S3"
