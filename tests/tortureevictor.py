"""A second OS process that evicts the torture test's cache directory in a
loop (tests/torture.py), and the parent's handle on it.

The storage under test and this process share the cache directory as the
processes of a site do. This process judges every file by what it finds on
disk (its times), never by the storage's index (it opens the cache anew for
each pass, as ``zodb-s3blobs cache prune`` does): a file that enters the cache
looking old (a download slower than the cache's minimum age) is evictable
here the instant it is installed, while the storage hands its path to ZODB.

``python tortureevictor.py STATE_DIR CACHE_SIZE MIN_AGE SEED``: the path of the
cache directory to evict is read from ``STATE_DIR/cache`` before each pass
(the parent replaces it when it restarts on an empty cache); the process
stops when ``STATE_DIR/stop`` exists and prints one JSON line of what it did.
It imports no test server code, so it starts fast.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

#: The longest pause between two passes (seconds): short, so that a file
#: looking old is found within a few milliseconds of its install.
PAUSE = 0.01
#: How long the parent waits for the process to stop before killing it.
STOP_TIMEOUT = 60.0


def evict_loop(state_dir: Path, cache_size: int, min_age: float, seed: int) -> dict:
    """Evict the current cache directory until told to stop, each pass with a
    cache opened anew, as ``zodb-s3blobs cache prune`` does (so it learns the
    directory from disk, not from loads of its own): to the cache's own target
    (90% of *cache_size*, once above it), to half of it, or (every other
    pass) to nothing, every file not used within *min_age*."""
    from zodb_s3blobs.cache import BlobCache

    rng = random.Random(f"evictor:{seed}")
    targets = (None, cache_size // 2, 0, 0)
    passes = freed = 0
    directories = set()
    while not (state_dir / "stop").exists():
        directory = (state_dir / "cache").read_text()
        directories.add(directory)
        cache = BlobCache(directory, cache_size, min_age)
        try:
            freed += cache.evict(rng.choice(targets))
        finally:
            cache.close()
        passes += 1
        time.sleep(rng.uniform(0, PAUSE))
    return {"passes": passes, "freed": freed, "directories": len(directories)}


class Evictor:
    """The parent's handle: start the process on a cache directory, move it
    to another, learn whether it died, stop it and wait for it."""

    def __init__(self, home: Path, cache_size: int, min_age: float, seed: int) -> None:
        self.home = home
        self.home.mkdir()
        self.args = [str(cache_size), str(min_age), str(seed)]
        self.log_path = home / "stderr.log"
        self.process: subprocess.Popen | None = None

    def start(self, cache_dir: str) -> None:
        self.follow(cache_dir)
        with open(self.log_path, "w") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-X", "faulthandler", __file__, str(self.home)]
                + self.args,
                stdout=subprocess.PIPE,
                stderr=log,
                text=True,
            )

    def follow(self, cache_dir: str) -> None:
        """Evict *cache_dir* from the next pass on."""
        temp = self.home / "cache.tmp"
        temp.write_text(cache_dir)
        os.replace(temp, self.home / "cache")

    def died(self) -> str | None:
        """Why the process is no longer running (its exit and log), or None."""
        if self.process is None or self.process.poll() is None:
            return None
        return f"exited with {self.process.returncode}:\n{self.log_tail()}"

    def stop(self) -> dict:
        """Stop the process and wait for it; its report. Raises RuntimeError
        if it had died or fails to stop cleanly."""
        died = self.died()
        (self.home / "stop").touch()
        try:
            out, _err = self.process.communicate(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise RuntimeError(
                f"the evicting process did not stop in {STOP_TIMEOUT:.0f}s"
            ) from None
        if died or self.process.returncode != 0:
            raise RuntimeError(f"the evicting process {died or self.died()}")
        return json.loads(out)

    def kill(self) -> None:
        """Stop it at once, whatever state it is in (the run is over)."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def log_tail(self) -> str:
        with contextlib.suppress(OSError):
            return self.log_path.read_text()[-4000:]
        return ""


if __name__ == "__main__":
    state, size, age, seed = sys.argv[1:]
    report = evict_loop(Path(state), int(size), float(age), int(seed))
    print(json.dumps(report), flush=True)
