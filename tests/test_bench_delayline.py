"""The benchmark's delay line: bytes pass intact, every crossing is delayed,
a bandwidth cap holds for one and for many connections together, only
loopback targets are accepted, and it leaves no thread behind.

Timing assertions are one-sided where they can be (at least the delay, no
faster than the cap); where a transfer must also not be far slower than the
cap, the bound is loose: the machine is noisy.
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
from delayline import DelayLine, NotLoopbackError, megabits  # noqa: E402

DELAY = 0.05
#: The cap of the bandwidth tests (bytes per second), and what they send
#: through it: a second's worth, so that the burst (5 ms of the cap) and the
#: delay are small next to the time the cap imposes.
CAP = 4 << 20
SENT = CAP
#: A transfer may be up to this much faster than the cap allows (the burst,
#: and the first chunk's head start), and up to this much slower (a busy
#: machine): still far from 2x, what a cap per connection would give two.
FASTER = 0.9
SLOWER = 3.0


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


class _Sink(socketserver.BaseRequestHandler):
    """Read until EOF, then answer with the byte count as 8 bytes."""

    def handle(self) -> None:
        received = 0
        while data := self.request.recv(1 << 20):
            received += len(data)
        self.request.sendall(received.to_bytes(8, "big"))


class _Source(socketserver.BaseRequestHandler):
    """Read an 8-byte count, send that many bytes, close."""

    def handle(self) -> None:
        size = int.from_bytes(_receive(self.request, 8), "big")
        block = bytes(1 << 20)
        while size:
            size -= self.request.send(block[: min(size, len(block))])


@pytest.fixture
def sink_server() -> Iterator[tuple[str, int]]:
    """A TCP server on 127.0.0.1 that counts what it receives."""
    yield from _serve(_EchoServer(("127.0.0.1", 0), _Sink))


@pytest.fixture
def source_server() -> Iterator[tuple[str, int]]:
    """A TCP server on 127.0.0.1 that sends as many bytes as asked."""
    yield from _serve(_EchoServer(("127.0.0.1", 0), _Source))


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


def _upload(line: DelayLine, size: int) -> None:
    """Send *size* bytes to the sink through *line*; check its count."""
    with _connect(line) as sock:
        sock.sendall(bytes(size))
        sock.shutdown(socket.SHUT_WR)
        assert int.from_bytes(_receive(sock, 8), "big") == size


def _download(line: DelayLine, size: int) -> None:
    """Ask the source for *size* bytes through *line* and receive them."""
    with _connect(line) as sock:
        sock.sendall(size.to_bytes(8, "big"))
        assert len(_receive(sock, size)) == size


def _in_parallel(action, line: DelayLine, sizes: list[int]) -> float:
    """Seconds for *action* (_upload or _download) of each size at once, each
    on its own connection through *line*."""
    threads = [threading.Thread(target=action, args=(line, n)) for n in sizes]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    seconds = time.perf_counter() - started
    assert not any(thread.is_alive() for thread in threads)
    return seconds


def _assert_near_the_cap(seconds: float, size: int) -> None:
    """*size* bytes took about what the cap allows: not less, nor far more."""
    assert FASTER * size / CAP <= seconds <= SLOWER * size / CAP + 2 * DELAY


#: Per direction: the server fixture, the transfer, and the counter.
TRANSFERS = {
    "upload": ("sink_server", _upload, "client_to_server"),
    "download": ("source_server", _download, "server_to_client"),
}


@pytest.mark.parametrize("connections", [1, 4])
@pytest.mark.parametrize("direction", sorted(TRANSFERS))
def test_the_cap_holds_over_all_connections(request, direction, connections):
    server, transfer, counter = TRANSFERS[direction]
    target = request.getfixturevalue(server)
    with DelayLine(target=target, delay=0.001, bandwidth=CAP) as line:
        seconds = _in_parallel(transfer, line, [SENT // connections] * connections)
        assert getattr(line.counters(), counter) == SENT
    _assert_near_the_cap(seconds, SENT)


def test_each_direction_has_its_own_cap(echo_server):
    data = os.urandom(SENT)
    line = DelayLine(target=echo_server, delay=0.001, bandwidth=CAP)
    with line, _connect(line) as sock:
        sender = threading.Thread(target=sock.sendall, args=(data,))
        started = time.perf_counter()
        sender.start()
        echoed = _receive(sock, len(data))
        seconds = time.perf_counter() - started
        sender.join()
    assert echoed == data
    _assert_near_the_cap(seconds, SENT)  # not twice that: the echo overlaps


def test_without_a_cap_the_line_is_not_throttled(sink_server):
    with DelayLine(target=sink_server, delay=0.001) as line:
        assert line.bandwidth is None
        seconds = _in_parallel(_upload, line, [4 * SENT])
    # Four seconds' worth of the capped tests' link in well under a second
    # of it: the cap is off, and a transfer runs at the two ends' speed.
    assert seconds < 0.5 * 4 * SENT / CAP


def test_megabits_are_bytes_per_second_of_a_link():
    assert megabits(100) == 12_500_000


@pytest.mark.parametrize("bandwidth", [0, -1, float("inf"), float("nan")])
def test_a_cap_must_be_positive_and_finite(bandwidth):
    with pytest.raises(ValueError, match="bandwidth"):
        DelayLine(target=("127.0.0.1", 80), bandwidth=bandwidth)


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
