"""A throwaway Ceph cluster with a RADOS Gateway, the S3 that providers run.

Ceph Pacific's radosgw has no storage backend but RADOS, so a cluster is
started in a temporary directory: its own ``ceph.conf`` and fsid, one
``ceph-mon`` (messenger v1 on a free loopback port), one ``ceph-osd`` keeping
its objects in memory (``memstore``, capped), no ``ceph-mgr`` (health is fine
without one), and ``radosgw`` with the beast frontend on a free port of
127.0.0.1. A user with known keys is created; buckets are made over S3.

Every daemon runs in the foreground as a child of the test process, which
knows its PID and stops it (radosgw, then the OSD, then the monitor, the
reverse of the order they depend on each other). A daemon also receives
SIGTERM when the test process dies (Linux ``PR_SET_PDEATHSIG``), and the
directory records the owning session, so that a later session stops what a
killed one left (by the PIDs recorded, only if their command line still names
that cluster's ``ceph.conf``) and removes its directory.

Start-up is retried once in a new directory: ports can be taken between
choosing and binding them, and the monitor and OSD can race (see
``_Cluster.write_conf``). Without the Ceph binaries the RGW tests are skipped
with what to install, except under CI (``CI`` set, and not to ``0`` or
``false``), where that is a failure.
"""

from __future__ import annotations

import contextlib
import ctypes
import glob
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from fixturehost import owner_gone, under_ci
from ports import HOST, free_port, wait_for_port

INSTALL_HINT = (
    "install Debian's Ceph packages (apt-get install --no-install-recommends "
    "radosgw ceph-mon ceph-osd ceph-common)"
)
PROGRAMS = ("ceph", "ceph-mon", "ceph-osd", "monmaptool", "radosgw", "radosgw-admin")
ACCESS_KEY = "rgw-test-access-key"
SECRET_KEY = "rgw-test-secret-key"
#: RGW answers any region name; clients sign with this one.
REGION = "us-east-1"
#: What the OSD may keep in memory: the tests' objects are small and deleted
#: with their prefixes rarely, so a cap well below the machine's memory.
MEMSTORE_BYTES = 2 * 1024**3
_START_ATTEMPTS = 2
_PREFIX = "zodb-s3blobs-rgw-"
#: The file in a cluster's directory naming the pid of the owning session.
_OWNER = "owner.pid"
#: One line per daemon started: its pid.
_PIDS = "daemons.pid"
#: Seconds allowed to each phase of start-up.
_TIMEOUT = 60


class CephMissing(RuntimeError):
    """No Ceph binaries on this machine."""


def find_programs() -> None:
    """Fail with what to install unless every program we run is on PATH."""
    missing = [name for name in PROGRAMS if shutil.which(name) is None]
    if missing:
        raise CephMissing(f"no {', '.join(missing)}: {INSTALL_HINT}")


#: util-linux's setpriv, which sets the parent-death signal and execs the
#: daemon: nothing runs in the forked child before exec.
_SETPRIV = shutil.which("setpriv")
#: Otherwise prctl, resolved here, before any fork: the fixture starts in a
#: process with threads (moto's server, boto3's), where a child may only call
#: what needs no lock (ctypes.CDLL in the child could deadlock in dlopen).
_PRCTL = ctypes.CDLL(None, use_errno=True).prctl
_PR_SET_PDEATHSIG = 1
_SIGTERM = int(signal.SIGTERM)


def _end_with_the_tests() -> None:
    """In a daemon's process: receive SIGTERM when the test process dies, so
    that a killed test session leaves no daemon behind (Linux prctl)."""
    _PRCTL(_PR_SET_PDEATHSIG, _SIGTERM)


def popen_daemon(command: list[str], **kwargs) -> subprocess.Popen:
    """Start *command* as a child that gets SIGTERM when the thread that
    started it (the test session's) ends, as it does when the session is
    killed."""
    if _SETPRIV is not None:
        return subprocess.Popen([_SETPRIV, "--pdeathsig", "TERM", *command], **kwargs)
    return subprocess.Popen(command, preexec_fn=_end_with_the_tests, **kwargs)


@dataclass(frozen=True)
class RGW:
    """A running gateway: its S3 endpoint and the keys of its one user."""

    endpoint_url: str
    directory: str
    access_key: str = ACCESS_KEY
    secret_key: str = SECRET_KEY
    region: str = REGION

    def client(self):
        """A boto3 S3 client for this gateway (path-style addressing)."""
        from s3env import Server

        server = Server(
            "rgw", self.endpoint_url, self.access_key, self.secret_key, self.region
        )
        return server.client()

    def create_bucket(self, name: str) -> str:
        """Create bucket *name* (RGW answers 200 if we own it already)."""
        self.client().create_bucket(Bucket=name)
        return name


class _Cluster:
    """One monitor, one OSD and one radosgw in one directory."""

    def __init__(self, directory: str | None = None) -> None:
        if directory is None:
            directory = tempfile.mkdtemp(prefix=_PREFIX)
            with open(os.path.join(directory, _OWNER), "w") as f:
                f.write(str(os.getpid()))
        self.directory = directory
        self.conf = os.path.join(directory, "ceph.conf")
        self.processes: list[subprocess.Popen] = []

    def path(self, *names: str) -> str:
        return os.path.join(self.directory, *names)

    # -- configuration --------------------------------------------------

    def write_conf(self, fsid: str, mon_port: int, rgw_port: int) -> None:
        """ceph.conf: everything inside the directory, no authentication,
        pools of one replica and few placement groups.

        The OSD normally sends crush and class updates to the monitor as it
        starts; in about one start in five that happened before it knew the
        cluster's fsid, the monitor refused them ("wrong fsid") and the OSD
        exited. ``osd crush update on start = false`` (the OSD is placed in
        the crush map before it starts) and ``osd class update on start =
        false`` remove that race."""
        d = self.directory
        text = f"""\
[global]
fsid = {fsid}
mon host = v1:{HOST}:{mon_port}
mon initial members = a
public addr = {HOST}
ms bind msgr2 = false
ms bind ipv6 = false
auth cluster required = none
auth service required = none
auth client required = none
auth allow insecure global id reclaim = true
keyring = {d}/keyring
run dir = {d}/run
admin socket = {d}/run/$name.asok
pid file = {d}/run/$name.pid
log file = {d}/log/$name.log
log to stderr = false
err to stderr = true
debug ms = 0
osd pool default size = 1
osd pool default min size = 1
osd pool default pg num = 8
osd pool default pgp num = 8
osd pool default pg autoscale mode = off
osd crush chooseleaf type = 0
mon allow pool size one = true
mon allow pool delete = true
mon max pg per osd = 1000
mon warn on pool no redundancy = false
paxos propose interval = 0.1

[mon]
mon data = {d}/mon/$cluster-$id
mon cluster log file = {d}/log/cluster.log

[osd]
osd data = {d}/osd/$cluster-$id
osd objectstore = memstore
memstore device bytes = {MEMSTORE_BYTES}
osd crush update on start = false
osd class update on start = false
osd mon shutdown timeout = 1
osd max object name len = 460
osd max object namespace len = 64

[client.rgw.a]
rgw frontends = beast endpoint={HOST}:{rgw_port}
rgw data = {d}/rgw
rgw thread pool size = 64
rgw enable usage log = false
"""
        for sub in ("run", "log", "mon", "osd", "rgw"):
            os.makedirs(self.path(sub), exist_ok=True)
        with open(self.conf, "w") as f:
            f.write(text)

    # -- running programs -----------------------------------------------

    def run(self, *command: str, timeout: float = _TIMEOUT) -> str:
        """Run a Ceph tool on this cluster; its stdout, or RuntimeError."""
        done = subprocess.run(
            [command[0], "-c", self.conf, *command[1:]],
            cwd=self.directory,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if done.returncode:
            raise RuntimeError(
                f"{' '.join(command)} failed ({done.returncode}):\n"
                f"{done.stdout}{done.stderr}"
            )
        return done.stdout

    def ceph(self, *args: str) -> str:
        """The ``ceph`` command-line tool against this cluster's monitor."""
        return self.run("ceph", "--connect-timeout", "20", *args)

    def spawn(self, program: str, *args: str) -> subprocess.Popen:
        """Start a daemon in the foreground as our child; record its pid."""
        with open(self.path("log", f"{program}.out"), "ab") as log:
            process = popen_daemon(
                [program, "-f", "-c", self.conf, *args],
                cwd=self.directory,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        self.processes.append(process)
        with open(self.path(_PIDS), "a") as f:
            f.write(f"{process.pid}\n")
        return process

    def check_alive(self) -> None:
        """Fail with the daemon's output if one of ours has exited."""
        for process in self.processes:
            if process.poll() is not None:
                raise RuntimeError(
                    f"{process.args[0]} exited with status {process.returncode}:\n"
                    + self.tail(process.args[0])
                )

    def tail(self, program: str, lines: int = 30) -> str:
        """The end of a daemon's output and log, for error messages."""
        text = []
        for log in sorted(glob.glob(self.path("log", "*"))):
            if os.path.basename(log).startswith(program.removeprefix("ceph-")[:3]):
                with open(log, errors="replace") as f:
                    text.append(f"== {log}\n" + "".join(f.readlines()[-lines:]))
        return "\n".join(text)

    def wait_until(self, what: str, condition) -> None:
        """Poll *condition* until it is true, a daemon exits, or time is up."""
        deadline = time.monotonic() + _TIMEOUT
        while True:
            self.check_alive()
            with contextlib.suppress(RuntimeError, subprocess.TimeoutExpired):
                if condition():
                    return
            if time.monotonic() > deadline:
                raise TimeoutError(f"Ceph: {what} not after {_TIMEOUT}s")
            time.sleep(0.2)

    # -- start and stop -------------------------------------------------

    def start(self) -> RGW:
        """Monitor, OSD, user, gateway; returns once S3 answers."""
        fsid = str(uuid.uuid4())
        mon_port, rgw_port = free_port(), free_port()
        self.write_conf(fsid, mon_port, rgw_port)
        monmap = self.path("monmap")
        self.run(
            "monmaptool", "--create", "--fsid", fsid,
            "--addv", "a", f"[v1:{HOST}:{mon_port}]", monmap,
        )  # fmt: skip
        self.run("ceph-mon", "--mkfs", "-i", "a", "--monmap", monmap)
        self.spawn("ceph-mon", "-i", "a")
        wait_for_port(mon_port, self.processes[-1], timeout=_TIMEOUT)

        osd_uuid = str(uuid.uuid4())
        osd_id = self.ceph("osd", "new", osd_uuid).strip()
        self.ceph("osd", "crush", "add", f"osd.{osd_id}", "1.0", "root=default")
        os.makedirs(self.path("osd", f"ceph-{osd_id}"))
        self.run("ceph-osd", "--mkfs", "-i", osd_id, "--osd-uuid", osd_uuid)
        self.spawn("ceph-osd", "-i", osd_id)
        self.wait_until("the OSD up", lambda: self.osd_up(int(osd_id)))

        self.spawn("radosgw", "-n", "client.rgw.a")
        self.run(
            "radosgw-admin", "user", "create", "--uid", "test",
            "--display-name", "test", "--access-key", ACCESS_KEY,
            "--secret-key", SECRET_KEY,
        )  # fmt: skip
        rgw = RGW(f"http://{HOST}:{rgw_port}", self.directory)
        self.wait_until("radosgw answering S3", lambda: self.answers(rgw))
        return rgw

    def osd_up(self, osd_id: int) -> bool:
        dump = json.loads(self.ceph("osd", "dump", "--format", "json"))
        return any(o["osd"] == osd_id and o["up"] for o in dump["osds"])

    @staticmethod
    def answers(rgw: RGW) -> bool:
        """Whether the gateway answers an authenticated S3 request."""
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            rgw.client().list_buckets()
        except (BotoCoreError, ClientError):
            return False
        return True

    def stop(self) -> None:
        """Stop our daemons, the gateway first; remove the directory."""
        if self.processes:
            for process in reversed(self.processes):
                _terminate(process.pid, process)
        else:  # another session's cluster: only the recorded pids
            for pid in reversed(self.recorded_pids()):
                if self.names_our_conf(pid):
                    _terminate(pid)
        shutil.rmtree(self.directory, ignore_errors=True)

    def recorded_pids(self) -> list[int]:
        try:
            with open(self.path(_PIDS)) as f:
                return [int(line) for line in f if line.strip()]
        except (OSError, ValueError):
            return []

    def names_our_conf(self, pid: int) -> bool:
        """Whether process *pid* is a daemon of this cluster (not a process
        that reuses the pid of one that ended)."""
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                return self.conf.encode() in f.read().split(b"\0")
        except OSError:
            return False


def _terminate(pid: int, process: subprocess.Popen | None = None) -> None:
    """SIGTERM, up to 10 s to exit, then SIGKILL. A process of another user
    (a pid reused since it was recorded) is left alone."""
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    except PermissionError:
        return
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if process is not None:
            if process.poll() is not None:
                return
        elif not _running(pid):
            return
        time.sleep(0.05)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(pid, signal.SIGKILL)
    if process is not None:
        process.wait(timeout=10)


def _running(pid: int) -> bool:
    """Whether *pid* exists and has not exited (a zombie has)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def stop_abandoned_clusters() -> None:
    """Stop the daemons and remove the directories of clusters whose test
    session no longer runs (killed before its teardown). Those of another
    user (the temporary directory is shared) are not ours to stop."""
    pattern = os.path.join(tempfile.gettempdir(), _PREFIX + "*", _OWNER)
    for owner in glob.glob(pattern):
        try:
            if os.lstat(os.path.dirname(owner)).st_uid != os.geteuid():
                continue
        except OSError:
            continue
        if owner_gone(owner):
            _Cluster(os.path.dirname(owner)).stop()


@contextlib.contextmanager
def rgw_server() -> Iterator[RGW]:
    """Run a new Ceph cluster and radosgw for the duration of the block."""
    stop_abandoned_clusters()
    failures = []
    for _attempt in range(_START_ATTEMPTS):
        cluster = _Cluster()
        try:
            server = cluster.start()
        except Exception as exc:
            failures.append(f"{exc}\n{cluster.tail('')}")
            cluster.stop()
            continue
        try:
            yield server
        finally:
            cluster.stop()
        return
    raise RuntimeError(
        f"Ceph did not start in {_START_ATTEMPTS} attempts:\n" + "\n\n".join(failures)
    )


def require_ceph() -> None:
    """Skip (fail under CI) unless the Ceph binaries are installed."""
    try:
        find_programs()
    except CephMissing as exc:
        if under_ci():
            pytest.fail(f"CI must run the Ceph RGW tests: {exc}")
        pytest.skip(str(exc))


@pytest.fixture(scope="session")
def rgw() -> Iterator[RGW]:
    """The session's RADOS Gateway; skipped (failed under CI) without Ceph."""
    require_ceph()
    with rgw_server() as server:
        yield server
