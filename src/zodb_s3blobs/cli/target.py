"""CONFIG for the operator commands: a file with one ``<s3blobstorage>``
section, or a zope.conf and the ``<zodb_db>`` chosen with ``--db``.

Every command reads its configuration here, so all report a bad file the same
way (exit code 2, naming the file, the key and the line) and open only what
they need: the S3 side, the base storage on its own, the whole storage, or
just the cache directory.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import pwd
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

#: Attempts of each request of a probe (check), at the short timeouts.
PROBE_ATTEMPTS = 2
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

    def probe_settings(self) -> S3Settings:
        """The settings with every request bounded as a startup probe's: the
        download client's short connect and read timeouts and at most
        PROBE_ATTEMPTS attempts, instead of the patient s3-read-timeout x
        s3-max-attempts of uploads (minutes against an endpoint that accepts
        connections but never answers)."""
        settings = self.settings
        return dataclasses.replace(
            settings,
            connect_timeout=settings.download_connect_timeout,
            read_timeout=settings.download_read_timeout,
            max_attempts=min(settings.max_attempts, PROBE_ATTEMPTS),
        )

    def probe_limit(self) -> float:
        """The longest one request of :meth:`probe_settings` waits, in seconds."""
        settings = self.probe_settings()
        each = settings.connect_timeout + settings.read_timeout
        return each * settings.max_attempts

    @contextlib.contextmanager
    def store(self, probe: bool = False) -> Iterator[ObjectStore]:
        """The S3 side alone, closed on exit; with *probe*, every request is
        bounded as :meth:`probe_settings` says."""
        from ..objectstore import ObjectStore

        store = ObjectStore(self.probe_settings() if probe else self.settings)
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
        try:
            storage = factory.open()
        except FileNotFoundError as exc:  # read-only: a missing file stays so
            raise UsageError(
                f"the base storage <{self.base_type}> in {self.path} does not "
                f"open: {exc.filename} does not exist (it is opened read-only, "
                "never created: check its path)"
            ) from None
        try:
            yield storage
        finally:
            storage.close()

    def check_base_section(self) -> None:
        """Raise what :func:`~zodb_s3blobs.storage.check_base` raises at open
        for a base with a blob directory of its own, from its section alone:
        opening that base would create the directory (owned by root, when
        run as root) before the check could refuse it."""
        from ..fallback import own_blob_dir_error
        from ..tids import UnsupportedBaseStorage

        config = self.section.config.base.config
        blob_dir = getattr(config, "blob_dir", None)
        if not blob_dir:
            return
        if self.base_type == "filestorage":
            raise own_blob_dir_error(config.path, blob_dir)
        if self.base_type == "relstorage":
            name = f" {config.name!r}" if getattr(config, "name", None) else ""
            raise UnsupportedBaseStorage(
                f"The wrapped RelStorage{name} has a blob-dir: remove blob-dir "
                "(and shared-blob-dir) from its <relstorage> section; its blobs "
                "are stored in S3"
            )

    @contextlib.contextmanager
    def storage(self) -> Iterator[S3BlobStorage]:
        """The whole S3BlobStorage, opened as a Zope process would, closed on exit."""
        storage = self.section.open()
        try:
            yield storage
        finally:
            storage.close()

    def existing_cache(
        self, min_age: float | None = None, size_limit: int | None = None
    ) -> BlobCache | None:
        """The local cache (with *size_limit* instead of cache-size, if given),
        for a command whose job is to change it; None when cache-dir does not
        exist (it is never created here: created by root, it would keep Zope
        from starting)."""
        from ..cache import MIN_AGE, BlobCache

        if not os.path.isdir(self.cache_dir):
            return None
        return BlobCache(
            self.cache_dir,
            self.cache_size if size_limit is None else size_limit,
            MIN_AGE if min_age is None else min_age,
        )

    def cache_owner_warning(self) -> str | None:
        """A warning when cache-dir exists and belongs to another user than the
        effective one: files and locks this command creates there would belong
        to this user (root, typically), and the Zope user could not use them."""
        try:
            owner = os.stat(self.cache_dir).st_uid
        except OSError:
            return None
        if owner == os.geteuid():
            return None
        return (
            f"warning: cache-dir {self.cache_dir} belongs to {_user(owner)}, "
            f"not to {_user(os.geteuid())} running this command: run it as "
            f"{_user(owner)} (e.g. sudo -u {_user(owner)}) if it must change "
            "the cache"
        )


def _user(uid: int) -> str:
    """The name of user *uid*, or the number when it has none."""
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def load_target(path: str, db: str | None = None) -> Target:
    """Read CONFIG; raise UsageError naming the file and the cause if it is
    unreadable, invalid, or holds no ``<s3blobstorage>`` section."""
    try:
        with open(path, encoding="utf-8") as file:
            text = file.read()
    except OSError as exc:
        raise UsageError(f"cannot read {path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise UsageError(
            f"cannot read {path}: not a text file (a ZConfig file or a zope.conf)"
        ) from None
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
    except (
        ZConfig.SubstitutionSyntaxError,
        ZConfig.SubstitutionReplacementError,
    ) as exc:
        raise UsageError(_substitution_error(path, url, text, exc)) from None
    except ZConfig.ConfigurationError as exc:
        raise UsageError(f"{path}: {exc}") from None
    if section is None:
        raise UsageError(
            f"{where} holds no storage section (an <s3blobstorage> section, with "
            "%import zodb_s3blobs)"
        )
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


def _substitution_error(
    path: str, url: str, text: str, exc: ZConfig.ConfigurationError
) -> str:
    """A message for a ``$`` ZConfig could not substitute, naming the file and
    the line but never the value: ZConfig's own message quotes part of it,
    and it may be a secret (a ``$`` in a secret key is not rare). A whole
    ``$(NAME)`` is an environment variable that is not set: named, since the
    name is not the secret and exporting it is the fix."""
    where, lineno = path, getattr(exc, "lineno", None)
    exc_url = getattr(exc, "url", None)
    if exc_url and exc_url != url:  # in a file CONFIG %includes
        where = exc_url.removeprefix("file://")
    elif lineno is None:
        lineno = _substitution_line(text)
    at = f", line {lineno}" if lineno else ""
    name = getattr(exc, "name", None)
    if (
        isinstance(exc, ZConfig.SubstitutionReplacementError)
        and getattr(exc, "source", None) == f"$({name})"
    ):
        return (
            f"{where}{at}: no replacement for {name!r}: the environment variable "
            f"{name} of $({name}) is not set: export it before running this "
            f"command (sudo drops the environment: sudo --preserve-env={name})"
        )
    return (
        f"{where}{at}: a '$' in a value starts a substitution ($name or "
        "${name} of a %define): a '$' in a value must be written '$$' (the "
        "value is not shown, it may be a secret)"
    )


def _substitution_line(text: str) -> int | None:
    """The number of the first line of *text* with a malformed ``$``."""
    from ZConfig.substitution import substitute

    for number, line in enumerate(text.splitlines(), 1):
        try:
            substitute(line, {})
        except ZConfig.SubstitutionSyntaxError:
            return number
        except ZConfig.SubstitutionReplacementError:
            continue
    return None


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
