"""Store ZODB blobs in S3-compatible object storage."""

from .errors import (
    BlobReadError,
    ObjectNotFound,
    ObjectStoreError,
    S3BlobStorageError,
)
from .settings import S3Settings
from .storage import S3BlobStorage

__all__ = [
    "BlobReadError",
    "ObjectNotFound",
    "ObjectStoreError",
    "S3BlobStorage",
    "S3BlobStorageError",
    "S3Settings",
]
