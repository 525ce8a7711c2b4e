"""Conditional writes: ``If-None-Match: *`` on every write to a revision's key.

An upload the client gave up on (a timeout, a reset) may still be carried out
by S3 later, after the abort that followed has deleted its key; on a base that
gives the next transaction the aborted one's tid (MappingStorage, RelStorage
with a clock behind), it would then replace that commit's object. With the
condition, S3 refuses to write a key that exists (412): a late write fails
instead of overwriting, and a commit whose key was taken first fails its vote
naming the key.

The header is added by a botocore hook on the writing client, for PutObject,
CopyObject and CompleteMultipartUpload requests whose key lies under the
storage's ``blobs/`` folder (s3transfer does not pass ``IfNoneMatch`` through
its own arguments), except for keys a caller means to replace (a restore
recording the CRC32 of an object 1.x wrote). Providers differ: with
``s3-conditional-writes auto`` each kind of write is probed once per process
and endpoint, under ``staging/``, and the condition is sent only where it is
enforced (moto, for one, enforces it on PUT and multipart completion but not
on copies).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections import Counter
from collections.abc import Iterable, Iterator

from .keys import KeyLayout

log = logging.getLogger(__name__)

#: The writes that can carry the condition, as botocore names them.
OPERATIONS = ("PutObject", "CopyObject", "CompleteMultipartUpload")
_PRECONDITION_FAILED = 412
#: Answers saying a provider does not support the header on a write.
_UNSUPPORTED = (400, 501)
#: Seconds between two probes while they fail.
PROBE_INTERVAL = 60.0

#: Probe results by (endpoint, bucket): a provider's behaviour does not
#: change while a process runs, and every storage opened would probe again.
_probed: dict[tuple[str | None, str], frozenset[str]] = {}
_probed_lock = threading.Lock()


def _status(exc: BaseException) -> int | None:
    response = getattr(exc, "response", None) or {}
    return response.get("ResponseMetadata", {}).get("HTTPStatusCode")


def _code(exc: BaseException) -> str | None:
    response = getattr(exc, "response", None) or {}
    return response.get("Error", {}).get("Code")


def refused_as_existing(exc: BaseException) -> bool:
    """Did S3 refuse this write because its key exists (412)?"""
    return _status(exc) == _PRECONDITION_FAILED or _code(exc) == "PreconditionFailed"


def conflicted(exc: BaseException) -> bool:
    """Did S3 refuse this conditional write because another write of the same
    key was in progress (AWS's 409 ConditionalRequestConflict, e.g. a retry
    meeting its own first attempt)?"""
    return _code(exc) == "ConditionalRequestConflict"


class WriteGuard:
    """Adds ``If-None-Match: *`` to *client*'s writes under *layout*'s
    ``blobs/`` folder, as *mode* (auto, true, false) says."""

    def __init__(self, client, bucket: str, layout: KeyLayout, mode: str) -> None:
        self._client = client
        self._bucket = bucket
        self._layout = layout
        self._mode = mode
        self._lock = threading.Lock()
        # What this botocore can send at all (older releases lack the
        # parameter on CopyObject: sending it would fail every copy).
        self._sendable = frozenset(
            operation
            for operation in OPERATIONS
            if "IfNoneMatch"
            in client.meta.service_model.operation_model(operation).input_shape.members
        )
        self._operations: frozenset[str] | None = (
            self._sendable
            if mode == "true"
            else frozenset()
            if mode == "false"
            else None
        )
        #: Why the probe has not decided yet, for describe().
        self._undecided = "not yet probed"
        self._probing = False
        self._replacing: Counter[str] = Counter()
        self._probed_at = -PROBE_INTERVAL
        for operation in OPERATIONS:
            client.meta.events.register(
                f"before-parameter-build.s3.{operation}", self._add_condition
            )

    def operations(self) -> frozenset[str] | None:
        """The writes that carry the condition; None while the probe has not
        decided (S3 did not answer so far). An undecided probe is tried again
        at most every :data:`PROBE_INTERVAL` seconds, by one caller, without
        a lock held: other writes meanwhile go without the condition rather
        than wait for it."""
        with self._lock:
            if (
                self._operations is not None
                or self._probing
                or time.monotonic() - self._probed_at < PROBE_INTERVAL
            ):
                return self._operations
            self._probing = True
        try:
            found = self._probe()
        finally:
            with self._lock:
                self._probing = False
                self._probed_at = time.monotonic()
                if found is not None:
                    self._operations = found
        return found

    def describe(self) -> str:
        """The mode in force, for the log and ``check``."""
        operations = self.operations()
        if operations is None:
            return f"{self._mode}: {self._undecided}"
        unsendable = [op for op in OPERATIONS if op not in self._sendable]
        if not operations:
            why = ""
            if self._mode == "auto":
                why = " (the provider enforces it on no write)"
            return f"{self._mode}: off{why}"
        kinds = ", ".join(op for op in OPERATIONS if op in operations)
        missing = [
            op for op in OPERATIONS if op not in operations and op not in unsendable
        ]
        notes = []
        if missing:
            notes.append(f"not enforced by the provider for {', '.join(missing)}")
        if unsendable:
            notes.append(f"this botocore cannot send it on {', '.join(unsendable)}")
        return f"{self._mode}: on for {kinds}" + (
            f" ({'; '.join(notes)})" if notes else ""
        )

    @contextlib.contextmanager
    def replacing(self, keys: Iterable[str]) -> Iterator[None]:
        """Let writes to *keys* replace what they hold, within the block."""
        keys = list(keys)
        with self._lock:
            self._replacing.update(keys)
        try:
            yield
        finally:
            with self._lock:
                self._replacing.subtract(keys)
                self._replacing += Counter()  # drops the keys at zero

    def _add_condition(self, params: dict, model, **_kw) -> None:
        key = params.get("Key", "")
        if not key.startswith(self._layout.root) or "IfNoneMatch" in params:
            return
        with self._lock:
            if self._replacing[key] > 0:
                return
        operations = self.operations()
        if operations and model.name in operations:
            params["IfNoneMatch"] = "*"

    # -- the probe ------------------------------------------------------------

    def _probe(self) -> frozenset[str] | None:
        """Which writes the provider accepts on a free key and refuses over an
        existing one, tried on throwaway keys of the staging form (the
        collector removes any left); None if S3 could not be asked."""
        endpoint = self._client.meta.endpoint_url
        with _probed_lock:
            known = _probed.get((endpoint, self._bucket))
        if known is not None:
            return known
        client, bucket = self._client, self._bucket
        source = self._layout.staging_key()
        condition = {"IfNoneMatch": "*"}
        probes = {
            "PutObject": lambda key: client.put_object(
                Bucket=bucket, Key=key, Body=b"probe", **condition
            ),
            "CopyObject": lambda key: client.copy_object(
                Bucket=bucket,
                Key=key,
                CopySource={"Bucket": bucket, "Key": source},
                **condition,
            ),
            "CompleteMultipartUpload": lambda key: self._complete(key, condition),
        }
        enforced = set()
        try:
            client.put_object(Bucket=bucket, Key=source, Body=b"source")
            for operation, write in probes.items():
                if operation not in self._sendable:
                    continue
                key = self._layout.staging_key()
                # Accepted on a free key, then refused over it: enforced.
                if self._outcome(write, key) and not self._outcome(write, key):
                    enforced.add(operation)
                with contextlib.suppress(Exception):
                    client.delete_object(Bucket=bucket, Key=key)
        except Exception as exc:  # botocore's errors: S3 not reachable (yet)
            self._undecided = f"not yet probed ({exc})"
            log.warning("Could not probe S3 for conditional writes: %s", exc)
            return None
        finally:
            with contextlib.suppress(Exception):
                client.delete_object(Bucket=bucket, Key=source)
        result = frozenset(enforced)
        with _probed_lock:
            _probed[(endpoint, bucket)] = result
        log.info(
            "s3-conditional-writes auto: the provider at %s enforces "
            "If-None-Match on %s",
            endpoint,
            ", ".join(sorted(result)) or "no write",
        )
        return result

    @staticmethod
    def _outcome(write, key: str) -> bool:
        """Whether *write* to *key* succeeded (True) or was refused (False):
        412, or an answer saying the header is not supported (400, 501).
        Anything else (no answer, 403, throttling) is raised, so that the
        probe is tried again later."""
        try:
            write(key)
        except Exception as exc:
            if refused_as_existing(exc) or _status(exc) in _UNSUPPORTED:
                return False
            raise
        return True

    def _complete(self, key: str, condition: dict) -> None:
        """A one-part multipart upload of *key*, completed with *condition*;
        aborted if it does not complete."""
        client, bucket = self._client, self._bucket
        upload = client.create_multipart_upload(Bucket=bucket, Key=key)["UploadId"]
        try:
            part = client.upload_part(
                Bucket=bucket, Key=key, UploadId=upload, PartNumber=1, Body=b"part"
            )
            client.complete_multipart_upload(
                Bucket=bucket,
                Key=key,
                UploadId=upload,
                MultipartUpload={"Parts": [{"ETag": part["ETag"], "PartNumber": 1}]},
                **condition,
            )
        finally:
            with contextlib.suppress(Exception):  # gone once completed
                client.abort_multipart_upload(Bucket=bucket, Key=key, UploadId=upload)
