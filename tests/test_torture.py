"""The torture test's CI part: a fixed set of seeds (tests/torture.py).

Each seed is a randomized schedule of commits, reads in every open mode,
savepoints, undo, pack, orphan collection, eviction, restarts, aborts and
refused votes, by several threads (and, on RelStorage and ZEO, several
processes that get killed), against an S3 server injecting faults; a model
of what was acknowledged is checked throughout. ``seed % 4`` picks the
base: FileStorage, MappingStorage (clock behind), DemoStorage (clock
behind), RelStorage on SQLite with child processes; seeds 1000-1999 run on
a ZEO client (runzeo keeping records only) with child processes. Some plans
add slow downloads while another process evicts the cache, and (on
FileStorage) a legacy site read through the fallback whose cached copies get
damaged.

Replay one: ``.venv/bin/python tests/torture.py --seed N`` or
``pytest tests/test_torture.py -k seedN``; other seeds:
``TORTURE_SEEDS=1234,5678 pytest tests/test_torture.py``.
"""

from __future__ import annotations

import os

import pytest

import torture

#: Chosen to cover every base and composition (seed 4: slow downloads, an
#: evicting process and a legacy site; seed 9: slow downloads and an evicting
#: process on MappingStorage; seed 1000: ZEO clients on a FileStorage server,
#: children killed while their copies are held, about 40 s); their plans are
#: printed by ``describe()``.
CI_SEEDS = (0, 1, 2, 4, 5, 6, 8, 9, 31, 1000)


def _seeds() -> tuple[int, ...]:
    chosen = os.environ.get("TORTURE_SEEDS", "")
    return tuple(int(s) for s in chosen.split(",") if s.strip()) or CI_SEEDS


@pytest.mark.parametrize("seed", _seeds(), ids=[f"seed{s}" for s in _seeds()])
def test_nothing_acknowledged_is_lost_or_corrupted(seed, tmp_path):
    print(torture.make_plan(seed).describe())
    stats = torture.run_seed(seed, tmp_path / "run")
    print(stats.summary())


def test_the_ci_seeds_cover_every_base():
    bases = {torture.make_plan(seed).base for seed in CI_SEEDS}
    assert bases == set(torture.BASES)


def test_the_ci_seeds_cover_every_composition():
    plans = [torture.make_plan(seed) for seed in CI_SEEDS]
    assert any(p.evictor and p.faults.slow_downloads for p in plans)
    assert any(p.legacy for p in plans)
