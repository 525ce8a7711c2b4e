"""Directories shared with other local users are hostile (node_exporter's
textfile folder, commonly group-writable without the sticky bit; ``/var/tmp``):
each test is an attack another user of the host can make there, or a link or
FIFO planted by the same user where no other is available.

Every test here failed before the fix, as its docstring says how."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest
import ZODB
from prometheus_client.parser import text_string_to_metric_families

import clitools
from clitools import run, run_json
from test_exposition import open_with_metrics, wait_for_write
from test_storage import commit_blobs
from zodb_s3blobs import exposition
from zodb_s3blobs.cache import ABANDONED_AFTER, BlobCache
from zodb_s3blobs.exposition import MetricsFile, process_path
from zodb_s3blobs.objectstore import MAX_PRESIGNED_EXPIRY, content_disposition

#: The other local user (and group): nobody.
OTHER = 65534
ROOT = os.geteuid() == 0
needs_root = pytest.mark.skipif(not ROOT, reason="only root can act as another user")
HOST = socket.gethostname()


def as_another_user(action: Callable[[], object]) -> None:
    """Run *action* as another local user would: in a forked child as user
    and group 65534 when this is root, else (links and FIFOs work the same
    for any owner) in this process as this user. Raise if it failed."""
    if not ROOT:
        action()
        return
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.setgroups([])
            os.setgid(OTHER)
            os.setuid(OTHER)
            action()
            code = 0
        except BaseException:
            traceback.print_exc()
        finally:
            os._exit(code)
    _pid, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, "the other user's action failed"


@pytest.fixture
def shared_dir():
    """A directory every local user may write, without the sticky bit."""
    path = Path(tempfile.mkdtemp(prefix="shared-", dir="/tmp"))
    path.chmod(0o777)
    yield path
    shutil.rmtree(path)


@pytest.fixture
def secret(tmp_path) -> Path:
    """A file only its owner may read, the one a link is planted to."""
    path = tmp_path / "secret"
    path.write_bytes(b"ROOT-ONLY-SECRET precious bytes\n")
    path.chmod(0o600)
    return path


def metrics_threads() -> list[int]:
    return [t.ident for t in threading.enumerate() if t.name == "zodb-s3blobs-metrics"]


# -- 1. and 2. the metrics writer -------------------------------------------


def test_a_link_planted_at_the_temporary_name_is_not_followed(
    shared_dir, tmp_path, secret
):
    """Finding 1. Failed before the fix: prometheus_client's write_to_textfile
    wrote each time through ``<file>.<pid>.<thread ident>`` with
    ``open(path, "wb")``, so a link planted at that name made the storage
    overwrite the file it points to (the site's Data.fs) with its figures."""
    template = str(shared_dir / "zodb-{pid}.prom")
    db = open_with_metrics(tmp_path, template)
    path = process_path(template, os.getpid())
    idents = [*metrics_threads(), threading.get_ident()]  # the last write's
    links = [f"{path}.{os.getpid()}.{ident}" for ident in idents]
    as_another_user(lambda: [os.symlink(secret, link) for link in links])
    inode = wait_for_write(path)
    wait_for_write(path, inode)
    db.close()
    assert secret.read_bytes() == b"ROOT-ONLY-SECRET precious bytes\n"
    assert all(os.path.islink(link) for link in links), "the links are left alone"
    assert not os.path.islink(path)
    with open(path) as file:
        names = {f.name for f in text_string_to_metric_families(file.read())}
    assert "zodb_s3blobs_cache_hits" in names


def test_a_fifo_at_the_temporary_name_does_not_hang_close(shared_dir, tmp_path):
    """Finding 2. Failed before the fix (the bounded wait below ran out): the
    writer opened a FIFO planted at its temporary name and blocked, in the
    metrics thread (which close() joined without a timeout) or in close()'s
    last write."""
    template = str(shared_dir / "zodb-{pid}.prom")
    db = open_with_metrics(tmp_path, template)
    path = process_path(template, os.getpid())
    go = threading.Event()
    closer = threading.Thread(target=lambda: (go.wait(), db.close()))
    closer.start()
    fifos = [f"{path}.{os.getpid()}.{i}" for i in [*metrics_threads(), closer.ident]]
    as_another_user(lambda: [os.mkfifo(fifo, 0o666) for fifo in fifos])
    go.set()
    closer.join(60)
    hung = closer.is_alive()
    with contextlib.ExitStack() as readers:  # let a blocked writer go on
        for fifo in fifos if hung else ():
            fd = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
            readers.callback(os.close, fd)
        closer.join(60)
    assert not hung, "close() hung on a FIFO"
    assert not metrics_threads()
    assert all(Path(fifo).is_fifo() for fifo in fifos), "left alone"


def test_close_waits_for_a_stuck_write_only_so_long(tmp_path, monkeypatch, caplog):
    """close() gives up on a write that does not end (a file system that
    hangs, say) and says so, rather than hang the storage's close. Failed
    before the fix: close() joined the thread without a timeout. STOP_TIMEOUT
    is shortened only so that the test does not wait 10 seconds."""
    monkeypatch.setattr(exposition, "STOP_TIMEOUT", 0.2)
    stuck, entered, release = threading.Event(), threading.Event(), threading.Event()

    def figures() -> dict:
        if stuck.is_set() and threading.current_thread().name == "zodb-s3blobs-metrics":
            entered.set()
            release.wait()
        return {}

    monkeypatch.setattr(exposition, "families", lambda figures, labels: [])
    metrics = MetricsFile(str(tmp_path / "zodb-{pid}.prom"), 0.01, figures, "m", "/c")
    metrics.start()
    [thread] = [t for t in threading.enumerate() if t.ident in metrics_threads()]
    stuck.set()
    assert entered.wait(60), "the thread wrote again"
    with caplog.at_level(logging.ERROR, "zodb_s3blobs.exposition"):
        metrics.close()
    assert "did not finish writing" in caplog.text
    release.set()
    thread.join(60)
    assert not thread.is_alive()


# -- 3. the sweep survives any file name -------------------------------------


def test_a_file_named_with_a_huge_pid_stops_neither_storage_nor_stats(
    shared_dir, tmp_path
):
    """Finding 3. Failed before the fix: the sweep's ``os.kill(pid, 0)`` for
    the pid in ``zodb-main-HOST-99999999999.prom`` raised OverflowError out of
    S3BlobStorage's constructor (at every restart) and out of cache stats."""
    template = f"{shared_dir}/zodb-main-{{host}}-{{pid}}.prom"
    config = clitools.write_config(
        tmp_path,
        clitools.filestorage(tmp_path / "Data.fs"),
        extra=f"metrics-file {template}",
    )
    names = [f"zodb-main-{HOST}-{pid}.prom" for pid in ("99999999999", "0")]
    as_another_user(lambda: [(shared_dir / name).touch() for name in names])
    clitools.open_storage(config).close()
    result = run("cache", "stats", config)
    assert result.returncode == 0, result.stderr
    assert "processes" in result.stdout


# -- 4. cache stats reads only what it may trust ------------------------------


def stats_config(tmp_path, shared_dir) -> Path:
    """CONFIG whose metrics files are in *shared_dir*; its cache-dir exists."""
    (tmp_path / "cache").mkdir(mode=0o700)
    return clitools.write_config(
        tmp_path,
        clitools.filestorage(tmp_path / "Data.fs"),
        extra=f"metrics-file {shared_dir}/zodb-{{pid}}.prom",
    )


def forged(pid: int, cache_dir: Path, hits: int) -> str:
    """A metrics file as process *pid* using *cache_dir* would write it."""
    labels = f'database="main",host="{HOST}",pid="{pid}"'
    return (
        "# TYPE zodb_s3blobs_info gauge\n"
        f'zodb_s3blobs_info{{{labels},cache_dir="{cache_dir}",version="2"}} 1.0\n'
        "# TYPE zodb_s3blobs_cache_hits_total counter\n"
        f"zodb_s3blobs_cache_hits_total{{{labels}}} {hits}\n"
    )


@contextlib.contextmanager
def running_processes(count: int):
    """The pids of *count* processes that run until the block ends."""
    children = [
        subprocess.Popen([sys.executable, "-c", "input()"], stdin=subprocess.PIPE)
        for _ in range(count)
    ]
    try:
        yield [child.pid for child in children]
    finally:
        for child in children:
            child.communicate(b"\n", timeout=60)


def test_cache_stats_opens_no_link_fifo_or_file_others_may_write(
    shared_dir, tmp_path, secret
):
    """Finding 4. Failed before the fix: cache stats opened every file of the
    template's names with open(): a link to a root-only file printed a line of
    it (in the parser's error) on stderr and in --json, and a FIFO made it
    block for ever (here: until the run's 60 second bound). A file group or
    others may write, or larger than any metrics file, is not read either."""
    config = stats_config(tmp_path, shared_dir)
    with running_processes(4) as (link, fifo, writable, big):
        paths = {pid: shared_dir / f"zodb-{pid}.prom" for pid in (link, fifo)}

        def plant() -> None:
            os.symlink(secret, paths[link])
            os.mkfifo(paths[fifo], 0o666)

        as_another_user(plant)
        shared = shared_dir / f"zodb-{writable}.prom"
        shared.write_text(forged(writable, tmp_path / "cache", 1000))
        shared.chmod(0o666)
        with open(shared_dir / f"zodb-{big}.prom", "w") as file:
            file.write(forged(big, tmp_path / "cache", 1000))
            file.truncate(2 << 20)
        result = run("cache", "stats", config, "--json", timeout=60)
    assert result.returncode == 0, result.stderr
    stats = json.loads(result.stdout)
    assert (stats["hits"], stats["processes"]) == (0, [])
    assert sorted(stats["skipped_files"]) == sorted(
        [
            f"{paths[link]} is a symbolic link",
            f"{paths[fifo]} is not a regular file",
            f"{shared} has mode 0o666: group or others may write it",
            f"{shared_dir}/zodb-{big}.prom holds more than 1048576 bytes",
        ]
    )
    assert "SECRET" not in result.stdout + result.stderr
    assert result.stderr.count("metrics file skipped:") == 4


@needs_root
def test_cache_stats_counts_no_file_of_another_user(shared_dir, tmp_path):
    """Finding 4. Failed before the fix: a file another user wrote with the
    name and the labels of a running process using the cache was summed in,
    its forged counts with the rest."""
    config = stats_config(tmp_path, shared_dir)
    with running_processes(1) as [pid]:
        path = shared_dir / f"zodb-{pid}.prom"
        text = forged(pid, tmp_path / "cache", 1000)
        as_another_user(lambda: path.write_text(text))
        code, stats = run_json("cache", "stats", config)
    assert code == 0
    assert (stats["hits"], stats["processes"]) == (0, [])
    assert stats["skipped_files"] == [f"{path} belongs to user {OTHER}, not 0"]


# -- 5. verify --state --------------------------------------------------------

VERIFY = ("verify", "--checksums", "--download")


@pytest.fixture
def damaged(tmp_path):
    """CONFIG of a bucket with one object damaged in S3 (found by --download),
    the damaged key, and the first line a state file of this bucket starts
    with."""
    config = clitools.write_config(tmp_path, clitools.filestorage(tmp_path / "Data.fs"))
    revisions = clitools.commit_blobs(clitools.open_storage(config), [10, 2000])
    mine = tmp_path / "mine.state"
    assert run("verify", config, *VERIFY[1:], "--state", mine).returncode == 0
    header = mine.read_text().splitlines()[0]
    (oid, tid), data = max(revisions.items())
    key = clitools.layout(config).key(oid, tid)
    clitools.s3_rewrite(key, b"damaged" + data, clitools.crc32(data))
    return config, key, header


@needs_root
def test_a_state_file_another_user_planted_is_refused(shared_dir, damaged):
    """Finding 5. Failed before the fix: another user's state file, saying
    the damaged object had matched, made the run skip it as verified by an
    earlier run and exit 0 with ``ok: true``."""
    config, key, header = damaged
    state = shared_dir / "verify.state"
    lie = json.dumps({"key": key, "outcome": "match"})
    as_another_user(lambda: state.write_text(f"{header}\n{lie}\n"))
    code, report = run_json(*VERIFY, config, "--state", state)
    assert code == 2, report
    assert report["error"].startswith(
        f"--state {state} belongs to user {OTHER}, not 0: give a file of your own"
    )
    assert run_json(*VERIFY, config)[0] == 1, "the damage it would have hidden"


def test_a_link_planted_at_the_state_file_is_not_followed(shared_dir, damaged, secret):
    """Finding 5. Failed before the fix: ``open(path, "a")`` followed a link
    planted at the state file's name and appended to the file it points to."""
    config, _key, _header = damaged
    state = shared_dir / "verify.state"
    as_another_user(lambda: os.symlink(secret, state))
    code, report = run_json(*VERIFY, config, "--state", state)
    assert code == 2
    assert report["error"].startswith(f"--state {state} is a symbolic link")
    assert secret.read_bytes() == b"ROOT-ONLY-SECRET precious bytes\n"


def test_a_state_file_is_private_and_refused_once_others_may_write_it(
    tmp_path, damaged
):
    """Finding 5. Failed before the fix: the state file (keys, CRC32s, the
    bucket) was created with the umask's mode, world-readable, and read back
    whatever its mode."""
    config, _key, _header = damaged
    state = tmp_path / "verify.state"
    assert run_json(*VERIFY, config, "--state", state)[0] == 1
    assert state.stat().st_mode & 0o777 == 0o600
    state.chmod(0o622)
    code, report = run_json(*VERIFY, config, "--state", state)
    assert code == 2
    assert report["error"].startswith(
        f"--state {state} has mode 0o622: group or others may write it"
    )


def test_a_file_that_is_no_state_file_gets_nothing_appended(tmp_path, damaged):
    """Failed before the fix: an existing file whose first line is not a
    state file's header (a mistyped ``--state /etc/zope.conf``) counted as
    one without entries, and the header and every check were appended to it."""
    config, _key, _header = damaged
    zope_conf = tmp_path / "zope.conf"
    zope_conf.write_text("%import zodb_s3blobs\n<zodb_db main>\n</zodb_db>\n")
    before = zope_conf.read_bytes()
    code, report = run_json(*VERIFY, config, "--state", zope_conf)
    assert code == 2, report
    assert report["error"] == (
        f"--state {zope_conf}: not a state file of verify --checksums (its first "
        "line is not the header this command writes): give a new file, or an "
        "empty one"
    )
    assert zope_conf.read_bytes() == before


def test_a_state_file_with_another_name_is_refused(tmp_path, damaged):
    """Failed before the fix: a state file with a second hard link (another
    user's, where the kernel allows links to files of others: it may point
    to any file of root's) was appended to."""
    config, _key, header = damaged
    state = tmp_path / "verify.state"
    state.write_text(f"{header}\n")
    os.link(state, tmp_path / "elsewhere")
    code, report = run_json(*VERIFY, config, "--state", state)
    assert code == 2, report
    assert report["error"].startswith(
        f"--state {state} has 2 hard links: it may be another file"
    )
    assert state.read_text() == f"{header}\n"


# -- 6. presigned URLs and the fallback's temporary files ---------------------


def test_the_content_disposition_keeps_its_quoting_whatever_the_name():
    """Finding 6. Failed before the fix: CR, LF and backslashes were left in
    the quoted file name (a trailing backslash escaped its closing quote)."""
    header = content_disposition('a"b\\\r\nX-Evil: 1\\')
    assert header == (
        'attachment; filename="a_b___X-Evil: 1_"; '
        "filename*=UTF-8''a%22b%5C__X-Evil%3A%201%5C"
    )
    assert content_disposition("résumé.pdf") == (
        "attachment; filename=\"r_sum_.pdf\"; filename*=UTF-8''r%C3%A9sum%C3%A9.pdf"
    )


@pytest.mark.parametrize("expires", [MAX_PRESIGNED_EXPIRY + 1, 0, -60, 1.5, True])
def test_a_presigned_url_lives_at_most_seven_days(make_storage, expires):
    """Finding 6. Failed before the fix: any *expires* was signed, though
    SigV4 honours at most 7 days, and 0 or less made a dead URL."""
    storage = make_storage()
    db = ZODB.DB(storage)
    oid, tid = commit_blobs(db, {"b": b"data"})["b"]
    with pytest.raises(ValueError) as info:
        storage.presigned_url(oid, tid, expires=expires)
    assert str(info.value).startswith(
        f"presigned_url: expires is {expires!r}: it must be a whole number of "
        "seconds from 1 to 604800"
    )
    assert storage.presigned_url(oid, tid, expires=MAX_PRESIGNED_EXPIRY)
    db.close()


def test_html_without_a_file_name_is_an_attachment(make_storage):
    """Finding 6. Failed before the fix: ``content_type="text/html"`` with no
    file name served the blob as a page from the bucket's origin."""
    storage = make_storage()
    db = ZODB.DB(storage)
    oid, tid = commit_blobs(db, {"b": b"<script>alert(1)</script>"})["b"]
    for content_type in ("text/html", "image/svg+xml", "Text/HTML; charset=utf-8"):
        for filename in (None, ""):
            url = storage.presigned_url(
                oid, tid, expires=60, filename=filename, content_type=content_type
            )
            with urllib.request.urlopen(str(url), timeout=30) as response:
                assert response.headers["Content-Disposition"] == "attachment"
    url = storage.presigned_url(oid, tid, expires=60, content_type="image/png")
    with urllib.request.urlopen(str(url), timeout=30) as response:
        assert response.headers["Content-Disposition"] is None, "inline"
    db.close()


def test_fallback_files_a_crash_left_are_removed_like_downloads(tmp_path):
    """Finding 6. Failed before the fix: the temporary file of a
    fallback-blob-chunk read (``fallback-<pid>-<oid>-<tid>`` in tmp/) stayed
    for ever when the process was killed mid-read."""
    cache = BlobCache(str(tmp_path / "cache"), 1 << 20)
    cache.close()
    left = tmp_path / "cache" / "tmp" / f"fallback-{os.getpid()}-2a-3e8"
    recent = left.with_name(f"fallback-{os.getpid()}-2b-3e8")
    for path in (left, recent):
        path.write_bytes(b"half a blob")
    day_ago = time.time() - ABANDONED_AFTER - 60
    os.utime(left, (day_ago, day_ago))
    BlobCache(str(tmp_path / "cache"), 1 << 20).close()
    assert not left.exists()
    assert recent.exists(), "perhaps a read going on"
