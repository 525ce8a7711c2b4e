"""A ZEO server (``runzeo``) in a process of its own on a free port of
127.0.0.1, for tests whose clients wrap ``<zeoclient>``, and the client
section they use."""

from __future__ import annotations

import contextlib
import ctypes
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import ZEO
import ZODB

from deploy import console_script
from ports import HOST, free_port, wait_for_port


def zeoclient_section(port: int) -> str:
    """A ``<zeoclient>`` as cookiecutter-zope-instance writes it for
    z3blobs: the server's address, no blob-dir."""
    return f"<zeoclient>\n    server {HOST}:{port}\n    storage 1\n  </zeoclient>"


def end_with_the_tests() -> None:
    """In the server's process: receive SIGTERM when the test process dies,
    so that a killed test session leaves no server behind (Linux prctl)."""
    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)


@contextlib.contextmanager
def runzeo(directory: Path, storage_section: str) -> Iterator[int]:
    """``runzeo`` serving *storage_section* (ZConfig text, e.g. a
    ``<filestorage>`` without blob-dir) until the block ends; yields its
    port. The database's root is created before any client connects: two
    client processes opening an empty database at once would both try to,
    and one would get a conflict."""
    port = free_port()
    config = directory / "zeo.conf"
    config.write_text(f"<zeo>\n  address {HOST}:{port}\n</zeo>\n{storage_section}\n")
    with open(directory / "zeo.log", "w") as log:
        server = subprocess.Popen(
            [console_script("runzeo"), "-C", str(config)],
            stdout=log,
            stderr=subprocess.STDOUT,
            preexec_fn=end_with_the_tests,
        )
    try:
        wait_for_port(port, server)
        ZODB.DB(ZEO.client((HOST, port))).close()
        yield port
    finally:
        server.terminate()
        server.wait(timeout=30)
