"""A ZODB database in another OS process, as a Zope instance has one.

The test side starts ``python dbprocess.py CONFIG`` with :class:`DatabaseProcess`
and sends it one JSON request a line; the process opens the storage from the
ZConfig text in CONFIG (``<s3blobstorage>`` around its base), keeps one
connection open like a Zope worker thread, and answers each request with one
JSON line. Every request begins a new transaction first, which is when ZODB
sees other processes' commits. Blob contents travel as hex.
"""

from __future__ import annotations

import json
import os
import queue
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path

#: How long one request may take before the test fails.
TIMEOUT = 120


class WorkerError(AssertionError):
    """The process answered a request with an error, or died."""


class DatabaseProcess:
    """One database process; use as a context manager to stop it."""

    def __init__(self, config: str, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.config_path = directory / "storage.conf"
        self.config_path.write_text(config)
        self._log_path = directory / "process.log"
        with open(self._log_path, "w") as log:
            self.process = subprocess.Popen(
                [sys.executable, __file__, str(self.config_path)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=log,
                text=True,
            )
        self._replies: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._read_replies, daemon=True).start()

    def _read_replies(self) -> None:
        """Queue the process's answer lines; an empty one when it exits."""
        for line in self.process.stdout:
            self._replies.put(line)
        self._replies.put("")

    def send(self, op: str, **args) -> None:
        """Send a request without waiting for its answer."""
        self.process.stdin.write(json.dumps({"op": op, **args}) + "\n")
        self.process.stdin.flush()

    def receive(self) -> dict:
        """The answer to the oldest request not yet answered."""
        try:
            line = self._replies.get(timeout=TIMEOUT)
        except queue.Empty:
            raise WorkerError(f"no answer in {TIMEOUT}s\n{self.log()}") from None
        if not line:
            raise WorkerError(f"the process exited\n{self.log()}")
        reply = json.loads(line)
        if "error" in reply:
            raise WorkerError(reply["error"])
        return reply

    def call(self, op: str, **args) -> dict:
        """Send a request and return its answer."""
        self.send(op, **args)
        return self.receive()

    def log(self) -> str:
        """The end of what the process wrote to stderr."""
        return self._log_path.read_text()[-5000:]

    def __enter__(self) -> DatabaseProcess:
        return self

    def __exit__(self, *exc_info) -> None:
        try:
            if self.process.poll() is None:
                self.send("quit")
                self.process.wait(timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            self.process.kill()
            self.process.wait()


# -- the process side -------------------------------------------------------


class _HoldAfterVote:
    """A data manager that votes after the storage (it sorts last) and then
    waits for a ``go`` line: the transaction stays between vote and finish,
    its blobs uploaded, until the test lets it finish."""

    def __init__(self, connection, answer) -> None:
        self._connection = connection
        self._answer = answer

    def sortKey(self) -> str:
        """Sort after every storage, so that they vote first."""
        return "\uffff hold after vote"

    def tpc_vote(self, transaction) -> None:
        """Report the keys uploaded at vote, then wait for ``go``."""
        storage = self._connection._storage
        self._answer({"voted": list(storage._commit.attempted_keys)})
        request = json.loads(sys.stdin.readline())
        assert request["op"] == "go", request

    def abort(self, transaction) -> None:
        """Nothing to do: this data manager holds no data."""

    tpc_begin = commit = tpc_finish = tpc_abort = abort


class _Requests:
    """The requests a database process answers."""

    def __init__(self, config_path: str, answer) -> None:
        import transaction
        import ZODB
        import ZODB.config

        with open(config_path) as f:
            self.db = ZODB.DB(ZODB.config.storageFromFile(f))
        self.tm = transaction.TransactionManager()
        self.connection = self.db.open(self.tm)
        self._answer = answer

    def _root(self):
        """Begin a new transaction (seeing other processes' commits)."""
        self.tm.begin()
        return self.connection.root()

    def _committed(self, name: str) -> dict:
        """Commit; return the blob's oid and new tid, and the time after."""
        self.tm.commit()
        blob = self._root()[name]
        blob._p_activate()
        self.tm.abort()
        return {
            "oid": blob._p_oid.hex(),
            "tid": blob._p_serial.hex(),
            "time": time.time(),
        }

    def write(self, name: str, data: str, hold: bool = False) -> dict:
        """Create or overwrite the blob root[name]."""
        from ZODB.blob import Blob

        root = self._root()
        if name not in root:
            root[name] = Blob()
        with root[name].open("w") as f:
            f.write(bytes.fromhex(data))
        if hold:
            self.tm.get().join(_HoldAfterVote(self.connection, self._answer))
        return self._committed(name)

    def read(self, name: str) -> dict:
        """The content, oid and tid of the blob root[name]."""
        blob = self._root()[name]
        with blob.open("r") as f:
            data = f.read()
        self.tm.abort()
        return {
            "data": data.hex(),
            "oid": blob._p_oid.hex(),
            "tid": blob._p_serial.hex(),
        }

    def revision(self, name: str) -> dict:
        """The tid of root[name] as a new transaction sees it (None while
        this process has not seen the name), without opening the blob."""
        blob = self._root().get(name)
        tid = None
        if blob is not None:
            blob._p_activate()
            tid = blob._p_serial.hex()
        self.tm.abort()
        return {"tid": tid}

    def delete(self, name: str) -> dict:
        """Remove root[name] from the root."""
        del self._root()[name]
        self.tm.commit()
        return {"time": time.time()}

    def undo_last(self) -> dict:
        """Undo the most recent transaction."""
        self.tm.begin()
        (last,) = self.db.undoLog(0, 1)
        self.db.undo(last["id"], self.tm.get())
        self.tm.commit()
        return {}

    def pack(self, time: float | None = None) -> dict:
        """Pack the database (to *time*, or now)."""
        self.db.pack(time)
        return {}

    def collect(self) -> dict:
        """Collect orphans without a pack; what the collector saw and did."""
        report = self.db.storage.collect_orphans()
        return {
            "in_flight": report.in_flight,
            "kept": report.kept,
            "orphans": report.orphans,
            "deleted": report.deleted,
        }


def serve(config_path: str) -> None:
    """Answer requests from stdin until ``quit`` or end of input."""
    replies = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # whatever a library prints must not corrupt the answers

    def answer(reply: dict) -> None:
        replies.write(json.dumps(reply) + "\n")
        replies.flush()

    requests = _Requests(config_path, answer)
    for line in sys.stdin:
        request = json.loads(line)
        op = request.pop("op")
        if op == "quit":
            break
        try:
            answer(getattr(requests, op)(**request))
        except Exception:
            requests.tm.abort()
            answer({"error": traceback.format_exc()})
    requests.db.close()


if __name__ == "__main__":
    serve(sys.argv[1])
