"""``<s3blobstorage>`` around ``<zeoclient>``: each ZEO client talks to S3
itself and the ZEO server keeps records only (a FileStorage without
blob-dir), as Plone's instance generator configures it.

The server is ``runzeo`` started by the test on a free port of 127.0.0.1
(one per module: each test uses a bucket prefix of its own, and reads only
the objects it wrote). The clients are real OS processes
(:class:`dbprocess.DatabaseProcess`) or storages in this process.
"""

from __future__ import annotations

import contextlib
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import transaction
import ZEO
import ZODB
import ZODB.config
from ZEO.Exceptions import ClientDisconnected
from ZODB.blob import Blob
from ZODB.Connection import TransactionMetaData
from ZODB.POSException import ConflictError
from ZODB.serialize import referencesf

import clitools
import s3env
from dbprocess import DatabaseProcess
from deploy import blob_key, bucket_keys, payload
from faultserver import Faults, faulty_s3
from test_commit_path import read_back, store_blob
from zeoserver import runzeo, zeoclient_section
from zodb_s3blobs import journal
from zodb_s3blobs.keys import KeyLayout


@dataclass
class ZEOSite:
    """A runzeo server, and clients of it that share one bucket prefix."""

    port: int
    directory: Path
    prefix: str

    def config(self, cache_dir: Path, endpoint: str | None = None) -> str:
        text = s3env.zconfig(zeoclient_section(self.port), str(cache_dir), self.prefix)
        if endpoint is not None:
            text = text.replace(s3env.server().endpoint_url, endpoint)
        return text

    def storage(self, cache_dir: Path):
        return ZODB.config.storageFromString(self.config(cache_dir))

    def process(self, name: str, endpoint: str | None = None) -> DatabaseProcess:
        home = self.directory / name
        return DatabaseProcess(self.config(home / "cache", endpoint), home)

    def staging_keys(self) -> list[str]:
        client = s3env.server().client()
        listed = client.list_objects_v2(
            Bucket=s3env.BUCKET, Prefix=KeyLayout(self.prefix).staging_root
        )
        return [item["Key"] for item in listed.get("Contents", ())]


@pytest.fixture(scope="module")
def zeo_port(tmp_path_factory) -> Iterator[int]:
    """runzeo serving a FileStorage without blob-dir (its root created),
    for the module."""
    directory = tmp_path_factory.mktemp("zeo")
    section = f"<filestorage>\n  path {directory / 'Data.fs'}\n</filestorage>"
    with runzeo(directory, section) as port:
        yield port


@pytest.fixture
def site(zeo_port, tmp_path) -> ZEOSite:
    return ZEOSite(zeo_port, tmp_path, s3env.new_prefix())


def commit_blob(db: ZODB.DB, name: str, data: bytes) -> tuple[bytes, bytes]:
    """Write root[name] as a blob holding *data*; return (oid, tid)."""
    tm = transaction.TransactionManager()
    root = db.open(tm).root()
    if name not in root:
        root[name] = Blob()
    with root[name].open("w") as f:
        f.write(data)
    tm.commit()
    blob = root[name]
    blob._p_activate()  # committed blobs are ghosts
    oid, tid = blob._p_oid, blob._p_serial
    tm.abort()
    return oid, tid


def test_a_client_commits_to_s3_and_the_server_keeps_records_only(site):
    """The blob lands under its revision's key, staging is emptied, and the
    writer reads it from its cache without a download."""
    db = ZODB.DB(site.storage(site.directory / "cache"))
    try:
        data = payload()
        oid, tid = commit_blob(db, "b", data)
        db.storage._shared.copier.close()  # waits for the copy
        assert bucket_keys(site.prefix) == [blob_key(site.prefix, oid, tid)]
        assert site.staging_keys() == []
        with open(db.storage.loadBlob(oid, tid), "rb") as f:
            assert f.read() == data
        assert db.storage.stats()["cache_misses"] == 0
    finally:
        db.close()


def test_a_client_with_a_blob_dir_is_refused(site):
    config = site.config(site.directory / "cache").replace(
        "storage 1", f"storage 1\n    blob-dir {site.directory / 'zeo-blobs'}"
    )
    with pytest.raises(Exception, match="remove blob-dir .* <zeoclient>"):
        ZODB.config.storageFromString(config)


def test_two_processes_read_each_others_blobs_right_after_commit(site):
    """200 rounds: each process commits a blob, the other reads it at once
    (its copy to the revision's key may not have landed: the reader waits
    for a fresh revision rather than fail)."""
    with site.process("a") as a, site.process("b") as b:
        _exchange_blobs(a, b, 200)
    assert site.staging_keys() == []


def test_two_processes_exchange_blobs_under_20_percent_slowdown(site):
    """The same 200 rounds with every S3 request of both processes (uploads,
    HEADs, copies, downloads, deletes) answered ``503 SlowDown`` one time in
    five, with the default retry settings: no commit and no read fails."""
    faults = Faults(error_rate=0.2)
    with (
        faulty_s3(faults) as s3,
        site.process("a", s3.endpoint_url) as a,
        site.process("b", s3.endpoint_url) as b,
    ):
        _exchange_blobs(a, b, 200)
    injected = {note.split(" ")[1] for note in faults.injected}
    assert injected >= {"PUT", "HEAD", "GET", "POST"}, injected
    assert site.staging_keys() == []


def _exchange_blobs(a: DatabaseProcess, b: DatabaseProcess, rounds: int) -> None:
    """*rounds* times, one process commits a blob and the other reads that
    revision as soon as it sees it; they take turns."""
    for round_ in range(rounds):
        writer, reader = (a, b) if round_ % 2 == 0 else (b, a)
        name = f"r{round_ // 2 % 5}"
        data = payload(2000).hex()
        written = writer.call("write", name=name, data=data)
        read = _read_revision(reader, name, written["tid"])
        assert read["data"] == data, round_


def _read_revision(process: DatabaseProcess, name: str, tid: str) -> dict:
    """Read root[name] in *process* as soon as it sees revision *tid* (ZEO's
    invalidation may reach it a moment after the writer's commit returns; a
    new name is missing until then)."""
    for _attempt in range(1000):
        seen = process.call("revision", name=name)["tid"]
        if seen == tid:
            read = process.call("read", name=name)
            assert read["tid"] == tid
            return read
        assert seen is None or seen < tid
    raise AssertionError(f"revision {tid} of {name} never became visible")


def test_readers_wait_for_a_copy_the_fault_server_delays(site):
    """The writer talks to S3 through a server that holds each copy half a
    second and then answers 20% of them 503 SlowDown: the other process, on
    the plain server, still reads every revision at once."""

    def is_copy(environ) -> bool:
        return "HTTP_X_AMZ_COPY_SOURCE" in environ

    faults = Faults(error_rate=0.2, stall=0.5, when=is_copy)
    with (
        faulty_s3(faults) as s3,
        site.process("a", s3.endpoint_url) as a,
        site.process("b") as b,
    ):
        for round_ in range(20):
            data = payload(2000).hex()
            written = a.call("write", name="x", data=data)
            read = _read_revision(b, "x", written["tid"])
            assert read["data"] == data, round_
    assert any(note.startswith("503") for note in faults.injected)
    assert site.staging_keys() == []


def test_a_client_killed_before_its_copy_is_completed_at_restart(site):
    """Copies refused (503) until the writer is killed with SIGKILL: its
    journal is left in the cache directory; the next process on that
    directory completes it, the blob reads back, and staging is empty."""
    faults = Faults(error_rate=1.0, when=lambda e: "HTTP_X_AMZ_COPY_SOURCE" in e)
    data = payload().hex()
    with faulty_s3(faults) as s3:
        writer = site.process("w", s3.endpoint_url)
        with writer:
            written = writer.call("write", name="k", data=data)
            writer.process.send_signal(signal.SIGKILL)
            writer.process.wait()
    journals = list((site.directory / "w" / "cache" / "locks").glob("pending-*"))
    assert len(journals) == 1
    assert len(site.staging_keys()) == 1
    assert bucket_keys(site.prefix) == []
    with site.process("w") as restarted, site.process("other") as other:
        assert other.call("read", name="k")["data"] == data
        assert restarted.call("read", name="k")["tid"] == written["tid"]
    assert list((site.directory / "w" / "cache" / "locks").glob("pending-*")) == []
    assert site.staging_keys() == []
    oid, tid = bytes.fromhex(written["oid"]), bytes.fromhex(written["tid"])
    assert bucket_keys(site.prefix) == [blob_key(site.prefix, oid, tid)]


def test_a_journal_without_tid_is_resolved_by_its_marker(site):
    """A process killed inside the base's tpc_finish recorded no tid: the
    transaction after the last one it had seen whose extension carries the
    journal's marker is its commit; a marker no transaction carries never
    committed."""
    storage = site.storage(site.directory / "cache")
    try:
        before = storage.lastTransaction()
        txn = TransactionMetaData("admin", "upload")
        storage.tpc_begin(txn)
        oid = store_blob(storage, txn, b"data")
        storage.tpc_vote(txn)
        marker = txn.extension[journal.COMMIT_MARKER]
        tid = storage.tpc_finish(txn)
        [record] = storage._base.iterator(tid, tid)
        assert record.extension == {journal.COMMIT_MARKER: marker}
        [shown] = storage.iterator(tid, tid)
        assert shown.extension == {}, "applications never see the marker"

        def journal_of(marker: str) -> journal.Journal:
            copy = journal.PendingCopy("staging/x.blob", oid, None, True)
            return journal.Journal("", None, [copy], before, marker, "")

        base = storage._base  # as the storage asks it
        assert journal.find_commit(base, journal_of(marker)) == tid
        assert journal.find_commit(base, journal_of("0" * 32)) is None
    finally:
        storage.close()


def read_elsewhere(site: ZEOSite, oid: bytes, tid: bytes) -> bytes:
    """Revision *tid* of blob *oid*, as a client with a new cache reads it."""
    reader = site.storage(site.directory / "reader")
    try:
        return read_back(reader, oid, tid)
    finally:
        reader.close()


def restart(site: ZEOSite, name: str) -> None:
    """Open a storage on the cache directory *name* and close it again: it
    completes (or drops) the journals left there."""
    storage = site.storage(site.directory / name)
    storage._shared.copier.close()
    storage.close()


def voted_then_killed(storage, data: bytes, oid: bytes | None = None) -> bytes:
    """Commit a blob of *data* in *storage* up to its vote, then leave it as
    a process killed inside the base's tpc_finish before the server
    committed: journal unlocked without tid, transaction aborted on the
    server. Return the blob's oid."""
    txn = TransactionMetaData("admin", "/Plone/file/edit")
    storage.tpc_begin(txn)
    oid = store_blob(storage, txn, data, oid)
    storage.tpc_vote(txn)
    storage._commit.journal.release()
    storage._base.tpc_abort(txn)
    return oid


def test_a_journal_never_takes_a_retried_commit_for_its_own(site):
    """Client A is killed before the server commits its edit; the user's
    retry commits the same oid through client B, with the same user and
    description. A's journal, adopted at its restart, owes nothing: B's
    revision keeps B's bytes.

    Fails before the fix: the journal's transaction was guessed by user,
    description and oids, B's commit taken for A's, and A's never-committed
    bytes copied over B's revision."""
    a = site.storage(site.directory / "a")
    oid = voted_then_killed(a, b"never committed")
    a.close()
    b = site.storage(site.directory / "b")
    try:
        txn = TransactionMetaData("admin", "/Plone/file/edit")
        b.tpc_begin(txn)
        store_blob(b, txn, b"saved on retry", oid)
        b.tpc_vote(txn)
        tid = b.tpc_finish(txn)
        b._shared.copier.close()
    finally:
        b.close()
    restart(site, "a")
    assert list((site.directory / "a" / "locks").glob("pending-*")) == []
    assert site.staging_keys() == []
    assert read_elsewhere(site, oid, tid) == b"saved on retry"


def without_tid(path: str) -> None:
    """Cut the journal at *path* back to its first line, as a process killed
    before it recorded the tid leaves it."""
    first = Path(path).read_bytes().splitlines(keepends=True)[0]
    Path(path).write_bytes(first)


def test_a_committed_journal_whose_new_oid_was_packed_away_is_completed(site):
    """A transaction created blob x and changed blob y; its writer was
    killed before it recorded the tid; x was then deleted and packed away.
    At the restart the journal is found committed, and y's revision reads
    back.

    Fails before the fix: an oid the base could not load was taken to mean
    the transaction never committed, and y's staging object was deleted."""
    db = ZODB.DB(site.storage(site.directory / "cache"))
    try:
        commit_blob(db, "y", b"y v1")
        db.storage._shared.copier.close()
        journals: list = []
        db.storage._shared.copier.add = journals.append  # the kill comes first
        tm = transaction.TransactionManager()
        root = db.open(tm).root()
        root["x"] = Blob(b"x, new")
        with root["y"].open("w") as f:
            f.write(b"y v2")
        tm.commit()
        root["y"]._p_activate()
        oid, tid = root["y"]._p_oid, root["y"]._p_serial
        del root["x"]
        tm.commit()
        tm.abort()
        [left] = journals
        left.release()
        without_tid(left.path)
        db.pack()
    finally:
        db.close()
    restart(site, "cache")
    assert list((site.directory / "cache" / "locks").glob("pending-*")) == []
    assert read_elsewhere(site, oid, tid) == b"y v2"


def test_a_finish_that_raises_leaves_the_journal_to_be_completed(site):
    """The base's tpc_finish raises after the server committed (the ZEO
    connection dropped): the error reaches the caller, and the copier
    adopts the released journal, finds the commit by its marker and makes
    the copy.

    Fails before the fix: the journal stayed locked by a leaked descriptor
    for the life of the process, and the copy was never made."""
    storage = site.storage(site.directory / "cache")
    try:
        finish, committed = storage._base.tpc_finish, []

        def finish_then_drop(txn, func=lambda tid: None):
            committed.append(finish(txn, func))
            raise ClientDisconnected("connection lost during tpc_finish")

        storage._base.tpc_finish = finish_then_drop
        txn = TransactionMetaData()
        storage.tpc_begin(txn)
        oid = store_blob(storage, txn, b"committed")
        storage.tpc_vote(txn)
        with pytest.raises(ClientDisconnected):
            storage.tpc_finish(txn)
        storage.tpc_abort(txn)
        storage._shared.copier.close()
        [tid] = committed
        assert_nothing_owed(site, storage)
        assert bucket_keys(site.prefix) == [blob_key(site.prefix, oid, tid)]
    finally:
        storage.close()


def test_the_source_of_an_owed_undo_copy_survives_a_pack(site):
    """An undo's copy from the earlier revision's key is still owed (S3
    refuses copies) when the database is packed: the collector keeps that
    key although the base no longer holds its revision, and the copy made
    afterwards reads back.

    Fails before the fix: the collector kept only the journals' staging
    keys, deleted the source, and the undone-to blob was lost."""
    db = ZODB.DB(site.storage(site.directory / "cache"))
    try:
        oid, first = commit_blob(db, "u", b"version one")
        commit_blob(db, "u", b"version two")
        copier = db.storage._shared.copier
        copier.close()
        copier._closing = False  # reopened, with copies refused at first
        refused = [True]
        complete = copier._complete

        def refusing(journal):
            if refused:
                raise RuntimeError("503 SlowDown")
            complete(journal)

        copier._complete = refusing
        tm = transaction.TransactionManager()
        db.undo(db.undoLog(0, 1)[0]["id"], tm.get())
        tm.commit()
        root = db.open(tm).root()
        root["u"]._p_activate()
        tid = root["u"]._p_serial
        tm.abort()
        db.pack()
        assert blob_key(site.prefix, oid, first) in bucket_keys(site.prefix)
        refused.clear()
        copier.close()
        assert_nothing_owed(site, db.storage)
    finally:
        db.close()
    assert read_elsewhere(site, oid, tid) == b"version one"


def test_journals_of_another_database_sharing_the_cache_dir_are_left(site):
    """A journal owing copies to another prefix, in the same cache
    directory, is neither adopted by this storage nor counted as owed by
    its collector; it stays, unlocked, for its own database.

    Fails before the fix: whichever database opened first adopted it and
    copied the other database's blob into its own prefix."""
    locks = site.directory / "cache" / journal.JOURNAL_DIR
    locks.mkdir(parents=True, mode=0o700)
    other = KeyLayout(site.prefix + "-other")
    copy = journal.PendingCopy(other.staging_key(), b"\0" * 8, None, True)
    destination = f"s3://{s3env.BUCKET}/{other.root}"
    left = journal.Journal.create(str(locks), [copy], b"\0" * 8, "m", destination)
    left.release()
    written = Path(left.path).read_bytes()
    storage = site.storage(site.directory / "cache")
    try:
        assert storage._shared.copier.pending() == 0
        assert journal.owed_copies(str(locks), storage._destination()) == (
            journal.Owed()
        )
        assert journal.owed_copies(str(locks), destination).journals == 1
    finally:
        storage.close()
    assert Path(left.path).read_bytes() == written


def test_pack_and_gc_through_a_client(site):
    """db.pack() from a client packs the server's FileStorage, then finds the
    objects of the revisions it no longer holds (asked over ZEO) orphaned:
    kept for gc-retention (the default, a week), deleted by a collection
    with retention 0."""
    db = ZODB.DB(site.storage(site.directory / "cache"))
    try:
        revisions = [commit_blob(db, "p", payload()) for _ in range(3)]
        db.storage._shared.copier.close()
        assert len(bucket_keys(site.prefix)) == 3
        db.pack()
        assert len(bucket_keys(site.prefix)) == 3
        assert db.storage.collect_orphans(retention=0).deleted == 2
        oid, last = revisions[-1]
        assert bucket_keys(site.prefix) == [blob_key(site.prefix, oid, last)]
    finally:
        db.close()


def test_abort_removes_the_journal_and_the_staging_objects(site):
    storage = site.storage(site.directory / "cache")
    db = ZODB.DB(storage)
    try:
        tm = transaction.TransactionManager()
        root = db.open(tm).root()
        root["a"] = Blob(b"aborted")
        txn = tm.get()
        txn.join(_FailingVote())
        with pytest.raises(RuntimeError, match="vote refused"):
            tm.commit()
        tm.abort()
        assert list((site.directory / "cache" / "locks").glob("pending-*")) == []
    finally:
        db.close()
    assert bucket_keys(site.prefix) == []
    assert site.staging_keys() == []


class _FailingVote:
    """A data manager that votes after the storage and refuses."""

    def sortKey(self) -> str:
        return "\uffff fail"

    def tpc_vote(self, transaction) -> None:
        raise RuntimeError("vote refused")

    def abort(self, transaction) -> None:
        """Nothing to undo."""

    tpc_begin = commit = tpc_finish = tpc_abort = abort


@contextlib.contextmanager
def site_of_its_own(directory: Path) -> Iterator[ZEOSite]:
    """A site on a ZEO server of its own over a new, empty database, started
    in this process (for a test that reads or restores the whole database)."""
    (_host, port), stop = ZEO.server(path=str(directory / "Data.fs"))
    try:
        yield ZEOSite(port, directory, s3env.new_prefix())
    finally:
        stop()


@pytest.fixture
def own_site(tmp_path) -> Iterator[ZEOSite]:
    """verify reads the whole database: a server of its own."""
    with site_of_its_own(tmp_path) as site:
        yield site


def test_the_commands_take_a_client_configuration(own_site):
    """check, verify and gc open <s3blobstorage><zeoclient> and ask the
    ZEO server: gc after a pack made on the server side alone (records
    only) removes the revisions it dropped."""
    site = own_site
    db = ZODB.DB(site.storage(site.directory / "cache"))
    try:
        revisions = [commit_blob(db, "c", payload()) for _ in range(2)]
        db.storage._shared.copier.close()
        db.storage._base.pack(None, referencesf)  # as zeopack: records only
    finally:
        db.close()
    assert len(bucket_keys(site.prefix)) == 2
    config = site.directory / "zope.conf"
    config.write_text(site.config(site.directory / "cli-cache"))
    for command in ("check", "verify"):
        result = clitools.run(command, config)
        assert result.returncode == 0, result.stdout + result.stderr
    # --retention 0: deleted now (the default keeps them a week).
    result = clitools.run("gc", config, "--retention", "0")
    assert result.returncode == 0, result.stdout + result.stderr
    oid, last = revisions[-1]
    assert bucket_keys(site.prefix) == [blob_key(site.prefix, oid, last)]


def test_a_reader_of_the_new_revision_never_holds_up_the_writers_finish(site):
    """Another process on the same cache-dir reads the new revision as soon
    as the server has committed, before the writer's tpc_finish installs its
    file: the reader holds the revision's lock while it waits for the copy.
    Fails before the fix: the writer's install waited for that lock, and the
    copy that would end the reader's wait was handed over only after it (the
    commit took the whole download deadline, the read failed)."""
    cache = site.directory / "shared-cache"
    writer, other = site.storage(cache), site.storage(cache)
    db = ZODB.DB(writer)
    tm = transaction.TransactionManager()
    root = db.open(tm).root()
    root["x"] = Blob(b"v1")
    tm.commit()
    oid = root["x"]._p_oid
    read: dict[str, object] = {}
    started = threading.Event()

    def read_new_revision(tid: bytes) -> None:
        started.set()
        with open(other.loadBlob(oid, tid), "rb") as f:
            read["data"] = f.read()

    finish = writer._base.tpc_finish

    def finish_seen_by_another_reader(txn, func=lambda tid: None):
        def committed(tid):
            func(tid)
            threading.Thread(target=read_new_revision, args=(tid,)).start()
            started.wait(10)
            time.sleep(0.2)  # the reader is into its download now

        return finish(txn, committed)

    writer._base.tpc_finish = finish_seen_by_another_reader
    with root["x"].open("w") as f:
        f.write(b"v2")
    tm.commit()
    deadline = time.monotonic() + 30
    while "data" not in read and time.monotonic() < deadline:
        time.sleep(0.05)
    db.close()
    other.close()
    assert read.get("data") == b"v2"


def assert_nothing_owed(site: ZEOSite, storage) -> None:
    """No journal left in *storage*'s cache directory, none held by its
    copier, and no staging object left in S3."""
    locks = site.directory / "cache" / journal.JOURNAL_DIR
    assert list(locks.glob("pending-*")) == []
    destination = storage._destination()
    assert journal.owed_copies(str(locks), destination) == journal.Owed()
    assert storage._shared.copier.pending() == 0
    assert site.staging_keys() == []


def test_a_blob_stored_twice_in_one_transaction_leaves_nothing_owed(site):
    """The first upload's staging object is replaced, not owed: once the
    copy is made, only the second version is in S3 and nothing is left."""
    storage = site.storage(site.directory / "cache")
    try:
        txn = TransactionMetaData()
        storage.tpc_begin(txn)
        oid = store_blob(storage, txn, b"first version")
        store_blob(storage, txn, b"second version", oid)
        storage.tpc_vote(txn)
        tid = storage.tpc_finish(txn)
        storage._shared.copier.close()  # waits for the copy
        assert_nothing_owed(site, storage)
        assert bucket_keys(site.prefix) == [blob_key(site.prefix, oid, tid)]
        assert read_back(storage, oid, tid) == b"second version"
    finally:
        storage.close()


def test_an_abort_after_the_vote_leaves_nothing_owed(site):
    """The journal written at vote is removed by the abort, with its
    staging object."""
    storage = site.storage(site.directory / "cache")
    try:
        txn = TransactionMetaData()
        storage.tpc_begin(txn)
        store_blob(storage, txn, b"aborted")
        storage.tpc_vote(txn)
        assert len(list((site.directory / "cache" / "locks").glob("pending-*"))) == 1
        storage.tpc_abort(txn)
        assert_nothing_owed(site, storage)
        assert bucket_keys(site.prefix) == []
    finally:
        storage.close()


def test_a_failed_vote_leaves_nothing_owed(site):
    """The server refuses the vote (a conflict: the blob's oid was stored
    against a serial that is not its current one): no journal is written,
    and the abort deletes the staging object."""
    storage = site.storage(site.directory / "cache")
    db = ZODB.DB(storage)
    try:
        oid, tid = commit_blob(db, "v", b"committed")
        storage._shared.copier.close()
        txn = TransactionMetaData()
        storage.tpc_begin(txn)
        store_blob(storage, txn, b"in conflict", oid)  # against serial z64
        with pytest.raises(ConflictError):
            storage.tpc_vote(txn)
        storage.tpc_abort(txn)
        assert_nothing_owed(site, storage)
        assert bucket_keys(site.prefix) == [blob_key(site.prefix, oid, tid)]
    finally:
        db.close()
