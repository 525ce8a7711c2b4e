"""A site copy's read-through fallback: the parent site's prefix in S3.

A copy of a site (its database copied, ``s3-prefix`` its own) reads every
revision its prefix does not hold from the parent's prefix
(``fallback-s3-prefix``, in ``fallback-s3-bucket`` or the same bucket), so
copying a 1 TB site needs a copy of the database only. The parent is only
ever read: nothing is written, copied over or deleted under it, and the
copy's collector lists and deletes under its own prefix alone.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import BinaryIO

from ZODB.utils import oid_repr, tid_repr

from .errors import ObjectNotFound, ObjectStoreError, S3BlobStorageError
from .fallback import FallbackReadError
from .keys import KeyLayout
from .objectstore import ObjectStore
from .settings import S3Settings

log = logging.getLogger(__name__)


class ParentPrefix:
    """The blob revisions under the parent's prefix, read-only."""

    def __init__(self, store: ObjectStore, prefix: str) -> None:
        self._store = store
        self._layout = KeyLayout(prefix)

    def describe(self) -> str:
        return f"fallback-s3-prefix {self._store.url(self._layout.root)}"

    def where(self, oid: bytes, tid: bytes) -> str:
        return self._store.url(self._layout.key(oid, tid))

    def read(self, oid: bytes, tid: bytes, out: BinaryIO) -> int | None:
        try:
            return self._store.download(self._layout.key(oid, tid), out)
        except ObjectNotFound:
            return None
        except ObjectStoreError as exc:
            raise FallbackReadError(
                f"Cannot read {oid_repr(oid)} revision {tid_repr(tid)} from "
                f"{self.describe()}: {exc}"
            ) from exc


def open_parent(
    settings: S3Settings, store: ObjectStore, prefix: str, bucket: str | None
) -> tuple[ParentPrefix, ObjectStore | None]:
    """The parent prefix, read through *store* when it is in the same
    bucket, else through a store of its own (returned, for the caller to
    close). Refuses the storage's own prefix and a parent bucket that does
    not answer, naming the key."""
    bucket = bucket or settings.bucket
    if (
        bucket == settings.bucket
        and KeyLayout(prefix).root == KeyLayout(settings.prefix).root
    ):
        raise ValueError(
            f"fallback-s3-prefix {prefix!r} is this storage's own s3-prefix: "
            "give the parent site's prefix (a copy needs an s3-prefix of its own)"
        )
    if bucket == settings.bucket:
        return ParentPrefix(store, prefix), None
    own = ObjectStore(dataclasses.replace(settings, bucket=bucket, prefix=prefix))
    try:
        own.check_bucket()
    except ObjectStoreError as exc:
        if exc.transient:  # as for the storage's own bucket: reads fail until
            log.error("The parent bucket %s is not reachable: %s", bucket, exc)
        else:
            own.close()
            raise S3BlobStorageError(
                f"fallback-s3-bucket {bucket}: the parent bucket cannot be "
                f"read: {exc.cause}"
            ) from exc
    return ParentPrefix(own, prefix), own
