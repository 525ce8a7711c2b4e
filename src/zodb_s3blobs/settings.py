"""The S3 side's settings (the ``s3-*`` keys) and the checks on their
combinations; no boto3 here, so configuration errors surface before any
client exists."""

from __future__ import annotations

import base64
import binascii
import math
import re
import ssl
from dataclasses import dataclass, field
from urllib.parse import urlsplit

MiB = 1 << 20
#: S3's smallest multipart part (but for the last), and its largest PUT.
MIN_PART_SIZE = 5 * MiB
MAX_PUT_SIZE = 5 << 30
#: S3's largest multipart part (5 GiB).
MAX_PART_SIZE = 5 << 30
ADDRESSING_STYLES = ("auto", "path", "virtual")
#: s3-conditional-writes: probe the provider once, always, or never.
CONDITIONAL_WRITES = ("auto", "true", "false")
#: s3-sse values: S3-managed keys, or keys in AWS KMS.
SSE_MODES = ("AES256", "aws:kms")
#: A region name: letters, digits and inner hyphens. It becomes part of the
#: endpoint's host name, so anything else ('.', '/', '@') could redirect the
#: requests (and the credentials signing them) to another host.
_REGION = re.compile(r"[A-Za-z0-9]+(?:-[A-Za-z0-9]+)*")
_TIMEOUTS = (
    "connect_timeout",
    "read_timeout",
    "download_connect_timeout",
    "download_read_timeout",
    "download_deadline",
)


def decode_sse_customer_key(value: str) -> bytes:
    """Decode an SSE-C key given as base64 of 32 bytes, or raise ValueError.

    The messages never repeat the key. Base64 with padding bits set (another
    last character) decodes to the same bytes: see
    :func:`canonical_sse_customer_key`.
    """
    try:
        raw = base64.b64decode(value.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("s3-sse-customer-key is not valid base64") from None
    if len(raw) != 32:
        raise ValueError(
            f"s3-sse-customer-key must decode to 32 bytes (AES-256), not {len(raw)}"
        )
    return raw


def canonical_sse_customer_key(value: str) -> str:
    """The canonical base64 of an SSE-C key, the form botocore sends (and
    logs at DEBUG) whatever form the key was given in; ValueError as
    :func:`decode_sse_customer_key`."""
    return base64.b64encode(decode_sse_customer_key(value)).decode("ascii")


def is_plain_http(url: str | None) -> bool:
    """Whether *url* is an ``http://`` URL, in any case (``HTTP://`` too)."""
    return bool(url) and urlsplit(url.strip()).scheme.lower() == "http"


def check_endpoint_url(value: str) -> str:
    """*value*, stripped, if it is an http:// or https:// URL with a host and
    no credentials in it; ValueError otherwise, never repeating a password."""
    value = value.strip()
    parts = urlsplit(value)
    if parts.username is not None or parts.password is not None:
        raise ValueError(
            "s3-endpoint-url must not contain credentials (user:password@): "
            "use s3-access-key and s3-secret-key, or boto3's credential chain"
        )
    if parts.scheme.lower() not in ("http", "https") or not parts.netloc:
        raise ValueError(
            f"s3-endpoint-url {value!r} must be an http:// or https:// URL"
        )
    return value


def check_region(value: str) -> str:
    """*value*, stripped, if it is a region name (letters, digits, hyphens);
    ValueError otherwise."""
    value = value.strip()
    if not _REGION.fullmatch(value):
        raise ValueError(
            f"s3-region {value!r} is not a region name (letters, digits and "
            "hyphens, e.g. eu-central-1)"
        )
    return value


def check_ca_bundle(path: str) -> str:
    """*path* if it is a readable file of PEM certificates that OpenSSL
    accepts as trust anchors; ValueError otherwise (a typo in the path, a
    key or a DER file would otherwise surface as an untrusted certificate
    at the first request)."""
    try:
        with open(path, "rb") as f:
            text = f.read()
    except OSError as exc:
        raise ValueError(
            f"s3-ca-bundle {path!r} cannot be read: {exc.strerror}"
        ) from None
    if b"-----BEGIN CERTIFICATE-----" not in text:
        raise ValueError(f"s3-ca-bundle {path!r} holds no PEM certificate")
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cafile=path)
    except (ssl.SSLError, OSError) as exc:
        raise ValueError(
            f"s3-ca-bundle {path!r} is not a usable PEM certificate file: {exc}"
        ) from None
    return path


def check_timeout(key: str, value: float) -> float:
    """*value* if it is a positive, finite number of seconds; ValueError
    naming *key* otherwise (``nan`` compares false with everything, so a
    plain ``<= 0`` check lets it through, and ``inf`` would wait forever)."""
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{key} must be a positive, finite number, not {value!r}")
    return value


@dataclass(frozen=True)
class S3Settings:
    """Where the blobs live, how to reach them, and how to encrypt them.

    Credentials and keys are left out of the repr.
    """

    bucket: str
    prefix: str = ""
    endpoint_url: str | None = None
    region: str | None = None
    access_key: str | None = field(default=None, repr=False)
    secret_key: str | None = field(default=None, repr=False)
    use_ssl: bool = True
    ca_bundle: str | None = None
    addressing_style: str = "auto"
    sse: str | None = None
    sse_kms_key_id: str | None = field(default=None, repr=False)
    sse_customer_key: str | None = field(default=None, repr=False)
    max_concurrency: int = 10
    multipart: bool = True
    multipart_threshold: int = 100 * MiB
    part_size: int = 8 * MiB
    #: On bases that choose the tid under their commit lock (RelStorage), a
    #: blob of at least this size is uploaded before the lock to a staging key
    #: and copied server-side to its revision's key once the tid is known.
    staged_copy_threshold: int = 1 * MiB
    #: Writes to a revision's key carry ``If-None-Match: *`` where the
    #: provider honours it ("auto": probed once), so that a late write can
    #: never replace a committed object (see objectstore.WriteGuard).
    conditional_writes: str = "auto"
    #: Uploads, copies, deletes and listings: patient, many attempts. Providers
    #: under load (Hetzner, Ceph RGW) have been seen answering large PUTs after
    #: more than 60 s; a shorter read timeout retries every such upload.
    connect_timeout: float = 10.0
    read_timeout: float = 300.0
    #: Ten: under a 20% rate of 503 SlowDown, 0.2**10, one upload in ten
    #: million, fails its commit (0.2**5 would be one in three thousand).
    max_attempts: int = 10
    #: Downloads serve web requests: a stalled connection is abandoned fast,
    #: and failures are retried with backoff while the deadline allows one
    #: more attempt to run its full connect + read timeout (see
    #: ObjectStore.download); download_max_attempts, if set, caps the count.
    download_connect_timeout: float = 3.0
    download_read_timeout: float = 10.0
    download_deadline: float = 20.0
    download_max_attempts: int | None = None

    def __post_init__(self) -> None:
        """Refuse bad values and combinations, naming the key; store the SSE-C
        key in its canonical base64, the form botocore sends."""
        if not self.bucket:
            raise ValueError("bucket-name must not be empty")
        if self.addressing_style not in ADDRESSING_STYLES:
            raise ValueError(
                f"s3-addressing-style must be one of {', '.join(ADDRESSING_STYLES)},"
                f" not {self.addressing_style!r}"
            )
        if self.conditional_writes not in CONDITIONAL_WRITES:
            raise ValueError(
                "s3-conditional-writes must be one of "
                f"{', '.join(CONDITIONAL_WRITES)}, not {self.conditional_writes!r}"
            )
        if self.endpoint_url is not None:
            check_endpoint_url(self.endpoint_url)
        if self.region is not None:
            check_region(self.region)
        if self.ca_bundle is not None:
            check_ca_bundle(self.ca_bundle)
        self._check_encryption()  # first: its message names the SSE-C key
        if self.use_ssl and is_plain_http(self.endpoint_url):
            # botocore would talk plain HTTP to an http:// endpoint whatever
            # use_ssl says: a contradiction is refused, not resolved silently.
            raise ValueError(
                "s3-use-ssl is true but s3-endpoint-url is http://: set "
                "s3-use-ssl false to talk plain HTTP, or give an https:// endpoint"
            )
        for name in ("max_concurrency", "max_attempts", "download_max_attempts"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"s3-{name.replace('_', '-')} must be at least 1")
        for name in _TIMEOUTS:
            check_timeout(f"s3-{name.replace('_', '-')}", getattr(self, name))
        if self.part_size < MIN_PART_SIZE:
            raise ValueError(
                f"s3-part-size must be at least 5MB (S3's smallest part), "
                f"not {self.part_size}"
            )
        if self.part_size > MAX_PART_SIZE:
            raise ValueError(
                f"s3-part-size must be at most 5GB (S3's largest part), "
                f"not {self.part_size}"
            )

    def _check_encryption(self) -> None:
        if self.sse is not None and self.sse not in SSE_MODES:
            raise ValueError(
                f"s3-sse must be one of {', '.join(SSE_MODES)}, not {self.sse!r}"
            )
        if self.sse_kms_key_id and self.sse != "aws:kms":
            raise ValueError("s3-sse-kms-key-id needs s3-sse aws:kms")
        if self.sse_customer_key is None:
            return
        if self.sse is not None:
            raise ValueError(
                "s3-sse and s3-sse-customer-key exclude each other: choose one"
            )
        canonical = canonical_sse_customer_key(self.sse_customer_key)
        object.__setattr__(self, "sse_customer_key", canonical)
        # The endpoint boto3 resolves from the environment or the AWS config
        # is checked again, once the client exists (ObjectStore).
        if not self.use_ssl or is_plain_http(self.endpoint_url):
            raise ValueError(
                "s3-sse-customer-key requires TLS: S3 refuses SSE-C keys sent "
                "over plain HTTP (set s3-use-ssl true and an https endpoint)"
            )
