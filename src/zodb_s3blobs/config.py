"""ZConfig support: the ``<s3blobstorage>`` section and its datatypes.

Datatypes raise ValueError at parse time, so ZConfig reports a bad value with
the key's name and line before anything is opened. Imports of the storage
stay inside ``open()``, as in ``ZODB.config``.
"""

from __future__ import annotations

import grp
import math
import os
import re
import threading

from ZConfig.datatypes import stock_datatypes
from ZODB.config import BaseConfig

from .keys import validate_prefix

_BUCKET = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{2,254}")


def _keyed(key: str, convert):
    """A datatype whose errors name *key*: ZConfig reports only the line."""

    def datatype(value: str):
        try:
            return convert(value)
        except ValueError as exc:
            message = str(exc)
            if not message.startswith(key):
                message = f"{key}: {message}"
            raise ValueError(message) from None

    return datatype


def _bucket_name(value: str) -> str:
    value = value.strip()
    if not _BUCKET.fullmatch(value):
        raise ValueError(
            f"{value!r} is not a bucket name (3 or more letters, digits, '.', "
            "'-', '_'; no '/' or spaces)"
        )
    return value


def _endpoint_url(value: str) -> str:
    from .settings import check_endpoint_url

    return check_endpoint_url(value)


def _region(value: str) -> str:
    from .settings import check_region

    return check_region(value)


def _ca_bundle(value: str) -> str:
    from .settings import check_ca_bundle

    return check_ca_bundle(stock_datatypes["existing-file"](value))


def _cache_dir(value: str) -> str:
    """An absolute path that is a directory or does not exist yet: a relative
    one would depend on the directory Zope happens to start in."""
    value = value.strip()
    if not os.path.isabs(value):
        raise ValueError(f"must be an absolute path, not {value!r}")
    if os.path.lexists(value) and not os.path.isdir(value):
        raise ValueError(f"{value!r} exists and is not a directory")
    return value


def _existing_directory(value: str) -> str:
    """An absolute path of an existing directory (one only read)."""
    value = value.strip()
    if not os.path.isabs(value):
        raise ValueError(f"must be an absolute path, not {value!r}")
    if not os.path.isdir(value):
        raise ValueError(f"{value!r} is not a directory")
    return value


def _addressing_style(value: str) -> str:
    value = value.strip().lower()
    if value not in ("auto", "path", "virtual"):
        raise ValueError(f"must be auto, path or virtual, not {value!r}")
    return value


def _conditional_writes(value: str) -> str:
    value = value.strip().lower()
    if value not in ("auto", "true", "false"):
        raise ValueError(f"must be auto, true or false, not {value!r}")
    return value


def _sse_customer_key(value: str) -> str:

    from .redact import protect
    from .settings import canonical_sse_customer_key

    # Its messages never repeat the key. The canonical form is the one botocore
    # sends; the form written in the file is masked too.
    canonical = canonical_sse_customer_key(value)
    protect(value.strip(), canonical)
    return canonical


def _sse(value: str) -> str | None:
    from .settings import SSE_MODES

    value = value.strip()
    if value.lower() in ("", "none", "off"):
        return None
    if value not in SSE_MODES:
        raise ValueError(f"must be {' or '.join(SSE_MODES)}, not {value!r}")
    return value


def _positive_float(value: str) -> float:
    number = float(value)
    if not math.isfinite(number) or number <= 0:
        raise ValueError(f"must be a positive, finite number, not {value!r}")
    return number


def _positive_int(value: str) -> int:
    number = int(value)
    if number < 1:
        raise ValueError(f"must be at least 1, not {number}")
    return number


def _positive_byte_size(value: str) -> int:
    size = stock_datatypes["byte-size"](value)
    if size <= 0:
        raise ValueError(f"must be positive, not {value!r}")
    return size


def _seconds(value: str) -> float:
    number = float(value)
    if not math.isfinite(number) or number < 0:
        raise ValueError(f"must be a number of seconds, 0 or more, not {value!r}")
    return number


def _waited(convert):
    """*convert*, refusing more seconds than a thread may wait for:
    ``Event.wait`` raises OverflowError above ``threading.TIMEOUT_MAX``,
    which would stop the thread that waits (the metrics writer, the
    evictor) without a word."""

    def datatype(value: str) -> float:
        number = convert(value)
        if number > threading.TIMEOUT_MAX:
            raise ValueError(
                f"must be at most {threading.TIMEOUT_MAX:g} seconds, not {value!r}"
            )
        return number

    return datatype


def _group(value: str) -> int:
    """A group name or number of this host: the group id. Whether this user
    may give files to it is checked when the cache opens, so that read-only
    tools run by a user outside the group read the configuration too."""
    value = value.strip()
    try:
        entry = grp.getgrgid(int(value)) if value.isdigit() else grp.getgrnam(value)
    except (KeyError, OverflowError):
        raise ValueError(f"no group {value!r} on this host") from None
    return entry.gr_gid


def _metrics_file(value: str) -> str:
    from .exposition import check_template

    return check_template(value)


def retention_interval(value: str) -> float:
    """A ZConfig time interval (``7d``, ``12h``, ``0``) of 0 or more seconds."""
    try:
        seconds = stock_datatypes["time-interval"](value)
    except ValueError:
        seconds = None
    if seconds is None or seconds < 0:
        raise ValueError(
            f"must be a time interval of 0 or more, e.g. 7d, 12h, 30m or 0, "
            f"not {value.strip()!r}"
        )
    return float(seconds)


def _part_size(value: str) -> int:
    from .settings import MAX_PART_SIZE, MIN_PART_SIZE

    size = _positive_byte_size(value)
    if size < MIN_PART_SIZE:
        raise ValueError(f"must be at least 5MB (S3's smallest part), not {value!r}")
    if size > MAX_PART_SIZE:
        raise ValueError(f"must be at most 5GB (S3's largest part), not {value!r}")
    return size


bucket_name = _keyed("bucket-name", _bucket_name)
prefix = _keyed("s3-prefix", validate_prefix)
endpoint_url = _keyed("s3-endpoint-url", _endpoint_url)
use_ssl = _keyed("s3-use-ssl", stock_datatypes["boolean"])
addressing_style = _keyed("s3-addressing-style", _addressing_style)
sse_customer_key = _keyed("s3-sse-customer-key", _sse_customer_key)
max_concurrency = _keyed("s3-max-concurrency", _positive_int)
region = _keyed("s3-region", _region)
ca_bundle = _keyed("s3-ca-bundle", _ca_bundle)
sse = _keyed("s3-sse", _sse)
connect_timeout = _keyed("s3-connect-timeout", _positive_float)
read_timeout = _keyed("s3-read-timeout", _positive_float)
max_attempts = _keyed("s3-max-attempts", _positive_int)
download_connect_timeout = _keyed("s3-download-connect-timeout", _positive_float)
download_read_timeout = _keyed("s3-download-read-timeout", _positive_float)
download_deadline = _keyed("s3-download-deadline", _positive_float)
download_max_attempts = _keyed("s3-download-max-attempts", _positive_int)
multipart = _keyed("s3-multipart", stock_datatypes["boolean"])
multipart_threshold = _keyed("s3-multipart-threshold", _positive_byte_size)
part_size = _keyed("s3-part-size", _part_size)
staged_copy_threshold = _keyed("s3-staged-copy-threshold", _positive_byte_size)
conditional_writes = _keyed("s3-conditional-writes", _conditional_writes)
cache_dir = _keyed("cache-dir", _cache_dir)
cache_size = _keyed("cache-size", _positive_byte_size)
download_on_unghost = _keyed("download-on-unghost", stock_datatypes["boolean"])
cache_group = _keyed("cache-group", _group)
cache_min_age = _keyed("cache-min-age", _waited(_seconds))
metrics_file = _keyed("metrics-file", _metrics_file)
metrics_interval = _keyed("metrics-interval", _waited(_positive_float))
fallback_blob_dir = _keyed("fallback-blob-dir", _existing_directory)
fallback_blob_chunk = _keyed("fallback-blob-chunk", stock_datatypes["boolean"])
fallback_upload = _keyed("fallback-upload", stock_datatypes["boolean"])
gc_retention = _keyed("gc-retention", retention_interval)
fallback_s3_prefix = _keyed("fallback-s3-prefix", validate_prefix)
fallback_s3_bucket = _keyed("fallback-s3-bucket", _bucket_name)


class S3BlobStorageFactory(BaseConfig):
    """Opens the base storage section and wraps it in an S3BlobStorage."""

    def settings(self):
        from .settings import S3Settings

        c = self.config
        return S3Settings(
            bucket=c.bucket_name,
            prefix=c.s3_prefix,
            endpoint_url=c.s3_endpoint_url,
            region=c.s3_region,
            access_key=c.s3_access_key,
            secret_key=c.s3_secret_key,
            use_ssl=c.s3_use_ssl,
            ca_bundle=c.s3_ca_bundle,
            addressing_style=c.s3_addressing_style,
            sse=c.s3_sse,
            sse_kms_key_id=c.s3_sse_kms_key_id,
            sse_customer_key=c.s3_sse_customer_key,
            max_concurrency=c.s3_max_concurrency,
            connect_timeout=c.s3_connect_timeout,
            read_timeout=c.s3_read_timeout,
            max_attempts=c.s3_max_attempts,
            download_connect_timeout=c.s3_download_connect_timeout,
            download_read_timeout=c.s3_download_read_timeout,
            download_deadline=c.s3_download_deadline,
            download_max_attempts=c.s3_download_max_attempts,
            multipart=c.s3_multipart,
            multipart_threshold=c.s3_multipart_threshold,
            part_size=c.s3_part_size,
            staged_copy_threshold=c.s3_staged_copy_threshold,
            conditional_writes=c.s3_conditional_writes,
        )

    def open(self):
        from .storage import S3BlobStorage

        settings = self.settings()  # checks combinations before opening anything
        base = self.config.base.open()
        try:
            return S3BlobStorage(
                base,
                settings,
                cache_dir=self.config.cache_dir,
                cache_size=self.config.cache_size,
                download_on_unghost=self.config.download_on_unghost,
                cache_min_age=self.config.cache_min_age,
                cache_group=self.config.cache_group,
                metrics_file=self.config.metrics_file,
                metrics_interval=self.config.metrics_interval,
                metrics_database=self.name,
                fallback_blob_dir=self.config.fallback_blob_dir,
                fallback_blob_chunk=self.config.fallback_blob_chunk,
                fallback_upload=self.config.fallback_upload,
                gc_retention=self.config.gc_retention,
                fallback_s3_prefix=self.config.fallback_s3_prefix,
                fallback_s3_bucket=self.config.fallback_s3_bucket,
            )
        except BaseException:
            base.close()
            raise
