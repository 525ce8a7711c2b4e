"""Files in directories other local users may write: node_exporter's
textfile folder (often group-writable, without the sticky bit), ``/var/tmp``.

Such a directory is hostile. Another user can plant a symbolic link where a
file will be created (and have it follow the link to overwrite any file this
user may write), a FIFO where a file will be opened (and hang the opener), or
a file of their own where one of ours is expected. So files are created with
``O_CREAT | O_EXCL | O_NOFOLLOW`` under unpredictable names and renamed into
place, and read only when ``fstat`` says they are regular files of the
expected user that no other user may write, opened without following a link
and without blocking, and within a size bound.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import stat

#: Flags of every open here: never through a link, never blocking on a FIFO
#: or a device, never inherited by a child process.
_OPEN_FLAGS = os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
_CREATE_FLAGS = os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
#: Names tried before giving up, should random names collide.
_ATTEMPTS = 100


class UnsafeFileError(Exception):
    """A file that is not what it must be: the message names the file and
    why, and quotes none of its content."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"{path} {reason}")
        self.path = path
        self.reason = reason


def open_checked(
    path: str, flags: int, owner: int, limit: int | None, single_link: bool = False
) -> int:
    """A file descriptor (the caller's to close) of the existing *path*,
    opened with *flags*, once ``fstat`` shows a regular file of user
    *owner*, of at most *limit* bytes (None: any size), which group and
    others may not write, and with *single_link*, with no other name (a
    hard link another user made, where the kernel lets them, to a file of
    this user's would be written through). FileNotFoundError if it does not exist,
    UnsafeFileError if it is not such a file."""
    try:
        fd = os.open(path, flags | _OPEN_FLAGS)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise UnsafeFileError(path, "is a symbolic link") from None
        raise
    try:
        st = os.fstat(fd)
        _check(path, st, owner, limit)
        if single_link and st.st_nlink > 1:
            raise UnsafeFileError(
                path, f"has {st.st_nlink} hard links: it may be another file"
            )
    except BaseException:
        os.close(fd)
        raise
    return fd


def _check(path: str, st: os.stat_result, owner: int, limit: int | None) -> None:
    if not stat.S_ISREG(st.st_mode):
        raise UnsafeFileError(path, "is not a regular file")
    if st.st_uid != owner:
        raise UnsafeFileError(path, f"belongs to user {st.st_uid}, not {owner}")
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise UnsafeFileError(
            path,
            f"has mode {stat.S_IMODE(st.st_mode):#o}: group or others may write it",
        )
    if limit is not None and st.st_size > limit:
        raise UnsafeFileError(path, f"holds more than {limit} bytes")


def read_checked(path: str, owner: int, limit: int) -> bytes:
    """The bytes of *path*, checked as :func:`open_checked` does; at most
    *limit* even if it grows while read."""
    fd = open_checked(path, os.O_RDONLY, owner, limit)
    with open(fd, "rb") as file:
        data = file.read(limit + 1)
    if len(data) > limit:
        raise UnsafeFileError(path, f"holds more than {limit} bytes")
    return data


def create_new(path: str, flags: int, mode: int) -> int:
    """A file descriptor of a new file at *path*, created with *mode* (less
    the umask); FileExistsError if anything, a link too, is there."""
    return os.open(path, flags | _CREATE_FLAGS, mode)


def replace_atomically(
    path: str, data: bytes, mode: int, durable: bool = False
) -> None:
    """Replace *path* with a file of *data* and exactly *mode* (whatever the
    umask: readers refuse a file group or others may write), written to a
    new ``<path>.<pid>.<16 hex digits>`` beside it, then renamed over it, so
    that readers see the old file or the new one, and nothing planted beside
    it is followed or opened. *durable*: the file is flushed before the
    rename and the directory after it, so that a power loss leaves the old
    file or the whole new one."""
    fd, temp = _new_beside(path)
    try:
        with open(fd, "wb") as file:
            file.write(data)
            os.fchmod(file.fileno(), mode)
            if durable:
                file.flush()
                os.fsync(file.fileno())
        os.replace(temp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(temp)
        raise
    if durable:
        directory = os.open(os.path.dirname(path) or ".", os.O_RDONLY | _OPEN_FLAGS)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)


def _new_beside(path: str) -> tuple[int, str]:
    """A new file, open for writing, under an unpredictable name beside
    *path*, and that name."""
    for _ in range(_ATTEMPTS):
        temp = f"{path}.{os.getpid()}.{secrets.token_hex(8)}"
        try:
            return create_new(temp, os.O_WRONLY, 0o600), temp
        except FileExistsError:
            continue
    raise FileExistsError(
        errno.EEXIST, f"no free temporary name beside it in {_ATTEMPTS} tries", path
    )
