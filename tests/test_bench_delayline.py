"""The benchmark's delay line: bytes pass intact, every crossing is delayed,
only loopback targets are accepted, and it leaves no thread behind.

Timing assertions are one-sided (at least the delay): the machine is noisy.
"""

from __future__ import annotations

import http.client
import http.server
import os
import socket
import socketserver
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from delayline import DelayLine, NotLoopbackError  # noqa: E402

DELAY = 0.05


class _Echo(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        while data := self.request.recv(65536):
            self.request.sendall(data)


class _EchoServer(socketserver.ThreadingTCPServer):
    daemon_threads = True


class _Hello(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        body = b"hello"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


def _serve(server: socketserver.BaseServer) -> Iterator[tuple[str, int]]:
    """Serve in a thread on 127.0.0.1 for the duration of the fixture."""
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[:2]
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


@pytest.fixture
def echo_server() -> Iterator[tuple[str, int]]:
    """A TCP echo server on 127.0.0.1."""
    yield from _serve(_EchoServer(("127.0.0.1", 0), _Echo))


@pytest.fixture
def http_server() -> Iterator[tuple[str, int]]:
    """An HTTP server on 127.0.0.1 that answers every GET with ``hello``."""
    yield from _serve(http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Hello))


def _connect(line: DelayLine) -> socket.socket:
    return socket.create_connection(("127.0.0.1", line.port), timeout=10)


def _receive(sock: socket.socket, size: int) -> bytes:
    chunks = []
    while size:
        chunk = sock.recv(min(size, 1 << 20))
        assert chunk, "connection closed early"
        chunks.append(chunk)
        size -= len(chunk)
    return b"".join(chunks)


def test_bytes_pass_intact_both_ways_and_are_counted(echo_server):
    data = os.urandom(3 << 20)
    with DelayLine(target=echo_server, delay=0.001) as line:
        with _connect(line) as sock:
            sender = threading.Thread(target=sock.sendall, args=(data,))
            sender.start()
            echoed = _receive(sock, len(data))
            sender.join()
        assert echoed == data
        counts = line.counters()
    assert counts.client_to_server == len(data)
    assert counts.server_to_client == len(data)
    assert counts.connections == 1


def test_an_echo_takes_at_least_two_delays(echo_server):
    with DelayLine(target=echo_server, delay=DELAY) as line, _connect(line) as sock:
        for _ in range(3):
            started = time.perf_counter()
            sock.sendall(b"ping")
            assert _receive(sock, 4) == b"ping"
            assert time.perf_counter() - started >= 2 * DELAY


def test_an_http_request_takes_at_least_two_delays(http_server):
    with DelayLine(target=http_server, delay=DELAY) as line:
        assert line.endpoint_url == f"http://127.0.0.1:{line.port}"
        connection = http.client.HTTPConnection("127.0.0.1", line.port, timeout=10)
        try:
            for _ in range(2):  # the second request reuses the connection
                started = time.perf_counter()
                connection.request("GET", "/")
                response = connection.getresponse()
                assert response.read() == b"hello"
                assert time.perf_counter() - started >= 2 * DELAY
        finally:
            connection.close()
        assert line.counters().connections == 1


@pytest.mark.parametrize(
    "host", ["10.0.0.1", "192.168.1.1", "8.8.8.8", "0.0.0.0", "::", "example.com"]
)
def test_a_target_beyond_loopback_is_refused(host):
    with pytest.raises(NotLoopbackError, match="loopback"):
        DelayLine(target=(host, 80))


def test_loopback_targets_other_than_127_0_0_1_are_accepted():
    assert DelayLine(target=("127.0.0.2", 80)).target == ("127.0.0.2", 80)
    assert DelayLine(target=("::1", 80)).target == ("::1", 80)


def _delay_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "delayline"]


def test_it_stops_on_exit_and_leaves_no_thread(echo_server):
    with DelayLine(target=echo_server, delay=0.001) as line:
        idle = _connect(line)  # still open at exit: dropped, not waited for
        assert _delay_threads()
    assert not _delay_threads()
    assert idle.recv(10) == b""
    idle.close()
    with pytest.raises(ConnectionRefusedError):
        _connect(line)


def test_it_stops_by_itself_after_its_lifetime(echo_server):
    line = DelayLine(target=echo_server, delay=0.001, max_lifetime=0.2).start()
    deadline = time.monotonic() + 10
    while _delay_threads() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _delay_threads()
    with pytest.raises(ConnectionRefusedError):
        _connect(line)
    line.close()  # closing a stopped line is harmless
