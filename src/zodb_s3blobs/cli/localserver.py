"""An S3 server inside this process (moto's), on a free loopback port.

Used by ``zodb-s3blobs demo`` and by the test suite, so that neither needs an
account, Docker or a network. Requires the ``demo`` or ``test`` extra.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

#: moto accepts any credentials; these only have to be present.
ACCESS_KEY = "local-access-key"
SECRET_KEY = "local-secret-key"
REGION = "us-east-1"


class MissingServerError(RuntimeError):
    """moto is not installed."""


@dataclass(frozen=True)
class LocalS3:
    endpoint_url: str

    def client(self):
        import boto3

        return boto3.session.Session().client(
            "s3",
            endpoint_url=self.endpoint_url,
            region_name=REGION,
            aws_access_key_id=ACCESS_KEY,
            aws_secret_access_key=SECRET_KEY,
        )

    def zconfig(
        self,
        bucket: str,
        cache_dir: str,
        base_section: str,
        prefix: str = "",
        extra: str = "",
    ) -> str:
        """ZConfig text (as in a zope.conf) for ``<s3blobstorage>`` around
        *base_section*, pointed at this server."""
        return s3blobstorage_section(
            self.endpoint_url, bucket, cache_dir, base_section, prefix, extra
        )

    def create_bucket(self, name: str) -> str:
        self.client().create_bucket(Bucket=name)
        return name


def s3blobstorage_section(
    endpoint_url: str,
    bucket: str,
    cache_dir: str,
    base_section: str,
    prefix: str = "",
    extra: str = "",
    region: str = REGION,
    access_key: str = ACCESS_KEY,
    secret_key: str = SECRET_KEY,
) -> str:
    """ZConfig text for ``<s3blobstorage>`` around *base_section*, on a local
    server over plain HTTP with path-style addressing (demo, tests, bench)."""
    prefix_line = f"s3-prefix {prefix}" if prefix else ""
    return f"""
%import zodb_s3blobs
<s3blobstorage>
  bucket-name {bucket}
  {prefix_line}
  s3-endpoint-url {endpoint_url}
  s3-region {region}
  s3-access-key {access_key}
  s3-secret-key {secret_key}
  s3-use-ssl false
  s3-addressing-style path
  cache-dir {cache_dir}
  {extra}
  {base_section}
</s3blobstorage>
"""


@contextlib.contextmanager
def local_s3_server() -> Iterator[LocalS3]:
    """Run moto's S3 server on 127.0.0.1 for the duration of the block."""
    try:
        from moto.server import ThreadedMotoServer
    except ImportError as exc:
        raise MissingServerError(
            "The embedded S3 server needs moto: pip install 'zodb-s3blobs[demo]'"
        ) from exc
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        yield LocalS3(f"http://{host}:{port}")
    finally:
        server.stop()
