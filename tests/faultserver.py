"""An S3 server with injectable faults: moto's application behind a WSGI
layer that answers some requests with 503 SlowDown, fails some ranged GETs
with 500, resets some connections before answering, cuts some response bodies
off, stalls some, and refuses some access keys; optionally over TLS with a
throwaway certificate authority. The fault rates may be changed while the
server runs (each request reads them anew).

It serves the same in-process moto backend as the session's server, so
buckets and objects are shared. Loopback only; stalls are bounded; the server
stops with its context manager.
"""

from __future__ import annotations

import contextlib
import datetime
import io
import ipaddress
import random
import re
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from moto.moto_server.werkzeug_app import (
    DomainDispatcherApplication,
    create_backend_app,
)
from werkzeug.serving import make_server

MAX_STALL = 30.0
_CREDENTIAL = re.compile(r"Credential=([^/]+)/")


class Gate:
    """Lets the first *after* requests that *applies(method, path)* accepts
    through, then holds every further one until :meth:`open` (at most
    MAX_STALL seconds): a command under test cannot finish before the test
    has done what it must mid-run (a Ctrl-C), however busy the machine."""

    def __init__(self, after: int, applies: Callable[[str, str], bool]) -> None:
        self.after = after
        self.applies = applies
        self.reached = threading.Event()  # a request is held
        self._opened = threading.Event()
        self._lock = threading.Lock()
        self._passed = 0

    def wait(self, method: str, path: str) -> None:
        if not self.applies(method, path):
            return
        with self._lock:
            self._passed += 1
            if self._passed <= self.after:
                return
        self.reached.set()
        self._opened.wait(MAX_STALL)

    def open(self) -> None:
        self._opened.set()


@dataclass
class Faults:
    """What to inject, into requests for which *applies(method, path)* is true."""

    error_rate: float = 0.0  # answer 503 SlowDown
    range_error_rate: float = 0.0  # answer a GET with a Range header 500
    reset_rate: float = 0.0  # drop the connection before answering
    cut_rate: float = 0.0  # send half the body, then drop the connection
    corrupt_rate: float = 0.0  # answer a GET whole, one byte of its body flipped
    body_stall: float = 0.0  # seconds to wait after half the body
    stall: float = 0.0  # seconds to wait before answering
    refused_keys: set[str] = field(default_factory=set)  # answer 403
    applies: Callable[[str, str], bool] = lambda method, path: True
    #: A further condition on the WSGI environ (e.g. one Range header).
    when: Callable[[dict], bool] = lambda environ: True
    seed: int = 1
    injected: list[str] = field(default_factory=list)
    #: Writes S3 carries out late: the first request *late(method, path)*
    #: accepts is answered 500 at once and kept, to reach the server only at
    #: :meth:`release` (a write the client gave up on, carried out later).
    late: Callable[[str, str], bool] = lambda method, path: False
    #: Writes whose answer is lost: the first request *lost(method, path)*
    #: accepts reaches the server, but the client is answered 500.
    lost: Callable[[str, str], bool] = lambda method, path: False
    held: list[Callable[[], str]] = field(default_factory=list)
    gate: Gate | None = None

    def __post_init__(self) -> None:
        self._random = random.Random(self.seed)
        self._lock = threading.Lock()

    def draw(self) -> float:
        with self._lock:
            return self._random.random()

    def note(self, what: str) -> None:
        with self._lock:
            self.injected.append(what)

    def release(self) -> list[str]:
        """Carry out the held writes now; return the status of each."""
        with self._lock:
            held, self.held = self.held, []
        return [replay() for replay in held]


def _error(status: str, code: str) -> tuple[str, list, bytes]:
    body = (
        f'<?xml version="1.0" encoding="UTF-8"?><Error><Code>{code}</Code>'
        "<Message>injected fault</Message></Error>"
    ).encode()
    return status, [("Content-Type", "application/xml")], body


class FaultyApp:
    """WSGI middleware injecting :class:`Faults` in front of moto."""

    def __init__(self, app, faults: Faults) -> None:
        self.app = app
        self.faults = faults

    def __call__(self, environ, start_response):
        faults = self.faults
        method, path = environ["REQUEST_METHOD"], environ.get("PATH_INFO", "")
        credential = _CREDENTIAL.search(environ.get("HTTP_AUTHORIZATION", ""))
        if credential and credential.group(1) in faults.refused_keys:
            faults.note(f"refused {method} {path}")
            status, headers, body = _error("403 Forbidden", "InvalidAccessKeyId")
            start_response(status, headers)
            return [body]
        if faults.gate is not None:
            faults.gate.wait(method, path)
        if faults.late(method, path):
            faults.late = lambda method, path: False
            faults.note(f"held {method} {path}")
            faults.held.append(self._replay_later(environ))
            return self._internal_error(start_response)
        if faults.lost(method, path):
            faults.lost = lambda method, path: False
            faults.note(f"lost the answer to {method} {path}")
            b"".join(self.app(environ, lambda status, headers, exc_info=None: None))
            return self._internal_error(start_response)
        if not (faults.applies(method, path) and faults.when(environ)):
            return self.app(environ, start_response)
        if faults.stall:
            faults.note(f"stalled {method} {path}")
            time.sleep(min(faults.stall, MAX_STALL))
        if faults.draw() < faults.reset_rate:
            faults.note(f"reset {method} {path}")
            return self._reset(environ, start_response)
        if faults.draw() < faults.error_rate:
            faults.note(f"503 {method} {path}")
            environ["wsgi.input"].read(int(environ.get("CONTENT_LENGTH") or 0))
            status, headers, body = _error("503 Service Unavailable", "SlowDown")
            start_response(status, headers)
            return [body]
        if (
            method == "GET"
            and environ.get("HTTP_RANGE")
            and faults.draw() < faults.range_error_rate
        ):
            faults.note(f"500 {method} {path} {environ['HTTP_RANGE']}")
            status, headers, body = _error("500 Internal Server Error", "InternalError")
            start_response(status, headers)
            return [body]
        if faults.draw() < faults.cut_rate:
            faults.note(f"cut {method} {path}")
            return self._cut_off(environ, start_response)
        if (
            faults.corrupt_rate
            and method == "GET"
            and faults.draw() < faults.corrupt_rate
        ):
            faults.note(f"corrupted {method} {path} {environ.get('HTTP_RANGE', '')}")
            return self._corrupted(environ, start_response)
        if faults.body_stall:
            faults.note(f"stalled the body of {method} {path}")
            return self._stall_body(environ, start_response)
        return self.app(environ, start_response)

    @staticmethod
    def _internal_error(start_response):
        status, headers, body = _error("500 Internal Server Error", "InternalError")
        start_response(status, headers)
        return [body]

    def _replay_later(self, environ) -> Callable[[], str]:
        """The request of *environ*, read now, to be sent to the server by the
        returned function, which gives the status it answered."""
        body = environ["wsgi.input"].read(int(environ.get("CONTENT_LENGTH") or 0))
        kept = {k: v for k, v in environ.items() if isinstance(v, str | int | tuple)}

        def replay() -> str:
            answered = []
            request = dict(kept, **{"wsgi.input": io.BytesIO(body)})
            b"".join(
                self.app(
                    request,
                    lambda status, headers, exc_info=None: answered.append(status),
                )
            )
            return answered[0]

        return replay

    def _reset(self, environ, start_response):
        """Close the client's connection without an answer (werkzeug's server
        exposes the socket); a 500 where the socket is not exposed."""
        sock = environ.get("werkzeug.socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        raise ConnectionResetError("injected: connection reset before answering")

    def _cut_off(self, environ, start_response):
        body = b"".join(self.app(environ, start_response))

        def half_then_drop():
            yield body[: len(body) // 2]
            raise ConnectionResetError("injected: connection dropped mid-body")

        return half_then_drop()

    def _corrupted(self, environ, start_response):
        body = bytearray(b"".join(self.app(environ, start_response)))
        if body:
            body[len(body) // 2] ^= 0xFF
        return [bytes(body)]

    def _stall_body(self, environ, start_response):
        body = b"".join(self.app(environ, start_response))

        def half_then_wait():
            yield body[: len(body) // 2]
            time.sleep(min(self.faults.body_stall, MAX_STALL))
            yield body[len(body) // 2 :]

        return half_then_wait()


def _self_signed(directory) -> tuple[str, str]:
    """A certificate for 127.0.0.1 and its key, as PEM files in *directory*."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "ca.pem", directory / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return str(cert_path), str(key_path)


@dataclass
class RunningServer:
    endpoint_url: str
    faults: Faults
    ca_bundle: str | None


@contextlib.contextmanager
def faulty_s3(faults: Faults, tls_dir=None) -> Iterator[RunningServer]:
    """Serve moto with *faults* on 127.0.0.1; over TLS if *tls_dir* is given
    (the CA to trust is ``.ca_bundle``)."""
    context, ca_bundle = None, None
    if tls_dir is not None:
        ca_bundle, key = _self_signed(tls_dir)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(ca_bundle, key)
    app = FaultyApp(DomainDispatcherApplication(create_backend_app), faults)
    server = make_server("127.0.0.1", 0, app, threaded=True, ssl_context=context)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    scheme = "https" if context else "http"
    try:
        yield RunningServer(
            f"{scheme}://127.0.0.1:{server.server_port}", faults, ca_bundle
        )
    finally:
        server.shutdown()
        thread.join(timeout=MAX_STALL + 5)
