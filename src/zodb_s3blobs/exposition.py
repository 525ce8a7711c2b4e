"""Prometheus exposition of a storage's figures, with prometheus_client (the
``metrics`` extra; the storage's counters do not need it).

Each process writes its own file, for node_exporter's textfile collector:
``metrics-file`` is a path whose file name holds ``{pid}``, replaced by the
process id, so one configuration serves every process of a site (and
perhaps ``{host}``, the host name, for a directory that hosts or containers
with pid namespaces of their own share). The file is written when the
storage opens, then every ``metrics-interval`` seconds by a daemon thread,
and a last time when the storage closes; each write replaces it atomically.
The directory is shared with node_exporter, often with other users too, so
each write goes to a new file under an unpredictable name beside it, renamed
over it (:mod:`zodb_s3blobs.safefiles`), and what is read there is read only
from regular files of the expected user. Files (and temporary files) that
processes no longer running on this host left are removed when a storage
with the same ``metrics-file`` opens; other hosts' files are left alone.

Every sample is labelled with the database (the name of the
``<s3blobstorage NAME>`` section, else where its blobs are:
``s3://bucket/prefix/blobs/``), the host and the process id, and
``zodb_s3blobs_info`` (value 1) carries the cache directory and the version,
by which ``zodb-s3blobs cache stats`` sums the processes sharing a cache.
"""

from __future__ import annotations

import contextlib
import glob
import logging
import math
import os
import re
import socket
import threading
from collections.abc import Callable, Iterator
from importlib.metadata import PackageNotFoundError, version

from .errors import S3BlobStorageError
from .metrics import COUNTERS, GAUGES, HISTOGRAM, HISTOGRAM_HELP, LABELLED
from .safefiles import UnsafeFileError, read_checked, replace_atomically

log = logging.getLogger(__name__)

_HOST_LABEL = re.compile(r'[{,]host="([^"\\]*)"')

PREFIX = "zodb_s3blobs_"
#: The info metric (InfoMetricFamily adds ``_info`` to the name).
INFO = "zodb_s3blobs"
#: The labels of every sample: which database, on which host, in which process.
PROCESS_LABELS = ("database", "host", "pid")
PLACEHOLDER = "{pid}"
#: Optional: the host name, for a directory shared by hosts whose processes
#: may have the same pids (containers in pid namespaces of their own).
HOST_PLACEHOLDER = "{host}"
INSTALL_HINT = "pip install 'zodb-s3blobs[metrics]'"
#: The mode of the metrics files: node_exporter, another user, reads them.
FILE_MODE = 0o644
#: The most bytes read from a metrics file: this package writes a few
#: kilobytes; anything bigger is not one of its files.
MAX_FILE_SIZE = 1 << 20
#: Seconds close() waits for a write in progress before giving up on it.
STOP_TIMEOUT = 10.0
#: The files written by this process's open storages: two would overwrite
#: each other's.
_in_use: set[str] = set()
_in_use_lock = threading.Lock()


def require_prometheus_client(key: str = "metrics-file") -> None:
    """Raise naming *key* and the extra to install unless prometheus_client
    can be imported."""
    try:
        import prometheus_client  # noqa: F401
    except ImportError:
        raise S3BlobStorageError(
            f"{key} is set, but prometheus_client is not installed: install "
            f"the metrics extra ({INSTALL_HINT})"
        ) from None


def check_template(value: str) -> str:
    """A ``metrics-file`` value, stripped, or ValueError saying what is
    wrong: an absolute path whose file name holds ``{pid}`` (each process
    writes its own file), perhaps ``{host}``, and ends in .prom (the only
    files node_exporter's textfile collector reads)."""
    value = value.strip()
    directory, name = os.path.split(value)
    if not os.path.isabs(value):
        raise ValueError(f"must be an absolute path, not {value!r}")
    if PLACEHOLDER not in name or "{" in directory:
        raise ValueError(
            f"the file name must hold {PLACEHOLDER} (each process writes its "
            f"own file), not {value!r}; e.g. /var/lib/node_exporter/"
            "zodb-{host}-{pid}.prom"
        )
    rest = name.replace(PLACEHOLDER, "", 1).replace(HOST_PLACEHOLDER, "", 1)
    if "{" in rest or "}" in rest:
        raise ValueError(
            f"{PLACEHOLDER} and {HOST_PLACEHOLDER}, once each, are the only "
            f"placeholders, not in {value!r}"
        )
    if not name.endswith(".prom"):
        raise ValueError(
            f"must end in .prom (the only files node_exporter reads), not {value!r}"
        )
    return value


def process_path(template: str, pid: int) -> str:
    """The metrics file of process *pid* of this host for a ``metrics-file``
    *template*."""
    return _this_host(template).replace(PLACEHOLDER, str(pid))


def _this_host(template: str) -> str:
    return template.replace(HOST_PLACEHOLDER, socket.gethostname())


def process_files(template: str, temporary: bool = False) -> Iterator[tuple[int, str]]:
    """``(pid, path)`` of every existing file of *template*'s processes (of
    this host, if the template names it); with *temporary*, of the temporary
    files they are written through (``<file>.<pid>.<random hex digits>``)
    instead."""
    directory, name = os.path.split(_this_host(template))
    before, _placeholder, after = name.partition(PLACEHOLDER)
    pattern = re.compile(
        re.escape(before)
        + r"([0-9]+)"
        + re.escape(after)
        + (r"\.([0-9]+)\.[0-9a-f]+" if temporary else "")
    )
    found = glob.glob(os.path.join(glob.escape(directory), glob.escape(before) + "*"))
    for path in sorted(found):
        match = pattern.fullmatch(os.path.basename(path))
        if match and (not temporary or match.group(1) == match.group(2)):
            yield int(match.group(1)), path


def _host_label(path: str) -> str | None:
    """The host label of a metrics file of this user, which may be a
    temporary file cut off mid-write (its first samples carry it); None for
    anything else."""
    try:
        data = read_checked(path, os.geteuid(), MAX_FILE_SIZE)
    except (OSError, UnsafeFileError):
        return None
    found = _HOST_LABEL.search(data.decode("utf-8", "replace"))
    return found.group(1) if found else None


def running(pid: int) -> bool:
    """Whether process *pid* runs on this host (a number read from a file
    name: 0, or one too big to be a pid, is no process)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):
        return False
    except PermissionError:  # another user's: it runs
        return True
    return True


def families(figures: dict, labels: dict[str, str]) -> list:
    """prometheus_client metric families of *figures* (a storage's
    ``stats()``), every sample labelled with *labels*."""
    from prometheus_client.core import (
        CounterMetricFamily,
        GaugeMetricFamily,
        HistogramMetricFamily,
    )

    names, values = list(labels), list(labels.values())
    result = []
    for name, help_text in COUNTERS.items():
        family = CounterMetricFamily(PREFIX + name, help_text, labels=names)
        family.add_metric(values, figures[name])
        result.append(family)
    for name, help_text in GAUGES.items():
        if figures.get(name) is not None:
            family = GaugeMetricFamily(PREFIX + name, help_text, labels=names)
            family.add_metric(values, figures[name])
            result.append(family)
    for name, (label, _values, help_text) in LABELLED.items():
        family = CounterMetricFamily(PREFIX + name, help_text, labels=[*names, label])
        for value, count in figures[name].items():
            family.add_metric([*values, value], count)
        result.append(family)
    histogram = HistogramMetricFamily(
        PREFIX + HISTOGRAM, HISTOGRAM_HELP, labels=[*names, "operation"]
    )
    for operation, observed in figures[HISTOGRAM].items():
        histogram.add_metric(
            [*values, operation], list(observed["buckets"].items()), observed["sum"]
        )
    result.append(histogram)
    return result


def _version() -> str:
    try:
        return version("zodb-s3blobs")
    except PackageNotFoundError:
        return "unknown"


class MetricsFile:
    """Writes one storage's figures to this process's metrics file, every
    *interval* seconds in a daemon thread from :meth:`start` to :meth:`close`.

    *figures* returns the storage's ``stats()``; *database* is the value of
    the ``database`` label.
    """

    def __init__(
        self,
        template: str,
        interval: float,
        figures: Callable[[], dict],
        database: str,
        cache_dir: str,
    ) -> None:
        try:
            template = check_template(template)
        except ValueError as exc:
            raise S3BlobStorageError(f"metrics-file: {exc}") from None
        require_prometheus_client()
        from prometheus_client import CollectorRegistry

        directory = os.path.dirname(template)
        if not os.path.isdir(directory) or not os.access(directory, os.W_OK):
            raise S3BlobStorageError(
                f"metrics-file: {directory} is not a directory this user can "
                "write: the metrics files are written there"
            )
        self.path = process_path(template, os.getpid())
        with _in_use_lock:
            self._check_free()
        self._claimed = False
        self.interval = interval
        self._figures = figures
        self._database = database
        self._info = {"cache_dir": cache_dir, "version": _version()}
        self._host = socket.gethostname()
        self._registry = CollectorRegistry(auto_describe=False)
        self._registry.register(self)
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._run, name="zodb-s3blobs-metrics", daemon=True
        )
        self._template = template

    def _check_free(self) -> None:
        """Raise if another storage of this process writes the file; the
        caller holds ``_in_use_lock``."""
        if self.path in _in_use:
            raise S3BlobStorageError(
                f"metrics-file: {self.path} is written by another storage "
                "of this process already: give each database a file name "
                "of its own, e.g. zodb-main-{host}-{pid}.prom and "
                "zodb-catalog-{host}-{pid}.prom"
            )

    def start(self) -> None:
        """Claim the file (checked free at construction, so that a storage
        that fails to open claims nothing), remove the files of processes
        gone, write the figures at once (``cache stats`` sees this process
        from its start), then every interval."""
        with _in_use_lock:
            self._check_free()  # another storage of this process opened since
            _in_use.add(self.path)
            self._claimed = True
        self._remove_stale(self._template)
        self._write_logged()
        self._thread.start()

    def __repr__(self) -> str:
        return f"<MetricsFile {self.path} every {self.interval:g}s>"

    @staticmethod
    def _remove_stale(template: str) -> None:
        """Remove the files, and temporary files, of processes of this user
        no longer running on this host: node_exporter would go on exporting
        their last figures. Files of other hosts (in a shared directory,
        known by their host label) are theirs to remove."""
        host = socket.gethostname()
        for temporary in (False, True):
            for pid, path in process_files(template, temporary):
                if pid == os.getpid() or running(pid):
                    continue
                if _host_label(path) == host:  # a regular file of this user
                    with contextlib.suppress(OSError):
                        os.remove(path)

    def collect(self) -> list:
        """The families written (prometheus_client's Collector protocol)."""
        from prometheus_client.core import InfoMetricFamily

        labels = {
            "database": self._database,
            "host": self._host,
            "pid": str(os.getpid()),
        }
        info = InfoMetricFamily(INFO, "This process's storage.", labels=list(labels))
        info.add_metric(list(labels.values()), self._info)
        return [info, *families(self._figures(), labels)]

    def write(self) -> None:
        """Replace the file with the figures of now, atomically, through a
        new file that nothing planted in the directory can redirect."""
        from prometheus_client import generate_latest

        replace_atomically(self.path, generate_latest(self._registry), FILE_MODE)

    def _write_logged(self) -> None:
        """:meth:`write`, logging a failure: figures are not worth stopping
        the storage for."""
        try:
            self.write()
        except Exception:
            log.exception("Could not write the metrics file %s", self.path)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._write_logged()

    def close(self) -> None:
        """Stop the thread, then write the final figures (if it started).
        Waits at most STOP_TIMEOUT seconds for a write in progress."""
        self._stop.set()
        try:
            if self._thread.is_alive():
                self._thread.join(STOP_TIMEOUT)
                if self._thread.is_alive():
                    log.error(
                        "The metrics thread did not finish writing %s within "
                        "%g seconds: closed without a last write",
                        self.path,
                        STOP_TIMEOUT,
                    )
                else:
                    self._write_logged()
        finally:
            if self._claimed:
                with _in_use_lock:
                    _in_use.discard(self.path)


#: The counters ``zodb-s3blobs cache stats`` sums over the processes.
CACHE_COUNTERS = (
    "cache_hits",
    "cache_misses",
    "cache_hit_bytes",
    "download_bytes",
    "cache_evictions",
    "cache_evicted_bytes",
)


def read_cache_figures(template: str, cache_dir: str) -> dict:
    """The cache counters of the running processes of this host whose metrics
    files (*template*'s) say they use *cache_dir*, summed, parsed with
    prometheus_client's parser: ``{"processes": [{"pid", "host",
    "database", "file"}], "stopped": files of processes gone, "skipped":
    files not counted and why, <counter>: sum}``. Files of other hosts do not
    count: a cache directory is local to its host. Only regular files of
    the cache directory's owner (the processes' user), that no other user
    may write, are read; the notes on the others quote none of their
    content."""
    require_prometheus_client()
    from prometheus_client.parser import text_string_to_metric_families

    summed: dict = {
        "processes": [],
        "stopped": 0,
        "skipped": [],
        **dict.fromkeys(CACHE_COUNTERS, 0),
    }
    host = socket.gethostname()
    owner = _owner(cache_dir)
    for pid, path in process_files(template):
        try:
            text = read_checked(path, owner, MAX_FILE_SIZE).decode("utf-8")
            found = {f.name: f for f in text_string_to_metric_families(text)}
        except FileNotFoundError:  # gone meanwhile
            continue
        except OSError as exc:
            summed["skipped"].append(f"{path}: {exc.strerror}")
            continue
        except UnsafeFileError as exc:
            summed["skipped"].append(str(exc))
            continue
        except ValueError:  # its content may be anyone's secret: not quoted
            summed["skipped"].append(f"{path}: not in Prometheus' text format")
            continue
        info = found.get(INFO + "_info")
        labels = info.samples[0].labels if info and info.samples else {}
        if labels.get("cache_dir") != cache_dir or labels.get("host") != host:
            continue
        if not running(pid):
            summed["stopped"] += 1
            continue
        counts = {}
        for name in CACHE_COUNTERS:
            family = found.get(PREFIX + name)
            samples = family.samples if family else ()
            counts[name] = sum(s.value for s in samples if s.name.endswith("_total"))
        wrong = [name for name, count in counts.items() if not math.isfinite(count)]
        if wrong:
            summed["skipped"].append(
                f"{path}: {wrong[0]} is {counts[wrong[0]]}, not a count"
            )
            continue
        for name, count in counts.items():
            summed[name] += int(count)
        summed["processes"].append(
            {"pid": pid, "host": host, "database": labels.get("database"), "file": path}
        )
    return summed


def _owner(directory: str) -> int:
    """The user whose processes write the metrics files of a cache: the
    owner of the cache *directory*, or this user while there is none."""
    try:
        return os.stat(directory).st_uid
    except OSError:
        return os.geteuid()
