"""The transaction id a base storage commits under, learned at vote.

ZODB 5's storage API hands a wrapper the tid only in ``tpc_finish``, but the
object keys contain it and uploads must finish before ``tpc_vote`` returns
("everything that can fail happens in vote"). Each supported base type says
here, explicitly, where its tid is after its own ``tpc_vote``; the tests pin
each rule against the ZODB versions installed. An unsupported base is refused
when the storage is opened rather than guessed at.
"""

from __future__ import annotations

import functools

from ZODB.BaseStorage import BaseStorage
from ZODB.DemoStorage import DemoStorage
from ZODB.MappingStorage import MappingStorage

from .errors import S3BlobStorageError


class UnsupportedBaseStorage(S3BlobStorageError):
    """The base storage gives no reliable way to learn the tid at vote."""


@functools.singledispatch
def tid_at_vote(storage: object) -> bytes:
    """Return the tid *storage* will commit the voting transaction under."""
    raise UnsupportedBaseStorage(
        f"S3BlobStorage cannot wrap {type(storage).__module__}."
        f"{type(storage).__qualname__}: it cannot learn the transaction id at vote"
    )


def check_supported(storage: object) -> None:
    """Raise UnsupportedBaseStorage now, at open, for a base we cannot serve."""
    if tid_at_vote.dispatch(type(storage)) is tid_at_vote.dispatch(object):
        tid_at_vote(storage)
    if isinstance(storage, DemoStorage):
        check_supported(storage.changes)


@tid_at_vote.register
def _base_storage(storage: BaseStorage) -> bytes:
    # BaseStorage.tpc_begin assigns self._tid (FileStorage and every other
    # BaseStorage subclass commit under it; tpc_finish passes it to func).
    return storage._tid


@tid_at_vote.register
def _mapping_storage(storage: MappingStorage) -> bytes:
    # MappingStorage.tpc_begin assigns self._tid; tpc_finish commits under it.
    return storage._tid


@tid_at_vote.register
def _demo_storage(storage: DemoStorage) -> bytes:
    # DemoStorage commits into its `changes` storage under that storage's tid.
    return tid_at_vote(storage.changes)
