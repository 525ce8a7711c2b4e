"""Conditional writes: a late PUT can never overwrite a committed object.

A PUT the client gave up on may still be carried out by S3 after the abort's
DELETE; on a base that gives the next transaction the aborted one's tid, it
would then replace that commit's object. The fault server holds such a write
and carries it out when the test says (``Faults.late``)."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from types import SimpleNamespace

import pytest

import s3env
from faultserver import Faults, faulty_s3
from s3hooks import error_response
from zodb_s3blobs import conditional
from zodb_s3blobs.errors import ObjectStoreError
from zodb_s3blobs.keys import KeyLayout
from zodb_s3blobs.objectstore import ObjectStore


def put_of(key: str):
    def matches(method: str, path: str) -> bool:
        return method == "PUT" and path.endswith(key)

    return matches


def write(tmp_path, name: str, data: bytes) -> str:
    path = tmp_path / name
    path.write_bytes(data)
    return str(path)


def object_bytes(key: str) -> bytes:
    client = s3env.server().client()
    return client.get_object(Bucket=s3env.BUCKET, Key=key)["Body"].read()


@contextlib.contextmanager
def faulty_store(n: int, **faults) -> Iterator[tuple[ObjectStore, str, Faults]]:
    """An ObjectStore with the default settings behind a fault server
    injecting *faults* (given the key), and revision key number *n*."""
    settings = s3env.settings()
    key = KeyLayout(settings.prefix).key(b"\0" * 7 + bytes([n]), b"\3" * 8)
    injected = Faults(**{name: put_of(key) for name in faults})
    with faulty_s3(injected) as server:
        store = ObjectStore(
            s3env.settings(settings.prefix, endpoint_url=server.endpoint_url)
        )
        try:
            yield store, key, injected
        finally:
            store.close()


def test_a_late_put_after_the_abort_and_the_next_commit_does_not_overwrite(tmp_path):
    """The race itself, with the default settings: the aborted transaction's
    first PUT is held; its retry lands, the abort deletes the key, the next
    commit writes it; then S3 carries out the held PUT. Fails before
    conditional writes (the aborted bytes replaced the committed ones)."""
    with faulty_store(1, late=True) as (store, key, faults):
        store.upload(write(tmp_path, "aborted", b"aborted"), key)
        assert faults.held, "the first PUT was held"
        store.delete([key])  # the abort
        store.upload(write(tmp_path, "committed", b"committed"), key)
        (status,) = faults.release()
    assert status.startswith("412")
    assert object_bytes(key) == b"committed"


def test_a_late_put_landing_first_fails_the_next_write_naming_the_key(tmp_path):
    """The held PUT lands after the abort but before the next commit writes
    the key: that write fails (its vote would), naming the key and saying
    nothing was overwritten, and the key keeps the late bytes for the
    collector to remove (no revision has them). Fails before conditional
    writes (the commit succeeded over a key S3 then overwrote or kept)."""
    with faulty_store(2, late=True) as (store, key, faults):
        store.upload(write(tmp_path, "aborted", b"aborted"), key)
        store.delete([key])
        faults.release()
        with pytest.raises(ObjectStoreError) as info:
            store.upload(write(tmp_path, "next", b"the next commit"), key)
    message = str(info.value)
    assert key in message
    assert "exists already" in message
    assert "nothing was overwritten" in message
    assert object_bytes(key) == b"aborted"


def test_a_retried_write_whose_first_answer_was_lost_succeeds(tmp_path):
    """S3 wrote the object but its answer was lost; botocore sends the PUT
    again, which the condition refuses (412): the object holding this
    upload's own size and CRC32, the upload succeeds."""
    with faulty_store(3, lost=True) as (store, key, faults):
        store.upload(write(tmp_path, "blob", b"mine"), key)
    assert faults.injected == [f"lost the answer to PUT /{s3env.BUCKET}/{key}"]
    assert object_bytes(key) == b"mine"


def test_a_restore_may_replace_an_object_written_without_a_checksum(tmp_path):
    """Restores record the CRC32 of objects 1.x wrote by writing them again:
    that one write may replace (``replace=True``); every other is refused."""
    store = ObjectStore(s3env.settings())
    key = KeyLayout(store.settings.prefix).key(b"\0" * 8, b"\1" * 8)
    try:
        store.upload(write(tmp_path, "old", b"same"), key)
        with pytest.raises(ObjectStoreError):
            store.upload(write(tmp_path, "other", b"else"), key)
        store.upload(write(tmp_path, "again", b"same"), key, replace=True)
    finally:
        store.close()


@pytest.mark.s3_servers("moto", "rgw")
@pytest.mark.parametrize("mode", ["auto", "false"])
def test_the_mode_in_force_is_probed_and_described(mode, caplog):
    """``auto`` probes each kind of write once, under staging/, and leaves
    nothing there; ``false`` sends no condition and probes nothing."""
    caplog.set_level(logging.INFO, "zodb_s3blobs")
    store = ObjectStore(s3env.settings(conditional_writes=mode))
    try:
        described = store.guard.describe()
        operations = store.guard.operations()
    finally:
        store.close()
    if mode == "false":
        assert operations == frozenset()
        assert described == "false: off"
        return
    assert "PutObject" in operations, "moto and RGW enforce it on PUT"
    assert described.startswith("auto: on for PutObject")
    client = s3env.server().client()
    left = client.list_objects_v2(
        Bucket=s3env.BUCKET, Prefix=KeyLayout(store.settings.prefix).staging_root
    )
    assert left.get("KeyCount", 0) == 0


def test_an_unknown_mode_is_refused_naming_the_key():
    with pytest.raises(ValueError, match="s3-conditional-writes"):
        s3env.settings(conditional_writes="sometimes")


def test_a_provider_answering_501_to_one_kind_keeps_the_others(tmp_path):
    """A provider that answers 501 NotImplemented to If-None-Match on a
    multipart completion: the probe decides (it is not taken for an S3 that
    did not answer), and PUTs carry the condition. Fails before the fix
    (every 5xx made the probe undecided: no write carried it)."""
    store = ObjectStore(s3env.settings(endpoint_url=s3env.server().endpoint_url))

    def not_implemented(request, **_kw):
        if "uploadId=" in request.url and request.headers.get("If-None-Match"):
            return error_response(request, "NotImplemented", 501)
        return None

    conditional._probed.clear()  # this process has probed moto already
    store._client.meta.events.register("before-send.s3", not_implemented)
    try:
        assert store.guard.describe() == (
            "auto: on for PutObject (not enforced by the provider for "
            "CopyObject, CompleteMultipartUpload)"
        )
    finally:
        store.close()
        conditional._probed.clear()


def test_a_botocore_that_cannot_send_it_on_copies_guards_the_rest():
    """Older botocore releases lack IfNoneMatch on CopyObject: sending it
    would fail every copy with a parameter error, so it is never added
    there, even with ``s3-conditional-writes true``."""

    class Shape:
        def __init__(self, operation):
            self.members = {} if operation == "CopyObject" else {"IfNoneMatch": 1}

    class Model:
        def operation_model(self, operation):
            return SimpleNamespace(input_shape=Shape(operation))

    client = SimpleNamespace(
        meta=SimpleNamespace(
            service_model=Model(),
            events=SimpleNamespace(register=lambda *args: None),
        )
    )
    guard = conditional.WriteGuard(client, "b", KeyLayout(""), "true")
    assert guard.operations() == {"PutObject", "CompleteMultipartUpload"}
    assert "this botocore cannot send it on CopyObject" in guard.describe()
