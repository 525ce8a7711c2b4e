"""Read-through uploads send only bytes proven equal to their source, and
never recreate the key of a revision packed meanwhile.

A revision read from the fallback is uploaded later, in the background. The
tests hold that upload (they wrap ``ObjectStore.upload_soon`` and queue it
only when they say), do something meanwhile, then let it run to its end."""

from __future__ import annotations

import base64
import os
import stat

import transaction
import ZODB
from ZODB.blob import Blob

import clitools
import s3env
from test_fallback import filestorage_site


def held_uploads(storage) -> list[tuple]:
    """Hold *storage*'s read-through uploads: returned are their arguments,
    for :func:`run_held`."""
    held = []
    storage._store.upload_soon = lambda *args: held.append(args) or True
    return held


def run_held(storage, held: list[tuple]) -> None:
    """Queue the held uploads, and wait until they have ended."""
    store = storage._store
    del store.upload_soon  # the class's own again
    for args in held:
        assert store.upload_soon(*args)
    store._spare.shutdown(wait=True)


def key_exists(key: str) -> bool:
    client = s3env.server().client()
    return client.list_objects_v2(Bucket=s3env.BUCKET, Prefix=key)["KeyCount"] > 0


def object_bytes(key: str) -> bytes:
    client = s3env.server().client()
    return client.get_object(Bucket=s3env.BUCKET, Key=key)["Body"].read()


def first_revision(revisions: dict) -> tuple[tuple[bytes, bytes], bytes]:
    """One old revision with some bytes, and those bytes."""
    return next((ref, data) for ref, data in revisions.items() if len(data) > 100)


def test_a_cached_copy_damaged_while_its_upload_waits_is_not_uploaded(tmp_path):
    """The cached copy of a revision read from the fallback is overwritten
    (a stray writer, root) before its read-through upload runs. Fails before
    the fix: the damaged bytes went to S3 with their own CRC32, and every
    later download passed its checksum with them."""
    revisions, config = filestorage_site(tmp_path)
    (oid, tid), data = first_revision(revisions)
    storage = clitools.open_storage(config)
    try:
        held = held_uploads(storage)
        path = storage.loadBlob(oid, tid)
        assert len(held) == 1
        os.chmod(path, stat.S_IRUSR | stat.S_IWUSR)
        with open(path, "r+b") as f:
            f.write(b"BAD!")
        run_held(storage, held)
        key = storage._layout.key(oid, tid)
    finally:
        storage.close()
    assert object_bytes(key) == data, "the fallback's bytes, never the damaged copy"


def test_a_read_through_upload_does_not_recreate_a_packed_revision(tmp_path):
    """A revision is read from the fallback, then a newer one is committed and
    a pack removes the old one, before the held upload runs. Fails before the
    fix: the upload created the key of a revision no database holds (only
    the next collection would remove it)."""
    revisions, config = filestorage_site(tmp_path)
    storage = clitools.open_storage(config)
    db = ZODB.DB(storage)
    try:
        conn = db.open()
        blob = conn.root()["blobs"][2]  # 3000 bytes, never updated
        held = held_uploads(storage)
        with blob.open() as f:
            assert f.read() == bytes([2]) * 3000
        assert len(held) == 1
        oid, tid = ref(blob)
        assert (oid, tid) in revisions
        with blob.open("w") as f:
            f.write(b"newer")
        transaction.commit()
        conn.close()
        db.pack()
        run_held(storage, held)
        key = storage._layout.key(oid, tid)
    finally:
        db.close()
    assert not key_exists(key), "the packed revision was uploaded again"


def ref(blob: Blob) -> tuple[bytes, bytes]:
    blob._p_activate()
    return blob._p_oid, blob._p_serial


def test_undo_uploads_a_fallback_revision_from_the_fallback(tmp_path):
    """Undoing back to a revision still only in the fallback uploads that
    revision first; its cached copy was damaged meanwhile (same size, other
    bytes). Fails before the fix: undo uploaded the cached copy with a
    CRC32 of its own, and the undo's new revision copied those bytes."""
    revisions, config = filestorage_site(tmp_path, **{"fallback-upload": "false"})
    tids: dict[bytes, list[bytes]] = {}
    for oid, tid in sorted(revisions, key=lambda ref: ref[1]):
        tids.setdefault(oid, []).append(tid)
    oid, (first, second) = next(
        (oid, found[:2])
        for oid, found in tids.items()
        if len(found) >= 2 and revisions[oid, found[0]]
    )
    good = revisions[oid, first]
    storage = clitools.open_storage(config)
    db = ZODB.DB(storage)
    try:
        path = storage.loadBlob(oid, first)  # cached from the fallback
        os.chmod(path, stat.S_IRUSR | stat.S_IWUSR)
        with open(path, "r+b") as f:
            f.write(b"Z" * len(good))
        db.undo(base64.encodebytes(second)[:-1])
        transaction.commit()
        key = storage._layout.key(oid, first)
    finally:
        db.close()
    assert object_bytes(key) == good
