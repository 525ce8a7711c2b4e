"""A cache a front-end web server can serve from: ``cache-group`` makes the
cached files readable (never writable) by that group, and ``cache-min-age``
keeps files just handed out through eviction."""

from __future__ import annotations

import grp
import io
import os
import stat
import time

import pytest
import ZConfig
import ZODB
import ZODB.config
from ZODB.MappingStorage import MappingStorage

import s3env
from test_storage import commit_blobs
from zodb_s3blobs import S3BlobStorageError
from zodb_s3blobs.cache import BlobCache, UntrustedCacheDirectory


def other_group() -> grp.struct_group:
    """A group this user may give files to, other than its own."""
    if os.geteuid() != 0:
        groups = [g for g in os.getgroups() if g != os.getegid()]
        if not groups:
            pytest.skip("this user is a member of no other group")
        return grp.getgrgid(groups[0])
    return next(g for g in grp.getgrall() if g.gr_gid != os.getegid())


def open_reader(cache_dir, prefix: str, extra: str):
    """A storage reading *prefix*'s blobs through *cache_dir*."""
    text = s3env.zconfig(
        "<mappingstorage>\n</mappingstorage>",
        cache_dir=str(cache_dir),
        prefix=prefix,
        extra=extra,
    )
    return ZODB.config.storageFromString(text)


def mode(path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


@pytest.fixture
def committed(make_storage):
    """Three blobs of 4000 bytes: (prefix, [(oid, tid)])."""
    storage = make_storage(base=MappingStorage())
    db = ZODB.DB(storage)
    refs = commit_blobs(db, {f"b{n}": bytes([n]) * 4000 for n in range(3)})
    db.close()
    return storage._store.settings.prefix, list(refs.values())


def test_the_group_may_read_the_cached_files_and_nothing_more(tmp_path, committed):
    prefix, refs = committed
    group = other_group()
    cache_dir = tmp_path / "cache"
    storage = open_reader(cache_dir, prefix, f"cache-group {group.gr_name}")
    try:
        path = storage.loadBlob(*refs[0])
        oid_dir = os.path.dirname(path)
        for directory in (cache_dir, os.path.dirname(oid_dir), oid_dir):
            assert mode(directory) == 0o750
            assert os.lstat(directory).st_gid == group.gr_gid
        assert mode(path) == 0o440
        assert os.lstat(path).st_gid == group.gr_gid
        for private in ("tmp", "locks"):
            assert mode(cache_dir / private) == 0o700
    finally:
        storage.close()


def test_the_default_cache_is_private(tmp_path, committed):
    prefix, refs = committed
    storage = open_reader(tmp_path / "cache", prefix, "")
    try:
        path = storage.loadBlob(*refs[0])
        assert mode(path) == 0o400
        assert mode(os.path.dirname(path)) == 0o700
        assert mode(tmp_path / "cache") == 0o700
    finally:
        storage.close()


def test_a_group_writable_cache_is_refused_with_a_group_too(tmp_path):
    group = other_group()
    cache_dir = tmp_path / "cache"
    cache_dir.mkdir()
    os.chmod(cache_dir, 0o770)
    with pytest.raises(UntrustedCacheDirectory, match="group or others may write"):
        open_reader(cache_dir, s3env.new_prefix(), f"cache-group {group.gr_gid}")
    assert mode(cache_dir) == 0o770, "not quietly repaired"


def test_min_age_and_modes_hold_under_eviction(tmp_path, committed):
    """cache-min-age 1 and a cache-size of 6000 bytes, so that the wait for
    the files to come of age is short: the three files read (12000 bytes) stay
    while they are younger than a second, then eviction brings the cache
    under its size, least recently used first, keeping the group's modes."""
    prefix, refs = committed
    group = other_group()
    storage = open_reader(
        tmp_path / "cache",
        prefix,
        f"cache-group {group.gr_name}\n  cache-size 6000\n  cache-min-age 1",
    )
    try:
        paths = [storage.loadBlob(*ref) for ref in refs]
        time.sleep(0.3)
        assert all(os.path.exists(path) for path in paths), "used just now"
        deadline = time.monotonic() + 10
        while os.path.exists(paths[1]) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert [os.path.exists(path) for path in paths] == [False, False, True]
        assert mode(paths[2]) == 0o440
        assert storage.stats()["cache_evictions"] == 2
    finally:
        storage.close()


@pytest.fixture
def outsider(monkeypatch) -> grp.struct_group:
    """Make this process a user who is not root and not in other_group()."""
    group = other_group()
    monkeypatch.setattr(os, "geteuid", lambda: 4242)
    monkeypatch.setattr(os, "getegid", lambda: 4242)
    monkeypatch.setattr(os, "getgroups", lambda: [4242])
    return group


def test_a_cache_group_this_user_is_not_in_is_refused_by_the_cache(tmp_path, outsider):
    """The Python API too: a named error, before anything is created."""
    with pytest.raises(S3BlobStorageError, match="cache-group: this user is not"):
        BlobCache(str(tmp_path / "cache"), 10_000, group=outsider.gr_gid)
    assert not (tmp_path / "cache").exists()


def test_a_cache_group_this_user_is_not_in_parses(tmp_path, outsider):
    """Read-only tools (cache stats, check) run by a monitoring user outside
    the group read the same configuration."""
    text = s3env.zconfig(
        "<mappingstorage>\n</mappingstorage>",
        cache_dir=str(tmp_path / "cache"),
        extra=f"cache-group {outsider.gr_name}",
    )
    config, _handler = ZConfig.loadConfigFile(
        ZODB.config.getStorageSchema(), io.StringIO(text)
    )
    assert config.storage.config.cache_group == outsider.gr_gid
    with pytest.raises(S3BlobStorageError, match="cache-group: this user is not"):
        config.storage.open()
