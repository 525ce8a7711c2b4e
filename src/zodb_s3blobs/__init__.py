"""Store ZODB blobs in S3-compatible object storage."""

from .errors import ObjectNotFound, ObjectStoreError, S3BlobStorageError
from .objectstore import S3Settings
from .storage import S3BlobStorage

__all__ = [
    "ObjectNotFound",
    "ObjectStoreError",
    "S3BlobStorage",
    "S3BlobStorageError",
    "S3Settings",
]
