"""A listing read ahead: one thread fetches the next pages while the caller
works on the current one, so that a collection waits for S3 only when it
judges faster than S3 lists."""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterable, Iterator
from typing import Generic, TypeVar

T = TypeVar("T")

#: Put by the reading thread after the last page (or its error).
_END = object()


class _Failed:
    """The error that ended the reading thread, to raise in the caller's."""

    def __init__(self, error: BaseException) -> None:
        self.error = error


class ReadAhead(Generic[T]):
    """*items* in pages of *size*, read by one thread up to *depth* pages
    ahead of the caller. A context manager: leaving it stops the thread
    (after the request it may be waiting for) and waits for it, so that no
    thread outlives the listing; an error of the listing is raised in the
    caller's thread, at the page where it happened::

        with ReadAhead(store.list_objects(root), 1000) as pages:
            for page in pages:
                ...
    """

    def __init__(self, items: Iterable[T], size: int, depth: int = 2) -> None:
        self._items = items
        self._size = size
        self._pages: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._ended = False
        self._thread = threading.Thread(
            target=self._read, name="zodb-s3blobs-readahead", daemon=True
        )

    def __enter__(self) -> Iterator[list[T]]:
        self._thread.start()
        return self._pages_read()

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        while not self._ended:  # unblock the thread's put, up to its end
            self._ended = self._pages.get() is _END
        self._thread.join()

    def _read(self) -> None:
        page: list[T] = []
        try:
            for item in self._items:
                page.append(item)
                if len(page) == self._size:
                    self._pages.put(page)
                    page = []
                    if self._stop.is_set():
                        return
            if page:
                self._pages.put(page)
        except BaseException as exc:  # raised in the caller's thread
            self._pages.put(_Failed(exc))
        finally:
            self._pages.put(_END)

    def _pages_read(self) -> Iterator[list[T]]:
        while True:
            page = self._pages.get()
            if page is _END:
                self._ended = True
                return
            if isinstance(page, _Failed):
                raise page.error
            yield page
