"""What the streaming collector reports about the keys S3 actually deleted:
``on_orphan`` (``gc --list``, the in-S3 memory, the cached copies) must hear
of every key that is gone, whatever stops the collection afterwards."""

from __future__ import annotations

import pytest
import ZODB
from ZODB.utils import p64

from test_gc import blob_revisions
from test_storage import keys
from zodb_s3blobs import gc
from zodb_s3blobs.errors import ObjectStoreError

pytestmark = pytest.mark.s3_servers("moto")


def _orphans(storage, tmp_path, count: int) -> list[str]:
    """*count* keys of revisions the base never had, below its last commit."""
    f = tmp_path / "f"
    f.write_bytes(b"orphan")
    orphans = [storage._layout.key(p64(10_000 + n), p64(5)) for n in range(count)]
    storage._store.transfer([(str(f), k) for k in orphans], [])
    return orphans


def test_keys_deleted_before_a_later_failure_are_reported(
    make_storage, tmp_path, monkeypatch
):
    """A full batch (1000 keys, the default) goes out while the listing runs;
    then the collection fails (here the listing of incomplete uploads). S3
    deleted the batch, yet *on_orphan* never hears of it: ``gc --list`` omits
    1000 deleted keys, their cached copies stay, and pack logs that the
    orphans "stay in S3". Fails on the current code."""
    storage = make_storage(gc_retention=0)
    db = ZODB.DB(storage)
    blob_revisions(db, [b"live"])
    orphans = _orphans(storage, tmp_path, 1000)

    def failing(prefix):
        raise ObjectStoreError("LIST uploads", prefix, "connection reset")
        yield  # pragma: no cover

    monkeypatch.setattr(storage._store, "list_uploads", failing)
    reported = []
    with pytest.raises(ObjectStoreError, match="connection reset"):
        storage.collect_orphans(on_orphan=reported.append)
    gone = set(orphans) - set(keys(storage))
    assert gone, "the batch was deleted before the failure"
    assert set(reported) == gone
    db.close()


def test_keys_s3_deleted_in_a_partly_refused_batch_are_reported(
    make_storage, tmp_path, monkeypatch
):
    """S3 answers DeleteObjects with an error for one key of the batch and
    deletes the others (``ObjectStore.delete`` then raises, as here). The
    keys S3 deleted are neither counted in ``deleted`` nor passed to
    *on_orphan*, and the error says all three could not be deleted. Failed
    before the refused keys were told apart from the deleted ones."""
    storage = make_storage(gc_retention=0)
    db = ZODB.DB(storage)
    blob_revisions(db, [b"live"])
    orphans = _orphans(storage, tmp_path, 3)
    client = storage._store._client
    delete_objects = client.delete_objects

    def one_refused(Bucket, Delete):
        """S3's answer when one key may not be deleted: the others are."""
        first, *others = Delete["Objects"]
        delete_objects(Bucket=Bucket, Delete={**Delete, "Objects": others})
        error = {"Key": first["Key"], "Code": "AccessDenied", "Message": "Denied"}
        return {"Errors": [error]}

    monkeypatch.setattr(client, "delete_objects", one_refused)
    reported = []
    with pytest.raises(gc.OrphansNotDeleted) as raised:
        storage.collect_orphans(on_orphan=reported.append)
    gone = set(orphans) - set(keys(storage))
    assert gone == set(orphans[1:])
    assert set(reported) == gone
    assert raised.value.report.deleted == len(gone)
    assert orphans[0] in str(raised.value)
    assert orphans[1] not in str(raised.value)
    db.close()
