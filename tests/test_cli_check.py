"""``zodb-s3blobs check``, run as a user would: a good configuration passes;
a missing bucket, refused credentials, a cache-dir others can read and a
storage that does not open each fail with what and why."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import boto3
import pytest
import ZODB
import ZODB.config
from ZODB.blob import Blob
from ZODB.FileStorage import FileStorage

import clitools
import s3env
from clitools import run, run_json
from s3hooks import failing
from test_cache_group import other_group
from test_cli_undelete import versioned_config
from zodb_s3blobs.cli.check import check_lifecycle
from zodb_s3blobs.cli.localserver import REGION
from zodb_s3blobs.cli.target import load_target

pytestmark = pytest.mark.s3_servers("moto", "rgw")

#: Runs moto's server in its own process (authentication is process-wide in
#: moto, and the session's server must keep accepting any credentials).
SERVER = """
import sys
from moto.server import ThreadedMotoServer
server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
server.start()
host, port = server.get_host_and_port()
print(f"http://{host}:{port}", flush=True)
sys.stdin.read()
server.stop()
"""
AUTH_BUCKET = "zodb-s3blobs-auth"
ALLOW_S3 = {
    "Version": "2012-10-17",
    "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}],
}


@pytest.fixture(scope="module")
def auth_server():
    """An S3 server that checks credentials: ``(endpoint, key id, secret)`` of
    the one IAM user allowed to use AUTH_BUCKET."""
    process = subprocess.Popen(
        [sys.executable, "-c", SERVER],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        endpoint = process.stdout.readline().strip()
        setup = {
            "endpoint_url": endpoint,
            "region_name": REGION,
            "aws_access_key_id": "setup",
            "aws_secret_access_key": "setup",
        }
        iam = boto3.client("iam", **setup)
        iam.create_user(UserName="zope")
        key = iam.create_access_key(UserName="zope")["AccessKey"]
        iam.put_user_policy(
            UserName="zope", PolicyName="s3", PolicyDocument=json.dumps(ALLOW_S3)
        )
        boto3.client("s3", **setup).create_bucket(Bucket=AUTH_BUCKET)
        # From now on every request must be signed by a known key.
        request = urllib.request.Request(
            f"{endpoint}/moto-api/reset-auth",
            data=b"0",
            method="POST",
            headers={"Content-Type": "text/plain"},
        )
        urllib.request.urlopen(request).read()
        yield endpoint, key["AccessKeyId"], key["SecretAccessKey"]
    finally:
        process.stdin.close()
        process.wait(timeout=30)


@pytest.fixture
def checking_server(request, s3_kind):
    """``(endpoint, bucket, key id, secret)`` of a server that checks
    credentials: moto's own process (auth_server), or the session's RGW,
    which always does."""
    if s3_kind == "rgw":
        rgw = clitools.s3env.server()
        return rgw.endpoint_url, clitools.s3env.BUCKET, rgw.access_key, rgw.secret_key
    endpoint, key_id, secret = request.getfixturevalue("auth_server")
    return endpoint, AUTH_BUCKET, key_id, secret


def with_credentials(config: Path, endpoint: str, bucket: str, key_id, secret):
    """Point CONFIG (written for the session's server) at *endpoint* and
    *bucket* with these credentials."""
    server = clitools.s3env.server()
    text = config.read_text()
    for old, new in [
        (server.endpoint_url, endpoint),
        (f"bucket-name {clitools.s3env.BUCKET}", f"bucket-name {bucket}"),
        (f"s3-access-key {server.access_key}", f"s3-access-key {key_id}"),
        (f"s3-secret-key {server.secret_key}", f"s3-secret-key {secret}"),
    ]:
        assert old in text
        text = text.replace(old, new)
    config.write_text(text)


def existing_filestorage(path: Path) -> str:
    """A <filestorage> section for a new database (with its root object)."""
    ZODB.DB(FileStorage(str(path))).close()
    return clitools.filestorage(path)


def statuses(report: dict) -> dict[str, str]:
    return {check["name"]: check["status"] for check in report["checks"]}


def test_a_good_configuration_passes(tmp_path):
    """The session's bucket has no lifecycle rules: a warning naming the
    missing ones and the command adding them, exit 0 all the same
    (tests/test_cli_init.py shows check clean after init)."""
    config = clitools.write_config(tmp_path, existing_filestorage(tmp_path / "x.fs"))
    result = run("check", config)
    assert result.returncode == 0, result.stderr
    [warning] = result.stderr.splitlines()
    assert warning.startswith(
        "zodb-s3blobs: check warning: lifecycle: bucket 'zodb-s3blobs-tests' "
        "lacks the recommended rules 'zodb-s3blobs expire "
    )
    assert f"zodb-s3blobs init {config} adds them" in warning
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["check", "result", "detail"]
    assert [line.split()[:2] for line in lines[1:8]] == [
        ["bucket", "ok"],
        ["credentials", "ok"],
        ["round", "trip"],
        ["conditional", "writes"],
        ["lifecycle", "warning"],
        ["cache-dir", "ok"],
        ["storage", "ok"],
    ]
    assert lines[3].split()[2] == "ok"
    # moto enforces If-None-Match on PUT and multipart completion, not copies
    assert lines[4].split()[2:6] == ["ok", "auto:", "on", "for"]
    assert lines[-1] == "OK (1 warning(s))"
    assert clitools.s3_objects(config) == {}  # the probe object was deleted


def test_json_is_one_document(tmp_path):
    config = clitools.write_config(tmp_path, existing_filestorage(tmp_path / "x.fs"))
    code, report = run_json("check", config)
    assert code == 0
    assert report["command"] == "check"
    assert report["ok"] is True
    assert statuses(report) == {
        **dict.fromkeys(
            [
                "bucket",
                "credentials",
                "round trip",
                "conditional writes",
                "cache-dir",
                "storage",
            ],
            "ok",
        ),
        "lifecycle": "warning",
    }


def test_a_missing_bucket_is_named(tmp_path):
    config = clitools.write_config(tmp_path, existing_filestorage(tmp_path / "x.fs"))
    config.write_text(
        config.read_text().replace("zodb-s3blobs-tests", "no-such-bucket-here")
    )
    result = run("check", config)
    assert result.returncode == 1
    assert result.stderr.splitlines()[0].startswith(
        "zodb-s3blobs: check failed: bucket: bucket 'no-such-bucket-here' does not "
        "exist at http://127.0.0.1:"
    )
    assert "NoSuchBucket" in result.stderr.splitlines()[0]
    code, report = run_json("check", config)
    assert code == 1
    assert report["ok"] is False
    assert statuses(report)["round trip"] == "skipped"
    assert statuses(report)["cache-dir"] == "ok"  # every check still runs


@pytest.mark.parametrize(
    "wrong, code, cause",
    [
        ("secret", "SignatureDoesNotMatch", "the secret key does not match"),
        ("key id", "InvalidAccessKeyId", "the access key id is not known"),
    ],
)
def test_refused_credentials_are_named(tmp_path, checking_server, wrong, code, cause):
    endpoint, bucket, key_id, secret = checking_server
    if wrong == "secret":
        secret = "not-" + secret
    else:
        key_id = "AKIAUNKNOWNUNKNOWN00"
    config = clitools.write_config(tmp_path, existing_filestorage(tmp_path / "x.fs"))
    with_credentials(config, endpoint, bucket, key_id, secret)

    result = run("check", config)
    assert result.returncode == 1
    first = result.stderr.splitlines()[0]
    assert first.startswith(f"zodb-s3blobs: check failed: credentials: {cause}")
    assert f"for bucket '{bucket}'" in first
    assert code in first
    assert secret not in result.stdout + result.stderr


def test_the_right_credentials_pass_the_checking_server(tmp_path, checking_server):
    config = clitools.write_config(tmp_path, existing_filestorage(tmp_path / "x.fs"))
    with_credentials(config, *checking_server)
    code, report = run_json("check", config)
    assert code == 0, report
    assert statuses(report)["round trip"] == "ok"


def failures(stderr: str) -> list[str]:
    """The failed checks' lines of *stderr* (warnings left out)."""
    return [line for line in stderr.splitlines() if " check warning: " not in line]


def cache_dir_check(report: dict) -> dict:
    [found] = [check for check in report["checks"] if check["name"] == "cache-dir"]
    return found


def test_a_cache_dir_made_under_umask_022_passes_and_is_made_private(tmp_path):
    """A fresh Plone site: cookiecutter-zope-instance makes cache-dir with
    mode 0755. The storage sets its mode when it opens, and check says so
    instead of failing.

    Fails before the fix: check failed ("other users can read cached blobs
    (chmod 700 it)") while the storage opened on it as it was."""
    config = clitools.write_config(tmp_path, existing_filestorage(tmp_path / "x.fs"))
    cache = tmp_path / "cache"
    cache.mkdir(mode=0o755)
    cache.chmod(0o755)
    code, report = run_json("check", config)
    assert code == 0, report
    detail = cache_dir_check(report)["detail"]
    assert cache_dir_check(report)["status"] == "ok"
    assert "has mode 0o755" in detail and "the storage sets 700 when it opens" in detail
    clitools.open_storage(config).close()
    assert cache.stat().st_mode & 0o777 == 0o700
    code, report = run_json("check", config)
    assert cache_dir_check(report)["detail"] == (
        f"{cache} is private (mode 0o700) and writable"
    )


def test_a_cache_dir_others_can_write_fails(tmp_path):
    config = clitools.write_config(tmp_path, existing_filestorage(tmp_path / "x.fs"))
    cache = tmp_path / "cache"
    cache.mkdir(mode=0o777)
    cache.chmod(0o757)
    result = run("check", config)
    assert result.returncode == 1
    assert failures(result.stderr) == [
        f"zodb-s3blobs: check failed: cache-dir: {cache} has mode 0o757: group or "
        "others may write it (chmod 700 it)"
    ]


def cache_group_config(tmp_path, group: str | int) -> Path:
    """CONFIG of an existing FileStorage with ``cache-group GROUP``."""
    return clitools.write_config(
        tmp_path,
        existing_filestorage(tmp_path / "x.fs"),
        extra=f"cache-group {group}",
    )


def test_a_cache_set_up_for_cache_group_passes(tmp_path):
    """cache-group makes cache-dir and its blob directories 0750 of that
    group; tmp/ and locks/ stay 0700: what the storage set up passes."""
    group = other_group()
    config = cache_group_config(tmp_path, group.gr_name)
    db = ZODB.DB(ZODB.config.storageFromString(config.read_text()))
    with db.transaction() as conn:
        conn.root()["blob"] = Blob(b"served by the web server")
    db.close()
    cache = tmp_path / "cache"
    assert [d.stat().st_mode & 0o777 for d in (cache, cache / "tmp")] == [0o750, 0o700]
    code, report = run_json("check", config)
    assert code == 0, report
    [cache_check] = [c for c in report["checks"] if c["name"] == "cache-dir"]
    assert f"group {group.gr_name}" in cache_check["detail"]


@pytest.mark.parametrize(
    "where, mode, cause",
    [
        ("", 0o770, "has mode 0o770: group or others may write it (chmod 750 it)"),
        (
            "tmp",
            0o750,
            "has mode 0o750: other users can read cached blobs (chmod 700 it)",
        ),
        ("ab", 0o770, "has mode 0o770: group or others may write it (chmod 750 it)"),
    ],
)
def test_a_cache_group_cache_fails_what_the_group_may_not(tmp_path, where, mode, cause):
    """With cache-group, the group may read cache-dir and the blob
    directories, never write them, and never read tmp/ or locks/."""
    group = other_group()
    config = cache_group_config(tmp_path, group.gr_gid)
    cache = tmp_path / "cache"
    for directory in (cache, cache / "tmp", cache / "locks", cache / "ab"):
        directory.mkdir(mode=0o700)
    os.chmod(cache, 0o750)
    os.chown(cache, -1, group.gr_gid)
    os.chmod(cache / where, mode)
    result = run("check", config)
    assert result.returncode == 1
    assert failures(result.stderr) == [
        f"zodb-s3blobs: check failed: cache-dir: {cache / where if where else cache} "
        + cause
    ]


def test_a_cache_dir_of_another_group_is_given_to_cache_group_at_open(tmp_path):
    """cache-dir itself is the storage's: it sets its mode and group at every
    open, so check says what will change rather than failing.

    Fails before the fix: check failed on what the storage mends."""
    group = other_group()
    config = cache_group_config(tmp_path, group.gr_gid)
    cache = tmp_path / "cache"
    cache.mkdir(mode=0o755)
    cache.chmod(0o755)
    code, report = run_json("check", config)
    assert code == 0, report
    detail = cache_dir_check(report)["detail"]
    assert f"of group {_group(os.getegid())} now" in detail
    assert f"the storage sets 750 of group {group.gr_name} when it opens" in detail
    clitools.open_storage(config).close()
    assert (cache.stat().st_mode & 0o777, cache.stat().st_gid) == (0o750, group.gr_gid)


def _group(gid: int) -> str:
    import grp

    return grp.getgrgid(gid).gr_name


def failed_storage_check(tmp_path, section: str, base: str) -> str:
    """Run ``check`` on *section*; assert it fails on the storage, naming the
    base section and the config file; return the check's detail."""
    config = clitools.write_config(tmp_path, section)
    code, report = run_json("check", config)
    assert code == 1
    [storage] = [c for c in report["checks"] if c["name"] == "storage"]
    assert storage["status"] == "failed"
    assert storage["detail"].startswith(
        f"<s3blobstorage> around <{base}> in {config} does not open: "
    )
    return storage["detail"]


def test_a_storage_that_does_not_open_fails(tmp_path):
    # A FileStorage with its own blob-dir is refused by S3BlobStorage.
    section = clitools.filestorage(tmp_path / "x.fs", blob_dir=tmp_path / "blobs")
    ZODB.DB(
        FileStorage(str(tmp_path / "x.fs"), blob_dir=str(tmp_path / "blobs"))
    ).close()
    assert "has blob-dir" in failed_storage_check(tmp_path, section, "filestorage")


def test_check_runs_the_validation_of_the_storage_s_start(tmp_path):
    """metrics-file set and prometheus_client not installed: the storage
    refuses to start, and so check fails, naming the key and the extra.

    Fails before the fix: check said "would open"."""
    hidden = tmp_path / "hidden"
    (hidden / "prometheus_client").mkdir(parents=True)
    (hidden / "prometheus_client" / "__init__.py").write_text(
        "raise ImportError('not installed (hidden by the test)')\n"
    )
    config = clitools.write_config(
        tmp_path,
        existing_filestorage(tmp_path / "x.fs"),
        extra=f"metrics-file {tmp_path}/zodb-{{pid}}.prom",
    )
    path = os.pathsep.join([str(hidden), *sys.path])
    env = dict(os.environ, PYTHONPATH=path, NO_PROXY="127.0.0.1,localhost")
    result = subprocess.run(
        [sys.executable, "-m", "zodb_s3blobs.cli", "check", str(config), "--json"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1
    report = json.loads(result.stdout)
    [storage] = [c for c in report["checks"] if c["name"] == "storage"]
    assert storage["status"] == "failed"
    assert (
        "metrics-file is set, but prometheus_client is not installed: install "
        "the metrics extra" in storage["detail"]
    )
    opening = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys, ZODB.config; ZODB.config.storageFromFile(open(sys.argv[1]))",
            str(config),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert "prometheus_client is not installed" in opening.stderr


def test_a_bad_key_is_a_configuration_error(tmp_path):
    config = clitools.write_config(tmp_path, existing_filestorage(tmp_path / "x.fs"))
    config.write_text(config.read_text().replace("s3-region", "s3-regoin"))
    result = run("check", config)
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        f"zodb-s3blobs: error: {config}: 's3-regoin' is not a known key name"
    ]
    assert result.stdout == ""


@contextlib.contextmanager
def stalled_endpoint_config(tmp_path, extra: str = "") -> Iterator[tuple]:
    """CONFIG on an endpoint that accepts connections but never answers (a
    fault server stalling every request), and that server."""
    from faultserver import Faults, faulty_s3

    with faulty_s3(Faults(stall=30)) as server:
        config = clitools.write_config(
            tmp_path, existing_filestorage(tmp_path / "x.fs"), extra=extra
        )
        endpoint = clitools.s3env.server().endpoint_url
        config.write_text(config.read_text().replace(endpoint, server.endpoint_url))
        yield config, server


def check_timed(config) -> tuple[float, int, dict]:
    """Run ``check --json`` on CONFIG: seconds taken, exit code, report."""
    started = time.monotonic()
    code, report = run_json("check", config)
    return time.monotonic() - started, code, report


@pytest.mark.s3_servers("moto")
def test_a_stalled_endpoint_fails_check_within_the_default_deadline(tmp_path):
    """The defaults: two LIST attempts of the 10 s download read timeout.
    Piped, stderr names what check waits for (after 5 s), and the storage
    check fails with the bucket's.

    Fails before the fix: nothing was printed for 20 s when piped, and the
    storage check said "ok"."""
    with stalled_endpoint_config(tmp_path) as (config, server):
        started = time.monotonic()
        result = run("check", config, "--json")
        elapsed = time.monotonic() - started
    assert elapsed < 45
    assert result.returncode == 1
    report = json.loads(result.stdout)
    assert statuses(report)["bucket"] == "failed"
    assert statuses(report)["storage"] == "failed"
    [storage] = [c for c in report["checks"] if c["name"] == "storage"]
    assert "the bucket check failed" in storage["detail"]
    first = result.stderr.splitlines()[0]
    assert first.startswith(f"zodb-s3blobs: waiting for {server.endpoint_url}: LIST")
    assert first.endswith("(up to 26 s) ...")


@pytest.mark.s3_servers("moto")
def test_a_stalled_endpoint_fails_check_within_seconds(tmp_path):
    """An endpoint that accepts connections but never answers: check gives up
    after the short download timeouts (one or two attempts each), not after
    s3-read-timeout x s3-max-attempts; on a terminal it says what it waits for.

    Fails before the fix: the LIST (and then the probe's PUT, GET and
    DELETE) waited s3-read-timeout, 300 s, times 5 attempts each.

    A 1 s download read timeout and a 3 s deadline keep the test short: the
    probes obey those keys (the test above runs check with the defaults)."""
    extra = "s3-download-read-timeout 1\ns3-download-deadline 3"
    with stalled_endpoint_config(tmp_path, extra) as (config, server):
        elapsed, code, report = check_timed(config)
        assert elapsed < 25
        assert code == 1
        assert statuses(report)["bucket"] == "failed"
        assert statuses(report)["round trip"] == "skipped"
        [bucket] = [c for c in report["checks"] if c["name"] == "bucket"]
        assert "timeout" in bucket["detail"].lower()
        code, shown = clitools.run_on_terminal("check", config)
        assert code == 1
        assert f"waiting for {server.endpoint_url}: LIST".encode() in shown


def test_a_missing_data_fs_is_reported_not_created(tmp_path):
    """check opens the base storage read-only: a Data.fs that does not exist
    is a warning naming it (a new site's first start creates it; a mistyped
    path shows), and no file (nor cache-dir) is created.

    Fails before the fix: a new site failed check until its first start."""
    missing = tmp_path / "Data.fs"
    config = clitools.write_config(tmp_path, clitools.filestorage(missing))
    result = run("check", config)
    assert result.returncode == 0, result.stderr
    assert (
        f"zodb-s3blobs: check warning: storage: {missing} does not exist yet: "
        "FileStorage creates it when the storage first opens"
    ) in result.stderr
    assert not missing.exists()
    assert not (tmp_path / "cache").exists()


def test_a_data_fs_in_a_missing_directory_is_bad_configuration(tmp_path):
    """Opening creates no directory: that path is a mistake, named (by the
    schema, before anything is opened)."""
    mistyped = tmp_path / "no-such-dir" / "Data.fs"
    config = clitools.write_config(tmp_path, clitools.filestorage(mistyped))
    result = run("check", config)
    assert result.returncode == 2
    assert f"{mistyped} does not exist" in result.stderr
    assert not mistyped.parent.exists()


def test_check_of_dev_null_is_bad_usage(tmp_path):
    """A CONFIG without a storage section is bad usage, named.

    Fails before the fix: AttributeError, exit 1."""
    result = run("check", "/dev/null")
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        "zodb-s3blobs: error: /dev/null holds no storage section (an "
        "<s3blobstorage> section, with %import zodb_s3blobs)"
    ]
    code, report = run_json("check", "/dev/null")
    assert code == 2
    assert report["ok"] is False


def test_a_binary_config_is_bad_usage(tmp_path):
    """Fails before the fix: UnicodeDecodeError, exit 1."""
    config = tmp_path / "Data.fs"
    config.write_bytes(b"FS21\xff\xfe\x00")
    result = run("check", config)
    assert result.returncode == 2
    assert result.stderr.startswith(f"zodb-s3blobs: error: cannot read {config}: ")


@pytest.mark.parametrize(
    "args, message",
    [
        (["check"], "the following arguments are required: CONFIG"),
        (["chekc", "x.conf"], "invalid choice: 'chekc'"),
        (["migrate", "x.conf"], "one of the arguments --from-blob-dir"),
        (["cache", "prune", "x.conf", "--to", "lots"], "'lots' is not a size"),
    ],
)
def test_usage_errors_print_json_under_json(args, message):
    """Every bad invocation exits 2; with --json a JSON document says why.

    Fails before the fix: argparse printed its usage on stderr and nothing
    on stdout."""
    result = run(*args, "--json")
    assert result.returncode == 2
    assert message in result.stderr
    report = json.loads(result.stdout)
    assert report["ok"] is False
    assert message in report["error"]


@pytest.mark.parametrize("base", ["filestorage", "relstorage"])
def test_a_base_with_a_blob_dir_is_reported_without_creating_it(tmp_path, base):
    """A base section with a blob-dir of its own (the misconfiguration check
    is there to report) fails the storage check, and the blob directory is
    not created (as root, it would belong to root). The advice for a
    FileStorage is the documented path: that directory becomes
    fallback-blob-dir.

    Fails before the fix: the base was opened first, and opening it created
    the blob directory before it was refused; then the advice was to upload
    the files before switching, against docs/migration.md."""
    blob_dir = tmp_path / "blobs"
    if base == "filestorage":
        section = clitools.filestorage(tmp_path / "x.fs", blob_dir=blob_dir)
        ZODB.DB(FileStorage(str(tmp_path / "x.fs"))).close()
        said = (
            f"has blob-dir '{blob_dir}': remove blob-dir from its section and "
            "name the directory in <s3blobstorage> instead, as fallback-blob-dir "
            f"{blob_dir}: its blobs are read from there until `zodb-s3blobs "
            "migrate` has uploaded them (switch first, migrate later"
        )
    else:
        data_dir = tmp_path / "sqlite"
        data_dir.mkdir()
        adapter = clitools.sqlite3(data_dir)
        section = clitools.relstorage(adapter, blob_dir=blob_dir)
        said = "has a blob-dir: remove blob-dir (and shared-blob-dir)"
    assert said in failed_storage_check(tmp_path, section, base)
    assert not blob_dir.exists()


def test_a_dollar_in_a_secret_is_reported_without_the_secret(tmp_path):
    """A ``$`` in a value that ZConfig cannot substitute (``$(`` unclosed, a
    ``$name`` never defined) is reported with the file, the line and the fix
    (``$$``), without any part of the value, on stderr and in --json.

    Fails before the fix: ZConfig's message was printed as it is, quoting the
    secret from the ``$`` on ("'$(xyzVALUE' not followed by ')'")."""
    config = clitools.write_config(tmp_path, existing_filestorage(tmp_path / "x.fs"))
    lines = config.read_text().splitlines()
    [number] = [n for n, line in enumerate(lines, 1) if "s3-secret-key" in line]
    for value in ["Sup3rS3cret$(xyzVALUE", "Sup3rS3cret$xyzVALUE"]:
        lines[number - 1] = f"  s3-secret-key {value}"
        config.write_text("\n".join(lines) + "\n")
        result = run("check", config)
        assert result.returncode == 2
        assert result.stderr.splitlines() == [
            f"zodb-s3blobs: error: {config}, line {number}: a '$' in a value "
            "starts a substitution ($name or ${name} of a %define): a '$' in a "
            "value must be written '$$' (the value is not shown, it may be a "
            "secret)"
        ]
        code, report = run_json("check", config)
        assert code == 2
        assert f"{config}, line {number}: a '$' in a value" in report["error"]
        for output in (result.stdout, result.stderr, json.dumps(report)):
            assert "xyz" not in output.lower() and "Sup3r" not in output


def test_error_messages_are_redacted(monkeypatch, capsys):
    """An error that quotes a registered secret or a request signature is
    printed masked, on stderr and in the --json document.

    Fails before the fix: the message was printed as it was."""
    from zodb_s3blobs import cli, redact
    from zodb_s3blobs.cli import check

    secret = "Sup3rS3cretVALUE-of-this-test"
    redact.protect(secret)

    def fail(args):
        raise RuntimeError(
            f"GET https://s3.example/b/k?X-Amz-Signature=0123abcdef failed: {secret}"
        )

    monkeypatch.setattr(check, "run", fail)
    assert cli.main(["check", "x.conf", "--json"]) == 1
    out, err = capsys.readouterr()
    assert err == (
        "zodb-s3blobs: error: RuntimeError: GET "
        "https://s3.example/b/k?X-Amz-Signature=*** failed: ***\n"
    )
    assert json.loads(out)["error"] == err.removeprefix("zodb-s3blobs: error: ")[:-1]
    assert cli.main(["check", "x.conf", "--debug"]) == 1
    _out, err = capsys.readouterr()
    assert secret not in err and "0123abcdef" not in err


@pytest.mark.parametrize(
    "command",
    [["check"], ["init"], ["verify"], ["gc"], ["cache", "stats"]],
    ids=lambda command: " ".join(command),
)
def test_an_unset_environment_variable_is_named(tmp_path, command):
    """``$(NAME)`` of a variable that is not set (sudo dropped it): every
    command names the variable and says to export it, as
    docs/configuration.md says.

    Fails before the fix: the message said that a '$' must be written '$$',
    naming neither the variable nor $(NAME)."""
    config = clitools.write_config(tmp_path, existing_filestorage(tmp_path / "x.fs"))
    lines = config.read_text().splitlines()
    [number] = [n for n, line in enumerate(lines, 1) if "s3-secret-key" in line]
    lines[number - 1] = "  s3-secret-key $(ZODB_S3BLOBS_UNSET_SECRET)"
    config.write_text("\n".join(lines) + "\n")
    result = run(*command, config)
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        f"zodb-s3blobs: error: {config}, line {number}: no replacement for "
        "'ZODB_S3BLOBS_UNSET_SECRET': the environment variable "
        "ZODB_S3BLOBS_UNSET_SECRET of $(ZODB_S3BLOBS_UNSET_SECRET) is not set: "
        "export it before running this command (sudo drops the environment: "
        "sudo --preserve-env=ZODB_S3BLOBS_UNSET_SECRET)"
    ]


def _lifecycle(report: dict) -> dict:
    [check] = [c for c in report["checks"] if c["name"] == "lifecycle"]
    return check


def test_a_versioned_bucket_whose_old_versions_never_expire_is_a_warning(tmp_path):
    """Versioning on and no rule expiring non-current versions: the warning
    says what it costs and prints the rule; init --versioning adds it."""
    config, bucket, _revisions = versioned_config(tmp_path, [100], 0)
    root = clitools.layout(config).root
    code, report = run_json("check", config)
    detail = _lifecycle(report)["detail"]
    assert code == 0 and _lifecycle(report)["status"] == "warning"
    assert f"bucket '{bucket}' is versioned and no enabled lifecycle rule" in detail
    assert "billed for ever, so pack frees nothing" in detail
    assert f"zodb-s3blobs init --versioning {config}" in detail
    assert '"NoncurrentVersionExpiration": {"NoncurrentDays": 30}' in detail
    assert f'"Prefix": "{root}"' in detail

    assert run("init", config, "--versioning").returncode == 0
    code, report = run_json("check", config)
    assert (code, _lifecycle(report)["status"]) == (0, "ok"), report


def test_an_operator_s_rule_expiring_old_versions_is_enough(tmp_path):
    """A rule of the operator's for the whole bucket expires the non-current
    versions: no versioning warning (only the missing rules of ours)."""
    config, bucket, _revisions = versioned_config(tmp_path, [100], 0)
    rule = {
        "ID": "site policy",
        "Status": "Enabled",
        "Filter": {"Prefix": ""},
        "NoncurrentVersionExpiration": {"NoncurrentDays": 90},
    }
    s3env.server().client().put_bucket_lifecycle_configuration(
        Bucket=bucket, LifecycleConfiguration={"Rules": [rule]}
    )
    _code, report = run_json("check", config)
    detail = _lifecycle(report)["detail"]
    assert "lacks the recommended rules" in detail
    assert "non-current versions" not in detail


def test_versioning_that_may_not_be_read_is_not_checked(tmp_path):
    """AccessDenied reading the versioning: that part is left out, as the
    lifecycle is when it may not be read."""
    config, _bucket, _revisions = versioned_config(tmp_path, [100], 0)
    target = load_target(str(config))
    with target.store() as store:
        assert "non-current versions" in check_lifecycle(target, store).detail
        with failing(store, "GetBucketVersioning"):
            assert "non-current" not in check_lifecycle(target, store).detail
