"""``zodb-s3blobs cache stats|prune``: look at and shrink the local blob cache.

Both work on ``cache-dir`` alone (no S3 request, no base storage), and are
safe while Zope processes use the cache: pruning is the cache's own eviction,
which takes the same locks. ``stats`` only reads: it walks the directory
itself (:func:`walk_cache`) instead of opening a BlobCache, which would
remove old temporary files, create ``locks/`` and start an eviction check.
Neither creates a missing cache-dir.
"""

from __future__ import annotations

import argparse
import os
import stat
import sys
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field

from ZConfig.datatypes import stock_datatypes

from ..cache import last_used, walk
from ..errors import S3BlobStorageError
from . import (
    EXIT_FAILED,
    EXIT_OK,
    UsageError,
    add_common_options,
    add_operator_options,
)
from .output import emit, human_size, problem, table, timestamp
from .target import Target, load_target

STATS_DESCRIPTION = """\
Show what the local blob cache of CONFIG's <s3blobstorage> holds: blob files
and their bytes against cache-size, the oldest and newest access, and what
is left in tmp/ (files being written now, or left by processes that
crashed). With metrics-file set, also the hits, misses, hit ratio, bytes
served and downloaded, and evictions, summed over the running processes of
this host that use this cache-dir, read from their metrics files (each counts
since it started); the files of processes that stopped are counted apart.
Only regular files of cache-dir's owner that no other user may write are
read: any other file, or one whose figures are not numbers, is skipped, with
a note on stderr. Without metrics-file the counters are unknown.
"""
PRUNE_DESCRIPTION = """\
Evict least recently used files from the local blob cache of CONFIG's
<s3blobstorage> until it holds at most SIZE bytes. Without --to, do what the
storage's own eviction does: if the cache holds more than cache-size, evict
down to 90% of it. Safe while Zope uses the cache (it takes the cache's
locks, and keeps files used within --min-age seconds); exits 1 if more than
SIZE remains.
"""


def register(
    subparsers: argparse._SubParsersAction[argparse.ArgumentParser],
) -> argparse.ArgumentParser:
    """Add ``cache stats`` and ``cache prune`` to the ``zodb-s3blobs`` parser."""
    parser = subparsers.add_parser(
        "cache",
        help="show or shrink the local blob cache",
        description="Show (stats) or shrink (prune) the local blob cache.",
    )
    actions = parser.add_subparsers(
        title="cache commands", dest="cache_command", metavar="ACTION", required=True
    )
    stats = actions.add_parser(
        "stats",
        help="files, bytes, access times, hits and evictions",
        description=STATS_DESCRIPTION,
    )
    add_operator_options(stats)
    stats.set_defaults(run=run_stats, command="cache stats")
    prune = actions.add_parser(
        "prune", help="evict down to a size", description=PRUNE_DESCRIPTION
    )
    add_operator_options(prune)
    prune.add_argument(
        "--to",
        type=_size,
        metavar="SIZE",
        help="evict until at most SIZE remains, e.g. 500MB or 0 (default: "
        "90%% of cache-size, if it is exceeded)",
    )
    prune.add_argument(
        "--min-age",
        type=_seconds,
        metavar="SECONDS",
        default=None,
        help="keep files used within SECONDS, as the storage's own eviction "
        "does: a running Zope may just have handed out their paths (default: "
        "CONFIG's cache-min-age, 60 unless set; 0 while no process uses the "
        "cache)",
    )
    prune.set_defaults(run=run_prune, command="cache prune")
    for action in (stats, prune):
        add_common_options(action)
    return parser


def _seconds(value: str) -> float:
    """A --min-age value: seconds, 0 or more."""
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if not seconds >= 0:
        raise argparse.ArgumentTypeError(f"{value!r} is not a number of seconds")
    return seconds


def _size(value: str) -> int:
    try:
        return stock_datatypes["byte-size"](value)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{value!r} is not a size such as 0, 4096, 500MB or 10GB"
        ) from None


#: Directories of cache-dir that hold no cached blobs.


def _scan(path: str) -> list[os.DirEntry]:
    """The entries of directory *path*; none if it is gone or not one."""
    try:
        with os.scandir(path) as entries:
            return list(entries)
    except (FileNotFoundError, NotADirectoryError):
        return []


def walk_cache(directory: str) -> Iterator[tuple[str, os.stat_result]]:
    """Every cached blob file of the cache in *directory*, with its ``lstat``,
    reading only (see :func:`zodb_s3blobs.cache.walk`)."""
    for _revision, path, st in walk(directory):
        yield path, st


@dataclass
class CacheStats:
    """What the cache directory holds now."""

    exists: bool
    files: int = 0
    bytes: int = 0
    oldest_access: float | None = None
    newest_access: float | None = None
    tmp_files: int = 0
    tmp_bytes: int = 0
    #: path -> size of each blob file, to tell what a prune removed.
    sizes: dict[str, int] = field(default_factory=dict, repr=False)


def cache_stats(target: Target) -> CacheStats:
    """Walk cache-dir (without creating or changing anything) and sum up its
    blob files and its tmp/ files."""
    if not os.path.isdir(target.cache_dir):
        return CacheStats(exists=False)
    stats = CacheStats(exists=True)
    for path, st in walk_cache(target.cache_dir):
        stats.sizes[path] = st.st_size
        stats.files += 1
        stats.bytes += st.st_size
        # The clock eviction judges by (access or install, whichever later).
        used = last_used(st)
        stats.oldest_access = min(used, stats.oldest_access or used)
        stats.newest_access = max(used, stats.newest_access or used)
    for entry in _scan(os.path.join(target.cache_dir, "tmp")):
        try:
            st = entry.stat(follow_symlinks=False)
        except FileNotFoundError:
            continue
        if stat.S_ISREG(st.st_mode):
            stats.tmp_files += 1
            stats.tmp_bytes += st.st_size
    return stats


#: JSON fields of the processes' counters (exposition.CACHE_COUNTERS).
_COUNTER_FIELDS = {
    "cache_hits": "hits",
    "cache_misses": "misses",
    "cache_hit_bytes": "hit_bytes",
    "download_bytes": "download_bytes",
    "cache_evictions": "evictions",
    "cache_evicted_bytes": "evicted_bytes",
}


def process_figures(target: Target) -> dict:
    """The JSON fields of the counters of the processes using the cache, from
    their metrics files; None for each when metrics-file is not set."""
    template = target.section.config.metrics_file
    if template is None:
        return {
            **dict.fromkeys(_COUNTER_FIELDS.values()),
            "hit_ratio": None,
            "processes": None,
            "stopped_processes": None,
            "skipped_files": None,
        }
    from ..exposition import read_cache_figures

    try:
        summed = read_cache_figures(template, target.cache_dir)
    except S3BlobStorageError as exc:  # prometheus_client is missing
        raise UsageError(str(exc)) from None
    figures = {field: summed[name] for name, field in _COUNTER_FIELDS.items()}
    reads = figures["hits"] + figures["misses"]
    return {
        **figures,
        "hit_ratio": figures["hits"] / reads if reads else None,
        "processes": summed["processes"],
        "stopped_processes": summed["stopped"],
        "skipped_files": summed["skipped"],
    }


def _document(target: Target, stats: CacheStats) -> dict:
    """The JSON fields of *stats*, with times as ISO 8601 strings."""
    document = asdict(stats)
    del document["sizes"]
    document.update(
        cache_dir=target.cache_dir,
        cache_size=target.cache_size,
        oldest_access=timestamp(stats.oldest_access),
        newest_access=timestamp(stats.newest_access),
    )
    return document


def _counter_rows(figures: dict) -> list[list]:
    """The table rows of the processes' counters."""
    if figures["processes"] is None:
        return [["hits / misses", "unknown (set metrics-file to count them)"]]
    ratio = figures["hit_ratio"]
    return [
        ["processes", _processes(figures)],
        [
            "hits / misses",
            f"{figures['hits']} / {figures['misses']}"
            + ("" if ratio is None else f" ({ratio:.1%} hits)"),
        ],
        ["served from cache", human_size(figures["hit_bytes"])],
        ["downloaded", human_size(figures["download_bytes"])],
        [
            "evicted",
            f"{figures['evictions']} files, {human_size(figures['evicted_bytes'])}",
        ],
    ]


def _processes(figures: dict) -> str:
    """How many processes were counted, and how many stopped ones were not."""
    running = len(figures["processes"])
    text = f"{running} running" if running else "none running"
    stopped = figures["stopped_processes"]
    if stopped:
        files = "file" if stopped == 1 else "files"
        text += f" (ignored: {stopped} {files} of processes that stopped)"
    return text


def run_stats(args: argparse.Namespace) -> int:
    """Print what the cache holds, and what its processes counted."""
    target = load_target(args.config, args.db)
    stats = cache_stats(target)
    figures = process_figures(target)
    document = {"ok": True, **_document(target, stats), **figures}
    _warn_owner(target)
    for note in figures["skipped_files"] or ():
        problem(f"metrics file skipped: {note}")
    share = f" ({stats.bytes / target.cache_size:.0%} of cache-size)"
    lines = table(
        ["cache-dir", target.cache_dir + ("" if stats.exists else " (not created)")],
        [
            ["blob files", stats.files],
            ["bytes", f"{human_size(stats.bytes)}{share}"],
            ["cache-size", human_size(target.cache_size)],
            ["oldest access", timestamp(stats.oldest_access) or "-"],
            ["newest access", timestamp(stats.newest_access) or "-"],
            ["tmp/", f"{stats.tmp_files} files, {human_size(stats.tmp_bytes)}"],
            *_counter_rows(figures),
        ],
    )
    emit(args, document, lines)
    return EXIT_OK


def _warn_owner(target: Target) -> None:
    """Warn on stderr when cache-dir is another user's."""
    warning = target.cache_owner_warning()
    if warning:
        problem(warning)


def run_prune(args: argparse.Namespace) -> int:
    """Evict down to --to (or the storage's own target) and report what went:
    the files present before and gone after, and their bytes."""
    target = load_target(args.config, args.db)
    _warn_owner(target)
    min_age = target.section.config.cache_min_age
    if args.min_age is not None:
        min_age = args.min_age
    before = cache_stats(target)
    if before.exists:
        # With --to, evict down to it and no further: the eviction check a
        # cache starts when opened must not go on to 90% of cache-size.
        limit = target.cache_size if args.to is None else sys.maxsize
        cache = target.existing_cache(min_age, size_limit=limit)
        if cache is not None:
            try:
                cache.evict(args.to)
            finally:
                cache.close()
    after = cache_stats(target)
    gone = [path for path in before.sizes if path not in after.sizes]
    removed = {"files": len(gone), "bytes": sum(before.sizes[p] for p in gone)}
    goal = args.to if args.to is not None else target.cache_size
    if after.bytes > goal:
        problem(
            f"cache-dir {target.cache_dir}: {human_size(after.bytes)} remain, "
            f"more than {human_size(goal)}: files used within the last "
            f"{min_age:g} seconds are kept (--min-age), and another process "
            "may be evicting (locks/evict.lock)"
        )
    document = {
        "ok": after.bytes <= goal,
        "cache_dir": target.cache_dir,
        "target": args.to,
        "removed": removed,
        "remaining": {"files": after.files, "bytes": after.bytes},
    }
    lines = [
        f"Pruned {target.cache_dir}: removed {removed['files']} files "
        f"({human_size(removed['bytes'])}); {after.files} files "
        f"({human_size(after.bytes)}) remain"
    ]
    emit(args, document, lines)
    return EXIT_OK if document["ok"] else EXIT_FAILED
