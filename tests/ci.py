"""Whether the tests run under CI, where a missing system package (PostgreSQL,
Ceph) fails the tests that need it instead of skipping them."""

from __future__ import annotations

import os


def under_ci() -> bool:
    """``CI`` set to anything but empty, ``0``, ``false`` or ``no``."""
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")
