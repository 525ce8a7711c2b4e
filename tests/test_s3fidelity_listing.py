"""The bench's indexed ListObjectsV2 (``bench/s3fidelity.py``) answers
exactly as moto's own: the same listings, page by page, are made of a
bucket left to moto and of an identical bucket under the patch, changing
both the same way between pages (deletes of what a page listed, of whole
common prefixes and of most of the bucket; puts before and after the
position), and every page must match: keys, sizes, ETags, common
prefixes, KeyCount, MaxKeys, IsTruncated, continuation tokens,
StartAfter. Only the moment each object was written (LastModified)
differs between the two buckets and is left out.

The patch is applied to the session's moto server for the duration of one
listing only; every other test sees moto unchanged.
"""

from __future__ import annotations

import contextlib
import itertools
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from moto.core import DEFAULT_ACCOUNT_ID
from moto.s3.models import s3_backends

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from s3fidelity import listings_cost_their_page  # noqa: E402

#: A few hundred keys under prefixes and folders, some names sorting
#: around the delimiter ("a-", "a/", "a0") and beyond ASCII.
KEYS = sorted(
    [f"a/x/{n:03d}" for n in range(60)]
    + [f"a/y/{n:03d}/z" for n in range(40)]
    + [f"a/{n:03d}" for n in range(50)]
    + [f"a-{n}" for n in range(20)]
    + [f"a0/{n}" for n in range(20)]
    + [f"b/{n:03d}" for n in range(80)]
    + [f"b/\u00e9t\u00e9/{n}" for n in range(10)]
    + ["a/", "a", "b/y/"]
)
#: What changes in a bucket after each page of a listing.
Change = Callable[["Bucket", dict, int], None]


class Bucket:
    """One bucket and the keys the scenario has put in it."""

    def __init__(self, client, name: str) -> None:
        self.client, self.name = client, name
        self.keys: set[str] = set()

    def put(self, *keys: str) -> None:
        for key in keys:
            self.client.put_object(Bucket=self.name, Key=key, Body=key.encode())
            self.keys.add(key)

    def delete(self, keys: list[str]) -> None:
        for start in range(0, len(keys), 1000):
            batch = keys[start : start + 1000]
            self.client.delete_objects(
                Bucket=self.name,
                Delete={"Objects": [{"Key": k} for k in batch], "Quiet": True},
            )
        self.keys.difference_update(keys)


def delete_listed(bucket: Bucket, page: dict, number: int) -> None:
    """What the collector does: delete every key the page listed."""
    bucket.delete([item["Key"] for item in page.get("Contents", ())])


def delete_some_and_put(bucket: Bucket, page: dict, number: int) -> None:
    """Delete two keys of the page and a whole common prefix; put a key
    sorting before the position and one after it."""
    listed = [item["Key"] for item in page.get("Contents", ())]
    folders = [entry["Prefix"] for entry in page.get("CommonPrefixes", ())]
    doomed = listed[:2] + [
        key for key in sorted(bucket.keys) if folders and key.startswith(folders[0])
    ]
    bucket.delete(doomed)
    bucket.put(f"a/!{number}", f"a/~{number}", f"a/y/~{number}/z")


def delete_most(bucket: Bucket, page: dict, number: int) -> None:
    """After the first page, delete two keys in three, and put one back."""
    if number == 0:
        keys = sorted(bucket.keys)
        bucket.delete([k for n, k in enumerate(keys) if n % 3])
        bucket.put(keys[1])


def delete_folder_ahead(bucket: Bucket, page: dict, number: int) -> None:
    """After the first page, delete every key under "a0/", not listed yet:
    a common prefix left without keys is no entry (on a versioned bucket,
    its delete markers still make it one)."""
    if number == 0:
        bucket.delete([key for key in sorted(bucket.keys) if key.startswith("a0/")])


def nothing(bucket: Bucket, page: dict, number: int) -> None:
    """The bucket does not change."""


#: The listings made of each bucket, in turn, on the bucket the previous
#: ones left: (parameters, what changes between pages).
LISTINGS: list[tuple[dict, Change]] = [
    ({}, nothing),
    ({"MaxKeys": 0}, nothing),
    ({"Prefix": "a/", "MaxKeys": 7}, delete_some_and_put),
    ({"Delimiter": "/", "MaxKeys": 2}, nothing),
    ({"Prefix": "a/", "Delimiter": "/", "MaxKeys": 3}, delete_some_and_put),
    ({"Prefix": "a/", "StartAfter": "a/x/030", "MaxKeys": 9}, nothing),
    ({"StartAfter": "a/y/", "Delimiter": "/", "MaxKeys": 4}, nothing),
    ({"Prefix": "b/", "Delimiter": "t", "MaxKeys": 5}, nothing),
    ({"Prefix": "nowhere/", "MaxKeys": 5}, nothing),
    ({"MaxKeys": 11}, delete_most),
    ({"Prefix": "b/", "MaxKeys": 10}, delete_listed),
    ({"MaxKeys": 6}, nothing),
    ({"Delimiter": "/", "MaxKeys": 2}, delete_folder_ahead),
]


def comparable(page: dict) -> dict:
    """*page* without what differs between two buckets of equal contents."""
    page = {k: v for k, v in page.items() if k not in ("ResponseMetadata", "Name")}
    page["Contents"] = [
        {k: v for k, v in item.items() if k != "LastModified"}
        for item in page.get("Contents", ())
    ]
    return page


def pages(bucket: Bucket, parameters: dict, change: Change) -> Iterator[dict]:
    """Every page of one listing, changing the bucket after each."""
    token = None
    for number in itertools.count():
        more = {"ContinuationToken": token} if token else {}
        page = bucket.client.list_objects_v2(Bucket=bucket.name, **parameters, **more)
        yield comparable(page)
        change(bucket, page, number)
        if not page["IsTruncated"]:
            return
        token = page["NextContinuationToken"]


def indexed(name: str) -> bool:
    """Does moto's bucket *name* carry the patch's index?"""
    store = s3_backends[DEFAULT_ACCOUNT_ID]["aws"].get_bucket(name).keys
    return "_bench_listing_index" in store.__dict__


def run_scenario(bucket: Bucket, patched: bool) -> list[list[dict]]:
    """Fill *bucket* and make every listing of LISTINGS, each under the
    patch if *patched*; the pages of each."""
    bucket.put(*KEYS)
    listings = []
    for parameters, change in LISTINGS:
        patch = listings_cost_their_page() if patched else contextlib.nullcontext()
        with patch:
            listings.append(list(pages(bucket, parameters, change)))
            assert indexed(bucket.name) is patched
        assert not indexed(bucket.name), "the index is dropped on exit"
    return listings


@pytest.mark.parametrize("versioned", [False, True], ids=["plain", "versioned"])
def test_pages_match_moto_while_the_bucket_changes(s3_server, versioned):
    """On a versioned bucket, deletes leave delete markers: a key whose
    newest version is one is not listed, yet still makes its common prefix
    one (moto's rule, kept)."""
    client = s3_server.client()
    buckets = []
    for kind in ("moto", "indexed"):
        name = s3_server.create_bucket(
            f"listing-{kind}-{'versioned' if versioned else 'plain'}"
        )
        if versioned:
            client.put_bucket_versioning(
                Bucket=name, VersioningConfiguration={"Status": "Enabled"}
            )
        buckets.append(Bucket(client, name))
    plain, patched = (
        run_scenario(bucket, patched)
        for bucket, patched in zip(buckets, (False, True), strict=True)
    )
    for (parameters, _), expected, got in zip(LISTINGS, plain, patched, strict=True):
        assert got == expected, parameters
    assert sum(len(listing) for listing in plain) > 40, "many pages were compared"
