"""Loading a Blob object downloads nothing; opening it does.

ZODB's ``Connection.setstate`` calls ``storage.loadBlob(oid, serial)`` for
every Blob it unghosts and keeps the returned path in
``blob._p_blob_committed``. With S3 behind the storage that would be a
download per Blob merely loaded (listing a folder of 1000 files would fetch
them all). So when the caller is ``Connection.setstate``, ``loadBlob`` returns
the cache path without fetching; the file is fetched when the blob is opened
(``openCommittedBlobFile``) or ``committed()`` is called (it calls
``loadBlob`` again, from another frame, so ZODB's contract that
``committed()`` returns an existing file holds).

One ZODB path reads the committed file without asking the storage:
``Blob.open('r+')`` and ``Blob.open('a')`` copy ``_p_blob_committed`` into a
new working file. Just before, ``Blob._create_uncommitted_file`` asks the
database's storage for ``temporaryDirectory()``; there the storage recognises
that call chain and fetches the file first.

Both hooks recognise ZODB's functions by their code objects, never by names
or private state. :data:`SUPPORTED` checks, once at import, that the
installed ZODB still has the shape relied on (setstate calls ``loadBlob``;
``open`` copies ``_p_blob_committed`` after ``_create_uncommitted_file``,
which calls ``temporaryDirectory``); if not, every load downloads, as before.
"""

from __future__ import annotations

from types import CodeType, FrameType

from ZODB.blob import Blob
from ZODB.Connection import Connection

_SETSTATE = Connection.setstate.__code__
_OPEN = Blob.open.__code__
_CREATE_UNCOMMITTED = Blob._create_uncommitted_file.__code__
_COPYING_MODES = ("r+", "a")


def _uses(code: CodeType, *names: str) -> bool:
    return all(name in code.co_names for name in names)


SUPPORTED = (
    _uses(_SETSTATE, "loadBlob", "_p_blob_committed")
    # open() copies the committed file with utils.cp in its 'r+' (and, by
    # exclusion, 'a') branch.
    and _uses(_OPEN, "_create_uncommitted_file", "_p_blob_committed", "cp")
    and "r+" in _OPEN.co_consts
    and _uses(_CREATE_UNCOMMITTED, "temporaryDirectory")
)


def called_by_setstate(frame: FrameType | None) -> bool:
    """Is *frame* ZODB's Connection.setstate (loading, not opening, a Blob)?"""
    return SUPPORTED and frame is not None and frame.f_code is _SETSTATE


def blob_about_to_copy(frame: FrameType | None) -> Blob | None:
    """The Blob whose ``open('r+')``/``open('a')`` is about to copy its
    committed file, if *frame* is the ``_create_uncommitted_file`` call of
    that ``open``; else None."""
    if not SUPPORTED or frame is None or frame.f_code is not _CREATE_UNCOMMITTED:
        return None
    opener = frame.f_back
    if opener is None or opener.f_code is not _OPEN:
        return None
    if opener.f_locals.get("mode") not in _COPYING_MODES:
        return None
    blob = opener.f_locals.get("self")
    return blob if isinstance(blob, Blob) and blob._p_blob_committed else None
