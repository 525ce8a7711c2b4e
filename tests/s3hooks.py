"""Watch or fail requests of a real botocore client (the requests that are not
failed still go over HTTP to the test server)."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator
from urllib.parse import unquote

from botocore.awsrequest import AWSResponse


class _Body:
    def __init__(self, data: bytes) -> None:
        self._data = data

    def stream(self, **_kw):
        yield self._data

    def read(self, *_args) -> bytes:
        data, self._data = self._data, b""
        return data


@contextlib.contextmanager
def requests(client) -> Iterator[list[tuple[str, str]]]:
    """Record (operation, unquoted URL) of every request sent in the block."""
    seen: list[tuple[str, str]] = []
    lock = threading.Lock()

    def record(request, event_name, **_kw):
        with lock:
            seen.append((event_name.rsplit(".", 1)[-1], unquote(request.url)))

    client.meta.events.register("before-send.s3", record)
    try:
        yield seen
    finally:
        client.meta.events.unregister("before-send.s3", record)


@contextlib.contextmanager
def failing(
    client,
    operation: str,
    when: Callable[[str], bool] = lambda url: True,
    code: str = "AccessDenied",
    status: int = 403,
) -> Iterator[list[str]]:
    """Answer *operation* requests whose URL matches *when* with an S3 error."""
    failed: list[str] = []
    body = (
        f'<?xml version="1.0" encoding="UTF-8"?><Error><Code>{code}</Code>'
        f"<Message>injected by the test</Message></Error>"
    ).encode()

    def fail(request, **_kw):
        url = unquote(request.url)
        if when(url):
            failed.append(url)
            return AWSResponse(request.url, status, {}, _Body(body))
        return None

    event = f"before-send.s3.{operation}"
    client.meta.events.register(event, fail)
    try:
        yield failed
    finally:
        client.meta.events.unregister(event, fail)
