"""The boot a cache directory was last checked in: ``locks/boot``.

A power loss may leave the files a cache installed but had not yet flushed
empty or zero-filled under their final names, and roll back the index's
last transactions. The first process to open the cache after a machine
restart checks the files against the index (see ``BlobCache``); this file
records the boot id (:func:`.cacheindex.boot_id`) once that check, or the
creation of a new index, is done in this boot. It lives outside the index
and is flushed when written, so that an index a power loss damaged or
removed still lets a restart be noticed.
"""

from __future__ import annotations

import os

from .safefiles import UnsafeFileError, read_checked, replace_atomically

#: The name of the record under ``locks/``.
NAME = "boot"
#: A boot id is 36 characters; anything much larger was not written here.
_LIMIT = 256
#: What a record this user did not write counts as: a boot id no kernel
#: gives (the restart check runs).
UNTRUSTED = "(unreadable)"
#: What a record that could not be read now counts as (out of descriptors,
#: an I/O error): no evidence of a restart either way.
UNKNOWN = "(unknown)"


def read(locks_dir: str) -> str | None:
    """The boot id recorded in *locks_dir*; None if there is no record;
    :data:`UNTRUSTED` for a file this user did not write as one (never
    equal to a boot id: the restart check runs); :data:`UNKNOWN` when it
    could not be read."""
    try:
        return read_checked(os.path.join(locks_dir, NAME), os.geteuid(), _LIMIT).decode(
            "ascii"
        )
    except FileNotFoundError:
        return None
    except (UnsafeFileError, UnicodeDecodeError):
        return UNTRUSTED
    except OSError:
        return UNKNOWN


def write(locks_dir: str, boot: str) -> None:
    """Record *boot* in *locks_dir*, on disk when this returns (created under
    an unpredictable name with ``O_EXCL | O_NOFOLLOW``, mode 0600, flushed,
    renamed into place, the directory flushed)."""
    replace_atomically(
        os.path.join(locks_dir, NAME), boot.encode("ascii"), 0o600, durable=True
    )
