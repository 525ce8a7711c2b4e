"""``zodb-s3blobs check``: preflight a configuration before Zope starts on it.

Every check runs, even after one failed, so one run shows everything to fix;
each failure names the bucket, key or path and the cause.
"""

from __future__ import annotations

import argparse
import grp
import json
import os
import stat
import tempfile
import uuid
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

from ZODB.TimeStamp import TimeStamp
from ZODB.utils import z64

from ..cache import DIR_MODE, GROUP_DIR_MODE, RESERVED
from ..errors import ObjectStoreError
from . import EXIT_FAILED, EXIT_OK, UsageError, add_operator_options
from .output import emit, problem, table, waiting
from .target import Target, load_target

if TYPE_CHECKING:
    from ..objectstore import ObjectStore

DESCRIPTION = """\
Check that CONFIG's <s3blobstorage> can work: the bucket is reachable and the
credentials are accepted (one LIST), a probe object can be written, read
back intact and deleted (with the configured server-side encryption), the
cache directory is writable and private (with cache-group: it and its blob
directories readable by that group only, tmp/ and locks/ private), which
writes carry If-None-Match (s3-conditional-writes), the bucket's lifecycle
rules, and the storage would open: its base storage opens read-only (a
missing Data.fs is reported, never created), is one S3BlobStorage can
serve, and the bucket answers the startup probe.
Nothing is created: not cache-dir, not the base. Every request is bounded by
the download timeouts (s3-download-connect-timeout and
s3-download-read-timeout, two attempts), so an endpoint that never answers
fails the check within (3 + 10) x 2 = 26 s with the defaults; a request
slower than a second on a terminal, or five seconds when stderr is piped, is
named on stderr, and the storage check then fails with the bucket's. The
storage check also runs what opening the storage checks beyond the base
(metrics-file: prometheus_client installed, its directory writable; the
fallback); a Data.fs that does not exist yet is a warning (the first start
creates it). cache-dir itself may have any mode but a writable one: the
storage sets it (0700, or 0750 of cache-group) when it opens. The lifecycle
check warns about missing rules zodb-s3blobs init adds (and ones changed
by hand), and fails on any rule, one init wrote for another database's
folder too, that would expire blobs or move them to an archive class; it
is skipped when the credentials may not read the lifecycle. Every check
runs; exits 1 if any failed (a warning does not). The probe key is
[prefix/]blobs/zodb-s3blobs-check-RANDOM.probe, which pack and gc leave
alone should its deletion fail.
"""
PROBE_SIZE = 4096
#: What S3 answers, for a request it refused, when the credentials are wrong.
_CREDENTIAL_CODES = {
    "InvalidAccessKeyId": "the access key id is not known to the server",
    "SignatureDoesNotMatch": "the secret key does not match the access key id",
    "InvalidToken": "the session token is not valid",
    "ExpiredToken": "the session token has expired",
}


def register(
    subparsers: argparse._SubParsersAction[argparse.ArgumentParser],
) -> argparse.ArgumentParser:
    """Add the ``check`` command to the ``zodb-s3blobs`` parser."""
    parser = subparsers.add_parser(
        "check",
        help="preflight: bucket, credentials, a probe object, cache-dir, storage",
        description=DESCRIPTION,
    )
    add_operator_options(parser)
    parser.set_defaults(run=run)
    return parser


@dataclass
class Check:
    """One check's outcome: ``ok``, ``failed``, ``warning`` (worth fixing,
    not in the way of a start) or ``skipped``, and why."""

    name: str
    status: str
    detail: str


def _code(exc: ObjectStoreError) -> str:
    """The S3 error code an ObjectStoreError's cause starts with."""
    return exc.cause.split(" ", 1)[0].rstrip(":")


def check_bucket(target: Target, store: ObjectStore) -> list[Check]:
    """List the blobs' prefix once: that shows both whether the bucket is
    there and whether the credentials are accepted."""
    bucket = target.settings.bucket
    where = target.settings.endpoint_url or "AWS S3"
    try:
        with waiting(f"{where}: LIST {target.url()}", target.probe_limit()):
            next(iter(store.list(target.layout.root)), None)
    except ObjectStoreError as exc:
        code = _code(exc)
        if code in _CREDENTIAL_CODES:
            return [
                Check("bucket", "skipped", "the credentials were refused"),
                Check(
                    "credentials",
                    "failed",
                    f"{_CREDENTIAL_CODES[code]} at {where}, for bucket {bucket!r} "
                    f"({exc.cause}): check s3-access-key and s3-secret-key",
                ),
            ]
        if code == "NoSuchBucket":
            return [
                Check(
                    "bucket",
                    "failed",
                    f"bucket {bucket!r} does not exist at {where} ({exc.cause}): "
                    "check bucket-name and s3-region; it is not created",
                ),
                Check("credentials", "ok", "accepted"),
            ]
        if code in ("AccessDenied", "403"):
            return [
                Check("bucket", "ok", f"bucket {bucket!r} answered at {where}"),
                Check(
                    "credentials",
                    "failed",
                    f"accepted, but not allowed to list {target.url()} "
                    f"({exc.cause}): check the policy",
                ),
            ]
        return [
            Check("bucket", "failed", f"cannot list {target.url()}: {exc.cause}"),
            Check("credentials", "skipped", "the bucket could not be reached"),
        ]
    return [
        Check("bucket", "ok", f"{target.url()} listed at {where}"),
        Check("credentials", "ok", "accepted"),
    ]


def check_round_trip(target: Target, store: ObjectStore) -> Check:
    """PUT, GET and DELETE a probe object, as the storage's own requests do."""
    key = f"{target.layout.root}zodb-s3blobs-check-{uuid.uuid4().hex}.probe"
    where = target.settings.endpoint_url or "AWS S3"
    limit = target.probe_limit()
    url = store.url(key)
    data = os.urandom(PROBE_SIZE)
    sse = " with SSE-C" if target.settings.sse_customer_key else ""
    with tempfile.TemporaryDirectory(prefix="zodb-s3blobs-check-") as tmp:
        sent = os.path.join(tmp, "sent")
        received = os.path.join(tmp, "received")
        with open(sent, "wb") as file:
            file.write(data)
        try:
            with waiting(f"{where}: PUT {url}", limit):
                store.transfer([(sent, key)], [])
            deadline = target.settings.download_deadline
            with open(received, "wb") as out, waiting(f"{where}: GET {url}", deadline):
                store.download(key, out)
            with open(received, "rb") as file:
                intact = file.read() == data
            with waiting(f"{where}: DELETE {url}", 2 * limit):
                store.delete([key])
                gone = store.stat(key) is None
        except ObjectStoreError as exc:
            return Check("round trip", "failed", str(exc))
    if not intact:
        return Check("round trip", "failed", f"{store.url(key)} read back altered")
    if not gone:
        return Check("round trip", "failed", f"{store.url(key)} is still there")
    return Check(
        "round trip",
        "ok",
        f"PUT, GET and DELETE of {store.url(key)}{sse} ({PROBE_SIZE} bytes intact)",
    )


def check_conditional_writes(store: ObjectStore) -> Check:
    """Which writes carry ``If-None-Match: *`` (s3-conditional-writes), as
    the storage would decide it. Information, not a failure: where the
    provider enforces it on no write, the abort's rules are the protection
    (docs/reliability.md#conditional-writes)."""
    return Check("conditional writes", "ok", store.guard.describe())


def check_lifecycle(target: Target, store: ObjectStore) -> Check:
    """The lifecycle rules ``zodb-s3blobs init`` adds: missing ones, or ones
    changed by hand, are a warning (the collector does their work too), a
    rule (whoever wrote it) that would expire or archive blobs a failure;
    so is a versioned bucket whose non-current blobs never expire (see
    :func:`_versioning_warning`). Credentials that may not read the
    configuration (the least-privilege policy) leave it unchecked."""
    from ..lifecycle import plan

    bucket = target.settings.bucket
    try:
        rules = store.lifecycle_rules()
    except ObjectStoreError as exc:
        if _code(exc) in ("AccessDenied", "403"):
            return Check(
                "lifecycle",
                "skipped",
                f"these credentials may not read bucket {bucket!r}'s lifecycle "
                f"({exc.cause}): whoever may, can run "
                f"zodb-s3blobs init {target.path}",
            )
        return Check("lifecycle", "warning", f"cannot read it: {exc}")
    found = plan(rules, target.layout)
    if found.problems:
        return Check("lifecycle", "failed", "; ".join(found.problems))
    warnings = []
    if found.missing:
        warnings.append(
            f"bucket {bucket!r} lacks the recommended rules "
            f"{', '.join(map(repr, found.missing))}: zodb-s3blobs init "
            f"{target.path} adds them (pack and gc collect what they would)"
        )
    if found.changed:
        warnings.append(
            f"{', '.join(repr(rule['ID']) for rule in found.changed)} differ "
            "from what zodb-s3blobs init writes (changed by hand?): "
            f"zodb-s3blobs init --force {target.path} writes them again"
        )
    versioning = _versioning_warning(target, store, rules)
    if versioning is not None:
        warnings.append(versioning)
    if warnings:
        return Check("lifecycle", "warning", "; ".join(warnings))
    names = ", ".join(repr(rule["ID"]) for rule in found.present)
    return Check("lifecycle", "ok", f"the recommended rules are set: {names}")


def _versioning_warning(
    target: Target, store: ObjectStore, rules: list[dict]
) -> str | None:
    """A warning when the bucket's versioning is Enabled and no enabled rule
    expires the non-current versions of this database's blobs: every
    object pack deletes stays, billed, for ever. None otherwise, and when
    the credentials may not read the versioning."""
    from ..lifecycle import expires_noncurrent, noncurrent_rule

    try:
        versioning = store.versioning()
    except ObjectStoreError as exc:
        if _code(exc) in ("AccessDenied", "403"):
            return None
        return f"cannot read the bucket's versioning: {exc}"
    if versioning != "Enabled" or expires_noncurrent(rules, target.layout):
        return None
    rule = json.dumps(noncurrent_rule(target.layout), sort_keys=True)
    return (
        f"bucket {target.settings.bucket!r} is versioned and no enabled lifecycle "
        f"rule expires non-current versions under {target.layout.root}: the "
        "bytes of every blob pack or gc deletes stay billed for ever, so pack "
        f"frees nothing; zodb-s3blobs init --versioning {target.path} adds the "
        f"rule, or add it yourself: {rule}"
    )


def _existing_ancestor(path: str) -> str:
    while not os.path.exists(path):
        path = os.path.dirname(path)
    return path


def _mode_problem(directory: str, shared: bool, group: int | None) -> str | None:
    """What is wrong with the mode of a directory of the cache, or None. The
    cache-dir and blob directories (*shared*) may be read, never written, by
    cache-group (if set, and only by it); tmp/ and locks/ stay 0700."""
    st = os.stat(directory)
    mode = stat.S_IMODE(st.st_mode)
    sharing = shared and group is not None
    wanted = GROUP_DIR_MODE if sharing else DIR_MODE
    if mode & (stat.S_IWGRP | stat.S_IWOTH):
        return f"has mode {mode:#o}: group or others may write it (chmod {wanted:o} it)"
    if mode & ~wanted & 0o077:
        return (
            f"has mode {mode:#o}: other users can read cached blobs "
            f"(chmod {wanted:o} it)"
        )
    if sharing and mode & 0o070 and st.st_gid != group:
        return (
            f"is of group {st.st_gid}, not cache-group {group}: its members "
            f"cannot read it, others can (chgrp {_group_name(group)} it)"
        )
    return None


def _group_name(gid: int) -> str:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)


def check_cache_dir(path: str, group: int | None = None) -> Check:
    """cache-dir (and its tmp/ and locks/) is private and writable, or can be
    created; with cache-group (*group*, a gid), cache-dir and the blob
    directories may be readable by that group. Only a writable mode of
    cache-dir itself fails: the storage sets its mode (and group) at every
    open, so a 0755 of a deployment tool's mkdir is fine."""
    if not os.path.exists(path):
        parent = _existing_ancestor(path)
        if not os.access(parent, os.W_OK | os.X_OK):
            return Check(
                "cache-dir",
                "failed",
                f"{path} does not exist and cannot be created: {parent} is not "
                "writable",
            )
        return Check(
            "cache-dir",
            "ok",
            f"{path} does not exist yet; it will be created ({parent} is writable)",
        )
    if not os.path.isdir(path):
        return Check("cache-dir", "failed", f"{path} is not a directory")
    with os.scandir(path) as entries:
        blob_dirs = [e.path for e in entries if e.is_dir() and e.name not in RESERVED]
    mode = stat.S_IMODE(os.stat(path).st_mode)
    if mode & (stat.S_IWGRP | stat.S_IWOTH):
        wrong = _mode_problem(path, True, group)
        return Check("cache-dir", "failed", f"{path} {wrong}")
    directories = [(os.path.join(path, name), False) for name in RESERVED]
    directories += [(directory, True) for directory in blob_dirs]
    for directory, shared in directories:
        if not os.path.isdir(directory):
            continue
        wrong = _mode_problem(directory, shared, group)
        if wrong is not None:
            return Check("cache-dir", "failed", f"{directory} {wrong}")
    tmp = os.path.join(path, "tmp")
    probe_dir = tmp if os.path.isdir(tmp) else path
    try:
        with tempfile.NamedTemporaryFile(dir=probe_dir, prefix="check-") as file:
            file.write(b"x")
            file.flush()
    except OSError as exc:
        return Check("cache-dir", "failed", f"{probe_dir} is not writable: {exc}")
    who = "private" if group is None else f"readable by group {_group_name(group)}"
    st = os.stat(path)
    wanted = DIR_MODE if group is None else GROUP_DIR_MODE
    if mode != wanted or (group is not None and st.st_gid != group):
        # What BlobCache does at every open: cache-dir is the storage's own.
        of = "" if group is None else f" of group {_group_name(group)}"
        return Check(
            "cache-dir",
            "ok",
            f"{path} is writable; it has mode {mode:#o} of group "
            f"{_group_name(st.st_gid)} now, and the storage sets {wanted:o}{of} "
            f"when it opens ({who})",
        )
    return Check("cache-dir", "ok", f"{path} is {who} (mode {mode:#o}) and writable")


def _startup_checks(target: Target, base: object | None) -> None:
    """Raise what opening S3BlobStorage would raise beyond its base and its
    bucket: the metrics file (prometheus_client installed, the directory
    writable) and the fallback. Nothing is written or kept open."""
    from ..exposition import MetricsFile
    from ..fallback import open_fallback

    config = target.section.config
    if config.metrics_file:
        MetricsFile(
            config.metrics_file,
            config.metrics_interval,
            dict,
            target.url(),
            target.cache_dir,
        ).close()  # never started: it claimed and wrote nothing
    open_fallback(
        config.fallback_blob_dir,
        config.fallback_blob_chunk,
        base,
        tempfile.gettempdir(),
    )


def _data_fs_to_create(target: Target) -> str | None:
    """The path of a FileStorage's Data.fs that does not exist yet in an
    existing directory (FileStorage creates it at the first start), or None."""
    if target.base_type != "filestorage":
        return None
    path = os.path.abspath(target.section.config.base.config.path)
    if os.path.exists(path) or not os.path.isdir(os.path.dirname(path)):
        return None
    return path


def check_storage(target: Target, store: ObjectStore, bucket_ok: bool) -> Check:
    """What opening the storage checks, without opening it as Zope would:
    the base storage opens (read-only: a mistyped path is reported, not
    created as an empty database) and is a base S3BlobStorage can serve, the
    metrics file and the fallback are usable, and the bucket answers the
    startup probe (HeadBucket, bounded as the storage bounds it). The cache
    is not opened, so cache-dir is never created here. A Data.fs missing in
    an existing directory is a warning: the first start creates it."""
    from ..storage import check_base  # what S3BlobStorage refuses at open

    around = f"<s3blobstorage> around <{target.base_type}> in {target.path}"
    to_create = _data_fs_to_create(target)
    try:
        target.check_base_section()  # before opening creates its blob-dir
        if to_create:
            _startup_checks(target, None)
        else:
            with target.base() as base:
                check_base(base)
                _startup_checks(target, base)
                last = base.lastTransaction()
    except UsageError as exc:  # a missing file, named by Target.base
        return Check("storage", "failed", str(exc))
    except Exception as exc:  # a preflight reports every failure, then goes on
        return Check(
            "storage",
            "failed",
            f"{around} does not open: {type(exc).__name__}: {exc}",
        )
    if not bucket_ok:
        return Check(
            "storage",
            "failed",
            f"{around}: its base opens, but the bucket check failed: the "
            "storage would not start, or would serve only cached blobs",
        )
    where = target.settings.endpoint_url or "AWS S3"
    limit = target.settings.download_deadline
    try:
        with waiting(f"{where}: HEAD s3://{target.settings.bucket}", limit):
            store.check_bucket()
    except ObjectStoreError as exc:
        return Check("storage", "failed", f"{around}: {exc}")
    if to_create:
        return Check(
            "storage",
            "warning",
            f"{to_create} does not exist yet: FileStorage creates it when the "
            "storage first opens (if the database exists, check the path); "
            f"<s3blobstorage> around <{target.base_type}> would open",
        )
    when = "no transaction yet" if last == z64 else f"last commit {TimeStamp(last)}"
    return Check(
        "storage",
        "ok",
        f"<s3blobstorage> around <{target.base_type}> would open (its base "
        f"read-only: {when})",
    )


def run(args: argparse.Namespace) -> int:
    """Run every check, print them, and name each failure on stderr."""
    target = load_target(args.config, args.db)
    with target.store(probe=True) as store:
        checks = check_bucket(target, store)
        bucket_ok = all(check.status == "ok" for check in checks)
        if bucket_ok:
            checks.append(check_round_trip(target, store))
            checks.append(check_conditional_writes(store))
            checks.append(check_lifecycle(target, store))
        else:
            unusable = "the bucket is not usable"
            checks.append(Check("round trip", "skipped", unusable))
            checks.append(Check("conditional writes", "skipped", unusable))
            checks.append(Check("lifecycle", "skipped", unusable))
        checks.append(
            check_cache_dir(target.cache_dir, target.section.config.cache_group)
        )
        checks.append(check_storage(target, store, bucket_ok))
    failed = [check for check in checks if check.status == "failed"]
    warned = [check for check in checks if check.status == "warning"]
    for check in failed:
        problem(f"check failed: {check.name}: {check.detail}")
    for check in warned:
        problem(f"check warning: {check.name}: {check.detail}")
    document = {"ok": not failed, "checks": [asdict(check) for check in checks]}
    lines = table(
        ["check", "result", "detail"],
        [[check.name, check.status, check.detail] for check in checks],
    )
    if failed:
        summary = f"{len(failed)} of {len(checks)} checks failed"
    else:
        summary = f"OK ({len(warned)} warning(s))" if warned else "OK"
    lines += ["", summary]
    emit(args, document, lines)
    return EXIT_FAILED if failed else EXIT_OK
