"""Make moto's S3 server serve a ranged GET and a listing page at their
cost in S3, so that the benchmark measures the storage rather than moto.

moto answers every GET, ranged or not, by reading the object's whole buffer
under the object's lock, copying it, and only then slicing out the range:
eight ranged GETs of a 64 MiB object cost eight full copies, one after
another (measured: eight 8 MiB ranges take about four times one full GET,
in parallel or not). Real S3 serves a range in proportion to its size.
:func:`ranges_cost_their_size` memoises each object's bytes, so a full GET
returns them without a copy and a ranged GET copies only its slice.

moto answers each ListObjectsV2 page by sorting every key of the bucket;
:func:`listings_cost_their_page` serves it from a sorted index instead
(S3 lists a page in proportion to the page). Plain boto3 and the storage
get the same server.
"""

from __future__ import annotations

import bisect
import contextlib
import threading
import weakref
from collections.abc import Callable, Iterator

from moto.s3.models import (
    FakeBucket,
    FakeDeleteMarker,
    FakeKey,
    FakeTableStorageBucket,
    S3Backend,
)
from moto.s3.utils import _VersionedKeyStore

_CACHED = "_bench_cached_value"


@contextlib.contextmanager
def ranges_cost_their_size() -> Iterator[None]:
    """Patch moto's FakeKey.value for the duration of the block."""
    original = FakeKey.value

    def get(key: FakeKey) -> bytes:
        value = key.__dict__.get(_CACHED)
        if value is None:
            value = key.__dict__[_CACHED] = original.fget(key)
        return value

    def set_(key: FakeKey, new_value: bytes) -> None:
        key.__dict__.pop(_CACHED, None)
        original.fset(key, new_value)

    FakeKey.value = property(get, set_)
    try:
        yield
    finally:
        FakeKey.value = original


# -- listing ------------------------------------------------------------------

_INDEX = "_bench_listing_index"


class _SortedNames:
    """The names of one bucket's keys, kept sorted between listings.

    A name put since the last listing is appended (and the list sorted at
    the next one: Timsort merges the appended run in linear time); a
    deleted name is left in place and skipped by the listing, which looks
    every name up in the bucket, until half the names are such leftovers.
    Neither a put nor a delete thus moves the list, and a page costs its
    own length plus a bisection.
    """

    def __init__(self, store: _VersionedKeyStore) -> None:
        self.store = store
        # dict.copy is atomic under the GIL, where iterating is not.
        self.names = sorted(dict.copy(store))
        self.indexed = set(self.names)
        self.unsorted = False
        self.leftovers = 0

    def sync(self, name: str) -> None:
        """Record what a put or a delete of *name* left in the bucket."""
        if dict.__contains__(self.store, name):
            if name not in self.indexed:
                if self.names and name < self.names[-1]:
                    self.unsorted = True
                self.indexed.add(name)
                self.names.append(name)
        elif name in self.indexed:
            self.leftovers += 1

    def sorted_names(self) -> list[str]:
        """The names, sorted, once leftovers are dropped if they are many."""
        if self.leftovers * 2 > len(self.names):
            self.names = [n for n in self.names if dict.__contains__(self.store, n)]
            self.indexed = set(self.names)
            self.leftovers = 0
        if self.unsorted:
            self.names.sort()
            self.unsorted = False
        return self.names


def _after(name: str) -> str:
    """The least string above every string that starts with *name*."""
    return name[:-1] + chr(ord(name[-1]) + 1)


def _page(
    index: _SortedNames,
    prefix: str,
    delimiter: str | None,
    limit: str | None,
    wanted: int,
) -> list[FakeKey | str]:
    """Up to *wanted* entries (keys, and common prefixes ending in
    *delimiter*) under *prefix* whose names sort above *limit*, in moto's
    order and with moto's rules: a key whose newest version is a delete
    marker is no entry, but still makes its common prefix one."""
    names = index.sorted_names()
    position = bisect.bisect_left(names, prefix)
    if limit is not None:
        position = max(position, bisect.bisect_right(names, limit))
    entries: list[FakeKey | str] = []
    while position < len(names) and len(entries) < wanted:
        name = names[position]
        if not name.startswith(prefix):
            break
        versions = dict.get(index.store, name)
        rest = name[len(prefix) :]
        if versions and delimiter and delimiter in rest:
            folder = prefix + rest.split(delimiter)[0] + delimiter
            if limit is None or folder > limit:
                entries.append(folder)
            position = bisect.bisect_left(names, _after(folder), position)
            continue
        if versions and not isinstance(versions[-1], FakeDeleteMarker):
            entries.append(versions[-1])
        position += 1
    return entries


@contextlib.contextmanager
def listings_cost_their_page() -> Iterator[None]:
    """Make moto's ListObjectsV2 serve each page from a sorted index of
    the bucket's names, as S3 does, rather than by sorting every key.

    moto answers each page by copying, filtering and sorting every key of
    the bucket, then scanning to the continuation token: at 100,000 keys, a
    page of 1000 costs seconds and a listing many minutes. The patch keeps
    one :class:`_SortedNames` per bucket, built at its first listing and
    kept up to date by the three methods through which moto changes a
    bucket's keys, and answers as moto would (prefix, delimiter and common
    prefixes, StartAfter, continuation tokens, MaxKeys, truncation). What
    it does not cover (table buckets, an unknown continuation token, a
    negative MaxKeys) goes to moto's own code. The indexes are dropped on
    exit.
    """
    original_list = S3Backend.list_objects_v2
    mutators = {
        name: getattr(_VersionedKeyStore, name)
        for name in ("__setitem__", "setlist", "pop")
    }
    lock = threading.Lock()
    indexed: list[weakref.ref] = []

    def index_of(store: _VersionedKeyStore) -> _SortedNames:
        index = store.__dict__.get(_INDEX)
        if index is None:
            index = store.__dict__[_INDEX] = _SortedNames(store)
            indexed.append(weakref.ref(store))
        return index

    def synced(mutator: Callable) -> Callable:
        def mutate(store: _VersionedKeyStore, name: str, *args: object) -> object:
            try:
                return mutator(store, name, *args)
            finally:
                with lock:
                    index = store.__dict__.get(_INDEX)
                    if index is not None:
                        index.sync(name)

        return mutate

    def list_objects_v2(
        backend: S3Backend,
        bucket: FakeBucket,
        prefix: str | None,
        delimiter: str | None,
        continuation_token: str | None,
        start_after: str | None,
        max_keys: int,
    ) -> tuple[list[FakeKey | str], bool, str | None]:
        limit = start_after
        if continuation_token:
            limit = backend._pagination_tokens.get(continuation_token)
        if (
            isinstance(bucket, FakeTableStorageBucket)
            or max_keys < 0
            or (continuation_token and limit is None)
        ):
            return original_list(
                backend,
                bucket,
                prefix,
                delimiter,
                continuation_token,
                start_after,
                max_keys,
            )
        with lock:
            entries = _page(
                index_of(bucket.keys), prefix or "", delimiter, limit, max_keys + 1
            )
        # moto's own truncation: the same flag, token and token table.
        return backend._truncate_result(entries, max_keys)

    S3Backend.list_objects_v2 = list_objects_v2
    for name, mutator in mutators.items():
        setattr(_VersionedKeyStore, name, synced(mutator))
    try:
        yield
    finally:
        S3Backend.list_objects_v2 = original_list
        for name, mutator in mutators.items():
            setattr(_VersionedKeyStore, name, mutator)
        with lock:
            for ref in indexed:
                store = ref()
                if store is not None:
                    store.__dict__.pop(_INDEX, None)
