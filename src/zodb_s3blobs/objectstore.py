"""The S3 side: one long-lived, thread-safe boto3 client and its transfer manager.

This is the only module that imports boto3. It knows object keys and files,
nothing of ZODB transactions, and turns every botocore failure into an
:class:`~zodb_s3blobs.errors.ObjectStoreError` naming the operation, the
``s3://bucket/key`` and the cause.
"""

from __future__ import annotations

import base64
import binascii
import logging
import os
import time
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import BinaryIO

import boto3
from boto3.s3.transfer import TransferConfig, create_transfer_manager
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError
from botocore.handlers import add_expect_header

from .errors import ObjectNotFound, ObjectStoreError

log = logging.getLogger(__name__)

MiB = 1 << 20
#: S3 accepts at most this many keys in one DeleteObjects request.
DELETE_BATCH = 1000
#: S3's smallest multipart part (but for the last), and its largest PUT.
MIN_PART_SIZE = 5 * MiB
MAX_PUT_SIZE = 5 << 30
#: A first part arriving at least this fast (bytes a second) is streamed to the
#: end: one connection is not the bottleneck, so parallel ranges would only add
#: requests. A single S3 connection over the internet gives well below this.
FAST_STREAM = 256 * MiB
_NOT_FOUND = {"404", "NoSuchKey", "NotFound"}
_ADDRESSING_STYLES = ("auto", "path", "virtual")
_DOWNLOAD_CHUNK = 1 << 20


def decode_sse_customer_key(value: str) -> bytes:
    """Decode an SSE-C key given as base64 of 32 bytes, or raise ValueError."""
    try:
        raw = base64.b64decode(value.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("s3-sse-customer-key is not valid base64") from None
    if len(raw) != 32:
        raise ValueError(
            f"s3-sse-customer-key must decode to 32 bytes (AES-256), not {len(raw)}"
        )
    return raw


@dataclass(frozen=True)
class S3Settings:
    """Where the blobs live and how to reach them (the ``s3-*`` config keys)."""

    bucket: str
    prefix: str = ""
    endpoint_url: str | None = None
    region: str | None = None
    access_key: str | None = field(default=None, repr=False)
    secret_key: str | None = field(default=None, repr=False)
    use_ssl: bool = True
    addressing_style: str = "auto"
    sse_customer_key: str | None = field(default=None, repr=False)
    max_concurrency: int = 10
    #: Uploads above this size go in parallel parts (if ``multipart``), and
    #: downloads above ``part_size`` fetch their remaining parts in parallel.
    multipart: bool = True
    multipart_threshold: int = 100 * MiB
    part_size: int = 8 * MiB
    connect_timeout: float = 10.0
    read_timeout: float = 60.0
    max_attempts: int = 5

    def __post_init__(self) -> None:
        if not self.bucket:
            raise ValueError("bucket-name must not be empty")
        if self.addressing_style not in _ADDRESSING_STYLES:
            raise ValueError(
                f"s3-addressing-style must be one of {', '.join(_ADDRESSING_STYLES)},"
                f" not {self.addressing_style!r}"
            )
        if self.sse_customer_key is not None:
            decode_sse_customer_key(self.sse_customer_key)
            if not self.use_ssl or (
                self.endpoint_url and self.endpoint_url.startswith("http://")
            ):
                raise ValueError(
                    "s3-sse-customer-key requires TLS: S3 refuses SSE-C keys sent "
                    "over plain HTTP (set s3-use-ssl true and an https endpoint)"
                )
        if self.max_concurrency < 1:
            raise ValueError("s3-max-concurrency must be at least 1")
        if self.part_size < MIN_PART_SIZE:
            raise ValueError(
                f"s3-part-size must be at least 5MB (S3's smallest part), "
                f"not {self.part_size}"
            )


class ObjectStore:
    """Put, get, copy, list and delete objects of one bucket."""

    def __init__(self, settings: S3Settings) -> None:
        self.settings = settings
        self.bucket = settings.bucket
        config = Config(
            connect_timeout=settings.connect_timeout,
            read_timeout=settings.read_timeout,
            retries={"max_attempts": settings.max_attempts, "mode": "standard"},
            max_pool_connections=max(10, 2 * settings.max_concurrency),
            s3={"addressing_style": settings.addressing_style},
            # Ceph-based providers reject the CRC headers newer botocore sends by
            # default; compute and validate checksums only where S3 requires it.
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
        )
        session = boto3.session.Session()
        self._client = session.client(
            "s3",
            endpoint_url=settings.endpoint_url,
            region_name=settings.region,
            aws_access_key_id=settings.access_key,
            aws_secret_access_key=settings.secret_key,
            use_ssl=settings.use_ssl,
            config=config,
        )
        # botocore sends "Expect: 100-continue" with every file-like body and
        # waits for the answer: a round trip per upload that buys nothing here.
        self._client.meta.events.unregister("before-call.s3", add_expect_header)
        self._transfers = create_transfer_manager(
            self._client,
            TransferConfig(
                max_concurrency=settings.max_concurrency,
                multipart_threshold=(
                    settings.multipart_threshold if settings.multipart else MAX_PUT_SIZE
                ),
                multipart_chunksize=settings.part_size,
                preferred_transfer_client="classic",
            ),
        )
        self.fast_stream = FAST_STREAM
        self._parts = ThreadPoolExecutor(
            settings.max_concurrency, thread_name_prefix="zodb-s3blobs-get"
        )
        self._sse: dict[str, object] = {}
        self._copy_sse: dict[str, object] = {}
        if settings.sse_customer_key:
            raw = decode_sse_customer_key(settings.sse_customer_key)
            self._sse = {"SSECustomerAlgorithm": "AES256", "SSECustomerKey": raw}
            self._copy_sse = {
                "CopySourceSSECustomerAlgorithm": "AES256",
                "CopySourceSSECustomerKey": raw,
            }

    def __repr__(self) -> str:
        return f"<ObjectStore s3://{self.bucket}>"

    def url(self, key: str) -> str:
        return f"s3://{self.bucket}/{key}"

    def _error(self, operation: str, key: str, exc: Exception) -> ObjectStoreError:
        if isinstance(exc, ClientError):
            error = exc.response.get("Error", {})
            code = str(error.get("Code", "Unknown"))
            message = error.get("Message") or exc.response.get(
                "ResponseMetadata", {}
            ).get("HTTPStatusCode", "")
            cls = ObjectNotFound if code in _NOT_FOUND else ObjectStoreError
            return cls(operation, self.url(key), f"{code} {message}".strip())
        return ObjectStoreError(
            operation, self.url(key), f"{type(exc).__name__}: {exc}"
        )

    def transfer(
        self, uploads: Iterable[tuple[str, str]], copies: Iterable[tuple[str, str]]
    ) -> None:
        """Upload files ``(path, key)`` and copy objects ``(source_key, key)`` in
        parallel (at most ``max_concurrency`` requests at once).

        Waits for every transfer, then raises an ObjectStoreError naming the first
        failure and how many failed; nothing is left running on return.
        """
        futures: list[tuple[str, str, Future]] = []
        for path, key in uploads:
            futures.append(
                (
                    "upload",
                    key,
                    self._transfers.upload(
                        path, self.bucket, key, extra_args=dict(self._sse)
                    ),
                )
            )
        for source, key in copies:
            futures.append(
                (
                    "copy",
                    key,
                    self._transfers.copy(
                        {"Bucket": self.bucket, "Key": source},
                        self.bucket,
                        key,
                        extra_args={**self._sse, **self._copy_sse},
                    ),
                )
            )
        failures = []
        for operation, key, future in futures:
            try:
                future.result()
            except (ClientError, BotoCoreError, OSError) as exc:
                failures.append(self._error(operation, key, exc))
        if failures:
            first = failures[0]
            if len(failures) > 1:
                raise ObjectStoreError(
                    first.operation,
                    first.key,
                    f"{first.cause} ({len(failures)} of {len(futures)} transfers "
                    "failed)",
                ) from first
            raise first

    def download(self, key: str, out: BinaryIO) -> int:
        """Write the object into *out* (a file opened for writing); return its size.

        One GET, streamed straight into *out*. If the object is larger than
        ``part_size`` and its first part arrived slower than
        :data:`FAST_STREAM` bytes a second (as from S3 over a WAN, where one
        connection is the bottleneck), the stream is abandoned and the rest is
        fetched with ranged GETs in parallel, written at their offsets.
        """
        try:
            response = self._client.get_object(Bucket=self.bucket, Key=key, **self._sse)
        except (ClientError, BotoCoreError) as exc:
            raise self._error("GET", key, exc) from exc
        size = int(response["ContentLength"])
        body = response["Body"]
        part = self.settings.part_size
        started = time.monotonic()
        written = self._copy(key, body, out, min(size, part))
        if written < size:
            rate = written / max(time.monotonic() - started, 1e-9)
            if rate >= self.fast_stream:
                written += self._copy(key, body, out, size - written)
            else:
                body.close()  # drops the connection; the parts are faster
                out.flush()
                written += self._fetch_parts(key, out.fileno(), written, size)
        if written != size:
            raise ObjectStoreError(
                "GET", self.url(key), f"got {written} of {size} bytes"
            )
        return size

    def _copy(self, key: str, body, out: BinaryIO, limit: int) -> int:
        """Copy up to *limit* bytes of *body* into *out*; return how many.

        ``readinto`` one reused buffer: no new bytes object per chunk.
        """
        buffer = memoryview(bytearray(min(_DOWNLOAD_CHUNK, max(limit, 1))))
        copied = 0
        try:
            while copied < limit:
                n = body.readinto(buffer[: min(len(buffer), limit - copied)])
                if not n:
                    break
                out.write(buffer[:n])
                copied += n
        except BotoCoreError as exc:
            raise self._error("GET", key, exc) from exc
        return copied

    def _fetch_parts(self, key: str, fd: int, start: int, size: int) -> int:
        """Fetch bytes start..size-1 in ranged GETs of part_size, in parallel."""
        part = self.settings.part_size
        futures = [
            self._parts.submit(
                self._fetch_range, key, fd, offset, min(offset + part, size)
            )
            for offset in range(start, size, part)
        ]
        return sum(future.result() for future in futures)

    def _fetch_range(self, key: str, fd: int, start: int, end: int) -> int:
        """GET bytes start..end-1 and write them at their offset."""
        try:
            response = self._client.get_object(
                Bucket=self.bucket,
                Key=key,
                Range=f"bytes={start}-{end - 1}",
                **self._sse,
            )
            offset = start
            for chunk in response["Body"].iter_chunks(_DOWNLOAD_CHUNK):
                os.pwrite(fd, chunk, offset)
                offset += len(chunk)
        except (ClientError, BotoCoreError) as exc:
            raise self._error("GET", key, exc) from exc
        return offset - start

    def size(self, key: str) -> int | None:
        """The object's size in bytes, or None when it does not exist (HEAD)."""
        try:
            response = self._client.head_object(
                Bucket=self.bucket, Key=key, **self._sse
            )
        except (ClientError, BotoCoreError) as exc:
            error = self._error("HEAD", key, exc)
            if isinstance(error, ObjectNotFound):
                return None
            raise error from exc
        return int(response["ContentLength"])

    def list(self, prefix: str) -> Iterator[tuple[str, int]]:
        """Yield ``(key, size)`` of every object under *prefix*."""
        paginator = self._client.get_paginator("list_objects_v2")
        try:
            for page in paginator.paginate(Bucket=self.bucket, Prefix=prefix):
                for item in page.get("Contents", ()):
                    yield item["Key"], int(item["Size"])
        except (ClientError, BotoCoreError) as exc:
            raise self._error("LIST", prefix, exc) from exc

    def delete(self, keys: Iterable[str]) -> int:
        """Delete *keys* with DeleteObjects, 1000 a request; return the count.

        Deleting a key that does not exist succeeds, as in S3 itself.
        """
        keys = list(keys)
        for start in range(0, len(keys), DELETE_BATCH):
            batch = keys[start : start + DELETE_BATCH]
            try:
                response = self._client.delete_objects(
                    Bucket=self.bucket,
                    Delete={"Objects": [{"Key": k} for k in batch], "Quiet": True},
                )
            except (ClientError, BotoCoreError) as exc:
                raise self._error("DELETE", batch[0], exc) from exc
            errors = response.get("Errors") or ()
            if errors:
                first = errors[0]
                raise ObjectStoreError(
                    "DELETE",
                    self.url(first.get("Key", batch[0])),
                    f"{first.get('Code')} {first.get('Message', '')}".strip()
                    + f" ({len(errors)} of {len(batch)} keys not deleted)",
                )
        return len(keys)

    def close(self) -> None:
        self._parts.shutdown()
        self._transfers.shutdown()
        self._client.close()
