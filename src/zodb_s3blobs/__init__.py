"""Store ZODB blobs in S3-compatible object storage.

The storage is this package's modules; the ``zodb-s3blobs`` operator tools
are the :mod:`zodb_s3blobs.cli` subpackage, which builds on them.
"""

from importlib import metadata as _metadata

from .errors import (
    BlobReadError,
    ObjectNotFound,
    ObjectStoreError,
    S3BlobStorageError,
)
from .settings import S3Settings
from .storage import S3BlobStorage

try:
    __version__: str = _metadata.version("zodb-s3blobs")
except _metadata.PackageNotFoundError:  # a source tree that is not installed
    __version__ = "0+unknown"

__all__ = [
    "BlobReadError",
    "ObjectNotFound",
    "ObjectStoreError",
    "S3BlobStorage",
    "S3BlobStorageError",
    "S3Settings",
]
