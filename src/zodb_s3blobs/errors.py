"""The package's exceptions: every S3 failure names its operation, key and cause."""

from __future__ import annotations

from ZODB.POSException import StorageError


class S3BlobStorageError(StorageError):
    """Base class of this package's errors."""


class ObjectStoreError(S3BlobStorageError):
    """An S3 request failed; the message says which request, which key, and why."""

    def __init__(self, operation: str, key: str, cause: str) -> None:
        self.operation = operation
        self.key = key
        self.cause = cause
        super().__init__(f"S3 {operation} of {key!r} failed: {cause}")

    def __str__(self) -> str:
        return self.args[0]


class ObjectNotFound(ObjectStoreError):
    """The object does not exist (S3 answered 404 / NoSuchKey)."""
