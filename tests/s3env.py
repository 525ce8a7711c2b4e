"""The test session's S3 servers and bucket, reachable from ZODB's test
factories (which are built at collection time, before fixtures run).

Two kinds of server hold the same bucket: ``moto`` (moto's server inside the
test process, started for every session) and ``rgw`` (Ceph's RADOS Gateway,
``rgwserver.py``, started when the first test that runs on it needs it).
Every helper here serves the *active* kind unless given ``server=``; the
``s3_kind`` fixture in conftest.py makes a test's kind active for its
duration (``moto`` unless the test is marked to run on more servers), so the
factories of ZODB's suites and the CLI helpers follow it unchanged."""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Iterator
from dataclasses import dataclass

from zodb_s3blobs.cli.localserver import (
    ACCESS_KEY,
    REGION,
    SECRET_KEY,
    s3blobstorage_section,
)
from zodb_s3blobs.settings import S3Settings

BUCKET = "zodb-s3blobs-tests"
#: The kinds of server a test can run on, in the order tests are listed.
KINDS = ("moto", "rgw")
_prefixes = itertools.count()


@dataclass(frozen=True)
class Server:
    """Where one server listens and the keys it accepts."""

    kind: str
    endpoint_url: str
    access_key: str = ACCESS_KEY
    secret_key: str = SECRET_KEY
    region: str = REGION

    def client(self):
        """A boto3 S3 client for this server, path-style like the settings."""
        import boto3
        from botocore.config import Config

        return boto3.session.Session().client(
            "s3",
            endpoint_url=self.endpoint_url,
            region_name=self.region,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            config=Config(s3={"addressing_style": "path"}),
        )


_servers: dict[str, Server] = {}
_active = "moto"


def start(running, kind: str = "moto") -> Server:
    """Register *running* (anything with ``endpoint_url``, and the keys it
    accepts as attributes unless it takes moto's) as the session's server of
    *kind*, and create the bucket on it."""
    registered = Server(
        kind,
        running.endpoint_url,
        getattr(running, "access_key", ACCESS_KEY),
        getattr(running, "secret_key", SECRET_KEY),
        getattr(running, "region", REGION),
    )
    registered.client().create_bucket(Bucket=BUCKET)
    _servers[kind] = registered
    return registered


def require(request, kind: str) -> Server:
    """The session's server of *kind*; the first request for ``rgw`` starts
    it through its pytest fixture (skipped, or failed under CI, where Ceph
    is missing). moto's is started for every session by conftest.py."""
    if kind != "moto":
        running = request.getfixturevalue(kind)
        if kind not in _servers:
            start(running, kind)
    return _lookup(kind)


@contextlib.contextmanager
def active(kind: str) -> Iterator[Server]:
    """Make *kind* the server the helpers serve for the block."""
    global _active
    before, _active = _active, kind
    try:
        yield server(kind)
    finally:
        _active = before


def kind() -> str:
    """The kind of server the helpers serve now."""
    return _active


def server(kind: str | None = None) -> Server:
    """The session's server of *kind* (default: the active one)."""
    return _lookup(kind)


def _lookup(kind: str | None) -> Server:
    kind = kind or _active
    assert kind in _servers, f"the session's {kind} S3 server has not started"
    return _servers[kind]


def new_prefix() -> str:
    return f"t{next(_prefixes)}"


def settings(prefix: str | None = None, server: str | None = None, **kw) -> S3Settings:
    """Settings for the session's bucket on the *server* kind (default: the
    active one); keyword arguments override any field (e.g. the endpoint of a
    fault-injecting server)."""
    s3 = _lookup(server)
    fields = {
        "bucket": BUCKET,
        "prefix": new_prefix() if prefix is None else prefix,
        "endpoint_url": s3.endpoint_url,
        "region": s3.region,
        "access_key": s3.access_key,
        "secret_key": s3.secret_key,
        "use_ssl": False,
        "addressing_style": "path",
    }
    return S3Settings(**{**fields, **kw})


def zconfig(
    base_section: str,
    cache_dir: str,
    prefix: str | None = None,
    extra: str = "",
    server: str | None = None,
) -> str:
    """zope.conf text for <s3blobstorage> around *base_section*, on the
    session's bucket on the *server* kind (default: the active one)."""
    s3 = _lookup(server)
    return s3blobstorage_section(
        s3.endpoint_url,
        BUCKET,
        cache_dir,
        base_section,
        new_prefix() if prefix is None else prefix,
        extra,
        s3.region,
        s3.access_key,
        s3.secret_key,
    )
