"""The copier of a ZEO client's commits (:mod:`zodb_s3blobs.copier`), on a
journal whose copy can no longer be made: its source is gone. Each test
hands the copier a journal and closes it: ``close`` waits for its thread,
tries what is left once more and releases what is still owed, so the
outcome does not depend on how far the thread got."""

from __future__ import annotations

import errno
import logging
import time
from pathlib import Path

import pytest
from ZODB.utils import p64

import s3env
from zodb_s3blobs.copier import Copier
from zodb_s3blobs.journal import Journal, PendingCopy
from zodb_s3blobs.keys import KeyLayout
from zodb_s3blobs.objectstore import ObjectStore

pytestmark = pytest.mark.s3_servers("moto", "rgw")

OID, TID = p64(0x17), p64(0x03F0_0000_0000_0001)


@pytest.fixture
def parts(tmp_path):
    """An ObjectStore and layout under a new prefix, and a journal directory."""
    settings = s3env.settings()
    store = ObjectStore(settings)
    try:
        yield store, KeyLayout(settings.prefix), tmp_path
    finally:
        store.close()


def journal_of(directory: Path, copy: PendingCopy) -> Journal:
    """A journal of one copy whose tid is recorded, as tpc_finish leaves it."""
    journal = Journal.create(str(directory), [copy], p64(1), "", "")
    journal.record_tid(TID)
    return journal


def complete(
    store: ObjectStore, layout: KeyLayout, journal: Journal, deleted: list
) -> None:
    """Let a copier complete *journal* (recording the staging keys it
    deletes in *deleted*), and close it."""
    copier = Copier(store, layout, lambda journal: None, deleted.extend)
    copier.add(journal)
    copier.close()


def copier_records(caplog) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "zodb_s3blobs.copier"]


def test_a_copy_whose_staging_source_is_gone_is_given_up_as_lost(parts, caplog):
    """Source 404 and target absent: the revision's blob is lost; the copier
    says so once, as an ERROR naming oid, tid and staging key, and drops the
    journal instead of retrying it for ever.

    Fails before the fix: the copy was retried for ever, and the journal
    stayed."""
    store, layout, directory = parts
    staging = layout.staging_key()
    journal = journal_of(directory, PendingCopy(staging, OID, "0000abcd", True))
    deleted: list[str] = []
    with caplog.at_level(logging.ERROR, "zodb_s3blobs.copier"):
        complete(store, layout, journal, deleted)
    [record] = copier_records(caplog)
    message = record.getMessage()
    assert record.levelno == logging.ERROR
    for part in ("0x17", "0x03f0000000000001", staging, "lost", "verify"):
        assert part in message, part
    assert list(directory.glob("pending-*")) == []
    assert deleted == [staging]
    assert store.stat(layout.key(OID, TID)) is None


def test_a_copy_whose_source_is_gone_but_target_landed_is_dropped(parts, caplog):
    """An earlier copy landed (an undo copy, recorded without a CRC32, so
    not recognised by its checksum) before its source went: the journal is
    done, without an error.

    Fails before the fix: the copy was retried for ever."""
    store, layout, directory = parts
    target = layout.key(OID, TID)
    s3env.server().client().put_object(Bucket=s3env.BUCKET, Key=target, Body=b"x")
    source = layout.key(OID, p64(0x03F0_0000_0000_0000))
    journal = journal_of(directory, PendingCopy(source, OID, None, False))
    with caplog.at_level(logging.WARNING, "zodb_s3blobs.copier"):
        complete(store, layout, journal, [])
    assert copier_records(caplog) == []
    assert list(directory.glob("pending-*")) == []
    assert store.stat(target) is not None


def test_a_copy_whose_source_is_there_is_retried(parts, monkeypatch):
    """A copy that fails while its source exists (S3 refusing) is kept and
    retried: giving up needs the source confirmed gone."""
    store, layout, directory = parts
    staging = layout.staging_key()
    s3env.server().client().put_object(Bucket=s3env.BUCKET, Key=staging, Body=b"x")
    journal = journal_of(directory, PendingCopy(staging, OID, None, True))

    def refused(uploads, copies):
        raise OSError("503 SlowDown")

    monkeypatch.setattr(store, "transfer", refused)
    deleted: list[str] = []
    complete(store, layout, journal, deleted)
    assert [Path(journal.path)] == list(directory.glob("pending-*"))
    assert deleted == []


def test_a_journal_that_cannot_be_removed_does_not_stop_the_copier(
    parts, monkeypatch, caplog
):
    """Removing the first completed journal fails (EMFILE): the copier logs
    it, deletes its staging object, and still completes a journal added
    afterwards, without being closed.

    Fails before the fix: the OSError ended the copier's thread, and add()
    never started another: later copies waited for the next start."""
    store, layout, directory = parts
    client = s3env.server().client()
    stagings = [layout.staging_key() for _ in range(2)]
    journals = []
    for index, staging in enumerate(stagings):
        client.put_object(Bucket=s3env.BUCKET, Key=staging, Body=b"x")
        oid = p64(0x20 + index)
        journals.append(journal_of(directory, PendingCopy(staging, oid, None, True)))
    remove = Journal.remove

    def fails_once(journal):
        monkeypatch.setattr(Journal, "remove", remove)
        raise OSError(errno.EMFILE, "Too many open files")

    monkeypatch.setattr(Journal, "remove", fails_once)
    deleted: list[str] = []
    copier = Copier(store, layout, lambda journal: None, deleted.extend)
    try:
        with caplog.at_level(logging.ERROR, "zodb_s3blobs.copier"):
            for journal in journals:
                copier.add(journal)
                copier._thread.join()  # runs until nothing is owed
        assert deleted == stagings
        for index in range(2):
            assert store.stat(layout.key(p64(0x20 + index), TID)) is not None
        assert [r.getMessage() for r in copier_records(caplog)] == [
            f"Could not remove {journals[0].path}"
        ]
        assert list(directory.glob("pending-*")) == [Path(journals[0].path)]
    finally:
        copier.close()


@pytest.mark.s3_servers("moto")
def test_close_spends_a_bounded_time_on_copies_s3_refuses(parts, monkeypatch):
    """S3 refuses every copy (their sources exist), each attempt taking its
    time: close tries the journals owed until CLOSE_DEADLINE has passed, then
    releases the others for the next start, rather than trying each with the
    full retry budget (minutes with S3 unreachable). Fails before the fix
    (every journal was tried). A deadline of 0.05 s and attempts of 0.1 s
    stand for the default's 30 s and a real attempt's retries."""
    import zodb_s3blobs.copier as copier_module

    store, layout, directory = parts
    attempts = []

    def refused(uploads, copies):
        attempts.append(copies)
        time.sleep(0.1)
        raise OSError(errno.EIO, "refused")

    monkeypatch.setattr(store, "transfer", refused)
    monkeypatch.setattr(copier_module, "CLOSE_DEADLINE", 0.05)
    copier = Copier(store, layout, lambda journal: None, lambda keys: None)
    for n in range(3):
        source = layout.staging_key()
        store._client.put_object(Bucket=store.bucket, Key=source, Body=b"x")
        (directory / str(n)).mkdir()
        copy = PendingCopy(source, OID, "0000abcd", True)
        # Owed at close, the copier's thread not started: only close tries.
        copier._journals.append(journal_of(directory / str(n), copy))
    copier.close()
    assert len(attempts) == 1
    assert copier.pending() == 0
    for n in range(3):
        assert len(list((directory / str(n)).glob("pending-*"))) == 1, "kept"
