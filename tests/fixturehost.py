"""What the server fixtures (PostgreSQL, Ceph) ask of the host: whether the
tests run under CI, where a missing system package fails the tests that need
it instead of skipping them, and whether a process they started lives."""

from __future__ import annotations

import os


def under_ci() -> bool:
    """``CI`` set to anything but empty, ``0``, ``false`` or ``no``."""
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def owner_gone(owner_file: str) -> bool:
    """Whether the process whose pid *owner_file* holds no longer runs (a
    file that cannot be read, or holds no pid, is not known to be gone)."""
    try:
        with open(owner_file) as f:
            pid = int(f.read())
    except (OSError, ValueError):
        return False
    return not process_alive(pid)


def process_alive(pid: int) -> bool:
    """Whether process *pid* exists (possibly another user's)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
