"""The package's exceptions: every S3 failure names its operation, key and cause."""

from __future__ import annotations

from ZODB.POSException import StorageError


class S3BlobStorageError(StorageError):
    """Base class of this package's errors."""


class ObjectStoreError(S3BlobStorageError):
    """An S3 request failed; the message says which request, which key, and why.

    *transient* failures (5xx, throttling, broken connections, a checksum
    mismatch) may succeed when tried again; the others will not.
    """

    def __init__(
        self, operation: str, key: str, cause: str, transient: bool = False
    ) -> None:
        self.operation = operation
        self.key = key
        self.cause = cause
        self.transient = transient
        super().__init__(f"S3 {operation} of {key!r} failed: {cause}")

    def __str__(self) -> str:
        return self.args[0]


class DeleteRefused(ObjectStoreError):
    """DeleteObjects answered errors for some keys (and deleted the others):
    *refused* lists the keys not deleted."""

    def __init__(self, key: str, cause: str, refused: list[str]) -> None:
        super().__init__("DELETE", key, cause)
        self.refused = refused


class BlobReadError(S3BlobStorageError):
    """A blob could not be read for a reason other than its absence (which is
    a POSKeyError): the message names oid, tid, key and cause."""


class ObjectNotFound(ObjectStoreError):
    """The object does not exist (S3 answered 404 / NoSuchKey)."""


class ChecksumMismatch(ObjectStoreError):
    """A download's bytes do not match the CRC32 recorded at upload: the
    whole object arrived, and it is not what was stored."""
