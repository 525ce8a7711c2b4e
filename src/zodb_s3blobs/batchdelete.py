"""Deletes sent while the caller goes on: keys gathered into DeleteObjects
batches of 1000, each sent by a small pool of threads, a bounded number at
a time, so that a collection of millions of orphans holds at most a few
batches of keys in memory and lists, judges and deletes at once."""

from __future__ import annotations

import collections
from collections.abc import Callable
from concurrent.futures import CancelledError, Future, ThreadPoolExecutor

from .errors import ObjectStoreError
from .objectstore import DELETE_BATCH, ObjectStore

#: Threads sending batches, and batches sent or waiting at most.
WORKERS = 2
IN_FLIGHT = 4


class BatchDeleter:
    """Delete the keys :meth:`add`-ed, in batches of :data:`DELETE_BATCH`.

    *deleted* is called, in the caller's thread, with the keys S3 deleted
    and their total size, batch by batch: all of a batch, or those S3 did
    not refuse. The first refusal stops further deletes (the keys added
    afterwards are only counted) and is raised by :meth:`finish`, once the
    caller has seen every key. :meth:`close` cancels the batches not sent
    and waits for those being sent, reporting what they deleted: a
    collection stopped by a later failure still names every key it
    deleted. No thread outlives the deleter."""

    def __init__(
        self, store: ObjectStore, deleted: Callable[[list[str], int], None]
    ) -> None:
        self._store = store
        self._deleted = deleted
        self._batch: list[tuple[str, int]] = []
        self._sent: collections.deque[tuple[list[tuple[str, int]], Future[int]]] = (
            collections.deque()
        )
        self._pool = ThreadPoolExecutor(WORKERS, "zodb-s3blobs-delete")
        #: The first refusal, and the keys it refused.
        self.failure: tuple[ObjectStoreError, list[str]] | None = None

    def close(self) -> None:
        """Cancel the batches not sent; wait for those being sent, and
        report what they deleted."""
        self._pool.shutdown(wait=True, cancel_futures=True)
        while self._sent:
            self._settle_oldest()

    def add(self, key: str, size: int) -> None:
        """Delete *key*, of *size* bytes, with the next batch (unless a
        delete failed)."""
        if self.failure is not None:
            return
        self._batch.append((key, size))
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
        batch, self._batch = self._batch, []
        if self.failure is None:
            sent = self._pool.submit(self._store.delete, [key for key, _ in batch])
            self._sent.append((batch, sent))

    def _settle_oldest(self) -> None:
        batch, future = self._sent.popleft()
        try:
            future.result()
        except CancelledError:  # never sent (close)
            return
        except ObjectStoreError as exc:
            # DeleteObjects may refuse some keys and delete the rest
            # (DeleteRefused names them); any other failure, all of them.
            refused = getattr(exc, "refused", None) or [key for key, _ in batch]
            if self.failure is None:
                self.failure = (exc, refused)
            gone = set(refused)
            batch = [(key, size) for key, size in batch if key not in gone]
            if not batch:
                return
        self._deleted([key for key, _ in batch], sum(size for _, size in batch))
