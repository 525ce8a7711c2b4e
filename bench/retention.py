"""What gc-retention costs a collection: requests and seconds, with and without.

``python bench/retention.py`` starts moto's S3 server in this process behind
a :class:`delayline.DelayLine` (5 ms each way, as bench.py), fills a prefix
with REVISIONS blob revisions of which a tenth are still held (one commit of
that many blobs) and the rest orphans (uploaded directly), and collects them:

- retention 0: the orphans are deleted at once (today's behaviour before
  gc-retention);
- retention 7d, first run: every orphan is found and recorded as pending;
- retention 7d, a later run within the retention: the record is read back
  alongside the listing and written again;
- retention 7d, a run once the retention has passed: the pending orphans
  are deleted.

Each line shows the requests the collection sent, by operation, its seconds
and the size of the record of pending orphans. ``--revisions N`` changes the
count (default 10,000).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from unittest import mock

import ZODB
import ZODB.config
from bench import (
    BUCKET,
    SETUP_WORKERS,
    bucket_behind_line,
    measure,
    sent_requests,
    upload_orphan,
)
from ZODB.blob import Blob
from ZODB.utils import p64

from zodb_s3blobs import gc
from zodb_s3blobs.cli.localserver import LocalS3
from zodb_s3blobs.pending import record_key

DELAY = 0.005
WEEK = 7 * 24 * 3600.0


def fill(db, client, revisions: int) -> None:
    """Commit a tenth of *revisions* as held blobs; upload the rest as
    orphans (revisions of oids the base never had, older than its commits)."""
    held = revisions // 10
    with db.transaction() as conn:
        for n in range(held):
            conn.root()[f"b{n}"] = Blob(b"held")
    layout = db.storage._layout
    keys = [layout.key(p64((1 << 32) + n), p64(5)) for n in range(revisions - held)]
    with ThreadPoolExecutor(SETUP_WORKERS) as pool:
        list(pool.map(upload_orphan, [client] * len(keys), keys))


def collect(storage, retention: float, later: float = 0.0) -> str:
    """One collection *later* seconds from now (the collector's clock is
    moved: gc.time is its own reference to the module); its report line."""
    clock = mock.Mock(time=lambda: time.time() + later)
    with mock.patch.object(gc, "time", clock), sent_requests(storage._store) as sent:
        seconds, report = measure(lambda: storage.collect_orphans(retention=retention))
    record = storage._store.stat(record_key(storage._layout.prefix))
    by_operation = ", ".join(f"{n} {op}" for op, n in sorted(Counter(sent).items()))
    return (
        f"{len(sent):4d} requests ({by_operation}); {seconds:6.2f} s; "
        f"{report.deleted} deleted, {report.pending} pending; record "
        f"{record.size if record else 0} bytes"
    )


def run(revisions: int) -> None:
    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    with bucket_behind_line(DELAY, "retention") as (endpoint_url, workdir, setup):
        local = LocalS3(endpoint_url)

        def database(name: str) -> ZODB.DB:
            data_fs = os.path.join(workdir, f"{name}.fs")
            base = f"<filestorage>\n  path {data_fs}\n</filestorage>"
            text = local.zconfig(
                BUCKET, os.path.join(workdir, f"cache-{name}"), base, prefix=name
            )
            return ZODB.DB(ZODB.config.storageFromString(text))

        print(
            f"{revisions} blob revisions ({revisions - revisions // 10} orphans), "
            f"{DELAY * 1000:g} ms each way"
        )
        db = database("without")
        fill(db, setup, revisions)
        print(f"retention 0            {collect(db.storage, 0)}")
        db.close()
        db = database("with")
        fill(db, setup, revisions)
        print(f"retention 7d, first    {collect(db.storage, WEEK)}")
        print(f"retention 7d, again    {collect(db.storage, WEEK, 3600)}")
        print(f"retention 7d, expired  {collect(db.storage, WEEK, WEEK + 3600)}")
        db.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--revisions", type=int, default=10_000)
    run(parser.parse_args(argv).revisions)
    return 0


if __name__ == "__main__":
    sys.exit(main())
