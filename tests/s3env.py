"""The test session's S3 server and bucket, reachable from ZODB's test
factories (which are built at collection time, before fixtures run)."""

from __future__ import annotations

import itertools

from zodb_s3blobs.cli.localserver import ACCESS_KEY, REGION, SECRET_KEY, LocalS3
from zodb_s3blobs.settings import S3Settings

BUCKET = "zodb-s3blobs-tests"
_server: LocalS3 | None = None
_prefixes = itertools.count()


def start(server: LocalS3) -> None:
    global _server
    _server = server
    server.create_bucket(BUCKET)


def server() -> LocalS3:
    assert _server is not None, "the s3_server session fixture has not started"
    return _server


def new_prefix() -> str:
    return f"t{next(_prefixes)}"


def settings(prefix: str | None = None, **kw) -> S3Settings:
    """Settings for the session's bucket; keyword arguments override any field
    (e.g. the endpoint of a fault-injecting server)."""
    fields = {
        "bucket": BUCKET,
        "prefix": new_prefix() if prefix is None else prefix,
        "endpoint_url": server().endpoint_url,
        "region": REGION,
        "access_key": ACCESS_KEY,
        "secret_key": SECRET_KEY,
        "use_ssl": False,
        "addressing_style": "path",
    }
    return S3Settings(**{**fields, **kw})


def zconfig(
    base_section: str, cache_dir: str, prefix: str | None = None, extra: str = ""
) -> str:
    """zope.conf text for <s3blobstorage> around *base_section*."""
    return server().zconfig(
        BUCKET,
        cache_dir,
        base_section,
        prefix=new_prefix() if prefix is None else prefix,
        extra=extra,
    )
