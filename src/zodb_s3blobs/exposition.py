"""Prometheus exposition of a storage's figures, with prometheus_client (the
``metrics`` extra; the storage's counters do not need it).

Each process writes its own file, for node_exporter's textfile collector:
``metrics-file`` is a path whose file name holds ``{pid}``, replaced by the
process id, so one configuration serves every process of a site, and every
``metrics-interval`` seconds a daemon thread replaces the file atomically
(prometheus_client's ``write_to_textfile``: a temporary file in the same
directory, renamed over it). The thread stops when the storage closes, after
a last write. Files that processes no longer running on this host left are
removed when a storage with the same ``metrics-file`` opens.

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
import os
import re
import socket
import threading
from collections.abc import Callable, Iterator
from importlib.metadata import PackageNotFoundError, version

from .errors import S3BlobStorageError
from .metrics import COUNTERS, GAUGES, HISTOGRAM, HISTOGRAM_HELP, LABELLED

log = logging.getLogger(__name__)

PREFIX = "zodb_s3blobs_"
#: The info metric (InfoMetricFamily adds ``_info`` to the name).
INFO = "zodb_s3blobs"
#: The labels of every sample: which database, on which host, in which process.
PROCESS_LABELS = ("database", "host", "pid")
PLACEHOLDER = "{pid}"
INSTALL_HINT = "pip install 'zodb-s3blobs[metrics]'"
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


def process_path(template: str, pid: int) -> str:
    """The metrics file of process *pid* for a ``metrics-file`` *template*."""
    return template.replace(PLACEHOLDER, str(pid))


def process_files(template: str) -> Iterator[tuple[int, str]]:
    """``(pid, path)`` of every existing file of *template*'s processes."""
    directory, name = os.path.split(template)
    before, _placeholder, after = name.partition(PLACEHOLDER)
    pattern = re.compile(re.escape(before) + r"(\d+)" + re.escape(after))
    found = glob.glob(os.path.join(glob.escape(directory), glob.escape(before) + "*"))
    for path in sorted(found):
        match = pattern.fullmatch(os.path.basename(path))
        if match:
            yield int(match.group(1)), path


def running(pid: int) -> bool:
    """Whether process *pid* runs on this host."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
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
            if self.path in _in_use:
                raise S3BlobStorageError(
                    f"metrics-file: {self.path} is written by another storage "
                    "of this process already: give each database a file name "
                    "of its own, e.g. zodb-main-{pid}.prom and "
                    "zodb-catalog-{pid}.prom"
                )
            _in_use.add(self.path)
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

    def start(self) -> None:
        """Remove the files of processes gone, then write every interval."""
        self._remove_stale(self._template)
        self._thread.start()

    def __repr__(self) -> str:
        return f"<MetricsFile {self.path} every {self.interval:g}s>"

    @staticmethod
    def _remove_stale(template: str) -> None:
        """Remove the files of processes of this user no longer running here:
        node_exporter would go on exporting their last figures."""
        for pid, path in process_files(template):
            if pid == os.getpid() or running(pid):
                continue
            with contextlib.suppress(OSError):
                if os.lstat(path).st_uid == os.geteuid():
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
        """Replace the file with the figures of now, atomically."""
        from prometheus_client import write_to_textfile

        write_to_textfile(self.path, self._registry)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.write()
            except Exception:
                log.exception("Could not write the metrics file %s", self.path)

    def close(self) -> None:
        """Stop the thread, then write the final figures (if it started)."""
        self._stop.set()
        try:
            if self._thread.is_alive():
                self._thread.join()
                self.write()
        except Exception:
            log.exception("Could not write the metrics file %s", self.path)
        finally:
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
    """The cache counters of the running processes whose metrics files
    (*template*'s) say they use *cache_dir*, summed, parsed with
    prometheus_client's parser: ``{"processes": [{"pid", "host",
    "database", "file"}], "stopped": files of processes gone, <counter>:
    sum}``. A file of another host counts (its process cannot be asked)."""
    require_prometheus_client()
    from prometheus_client.parser import text_string_to_metric_families

    summed: dict = {"processes": [], "stopped": 0, **dict.fromkeys(CACHE_COUNTERS, 0)}
    host = socket.gethostname()
    for pid, path in process_files(template):
        try:
            with open(path, encoding="utf-8") as file:
                found = {f.name: f for f in text_string_to_metric_families(file.read())}
        except (OSError, ValueError):  # gone meanwhile, or not ours
            continue
        info = found.get(INFO + "_info")
        labels = info.samples[0].labels if info and info.samples else {}
        if labels.get("cache_dir") != cache_dir:
            continue
        if labels.get("host") == host and not running(pid):
            summed["stopped"] += 1
            continue
        for name in CACHE_COUNTERS:
            family = found.get(PREFIX + name)
            samples = family.samples if family else ()
            summed[name] += sum(s.value for s in samples if s.name.endswith("_total"))
        summed["processes"].append(
            {
                "pid": pid,
                "host": labels.get("host"),
                "database": labels.get("database"),
                "file": path,
            }
        )
    for name in CACHE_COUNTERS:
        summed[name] = int(summed[name])
    return summed
