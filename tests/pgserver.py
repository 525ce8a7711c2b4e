"""A throwaway PostgreSQL server for the RelStorage tests.

``initdb`` and ``pg_ctl`` create and start a cluster in a temporary directory,
listening on a free port of 127.0.0.1 only, with fsync off (the data is thrown
away). PostgreSQL refuses to run as root, so when the tests run as root the
server runs as the ``postgres`` system user that Debian's package creates. The
binaries are looked up on PATH, then under ``/usr/lib/postgresql/*/bin``
(Debian installs them there). Without them the PostgreSQL tests are skipped
with what to install, except under CI (``CI`` set), where that is a failure.
"""

from __future__ import annotations

import contextlib
import glob
import itertools
import os
import pwd
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from fixturehost import owner_gone, under_ci
from ports import HOST, free_port

INSTALL_HINT = "install Debian's postgresql package (apt-get install postgresql)"
#: The role initdb creates; it owns every test database.
USER = "zodb"
_START_ATTEMPTS = 3
_PREFIX = "zodb-s3blobs-pg-"
#: The file in a cluster's directory naming the pid of the owning session.
_OWNER = "owner.pid"
_databases = itertools.count()


class PostgreSQLMissing(RuntimeError):
    """No PostgreSQL server binaries on this machine."""


def find_bindir() -> str:
    """The directory holding initdb and pg_ctl (the newest version's), after
    checking that we can run them: as root that needs the postgres user."""
    initdb = shutil.which("initdb")
    candidates = glob.glob("/usr/lib/postgresql/*/bin/initdb")
    candidates.sort(key=lambda path: int(path.split("/")[-3].split(".")[0]))
    if initdb is None and not candidates:
        raise PostgreSQLMissing(f"no PostgreSQL server binaries: {INSTALL_HINT}")
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            raise PostgreSQLMissing(
                f"running as root needs the postgres system user: {INSTALL_HINT}"
            ) from None
    return os.path.dirname(initdb or candidates[-1])


@dataclass(frozen=True)
class PostgreSQL:
    """A running server: where it listens, and how to make a database on it."""

    port: int

    def dsn(self, dbname: str) -> str:
        """The libpq connection string of database *dbname*."""
        return f"dbname={dbname} user={USER} host={HOST} port={self.port}"

    def create_database(self, template: str | None = None) -> str:
        """Create an empty database no other test uses (or a copy of database
        *template*, which no connection may use meanwhile); return its DSN."""
        import psycopg2

        name = f"zodb{os.getpid()}_{next(_databases)}"
        copy = f' TEMPLATE "{template}"' if template else ""
        conn = psycopg2.connect(self.dsn("postgres"))
        try:
            conn.autocommit = True
            with conn.cursor() as cursor:
                cursor.execute(f'CREATE DATABASE "{name}"{copy}')
        finally:
            conn.close()
        return self.dsn(name)


class _Cluster:
    """initdb, pg_ctl start and stop, run as ``postgres`` when we are root.

    The directory records the test process that owns the cluster, so that a
    later session stops a cluster whose session was killed before its
    teardown (pg_ctl's server outlives the process that started it)."""

    def __init__(self, bindir: str, directory: str | None = None) -> None:
        self.bindir = bindir
        self.as_root = os.geteuid() == 0
        if directory is None:
            directory = tempfile.mkdtemp(prefix=_PREFIX)
            with open(os.path.join(directory, _OWNER), "w") as f:
                f.write(str(os.getpid()))
            if self.as_root:
                account = pwd.getpwnam("postgres")
                os.chown(directory, account.pw_uid, account.pw_gid)
        self.directory = directory
        self.data = os.path.join(self.directory, "data")
        self.log = os.path.join(self.directory, "server.log")

    def run(self, program: str, *args: str) -> subprocess.CompletedProcess:
        """Run a PostgreSQL program on this cluster's directory."""
        command = [os.path.join(self.bindir, program), *args]
        if self.as_root:
            command = ["runuser", "-u", "postgres", "--", *command]
        return subprocess.run(
            command, cwd=self.directory, capture_output=True, text=True, timeout=120
        )

    def init(self) -> None:
        """Create the cluster: role ``zodb``, trusted on loopback."""
        done = self.run(
            "initdb", "-D", self.data, "-U", USER, "-A", "trust", "-E", "UTF8",
            "--locale=C", "--no-sync",
        )  # fmt: skip
        if done.returncode:
            raise RuntimeError(f"initdb failed:\n{done.stdout}{done.stderr}")

    def start(self) -> int:
        """Start on a free port (another, if that one was taken meanwhile)."""
        for _attempt in range(_START_ATTEMPTS):
            port = free_port()
            options = (
                f"-c listen_addresses={HOST} -p {port} "
                f"-c unix_socket_directories={self.directory} "
                "-c fsync=off -c synchronous_commit=off -c full_page_writes=off "
                "-c max_connections=200"
            )
            done = self.run(
                "pg_ctl", "-D", self.data, "-l", self.log, "-o", options,
                "-w", "-t", "60", "start",
            )  # fmt: skip
            if done.returncode == 0:
                return port
            with open(self.log, encoding="utf-8", errors="replace") as f:
                log = f.read()
            if "could not bind" not in log:
                break
        raise RuntimeError(f"pg_ctl start failed:\n{done.stdout}{done.stderr}{log}")

    def stop(self) -> None:
        """Stop the server if it runs, and remove the directory."""
        if os.path.exists(os.path.join(self.data, "postmaster.pid")):
            self.run("pg_ctl", "-D", self.data, "-m", "immediate", "-w", "stop")
        shutil.rmtree(self.directory, ignore_errors=True)


def stop_abandoned_clusters(bindir: str) -> None:
    """Stop and remove the clusters of test sessions that no longer run."""
    pattern = os.path.join(tempfile.gettempdir(), _PREFIX + "*", _OWNER)
    for owner in glob.glob(pattern):
        if owner_gone(owner):
            _Cluster(bindir, os.path.dirname(owner)).stop()


@contextlib.contextmanager
def postgresql_server(bindir: str) -> Iterator[PostgreSQL]:
    """Run a new PostgreSQL cluster on 127.0.0.1 for the duration of the block."""
    stop_abandoned_clusters(bindir)
    cluster = _Cluster(bindir)
    try:
        cluster.init()
        yield PostgreSQL(cluster.start())
    finally:
        cluster.stop()


@pytest.fixture(scope="session")
def postgresql() -> Iterator[PostgreSQL]:
    """The session's PostgreSQL server; skipped (failed under CI) without one."""
    try:
        bindir = find_bindir()
    except PostgreSQLMissing as exc:
        if under_ci():
            pytest.fail(f"CI must run the PostgreSQL tests: {exc}")
        pytest.skip(str(exc))
    with postgresql_server(bindir) as server:
        yield server
