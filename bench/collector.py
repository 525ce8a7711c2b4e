"""What the orphan collector costs at scale, against a plain listing.

``python bench/collector.py`` starts moto's S3 server in this process behind
a :class:`delayline.DelayLine` (5 ms each way, as bench.py), fills a prefix
with OBJECTS keys: revisions a FileStorage holds (one object each, several
revisions of some), and a tenth orphans; then times, through the same line,

- a plain listing of the prefix (boto3's paginator, one page after another);
- a dry-run collection (lists, asks the base, records nothing);
- a collection with retention 0 (deletes the orphans).

Each line gives seconds, the ratio to the plain listing and the growth of
the process's peak RSS. ``--objects N`` changes the count (default 10,000).
:func:`collector_scale` is the measurement, for other benchmark drivers.
"""

from __future__ import annotations

import argparse
import logging
import os
import resource
import sys
from concurrent.futures import ThreadPoolExecutor

import ZODB
import ZODB.config
from bench import BUCKET, SETUP_WORKERS, bucket_behind_line, measure, plain_client
from persistent.mapping import PersistentMapping
from ZODB.utils import p64

from zodb_s3blobs.cli.localserver import LocalS3

DELAY = 0.005
#: Every REVISED-th object gets this many revisions (keys) more.
REVISED = 10
REVISIONS = 5


def _peak_rss() -> int:
    """The process's peak resident set, in bytes (Linux: KiB reported)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _fill(db, client, objects: int) -> None:
    """Commit objects to the base and PUT a key for each revision the base
    holds, and a tenth as many orphans (revisions it never had)."""
    layout = db.storage._layout
    keys = []
    # Keys of held revisions: 1 + REVISIONS / REVISED per object, 9/10 of all.
    held = int(objects * 0.9 / (1 + REVISIONS / REVISED))
    names = [f"o{n}" for n in range(0, held, 1000)]
    for start in range(0, held, 1000):
        with db.transaction() as conn:
            conn.root()[f"o{start}"] = batch = PersistentMapping()
            for n in range(min(1000, held - start)):
                batch[n] = PersistentMapping()
    with db.transaction() as conn:
        objs = [v for name in names for v in conn.root()[name].values()]
        for obj in objs:
            obj._p_activate()  # its _p_serial
        keys += [layout.key(o._p_oid, o._p_serial) for o in objs]
    revised = [obj._p_oid for obj in objs[::REVISED]]
    for value in range(REVISIONS):
        with db.transaction() as conn:
            for oid in revised:
                conn.get(oid)["v"] = value
        tid = db.storage.lastTransaction()
        keys += [layout.key(oid, tid) for oid in revised]
    orphans = objects - len(keys)
    keys += [layout.key(p64((1 << 32) + n), p64(5)) for n in range(max(orphans, 0))]

    def put(key: str) -> None:
        client.put_object(Bucket=BUCKET, Key=key, Body=b"x")

    with ThreadPoolExecutor(SETUP_WORKERS) as pool:
        list(pool.map(put, keys))


def _plain_listing(client, prefix: str) -> int:
    pages = client.get_paginator("list_objects_v2").paginate(
        Bucket=BUCKET, Prefix=prefix
    )
    return sum(len(page.get("Contents", ())) for page in pages)


def collector_scale(objects: int = 10_000, delay: float = DELAY) -> list[dict]:
    """Fill a bucket with *objects* keys and time a plain listing and the
    collector over a line of *delay* seconds each way; one dict per row:
    name, seconds, ratio to the listing, peak RSS growth (bytes)."""
    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    rows = []
    with bucket_behind_line(delay, "collector") as (endpoint_url, workdir, setup):
        data_fs = os.path.join(workdir, "Data.fs")
        base = f"<filestorage>\n  path {data_fs}\n</filestorage>"
        text = LocalS3(endpoint_url).zconfig(
            BUCKET, os.path.join(workdir, "cache"), base, prefix="scale"
        )
        db = ZODB.DB(ZODB.config.storageFromString(text))
        _fill(db, setup, objects)
        storage = db.storage
        remote = plain_client(endpoint_url)
        listing, count = measure(lambda: _plain_listing(remote, storage._layout.root))
        rows.append(dict(name=f"plain listing ({count} keys)", seconds=listing))
        for name, kw in (
            ("collection, dry run", dict(dry_run=True, retention=0)),
            ("collection, retention 0", dict(retention=0)),
        ):
            before = _peak_rss()
            seconds, report = measure(lambda kw=kw: storage.collect_orphans(**kw))
            rows.append(
                dict(
                    name=f"{name} ({report.kept} kept, {report.orphans} orphans)",
                    seconds=seconds,
                    rss=_peak_rss() - before,
                )
            )
        remote.close()
        db.close()
    for row in rows:
        row["ratio"] = row["seconds"] / listing
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--objects", type=int, default=10_000)
    objects = parser.parse_args(argv).objects
    print(f"{objects} keys, {DELAY * 1000:g} ms each way")
    for row in collector_scale(objects):
        rss = f"; peak RSS +{row['rss'] / 2**20:.1f} MiB" if "rss" in row else ""
        print(f"{row['name']:55s} {row['seconds']:7.2f} s  {row['ratio']:4.2f}x{rss}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
