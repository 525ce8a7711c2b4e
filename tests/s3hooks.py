"""Watch or fail the requests of an ObjectStore's real botocore clients (the
requests that are not failed still go over HTTP to the test server)."""

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
def requests(store) -> Iterator[list[tuple[str, str]]]:
    """Record (operation, unquoted URL) of every request *store* sends in the
    block."""
    seen: list[tuple[str, str]] = []
    lock = threading.Lock()

    def record(request, event_name, **_kw):
        with lock:
            seen.append((event_name.rsplit(".", 1)[-1], unquote(request.url)))

    with _hooked(store, "before-send.s3", record):
        yield seen


def error_response(request, code: str = "AccessDenied", status: int = 403):
    """An S3 error answer to *request*, for a before-send hook to return."""
    body = (
        f'<?xml version="1.0" encoding="UTF-8"?><Error><Code>{code}</Code>'
        f"<Message>injected by the test</Message></Error>"
    ).encode()
    return AWSResponse(request.url, status, {}, _Body(body))


@contextlib.contextmanager
def failing(
    store,
    operation: str,
    when: Callable[[str], bool] = lambda url: True,
    code: str = "AccessDenied",
    status: int = 403,
) -> Iterator[list[str]]:
    """Answer *store*'s *operation* requests whose URL matches *when* with an
    S3 error."""
    failed: list[str] = []

    def fail(request, **_kw):
        url = unquote(request.url)
        if when(url):
            failed.append(url)
            return error_response(request, code, status)
        return None

    with _hooked(store, f"before-send.s3.{operation}", fail):
        yield failed


@contextlib.contextmanager
def calling(store, operation: str, callback: Callable[..., None]) -> Iterator[None]:
    """Call *callback* with each of *store*'s *operation* requests (a
    botocore AWSPreparedRequest: url, headers) just before it is sent; an
    answer it returns (see error_response) is taken instead of sending."""

    def call(request, **_kw):
        return callback(request)

    with _hooked(store, f"before-send.s3.{operation}", call):
        yield


class Gate:
    """Requests held before they are sent, until :meth:`open` is called."""

    def __init__(self) -> None:
        self.held: list[str] = []
        self.arrived = threading.Event()
        self._open = threading.Event()

    def open(self) -> None:
        self._open.set()


@contextlib.contextmanager
def holding(
    store, operation: str, when: Callable[[str], bool] = lambda url: True
) -> Iterator[Gate]:
    """Hold *store*'s *operation* requests whose URL matches *when* before
    they are sent, until the gate opens (at the latest when the block ends)."""
    gate = Gate()

    def hold(request, **_kw):
        url = unquote(request.url)
        if when(url):
            gate.held.append(url)
            gate.arrived.set()
            gate._open.wait(120)

    with _hooked(store, f"before-send.s3.{operation}", hold):
        try:
            yield gate
        finally:
            gate.open()


@contextlib.contextmanager
def _hooked(store, event: str, handler) -> Iterator[None]:
    for client in store.clients:
        client.meta.events.register(event, handler)
    try:
        yield
    finally:
        for client in store.clients:
            client.meta.events.unregister(event, handler)
