"""The metrics file (``metrics-file``): written by each process for
node_exporter's textfile collector, parsed here with prometheus_client's own
parser, replaced atomically, written a last time at close."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time

import pytest
import ZODB
import ZODB.config
from prometheus_client.parser import text_string_to_metric_families

import s3env
from test_storage import commit_blobs
from zodb_s3blobs import S3BlobStorage, S3BlobStorageError
from zodb_s3blobs.exposition import process_path, read_cache_figures
from zodb_s3blobs.metrics import COUNTERS, GAUGES, LABELLED

#: A short interval keeps the tests fast. With the default, 15 seconds, a
#: storage still writes its figures at close, which does not wait for it.
INTERVAL = 0.05
LAST = "zodb_s3blobs_s3_request_duration_seconds_sum{"
HOST = socket.gethostname()


def families(path) -> dict:
    """name -> family of the metrics file at *path*."""
    with open(path) as f:
        return {
            family.name: family for family in text_string_to_metric_families(f.read())
        }


def open_with_metrics(tmp_path, template: str, name: str = "main"):
    """A database whose storage, ``<s3blobstorage NAME>``, writes *template*
    every INTERVAL seconds."""
    text = s3env.zconfig(
        "<mappingstorage>\n</mappingstorage>",
        cache_dir=str(tmp_path / "cache"),
        extra=f"metrics-file {template}\n  metrics-interval {INTERVAL}",
    ).replace("<s3blobstorage>", f"<s3blobstorage {name}>")
    return ZODB.DB(ZODB.config.storageFromString(text))


def wait_for_write(path, previous: int | None = None, timeout: float = 10) -> int:
    """Wait until *path* exists with another inode than *previous*."""
    event = threading.Event()
    for _ in range(int(timeout / INTERVAL)):
        try:
            inode = os.stat(path).st_ino
        except FileNotFoundError:
            inode = None
        if inode is not None and inode != previous:
            return inode
        event.wait(INTERVAL)
    raise AssertionError(f"{path} was not written")


def test_the_file_parses_with_every_metric_and_the_process_labels(tmp_path):
    template = str(tmp_path / "zodb-{pid}.prom")
    db = open_with_metrics(tmp_path, template)
    commit_blobs(db, {"a": b"abc"})
    db.storage.collect_orphans(dry_run=True)  # the orphans_pending gauges
    path = process_path(template, os.getpid())
    wait_for_write(path, wait_for_write(path))  # a write after the collection
    found = families(path)
    labels = {"database": "main", "host": HOST, "pid": str(os.getpid())}
    for name in COUNTERS:
        family = found[f"zodb_s3blobs_{name}"]
        assert family.type == "counter"
        [sample] = family.samples
        assert sample.labels == labels
    for name in GAUGES:
        assert found[f"zodb_s3blobs_{name}"].type == "gauge"
    requests = found["zodb_s3blobs_s3_requests"]
    assert {s.labels["operation"] for s in requests.samples} >= {"put", "head"}
    histogram = found["zodb_s3blobs_s3_request_duration_seconds"]
    assert histogram.type == "histogram"
    assert any(
        s.name.endswith("_count") and s.labels["operation"] == "head" and s.value >= 1
        for s in histogram.samples
    )
    [info] = found["zodb_s3blobs_info"].samples
    assert info.labels["cache_dir"] == str(tmp_path / "cache")
    assert set(LABELLED) <= {name.removeprefix("zodb_s3blobs_") for name in found}
    db.close()


def test_the_file_is_replaced_atomically_and_written_at_close(tmp_path):
    """Every read of the file while it is rewritten finds a complete file;
    each write is a new file renamed over the old one; close writes the last
    figures and stops the thread."""
    template = str(tmp_path / "zodb-{pid}.prom")
    db = open_with_metrics(tmp_path, template)
    path = process_path(template, os.getpid())
    inode = wait_for_write(path)
    complete = []
    for _ in range(3):  # each write is a new file (its inode) renamed over
        previous, inode = inode, wait_for_write(path, inode)
        assert inode != previous
    for _ in range(500):  # reads while writes go on: always a whole file
        with open(path) as f:
            text = f.read()
        last = text.splitlines()[-1]  # the last family's last sample
        complete.append(last.startswith(LAST) and 'operation="other"' in last)
    assert all(complete)
    storage = db.storage
    commit_blobs(db, {"a": b"last"})
    puts = storage.stats()["s3_requests"]["put"]
    db.close()
    assert not any(t.name == "zodb-s3blobs-metrics" for t in threading.enumerate())
    [sample] = [
        s
        for s in families(path)["zodb_s3blobs_s3_requests"].samples
        if s.labels["operation"] == "put"
    ]
    assert sample.value == puts >= 1
    assert [name for name in os.listdir(tmp_path) if name.endswith(".prom")] == [
        os.path.basename(path)
    ]
    assert not [n for n in os.listdir(tmp_path) if ".prom." in n], "no temp file"


def gone_pid() -> int:
    """The pid of a process that has ended."""
    gone = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    )
    return int(gone.stdout)


def forge(path, pid: int, host: str = HOST, cache_dir: str = "/c", hits="3") -> str:
    """A metrics file as process *pid* on *host* writes it (only the info
    and cache_hits samples: enough for the readers)."""
    labels = f'database="main",host="{host}",pid="{pid}"'
    with open(path, "w") as f:
        f.write(
            "# TYPE zodb_s3blobs_info gauge\n"
            f'zodb_s3blobs_info{{{labels},cache_dir="{cache_dir}",version="1"}} 1.0\n'
            "# TYPE zodb_s3blobs_cache_hits_total counter\n"
            f"zodb_s3blobs_cache_hits_total{{{labels}}} {hits}\n"
        )
    return str(path)


def test_files_of_processes_gone_are_removed_at_open(tmp_path):
    """Only this host's files (by their host label) of this user's processes
    no longer running, and the temp files such a process left mid-write: a
    directory node_exporter reads may be shared by several hosts."""
    template = str(tmp_path / "zodb-{pid}.prom")
    dead, other_dead = gone_pid(), gone_pid()
    stale = forge(process_path(template, dead), dead)
    left_mid_write = forge(f"{process_path(template, dead)}.{dead}.140234", dead)
    alive = forge(process_path(template, os.getppid()), os.getppid())
    writing = forge(f"{alive}.{os.getppid()}.140234", os.getppid())
    elsewhere = forge(process_path(template, other_dead), other_dead, "elsewhere")
    elsewhere_temp = f"{elsewhere}.{other_dead}.140234"
    forge(elsewhere_temp, other_dead, "elsewhere")
    other = forge(tmp_path / "unrelated.prom", dead)
    db = open_with_metrics(tmp_path, template)
    assert not os.path.exists(stale)
    assert not os.path.exists(left_mid_write)
    for kept in (alive, writing, elsewhere, elsewhere_temp, other):
        assert os.path.exists(kept), kept
    db.close()


def test_a_host_placeholder_keeps_the_hosts_of_one_directory_apart(tmp_path):
    """Containers in their own pid namespaces share pids: with {host} in the
    name, each writes and sweeps only its own host's files."""
    template = str(tmp_path / "zodb-{host}-{pid}.prom")
    dead = gone_pid()
    mine = process_path(template, dead)
    assert os.path.basename(mine) == f"zodb-{HOST}-{dead}.prom"
    forge(mine, dead)
    theirs = forge(tmp_path / f"zodb-elsewhere-{dead}.prom", dead, "elsewhere")
    db = open_with_metrics(tmp_path, template)
    path = process_path(template, os.getpid())
    wait_for_write(path)
    assert not os.path.exists(mine)
    assert os.path.exists(theirs)
    [info] = families(path)["zodb_s3blobs_info"].samples
    assert info.labels["host"] == HOST
    db.close()


def test_cache_figures_count_only_this_hosts_files(tmp_path):
    """A cache-dir is local to its host: another host's file naming the same
    path is another cache. This host's files of processes gone are stopped;
    a file whose figures are not numbers is skipped with a note."""
    template = str(tmp_path / "zodb-{pid}.prom")
    dead = gone_pid()
    forge(process_path(template, os.getpid()), os.getpid(), hits="3")
    forge(process_path(template, 1), 1, host="elsewhere", hits="5")
    forge(process_path(template, dead), dead, hits="7")
    forged = forge(process_path(template, os.getppid()), os.getppid(), hits="NaN")
    summed = read_cache_figures(template, "/c")
    assert summed["cache_hits"] == 3
    assert [p["pid"] for p in summed["processes"]] == [os.getpid()]
    assert summed["stopped"] == 1
    assert summed["skipped"] == [f"{forged}: cache_hits is nan, not a count"]


def test_the_python_api_checks_metrics_file_as_the_config_does(make_storage, tmp_path):
    with pytest.raises(S3BlobStorageError, match=r"metrics-file: .*must hold \{pid\}"):
        make_storage(metrics_file=str(tmp_path / "zodb.prom"))
    assert not (tmp_path / "cache").exists()


def test_a_storage_that_fails_to_open_leaves_its_file_free(
    make_storage, tmp_path, monkeypatch
):
    template = str(tmp_path / "zodb-{pid}.prom")

    def refuse(*args):
        raise RuntimeError("refused")

    with monkeypatch.context() as patched:
        patched.setattr(S3BlobStorage, "_setup", refuse)
        with pytest.raises(RuntimeError, match="refused"):
            make_storage(metrics_file=template)
    make_storage(metrics_file=template).close()


def test_two_storages_of_one_process_may_not_share_a_file(tmp_path):
    template = str(tmp_path / "zodb-{pid}.prom")
    db = open_with_metrics(tmp_path, template)
    with pytest.raises(S3BlobStorageError, match="metrics-file: .* another storage"):
        open_with_metrics(tmp_path / "other", template)
    db.close()
    open_with_metrics(tmp_path / "other", template).close()  # free again


def test_without_prometheus_client_startup_fails_naming_key_and_extra(
    tmp_path, monkeypatch
):
    monkeypatch.setitem(sys.modules, "prometheus_client", None)  # not importable
    with pytest.raises(S3BlobStorageError) as info:
        open_with_metrics(tmp_path, str(tmp_path / "zodb-{pid}.prom"))
    assert "metrics-file" in str(info.value)
    assert "zodb-s3blobs[metrics]" in str(info.value)
    assert not (tmp_path / "cache").exists(), "refused before the cache"


def test_a_missing_directory_fails_at_startup_naming_the_key(tmp_path):
    with pytest.raises(S3BlobStorageError, match="metrics-file: .*missing"):
        open_with_metrics(tmp_path, str(tmp_path / "missing" / "zodb-{pid}.prom"))


def test_with_the_default_interval_close_writes_the_figures_at_once(
    make_storage, tmp_path
):
    template = str(tmp_path / "zodb-{pid}.prom")
    storage = make_storage(metrics_file=template)
    started = time.monotonic()
    storage.close()
    assert time.monotonic() - started < 5, "close did not wait out 15 seconds"
    assert "zodb_s3blobs_cache_hits" in families(process_path(template, os.getpid()))
