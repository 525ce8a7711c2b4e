"""Loopback ports for the servers the tests start (PostgreSQL, ZEO)."""

from __future__ import annotations

import socket
import subprocess
import time

HOST = "127.0.0.1"


def free_port() -> int:
    """A port of 127.0.0.1 that nothing listens on right now.

    The server is started on it afterwards, so another process may take it in
    between; callers that can tell (PostgreSQL's log) retry with a new one."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def wait_for_port(
    port: int, process: subprocess.Popen | None = None, timeout: float = 30.0
) -> None:
    """Return once 127.0.0.1:*port* accepts connections; fail if *process*
    exits first or *timeout* seconds pass."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((HOST, port), timeout=1):
                return
        except OSError:
            pass
        if process is not None and process.poll() is not None:
            raise RuntimeError(
                f"the server exited with status {process.returncode} before "
                f"listening on {HOST}:{port}"
            )
        if time.monotonic() > deadline:
            raise TimeoutError(f"nothing listens on {HOST}:{port} after {timeout}s")
        time.sleep(0.05)
