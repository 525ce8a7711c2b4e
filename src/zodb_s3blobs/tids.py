"""The transaction id a base storage commits under, learned at vote.

ZODB 5's storage API hands a wrapper the tid only in ``tpc_finish``, but the
object keys contain it and uploads must finish before ``tpc_vote`` returns
("everything that can fail happens in vote"). Each supported base type says
here, explicitly, where its tid is after its own ``tpc_vote``; the tests pin
each rule against the ZODB versions installed. An unsupported base is refused
when the storage is opened rather than guessed at.

Where the tid is fixed in ``tpc_begin`` (``tid_at_begin``), uploads start at
``storeBlob``. RelStorage chooses its tid late, in ``tpc_finish``, unless it
locks early; for a transaction with blobs this module makes it lock early, at
vote (see ``_relstorage_tid``), after the large blobs' staged uploads have
finished, so the database's commit lock is held only while small blobs
upload and staged ones are copied server-side. The rule uses RelStorage
internals, so it is enabled only for the RelStorage major versions it is
tested with.

ZEO's ``ClientStorage`` learns its tid only from the server's answer to
``tpc_finish`` (``tid_at_finish``): its blobs go to staging keys at
``storeBlob`` and are copied to their revisions' keys after the commit (see
:mod:`zodb_s3blobs.copier`).
"""

from __future__ import annotations

import functools
import importlib.metadata
import sys

from ZODB.DemoStorage import DemoStorage
from ZODB.FileStorage import FileStorage
from ZODB.MappingStorage import MappingStorage

from .errors import S3BlobStorageError


class UnsupportedBaseStorage(S3BlobStorageError):
    """The base storage cannot be wrapped: it gives no reliable way to learn
    the tid at vote, or it is set up to keep blobs itself."""


@functools.singledispatch
def tid_at_vote(storage: object) -> bytes:
    """Return the tid *storage* will commit the voting transaction under."""
    raise UnsupportedBaseStorage(
        f"S3BlobStorage cannot wrap {type(storage).__module__}."
        f"{type(storage).__qualname__}: it cannot learn the transaction id at vote"
    )


def check_supported(storage: object) -> None:
    """Raise UnsupportedBaseStorage now, at open, for a base we cannot serve."""
    _register_relstorage()
    _register_zeo()
    _check(storage)


@functools.singledispatch
def _check(storage: object) -> None:
    """Refuse a base without a tid_at_vote rule; bases may add checks."""
    if tid_at_finish(storage):
        return
    if tid_at_vote.dispatch(type(storage)) is tid_at_vote.dispatch(object):
        tid_at_vote(storage)


@functools.singledispatch
def tid_at_finish(storage: object) -> bool:
    """Does *storage* learn its tid only when its ``tpc_finish`` returns it?
    Its blobs are then copied to their revisions' keys after the commit
    (:mod:`zodb_s3blobs.copier`) rather than at vote."""
    return False


@_check.register
def _check_demo_storage(storage: DemoStorage) -> None:
    """A DemoStorage commits into its changes storage: check that one."""
    _check(storage.changes)


@tid_at_vote.register
def _file_storage(storage: FileStorage) -> bytes:
    # BaseStorage.tpc_begin assigns self._tid, and FileStorage commits under
    # it (its _finish writes that tid). Only FileStorage is registered, not
    # BaseStorage: a subclass may choose its tid in tpc_finish instead (NEO's
    # client storage does), and its _tid would name wrong keys.
    return storage._tid


@tid_at_vote.register
def _mapping_storage(storage: MappingStorage) -> bytes:
    # MappingStorage.tpc_begin assigns self._tid; tpc_finish commits under it.
    return storage._tid


@tid_at_vote.register
def _demo_storage(storage: DemoStorage) -> bytes:
    # DemoStorage commits into its `changes` storage under that storage's tid.
    return tid_at_vote(storage.changes)


@functools.singledispatch
def tid_at_begin(storage: object) -> bytes | None:
    """The tid *storage* will commit the transaction it began under, if the
    base fixes it in ``tpc_begin`` (so uploads can start at ``storeBlob``);
    None for a base that chooses it later (RelStorage: under its commit lock)."""
    return None


@tid_at_begin.register(FileStorage)
@tid_at_begin.register(MappingStorage)
def _tid_chosen_at_begin(storage) -> bytes:
    # Both assign self._tid in tpc_begin (see _file_storage, _mapping_storage).
    return tid_at_vote(storage)


@tid_at_begin.register
def _demo_storage_begin(storage: DemoStorage) -> bytes | None:
    # DemoStorage.tpc_begin calls its changes storage's tpc_begin at once.
    return tid_at_begin(storage.changes)


@functools.singledispatch
def reuses_aborted_tid(storage: object) -> bool:
    """May *storage* give the next transaction the tid of an aborted one? Then
    an abort must delete its objects before the base releases its commit lock.
    True unless a base's rule says otherwise."""
    return True


@reuses_aborted_tid.register
def _file_storage_tids(storage: FileStorage) -> bool:
    # BaseStorage.tpc_begin moves self._ts past the tid it assigns, whether
    # the transaction commits or aborts, and one FileStorage has one writer.
    return False


@reuses_aborted_tid.register
def _demo_storage_tids(storage: DemoStorage) -> bool:
    return reuses_aborted_tid(storage.changes)


#: The RelStorage major versions whose commit phases ``_relstorage_tid`` was
#: written against and is tested with (tests/test_relstorage.py).
TESTED_RELSTORAGE_MAJORS = (4,)


def _register_relstorage() -> None:
    """Register the RelStorage rules once relstorage is imported.

    A RelStorage cannot exist before its module is imported, and importing
    RelStorage here would slow down every user who does not use it."""
    module = sys.modules.get("relstorage.storage")
    if module is None or module.RelStorage in tid_at_vote.registry:
        return
    tid_at_vote.register(module.RelStorage, _relstorage_tid)
    _check.register(module.RelStorage, _check_relstorage)


def _check_relstorage(storage) -> None:
    """Refuse an untested RelStorage version, and a RelStorage with a blob-dir
    of its own (its blobs would not go to S3)."""
    from relstorage.blobhelper.interfaces import INoBlobHelper

    version = importlib.metadata.version("RelStorage")
    if int(version.split(".")[0]) not in TESTED_RELSTORAGE_MAJORS:
        tested = ", ".join(f"{major}.x" for major in TESTED_RELSTORAGE_MAJORS)
        raise UnsupportedBaseStorage(
            f"S3BlobStorage cannot wrap RelStorage {version}: it learns the "
            "transaction id at vote from RelStorage's commit phases, which it "
            f"is tested with for RelStorage {tested} only (zodb_s3blobs/tids.py)"
        )
    if not INoBlobHelper.providedBy(storage.blobhelper):
        raise UnsupportedBaseStorage(
            f"The wrapped RelStorage {storage.getName()!r} has a blob-dir: remove "
            "blob-dir (and shared-blob-dir) from its <relstorage> section; its "
            "blobs are stored in S3"
        )


def _relstorage_tid(storage) -> bytes:
    """Make RelStorage take its commit lock and choose the tid now, at vote,
    for this transaction only, and return that tid."""
    # RelStorage 4: RelStorage.tpc_vote (relstorage/storage/__init__.py)
    # leaves the vote state in storage._tpc_phase. In
    # relstorage/storage/tpc/vote.py, AbstractVote._vote takes the commit lock
    # and allocates the tid at vote only with LOCK_EARLY (env
    # RELSTORAGE_LOCK_EARLY) or when a shared blob dir must move files; both
    # call self._lock_and_move(vote_only=True), which locks, chooses the tid,
    # moves the rows and sets committing_tid_lock.tid; AbstractVote.tpc_finish
    # then finds the move done and only commits. Otherwise the tid is chosen
    # in tpc_finish.
    # Here we take the same early path for this one transaction (it has blobs
    # to upload or copy); undo and restore have locked already. The price:
    # the database's commit lock is held while the blobs below
    # s3-staged-copy-threshold upload and the staged ones are copied.
    phase = storage._tpc_phase
    if phase.committing_tid_lock is None:
        phase._lock_and_move(vote_only=True)
    return phase.committing_tid_lock.tid


def _register_zeo() -> None:
    """Register the ClientStorage rules once ZEO is imported (as for
    RelStorage: a ClientStorage cannot exist before)."""
    module = sys.modules.get("ZEO.ClientStorage")
    if module is None or module.ClientStorage in tid_at_finish.registry:
        return
    tid_at_finish.register(module.ClientStorage, lambda storage: True)
    _check.register(module.ClientStorage, _check_client_storage)


def _check_client_storage(storage) -> None:
    """Refuse a ZEO client with a blob-dir of its own: its blob cache would
    stay empty and mislead (or, shared, write into the server's blob dir)."""
    if storage.blob_dir:
        raise UnsupportedBaseStorage(
            f"The wrapped ZEO client {storage.getName()!r} has blob-dir "
            f"{storage.blob_dir!r}: remove blob-dir (and shared-blob-dir) from "
            "its <zeoclient> section; its blobs are stored in S3 and cached in "
            "cache-dir"
        )
