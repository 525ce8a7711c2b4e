"""The S3 side: long-lived, thread-safe boto3 clients and a transfer manager.

This is the only module that imports boto3. It knows object keys and files,
nothing of ZODB transactions, and turns every botocore failure into an
:class:`~zodb_s3blobs.errors.ObjectStoreError` naming the operation, the
``s3://bucket/key`` and the cause, marked transient or not.

Two clients: one for uploads, copies, deletes and listings (patient: long
timeouts, many attempts, botocore retrying transient failures -- 5xx,
throttling, resets -- with backoff), one for downloads (short timeouts),
which serve web requests. A download that fails transiently, whose body
breaks off, or whose bytes do not match the CRC32 recorded at upload is
started again with jittered exponential backoff as long as
``download_deadline`` leaves time for one more attempt to run out its connect
and read timeouts, so a server that stops answering fails the download
within the deadline (see :meth:`ObjectStore.download` for the exact bound).
"""

from __future__ import annotations

import contextlib
import errno
import functools
import logging
import os
import random
import re
import threading
import time
import zlib
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from io import RawIOBase
from typing import BinaryIO, NamedTuple, TypeVar
from urllib.parse import quote

import boto3
import botocore.session
from boto3.s3.transfer import TransferConfig, create_transfer_manager
from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    HTTPClientError,
    SSLError,
)
from botocore.exceptions import (
    ConnectionError as BotoConnectionError,
)
from botocore.handlers import add_expect_header
from s3transfer.subscribers import BaseSubscriber

from .conditional import WriteGuard, conflicted, refused_as_existing
from .crc32combine import crc32_combine
from .errors import (
    ChecksumMismatch,
    DeleteRefused,
    ObjectNotFound,
    ObjectStoreError,
    S3BlobStorageError,
)
from .keys import KeyLayout
from .metrics import Metrics
from .redact import PresignedURL, protect
from .s3metrics import failure_cause, instrument
from .settings import (
    MAX_PUT_SIZE,
    MiB,
    S3Settings,
    canonical_sse_customer_key,
    decode_sse_customer_key,
    is_plain_http,
)

log = logging.getLogger(__name__)
T = TypeVar("T")

#: How many uploads :meth:`ObjectStore.upload_soon` lets wait at most.
SPARE_QUEUE = 200
#: S3 accepts at most this many keys in one DeleteObjects request.
DELETE_BATCH = 1000
#: Object metadata holding the CRC32 of the blob, recorded at upload
#: (``x-amz-meta-zodb-crc32``; plain metadata works on every provider).
CHECKSUM_METADATA = "zodb-crc32"
#: A first part arriving at least this fast (bytes a second) is streamed to the
#: end: one connection is not the bottleneck, so parallel ranges would only add
#: requests. A single S3 connection over the internet gives well below this.
FAST_STREAM = 256 * MiB
_DOWNLOAD_CHUNK = 1 << 20
#: HeadBucket attempts when the storage opens: enough to ride over one
#: dropped connection, few enough not to hold up a restart.
_CHECK_ATTEMPTS = 2
#: Download retries wait a random time up to 0.1 s, 0.2 s, 0.4 s ... capped
#: here: S3 asks clients it throttles to back off, and a web request waits.
_MAX_BACKOFF = 2.0
_FIRST_BACKOFF = 0.1
#: The longest a presigned URL may live, in seconds: SigV4 signs for 7 days.
MAX_PRESIGNED_EXPIRY = 7 * 24 * 3600
#: Characters no header value or file name should hold: C0 and C1 controls.
_CONTROL_CHARACTERS = re.compile("[\x00-\x1f\x7f-\x9f]")
_NOT_FOUND = {"404", "NoSuchKey", "NotFound", "NoSuchBucket"}
_TRANSIENT_CODES = {
    "SlowDown",
    "Throttling",
    "ThrottlingException",
    "RequestTimeout",
    "RequestTimeTooSkewed",
    "InternalError",
    "ServiceUnavailable",
}

__all__ = ["ListedObject", "ObjectStore", "S3Settings"]


def file_crc32(path: str) -> str:
    """The CRC32 of a file as 8 hex digits (zlib releases the GIL)."""
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(_DOWNLOAD_CHUNK):
            crc = zlib.crc32(chunk, crc)
    return f"{crc:08x}"


def _pwrite_all(fd: int, data: bytes, offset: int) -> None:
    """Write all of *data* at *offset*: ``pwrite`` may write less (a full
    disk, a quota, a network file system), and the range's CRC32 covers
    every byte of *data*, so a short write must not leave a hole it vouches
    for."""
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, offset)
        if not written:
            raise OSError(errno.EIO, "pwrite wrote nothing")
        view, offset = view[written:], offset + written


def written_crc32(out: BinaryIO) -> int:
    """The CRC32 of what *out* holds: read again by its name, or, for a file
    opened from a descriptor (no name), through that descriptor with
    ``pread``, which changes neither its position nor its life (it must be
    open for reading too)."""
    out.flush()
    if isinstance(out.name, str):
        return int(file_crc32(out.name), 16)
    crc, offset = 0, 0
    while chunk := os.pread(out.fileno(), _DOWNLOAD_CHUNK, offset):
        crc = zlib.crc32(chunk, crc)
        offset += len(chunk)
    return crc


#: Seconds between the looks at a key whose conditional write met another
#: write of it in progress (409 ConditionalRequestConflict).
_CONFLICT_PAUSES = (0.5, 1.0, 2.0, 0.0)


def _file_info(path: str, crc: str | None) -> ObjectInfo:
    """What uploading the file at *path*, of CRC32 *crc*, writes."""
    return ObjectInfo(os.path.getsize(path), crc)


def raise_first(failures: list[BaseException], attempted: int) -> None:
    """Raise the first of *failures* (out of *attempted* transfers), saying how
    many failed; return if there are none."""
    if not failures:
        return
    first = failures[0]
    if len(failures) == 1:
        raise first
    count = f"({len(failures)} of {attempted} transfers failed)"
    if isinstance(first, ObjectStoreError):
        raise ObjectStoreError(
            first.operation, first.key, f"{first.cause} {count}"
        ) from first
    raise S3BlobStorageError(f"{first} {count}") from first


def _http_status(exc: Exception) -> int:
    """The HTTP status of a botocore ClientError; 0 for any other failure."""
    if isinstance(exc, ClientError):
        return exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
    return 0


def _backoff(attempt: int) -> float:
    """Seconds to wait before retry *attempt* + 1: exponential with full
    jitter, capped at :data:`_MAX_BACKOFF` (a web request is waiting)."""
    return random.uniform(0, min(_MAX_BACKOFF, _FIRST_BACKOFF * 2 ** (attempt - 1)))


def content_disposition(filename: str | None) -> str:
    """An ``attachment`` Content-Disposition (RFC 6266) naming *filename*,
    if any: the exact name in ``filename*`` (UTF-8, percent-encoded, RFC
    8187), and for older clients a quoted ASCII ``filename`` in which
    anything but printable ASCII, and quotes and backslashes (which would end
    or break the quoting), is ``_``. Control characters, CR and LF among
    them, are ``_`` in both: no file name holds them on purpose."""
    if not filename:
        return "attachment"
    name = _CONTROL_CHARACTERS.sub("_", filename)
    plain = "".join(c if " " <= c <= "~" and c not in '"\\' else "_" for c in name)
    return f"attachment; filename=\"{plain}\"; filename*=UTF-8''{quote(name, safe='')}"


def check_presign_arguments(expires: int, content_type: str | None) -> None:
    """Raise ValueError, naming the argument and what it may be, unless
    *expires* is a whole number of seconds SigV4 signs for and
    *content_type* a header value."""
    if (
        isinstance(expires, bool)
        or not isinstance(expires, int)
        or not 0 < expires <= MAX_PRESIGNED_EXPIRY
    ):
        raise ValueError(
            f"presigned_url: expires is {expires!r}: it must be a whole number "
            f"of seconds from 1 to {MAX_PRESIGNED_EXPIRY} (7 days, the longest "
            "a signature (SigV4) is valid)"
        )
    if content_type is not None and _CONTROL_CHARACTERS.search(content_type):
        raise ValueError(
            f"presigned_url: content_type {content_type!r} holds control "
            "characters: give a media type such as application/pdf"
        )


def _renders_as_page(content_type: str | None) -> bool:
    """Whether a browser shown *content_type* inline would render a page
    (HTML, SVG, XML; scripts) with the bucket's origin."""
    media = (content_type or "").split(";")[0].strip().lower()
    return any(word in media for word in ("html", "xml", "script"))


def _protect_found_credentials(core: botocore.session.Session) -> None:
    """Mask in every log record the credentials botocore finds itself (the
    environment, ~/.aws, a role), as those of ``s3-access-key`` are: botocore
    logs the session token among the headers at DEBUG. The session keeps
    what it found, so the client made from it resolves nothing again."""
    credentials = core.get_credentials()
    if credentials is not None:
        found = credentials.get_frozen_credentials()
        protect(found.access_key, found.secret_key, found.token)


class ListedObject(NamedTuple):
    """One object of a listing: its key, size and LastModified (seconds since
    the epoch, by the S3 server's clock)."""

    key: str
    size: int
    last_modified: float


class ObjectInfo(NamedTuple):
    """What a HEAD tells of an object: its size, the CRC32 (8 hex digits)
    recorded at upload, None for objects written without one (1.x), and its
    ETag."""

    size: int
    checksum: str | None
    etag: str | None = None


class Copy(NamedTuple):
    """A server-side copy of *source* to *key*. With *checksum* the copy
    records that CRC32 rather than keep the source's metadata; with *source*
    known (*source_info*, from a HEAD made earlier) no HEAD is sent first.
    The source is in this store's bucket unless *source_bucket* names
    another (a parent site's), and is its current version unless
    *source_version* names one (undelete)."""

    source: str
    key: str
    checksum: str | None = None
    source_info: ObjectInfo | None = None
    source_bucket: str | None = None
    source_version: str | None = None


class _Running:
    """The transfers running now, for cancelling them all at once."""

    def __init__(self) -> None:
        self._transfers: set = set()
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def holding(self, transfer) -> Iterator[None]:
        with self._lock:
            self._transfers.add(transfer)
        try:
            yield
        finally:
            with self._lock:
                self._transfers.discard(transfer)

    def cancel(self) -> None:
        with self._lock:
            for transfer in self._transfers:
                transfer.cancel()


class _KnownSource(BaseSubscriber):
    """Tells s3transfer the size and ETag of a copy's source, which it would
    otherwise learn with a HEAD before copying."""

    def __init__(self, info: ObjectInfo) -> None:
        self._info = info

    def on_queued(self, future, **kwargs) -> None:
        future.meta.provide_transfer_size(self._info.size)
        future.meta.provide_object_etag(self._info.etag)


class ObjectStore:
    """Put, get, copy, list and delete objects of one bucket."""

    def __init__(self, settings: S3Settings, metrics: Metrics | None = None) -> None:
        self.settings = settings
        #: What the requests did (counted by botocore event hooks).
        self.metrics = metrics if metrics is not None else Metrics()
        self.bucket = settings.bucket
        customer_key = (
            decode_sse_customer_key(settings.sse_customer_key)
            if settings.sse_customer_key
            else None
        )
        # botocore sends (and logs at DEBUG) the canonical base64 of the key,
        # whatever form it was configured in: mask that form too.
        protect(
            settings.access_key,
            settings.secret_key,
            settings.sse_customer_key,
            settings.sse_customer_key
            and canonical_sse_customer_key(settings.sse_customer_key),
            customer_key,
        )
        self._client = self._make_client(
            settings.connect_timeout, settings.read_timeout, settings.max_attempts
        )
        # One try per request: download() retries itself (with backoff), so
        # that a read fails within download_max_attempts x the timeouts.
        self._reader = self._make_client(
            settings.download_connect_timeout, settings.download_read_timeout, 1
        )
        instrument(self.metrics, self._client, self._reader)
        self._check_transport()
        #: ``If-None-Match: *`` on writes to revisions' keys (conditional.py).
        self.guard = WriteGuard(
            self._client,
            self.bucket,
            KeyLayout(settings.prefix),
            settings.conditional_writes,
        )
        # Two transfer managers with their own queues: transfers made at vote,
        # perhaps under a base's commit lock, never wait behind the parts of
        # uploads started in the background for other transactions.
        self._transfers = self._transfer_manager(settings.max_concurrency)
        self._background_transfers = self._transfer_manager(settings.max_concurrency)
        self.fast_stream = FAST_STREAM
        self._pool = ThreadPoolExecutor(
            settings.max_concurrency, thread_name_prefix="zodb-s3blobs"
        )
        # Work a transaction holding a commit lock waits for (checksums at
        # vote, restores on a base locked since tpc_begin) never queues behind
        # ranged GETs (_pool) or background uploads (_background).
        self._urgent = ThreadPoolExecutor(
            settings.max_concurrency, thread_name_prefix="zodb-s3blobs-vote"
        )
        self._background = ThreadPoolExecutor(
            settings.max_concurrency, thread_name_prefix="zodb-s3blobs-upload"
        )
        # Uploads nobody waits for (revisions read from a fallback): two at a
        # time, queue bounded, on a transfer queue of their own, so that a
        # backlog of them never delays a commit or a close.
        self._spare = ThreadPoolExecutor(2, thread_name_prefix="zodb-s3blobs-spare")
        self._spare_transfers = self._transfer_manager(2)
        self._spare_queued = threading.BoundedSemaphore(SPARE_QUEUE)
        self._spare_running = _Running()  # their transfers, cancelled at close
        self._closing = threading.Event()
        self._get_args: dict[str, object] = {}
        self._put_args: dict[str, object] = {}
        self._copy_args: dict[str, object] = {}
        if customer_key:
            sse_c = {"SSECustomerAlgorithm": "AES256", "SSECustomerKey": customer_key}
            self._get_args = self._put_args = sse_c
            self._copy_args = {
                **sse_c,
                "CopySourceSSECustomerAlgorithm": "AES256",
                "CopySourceSSECustomerKey": customer_key,
            }
        elif settings.sse:
            self._put_args = {"ServerSideEncryption": settings.sse}
            if settings.sse_kms_key_id:
                self._put_args["SSEKMSKeyId"] = settings.sse_kms_key_id
            self._copy_args = self._put_args

    def _transfer_manager(self, concurrency: int):
        settings = self.settings
        return create_transfer_manager(
            self._client,
            TransferConfig(
                max_concurrency=concurrency,
                multipart_threshold=(
                    settings.multipart_threshold if settings.multipart else MAX_PUT_SIZE
                ),
                multipart_chunksize=settings.part_size,
                preferred_transfer_client="classic",
            ),
        )

    def _check_transport(self) -> None:
        """Refuse an endpoint in plain HTTP when TLS is required, judged by the
        URL the clients actually use: botocore may take it from
        AWS_ENDPOINT_URL_S3, AWS_ENDPOINT_URL or the AWS config file rather
        than ``s3-endpoint-url``, and follows its scheme whatever ``use_ssl``
        says. Runs before any request, so an SSE-C key never leaves in clear."""
        settings = self.settings
        for client in (self._client, self._reader):
            endpoint = client.meta.endpoint_url
            if not is_plain_http(endpoint):
                continue
            if settings.sse_customer_key:
                raise S3BlobStorageError(
                    f"s3-sse-customer-key requires TLS, but the S3 endpoint in use "
                    f"is {endpoint} (plain HTTP; from s3-endpoint-url, "
                    "AWS_ENDPOINT_URL_S3, AWS_ENDPOINT_URL or the AWS config): "
                    "S3 refuses SSE-C keys sent over plain HTTP"
                )
            if settings.use_ssl:
                raise S3BlobStorageError(
                    f"s3-use-ssl is true, but the S3 endpoint in use is {endpoint} "
                    "(plain HTTP; from AWS_ENDPOINT_URL_S3, AWS_ENDPOINT_URL or "
                    "the AWS config): give an https:// endpoint, or set "
                    "s3-use-ssl false to talk plain HTTP"
                )

    def _make_client(self, connect_timeout: float, read_timeout: float, attempts: int):
        """A boto3 S3 client with these timeouts and attempts.

        TLS is always verified: against ``s3-ca-bundle`` if set, else against
        what botocore itself would use (``AWS_CA_BUNDLE``, ``ca_bundle`` in the
        AWS config), else certifi's CAs. botocore ignores those sources when
        given ``verify=True`` explicitly, and an empty one would turn
        verification off, hence the resolution here.
        """
        settings = self.settings
        config = Config(
            connect_timeout=connect_timeout,
            read_timeout=read_timeout,
            # total_max_attempts counts the first try; max_attempts would not.
            retries={"total_max_attempts": attempts, "mode": "standard"},
            max_pool_connections=max(10, 2 * settings.max_concurrency),
            s3={"addressing_style": settings.addressing_style},
            # Ceph-based providers reject the CRC headers newer botocore sends by
            # default; compute and validate checksums only where S3 requires it
            # (this package records and checks its own, see CHECKSUM_METADATA).
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
        )
        core = botocore.session.get_session()
        verify = settings.ca_bundle or core.get_config_variable("ca_bundle") or True
        if not settings.access_key:
            _protect_found_credentials(core)
        client = boto3.session.Session(botocore_session=core).client(
            "s3",
            endpoint_url=settings.endpoint_url,
            region_name=settings.region,
            aws_access_key_id=settings.access_key,
            aws_secret_access_key=settings.secret_key,
            use_ssl=settings.use_ssl,
            verify=verify,
            config=config,
        )
        # botocore sends "Expect: 100-continue" with every file-like body and
        # waits for the answer: a round trip per upload that buys nothing here.
        client.meta.events.unregister("before-call.s3", add_expect_header)
        return client

    def __repr__(self) -> str:
        return f"<ObjectStore s3://{self.bucket}>"

    @property
    def clients(self) -> tuple:
        """The boto3 clients (writer, reader), for instrumentation: event hooks
        in the tests and the benchmark."""
        return self._client, self._reader

    def url(self, key: str) -> str:
        return f"s3://{self.bucket}/{key}"

    def _error(self, operation: str, key: str, exc: Exception) -> ObjectStoreError:
        if isinstance(exc, ClientError):
            error = exc.response.get("Error", {})
            status = _http_status(exc)
            code = str(error.get("Code", status or "Unknown"))
            message = error.get("Message") or ""
            if code in _NOT_FOUND:
                return ObjectNotFound(operation, self.url(key), f"{code} {message}")
            transient = status >= 500 or code in _TRANSIENT_CODES
            return ObjectStoreError(
                operation, self.url(key), f"{code} {message}".strip(), transient
            )
        # Connection failures, timeouts and broken bodies: worth another try.
        return ObjectStoreError(
            operation, self.url(key), f"{type(exc).__name__}: {exc}", True
        )

    # -- the bucket ------------------------------------------------------

    def check_bucket(self) -> None:
        """Reach the bucket (HeadBucket) and raise a clear error if it fails.

        ``transient=False`` only for what is definitely the configuration
        (no such bucket, credentials or permissions refused, another region
        or endpoint, an untrusted certificate), naming the keys to check;
        ``transient=True``, naming the endpoint, for what may pass (connection
        refused, timeouts, 5xx, throttling), so that a storage opening during
        a short S3 outage can tell the two apart. It runs when a site starts,
        so it uses the download client's short timeouts and at most
        :data:`_CHECK_ATTEMPTS` attempts, the second only if it could end
        within ``download_deadline``.
        """
        settings = self.settings
        stall = settings.download_connect_timeout + settings.download_read_timeout
        deadline = time.monotonic() + settings.download_deadline
        attempt = 1
        while True:
            try:
                self._reader.head_bucket(Bucket=self.bucket)
                return
            except (ClientError, BotoCoreError) as exc:
                error = self._bucket_error(exc)
                pause = _backoff(attempt)
                if (
                    not error.transient
                    or attempt >= _CHECK_ATTEMPTS
                    or time.monotonic() + pause + stall > deadline
                ):
                    raise error from exc
            time.sleep(pause)
            attempt += 1

    def _bucket_error(self, exc: Exception) -> ObjectStoreError:
        """The ObjectStoreError for a failed HeadBucket: final, saying what to
        check, or transient, naming the endpoint."""
        where = f"s3://{self.bucket}"
        endpoint = self._reader.meta.endpoint_url
        if isinstance(exc, ClientError):
            status = _http_status(exc)
            error = exc.response.get("Error", {})
            code = str(error.get("Code", status or "Unknown"))
            answer = f"{code} {error.get('Message') or ''}".strip()
            if status == 404 or code in _NOT_FOUND:
                cause = "the bucket does not exist (check bucket-name, s3-region)"
                return ObjectStoreError("HEAD bucket", where, cause)
            if status in (401, 403) and code not in _TRANSIENT_CODES:
                cause = (
                    "access denied: the credentials were refused or may not list "
                    "the bucket (check s3-access-key, s3-secret-key, the policy)"
                )
                return ObjectStoreError("HEAD bucket", where, cause)
            if status >= 500 or status in (408, 429) or code in _TRANSIENT_CODES:
                cause = f"{endpoint} answered {answer}"
                return ObjectStoreError("HEAD bucket", where, cause, True)
            # 301/307 (the bucket is elsewhere), 400 (a malformed authorization
            # header: usually the wrong region) and any other refusal.
            cause = (
                f"{endpoint} answered {answer}: check s3-region, "
                "s3-endpoint-url and s3-addressing-style"
            )
            return ObjectStoreError("HEAD bucket", where, cause)
        detail = f"{type(exc).__name__}: {exc}"
        if isinstance(exc, SSLError):
            cause = (
                f"TLS with {endpoint} failed ({detail}): check s3-ca-bundle and "
                "s3-endpoint-url"
            )
            return ObjectStoreError("HEAD bucket", where, cause)
        if isinstance(exc, (BotoConnectionError, HTTPClientError)):
            cause = f"cannot reach {endpoint} ({detail})"
            return ObjectStoreError("HEAD bucket", where, cause, True)
        # No credentials found, an invalid parameter: nothing a retry mends.
        return ObjectStoreError("HEAD bucket", where, detail)

    # -- writing ---------------------------------------------------------

    def transfer(
        self,
        uploads: Iterable[tuple[str, str]],
        copies: Iterable[Copy],
        replace: Iterable[str] = (),
    ) -> None:
        """Upload files ``(path, key)`` and make the server-side copies in
        parallel (at most ``max_concurrency`` requests at once), recording
        each upload's CRC32 in its metadata. Only the keys in *replace* may
        be written over (conditional writes).

        Waits for every transfer, then raises an ObjectStoreError naming the first
        failure and how many failed; nothing is left running on return.
        """
        with self.guard.replacing(replace):
            self._transfer(list(uploads), list(copies))

    def _transfer(self, uploads: list[tuple[str, str]], copies: list[Copy]) -> None:
        # Every checksum before the first upload: a file that cannot be read
        # fails the vote before anything is sent, not with uploads running.
        checksums = list(self._urgent.map(file_crc32, [path for path, _key in uploads]))
        futures: list[tuple[str, str, Future, Callable[[], ObjectInfo]]] = []
        for (path, key), crc in zip(uploads, checksums, strict=True):
            future = self._start_upload(self._transfers, path, key, crc)
            meant = functools.partial(_file_info, path, crc)
            futures.append(("upload", key, future, meant))
        for copy in copies:
            args = dict(self._copy_args)
            if copy.checksum is not None:
                args["Metadata"] = {CHECKSUM_METADATA: copy.checksum}
                args["MetadataDirective"] = "REPLACE"
            future = self._transfers.copy(
                self._copy_source(copy),
                self.bucket,
                copy.key,
                extra_args=args,
                subscribers=[_KnownSource(copy.source_info)]
                if copy.source_info
                else None,
            )
            meant = functools.partial(self._copied_info, copy)
            futures.append(("copy", copy.key, future, meant))
        failures = []
        for operation, key, future, meant in futures:
            try:
                future.result()
            except Exception as exc:
                # Whatever a transfer raised, the others are waited for: a
                # vote that failed while uploads still ran would have its
                # abort delete keys that those uploads then write again.
                failure = self._refusal(operation, key, exc, meant)
                if failure is not None:
                    failures.append(failure)
        raise_first(failures, len(futures))

    def _copy_source(self, copy: Copy) -> dict[str, str]:
        """The CopySource of *copy*: bucket, key and perhaps version id."""
        source = {"Bucket": copy.source_bucket or self.bucket, "Key": copy.source}
        if copy.source_version is not None:
            source["VersionId"] = copy.source_version
        return source

    def _copied_info(self, copy: Copy) -> ObjectInfo:
        """What *copy* writes: its source's size, and the CRC32 it records."""
        source = copy.source_info or self._head(self._copy_source(copy))
        if source is None:
            return ObjectInfo(-1, None)
        return ObjectInfo(source.size, copy.checksum or source.checksum)

    def _refusal(
        self, operation: str, key: str, exc: Exception, meant: Callable[[], ObjectInfo]
    ) -> ObjectStoreError | None:
        """The error for a failed write of *key*; None when S3 refused it only
        because the key exists (conditional writes) and holds what *meant*
        says was written: this write's own earlier attempt, whose answer was
        lost and which botocore sent again."""
        if not (refused_as_existing(exc) or conflicted(exc)):
            return self._error(operation, key, exc)
        try:
            wanted = meant()
            for pause in _CONFLICT_PAUSES:
                found = self.stat(key)
                if found is not None or not conflicted(exc):
                    break
                # The write it met (its own first attempt?) may still land.
                time.sleep(pause)
        except ObjectStoreError as error:
            return error
        if (
            found is not None
            and wanted.checksum is not None
            and (found.size, found.checksum) == (wanted.size, wanted.checksum)
        ):
            return None
        held = (
            "nothing (deleted since)"
            if found is None
            else f"{found.size} bytes, CRC32 {found.checksum or 'unknown'}"
        )
        return ObjectStoreError(
            operation,
            self.url(key),
            f"refused: the key exists already, holding {held}, not the "
            f"{wanted.size} bytes, CRC32 {wanted.checksum or 'unknown'} written "
            "(s3-conditional-writes: an earlier write of this key, such as a "
            "late one of an aborted transaction, landed first; nothing was "
            "overwritten)",
        )

    def _start_upload(self, manager, path: str, key: str, crc: str):
        args = {**self._put_args, "Metadata": {CHECKSUM_METADATA: crc}}
        return manager.upload(path, self.bucket, key, extra_args=args)

    def submit(self, job: Callable[..., T], *args, urgent: bool = False) -> Future[T]:
        """Run ``job(*args)`` in the background, at most ``max_concurrency``
        jobs at once; they are waited for when the store closes. An *urgent*
        job (one a commit lock waits for) queues apart from the others."""
        return (self._urgent if urgent else self._background).submit(job, *args)

    def upload_soon(
        self, key: str, prepare: Callable[[], tuple[str, str] | None]
    ) -> bool:
        """Upload to *key* in the background, if fewer than
        :data:`SPARE_QUEUE` such uploads wait; a failure is logged. There,
        *prepare*() gives the path of a private file and its CRC32, proven
        equal to what is to be uploaded (or None: nothing to upload); the file
        is removed afterwards. Returns whether the upload was queued. Uploads
        still queued when the store closes are dropped."""
        if not self._spare_queued.acquire(blocking=False):
            return False

        def upload() -> None:
            prepared = None
            try:
                prepared = None if self._closing.is_set() else prepare()
                # A close that began while this prepared drops it too.
                if prepared is not None and not self._closing.is_set():
                    path, crc = prepared
                    self._upload(
                        self._spare_transfers, path, key, self._spare_running, crc
                    )
            except ObjectStoreError as exc:
                log.warning("Could not upload: %s", exc)
            except Exception:
                log.exception("Could not upload %s", self.url(key))
            finally:
                self._spare_queued.release()
                if prepared is not None:
                    with contextlib.suppress(OSError):
                        os.remove(prepared[0])

        try:
            self._spare.submit(upload)
        except RuntimeError:  # closing
            self._spare_queued.release()
            return False
        return True

    def upload(
        self,
        path: str,
        key: str,
        urgent: bool = False,
        replace: bool = False,
        crc: str | None = None,
    ) -> str:
        """Upload the file at *path* to *key*, recording its CRC32 (*crc*, if
        the caller measured it); return the CRC32. Blocks: meant for
        :meth:`submit`'s jobs, whose transfers queue apart from those of
        :meth:`transfer` unless *urgent*. Only with *replace* may it overwrite
        an object under ``blobs/`` (conditional writes)."""
        manager = self._transfers if urgent else self._background_transfers
        with self.guard.replacing([key] if replace else []):
            return self._upload(manager, path, key, crc=crc)

    def _upload(
        self,
        manager,
        path: str,
        key: str,
        running: _Running | None = None,
        crc: str | None = None,
    ) -> str:
        """Upload through *manager* and wait; return the CRC32 recorded (*crc*,
        if the caller has measured it). The transfer is in *running*
        meanwhile, if given."""
        try:
            crc = crc or file_crc32(path)
            transfer = self._start_upload(manager, path, key, crc)
            with running.holding(transfer) if running else contextlib.nullcontext():
                transfer.result()
        except Exception as exc:
            failure = self._refusal(
                "upload", key, exc, functools.partial(_file_info, path, crc)
            )
            if failure is not None:
                raise failure from exc
        return crc

    def delete(self, keys: Iterable[str], quick: bool = False) -> int:
        """Delete *keys* with DeleteObjects, 1000 a request; return the count.

        Deleting a key that does not exist succeeds, as in S3 itself. *quick*
        tries each request once, with the download timeouts (an abort holding
        a commit lock must not wait for minutes).
        """
        keys = list(keys)
        client = self._reader if quick else self._client
        for start in range(0, len(keys), DELETE_BATCH):
            batch = keys[start : start + DELETE_BATCH]
            try:
                response = client.delete_objects(
                    Bucket=self.bucket,
                    Delete={"Objects": [{"Key": k} for k in batch], "Quiet": True},
                )
            except (ClientError, BotoCoreError) as exc:
                raise self._error("DELETE", batch[0], exc) from exc
            errors = response.get("Errors") or ()
            if errors:
                first = errors[0]
                refused = [error.get("Key") for error in errors]
                raise DeleteRefused(
                    self.url(first.get("Key", batch[0])),
                    f"{first.get('Code')} {first.get('Message', '')}".strip()
                    + f" ({len(errors)} of {len(batch)} keys not deleted)",
                    refused + keys[start + DELETE_BATCH :],
                )
        return len(keys)

    # -- reading ---------------------------------------------------------

    def download(self, key: str, out: BinaryIO) -> int:
        """Write the object into *out* (a file opened for writing); return its size.

        Transient failures (throttling, 5xx, a reset connection, a body cut
        off, a checksum mismatch, a timeout) start the download again after a
        jittered backoff, but only while the attempt, started after the
        backoff, could run out its connect and read timeouts before
        ``download_deadline`` (counted from this call) has passed; and at most
        ``download_max_attempts`` times in all, if that is set. A missing
        object, or any other failure that is not transient, fails at once.

        The bound that holds: an attempt gets no answer, or no byte of its
        body, for ``download_read_timeout`` and is abandoned; so a server that
        stops answering fails the download within the deadline (plus name
        resolution). A body that keeps arriving, however slowly, is not cut
        off: the download then ends at most one read timeout after its last
        byte, and starts no new attempt after the deadline. A checksum
        mismatch is tried once more only: twice means the stored bytes are bad.
        """
        settings = self.settings
        limit = settings.download_max_attempts
        # The longest an attempt takes to fail when nothing arrives at all.
        stall = settings.download_connect_timeout + settings.download_read_timeout
        started = time.monotonic()
        deadline = started + settings.download_deadline
        attempt, mismatches = 1, 0
        while True:
            out.seek(0)
            out.truncate()
            try:
                return self._download_once(key, out)
            except ObjectStoreError as exc:
                if not exc.transient:
                    raise
                pause = _backoff(attempt)
                now = time.monotonic()
                mismatches += isinstance(exc, ChecksumMismatch)
                if (
                    (limit is not None and attempt >= limit)
                    or now + pause + stall > deadline
                    or mismatches > 1
                ):
                    # A mismatch stays one: the caller can tell bad bytes.
                    raise type(exc)(
                        exc.operation,
                        exc.key,
                        f"{exc.cause} (gave up after {attempt} "
                        f"attempt{'s' if attempt > 1 else ''} in "
                        f"{now - started:.1f}s; s3-download-deadline "
                        f"{settings.download_deadline:g}s"
                        + (f", s3-download-max-attempts {limit})" if limit else ")"),
                        exc.transient,
                    ) from exc
                mismatch = isinstance(exc, ChecksumMismatch)
                self.metrics.retried(
                    "checksum_mismatch" if mismatch else failure_cause(exc)
                )
                log.warning("Retrying (attempt %d): %s", attempt + 1, exc)
                time.sleep(pause)
                attempt += 1

    def _download_once(self, key: str, out: BinaryIO) -> int:
        """One GET streamed into *out*. If the object is larger than
        ``part_size`` and its first part arrived slower than :data:`FAST_STREAM`
        bytes a second (one connection is the bottleneck, as with S3 over a
        WAN), the stream is abandoned and the rest fetched in parallel ranges.
        The bytes are checked against the CRC32 recorded at upload, if any,
        computed as they stream (the ranges' combined): the file is not read
        again."""
        try:
            response = self._reader.get_object(
                Bucket=self.bucket, Key=key, **self._get_args
            )
        except (ClientError, BotoCoreError) as exc:
            raise self._error("GET", key, exc) from exc
        size = int(response["ContentLength"])
        expected = (response.get("Metadata") or {}).get(CHECKSUM_METADATA)
        body = response["Body"]
        part = self.settings.part_size
        try:
            started = time.monotonic()
            written, crc = self._copy(key, body, out, min(size, part), 0)
            if written < size:
                rate = written / max(time.monotonic() - started, 1e-9)
                if rate >= self.fast_stream:
                    more, crc = self._copy(key, body, out, size - written, crc)
                    written += more
                else:
                    body.close()  # drops the connection; the parts are faster
                    out.flush()
                    more, crc = self._fetch_parts(key, out, written, size, crc)
                    written += more
        finally:
            body.close()
        if written != size:
            short = ObjectStoreError(
                "GET", self.url(key), f"got {written} of {size} bytes", True
            )
            self.metrics.failed(failure_cause(short))  # answered: not the hook's
            raise short
        if expected is not None and f"{crc:08x}" != expected.lower():
            self.metrics.failed("checksum_mismatch")
            raise ChecksumMismatch(
                "GET",
                self.url(key),
                f"checksum mismatch: CRC32 {crc:08x}, recorded {expected}",
                True,
            )
        return size

    def _copy(
        self, key: str, body, out: BinaryIO, limit: int, crc: int
    ) -> tuple[int, int]:
        """Copy up to *limit* bytes of *body* into *out*, through one reused
        buffer; return how many, and the CRC32 continued over them."""
        buffer = memoryview(bytearray(min(_DOWNLOAD_CHUNK, max(limit, 1))))
        copied = 0
        try:
            while copied < limit:
                n = body.readinto(buffer[: min(len(buffer), limit - copied)])
                if not n:
                    break
                out.write(buffer[:n])
                crc = zlib.crc32(buffer[:n], crc)
                copied += n
        except BotoCoreError as exc:
            # A body that broke off or stalled: the hook counted the GET as
            # answered when its headers came, so its failure is counted here.
            self.metrics.failed(failure_cause(exc))
            raise self._error("GET", key, exc) from exc
        return copied, crc

    def _fetch_parts(
        self, key: str, out: BinaryIO, start: int, size: int, crc: int
    ) -> tuple[int, int]:
        """Fetch bytes start..size-1 of *key* into *out* in ranged GETs of
        part_size, in parallel; return how many bytes were written, and *crc*
        (that of bytes 0..start-1) continued over them: each range computes
        its own while it streams, and they are combined in order, so the
        file is never read again for the check.

        No worker outlives this call: on the first failure the queued ranges
        are cancelled, the running ones told to stop (between chunks), and all
        of them awaited before the failure is raised. They write through a
        descriptor of their own, closed only after the last has ended, so the
        caller may close or truncate *out* as soon as this returns.
        """
        part = self.settings.part_size
        stop = threading.Event()
        with open(os.dup(out.fileno()), "wb", buffering=0) as target:
            futures = [
                self._pool.submit(
                    self._fetch_range,
                    key,
                    target,
                    offset,
                    min(offset + part, size),
                    stop,
                )
                for offset in range(start, size, part)
            ]
            try:
                done, _running = wait(futures, return_when=FIRST_EXCEPTION)
            finally:
                stop.set()
                for future in futures:
                    future.cancel()
                wait(futures)
        for future in done:
            if future.exception() is not None:
                raise future.exception()
        written = 0
        for future in futures:
            count, range_crc = future.result()
            crc = crc32_combine(crc, range_crc, count)
            written += count
        return written, crc

    def _fetch_range(
        self, key: str, target: RawIOBase, start: int, end: int, stop: threading.Event
    ) -> tuple[int, int]:
        """GET bytes start..end-1 and write them at their offset in *target*;
        return how many were written (fewer once *stop* is set) and their
        CRC32."""
        if stop.is_set():
            return 0, 0
        offset, crc = start, 0
        try:
            response = self._reader.get_object(
                Bucket=self.bucket,
                Key=key,
                Range=f"bytes={start}-{end - 1}",
                **self._get_args,
            )
            body = response["Body"]
            try:
                for chunk in body.iter_chunks(_DOWNLOAD_CHUNK):
                    if stop.is_set():
                        break
                    if offset + len(chunk) > end:
                        raise ObjectStoreError(
                            "GET",
                            self.url(key),
                            f"asked for bytes {start}-{end - 1}, got more: does "
                            "the endpoint ignore Range headers?",
                        )
                    _pwrite_all(target.fileno(), chunk, offset)
                    crc = zlib.crc32(chunk, crc)
                    offset += len(chunk)
            except BotoCoreError as exc:
                self.metrics.failed(failure_cause(exc))  # answered: not the hook's
                raise
            finally:
                body.close()
        except (ClientError, BotoCoreError) as exc:
            raise self._error("GET", key, exc) from exc
        return offset - start, crc

    def stat(self, key: str, quick: bool = False) -> ObjectInfo | None:
        """The object's size and recorded CRC32, or None when it does not exist
        (HEAD); *quick* tries once, with the download timeouts."""
        return self._head({"Bucket": self.bucket, "Key": key}, quick)

    def _head(self, source: dict[str, str], quick: bool = False) -> ObjectInfo | None:
        """:meth:`stat` of the object *source* names (bucket, key, version)."""
        client = self._reader if quick else self._client
        key = source["Key"]
        try:
            response = client.head_object(**source, **self._get_args)
        except (ClientError, BotoCoreError) as exc:
            error = self._error("HEAD", key, exc)
            if isinstance(error, ObjectNotFound):
                return None
            raise error from exc
        checksum = (response.get("Metadata") or {}).get(CHECKSUM_METADATA)
        return ObjectInfo(
            int(response["ContentLength"]),
            checksum.lower() if checksum else None,
            response.get("ETag"),
        )

    def put_object(self, key: str, body: BinaryIO) -> None:
        """Write *body* (a file at its start) to *key* in one PUT, which S3
        applies whole or not at all: for the package's own records."""
        try:
            self._client.put_object(
                Bucket=self.bucket, Key=key, Body=body, **self._put_args
            )
        except (ClientError, BotoCoreError) as exc:
            raise self._error("PUT", key, exc) from exc

    def list_uploads(self, prefix: str) -> Iterator[tuple[str, str, float]]:
        """Yield key, upload id and Initiated (seconds since the epoch) of
        every incomplete multipart upload under *prefix*."""
        paginator = self._client.get_paginator("list_multipart_uploads")
        try:
            for page in paginator.paginate(Bucket=self.bucket, Prefix=prefix):
                for item in page.get("Uploads", ()):
                    initiated = item["Initiated"].timestamp()
                    yield item["Key"], item["UploadId"], initiated
        except (ClientError, BotoCoreError) as exc:
            raise self._error("LIST uploads", prefix, exc) from exc

    def abort_upload(self, key: str, upload_id: str) -> None:
        """Abort an incomplete multipart upload, freeing its parts."""
        try:
            self._client.abort_multipart_upload(
                Bucket=self.bucket, Key=key, UploadId=upload_id
            )
        except (ClientError, BotoCoreError) as exc:
            code = getattr(exc, "response", {}).get("Error", {}).get("Code")
            if code != "NoSuchUpload":  # completed or aborted meanwhile
                raise self._error("ABORT upload", key, exc) from exc

    # -- versions (undelete) ------------------------------------------

    def versioning_if_readable(self) -> str | None:
        """:meth:`versioning`, or ``unknown`` where the credentials may not
        read it (AccessDenied is an answer, not an error)."""
        try:
            return self.versioning()
        except ObjectStoreError as exc:
            if isinstance(exc.__cause__, ClientError) and (
                _http_status(exc.__cause__) == 403
            ):
                return "unknown"
            raise

    def old_versions(self, key: str) -> list[str]:
        """The ids of *key*'s versions that hold bytes, newest first, as S3
        lists them (delete markers left out; LastModified, in seconds, may
        not tell two versions apart)."""
        paginator = self._client.get_paginator("list_object_versions")
        try:
            return [
                item["VersionId"]
                for page in paginator.paginate(Bucket=self.bucket, Prefix=key)
                for item in page.get("Versions", ())
                if item["Key"] == key
            ]
        except (ClientError, BotoCoreError) as exc:
            raise self._error("LIST versions", key, exc) from exc

    def version_checksum(self, key: str, version: str) -> tuple[str | None, str]:
        """The CRC32 recorded in the metadata of *key*'s *version* (None for
        objects written without one) and the CRC32 of its bytes, read in a
        stream (8 hex digits each)."""
        try:
            response = self._client.get_object(
                Bucket=self.bucket, Key=key, VersionId=version, **self._get_args
            )
            crc = 0
            for chunk in response["Body"].iter_chunks(_DOWNLOAD_CHUNK):
                crc = zlib.crc32(chunk, crc)
        except (ClientError, BotoCoreError) as exc:
            raise self._error("GET version", key, exc) from exc
        recorded = (response.get("Metadata") or {}).get(CHECKSUM_METADATA)
        return (recorded.lower() if recorded else None), f"{crc:08x}"

    def restore_version(self, key: str, version: str, checksum: str | None) -> None:
        """Make *key*'s *version* its current object again: a server-side
        copy (in parts above the multipart threshold, so beyond CopyObject's
        5 GB) recording *checksum*, or keeping the version's metadata when
        it recorded none."""
        self.transfer([], [Copy(key, key, checksum, source_version=version)])

    def list(self, prefix: str) -> Iterator[tuple[str, int]]:
        """Yield ``(key, size)`` of every object under *prefix*."""
        for item in self.list_objects(prefix):
            yield item.key, item.size

    def list_objects(self, prefix: str) -> Iterator[ListedObject]:
        """Yield key, size and LastModified of every object under *prefix*
        (one ListObjectsV2 page of up to 1000 at a time)."""
        paginator = self._client.get_paginator("list_objects_v2")
        try:
            for page in paginator.paginate(Bucket=self.bucket, Prefix=prefix):
                for item in page.get("Contents", ()):
                    yield ListedObject(
                        item["Key"],
                        int(item["Size"]),
                        item["LastModified"].timestamp(),
                    )
        except (ClientError, BotoCoreError) as exc:
            raise self._error("LIST", prefix, exc) from exc

    def presigned_url(
        self,
        key: str,
        expires: int,
        filename: str | None = None,
        content_type: str | None = None,
    ) -> PresignedURL:
        """A URL that GETs the object without credentials for *expires* seconds.

        Refused under SSE-C: whoever follows the URL would need the key.
        """
        check_presign_arguments(expires, content_type)
        if self._get_args:
            raise S3BlobStorageError(
                "presigned URLs cannot serve objects encrypted with "
                "s3-sse-customer-key: the reader would need the key"
            )
        params: dict[str, object] = {"Bucket": self.bucket, "Key": key}
        # A page shown inline would run with the bucket's origin: saved, never shown.
        if filename or _renders_as_page(content_type):
            params["ResponseContentDisposition"] = content_disposition(filename)
        if content_type:
            params["ResponseContentType"] = content_type
        url = self._reader.generate_presigned_url(
            "get_object", Params=params, ExpiresIn=expires
        )
        return PresignedURL(url)

    # -- the bucket's set-up (zodb-s3blobs init and check) ------------------

    def _bucket_call(self, operation: str, call: Callable[..., T], **args) -> T:
        """One request about the bucket itself, its failure an ObjectStoreError
        whose cause starts with S3's error code (``AccessDenied ...``)."""
        try:
            return call(Bucket=self.bucket, **args)
        except (ClientError, BotoCoreError) as exc:
            raise self._error(operation, "", exc) from exc

    def bucket_exists(self) -> bool:
        """Does the bucket exist (HeadBucket: 404 is no, any other failure
        raises)?"""
        try:
            self._bucket_call("HEAD bucket", self._client.head_bucket)
        except ObjectNotFound:
            return False
        return True

    def create_bucket(self) -> None:
        """Create the bucket in the client's region (AWS's us-east-1 is the
        one that takes no location constraint)."""
        region = self._client.meta.region_name
        args = {}
        if region and region != "us-east-1":
            args["CreateBucketConfiguration"] = {"LocationConstraint": region}
        self._bucket_call("CREATE bucket", self._client.create_bucket, **args)

    def versioning(self) -> str | None:
        """The bucket's versioning status: ``Enabled``, ``Suspended`` or None
        (never enabled)."""
        answer = self._bucket_call("GET versioning", self._client.get_bucket_versioning)
        return answer.get("Status")

    def enable_versioning(self) -> None:
        self._bucket_call(
            "PUT versioning",
            self._client.put_bucket_versioning,
            VersioningConfiguration={"Status": "Enabled"},
        )

    def lifecycle_rules(self) -> list[dict]:
        """The bucket's lifecycle rules, in S3's format ([] when it has none)."""
        try:
            answer = self._bucket_call(
                "GET lifecycle", self._client.get_bucket_lifecycle_configuration
            )
        except ObjectStoreError as exc:
            if exc.cause.startswith("NoSuchLifecycleConfiguration"):
                return []
            raise
        return answer.get("Rules", [])

    def put_lifecycle_rules(self, rules: list[dict]) -> None:
        """Replace the bucket's lifecycle configuration with *rules*."""
        self._bucket_call(
            "PUT lifecycle",
            self._client.put_bucket_lifecycle_configuration,
            LifecycleConfiguration={"Rules": rules},
        )

    def close(self) -> None:
        # Uploads nobody waits for: the queued ones are dropped, the running
        # ones cancelled (a multipart upload stops after its current part),
        # one still preparing its file never starts.
        self._closing.set()
        self._spare.shutdown(wait=False, cancel_futures=True)
        self._spare_running.cancel()
        self._spare.shutdown()
        self._spare_transfers.shutdown()
        self._background.shutdown()
        self._urgent.shutdown()
        self._pool.shutdown()
        self._background_transfers.shutdown()
        self._transfers.shutdown()
        self._client.close()
        self._reader.close()
