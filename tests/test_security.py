"""Security and operator hardening: TLS where a key travels, no secret in a
log or an error, a cache directory no other user can write, configuration
errors at startup naming the key, and an orphan collector that does not keep
a stray key for ever."""

from __future__ import annotations

import base64
import io
import logging
import os
import stat
import time
import xml.etree.ElementTree as ET
from dataclasses import fields
from pathlib import Path

import pytest
import ZConfig
import ZODB
import ZODB.config
from ZODB.MappingStorage import MappingStorage
from ZODB.utils import p64

import s3env
from faultserver import Faults, faulty_s3
from test_storage import commit_blobs
from zodb_s3blobs import S3BlobStorage, S3BlobStorageError
from zodb_s3blobs import gc as gc_module
from zodb_s3blobs.cache import BlobCache
from zodb_s3blobs.errors import ObjectStoreError
from zodb_s3blobs.objectstore import ObjectStore
from zodb_s3blobs.settings import S3Settings

ROOT = Path(__file__).resolve().parent.parent
COMPONENT = ROOT / "src" / "zodb_s3blobs" / "component.xml"
DOCS = ROOT / "docs"
KEY = "MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY="  # 32 bytes, canonical
_ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"


def non_canonical(canonical: str) -> str:
    """The same 32 bytes in base64 with a padding bit of the last character
    set: another string, which decodes to the same key."""
    last = _ALPHABET.index(canonical[-2])
    return canonical[:-2] + _ALPHABET[last | 1] + "="


def writer(data: bytes):
    def download(out):
        out.write(data)
        return len(data)

    return download


# -- 1. SSE-C and TLS: judged by the endpoint the client uses ----------------


@pytest.mark.parametrize("endpoint", ["HTTP://s3.example.com", "Http://s3.example"])
def test_sse_c_is_refused_for_an_http_endpoint_in_any_case(endpoint):
    """Fails before the fix: the check compared startswith("http://"), so an
    upper- or mixed-case scheme sent the SSE-C key over plain HTTP."""
    with pytest.raises(ValueError) as info:
        S3Settings(bucket="b-1", endpoint_url=endpoint, sse_customer_key=KEY)
    assert "s3-sse-customer-key" in str(info.value)
    assert KEY not in str(info.value)


@pytest.mark.parametrize("variable", ["AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL"])
def test_sse_c_is_refused_for_an_http_endpoint_from_the_environment(
    variable, monkeypatch
):
    """Fails before the fix: only s3-endpoint-url was looked at, and botocore
    took a plain-HTTP endpoint from the environment."""
    monkeypatch.setenv(variable, s3env.server().endpoint_url)  # http://
    settings = s3env.settings(endpoint_url=None, use_ssl=True, sse_customer_key=KEY)
    with pytest.raises(S3BlobStorageError) as info:
        ObjectStore(settings)
    assert "s3-sse-customer-key" in str(info.value)
    assert "TLS" in str(info.value)


def test_use_ssl_true_with_an_http_endpoint_is_refused(tmp_path, monkeypatch):
    """Fails before the fix: s3-use-ssl true was silently ignored, botocore
    following the endpoint's http:// scheme. The contradiction is refused:
    the operator says which one wins."""
    with pytest.raises(ValueError) as info:
        S3Settings(bucket="b-1", endpoint_url="http://s3.example.com", use_ssl=True)
    assert "s3-use-ssl" in str(info.value)
    text = (
        "%import zodb_s3blobs\n<s3blobstorage>\nbucket-name b-1\n"
        f"cache-dir {tmp_path}/cache\ns3-endpoint-url HTTP://127.0.0.1:9\n"
        "<mappingstorage>\n</mappingstorage>\n</s3blobstorage>\n"
    )
    with pytest.raises(ValueError) as info:
        ZODB.config.storageFromString(text)
    assert "s3-use-ssl" in str(info.value)
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", s3env.server().endpoint_url)
    with pytest.raises(S3BlobStorageError) as info:
        ObjectStore(s3env.settings(endpoint_url=None, use_ssl=True))
    assert "s3-use-ssl" in str(info.value)


# -- 5. the SSE-C key in any base64 form stays out of the logs ---------------


def test_non_canonical_sse_c_key_never_reaches_botocore_debug_logs(tmp_path, caplog):
    """Fails before the fix: only the configured (non-canonical) base64 was
    registered for masking, and botocore logs the canonical form it sends."""
    caplog.set_level(logging.DEBUG)
    # A key of this test alone: masking is process-wide, and another test
    # registering it would hide a leak here.
    raw = os.urandom(32)
    canonical = base64.b64encode(raw).decode()
    configured = non_canonical(canonical)
    assert base64.b64decode(configured) == raw and configured != canonical
    with faulty_s3(Faults(), tls_dir=tmp_path) as server:
        settings = s3env.settings(
            endpoint_url=server.endpoint_url,
            use_ssl=True,
            ca_bundle=server.ca_bundle,
            sse_customer_key=configured,
        )
        assert committed_and_read_from_s3(settings, tmp_path, b"encrypted")
    assert "x-amz-server-side-encryption-customer-key" in caplog.text.lower()
    for secret in (canonical, configured, repr(raw)[2:-1]):
        assert secret not in caplog.text
        assert secret not in repr(settings)


def committed_and_read_from_s3(settings, tmp_path, data: bytes) -> bool:
    """Commit *data* as a blob through a storage with *settings*, drop the
    cached copy, and tell whether it reads back the same from S3."""
    storage = S3BlobStorage(MappingStorage(), settings, str(tmp_path / "c"))
    db = ZODB.DB(storage)
    try:
        oid, tid = commit_blobs(db, {"b": data})["b"]
        storage._cache.discard(oid, tid)
        with open(storage.loadBlob(oid, tid), "rb") as f:
            return f.read() == data
    finally:
        db.close()


@pytest.mark.parametrize("where", ["environment", "s3-access-key"])
def test_access_keys_are_masked_in_botocore_debug_logs(
    tmp_path, caplog, monkeypatch, where
):
    """The access key id (in every Authorization header botocore logs at
    DEBUG), the secret and the session token never reach a log record, be
    they found by botocore in AWS_ACCESS_KEY_ID and friends (as the docs
    recommend) or given as s3-access-key and s3-secret-key.

    Fails before the fix: with credentials from the environment, botocore's
    DEBUG records showed ``Credential=AKIA...``."""
    caplog.set_level(logging.DEBUG)
    # Credentials of this test alone: masking is process-wide, and another
    # test registering them would hide a leak here.
    key_id = "AKIA" + os.urandom(8).hex().upper()
    secret = base64.b64encode(os.urandom(30)).decode()
    token = base64.b64encode(os.urandom(60)).decode()
    for name in ("AWS_PROFILE", "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE"):
        monkeypatch.delenv(name, raising=False)
    if where == "environment":
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", key_id)
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
        monkeypatch.setenv("AWS_SESSION_TOKEN", token)
        settings = s3env.settings(access_key=None, secret_key=None)
    else:
        settings = s3env.settings(access_key=key_id, secret_key=secret)
    assert committed_and_read_from_s3(settings, tmp_path, b"logged")
    assert "Credential=***/" in caplog.text
    if where == "environment":
        assert "x-amz-security-token" in caplog.text.lower()
    for value in (key_id, secret, token):
        assert value not in caplog.text


# -- 6. credentials in the endpoint; secrets and '$'; tracebacks -------------


def test_credentials_in_the_endpoint_url_are_refused_naming_the_key(tmp_path):
    """Fails before the fix: https://user:password@host was accepted, and
    the password ended up in every error and log line naming the endpoint."""
    text = (
        "%import zodb_s3blobs\n<s3blobstorage>\nbucket-name b-1\n"
        f"cache-dir {tmp_path}/cache\n"
        "s3-endpoint-url https://AKIAUSER:pa55w0rdSecret@s3.example.com\n"
        "<mappingstorage>\n</mappingstorage>\n</s3blobstorage>\n"
    )
    with pytest.raises(ZConfig.ConfigurationError) as info:
        ZODB.config.storageFromString(text)
    assert "s3-endpoint-url" in str(info.value)
    assert "pa55w0rdSecret" not in str(info.value)
    with pytest.raises(ValueError) as info:
        S3Settings(bucket="b-1", endpoint_url="https://u:pa55w0rdSecret@h.example")
    assert "s3-endpoint-url" in str(info.value)
    assert "pa55w0rdSecret" not in str(info.value)


def _description(key: str) -> str:
    for element in ET.parse(COMPONENT).getroot().iter("key"):
        if element.get("name") == key:
            return " ".join(element.findtext("description").split())
    raise AssertionError(key)


def test_secret_keys_tell_to_write_dollar_dollar_and_security_covers_tracebacks():
    """Fails before the fix: nothing told operators that ZConfig's error for
    a '$' in a secret ("no replacement for 'ecretValue'") repeats part of
    it, nor that error trackers capture the SSE-C key in frame locals."""
    reference = (DOCS / "configuration.md").read_text(encoding="utf-8")
    rows = {
        line.split("`")[1]: line for line in reference.splitlines() if line[:3] == "| `"
    }
    for key in ("s3-access-key", "s3-secret-key", "s3-sse-customer-key"):
        assert "$$" in _description(key), key
        assert "$$" in rows[key], key
    security = (DOCS / "security.md").read_text(encoding="utf-8")
    for needle in ("include_local_variables", "before_send", "EventScrubber", "$$"):
        assert needle in security, needle


# -- 12. bad values fail at startup, naming the key --------------------------


def parse(lines: str):
    """Read a section and build its S3Settings, opening nothing."""
    text = (
        "%import zodb_s3blobs\n<s3blobstorage>\n"
        f"{lines}\n<mappingstorage>\n</mappingstorage>\n</s3blobstorage>\n"
    )
    config, _handler = ZConfig.loadConfigFile(
        ZODB.config.getStorageSchema(), io.StringIO(text)
    )
    return config.storage.settings()


@pytest.mark.parametrize(
    "line, key",
    [
        ("s3-connect-timeout nan", "s3-connect-timeout"),
        ("s3-read-timeout inf", "s3-read-timeout"),
        ("s3-download-connect-timeout NaN", "s3-download-connect-timeout"),
        ("s3-download-read-timeout Infinity", "s3-download-read-timeout"),
        ("s3-download-deadline nan", "s3-download-deadline"),
        ("s3-region eu central", "s3-region"),
        ("s3-region evil.example.com/x", "s3-region"),
        ("s3-region us-east-1@host", "s3-region"),
        ("s3-part-size 6GB", "s3-part-size"),
        ("cache-dir relative/cache", "cache-dir"),
        ("cache-dir {file}", "cache-dir"),
        ("s3-ca-bundle {file}", "s3-ca-bundle"),
        ("s3-ca-bundle {empty}", "s3-ca-bundle"),
    ],
)
def test_bad_values_are_refused_at_startup_naming_the_key(
    line, key, tmp_path, monkeypatch
):
    """Fails before the fix: nan and inf timeouts, a region that would
    rewrite the endpoint's host, parts above S3's 5 GiB, a relative cache-dir
    or one that is a file, and a CA bundle that is no certificate file were
    all accepted (the last two failed later, at open or at the first TLS
    handshake, far from the key)."""
    monkeypatch.chdir(tmp_path)
    not_pem = tmp_path / "file"
    not_pem.write_text("not a certificate\n")
    empty = tmp_path / "empty.pem"
    empty.write_text("")
    lines = "bucket-name b-1\n"
    if not line.startswith("cache-dir"):
        lines += f"cache-dir {tmp_path}/cache\n"
    lines += line.format(file=not_pem, empty=empty)
    with pytest.raises((ZConfig.ConfigurationError, ValueError)) as info:
        parse(lines)
    assert key in str(info.value)
    assert not (tmp_path / "cache").exists() and not (tmp_path / "relative").exists()


@pytest.mark.parametrize(
    "field, value, key",
    [
        ("connect_timeout", float("nan"), "s3-connect-timeout"),
        ("read_timeout", float("inf"), "s3-read-timeout"),
        ("download_deadline", float("nan"), "s3-download-deadline"),
        ("download_read_timeout", float("inf"), "s3-download-read-timeout"),
        ("region", "eu-central-1.evil.example", "s3-region"),
        ("part_size", (5 << 30) + 1, "s3-part-size"),
        ("ca_bundle", __file__, "s3-ca-bundle"),
    ],
)
def test_s3_settings_refuse_the_same_values(field, value, key):
    """Fails before the fix: S3Settings compared timeouts with <= 0 (false
    for nan), and checked neither region, part size limit nor CA bundle."""
    with pytest.raises(ValueError) as info:
        S3Settings(bucket="b-1", **{field: value})
    assert key in str(info.value)


def test_aws_ca_bundle_is_honoured_when_s3_ca_bundle_is_unset(tmp_path, monkeypatch):
    """Fails before the fix: verify=True passed explicitly made botocore
    ignore AWS_CA_BUNDLE, so the only trust without s3-ca-bundle was
    certifi's. Verification itself is never turned off: not by an empty
    AWS_CA_BUNDLE either."""
    with faulty_s3(Faults(), tls_dir=tmp_path) as server:
        settings = s3env.settings(endpoint_url=server.endpoint_url, use_ssl=True)
        monkeypatch.setenv("AWS_CA_BUNDLE", server.ca_bundle)
        S3BlobStorage(MappingStorage(), settings, str(tmp_path / "a")).close()
        for untrusted in ("", None):
            if untrusted is None:
                monkeypatch.delenv("AWS_CA_BUNDLE")
            else:
                monkeypatch.setenv("AWS_CA_BUNDLE", untrusted)
            with pytest.raises(ObjectStoreError) as info:
                S3BlobStorage(MappingStorage(), settings, str(tmp_path / "b"))
            assert "SSL" in str(info.value) or "certificate" in str(info.value)


# -- 2. a cache directory no other user can write ----------------------------


@pytest.mark.parametrize("name", ["", "tmp", "locks"])
def test_a_cache_directory_others_can_write_is_refused(name, tmp_path):
    """Fails before the fix: an existing cache-dir (or its tmp/ or locks/)
    was used whatever its mode, so another local user who created it
    world-writable could replace cached blobs."""
    cache_dir = tmp_path / "cache"
    for directory in (cache_dir, cache_dir / "tmp", cache_dir / "locks"):
        directory.mkdir(mode=0o700)
    target = cache_dir / name if name else cache_dir
    target.chmod(0o777)
    with pytest.raises(S3BlobStorageError) as info:
        BlobCache(str(cache_dir), 1 << 20)
    assert str(target) in str(info.value)
    assert "0o777" in str(info.value) and "write" in str(info.value)


@pytest.mark.parametrize("name", ["", "tmp", "locks"])
def test_a_symlinked_cache_directory_is_refused(name, tmp_path):
    """Fails before the fix: a symlink was followed wherever it pointed."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir(mode=0o700)
    cache_dir = tmp_path / "cache"
    if name:
        cache_dir.mkdir(mode=0o700)
        os.symlink(elsewhere, cache_dir / name)
        target = cache_dir / name
    else:
        os.symlink(elsewhere, cache_dir)
        target = cache_dir
    with pytest.raises(S3BlobStorageError) as info:
        BlobCache(str(cache_dir), 1 << 20)
    assert str(target) in str(info.value) and "symlink" in str(info.value)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs chown")
def test_a_cache_directory_of_another_user_is_refused(tmp_path):
    """Fails before the fix: the owner was never looked at."""
    cache_dir = tmp_path / "cache"
    cache_dir.mkdir(mode=0o700)
    os.chown(cache_dir, 4242, -1)
    with pytest.raises(S3BlobStorageError) as info:
        BlobCache(str(cache_dir), 1 << 20)
    assert str(cache_dir) in str(info.value) and "4242" in str(info.value)


def test_an_oid_directory_others_can_write_is_refused_at_install(tmp_path):
    """Fails before the fix: a blob was installed into an existing oid
    directory whatever its mode."""
    cache = BlobCache(str(tmp_path / "cache"), 1 << 20)
    oid, tid = p64(1), p64(2)
    oid_dir = os.path.dirname(cache.path(oid, tid))
    os.makedirs(oid_dir, 0o700)
    os.chmod(oid_dir, 0o777)
    with pytest.raises(S3BlobStorageError) as info:
        cache.fetch(oid, tid, writer(b"content"))
    assert oid_dir in str(info.value)
    assert not os.path.lexists(cache.path(oid, tid))
    cache.close()


def test_the_scan_skips_directories_others_can_write(tmp_path, caplog):
    """Fails before the fix: the scan indexed (and would evict, and account
    for) files in a directory another user could write."""
    cache = BlobCache(str(tmp_path / "cache"), 1 << 20)
    cache.fetch(p64(1), p64(2), writer(b"ours"))
    cache.close()
    planted = cache.path(p64(3), p64(4))
    os.makedirs(os.path.dirname(planted), 0o700)
    Path(planted).write_bytes(b"planted")
    os.chmod(os.path.dirname(planted), 0o777)
    listed = [path for path, _st in cache.files()]
    assert listed == [cache.path(p64(1), p64(2))]
    assert "skipped" in caplog.text


def test_a_symlink_in_place_of_a_cached_blob_is_not_served(tmp_path):
    """Fails before the fix: a hit stat()ed through a symlink, so one
    planted in place of a cached file (of the same size) was served."""
    cache = BlobCache(str(tmp_path / "cache"), 1 << 20)
    oid, tid = p64(1), p64(2)
    path = cache.fetch(oid, tid, writer(b"genuine!"))
    forged = tmp_path / "forged"
    forged.write_bytes(b"forged!!")
    os.chmod(path, 0o600)
    os.remove(path)
    os.symlink(forged, path)
    assert cache.lookup(oid, tid) is None
    assert not os.path.lexists(path), "the link is removed"
    assert forged.read_bytes() == b"forged!!", "not its target"
    with open(cache.fetch(oid, tid, writer(b"genuine!")), "rb") as f:
        assert f.read() == b"genuine!"
    cache.close()


def test_lock_files_are_not_opened_through_symlinks(tmp_path):
    """Fails before the fix: os.open(O_CREAT) followed a symlink in locks/,
    creating the file it pointed to."""
    cache = BlobCache(str(tmp_path / "cache"), 1 << 20)
    cache.close()
    oid, tid = p64(1), p64(2)
    name = cache._lock_path(oid, tid)
    with_target = tmp_path / "victim"
    if os.path.lexists(name):
        os.remove(name)
    os.symlink(with_target, name)
    with pytest.raises(OSError):
        cache.fetch(oid, tid, writer(b"content"))
    assert not with_target.exists()


def test_the_index_is_not_opened_through_a_symlink(tmp_path):
    """SQLite follows symlinks: a link planted at locks/index.sqlite is
    refused, naming it, and its target neither created nor written."""
    directory = tmp_path / "cache"
    BlobCache(str(directory), 1 << 20).close()
    index = directory / "locks" / "index.sqlite"
    for name in directory.glob("locks/index.sqlite*"):
        name.unlink()
    with_target = tmp_path / "victim"
    os.symlink(with_target, index)
    with pytest.raises(S3BlobStorageError, match=str(index)):
        BlobCache(str(directory), 1 << 20)
    assert not with_target.exists()


# -- 13. a key above the last commit is not in flight for ever ---------------


class _Later:
    """The time module as seen two days from now."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def time(self) -> float:
        return time.time() + self.seconds


def test_a_key_above_the_last_commit_is_an_orphan_once_it_is_old(
    make_storage, tmp_path, monkeypatch
):
    """Fails before the fix: a key with the largest tid (or any tid above
    the last commit) counted as in flight for ever and could never be
    collected. Young, it is left alone (its transaction may be voting); old,
    it is listed, and deleted only when asked (never by pack)."""
    storage = make_storage(gc_retention=0)  # deleted when asked, at once
    db = ZODB.DB(storage)
    (live_oid, live_tid) = commit_blobs(db, {"b": b"live"})["b"]
    last = storage._base.lastTransaction()
    layout = storage._layout
    stray = layout.key(p64(10_000), b"\xff" * 8)
    next_tid = layout.key(p64(10_001), p64(int.from_bytes(last, "big") + 1))
    f = tmp_path / "f"
    f.write_bytes(b"stray")
    storage._store.transfer([(str(f), stray), (str(f), next_tid)], [])

    young = storage.collect_orphans(dry_run=True)
    assert young.in_flight == 2 and young.orphans == 0

    monkeypatch.setattr(gc_module, "time", _Later(2 * 86400), raising=False)
    # A pack (or a collection not asked to) lists them but leaves them: run
    # from an older copy of the database, it would delete the live blobs.
    db.pack()
    listed = storage.collect_orphans()
    assert listed.stale_in_flight == 2
    assert listed.orphans == 0 and listed.deleted == 0
    assert stray in {k for k, _ in storage._store.list(layout.root)}

    deleted = []
    old = storage.collect_orphans(stale_in_flight=True, on_orphan=deleted.append)
    assert sorted(deleted) == sorted([stray, next_tid])
    assert old.in_flight == 0 and old.future == 1
    assert old.kept == 1 and old.deleted == 2
    remaining = {k for k, _ in storage._store.list(layout.root)}
    assert remaining == {layout.key(live_oid, live_tid)}
    db.close()


# -- 14. the documentation says what the code does ---------------------------


def test_configuration_docs_list_every_s3_settings_field_and_no_stale_claims():
    """A guard (the text was already right when the issue was filed): the
    Python section names every S3Settings field, and no page says timeouts
    or attempts are not zope.conf keys."""
    reference = (DOCS / "configuration.md").read_text(encoding="utf-8")
    python = reference.split("## Python", 1)[1]
    for f in fields(S3Settings):
        assert f"`{f.name}`" in python, f.name
    keys = {
        element.get("name") for element in ET.parse(COMPONENT).getroot().iter("key")
    }
    for name in ("connect_timeout", "read_timeout", "max_attempts"):
        assert f"s3-{name.replace('_', '-')}" in keys
        assert f"s3-download-{name.replace('_', '-')}" in keys
    for page in DOCS.glob("*.md"):
        assert "not zope.conf keys" not in page.read_text(encoding="utf-8"), page


def test_cache_files_are_still_private(tmp_path):
    """The checks do not change what the cache creates: 0700 directories,
    0400 files."""
    cache = BlobCache(str(tmp_path / "cache"), 1 << 20)
    path = cache.fetch(p64(1), p64(2), writer(b"x"))
    for directory in (
        cache.directory,
        cache.temp_dir,
        os.path.dirname(path),
        os.path.dirname(os.path.dirname(path)),
    ):
        assert stat.S_IMODE(os.lstat(directory).st_mode) == 0o700, directory
    assert stat.S_IMODE(os.lstat(path).st_mode) == 0o400
    cache.close()
