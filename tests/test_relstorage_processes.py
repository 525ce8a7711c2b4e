"""Several Zope-like processes on one RelStorage database and one bucket.

Each :class:`DatabaseProcess` is a real OS process with its own cache-dir,
opening ``<s3blobstorage>`` around ``<relstorage>`` from ZConfig text, as a
Zope instance does; the database is SQLite or the session's PostgreSQL server,
history-free or history-preserving (the ``relstorage_base`` fixture)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import ZODB
import ZODB.config

import s3env
from dbprocess import DatabaseProcess
from deploy import RelStorageBase, blob_key, bucket_keys, payload


class Site:
    """The processes of one deployment: one database, one bucket prefix.

    The database is created first, as a deployment's first start does, so
    that processes starting together do not race to create its schema."""

    def __init__(self, base: RelStorageBase, directory: Path) -> None:
        self.base = base
        self.directory = directory
        self.prefix = s3env.new_prefix()
        self._count = 0
        config = s3env.zconfig(base.section, str(directory / "setup"), self.prefix)
        ZODB.DB(ZODB.config.storageFromString(config)).close()

    def process(self) -> DatabaseProcess:
        """A new process with a new, empty cache-dir."""
        self._count += 1
        home = self.directory / f"process{self._count}"
        # gc-retention 0: these tests check what a pack deletes, at once (the
        # default's: test_relstorage.py's restored copies).
        config = s3env.zconfig(
            self.base.section, str(home / "cache"), self.prefix, "gc-retention 0"
        )
        return DatabaseProcess(config, home)

    def key(self, written: dict) -> str:
        """The key of the revision a ``write`` request committed."""
        oid, tid = bytes.fromhex(written["oid"]), bytes.fromhex(written["tid"])
        return blob_key(self.prefix, oid, tid)

    def stored(self) -> list[str]:
        """The keys of every object in the bucket under this prefix."""
        return bucket_keys(self.prefix)


@pytest.fixture
def site(relstorage_base, tmp_path) -> Site:
    """A deployment on each kind of RelStorage database."""
    return Site(relstorage_base, tmp_path)


def test_each_process_reads_the_others_commits_in_order(site):
    with site.process() as writer, site.process() as reader:
        for _revision in range(4):
            data = payload()
            written = writer.call("write", name="doc", data=data.hex())
            read = reader.call("read", name="doc")
            assert bytes.fromhex(read["data"]) == data
            assert read["tid"] == written["tid"]
        data = payload()
        reader.call("write", name="reply", data=data.hex())
        assert bytes.fromhex(writer.call("read", name="reply")["data"]) == data
        assert len(site.stored()) == 5


def test_pack_from_either_process_then_a_fresh_one_reads_every_live_blob(site):
    history = site.base.keep_history
    with site.process() as writer, site.process() as packer:
        live = {f"file{i}": payload(1000 * i + 1) for i in range(3)}
        for name, data in live.items():
            writer.call("write", name=name, data=data.hex())
        writer.call("write", name="gone", data=payload().hex())
        writer.call("delete", name="gone")
        revisions = [payload() for _ in range(3)]
        written = [writer.call("write", name="doc", data=d.hex()) for d in revisions]
        time.sleep(0.05)

        if history:
            # Pack the past before the third revision from the other process:
            # the second stays, because undoing the third needs it.
            packer.call("pack", time=written[1]["time"])
            assert set(site.stored()) >= {site.key(w) for w in written[1:]}
            assert site.key(written[0]) not in site.stored()
            writer.call("undo_last")
            live["doc"] = revisions[1]
        else:
            packer.call("pack")
            assert site.key(written[2]) in site.stored()
            assert not {site.key(w) for w in written[:2]} & set(site.stored())
            live["doc"] = revisions[2]
        current = {name: writer.call("read", name=name) for name in live}
        assert current["doc"]["data"] == live["doc"].hex()
        time.sleep(0.05)
        writer.call("pack")  # and now from the process that wrote them
        assert site.stored() == sorted(site.key(read) for read in current.values())

    with site.process() as fresh:
        for name, data in live.items():
            assert fresh.call("read", name=name)["data"] == data.hex()


def test_pack_while_another_process_commits_keeps_the_voting_blob(site):
    with site.process() as writer, site.process() as packer:
        writer.call("write", name="before", data=payload().hex())
        data = payload()
        writer.send("write", name="new", data=data.hex(), hold=True)
        (voting,) = writer.receive()["voted"]  # uploaded, not yet finished
        assert voting in site.stored()
        report = packer.call("collect")
        assert report["in_flight"] == 1 and report["orphans"] == 0
        packer.send("pack")
        concurrent = site.base.backend == "postgresql"
        if concurrent:
            packer.receive()  # PostgreSQL packs while the commit is voting
        else:
            time.sleep(0.5)  # SQLite's pack waits for the writer's lock
        writer.send("go")
        written = writer.receive()
        if not concurrent:
            packer.receive()
        assert site.key(written) == voting
        assert voting in site.stored()
    with site.process() as fresh:
        assert fresh.call("read", name="new")["data"] == data.hex()
