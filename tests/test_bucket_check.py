"""ObjectStore.check_bucket, as the storage runs it at open: a configuration
error is final (transient=False) and says what to check; an S3 that cannot
be reached right now is transient, names the endpoint, and is reported fast."""

from __future__ import annotations

import time

import pytest

import s3env
from faultserver import Faults, faulty_s3
from ports import free_port
from zodb_s3blobs.errors import ObjectStoreError
from zodb_s3blobs.objectstore import ObjectStore


def check(settings) -> ObjectStoreError:
    """Run check_bucket with *settings*; return the error it raised."""
    store = ObjectStore(settings)
    try:
        with pytest.raises(ObjectStoreError) as info:
            store.check_bucket()
    finally:
        store.close()
    return info.value


def test_a_reachable_bucket_passes():
    store = ObjectStore(s3env.settings())
    try:
        store.check_bucket()
    finally:
        store.close()


def test_connection_refused_is_transient_and_names_the_endpoint():
    """Fails before the fix: every failure was final, so a restart during a
    short S3 outage refused to open the storage."""
    endpoint = f"http://127.0.0.1:{free_port()}"
    started = time.monotonic()
    error = check(s3env.settings(endpoint_url=endpoint))
    assert time.monotonic() - started < 5
    assert error.transient
    assert endpoint in str(error)
    assert f"s3://{s3env.BUCKET}" in str(error)


def test_a_server_answering_503_is_transient():
    """Fails before the fix: a 503 was reported as final."""
    faults = Faults(error_rate=1.0)
    with faulty_s3(faults) as server:
        started = time.monotonic()
        error = check(s3env.settings(endpoint_url=server.endpoint_url))
        elapsed = time.monotonic() - started
    assert error.transient
    assert server.endpoint_url in str(error)
    assert "503" in str(error) or "SlowDown" in str(error)
    assert len(faults.injected) == 2, "a couple of attempts, no more"
    assert elapsed < 5


def test_a_missing_bucket_is_final_and_says_what_to_check():
    error = check(s3env.settings(bucket="no-such-bucket"))
    assert not error.transient
    assert "s3://no-such-bucket" in str(error)
    assert "does not exist" in str(error)
    assert "bucket-name" in str(error)


def test_refused_credentials_are_final_and_say_what_to_check():
    faults = Faults(refused_keys={"AKIAREFUSED"})
    with faulty_s3(faults) as server:
        error = check(
            s3env.settings(endpoint_url=server.endpoint_url, access_key="AKIAREFUSED")
        )
    assert not error.transient
    assert "access denied" in str(error)
    assert "s3-access-key" in str(error)
    assert "AKIAREFUSED" not in str(error)
    assert len(faults.injected) == 1, "a refusal is not tried again"


def test_an_untrusted_certificate_is_final(tmp_path):
    """TLS verification failing is a configuration error (s3-ca-bundle), not
    an outage, although botocore reports it as a connection error."""
    with faulty_s3(Faults(), tls_dir=tmp_path) as server:
        error = check(s3env.settings(endpoint_url=server.endpoint_url, use_ssl=True))
    assert not error.transient
    assert "SSL" in str(error) or "certificate" in str(error)
    assert "s3-ca-bundle" in str(error)
