"""CONFIG for the operator commands: a file with one ``<s3blobstorage>``
section, or a zope.conf and the ``<zodb_db>`` chosen with ``--db``.

Every command reads its configuration here, so all report a bad file the same
way (exit code 2, naming the file, the key and the line) and open only what
they need: the S3 side, the base storage on its own, the whole storage, or
just the cache directory.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import ZConfig
import ZODB.config

from ..config import S3BlobStorageFactory
from ..keys import KeyLayout
from . import UsageError

if TYPE_CHECKING:
    from .. import S3BlobStorage, S3Settings
    from ..cache import BlobCache
    from ..objectstore import ObjectStore

#: A zope.conf names its databases in <zodb_db NAME> sections.
_ZODB_DB = re.compile(r"^\s*<zodb_db[\s>]", re.IGNORECASE | re.MULTILINE)


@dataclass
class Target:
    """The ``<s3blobstorage>`` section CONFIG names, and ways to open its parts."""

    path: str
    section: S3BlobStorageFactory
    settings: S3Settings
    layout: KeyLayout

    @property
    def cache_dir(self) -> str:
        """The ``cache-dir`` key, as an absolute path."""
        return os.path.abspath(self.section.config.cache_dir)

    @property
    def cache_size(self) -> int:
        """The ``cache-size`` key, in bytes."""
        return self.section.config.cache_size

    @property
    def base_type(self) -> str:
        """The base storage's section type, e.g. ``filestorage``."""
        return self.section.config.base.config.getSectionType()

    def url(self) -> str:
        """Where the blobs are: ``s3://bucket/[prefix/]blobs/``."""
        return f"s3://{self.settings.bucket}/{self.layout.root}"

    @contextlib.contextmanager
    def store(self) -> Iterator[ObjectStore]:
        """The S3 side alone, closed on exit."""
        from ..objectstore import ObjectStore

        store = ObjectStore(self.settings)
        try:
            yield store
        finally:
            store.close()

    @contextlib.contextmanager
    def base(self, read_only: bool = True) -> Iterator[object]:
        """The base storage opened on its own, closed on exit.

        Read-only by default: the commands only read it, and a read-only
        FileStorage takes no lock, so they can run beside a running Zope.
        """
        factory = self.section.config.base
        if read_only and hasattr(factory.config, "read_only"):
            factory.config.read_only = True
        storage = factory.open()
        try:
            yield storage
        finally:
            storage.close()

    @contextlib.contextmanager
    def storage(self) -> Iterator[S3BlobStorage]:
        """The whole S3BlobStorage, opened as a Zope process would, closed on exit."""
        storage = self.section.open()
        try:
            yield storage
        finally:
            storage.close()

    def cache(self) -> BlobCache:
        """The local cache (its directory is created if missing)."""
        from ..cache import BlobCache

        return BlobCache(self.cache_dir, self.cache_size)


def load_target(path: str, db: str | None = None) -> Target:
    """Read CONFIG; raise UsageError naming the file and the cause if it is
    unreadable, invalid, or holds no ``<s3blobstorage>`` section."""
    try:
        with open(path, encoding="utf-8") as file:
            text = file.read()
    except OSError as exc:
        raise UsageError(f"cannot read {path}: {exc.strerror}") from None
    url = "file://" + os.path.abspath(path)
    try:
        if _ZODB_DB.search(text):
            section, where = _zope_conf_storage(path, url, db)
        elif db is not None:
            raise UsageError(
                f"--db {db}: {path} has no <zodb_db> sections (--db is for a zope.conf)"
            )
        else:
            config, _handler = ZConfig.loadConfig(ZODB.config.getStorageSchema(), url)
            section, where = config.storage, path
    except ZConfig.ConfigurationError as exc:
        raise UsageError(f"{path}: {exc}") from None
    if not isinstance(section, S3BlobStorageFactory):
        section_type = section.config.getSectionType()
        raise UsageError(
            f"the storage of {where} is a <{section_type}> section, not "
            "<s3blobstorage> (with %import zodb_s3blobs)"
        )
    try:
        settings = section.settings()
        layout = KeyLayout(settings.prefix)
    except ValueError as exc:
        raise UsageError(f"{path}: {exc}") from None
    return Target(path, section, settings, layout)


def _zope_conf_storage(path: str, url: str, db: str | None) -> tuple[object, str]:
    """The storage section of the ``<zodb_db>`` named *db* in a zope.conf."""
    try:
        from Zope2.Startup.options import ZopeWSGIOptions
    except ImportError:
        raise UsageError(
            f"{path} is a zope.conf: reading it needs Zope installed here"
        ) from None
    options = ZopeWSGIOptions(url)()
    databases = {
        database.config.getSectionName(): database.config.storage
        for database in options.configroot.databases
    }
    names = ", ".join(sorted(databases))
    if db is None:
        if len(databases) != 1:
            raise UsageError(
                f"{path} has several <zodb_db> sections: choose one with --db "
                f"NAME ({names})"
            )
        [db] = databases
    if db not in databases:
        raise UsageError(f"--db {db}: {path} has no <zodb_db {db}> (it has {names})")
    return databases[db], f"<zodb_db {db}> in {path}"
