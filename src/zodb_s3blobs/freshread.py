"""Reads of a revision whose object may not be in S3 yet: a ZEO client's
writer copies it to its key after the server committed (see
:mod:`zodb_s3blobs.copier`), and the server invalidates the other clients
at that commit, so they may ask for the object before it lands."""

from __future__ import annotations

import logging
import random
import time
from typing import BinaryIO

from .errors import ObjectNotFound
from .gc import tid_time
from .objectstore import ObjectStore

log = logging.getLogger(__name__)

#: A revision younger than this (by its tid's timestamp) whose object S3 does
#: not have yet may be waiting for its writer's copy: readers wait for it.
FRESH = 600.0


def download_fresh(store: ObjectStore, key: str, serial: bytes, out: BinaryIO) -> int:
    """Download *key* into *out*; a 404 for a revision committed within
    :data:`FRESH` seconds (its writer's copy may not have landed yet) is
    retried until ``s3-download-deadline`` has passed since the call."""
    deadline = time.monotonic() + store.settings.download_deadline
    attempt = 0
    while True:
        try:
            return store.download(key, out)
        except ObjectNotFound:
            attempt += 1
            pause = random.uniform(0, min(2.0, 0.05 * 2**attempt))
            if (
                tid_time(serial) < time.time() - FRESH
                or time.monotonic() + pause > deadline
            ):
                raise
            log.debug(
                "Waiting for %s, committed %.1fs ago",
                key,
                time.time() - tid_time(serial),
            )
            time.sleep(pause)
