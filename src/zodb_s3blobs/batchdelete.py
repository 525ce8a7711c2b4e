"""Deletes sent while the caller goes on: keys gathered into DeleteObjects
batches of 1000, each sent by a small pool of threads, a bounded number at
a time, so that a collection of millions of orphans holds at most a few
batches of keys in memory and lists, judges and deletes at once."""

from __future__ import annotations

import collections
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

from .errors import ObjectStoreError
from .objectstore import DELETE_BATCH, ObjectStore

#: Threads sending batches, and batches sent or waiting at most.
WORKERS = 2
IN_FLIGHT = 4


class BatchDeleter:
    """Delete the keys :meth:`add`-ed, in batches of :data:`DELETE_BATCH`.

    *deleted* is called, in the caller's thread, with the keys of each batch
    S3 deleted and their total size. The first refusal stops further
    deletes (the keys added afterwards are only counted) and is raised by
    :meth:`finish`, once the caller has seen every key. :meth:`close`
    cancels the batches not sent and waits for those being sent, so no
    thread outlives the deleter."""

    def __init__(
        self, store: ObjectStore, deleted: Callable[[list[str], int], None]
    ) -> None:
        self._store = store
        self._deleted = deleted
        self._batch: list[str] = []
        self._batch_size = 0
        self._sent: collections.deque[tuple[list[str], int, Future[int]]] = (
            collections.deque()
        )
        self._pool = ThreadPoolExecutor(WORKERS, "zodb-s3blobs-delete")
        #: The first refusal, and the keys of its batch.
        self.failure: tuple[ObjectStoreError, list[str]] | None = None

    def close(self) -> None:
        """Cancel the batches not sent; wait for those being sent."""
        self._pool.shutdown(wait=True, cancel_futures=True)

    def add(self, key: str, size: int) -> None:
        """Delete *key*, of *size* bytes, with the next batch (unless a
        delete failed)."""
        if self.failure is not None:
            return
        self._batch.append(key)
        self._batch_size += size
        if len(self._batch) >= DELETE_BATCH:
            self._send()

    def finish(self) -> None:
        """Send the last batch, wait for every batch; raise the first
        refusal, if any."""
        if self._batch and self.failure is None:
            self._send()
        while self._sent:
            self._settle_oldest()
        if self.failure is not None:
            raise self.failure[0]

    def _send(self) -> None:
        while len(self._sent) >= IN_FLIGHT:
            self._settle_oldest()
        batch, size = self._batch, self._batch_size
        self._batch, self._batch_size = [], 0
        if self.failure is None:
            sent = self._pool.submit(self._store.delete, batch)
            self._sent.append((batch, size, sent))

    def _settle_oldest(self) -> None:
        batch, size, future = self._sent.popleft()
        try:
            future.result()
        except ObjectStoreError as exc:
            if self.failure is None:
                self.failure = (exc, batch)
            return
        self._deleted(batch, size)
