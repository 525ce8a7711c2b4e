"""A randomized, seeded torture test: nothing acknowledged is ever lost or
corrupted, whatever S3, the cache, the clock and killed processes do.

In the spirit of SQLite's fault-injection tests and FoundationDB's simulation:
a seed determines a *plan* (which base storage, how many threads and child
processes, how many rounds, how faulty S3 is) and every thread's and child's
schedule of operations, drawn from ``random.Random`` seeded from it:

- commits of 0..N blobs from 0 bytes to above the 5 MiB part size, written
  with ``open('w')``, ``open('a')`` and ``open('r+')``, read back with
  ``open('r')``, ``open('c')`` and ``committed()``, with savepoints and
  rollbacks, loaded lazily (a Blob activated without being opened), ending in
  a commit, an abort, a vote refused after the storage uploaded (the storage's
  tpc_abort must delete its objects), or a vote failed by S3 (every PUT of one
  object answered 503);
- reads of any acknowledged revision, undo of a recent transaction and undo
  of that undo, pack, orphan collection, forced eviction of a tiny cache,
  restarts of the database on the same cache directory or on an empty one;
- on a RelStorage-on-SQLite base, child processes sharing the base and the
  cache directory, committing and reading each other's blobs, held between
  vote and finish while the parent collects orphans, and SIGKILLed there or
  at random points;
- on a ZEO-client base (seeds 1000-1999, or ``--base zeo``: a ``runzeo``
  server on a loopback port keeping records only, in a FileStorage without
  blob-dir or a MappingStorage, up for the whole run), the parent's actors
  and two child processes wrap ``ClientStorage`` (tests/torturezeo.py). The
  children share a cache directory that is not the parent's, as the Zope
  processes of one host do beside another host's: a killed child's journal
  is adopted there by its restart while the other child keeps its own
  locked, and the parent reads the children's blobs from S3 only. Besides
  the kills above, a child is SIGKILLed after the server committed while S3
  refuses every copy (its commit acknowledged, its blobs only under staging
  keys): the parent reads those revisions at once (a fresh 404 must be
  waited out), and the restarted child adopts the journal and copies them;
- a MappingStorage (or DemoStorage) whose clock is behind its last tid, so
  that a transaction after an abort gets the aborted transaction's tid;
- all the while, S3 (``faultserver.faulty_s3``) answering 503, failing ranged
  GETs, resetting connections, cutting bodies and stalling;
- in some plans (``slow-downloads evictor-process``), blob GETs stalled
  longer than the cache's minimum age while a second OS process
  (tests/tortureevictor.py) evicts the same cache directory in a loop, and
  paths from ``loadBlob`` opened a moment later, as X-Sendfile does: a path
  handed out must outlive a slow download's install;
- in some FileStorage plans (``legacy-fallback``), a database that starts as
  a site with its blobs in a ``blob-dir`` (tests/torturelegacy.py), read
  through ``fallback-blob-dir``: its revisions are read and edited, their
  read-through uploads are held back for a while (a busy queue), the cached
  copies get damaged as a stray writer would, and packs run meanwhile.

A model of what was acknowledged (every committed revision's length and
SHA-256, recorded under the base's commit lock as the commit happens) is
checked during the run and at the end: every revision the base still holds
reads back identical from every process; a read never returns a wrong file
(it may fail with a clear error while faults are on, and with POSKeyError
only for a revision the base no longer holds); no operation is stuck; S3
keeps every object a held revision needs (but a legacy revision, which the
fallback holds); after the faults stop, orphan collection leaves exactly the
objects of held revisions, every object of a legacy revision holds exactly
its acknowledged bytes, and the evicting process is still alive. On the zeo
base, a held revision's object may be missing between rounds only while a
journal on disk owes its copy; at the end, every process is closed and
reopened (completing what is owed) and no journal may be left, and once all
are closed no staging object may stay that no journal owes, but those named
(in a log of its own) by a child killed before its vote.

Threads interleave as the OS schedules them, so a replay repeats the
schedule, not necessarily the interleaving; a failing seed usually fails
again within a few replays.

Run one seed: ``.venv/bin/python tests/torture.py --seed 1234``; a soak:
``.venv/bin/python tests/torture.py --soak 30``. The storage runs with its
default settings except ``cache_size`` (2 MB) and the cache's minimum age
(2 s), so eviction is constant,
``part_size`` (5 MiB, S3's minimum, so parts are cheap) and the ObjectStore's
``fast_stream`` (2**62 bytes/s in most plans, so that every download above
the part size uses parallel ranged GETs, which a loopback server would
otherwise never make). Retries and timeouts are the defaults.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import faulthandler
import itertools
import json
import logging
import os
import queue
import random
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import transaction  # noqa: E402
import ZODB  # noqa: E402
import ZODB.config  # noqa: E402
from persistent.mapping import PersistentMapping  # noqa: E402
from ZODB.blob import Blob  # noqa: E402
from ZODB.DemoStorage import DemoStorage  # noqa: E402
from ZODB.FileStorage import FileStorage  # noqa: E402
from ZODB.POSException import POSError  # noqa: E402
from ZODB.utils import z64  # noqa: E402

import s3env  # noqa: E402
import torturelegacy  # noqa: E402
import torturezeo  # noqa: E402
from faultserver import Faults, faulty_s3  # noqa: E402
from torturechild import (  # noqa: E402
    CACHE_MIN_AGE,
    GONE_ERRORS,
    READ_ERRORS,
    FailAfterVote,
    LaggingMappingStorage,
    VoteRefused,
    blob_bytes,
    check_read,
    close_oracle,
    describe,
    fingerprint,
    held_view,
    on_commit,
    open_oracle,
    open_storage,
    unprintable,
)
from tortureevictor import Evictor  # noqa: E402
from zeoserver import runzeo, zeoclient_section  # noqa: E402
from zodb_s3blobs.errors import S3BlobStorageError  # noqa: E402
from zodb_s3blobs.keys import KeyLayout  # noqa: E402
from zodb_s3blobs.objectstore import FAST_STREAM as DEFAULT_FAST_STREAM  # noqa: E402
from zodb_s3blobs.revisions import revision_exists  # noqa: E402
from zodb_s3blobs.settings import MiB  # noqa: E402

PART_SIZE = 5 * MiB
CACHE_SIZE = 2_000_000
#: The ObjectStore's ``fast_stream`` (bytes a second): a download above the
#: part size whose first part arrives faster than this streams to the end,
#: slower ones fetch the rest in parallel ranged GETs. Over loopback every
#: first part is fast, so with the default the ranged path would never run;
#: no first part arrives at 2**62 bytes a second, so with this every download
#: above the part size takes it (in most plans; the others keep the default).
FAST_STREAM = 1 << 62
#: Seconds any one operation may take before the run counts as stuck: the
#: longest legitimate one is a vote whose PUTs all fail (5 attempts with
#: botocore's backoff, ~15 s at worst) behind a stall, or a commit waiting
#: for RelStorage's commit lock (30 s).
OP_BOUND = 150.0
#: The longer stall (beyond the download read timeout of 10 s) some plans
#: inject into one GET.
LONG_STALL = 11.0
BASES = ("file", "mapping", "demo", "relstorage", "zeo")
#: Seeds in this range run on the ZEO-client base (the others: ``seed % 4``
#: picks among the first four, as before the ZEO base existed, so that every
#: seed replays the plan it always had); ``--base zeo`` runs any seed on it.
ZEO_SEEDS = range(1000, 2000)
#: The storages the ZEO server of a zeo plan may serve (records only).
ZEO_SERVER_STORAGES = ("file", "mapping")
#: Slow downloads: how many blob GETs of a plan with them are stalled, and
#: for how long (seconds, drawn in this range): longer than the cache's
#: minimum age (CACHE_MIN_AGE), shorter than the download read timeout.
SLOW_DOWNLOADS = 8
SLOW_STALL = (2.5, 4.0)


class TortureFailure(AssertionError):
    """An integrity violation (or a stuck operation) found by a seed."""


def default_base(seed: int) -> str:
    """The base a seed runs on unless told otherwise (see :data:`ZEO_SEEDS`)."""
    return "zeo" if seed in ZEO_SEEDS else BASES[seed % 4]


def replay_command(plan: Plan) -> str:
    """The one-line command that replays *plan*."""
    chosen = "" if plan.base == default_base(plan.seed) else f" --base {plan.base}"
    return f".venv/bin/python tests/torture.py --seed {plan.seed}{chosen}"


# -- the plan -----------------------------------------------------------------


@dataclass
class FaultProfile:
    """Per-request fault rates while faults are on."""

    error_rate: float = 0.0
    range_error_rate: float = 0.0
    reset_rate: float = 0.0
    cut_rate: float = 0.0
    stall_rate: float = 0.0
    long_stall: bool = False
    slow_downloads: int = 0


@dataclass
class Plan:
    """Everything a seed decides before the run starts."""

    seed: int
    base: str
    keep_history: bool
    clock_behind: bool
    threads: int
    children: int
    rounds: int
    ops_per_round: int
    fault_rounds: float
    fault_vote: bool
    large_rate: float
    fast_stream: int
    shared_rate: float
    faults: FaultProfile
    #: A second OS process evicts the cache directory in a loop.
    evictor: bool = False
    #: The database starts as a FileStorage site with a blob-dir, read through
    #: the storage's fallback-blob-dir (tests/torturelegacy.py).
    legacy: bool = False
    #: On the zeo base: the ZEO server's storage (ZEO_SERVER_STORAGES).
    zeo_server: str = ""

    def describe(self) -> str:
        """One line: what this seed exercises."""
        f = self.faults
        return (
            f"seed {self.seed}: base={self.base}"
            f"{f'({self.zeo_server} on the server)' if self.zeo_server else ''}"
            f"{'(history)' if self.keep_history else ''}"
            f"{' clock-behind' if self.clock_behind else ''} threads={self.threads}"
            f" children={self.children} rounds={self.rounds}x{self.ops_per_round}"
            f" faults: {self.fault_rounds:.0%} of rounds, 503 {f.error_rate:.2f}"
            f" range {f.range_error_rate:.2f} reset {f.reset_rate:.2f}"
            f" cut {f.cut_rate:.2f} stall {f.stall_rate:.2f}"
            f"{' long-stall' if f.long_stall else ''}"
            f"{' vote-failures' if self.fault_vote else ''}"
            f" large {self.large_rate:.0%}"
            f"{' ranged' if self.fast_stream == FAST_STREAM else ''}"
            f"{' slow-downloads' if f.slow_downloads else ''}"
            f"{' evictor-process' if self.evictor else ''}"
            f"{' legacy-fallback' if self.legacy else ''}"
        )


def make_plan(seed: int, base: str | None = None) -> Plan:
    """The plan of *seed* on *base*, by default :func:`default_base`: ``seed
    % 4`` picks file, mapping, demo or relstorage (with child processes), so
    that a list of seeds covers all; seeds in :data:`ZEO_SEEDS` run on a ZEO
    client (with child processes)."""
    rng = random.Random(f"plan:{seed}")
    base = base or default_base(seed)
    relstorage = base == "relstorage"
    processes = base in ("relstorage", "zeo")
    plan = Plan(
        seed=seed,
        base=base,
        keep_history=relstorage and rng.random() < 0.6,
        clock_behind=base in ("mapping", "demo") and rng.random() < 0.8,
        threads=rng.randint(1, 2) if processes else rng.randint(2, 4),
        children=2 if processes else 0,
        rounds=rng.randint(5, 8),
        ops_per_round=rng.randint(4, 7),
        fault_rounds=rng.choice([0.5, 0.7, 1.0]),
        fault_vote=rng.random() < 0.25,
        large_rate=rng.choice([0.04, 0.08, 0.12]),
        fast_stream=FAST_STREAM if rng.random() < 0.8 else DEFAULT_FAST_STREAM,
        # Actors writing the same blobs conflict; with a clock behind, one
        # may commit the very key an aborted transaction of another deletes.
        shared_rate=0.4 if base in ("mapping", "demo") else 0.15,
        faults=FaultProfile(
            error_rate=rng.choice([0.0, 0.05, 0.1, 0.2]),
            range_error_rate=rng.choice([0.0, 0.1, 0.3]),
            reset_rate=rng.choice([0.0, 0.02, 0.05]),
            cut_rate=rng.choice([0.0, 0.05, 0.1]),
            stall_rate=rng.choice([0.0, 0.02, 0.05]),
            long_stall=rng.random() < 0.15,
        ),
    )
    return _compose(plan)


def _compose(plan: Plan) -> Plan:
    """Add the compositions drawn from a random source of their own (so the
    rest of every seed's plan stays as it was): slow downloads while another
    process evicts the cache, and (on FileStorage) a legacy site read through
    the fallback, whose cached copies get damaged while packs run."""
    rng = random.Random(f"compose:{plan.seed}")
    if rng.random() < 0.35:
        plan.faults.slow_downloads = SLOW_DOWNLOADS
        plan.evictor = True
    plan.legacy = plan.base == "file" and rng.random() < 0.5
    if plan.base == "zeo":
        plan.zeo_server = random.Random(f"zeo:{plan.seed}").choice(ZEO_SERVER_STORAGES)
    return plan


def draw_size(rng: random.Random, large_rate: float = 0.03) -> int:
    """A blob size: often empty or small, sometimes up to 1.5 MB, rarely
    (*large_rate*) above the part size: those take the multi-part download
    path, and are kept rare so that a seed stays fast."""
    if rng.random() < large_rate:
        return rng.randint(PART_SIZE + 1, 2 * PART_SIZE + 12345)
    r = rng.random()
    if r < 0.12:
        return 0
    if r < 0.5:
        return rng.randint(1, 2000)
    if r < 0.85:
        return rng.randint(2000, 200_000)
    return rng.randint(200_000, 1_500_000)


# -- faults -------------------------------------------------------------------


class TortureFaults(Faults):
    """:class:`faultserver.Faults` whose rates are decided per request: the
    ``when`` hook (called first for every request) draws this request's rates
    and stall into a thread-local, which the rate attributes then read.

    That allows what fixed rates cannot: faults switched on and off between
    rounds, stalls on a few requests only, one long stall per run, and every
    PUT of chosen objects failing (a vote that must fail) while other
    requests see the ordinary rates.
    """

    def __init__(self, seed: int, profile: FaultProfile) -> None:
        self._request = threading.local()
        super().__init__(seed=seed)
        self.profile = profile
        self.enabled = False
        #: Path fragments whose PUTs are all answered 503.
        self.blocked: set[str] = set()
        self._long_stall_left = 1 if profile.long_stall else 0
        #: Slow downloads left: half by chance, half asked for (slow_down).
        self._slow_left = {
            False: profile.slow_downloads // 2,
            True: profile.slow_downloads - profile.slow_downloads // 2,
        }
        #: Keys whose next GET is one of the slow downloads (:meth:`slow_down`).
        self._slow_keys: set[str] = set()
        #: Requests served, by method (GETs with a Range apart).
        self.requests: Counter = Counter()
        #: While above 0, every copy (a PUT with a copy source) is answered
        #: 503 (:meth:`copies_held`).
        self._copies_held = 0
        self.when = self._decide

    def _decide(self, environ: dict) -> bool:
        method = environ["REQUEST_METHOD"]
        path = environ.get("PATH_INFO", "")
        kind = f"{method}{' range' if environ.get('HTTP_RANGE') else ''}"
        with self._lock:
            self.requests[kind] += 1
        request = self._request
        request.rates = (0.0, 0.0, 0.0, 0.0)
        request.stall = 0.0
        if method == "PUT" and any(b in path for b in list(self.blocked)):
            request.rates = (1.0, 0.0, 0.0, 0.0)
            return True
        if self._copies_held and "HTTP_X_AMZ_COPY_SOURCE" in environ:
            request.rates = (1.0, 0.0, 0.0, 0.0)
            return True
        if method == "GET" and self._slow_keys:
            request.stall = self._slow(path, targeted=True)
            if request.stall:
                return True
        if not self.enabled:
            return False
        p = self.profile
        request.rates = (p.error_rate, p.range_error_rate, p.reset_rate, p.cut_rate)
        if p.stall_rate and self.draw() < p.stall_rate:
            request.stall = 0.05 + self.draw() * 0.5
        if (
            self._long_stall_left
            and method == "GET"
            and path.endswith(".blob")
            and self.draw() < 0.05
        ):
            with self._lock:
                if self._long_stall_left:
                    self._long_stall_left -= 1
                    request.stall = LONG_STALL
        if method == "GET" and path.endswith(".blob") and not request.stall:
            request.stall = self._slow(path, targeted=False)
        return True

    @contextlib.contextmanager
    def copies_held(self) -> Iterator[None]:
        """Answer every copy 503 within the block (of every process: the
        copies after a ZEO client's commit wait, reads of those revisions
        find no object)."""
        with self._lock:
            self._copies_held += 1
        try:
            yield
        finally:
            with self._lock:
                self._copies_held -= 1

    def slow_down(self, key: str) -> bool:
        """Make the next GET of *key* one of the plan's slow downloads, if
        some are left; whether it will be."""
        with self._lock:
            if self._slow_left[True]:
                self._slow_keys.add(key)
            return bool(self._slow_left[True])

    def forget_slow(self, key: str) -> None:
        """*key* was not downloaded (it was cached): no slow GET for it."""
        with self._lock:
            self._slow_keys.discard(key)

    def _slow(self, path: str, targeted: bool) -> float:
        """The stall of a blob GET that is one of the plan's slow downloads
        (0.0: it is not): a GET :meth:`slow_down` asked for, or by chance any
        other while faults are on."""
        chance = self.draw()
        low, high = SLOW_STALL
        seconds = low + self.draw() * (high - low)
        with self._lock:
            key = next((k for k in self._slow_keys if path.endswith(k)), None)
            if targeted and key is None:
                return 0.0
            if not self._slow_left[targeted] or not (targeted or chance < 0.1):
                return 0.0
            self._slow_keys.discard(key)
            self._slow_left[targeted] -= 1
            self.injected.append(f"slow {path} {seconds:.1f}s")
        return seconds

    def _rate(index: int):  # noqa: N805 -- builds properties below
        def get(self) -> float:
            rates = getattr(self._request, "rates", None)
            return rates[index] if rates else 0.0

        def ignore(self, value) -> None:
            """Faults' __init__ assigns the fields: the rates are per request."""

        return property(get, ignore)

    error_rate = _rate(0)
    range_error_rate = _rate(1)
    reset_rate = _rate(2)
    cut_rate = _rate(3)
    del _rate

    @property
    def stall(self) -> float:
        return getattr(self._request, "stall", 0.0)

    @stall.setter
    def stall(self, value) -> None:
        """Faults' __init__ assigns it: stalls are per request."""

    def counts(self) -> Counter:
        """How many faults of each kind were injected."""
        with self._lock:
            notes = list(self.injected)
        return Counter(note.split(" ", 1)[0] for note in notes)


# -- the model ----------------------------------------------------------------


@dataclass
class Revision:
    """What was acknowledged of one blob revision."""

    size: int
    sha: str
    data: bytes | None = None  # kept for revisions the parent wrote
    origin: str = ""

    @property
    def expected(self) -> tuple[int, str]:
        return self.size, self.sha


#: A blob revision with no state (its creation was undone).
GONE = None


class Model:
    """Acknowledged revisions, per-object histories, and per-actor
    transactions (the candidates for undo). Thread-safe."""

    def __init__(self) -> None:
        self.lock = threading.Condition()
        self.revisions: dict[tuple[bytes, bytes], Revision] = {}
        self.history: dict[bytes, dict[bytes, Revision | None]] = {}
        self.transactions: dict[str, list[tuple[bytes, list[bytes]]]] = {}

    def record(self, oid: bytes, tid: bytes, revision: Revision | None) -> None:
        with self.lock:
            self.history.setdefault(oid, {})[tid] = revision
            if revision is not None:
                self.revisions[(oid, tid)] = revision
            self.lock.notify_all()

    def record_transaction(self, actor: str, tid: bytes, oids: list[bytes]) -> None:
        with self.lock:
            self.transactions.setdefault(actor, []).append((tid, oids))

    def state_before(self, oid: bytes, tid: bytes) -> Revision | None:
        """The revision of *oid* that was current just before *tid*."""
        with self.lock:
            earlier = [t for t in self.history.get(oid, {}) if t < tid]
            return self.history[oid][max(earlier)] if earlier else GONE

    def get(self, oid: bytes, tid: bytes, wait: float = 0.0) -> Revision | None:
        """The acknowledged revision (oid, tid); waits up to *wait* seconds for
        a commit being recorded (another process may show it a moment before
        its committer's callback ran)."""
        deadline = time.monotonic() + wait
        with self.lock:
            while True:
                revision = self.revisions.get((oid, tid))
                remaining = deadline - time.monotonic()
                if revision is not None or remaining <= 0:
                    return revision
                self.lock.wait(remaining)

    def snapshot(self) -> list[tuple[bytes, bytes, Revision]]:
        with self.lock:
            return [(o, t, r) for (o, t), r in self.revisions.items()]


def held_revisions(storage, refs) -> set[tuple[bytes, bytes]]:
    """Which of *refs* the base still holds (one current view for all)."""
    with held_view(storage) as view:
        return {(o, t) for o, t in refs if revision_exists(view, o, t)}


def bucket_keys(prefix: str) -> set[str]:
    """Every revision key under the prefix, listed past the fault server."""
    return torturezeo.listed_keys(KeyLayout(prefix).root)


# -- errors -------------------------------------------------------------------


def _expected_errors() -> tuple[type[BaseException], ...]:
    """What an operation may fail with and still be correct: ZODB's own errors
    (conflicts, POSKeyError -- checked separately where it matters --, undo
    errors), transient transaction errors, this package's errors, RelStorage's
    lock timeouts and SQLite's busy database. Anything else (OSError,
    TypeError, ...) is a defect."""
    from transaction.interfaces import TransientError

    errors: list[type[BaseException]] = [POSError, TransientError, S3BlobStorageError]
    with contextlib.suppress(ImportError):
        from relstorage.adapters.interfaces import UnableToAcquireLockError

        errors.append(UnableToAcquireLockError)
    # RelStorage on SQLite: "database is locked" while another process holds
    # SQLite's write lock (a soak saw it in undo while children packed).
    errors.append(sqlite3.OperationalError)
    return tuple(errors)


EXPECTED_ERRORS = _expected_errors()


# -- the run ------------------------------------------------------------------


@dataclass
class Stats:
    """What a run did, for the soak's summary."""

    operations: Counter = field(default_factory=Counter)
    outcomes: Counter = field(default_factory=Counter)
    faults: Counter = field(default_factory=Counter)
    requests: Counter = field(default_factory=Counter)
    kills: int = 0
    restarts: int = 0

    def add(self, other: Stats) -> None:
        self.operations.update(other.operations)
        self.outcomes.update(other.outcomes)
        self.faults.update(other.faults)
        self.requests.update(other.requests)
        self.kills += other.kills
        self.restarts += other.restarts

    def summary(self) -> str:
        ops = sum(self.operations.values())
        faults = sum(self.faults.values())
        return (
            f"{ops} operations ({_fmt(self.operations)}); outcomes: "
            f"{_fmt(self.outcomes)}; {faults} faults injected ({_fmt(self.faults)});"
            f" {self.kills} kills; {self.restarts} restarts; S3 requests: "
            f"{_fmt(self.requests)}"
        )


def _fmt(counter: Counter) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(counter.items())) or "none"


class _CriticalLog(logging.Handler):
    """Collects error and critical records of the package: a CRITICAL one
    (blobs uploaded under another tid than the base committed) is a
    violation."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


class Torture:
    """One seed's run: S3 with faults, a database, actors, children, checks."""

    def __init__(self, plan: Plan, directory: Path, verbose: bool = False) -> None:
        self.plan = plan
        self.directory = directory
        self.verbose = verbose
        self.model = Model()
        self.stats = Stats()
        self.failures: list[str] = []
        self._failures_lock = threading.Lock()
        self.prefix = f"torture{plan.seed}-{os.getpid()}-{int(time.time() * 1000)}"
        self.layout = KeyLayout(self.prefix)
        self.rng = random.Random(f"main:{plan.seed}")
        self.faults = TortureFaults(plan.seed, plan.faults)
        self.faults_on = False
        self.cache_generation = 0
        self.storage = None
        self.db = None
        self.actors: list[Actor] = []
        self.children: list[Child] = []
        #: Keys a killed child had uploaded for a commit it never finished.
        self.killed_keys: set[str] = set()
        self.critical = _CriticalLog()
        self._log_checked = 0
        #: One pack at a time, across the processes too: RelStorage's pack on
        #: SQLite fails when two processes pack at once (IntegrityError in
        #: pre_pack), and deployments run one pack at a time.
        self.pack_lock = threading.Lock()
        #: The second process evicting the cache directory (plan.evictor).
        self.evictor: Evictor | None = None
        #: Revisions committed before the switch to S3 (plan.legacy), by the
        #: actor whose namespace holds them: S3 may lack them (the fallback
        #: has them); the bytes of any object it has must be theirs.
        self.legacy: dict[tuple[bytes, bytes], str] = {}
        self.held_uploads: torturelegacy.HeldUploads | None = None
        #: ZConfig text of the base the children open (and the parent, on
        #: RelStorage and ZEO).
        self.base_section = ""

    # -- reporting --------------------------------------------------------

    def fail(self, message: str) -> None:
        """Record a violation (raised by the main thread after the round)."""
        with self._failures_lock:
            self.failures.append(message)
        if self.verbose:
            print(f"VIOLATION: {message}", file=sys.stderr, flush=True)

    def raise_failures(self, when: str) -> None:
        if self.failures:
            counts = Counter(self.failures)
            listed = "\n  ".join(
                message if n == 1 else f"({n} times) {message}"
                for message, n in list(counts.items())[:20]
            )
            raise TortureFailure(
                f"{self.plan.describe()}\n{len(self.failures)} violation(s) {when}:"
                f"\n  {listed}\nreplay: {replay_command(self.plan)}"
            )

    def log(self, message: str) -> None:
        if self.verbose:
            print(f"[seed {self.plan.seed}] {message}", file=sys.stderr, flush=True)

    # -- the database -------------------------------------------------------

    def cache_dir(self) -> str:
        return str(self.directory / f"cache{self.cache_generation}")

    def settings(self):
        return s3env.settings(
            prefix=self.prefix, endpoint_url=self.endpoint_url, part_size=PART_SIZE
        )

    def _new_base(self):
        plan = self.plan
        if plan.base == "file":
            return FileStorage(str(self.directory / "Data.fs"))
        if plan.base == "mapping":
            if self._mapping is None:
                self._mapping = LaggingMappingStorage()
                self._mapping.clock_behind = plan.clock_behind
            self._mapping.reopen()
            return self._mapping
        if plan.base == "demo":
            if self._mapping is None:
                self._mapping = LaggingMappingStorage()
                self._mapping.clock_behind = plan.clock_behind
                self._demo_base = LaggingMappingStorage("demo-base")
            self._mapping.reopen()
            self._demo_base.reopen()
            return DemoStorage(base=self._demo_base, changes=self._mapping)
        return ZODB.config.storageFromString(self.base_section)

    def open_db(self) -> None:
        self.storage = open_storage(
            self._new_base(),
            self.settings(),
            self.cache_dir(),
            CACHE_SIZE,
            self.plan.fast_stream,
            str(self.legacy_blob_dir()) if self.plan.legacy else None,
        )
        if self.plan.legacy:
            self.held_uploads = torturelegacy.HeldUploads(
                self.storage,
                random.Random(f"held:{self.plan.seed}:{self.stats.restarts}"),
                0.7,
                self.stats.outcomes,
            )
        self.db = ZODB.DB(self.storage)
        for actor in self.actors:
            actor.connect(self.db)

    def close_db(self) -> None:
        for actor in self.actors:
            actor.disconnect()
        self.release_uploads()
        self.db.close()
        self.db = None

    def close_db_after_failure(self) -> None:
        """Close the database a failed run left open (before its ZEO server
        stops: a client of a stopped server tries to reconnect for ever)."""
        if self.db is not None:
            with contextlib.suppress(Exception):
                self.db.close()

    def restart(self, fresh_cache: bool) -> None:
        """Close the database and storage and open them again on the same
        base data, on the same cache directory or an empty one."""
        self.close_db()
        if fresh_cache:
            self.cache_generation += 1
        self.stats.restarts += 1
        self.stats.operations["restart-fresh-cache" if fresh_cache else "restart"] += 1
        self.open_db()
        if self.evictor is not None:
            self.evictor.follow(self.cache_dir())

    # -- the run ------------------------------------------------------------

    def run(self) -> Stats:
        """Run the plan; raise TortureFailure on any violation."""
        self._mapping = None
        self._demo_base = None
        package_log = logging.getLogger("zodb_s3blobs")
        package_log.addHandler(self.critical)
        # The command line sets the root logger to CRITICAL (quiet output):
        # the package's ERROR records (an abort's failed DELETE names its keys)
        # must still reach the handler.
        level = package_log.level
        # On the zeo base, a staging object's failed DELETE is a warning.
        watched = logging.WARNING if self.plan.base == "zeo" else logging.ERROR
        self.critical.setLevel(watched)
        package_log.setLevel(watched)
        try:
            with contextlib.ExitStack() as stack:
                self.endpoint_url = stack.enter_context(
                    faulty_s3(self.faults)
                ).endpoint_url
                if self.plan.base == "zeo":
                    zeo_dir = self.directory / "zeo"
                    zeo_dir.mkdir()
                    section = torturezeo.server_storage_section(
                        self.plan.zeo_server, zeo_dir
                    )
                    port = stack.enter_context(runzeo(zeo_dir, section))
                    self.base_section = zeoclient_section(port)
                # Before the servers stop.
                stack.callback(self.close_db_after_failure)
                stack.callback(self.stop_children)
                self._run()
        finally:
            package_log.removeHandler(self.critical)
            package_log.setLevel(level)
            self.stats.faults.update(self.faults.counts())
            self.stats.requests.update(self.faults.requests)
            if self.evictor is not None:
                self.evictor.kill()
            close_oracle()
        return self.stats

    def stop_children(self) -> None:
        for child in self.children:
            child.stop()

    def _run(self) -> None:
        plan = self.plan
        if plan.base == "relstorage":
            from deploy import relstorage_section

            data_dir = self.directory / "sqlite"
            data_dir.mkdir()
            adapter = f"<sqlite3>\n    data-dir {data_dir}\n  </sqlite3>"
            self.base_section = relstorage_section(adapter, plan.keep_history)
        self.actors = [Actor(self, f"t{i}") for i in range(plan.threads)]
        if plan.legacy:
            self.build_legacy_site()
        self.open_db()
        if plan.evictor:
            self.evictor = Evictor(
                self.directory / "evictor", CACHE_SIZE, CACHE_MIN_AGE, plan.seed
            )
            self.evictor.start(self.cache_dir())
        if plan.base == "relstorage":
            open_oracle(self.base_section)  # after the schema exists
        self.setup_root()
        self.children = [Child(self, i) for i in range(plan.children)]
        for child in self.children:
            child.start()
        for number in range(plan.rounds):
            self.faults_on = self.rng.random() < plan.fault_rounds
            self.faults.enabled = self.faults_on
            self.log(f"round {number} faults={'on' if self.faults_on else 'off'}")
            self.round(number)
            self.faults.enabled = False
            self.check_round(number)
            self.between_rounds()
        self.final_checks()

    def setup_root(self) -> None:
        """Namespaces: one mapping per actor and child, and a shared mapping of
        three blobs that every actor may write (so that actors conflict)."""
        tm = transaction.TransactionManager()
        conn = self.db.open(tm)
        root = conn.root()
        for name in [a.name for a in self.actors] + [
            f"c{i}" for i in range(self.plan.children)
        ]:
            root[name] = PersistentMapping()
        root["shared"] = shared = PersistentMapping()
        contents = []
        for i in range(3):
            data = blob_bytes(f"{self.plan.seed}:shared{i}", 100 * i)
            shared[f"s{i}"] = blob = Blob(data)
            contents.append((blob, data))
        on_commit.callback = lambda tid: self.record_commit("setup", tid, contents)
        try:
            tm.commit()
        finally:
            on_commit.callback = None
        conn.close()

    def record_commit(self, actor: str, tid: bytes, contents) -> None:
        """Called with the tid under the base's commit lock: acknowledge."""
        oids = []
        for blob, data in contents:
            size, sha = fingerprint(data)
            self.model.record(blob._p_oid, tid, Revision(size, sha, data, actor))
            oids.append(blob._p_oid)
        self.model.record_transaction(actor, tid, oids)

    def round(self, number: int) -> None:
        """Run every actor's and child's next operations concurrently; fail
        with all threads' stacks if one of them is stuck."""
        workers = []
        for actor in self.actors:
            workers.append(
                (actor, threading.Thread(target=actor.run_round, daemon=True))
            )
        for child in self.children:
            workers.append(
                (child, threading.Thread(target=child.run_round, daemon=True))
            )
        for _worker, thread in workers:
            thread.start()
        while any(thread.is_alive() for _w, thread in workers):
            for worker, thread in workers:
                thread.join(timeout=0.2)
                started = worker.busy_since
                if (
                    thread.is_alive()
                    and started is not None
                    and time.monotonic() - started > OP_BOUND
                ):
                    self.stuck(worker)
        self.raise_failures(f"in round {number}")

    def stuck(self, worker) -> None:
        """Dump every thread's stack (and a child's, through SIGUSR1) and fail."""
        print(
            f"\n*** seed {self.plan.seed}: {worker.name} stuck in {worker.busy_with} "
            f"for more than {OP_BOUND:.0f}s; all threads:",
            file=sys.stderr,
            flush=True,
        )
        faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
        if isinstance(worker, Child):
            worker.dump_stacks()
        self.fail(f"{worker.name} stuck in {worker.busy_with} for > {OP_BOUND:.0f}s")
        self.raise_failures("(stuck)")

    def between_rounds(self) -> None:
        """A restart, now and then, with or without the cache."""
        r = self.rng.random()
        if r < 0.15:
            self.restart(fresh_cache=False)
        elif r < 0.25:
            self.restart(fresh_cache=True)

    # -- checks ---------------------------------------------------------------

    def check_round(self, number: int) -> None:
        """After a round: a sample of acknowledged revisions reads back right
        (strictly: faults are off between rounds), and S3 has the object of
        every revision the base holds."""
        revisions = self.model.snapshot()
        refs = [(o, t) for o, t, _r in revisions]
        held = held_revisions(self.storage, refs)
        # Read before the listing: copiers only complete journals meanwhile.
        owed = torturezeo.owed(self.directory)
        keys = bucket_keys(self.prefix)
        for oid, tid in held:
            key = self.layout.key(oid, tid)
            if owed.owes(oid, tid):
                self.stats.outcomes["copy owed by a journal between rounds"] += 1
            elif key not in keys and (oid, tid) not in self.legacy:
                self.fail(
                    f"after round {number}: the object of held revision "
                    f"{oid.hex()}/{tid.hex()} is missing from S3"
                )
        sample = self.rng.sample(revisions, min(len(revisions), 25))
        for oid, tid, revision in sample:
            problem = check_read(self.storage, oid, tid, revision.expected, True)
            if problem:
                self.fail(f"after round {number}: {problem}")
        self.check_log()
        self.check_evictor(f"after round {number}")
        self.raise_failures(f"after round {number}")

    def check_log(self) -> None:
        records = self.critical.records
        for record in records[self._log_checked :]:
            if record.levelno >= logging.CRITICAL:
                self.fail(f"CRITICAL log: {record.getMessage()}")
        self._log_checked = len(records)

    def logged_errors(self) -> str:
        """Every error the package logged, here and in the children (an
        aborted transaction whose DELETE failed names its keys there)."""
        texts = [record.getMessage() for record in self.critical.records]
        for child in self.children:
            for log in child.home.glob("stderr*.log"):
                texts.append(log.read_text(errors="replace"))
        return "\n".join(texts)

    def check_orphans(self, revisions) -> None:
        """Before the final collection: every object in S3 is a held revision's,
        an acknowledged revision's the base has dropped since (pack, newer
        revisions of a history-free base), a killed process's, or one whose
        failed DELETE was logged. Anything else is an object a failed commit
        left behind without a word."""
        keys = bucket_keys(self.prefix)
        acknowledged = {(o, t) for o, t, _r in revisions}
        parsed = {key: self.layout.parse(key) for key in keys}
        held = held_revisions(self.storage, [r for r in parsed.values() if r])
        logged = self.logged_errors()
        for key, ref in sorted(parsed.items()):
            if ref is None or ref in held or ref in acknowledged:
                continue
            if key in self.killed_keys or key in logged:
                self.stats.outcomes["orphan explained before the collection"] += 1
                continue
            if self.children and self.stats.kills:
                # A child killed at a random point names no keys.
                self.stats.outcomes["orphan of a child killed at random"] += 1
                continue
            self.fail(
                f"final: {key} is in S3 but of no acknowledged revision, no killed "
                "process, and no logged failed DELETE"
            )

    def final_checks(self) -> None:
        """Faults off: children alive; a last commit (so that the tids of
        killed and aborted transactions are in the past); orphan collection
        leaves exactly the held revisions' objects; every process reads every
        held revision; a restart on an empty cache reads them all from S3;
        no cached file differs from what was acknowledged."""
        self.faults.enabled = False
        self.faults.blocked.clear()
        self.settle_uploads()
        for child in self.children:
            child.ensure_running()
        if self.plan.base == "zeo":
            self.complete_copies()
        self.actors[0].final_commit()
        self.check_orphans(self.model.snapshot())
        # Retention 0: the check below wants every orphan gone (the run's own
        # packs and collections keep the default gc-retention).
        report = self.storage.collect_orphans(retention=0)
        self.log(f"final collection: {report}")
        revisions = self.model.snapshot()
        held = held_revisions(self.storage, [(o, t) for o, t, _r in revisions])
        expected = {self.layout.key(o, t) for o, t in held}
        keys = bucket_keys(self.prefix)
        fallback_only = {self.layout.key(o, t) for o, t in self.legacy}
        for key in sorted(expected - keys - fallback_only):
            self.fail(f"final: the object of held revision {key} is missing")
        extra = keys - expected
        if extra:
            self.check_extra_keys(extra)
        self.check_legacy_objects(keys)
        self.read_all("final read", revisions, held)
        for child in self.children:
            child.read_all(revisions, held)
        self.check_cache_files(revisions)
        self.raise_failures("in the final checks (before the restart)")
        self.restart(fresh_cache=True)
        self.read_all("final read after a restart on an empty cache", revisions, held)
        self.check_log()
        self.stop_evictor()
        self.raise_failures("in the final checks")
        self.close_db()
        if self.plan.base == "zeo":
            self.stop_children()
            self.check_staging()
            self.raise_failures("in the final check of staging")

    # -- the zeo base: copies after the commit, staging --------------------

    def complete_copies(self) -> None:
        """Close every process (a ZEO client's close tries its owed copies
        once more, faults off now) and open it again on the same cache
        directory (which adopts the journals left): then no journal may
        remain."""
        for child in self.children:
            child.stop()
            child.restart()
        self.restart(fresh_cache=False)
        for path in torturezeo.owed(self.directory).journals:
            self.fail(f"final: copies owed with faults off after restarts: {path}")

    def check_staging(self) -> None:
        """Every process closed: a staging object may stay only if a journal
        owes its copy, or if a SIGKILLed child named it (killed before its
        vote wrote a journal: the collection removes it once a day old), or
        if its failed DELETE was logged."""
        owed = torturezeo.owed(self.directory)
        killed = torturezeo.named_staging_keys(
            child.staging_log(generation)
            for child in self.children
            for generation in child.killed
        )
        logged = self.logged_errors()
        for key in sorted(torturezeo.staging_keys(self.prefix)):
            if key in owed.staging_keys:
                self.stats.outcomes["staging object a journal owes"] += 1
            elif key in killed:
                self.stats.outcomes["staging object of a killed child"] += 1
            elif key in logged:
                self.stats.outcomes["staging object of a logged failed DELETE"] += 1
            else:
                self.fail(
                    f"final: staging object {key} is owed by no journal and was "
                    "named by no killed process"
                )

    def check_extra_keys(self, extra: set[str]) -> None:
        """Objects left after the collection that no acknowledged revision
        explains: allowed only for revisions the base holds that a killed child
        committed without getting to answer."""
        child_oids = self.child_oids()
        parsed = {key: self.layout.parse(key) for key in sorted(extra)}
        held = held_revisions(self.storage, [r for r in parsed.values() if r])
        for key, ref in parsed.items():
            if ref is None:
                self.fail(f"final: a foreign key in the bucket: {key}")
            elif ref not in held:
                self.fail(f"final: orphan left after collection with faults off: {key}")
            elif ref[0] not in child_oids or not self.stats.kills:
                self.fail(
                    f"final: {key} is held by the base but was never acknowledged "
                    "(a commit that raised committed?)"
                )
            else:
                self.stats.outcomes["unacknowledged commit of a killed child"] += 1

    def child_oids(self) -> set[bytes]:
        tm = transaction.TransactionManager()
        conn = self.db.open(tm)
        try:
            root = conn.root()
            return {
                blob._p_oid
                for i in range(self.plan.children)
                for blob in root[f"c{i}"].values()
            }
        finally:
            tm.abort()
            conn.close()

    def read_all(self, what: str, revisions, held) -> None:
        for oid, tid, revision in revisions:
            if (oid, tid) not in held:
                continue
            problem = check_read(self.storage, oid, tid, revision.expected, True)
            if problem:
                self.fail(f"{what}: {problem}")

    def check_cache_files(self, revisions) -> None:
        """Every file in the cache is the acknowledged revision it is named
        after (or one the model does not know)."""
        known = {(o, t): r for o, t, r in revisions}
        cache = self.storage._cache
        for path, _st in cache.files():
            oid_hex = os.path.basename(os.path.dirname(path))
            tid_hex = os.path.basename(path).split(".")[0]
            ref = (
                int(oid_hex, 16).to_bytes(8, "big"),
                int(tid_hex, 16).to_bytes(8, "big"),
            )
            revision = known.get(ref)
            if revision is None:
                continue
            if ref in self.legacy and torturelegacy.damaged(path):
                self.stats.outcomes["damaged file not read since"] += 1
                continue
            with contextlib.suppress(FileNotFoundError), open(path, "rb") as f:
                got = fingerprint(f.read())
                if got != revision.expected:
                    self.fail(
                        f"cached file {path} has {got[0]} bytes, not the "
                        f"acknowledged {revision.size}"
                    )

    # -- a second evicting process; a legacy site read through the fallback --

    def check_evictor(self, when: str) -> None:
        """The evicting process must not have died."""
        died = self.evictor.died() if self.evictor is not None else None
        if died:
            self.fail(f"{when}: the process evicting the cache {died}")

    def stop_evictor(self) -> None:
        """Stop the evicting process and wait for it; its crash is a failure."""
        if self.evictor is None:
            return
        try:
            report = self.evictor.stop()
        except RuntimeError as exc:
            self.fail(f"final: {exc}")
            return
        self.log(f"evicting process: {report}")
        self.stats.outcomes["eviction passes of another process"] += report["passes"]
        self.stats.outcomes["bytes evicted by another process"] += report["freed"]

    def legacy_blob_dir(self) -> Path:
        return self.directory / "legacy-blobs"

    def build_legacy_site(self) -> None:
        """The FileStorage site before the switch: each actor's namespace
        ``legacy-<actor>`` of blobs in a blob-dir, acknowledged as committed."""
        revisions = torturelegacy.build_site(
            self.directory / "Data.fs",
            self.legacy_blob_dir(),
            [f"legacy-{actor.name}" for actor in self.actors],
            self.plan.seed,
            draw_size,
        )
        for oid, tid, data, namespace in revisions:
            size, sha = fingerprint(data)
            self.model.record(oid, tid, Revision(size, sha, data, namespace))
            self.legacy[oid, tid] = namespace.removeprefix("legacy-")

    def release_uploads(self) -> None:
        if self.held_uploads is not None:
            released = self.held_uploads.release()
            self.stats.outcomes["held read-through uploads released"] += released

    def settle_uploads(self) -> None:
        """Let every read-through upload run to its end (before the final
        checks judge what they put into S3)."""
        if self.held_uploads is not None:
            self.held_uploads.settle()

    def check_legacy_objects(self, keys: set[str]) -> None:
        """Each object S3 has for a legacy revision (a read-through upload's)
        holds exactly the acknowledged bytes: read from S3, past the cache
        and the fallback, it is what a site reads once the fallback is gone."""
        client = s3env.server().client()
        revisions = {(o, t): r for o, t, r in self.model.snapshot()}
        for ref in sorted(self.legacy):
            key = self.layout.key(*ref)
            if key not in keys:
                self.stats.outcomes["legacy revision only in the fallback"] += 1
                continue
            body = client.get_object(Bucket=s3env.BUCKET, Key=key)["Body"].read()
            got, expected = fingerprint(body), revisions[ref].expected
            if got != expected:
                self.fail(
                    f"final: S3 holds {got[0]} bytes sha256 {got[1][:16]} for "
                    f"legacy revision {key}, acknowledged {expected[0]} bytes "
                    f"sha256 {expected[1][:16]} (a read-through upload of "
                    "bytes not the fallback's)"
                )
            self.stats.outcomes["legacy revision uploaded by read-through"] += 1


# -- actors: threads of the parent process ------------------------------------


_NO_LOCK = contextlib.nullcontext()


class _Scheduled:
    """A thread's or a child's share of a round: the operations of its
    ``_run_round``, run by :meth:`run_round` in a thread of
    :meth:`Torture.round`."""

    torture: Torture
    name: str

    def run_round(self) -> None:
        """The next operations; a failure of the test itself is reported too."""
        try:
            self._run_round()
        except BaseException as exc:
            self.torture.fail(f"{self.name}: the test itself failed: {describe(exc)}")
            raise


class Actor(_Scheduled):
    """One thread's connection, transaction manager and schedule."""

    def __init__(self, torture: Torture, name: str) -> None:
        self.torture = torture
        self.name = name
        self.rng = random.Random(f"{torture.plan.seed}:{name}")
        self.tm = transaction.TransactionManager()
        self.conn = None
        self.busy_since: float | None = None
        self.busy_with = ""
        self._names = itertools.count()

    def connect(self, db) -> None:
        self.conn = db.open(self.tm)

    def disconnect(self) -> None:
        self.tm.abort()
        self.conn.close()
        self.conn = None

    def weights(self) -> dict[str, float]:
        undo = 8 if self.torture.db.supportsUndo() else 0
        # ZODB's DemoStorage.pack fails (AttributeError: _temporary_changes)
        # when it was given its changes storage, as here: no pack on it.
        pack = 0 if self.torture.plan.base == "demo" else 3
        legacy = self.torture.plan.legacy
        return {
            "commit": 45,
            "read": 14,
            "read_any": 10,
            "undo": undo,
            "pack": pack,
            "gc": 4,
            "evict": 4,
            "sendfile": 10 if self.torture.plan.evictor else 0,
            "damage": 6 if legacy else 0,
            "release_uploads": 4 if legacy else 0,
        }

    def _run_round(self) -> None:
        weights = self.weights()
        for _ in range(self.torture.plan.ops_per_round):
            (op,) = self.rng.choices(list(weights), list(weights.values()))
            self.busy_with, self.busy_since = op, time.monotonic()
            self.torture.stats.operations[op] += 1
            try:
                getattr(self, f"op_{op}")()
            except Exception as exc:
                self.tm.abort()
                self.unexpected(op, exc)
            finally:
                self.busy_since = None
        self.tm.abort()

    def unexpected(self, op: str, exc: BaseException) -> None:
        """An exception escaped an operation: a violation unless it is a
        clear error (and, with faults off, not a read failure)."""
        if isinstance(exc, EXPECTED_ERRORS) and not (
            isinstance(exc, READ_ERRORS) and not self.torture.faults_on
        ):
            self.torture.stats.outcomes[f"{op} failed: {type(exc).__name__}"] += 1
            return
        self.torture.fail(
            f"{self.name} {op}: {describe(exc)}\n"
            + "".join(traceback.format_exception(exc))[-3000:]
        )

    # -- helpers ----------------------------------------------------------

    def committed_content(self, blob) -> bytes | None:
        """The acknowledged bytes of the revision *blob* shows (None: unknown)."""
        revision = self.torture.model.get(blob._p_oid, blob._p_serial, wait=2.0)
        if revision is None:
            self.torture.fail(
                f"{self.name}: {blob._p_oid.hex()}/{blob._p_serial.hex()} is "
                "visible but was never acknowledged"
            )
            return None
        return revision.data

    def compare(self, what: str, blob, data: bytes, expected: bytes) -> None:
        if data != expected:
            oid = blob._p_oid.hex() if blob._p_oid else "new"
            serial = blob._p_serial.hex() if blob._p_serial else "-"
            self.torture.fail(
                f"{self.name} {what} of {oid}/{serial}: WRONG CONTENT: "
                f"{len(data)} bytes, expected {len(expected)}"
                + (" (a silent empty read)" if not data and expected else "")
            )

    def read_error(self, what: str, blob, exc: BaseException) -> None:
        """A read failed (the caller re-raises; :meth:`unexpected` judges the
        type). A POSKeyError is a violation if the base still holds the
        revision, asked after the error (packs only remove)."""
        if isinstance(exc, GONE_ERRORS) and self.is_committed(blob):
            ref = (blob._p_oid, blob._p_serial)
            if held_revisions(self.torture.storage, [ref]):
                self.torture.fail(
                    f"{self.name} {what} of {ref[0].hex()}/{ref[1].hex()}: "
                    f"{describe(exc)} for a revision the base holds"
                )
        problem = unprintable(exc)
        if problem:
            self.torture.fail(f"{self.name} {what}: {problem}")

    @staticmethod
    def is_committed(blob) -> bool:
        """Does *blob* show a committed revision (not new in this transaction,
        even if a savepoint gave it an oid)?"""
        if blob._p_oid is None or blob._p_jar is None:
            return False
        blob._p_activate()
        return blob._p_serial != z64

    # -- operations -------------------------------------------------------

    def op_commit(self) -> None:
        """Edit 0..N blobs in every mode, with savepoints, then commit, abort,
        refuse the vote after the storage voted, or make S3 fail the vote."""
        rng, torture = self.rng, self.torture
        self.tm.begin()
        root = self.conn.root()
        mine, shared = root[self.name], root["shared"]
        pending: dict[int, tuple[Blob, bytes]] = {}
        savepoints: list[tuple[object, dict]] = []
        for _ in range(rng.choice([0, 1, 1, 2, 2, 3, 4, 5])):
            (action,) = rng.choices(
                ["edit", "read", "savepoint", "rollback", "committed", "lazy"],
                [8, 2, 1.5, 0.8, 1, 1.2],
            )
            if action == "savepoint":
                savepoints.append((self.tm.savepoint(), dict(pending)))
                torture.stats.operations["savepoint"] += 1
                continue
            if action == "rollback":
                if savepoints:
                    index = rng.randrange(len(savepoints))
                    savepoint, snapshot = savepoints[index]
                    savepoint.rollback()
                    del savepoints[index + 1 :]
                    pending = dict(snapshot)
                    torture.stats.operations["rollback"] += 1
                continue
            blob = self.pick(mine, shared, new=action == "edit")
            if blob is None:
                continue
            if action == "edit":
                self.edit(blob, pending)
            elif action == "read":
                self.read_blob(blob, pending)
            elif action == "committed":
                self.read_committed(blob, pending)
            else:
                self.lazy(blob, pending)
        (end,) = rng.choices(
            ["commit", "abort", "fail_after_vote", "fault_vote"],
            [75, 10, 10, 5 if torture.plan.fault_vote else 0],
        )
        contents = list(pending.values())
        if end == "abort":
            self.tm.abort()
            torture.stats.outcomes["aborted"] += 1
            return
        if end == "fail_after_vote":
            self.tm.get().join(FailAfterVote())
        blocked = []
        own = [blob for blob, _data in contents if blob not in shared.values()]
        if end == "fault_vote" and own:
            # Every PUT of one of this actor's own blobs fails (not a shared
            # one's: another actor's commit of it would fail too).
            self.tm.savepoint()  # gives new blobs their oids
            blob = rng.choice(own)
            blocked = [f"/blobs/{blob._p_oid.hex().lstrip('0') or '0'}/"]
            torture.faults.blocked.update(blocked)
        acknowledged = []

        def callback(tid: bytes) -> None:
            acknowledged.append(tid)
            torture.record_commit(self.name, tid, contents)

        on_commit.callback = callback
        try:
            self.tm.commit()
        except VoteRefused:
            self.tm.abort()
            torture.stats.outcomes["vote refused after upload"] += 1
            self.check_not_committed(contents, acknowledged)
            return
        except S3BlobStorageError as exc:
            self.tm.abort()
            if not (blocked or torture.faults_on):
                raise
            torture.stats.outcomes[f"vote failed: {type(exc).__name__}"] += 1
            self.check_not_committed(contents, acknowledged)
            return
        finally:
            on_commit.callback = None
            torture.faults.blocked.difference_update(blocked)
        if end == "fail_after_vote" and contents:
            torture.fail(f"{self.name}: a commit whose vote was refused succeeded")
        if blocked:
            torture.fail(f"{self.name}: a commit whose PUTs all failed succeeded")
        torture.stats.outcomes["committed" if acknowledged else "empty commit"] += 1

    def check_not_committed(self, contents, acknowledged) -> None:
        if acknowledged:
            self.torture.fail(
                f"{self.name}: a commit raised after the base committed "
                f"{acknowledged[0].hex()}"
            )

    def pick(self, mine, shared, new: bool):
        """A blob to work on: a new one in this actor's namespace, one of its
        own, or (rarely) a shared one."""
        rng = self.rng
        if self.torture.plan.legacy and rng.random() < 0.3:
            legacy = self.conn.root()[f"legacy-{self.name}"]
            return legacy[rng.choice(sorted(legacy))]
        r = rng.random()
        if new and (r < 0.3 or not mine):
            name = f"{self.name}-{next(self._names)}-{rng.randrange(1 << 30)}"
            mine[name] = blob = Blob()
            return blob
        if r < 1 - self.torture.plan.shared_rate and mine:
            return mine[rng.choice(sorted(mine))]
        return shared[rng.choice(sorted(shared))]

    def current(self, blob, pending) -> bytes | None:
        """What *blob* holds in this transaction: pending bytes, or the
        acknowledged bytes of the revision it shows (None when unknown)."""
        if id(blob) in pending:
            return pending[id(blob)][1]
        if not self.is_committed(blob):
            return b""  # new, never written
        return self.committed_content(blob)

    def edit(self, blob, pending) -> None:
        rng = self.rng
        old = self.current(blob, pending)
        (mode,) = rng.choices(["w", "a", "r+"], [4, 3, 3])
        if old is None or (mode != "w" and len(old) > 2 * PART_SIZE):
            mode = "w"
        label = f"{self.torture.plan.seed}:{self.name}:{rng.getrandbits(64)}"
        piece = blob_bytes(label, draw_size(rng, self.torture.plan.large_rate))
        self.torture.stats.operations[f"open {mode}"] += 1
        try:
            with blob.open(mode) as f:
                if mode == "r+":
                    offset = rng.randint(0, len(old))
                    f.seek(offset)
                    new = old[:offset] + piece + old[offset + len(piece) :]
                elif mode == "a":
                    new = old + piece
                else:
                    new = piece
                f.write(piece)
        except Exception as exc:
            self.read_error(f"open {mode}", blob, exc)
            raise
        pending[id(blob)] = (blob, new)

    def read_blob(self, blob, pending) -> None:
        expected = self.current(blob, pending)
        committed = self.is_committed(blob)
        if not committed and id(blob) not in pending:
            return
        mode = "r" if id(blob) in pending or self.rng.random() < 0.6 else "c"
        self.torture.stats.operations[f"open {mode}"] += 1
        try:
            with blob.open(mode) as f:
                data = f.read()
        except Exception as exc:
            self.read_error(f"open {mode}", blob, exc)
            raise
        if expected is not None:
            self.compare(f"open {mode}", blob, data, expected)

    def read_committed(self, blob, pending) -> None:
        if id(blob) in pending or not self.is_committed(blob):
            return
        expected = self.committed_content(blob)
        self.torture.stats.operations["committed()"] += 1
        try:
            with open(blob.committed(), "rb") as f:
                data = f.read()
        except Exception as exc:
            self.read_error("committed()", blob, exc)
            raise
        if expected is not None:
            self.compare("committed()", blob, data, expected)

    def lazy(self, blob, pending) -> None:
        """Load the blob without opening it (a ghost activated: no download),
        and now and then open it right away for 'r+' or 'a'."""
        if id(blob) in pending or not self.is_committed(blob):
            return
        blob._p_invalidate()
        blob._p_activate()
        self.torture.stats.operations["lazy load"] += 1
        if self.rng.random() < 0.5:
            self.edit(blob, pending)

    def op_read(self) -> None:
        """Open blobs of this actor (and shared ones) in a new transaction."""
        self.tm.begin()
        root = self.conn.root()
        mine, shared = root[self.name], root["shared"]
        for _ in range(self.rng.randint(1, 3)):
            blob = self.pick(mine, shared, new=False)
            if self.rng.random() < 0.3:
                self.read_committed(blob, {})
            else:
                self.read_blob(blob, {})
        self.tm.abort()

    def op_read_any(self) -> None:
        """Read acknowledged revisions of any thread or process by (oid, tid),
        old ones included (of the legacy revisions, only this actor's own:
        their cached copies get damaged by their actor's :meth:`op_damage`)."""
        revisions = [r for r in self.torture.model.snapshot() if self.may_read(r)]
        for oid, tid, revision in self.rng.sample(revisions, min(3, len(revisions))):
            problem = check_read(
                self.torture.storage,
                oid,
                tid,
                revision.expected,
                not self.torture.faults_on,
            )
            if problem:
                self.torture.fail(f"{self.name} read_any: {problem}")

    def op_undo(self) -> None:
        """Undo one of this actor's recent transactions (undo transactions
        included, so undo of an undo happens)."""
        torture = self.torture
        mine = torture.model.transactions.get(self.name, [])[-6:]
        if not mine:
            return
        # The latest is the likeliest to undo without a conflict.
        undone, oids = mine[-1] if self.rng.random() < 0.85 else self.rng.choice(mine)
        # ZODB's FileStorage cannot pack while an undo commits: fspack's
        # copyRest copies the undo's records with their data instead of
        # backpointers and fails (AssertionError: tlen == th.tlen). On it,
        # undo and pack take turns.
        filestorage = "file" in (torture.plan.base, torture.plan.zeo_server)
        with torture.pack_lock if filestorage else _NO_LOCK:
            self._undo(undone, oids)

    def _undo(self, undone: bytes, oids: list[bytes]) -> None:
        torture = self.torture
        self.tm.begin()
        torture.db.undo(base64.encodebytes(undone)[:-1], self.tm.get())

        def callback(tid: bytes) -> None:
            for oid in oids:
                torture.model.record(oid, tid, torture.model.state_before(oid, undone))
            torture.model.record_transaction(self.name, tid, oids)

        on_commit.callback = callback
        try:
            self.tm.commit()
        finally:
            on_commit.callback = None
        torture.stats.outcomes["undone"] += 1

    def op_pack(self) -> None:
        with self.torture.pack_lock:
            self.torture.db.pack()

    def op_gc(self) -> None:
        self.torture.storage.collect_orphans()

    def op_evict(self) -> None:
        self.torture.storage._cache.evict(0)

    def op_sendfile(self) -> None:
        """Ask for the path of an acknowledged revision (``loadBlob``) and open
        it a moment later (up to a quarter of the cache's minimum age), as a
        front-end server told it by X-Sendfile does. The cache promises the
        file stays for ``cache-min-age`` after its last use, however slow its
        download was, whatever another process evicts meanwhile."""
        torture, rng = self.torture, self.rng
        cache = torture.storage._cache
        revisions = [r for r in torture.model.snapshot() if self.may_read(r)]
        if not revisions:
            return
        # Mostly one not cached (and not packed away): its download may be one
        # of the slow ones.
        uncached = [r for r in revisions if not os.path.exists(cache.path(*r[:2]))]
        sample = rng.sample(uncached, min(len(uncached), 10))
        held = held_revisions(torture.storage, [r[:2] for r in sample])
        uncached = [r for r in sample if r[:2] in held]
        oid, tid, revision = rng.choice(
            uncached if uncached and rng.random() < 0.8 else revisions
        )
        name = f"{oid.hex()}/{tid.hex()}"
        key = torture.layout.key(oid, tid)
        if rng.random() < 0.5:
            torture.faults.slow_down(key)
        started = time.monotonic()
        try:
            path = torture.storage.loadBlob(oid, tid)
        except GONE_ERRORS as exc:
            if held_revisions(torture.storage, [(oid, tid)]):
                torture.fail(f"{self.name} sendfile {name}: {describe(exc)}")
            return
        finally:
            torture.faults.forget_slow(key)
        delay = rng.uniform(0, CACHE_MIN_AGE / 4)
        took = time.monotonic() - started
        if took > CACHE_MIN_AGE:
            torture.stats.outcomes["sendfile of a download slower than min age"] += 1
            torture.log(
                f"{self.name} sendfile {name}: loaded in {took:.1f}s, "
                f"opened {delay:.2f}s later"
            )
        time.sleep(delay)
        try:
            with open(path, "rb") as f:
                got = fingerprint(f.read())
        except FileNotFoundError:
            # A pack (or the collection after one) removes the cached copies
            # of the revisions it removed: asked after the error.
            if held_revisions(torture.storage, [(oid, tid)]):
                torture.fail(
                    f"{self.name} sendfile {name}: the path loadBlob returned "
                    f"was gone {delay:.2f}s later (cache-min-age "
                    f"{CACHE_MIN_AGE:g}s)"
                )
            else:
                torture.stats.outcomes["sendfile: revision packed meanwhile"] += 1
            return
        if got != revision.expected:
            torture.fail(
                f"{self.name} sendfile {name}: WRONG CONTENT: {got[0]} bytes, "
                f"expected {revision.size}"
            )

    def may_read(self, revision: tuple[bytes, bytes, Revision]) -> bool:
        """Not another actor's legacy revision: its owner may be damaging its
        cached copy right now, which a read between the cache's size check
        and its open would see (a stray writer's doing, not the storage's)."""
        owner = self.torture.legacy.get(revision[:2])
        return owner is None or owner == self.name

    def op_damage(self) -> None:
        """Read one of this actor's legacy revisions (from the fallback if S3
        lacks it: a read-through upload follows, maybe held back) and damage
        its cached copy as a stray writer would. The upload must send the
        fallback's bytes or nothing; reads must see the damage and fetch the
        revision again."""
        torture = self.torture
        mine = sorted(
            ref for ref, owner in torture.legacy.items() if owner == self.name
        )
        oid, tid = self.rng.choice(mine)
        revision = torture.model.get(oid, tid)
        problem = check_read(
            torture.storage, oid, tid, revision.expected, not torture.faults_on
        )
        if problem:
            torture.fail(f"{self.name} damage (its read): {problem}")
        path = torture.storage._cache.path(oid, tid)
        if torturelegacy.damage(path, revision.size):
            torture.stats.outcomes["cached legacy file damaged"] += 1

    def op_release_uploads(self) -> None:
        """Queue the read-through uploads held back so far."""
        self.torture.release_uploads()

    def final_commit(self) -> None:
        """One small commit with faults off; it must succeed."""
        self.tm.begin()
        mine = self.conn.root()[self.name]
        data = b"final"
        mine["final"] = blob = Blob(data)
        contents = [(blob, data)]
        on_commit.callback = lambda tid: self.torture.record_commit(
            self.name, tid, contents
        )
        try:
            self.tm.commit()
        finally:
            on_commit.callback = None


# -- children: other OS processes ---------------------------------------------


class ChildDied(Exception):
    """The child process exited (it was killed, or it crashed)."""


class Child(_Scheduled):
    """A child process (tests/torturechild.py) on the same RelStorage base and
    cache directory, and the thread of the parent that drives it."""

    def __init__(self, torture: Torture, index: int) -> None:
        self.torture = torture
        self.index = index
        self.name = f"c{index}"
        self.rng = random.Random(f"{torture.plan.seed}:{self.name}")
        self.home = torture.directory / self.name
        self.home.mkdir()
        self.pause_dir = self.home / "pause"
        self.pause_dir.mkdir()
        self.process: subprocess.Popen | None = None
        self.replies: queue.Queue[str] = queue.Queue()
        self.busy_since: float | None = None
        self.busy_with = ""
        self.generation = 0
        #: The generations that were SIGKILLed.
        self.killed: list[int] = []
        self._names = itertools.count()

    # -- the process ------------------------------------------------------

    def start(self) -> None:
        torture = self.torture
        self.generation += 1
        job = {
            "section": torture.base_section,
            "oracle": torture.plan.base == "relstorage",
            "settings": asdict(torture.settings()),
            "cache_dir": self.cache_dir(),
            "cache_size": CACHE_SIZE,
            "fast_stream": torture.plan.fast_stream,
            "namespace": self.name,
            "pause_dir": str(self.pause_dir),
            "staging_log": str(self.staging_log(self.generation)),
        }
        job_path = self.home / "job.json"
        job_path.write_text(json.dumps(job))
        for leftover in self.pause_dir.iterdir():
            leftover.unlink()
        self.log_path = self.home / f"stderr{self.generation}.log"
        with open(self.log_path, "w") as log:
            self.process = subprocess.Popen(
                [
                    sys.executable,
                    "-X",
                    "faulthandler",
                    str(HERE / "torturechild.py"),
                    str(job_path),
                ],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=log,
                text=True,
            )
        self.replies = queue.Queue()
        threading.Thread(
            target=self._read_replies, args=(self.process, self.replies), daemon=True
        ).start()
        self.receive()  # ready

    @staticmethod
    def _read_replies(process, replies) -> None:
        for line in process.stdout:
            replies.put(line)
        replies.put("")

    def send(self, op: str, **args) -> None:
        self.process.stdin.write(json.dumps({"op": op, **args}) + "\n")
        self.process.stdin.flush()

    def receive(self, timeout: float = OP_BOUND) -> dict:
        try:
            line = self.replies.get(timeout=timeout)
        except queue.Empty:
            self.dump_stacks()
            raise TortureFailure(
                f"{self.name} did not answer in {timeout:.0f}s:\n{self.log_tail()}"
            ) from None
        if not line:
            raise ChildDied(f"{self.name} exited:\n{self.log_tail()}")
        return json.loads(line)

    def call(self, op: str, **args) -> dict:
        self.send(op, **args)
        return self.receive()

    def log_tail(self) -> str:
        with contextlib.suppress(OSError):
            return self.log_path.read_text()[-4000:]
        return ""

    def dump_stacks(self) -> None:
        """Ask the child for its stacks (faulthandler on SIGUSR1 is not set;
        SIGABRT with -X faulthandler dumps them into its log) and print them."""
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGABRT)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(timeout=10)
            print(self.log_tail(), file=sys.stderr, flush=True)

    def cache_dir(self) -> str:
        """The parent's cache directory; on the zeo base, one the children
        share (as the Zope processes of one host do) and the parent does not
        (another host): a child killed with copies owed leaves its journal
        there, for the restarted child to adopt (or for the other, live child
        to leave alone), and the parent reads their blobs from S3."""
        if self.torture.plan.base == "zeo":
            return str(self.torture.directory / "children-cache")
        return self.torture.cache_dir()

    def staging_log(self, generation: int) -> Path:
        """Where the process of *generation* names its staging keys."""
        return self.home / f"staging{generation}.log"

    def kill(self) -> None:
        """SIGKILL the child and wait for it."""
        self.process.kill()
        self.process.wait(timeout=30)
        self.killed.append(self.generation)
        self.torture.stats.kills += 1

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        try:
            self.send("quit")
            self.process.wait(timeout=60)
        except (OSError, subprocess.TimeoutExpired):
            self.process.kill()
            self.process.wait()

    def ensure_running(self) -> None:
        if self.process is None or self.process.poll() is not None:
            self.start()

    def restart(self) -> None:
        """A new process on the parent's current cache directory."""
        if self.process.poll() is None:
            self.kill()
        self.torture.stats.restarts += 1
        self.start()

    # -- the schedule -----------------------------------------------------

    def _run_round(self) -> None:
        weights = {
            "commit": 40,
            "read": 20,
            "read_namespace": 10,
            "gc": 5,
            "evict": 5,
            "pack": 2,
            "pause_then_kill_or_go": 8,
            "kill_at_random": 6,
            "kill_before_copy": 6 if self.torture.plan.base == "zeo" else 0,
        }
        for _ in range(self.torture.plan.ops_per_round):
            (op,) = self.rng.choices(list(weights), list(weights.values()))
            self.busy_with, self.busy_since = op, time.monotonic()
            self.torture.stats.operations[f"child {op}"] += 1
            try:
                getattr(self, f"op_{op}")()
            except ChildDied as exc:
                self.torture.fail(f"{self.name} {op}: the child died: {exc}")
                self.restart()
            except TortureFailure as exc:
                self.torture.fail(str(exc))
                self.restart()
            except Exception as exc:
                self.torture.fail(
                    f"{self.name} {op}: {type(exc).__name__}: {exc}\n"
                    + traceback.format_exc()[-3000:]
                )
            finally:
                self.busy_since = None

    def writes(self) -> list[dict]:
        rng, seed = self.rng, self.torture.plan.seed
        writes = []
        for _ in range(rng.randint(1, 3)):
            name = (
                f"{self.name}-{rng.randrange(6)}"
                if rng.random() < 0.7
                else f"{self.name}-n{next(self._names)}"
            )
            writes.append(
                {
                    "name": name,
                    "label": f"{seed}:{self.name}:{rng.getrandbits(64)}",
                    "size": draw_size(rng, self.torture.plan.large_rate),
                    "mode": rng.choice(["w", "w", "a"]),
                }
            )
        return writes

    def accept(self, reply: dict, op: str) -> bool:
        """Handle an answer: acknowledge revisions, or judge the error."""
        if "ok" in reply:
            result = reply["ok"]
            model = self.torture.model
            for oid, tid, size, sha in result.get("based_on", ()):
                revision = model.get(bytes.fromhex(oid), bytes.fromhex(tid))
                if revision is not None and revision.expected != (size, sha):
                    self.torture.fail(
                        f"{self.name}: read {oid}/{tid} as {size} bytes "
                        f"{sha[:16]}, acknowledged {revision.size} bytes "
                        f"{revision.sha[:16]}"
                    )
            for problem in result.get("wrong", ()):
                self.torture.fail(f"{self.name} {op}: {problem}")
            for oid, tid, size, sha in result.get("revisions", ()):
                model.record(
                    bytes.fromhex(oid),
                    bytes.fromhex(tid),
                    Revision(size, sha, None, self.name),
                )
            self.torture.stats.outcomes[f"child {op} ok"] += 1
            return True
        error = reply["error"]
        clear = (
            "ZODB.POSException",
            "transaction.interfaces",
            "zodb_s3blobs.errors",
            "torturechild.VoteRefused",
            "__main__.VoteRefused",  # the child runs torturechild as a script
            "relstorage.adapters.interfaces",
        )
        s3_error = error.startswith("zodb_s3blobs.errors")
        if not error.startswith(clear) or (s3_error and not self.torture.faults_on):
            self.torture.fail(
                f"{self.name} {op}: {error}: {reply['message']}\n{reply['traceback']}"
            )
        self.torture.stats.outcomes[
            f"child {op} failed: {error.rsplit('.', 1)[-1]}"
        ] += 1
        return False

    def op_commit(self) -> None:
        fail = self.rng.random() < 0.1
        reply = self.call("commit", writes=self.writes(), fail_after_vote=fail)
        if self.accept(reply, "commit") and fail:
            self.torture.fail(f"{self.name}: a commit whose vote was refused succeeded")

    def sample(self, count: int) -> list:
        revisions = self.torture.model.snapshot()
        return [
            [o.hex(), t.hex(), r.size, r.sha]
            for o, t, r in self.rng.sample(revisions, min(count, len(revisions)))
        ]

    def op_read(self) -> None:
        strict = not self.torture.faults_on
        self.accept(self.call("read", revisions=self.sample(4), strict=strict), "read")

    def op_read_namespace(self) -> None:
        strict = not self.torture.faults_on
        reply = self.call("read_namespace", strict=strict)
        if "ok" in reply:
            model = self.torture.model
            for oid, tid, size, sha in reply["ok"]["read"]:
                revision = model.get(bytes.fromhex(oid), bytes.fromhex(tid))
                if revision is not None and revision.expected != (size, sha):
                    self.torture.fail(
                        f"{self.name} read_namespace: {oid}/{tid}: WRONG CONTENT "
                        f"{size} bytes, acknowledged {revision.size}"
                    )
        self.accept(reply, "read_namespace")

    def op_gc(self) -> None:
        self.accept(self.call("gc"), "gc")

    def op_evict(self) -> None:
        self.accept(self.call("evict"), "evict")

    def op_pack(self) -> None:
        with self.torture.pack_lock:
            self.accept(self.call("pack"), "pack")

    def op_pause_then_kill_or_go(self) -> None:
        """Commit and hold between vote and finish; meanwhile the parent
        collects orphans (the voting objects must survive); then SIGKILL the
        child (its objects stay orphans, its commit must not exist) or let
        it finish (acknowledged)."""
        torture = self.torture
        self.send("commit", writes=self.writes(), pause=True)
        marker = self.pause_dir / "voted"
        deadline = time.monotonic() + OP_BOUND
        reply = None
        while not marker.exists():
            with contextlib.suppress(queue.Empty):
                line = self.replies.get(timeout=0.02)
                if not line:
                    raise ChildDied(self.log_tail())
                reply = json.loads(line)
                break
            if time.monotonic() > deadline:
                raise TortureFailure(f"{self.name}: never voted")
        if reply is not None:  # the vote failed (faults) before the hold
            self.accept(reply, "commit (hold)")
            return
        voted = json.loads(marker.read_text())
        marker.unlink()
        try:
            torture.storage.collect_orphans()
        except EXPECTED_ERRORS as exc:
            torture.stats.outcomes[
                f"gc during a held vote failed: {type(exc).__name__}"
            ] += 1
        present = bucket_keys(torture.prefix) | torturezeo.staging_keys(torture.prefix)
        for key in voted:
            if key not in present:
                torture.fail(
                    f"{self.name}: {key} of a transaction between vote and finish "
                    "was deleted by the collector"
                )
        if self.rng.random() < 0.6:
            self.kill()
            torture.killed_keys.update(voted)
            refs = [torture.layout.parse(k) for k in voted]
            for ref in held_revisions(torture.storage, [r for r in refs if r]):
                torture.fail(
                    f"{self.name}: killed between vote and finish, yet the base "
                    f"holds {ref[0].hex()}/{ref[1].hex()}"
                )
            torture.stats.outcomes["child killed between vote and finish"] += 1
            self.restart_after_kill()
            return
        (self.pause_dir / "go").touch()
        reply = self.receive()
        if self.accept(reply, "commit (held)"):
            committed = {
                torture.layout.key(bytes.fromhex(o), bytes.fromhex(t))
                for o, t, _s, _h in reply["ok"]["revisions"]
            }
            # A ZEO client learns its revisions' keys after the vote only.
            revision_keys = {k for k in voted if torture.layout.parse(k)}
            if torture.plan.base != "zeo" and committed != revision_keys:
                torture.fail(
                    f"{self.name}: committed {sorted(committed)} but voted {voted}"
                )

    def op_kill_at_random(self) -> None:
        """Start a commit or a read and SIGKILL the child a moment later."""
        if self.rng.random() < 0.7:
            self.send("commit", writes=self.writes())
        else:
            self.send("read", revisions=self.sample(4), strict=False)
        time.sleep(self.rng.uniform(0, 0.6))
        self.kill()
        self.torture.stats.outcomes["child killed at random"] += 1
        self.restart_after_kill()

    def op_kill_before_copy(self) -> None:
        """(ZEO client) Hold every copy, commit, and SIGKILL the child once
        the server has committed: the child's journal, in the children's
        cache directory, owes the copies of acknowledged revisions that S3
        has only under staging keys. The parent reads them meanwhile (a
        fresh 404 must be waited out, not reported as a missing blob), and
        the restarted child adopts the journal and makes the copies."""
        torture = self.torture
        with torture.faults.copies_held():
            reply = self.call("commit", writes=self.writes())
            if not self.accept(reply, "commit (copies held)"):
                return
            self.kill()
            revisions = reply["ok"]["revisions"]
            reader = threading.Thread(target=self.read_owed, args=(revisions,))
            reader.start()
        torture.stats.outcomes["child killed before its copies"] += 1
        try:
            self.restart_after_kill()
        finally:
            reader.join()

    def read_owed(self, revisions: list) -> None:
        """Read revisions [oid, tid, size, sha256] whose copies are owed."""
        torture = self.torture
        for oid, tid, size, sha in revisions:
            problem = check_read(
                torture.storage,
                bytes.fromhex(oid),
                bytes.fromhex(tid),
                (size, sha),
                not torture.faults_on,
            )
            if problem:
                torture.fail(f"{self.name} killed before its copies: {problem}")
        torture.stats.outcomes["reads of revisions whose copies were owed"] += 1

    def restart_after_kill(self) -> None:
        self.torture.stats.restarts += 1
        self.start()

    def read_all(self, revisions, held) -> None:
        """With faults off, this process reads every held revision."""
        refs = [
            [o.hex(), t.hex(), r.size, r.sha] for o, t, r in revisions if (o, t) in held
        ]
        self.busy_with, self.busy_since = "final read", time.monotonic()
        try:
            self.accept(self.call("read", revisions=refs, strict=True), "final read")
        finally:
            self.busy_since = None


# -- entry points ---------------------------------------------------------------


def run_seed(
    seed: int, directory: Path, verbose: bool = False, base: str | None = None
) -> Stats:
    """Run one seed (on *base*, default :func:`default_base`) in *directory*
    (the session's S3 server must be running: the pytest fixture, or
    :func:`main`)."""
    plan = make_plan(seed, base)
    directory.mkdir(parents=True, exist_ok=True)
    return Torture(plan, directory, verbose).run()


@contextlib.contextmanager
def s3_server() -> Iterator[None]:
    """The S3 server a command-line run needs (pytest has its own)."""
    from zodb_s3blobs.cli.localserver import local_s3_server

    with local_s3_server() as server:
        s3env.start(server)
        yield


def main(argv: list[str] | None = None) -> int:
    """Command line: replay seeds, or soak (new seeds until time is up)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, action="append", help="run this seed")
    parser.add_argument(
        "--soak", type=float, metavar="MINUTES", help="run new seeds for MINUTES"
    )
    parser.add_argument(
        "--first-seed", type=int, default=None, help="the soak's first seed"
    )
    parser.add_argument(
        "--base",
        choices=BASES,
        help="run every seed on this base (default: the seed's, see ZEO_SEEDS)",
    )
    parser.add_argument("--keep", action="store_true", help="keep the directories")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    if not args.seed and args.soak is None:
        parser.error("give --seed N (repeatable) or --soak MINUTES")
    logging.basicConfig(level=logging.WARNING if args.verbose else logging.CRITICAL)
    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    faulthandler.enable()
    total, survived, failed = Stats(), 0, []
    started = time.monotonic()
    with s3_server():
        if args.seed:
            seeds: Iterator[int] = iter(args.seed)
        else:
            first = args.first_seed
            if first is None:
                first = random.SystemRandom().randrange(10_000, 1 << 31)
            seeds = itertools.count(first)
            deadline = started + args.soak * 60
        for seed in seeds:
            if args.soak is not None and not args.seed and time.monotonic() > deadline:
                break
            directory = Path(tempfile.mkdtemp(prefix=f"torture{seed}-"))
            seed_started = time.monotonic()
            plan = make_plan(seed, args.base)
            print(plan.describe(), flush=True)
            try:
                stats = run_seed(seed, directory, args.verbose, args.base)
            except TortureFailure as exc:
                failed.append(plan)
                print(f"FAILED {exc}\n", flush=True)
                continue
            except Exception:
                failed.append(plan)
                print(
                    f"FAILED seed {seed} with an error of the test itself:\n"
                    f"{traceback.format_exc()}replay: {replay_command(plan)}\n",
                    flush=True,
                )
                continue
            finally:
                if not args.keep:
                    shutil.rmtree(directory, ignore_errors=True)
            total.add(stats)
            survived += 1
            print(
                f"  ok in {time.monotonic() - seed_started:.1f}s: {stats.summary()}",
                flush=True,
            )
    elapsed = time.monotonic() - started
    print(
        f"\n=== {survived} seeds survived, {len(failed)} failed "
        f"({', '.join(str(p.seed) for p in failed) or 'none'}) in "
        f"{elapsed / 60:.1f} min\n"
        f"=== operations: {sum(total.operations.values())}\n"
        f"=== faults injected: {sum(total.faults.values())} "
        f"({_fmt(total.faults)})\n"
        f"=== kills: {total.kills}; restarts: {total.restarts}\n"
        f"=== {total.summary()}"
    )
    for plan in failed:
        print(f"replay: {replay_command(plan)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
