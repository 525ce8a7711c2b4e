"""The S3 side's settings (the ``s3-*`` keys) and the checks on their
combinations; no boto3 here, so configuration errors surface before any
client exists."""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass, field

MiB = 1 << 20
#: S3's smallest multipart part (but for the last), and its largest PUT.
MIN_PART_SIZE = 5 * MiB
MAX_PUT_SIZE = 5 << 30
ADDRESSING_STYLES = ("auto", "path", "virtual")
#: s3-sse values: S3-managed keys, or keys in AWS KMS.
SSE_MODES = ("AES256", "aws:kms")


def decode_sse_customer_key(value: str) -> bytes:
    """Decode an SSE-C key given as base64 of 32 bytes, or raise ValueError.

    The messages never repeat the key.
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
    #: Uploads, copies, deletes and listings: patient, many attempts. Providers
    #: under load (Hetzner, Ceph RGW) have been seen answering large PUTs after
    #: more than 60 s; a shorter read timeout retries every such upload.
    connect_timeout: float = 10.0
    read_timeout: float = 300.0
    max_attempts: int = 5
    #: Downloads serve web requests: a stalled connection is abandoned fast,
    #: and failures are retried with backoff while the deadline allows one
    #: more attempt to run its full connect + read timeout (see
    #: ObjectStore.download); download_max_attempts, if set, caps the count.
    download_connect_timeout: float = 3.0
    download_read_timeout: float = 10.0
    download_deadline: float = 20.0
    download_max_attempts: int | None = None

    def __post_init__(self) -> None:
        if not self.bucket:
            raise ValueError("bucket-name must not be empty")
        if self.addressing_style not in ADDRESSING_STYLES:
            raise ValueError(
                f"s3-addressing-style must be one of {', '.join(ADDRESSING_STYLES)},"
                f" not {self.addressing_style!r}"
            )
        self._check_encryption()
        for name in ("max_concurrency", "max_attempts", "download_max_attempts"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"s3-{name.replace('_', '-')} must be at least 1")
        for name in (
            "connect_timeout",
            "read_timeout",
            "download_connect_timeout",
            "download_read_timeout",
            "download_deadline",
        ):
            if getattr(self, name) <= 0:
                raise ValueError(f"s3-{name.replace('_', '-')} must be positive")
        if self.part_size < MIN_PART_SIZE:
            raise ValueError(
                f"s3-part-size must be at least 5MB (S3's smallest part), "
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
        decode_sse_customer_key(self.sse_customer_key)
        if not self.use_ssl or (
            self.endpoint_url and self.endpoint_url.startswith("http://")
        ):
            raise ValueError(
                "s3-sse-customer-key requires TLS: S3 refuses SSE-C keys sent "
                "over plain HTTP (set s3-use-ssl true and an https endpoint)"
            )
