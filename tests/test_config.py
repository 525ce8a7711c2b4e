"""The <s3blobstorage> section: what it builds, and a clear error for every bad
key, naming that key, before anything is opened."""

from __future__ import annotations

import contextlib
import io
import os
from collections.abc import Iterator

import pytest
import ZConfig
import ZODB.config

import s3env
from zodb_s3blobs import S3BlobStorage, S3BlobStorageError

KEY_FOR_TEST = "MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY="  # 32 bytes


def section(lines: str, base: str = "<mappingstorage>\n</mappingstorage>") -> str:
    return f"""
%import zodb_s3blobs
<s3blobstorage>
{lines}
{base}
</s3blobstorage>
"""


GOOD = "bucket-name my-bucket\ncache-dir {cache}"


@pytest.mark.parametrize(
    "lines, key",
    [
        ("cache-dir {cache}", "bucket-name"),
        ("bucket-name a/b\ncache-dir {cache}", "bucket-name"),
        ("bucket-name x\ncache-dir {cache}", "bucket-name"),
        (GOOD + "\ns3-prefix /abs", "s3-prefix"),
        (GOOD + "\ns3-prefix a/../b", "s3-prefix"),
        (GOOD + "\ns3-prefix has space", "s3-prefix"),
        (GOOD + "\ns3-prefix a//b", "s3-prefix"),
        (GOOD + "\ns3-endpoint-url ftp://host", "s3-endpoint-url"),
        (GOOD + "\ns3-endpoint-url localhost:9000", "s3-endpoint-url"),
        (GOOD + "\ns3-use-ssl maybe", "s3-use-ssl"),
        (GOOD + "\ns3-addressing-style sideways", "s3-addressing-style"),
        (GOOD + "\ns3-sse-customer-key not-base64!", "s3-sse-customer-key"),
        (GOOD + "\ns3-sse-customer-key c2hvcnQ=", "s3-sse-customer-key"),
        (GOOD + "\ns3-max-concurrency 0", "s3-max-concurrency"),
        (GOOD + "\ns3-max-concurrency many", "s3-max-concurrency"),
        (GOOD + "\ns3-multipart sometimes", "s3-multipart"),
        (GOOD + "\ns3-multipart-threshold -1", "s3-multipart-threshold"),
        (GOOD + "\ns3-part-size 1MB", "s3-part-size"),
        (GOOD + "\ns3-download-deadline 0", "s3-download-deadline"),
        (GOOD + "\ns3-download-deadline soon", "s3-download-deadline"),
        (GOOD + "\ns3-download-max-attempts 0", "s3-download-max-attempts"),
        (GOOD + "\ns3-read-timeout -1", "s3-read-timeout"),
        (GOOD + "\ncache-size 0", "cache-size"),
        (GOOD + "\ncache-size lots", "cache-size"),
        ("bucket-name my-bucket", "cache-dir"),
        (GOOD + "\ncache-min-age -1", "cache-min-age"),
        (GOOD + "\ncache-min-age soon", "cache-min-age"),
        (GOOD + "\ncache-group no-such-group-here", "cache-group"),
        (GOOD + "\ncache-group 4294967295", "cache-group"),
        (GOOD + "\nmetrics-file zodb-{{pid}}.prom", "metrics-file"),
        (GOOD + "\nmetrics-file /var/tmp/zodb.prom", "metrics-file"),
        (GOOD + "\nmetrics-file /var/tmp/zodb-{{pid}}.txt", "metrics-file"),
        (GOOD + "\nmetrics-file /var/tmp/{{pid}}/zodb-{{pid}}.prom", "metrics-file"),
        (GOOD + "\nmetrics-file /var/tmp/zodb-{{pid}}-{{db}}.prom", "metrics-file"),
        (GOOD + "\nmetrics-file /var/tmp/zodb-{{host}}.prom", "metrics-file"),
        (GOOD + "\nmetrics-file /var/{{host}}/zodb-{{pid}}.prom", "metrics-file"),
        (
            GOOD + "\nmetrics-file /var/tmp/zodb-{{pid}}-{{pid}}.prom",
            "metrics-file",
        ),
        (GOOD + "\nmetrics-interval 0", "metrics-interval"),
        (GOOD + "\nmetrics-interval often", "metrics-interval"),
        (GOOD + "\nmetrics-interval 1e300", "metrics-interval"),
        (GOOD + "\ncache-min-age 1e300", "cache-min-age"),
        (GOOD + "\nbucket-name again", "bucket-name"),
    ],
)
def test_bad_key_fails_at_parse_naming_the_key(lines, key, tmp_path):
    text = section(lines.format(cache=tmp_path / "cache"))
    with pytest.raises(ZConfig.ConfigurationError) as info:
        ZODB.config.storageFromString(text)
    assert key in str(info.value)
    assert not (tmp_path / "cache").exists(), "nothing may be created"


def test_sse_customer_key_value_never_appears_in_the_error(tmp_path):
    secret = "c2VjcmV0LWtleQ=="  # ten bytes
    text = section(
        f"bucket-name b-1\ncache-dir {tmp_path}\ns3-sse-customer-key {secret}"
    )
    with pytest.raises(ZConfig.ConfigurationError) as info:
        ZODB.config.storageFromString(text)
    assert "s3-sse-customer-key" in str(info.value)
    assert secret not in str(info.value)
    assert secret not in repr(info.value)


def test_missing_base_storage_section_is_refused(tmp_path):
    text = section(GOOD.format(cache=tmp_path), base="")
    with pytest.raises(ZConfig.ConfigurationError) as info:
        ZODB.config.storageFromString(text)
    assert "zodb.storage" in str(info.value)


def test_sse_c_without_tls_fails_at_open_naming_the_key(tmp_path):
    text = section(
        f"bucket-name b-1\ncache-dir {tmp_path}\ns3-use-ssl false\n"
        f"s3-sse-customer-key {KEY_FOR_TEST}"
    )
    with pytest.raises(ValueError) as info:
        ZODB.config.storageFromString(text)
    assert "s3-sse-customer-key" in str(info.value)
    assert "TLS" in str(info.value)
    assert KEY_FOR_TEST not in str(info.value)


def test_unusable_cache_dir_fails_naming_the_key(tmp_path):
    """A file where the directory belongs is refused when the configuration
    is read; a directory that cannot be created, when the storage opens."""
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    text = section(f"bucket-name b-1\ncache-dir {blocker}")
    with pytest.raises(ZConfig.ConfigurationError) as info:
        ZODB.config.storageFromString(text)
    assert "cache-dir" in str(info.value)
    text = s3env.zconfig(
        "<mappingstorage>\n</mappingstorage>", cache_dir=str(blocker / "cache")
    )
    with pytest.raises(S3BlobStorageError) as info:
        ZODB.config.storageFromString(text)
    assert "cache-dir" in str(info.value)


def test_filestorage_with_its_own_blob_dir_is_refused_at_open(tmp_path):
    """The refusal says to make the directory fallback-blob-dir (switch
    first, migrate later, as docs/migration.md recommends).

    Fails before the fix: it said to upload the files before switching."""
    base = (
        f"<filestorage>\npath {tmp_path}/Data.fs\n"
        f"blob-dir {tmp_path}/blobs\n</filestorage>"
    )
    text = section(f"bucket-name b-1\ncache-dir {tmp_path}/cache", base=base)
    with pytest.raises(S3BlobStorageError) as info:
        ZODB.config.storageFromString(text)
    assert f"as fallback-blob-dir {tmp_path}/blobs: its blobs are read" in str(
        info.value
    )
    assert "before switching" not in str(info.value)
    assert not os.path.exists(tmp_path / "cache"), "refused before the cache"


def test_unsupported_base_storage_is_refused_at_open(tmp_path):
    from ZODB.MappingStorage import MappingStorage
    from ZODB.tests.hexstorage import HexStorage  # a wrapper of unknown kind

    from zodb_s3blobs.tids import UnsupportedBaseStorage

    with pytest.raises(UnsupportedBaseStorage) as info:
        S3BlobStorage(
            HexStorage(MappingStorage()), s3env.settings(), cache_dir=str(tmp_path)
        )
    assert "HexStorage" in str(info.value)


def test_full_section_builds_the_storage(tmp_path):
    text = s3env.zconfig(
        "<filestorage>\n path %s\n</filestorage>" % (tmp_path / "Data.fs"),
        cache_dir=str(tmp_path / "cache"),
        prefix="site/one",
        extra="cache-size 50MB\n  s3-max-concurrency 4\n  s3-multipart false\n"
        "  s3-multipart-threshold 32MB\n  s3-part-size 6MB",
    )
    storage = ZODB.config.storageFromString(text)
    try:
        assert isinstance(storage, S3BlobStorage)
        assert storage.temporaryDirectory() == str(tmp_path / "cache" / "tmp")
        assert storage._cache.size_limit == 50 * 1024 * 1024
        settings = storage._store.settings
        assert settings.max_concurrency == 4
        assert settings.multipart is False
        assert settings.multipart_threshold == 32 << 20
        assert settings.part_size == 6 << 20
        assert storage._layout.root == "site/one/blobs/"
        assert os.stat(tmp_path / "cache").st_mode & 0o777 == 0o700
    finally:
        storage.close()


@contextlib.contextmanager
def opened(tmp_path, **zconfig) -> Iterator:
    """The storage a <s3blobstorage> around a MappingStorage opens, closed
    after the block (keyword arguments as for s3env.zconfig)."""
    text = s3env.zconfig(
        "<mappingstorage>\n</mappingstorage>",
        cache_dir=str(tmp_path / "cache"),
        **zconfig,
    )
    storage = ZODB.config.storageFromString(text)
    try:
        yield storage
    finally:
        storage.close()


def test_environment_substitution(tmp_path, monkeypatch):
    monkeypatch.setenv("S3BLOBS_TEST_PREFIX", "from-env")
    with opened(tmp_path, prefix="$(S3BLOBS_TEST_PREFIX)") as storage:
        assert storage._layout.root == "from-env/blobs/"


def parsed_settings(lines: str):
    """The S3Settings a section builds, without opening anything."""
    config, _handler = ZConfig.loadConfigFile(
        ZODB.config.getStorageSchema(), io.StringIO(section(lines))
    )
    return config.storage.settings()


def test_download_and_upload_timing_defaults(tmp_path):
    settings = parsed_settings(GOOD.format(cache=tmp_path))
    assert settings.download_deadline == 20.0
    assert settings.download_max_attempts is None, "the deadline decides"
    assert settings.download_connect_timeout == 3.0
    assert settings.download_read_timeout == 10.0
    assert settings.read_timeout == 300.0


def test_download_deadline_and_attempts_parse(tmp_path):
    settings = parsed_settings(
        GOOD.format(cache=tmp_path)
        + "\ns3-download-deadline 12.5\ns3-download-max-attempts 3"
    )
    assert settings.download_deadline == 12.5
    assert settings.download_max_attempts == 3


def test_cache_and_metrics_defaults(tmp_path):
    config, _handler = ZConfig.loadConfigFile(
        ZODB.config.getStorageSchema(),
        io.StringIO(section(GOOD.format(cache=tmp_path))),
    )
    c = config.storage.config
    assert c.cache_min_age == 60.0
    assert c.cache_group is None, "private by default"
    assert c.metrics_file is None
    assert c.metrics_interval == 15.0


def test_metrics_file_may_name_the_host(tmp_path):
    value = "/var/lib/node_exporter/zodb-{host}-{pid}.prom"
    config, _handler = ZConfig.loadConfigFile(
        ZODB.config.getStorageSchema(),
        io.StringIO(section(GOOD.format(cache=tmp_path) + f"\nmetrics-file {value}")),
    )
    assert config.storage.config.metrics_file == value


def test_cache_min_age_reaches_the_cache(tmp_path):
    with opened(tmp_path, extra="cache-min-age 2.5") as storage:
        assert storage._cache.min_age == 2.5
