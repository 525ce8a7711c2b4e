"""A TCP delay line: a loopback proxy that adds a fixed latency and, if asked,
caps the bandwidth like a WAN link.

Every chunk of bytes read from one side is stamped with its arrival time and
written to the other side ``delay`` seconds later, in order. Reading goes on
while earlier chunks wait, so without a cap a transfer's throughput is
whatever the two ends manage and only its latency changes: a request and its
response each cross the line once, so a round trip costs at least
``2 * delay``.

With ``bandwidth`` (bytes per second) each direction has one token bucket
shared by every connection the line carries, as one link to a remote S3 is
shared by all of a client's connections: ten parallel uploads together get
the cap, not ten times it. A chunk is read only once the bucket holds its
bytes, so a sender meets TCP's back-pressure as on a slow link, and the
line holds at most one small chunk per connection beyond what its delay does.

The proxy runs an asyncio loop in a daemon thread, listens on 127.0.0.1 only,
forwards only to loopback addresses, and stops by itself after
``max_lifetime`` seconds even if nobody closes it::

    with DelayLine(target=("127.0.0.1", port), delay=0.005) as line:
        client = make_client(line.endpoint_url)
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import threading
from dataclasses import dataclass
from types import TracebackType

log = logging.getLogger(__name__)

LISTEN_HOST = "127.0.0.1"
DEFAULT_DELAY = 0.005
DEFAULT_LIFETIME = 30 * 60.0
#: The most bytes read at once (and each stream's buffer limit): larger reads
#: mean fewer chunks to schedule.
CHUNK = 256 * 1024
#: With a cap, a read takes at most this many seconds of the link's time (and
#: at least MIN_QUANTUM bytes): connections sharing the link take turns in
#: slices this short, and the bucket's burst is one such slice.
QUANTUM = 0.005
MIN_QUANTUM = 4 * 1024
_START_TIMEOUT = 10.0
_STOP_TIMEOUT = 10.0
DIRECTIONS = ("client_to_server", "server_to_client")


class NotLoopbackError(ValueError):
    """The target is not a loopback address; the delay line refuses it."""


@dataclass(frozen=True)
class Counters:
    """Bytes delivered in each direction and connections accepted so far."""

    client_to_server: int = 0
    server_to_client: int = 0
    connections: int = 0


def megabits(per_second: float) -> float:
    """Bytes per second of a link of *per_second* megabits (10**6 bits) per second."""
    return per_second * 1_000_000 / 8


class TokenBucket:
    """One direction of a capped link: *rate* bytes per second, shared by
    every connection, with a burst of *burst* bytes.

    Kept as the time at which the bucket would be full again were nothing
    more taken (a generic cell rate algorithm), which is exactly a token
    bucket and needs no timer. Used from the delay line's event loop only.
    """

    def __init__(self, rate: float, burst: int) -> None:
        self.rate = rate
        self.burst = burst
        self._full_at = 0.0

    def take(self, size: int, now: float) -> float:
        """Take *size* bytes' tokens; return when they are all there (*now*
        if the bucket held them). Later takers queue behind this one."""
        self._full_at = max(self._full_at, now) + size / self.rate
        return max(now, self._full_at - self.burst / self.rate)


def loopback_target(target: tuple[str, int]) -> tuple[str, int]:
    """Return *target* if it is a loopback IP address and a valid port, so the
    proxy can never send anything beyond this machine; raise otherwise."""
    host, port = target
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        raise NotLoopbackError(
            f"delay line target {host!r} is not an IP address; give a loopback "
            "address such as 127.0.0.1"
        ) from None
    if not address.is_loopback:
        raise NotLoopbackError(
            f"delay line target {host} is not a loopback address: the delay line "
            "only forwards to this machine (127.0.0.0/8 or ::1)"
        )
    if not isinstance(port, int) or not 0 < port < 65536:
        raise ValueError(f"delay line target port {port!r} is not a TCP port")
    return str(address), port


class DelayLine:
    """Forward TCP connections to a loopback *target*, delaying every chunk by
    *delay* seconds in each direction and, with *bandwidth* (bytes per
    second), passing at most that many bytes a second in each direction
    over all connections together."""

    def __init__(
        self,
        target: tuple[str, int],
        delay: float = DEFAULT_DELAY,
        max_lifetime: float = DEFAULT_LIFETIME,
        bandwidth: float | None = None,
    ) -> None:
        if delay < 0:
            raise ValueError(f"delay must not be negative, not {delay}")
        if max_lifetime <= 0:
            raise ValueError(f"max_lifetime must be positive, not {max_lifetime}")
        if bandwidth is not None and not 0 < bandwidth < float("inf"):
            raise ValueError(f"bandwidth must be positive and finite, not {bandwidth}")
        self.target = loopback_target(target)
        self.delay = delay
        self.max_lifetime = max_lifetime
        self.bandwidth = bandwidth
        self._read_size = CHUNK
        self._buckets: dict[str, TokenBucket | None] = dict.fromkeys(DIRECTIONS)
        if bandwidth is not None:
            self._read_size = min(CHUNK, max(MIN_QUANTUM, int(bandwidth * QUANTUM)))
            for direction in DIRECTIONS:
                self._buckets[direction] = TokenBucket(bandwidth, self._read_size)
        self.port = 0
        self._counts = dict.fromkeys(DIRECTIONS, 0)
        self._connections = 0
        self._counts_lock = threading.Lock()
        self._ready = threading.Event()
        self._start_error: BaseException | None = None
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._handlers: set[asyncio.Task] = set()

    def __repr__(self) -> str:
        host, port = self.target
        cap = "" if self.bandwidth is None else f" {self.bandwidth * 8e-6:g}Mbit/s"
        return (
            f"<DelayLine {LISTEN_HOST}:{self.port} -> {host}:{port} "
            f"delay={self.delay * 1000:g}ms{cap}>"
        )

    @property
    def endpoint_url(self) -> str:
        """The proxy's address as an http:// URL, for an S3 client."""
        return f"http://{LISTEN_HOST}:{self.port}"

    def counters(self) -> Counters:
        """A consistent snapshot of the byte and connection counts."""
        with self._counts_lock:
            return Counters(connections=self._connections, **self._counts)

    # -- lifecycle -----------------------------------------------------------

    def start(self) -> DelayLine:
        """Start listening in a background thread; return once it accepts."""
        if self._thread is not None:
            raise RuntimeError("this delay line was started already")
        self._thread = threading.Thread(target=self._run, name="delayline", daemon=True)
        self._thread.start()
        if not self._ready.wait(_START_TIMEOUT):
            raise RuntimeError("the delay line did not start listening in time")
        if self._start_error is not None:
            self._thread.join(_STOP_TIMEOUT)
            raise RuntimeError(
                f"the delay line could not start: {self._start_error}"
            ) from self._start_error
        return self

    def close(self) -> None:
        """Stop listening, drop open connections and wait for the thread."""
        thread = self._thread
        if thread is None:
            return
        loop, stop = self._loop, self._stop
        if loop is not None and stop is not None:
            with contextlib.suppress(RuntimeError):  # the loop has ended already
                loop.call_soon_threadsafe(stop.set)
        thread.join(_STOP_TIMEOUT)
        if thread.is_alive():
            raise RuntimeError(f"{self!r} did not stop within {_STOP_TIMEOUT}s")

    def __enter__(self) -> DelayLine:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _run(self) -> None:
        """The thread's body: serve until stopped or the lifetime is over."""
        try:
            asyncio.run(self._serve())
        except BaseException as exc:  # reported by start() if it came early
            self._start_error = exc
            log.exception("%r failed", self)
        finally:
            self._ready.set()

    async def _serve(self) -> None:
        """Accept connections until stop() is called or max_lifetime passes."""
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        server = await asyncio.start_server(self._handle, LISTEN_HOST, 0, limit=CHUNK)
        self.port = server.sockets[0].getsockname()[1]
        self._ready.set()
        try:
            stopped = asyncio.ensure_future(self._stop.wait())
            done, _pending = await asyncio.wait({stopped}, timeout=self.max_lifetime)
            if not done:
                stopped.cancel()
                log.warning("%r reached its lifetime of %gs", self, self.max_lifetime)
        finally:
            server.close()
            for task in list(self._handlers):
                task.cancel()
            await asyncio.gather(*self._handlers, return_exceptions=True)
            await server.wait_closed()

    # -- forwarding ----------------------------------------------------------

    async def _handle(
        self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter
    ) -> None:
        """Connect to the target and forward both directions until both end;
        an error in any direction drops the whole connection."""
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        writers = [client_writer]
        with self._counts_lock:
            self._connections += 1
        try:
            server_reader, server_writer = await asyncio.open_connection(
                *self.target, limit=CHUNK
            )
            writers.append(server_writer)
            upstream: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()
            downstream: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()
            pumps = [
                asyncio.ensure_future(
                    self._receive(client_reader, upstream, "client_to_server")
                ),
                asyncio.ensure_future(
                    self._release(upstream, server_writer, "client_to_server")
                ),
                asyncio.ensure_future(
                    self._receive(server_reader, downstream, "server_to_client")
                ),
                asyncio.ensure_future(
                    self._release(downstream, client_writer, "server_to_client")
                ),
            ]
            try:
                await asyncio.wait(pumps, return_when=asyncio.FIRST_EXCEPTION)
            finally:
                for pump in pumps:
                    pump.cancel()
                await asyncio.gather(*pumps, return_exceptions=True)
        except OSError as exc:
            log.debug("%r: connection ended: %s", self, exc)
        finally:
            for writer in writers:
                writer.close()
            self._handlers.discard(task)

    async def _receive(
        self,
        reader: asyncio.StreamReader,
        queue: asyncio.Queue[tuple[float, bytes]],
        direction: str,
    ) -> None:
        """Read chunks as they come and queue each with its release time, so
        reading never waits for earlier chunks to go out; EOF is queued too.
        With a cap, a chunk is queued (and the next one read) only once the
        direction's bucket has let its bytes through."""
        loop = asyncio.get_running_loop()
        bucket = self._buckets[direction]
        while True:
            data = await reader.read(self._read_size)
            now = loop.time()
            if bucket is not None and data:
                passed = bucket.take(len(data), now)
                if passed > now:
                    await asyncio.sleep(passed - now)
                now = passed
            queue.put_nowait((now + self.delay, data))
            if not data:
                return

    async def _release(
        self,
        queue: asyncio.Queue[tuple[float, bytes]],
        writer: asyncio.StreamWriter,
        direction: str,
    ) -> None:
        """Write each queued chunk at its release time; pass EOF on likewise."""
        loop = asyncio.get_running_loop()
        while True:
            due, data = await queue.get()
            wait = due - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)
            if not data:
                if writer.can_write_eof():
                    writer.write_eof()
                return
            # Counted before it is written: the reader may have the bytes (and
            # read the counters) before this thread runs again.
            with self._counts_lock:
                self._counts[direction] += len(data)
            writer.write(data)
            await writer.drain()
