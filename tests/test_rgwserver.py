"""The Ceph RGW fixture's own safety rules (tests/rgwserver.py): daemons end
with the test process, other users' clusters are left alone, and ``CI=false``
is not CI. None of these start Ceph."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import rgwserver

TESTS = str(Path(__file__).resolve().parent)

#: A parent that starts ``sleep`` as a daemon, prints its pid, and dies.
PARENT = """
import sys
sys.path.insert(0, {tests!r})
import rgwserver
if {fallback!r}:
    rgwserver._SETPRIV = None
import ctypes
def refuse(*args, **kwargs):
    raise AssertionError("ctypes.CDLL called after import")
ctypes.CDLL = refuse  # the child must resolve nothing
child = rgwserver.popen_daemon(["sleep", "60"])
print(child.pid, flush=True)
"""


def _gone(pid: int) -> bool:
    return not rgwserver._running(pid)


@pytest.mark.parametrize("fallback", [False, True], ids=["setpriv", "prctl"])
def test_a_daemon_ends_with_the_process_that_started_it(fallback):
    """A daemon gets SIGTERM when the test process dies, and the forked child
    calls nothing that needs resolving (ctypes.CDLL in the child can deadlock
    in a threaded parent).

    Fails before the fix: the child called ctypes.CDLL(None) (here made to
    raise), so the daemon did not start."""
    if not fallback and rgwserver._SETPRIV is None:
        pytest.skip("no setpriv on this machine")
    code = PARENT.format(tests=TESTS, fallback=fallback)
    parent = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=30
    )
    assert parent.returncode == 0, parent.stderr
    pid = int(parent.stdout)
    deadline = time.monotonic() + 10
    while not _gone(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    if not _gone(pid):
        os.kill(pid, signal.SIGKILL)
        pytest.fail("the daemon outlived the process that started it")


def test_another_users_cluster_is_left_alone(tmp_path, monkeypatch):
    """A cluster directory of another user in the shared temporary directory,
    whose session is gone, is neither stopped nor removed; a pid that belongs
    to another user (os.kill raises PermissionError) does not fail the run.

    Fails before the fix: the directory was removed (as root), and a
    PermissionError from os.kill ended the fixture with an error."""
    if os.geteuid() != 0:
        pytest.skip("making a directory of another user needs root")
    monkeypatch.setattr(rgwserver.tempfile, "gettempdir", lambda: str(tmp_path))
    theirs = tmp_path / f"{rgwserver._PREFIX}theirs"
    theirs.mkdir()
    dead = subprocess.Popen(["true"])
    dead.wait()
    (theirs / rgwserver._OWNER).write_text(str(dead.pid))
    os.chown(theirs, 4242, 4242)
    rgwserver.stop_abandoned_clusters()
    assert theirs.is_dir()

    def refused(pid, sig):
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(rgwserver.os, "kill", refused)
    rgwserver._terminate(12345)  # does not raise


@pytest.mark.parametrize("value", ["", "0", "false", "False", "no"])
def test_ci_false_is_not_ci(monkeypatch, value):
    """``CI=false`` (or 0, or empty) skips the RGW tests without Ceph, as
    without CI; ``CI=true`` fails them.

    Fails before the fix: any value of CI, "false" included, failed them."""
    monkeypatch.setattr(rgwserver.shutil, "which", lambda name: None)
    monkeypatch.setenv("CI", value)
    with pytest.raises(pytest.skip.Exception):
        rgwserver.require_ceph()
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception):
        rgwserver.require_ceph()
