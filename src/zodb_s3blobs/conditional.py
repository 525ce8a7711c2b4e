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
from collections.abc import Iterable, Iterator

from .keys import KeyLayout

log = logging.getLogger(__name__)

#: The writes that can carry the condition, as botocore names them.
OPERATIONS = ("PutObject", "CopyObject", "CompleteMultipartUpload")
_PRECONDITION_FAILED = 412
#: Seconds between two probes while they fail.
PROBE_INTERVAL = 60.0

#: Probe results by (endpoint, bucket): a provider's behaviour does not
#: change while a process runs, and every storage opened would probe again.
_probed: dict[tuple[str | None, str], frozenset[str]] = {}
_probed_lock = threading.Lock()


def refused_as_existing(exc: BaseException) -> bool:
    """Did S3 refuse this write because its key exists (412)?"""
    response = getattr(exc, "response", None) or {}
    status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    code = response.get("Error", {}).get("Code")
    return status == _PRECONDITION_FAILED or code == "PreconditionFailed"


class WriteGuard:
    """Adds ``If-None-Match: *`` to *client*'s writes under *layout*'s
    ``blobs/`` folder, as *mode* (auto, true, false) says."""

    def __init__(self, client, bucket: str, layout: KeyLayout, mode: str) -> None:
        self._client = client
        self._bucket = bucket
        self._layout = layout
        self._mode = mode
        self._lock = threading.Lock()
        self._operations: frozenset[str] | None = (
            frozenset(OPERATIONS)
            if mode == "true"
            else frozenset()
            if mode == "false"
            else None
        )
        self._replacing: set[str] = set()
        self._probed_at = -PROBE_INTERVAL
        for operation in OPERATIONS:
            client.meta.events.register(
                f"before-parameter-build.s3.{operation}", self._add_condition
            )

    def operations(self) -> frozenset[str] | None:
        """The writes that carry the condition; None while the probe has not
        been able to run (S3 unreachable so far). A failed probe is tried
        again at most every :data:`PROBE_INTERVAL` seconds, so that writes to
        an S3 in trouble do not each pay for one."""
        if self._operations is None:
            with self._lock:
                if (
                    self._operations is None
                    and time.monotonic() - self._probed_at > PROBE_INTERVAL
                ):
                    self._operations = self._probe()
                    self._probed_at = time.monotonic()
        return self._operations

    def describe(self) -> str:
        """The mode in force, for the log and ``check``."""
        operations = self.operations()
        if operations is None:
            return f"{self._mode} (not yet probed: S3 did not answer)"
        if not operations:
            return f"{self._mode}: off" + (
                " (the provider enforces none)" if self._mode == "auto" else ""
            )
        kinds = ", ".join(op for op in OPERATIONS if op in operations)
        missing = [op for op in OPERATIONS if op not in operations]
        return f"{self._mode}: on for {kinds}" + (
            f" (not enforced by the provider for {', '.join(missing)})"
            if missing
            else ""
        )

    @contextlib.contextmanager
    def replacing(self, keys: Iterable[str]) -> Iterator[None]:
        """Let writes to *keys* replace what they hold, within the block."""
        keys = set(keys)
        with self._lock:
            self._replacing |= keys
        try:
            yield
        finally:
            with self._lock:
                self._replacing -= keys

    def _add_condition(self, params: dict, model, **_kw) -> None:
        key = params.get("Key", "")
        if not key.startswith(self._layout.root) or "IfNoneMatch" in params:
            return
        with self._lock:
            if key in self._replacing:
                return
        operations = self.operations()
        if operations and model.name in operations:
            params["IfNoneMatch"] = "*"

    # -- the probe ------------------------------------------------------------

    def _probe(self) -> frozenset[str] | None:
        """Which writes the provider refuses over an existing key, tried on
        throwaway keys of the staging form (the collector removes any left);
        None if S3 could not be asked."""
        endpoint = self._client.meta.endpoint_url
        with _probed_lock:
            known = _probed.get((endpoint, self._bucket))
        if known is not None:
            return known
        client, bucket = self._client, self._bucket
        first, second = self._layout.staging_key(), self._layout.staging_key()
        enforced = set()
        try:
            client.put_object(Bucket=bucket, Key=first, Body=b"probe")
            writes = {
                "PutObject": lambda: client.put_object(
                    Bucket=bucket, Key=first, Body=b"again", IfNoneMatch="*"
                ),
                "CopyObject": lambda: client.copy_object(
                    Bucket=bucket,
                    Key=first,
                    CopySource={"Bucket": bucket, "Key": second},
                    IfNoneMatch="*",
                ),
                "CompleteMultipartUpload": lambda: self._complete_over(first),
            }
            client.put_object(Bucket=bucket, Key=second, Body=b"source")
            for operation, write in writes.items():
                if self._refused(write):
                    enforced.add(operation)
        except Exception as exc:  # botocore's errors: S3 not reachable yet
            log.warning("Could not probe S3 for conditional writes: %s", exc)
            return None
        finally:
            with contextlib.suppress(Exception):
                client.delete_objects(
                    Bucket=bucket,
                    Delete={"Objects": [{"Key": first}, {"Key": second}]},
                )
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
    def _refused(write) -> bool:
        """Whether *write*, over an existing key, was refused as existing. Any
        other refusal (400/501: the header is not supported) means it is not
        enforced; a transient failure is raised, so the probe is tried again."""
        try:
            write()
        except Exception as exc:
            if refused_as_existing(exc):
                return True
            status = (
                (getattr(exc, "response", None) or {})
                .get("ResponseMetadata", {})
                .get("HTTPStatusCode")
            )
            if status is None or status >= 500:
                raise
            return False
        return False

    def _complete_over(self, key: str) -> None:
        """A one-part multipart upload completed over existing *key*."""
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
                IfNoneMatch="*",
            )
        finally:
            with contextlib.suppress(Exception):  # gone once completed
                client.abort_multipart_upload(Bucket=bucket, Key=key, UploadId=upload)
