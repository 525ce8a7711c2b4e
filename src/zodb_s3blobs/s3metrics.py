"""S3 request figures from botocore's own events, so that the code sending the
requests stays as it is: :func:`instrument` registers hooks on boto3 clients
that time each call, name its operation, and count the attempts botocore
retried and the calls that failed, by cause, into a
:class:`~zodb_s3blobs.metrics.Metrics`.

The hooks read the events and send nothing. Per call: ``before-call`` notes
the start and the operation; ``needs-retry`` (after every attempt) notes the
attempt's failure, if any; ``after-call`` (an answer, error or not) or
``after-call-error`` (no answer) counts the call, its duration, the failed
attempts botocore tried again and the final failure. The state travels in the
call's own context dict, so concurrent calls never mix.
"""

from __future__ import annotations

import time

from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    ConnectTimeoutError,
    ReadTimeoutError,
)

from .errors import ObjectStoreError
from .metrics import Metrics

#: botocore operation -> the operation label (GetObject: see _operation).
_OPERATIONS = {
    "PutObject": "put",
    "CreateMultipartUpload": "multipart",
    "UploadPart": "multipart",
    "CompleteMultipartUpload": "multipart",
    "AbortMultipartUpload": "multipart",
    "CopyObject": "copy",
    "UploadPartCopy": "copy",
    "DeleteObjects": "delete",
    "DeleteObject": "delete",
    "ListObjectsV2": "list",
    "ListObjects": "list",
    "HeadObject": "head",
    "HeadBucket": "head",
}
_THROTTLING = {"SlowDown", "Throttling", "ThrottlingException", "RequestLimitExceeded"}
_NOT_FOUND = {"NoSuchKey", "NotFound", "NoSuchBucket", "NoSuchUpload"}
#: Keys of this module in a call's context dict.
_STARTED, _OPERATION, _FAILED = (
    "zodb_s3blobs.started",
    "zodb_s3blobs.operation",
    "zodb_s3blobs.failed",
)


def instrument(metrics: Metrics, *clients) -> None:
    """Count every S3 call of *clients* (boto3 S3 clients) into *metrics*."""
    hooks = _Hooks(metrics)
    for client in clients:
        events = client.meta.events
        events.register("before-call.s3", hooks.before_call)
        events.register("needs-retry.s3", hooks.attempted)
        events.register("after-call.s3", hooks.answered)
        events.register("after-call-error.s3", hooks.unanswered)


def answer_cause(status: int, code: str | None) -> str | None:
    """The cause of an HTTP answer's failure (:data:`~.metrics.CAUSES`), or
    None if it is a success."""
    if status == 404 or code in _NOT_FOUND:
        return "not_found"
    if status == 429 or code in _THROTTLING:
        return "throttled"
    if status >= 500:
        return "5xx"
    if status >= 300 or code:
        return "other"
    return None


def failure_cause(exc: BaseException | None) -> str:
    """The cause of a failed request from what it raised: a botocore
    exception, or an ObjectStoreError (by the botocore exception behind it;
    none behind it is a body that broke off)."""
    if isinstance(exc, ObjectStoreError):
        return failure_cause(exc.__cause__) if exc.__cause__ else "connection"
    if isinstance(exc, ClientError):
        response = exc.response
        status = response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        return answer_cause(status, response.get("Error", {}).get("Code")) or "other"
    if isinstance(exc, (ReadTimeoutError, ConnectTimeoutError, TimeoutError)):
        return "timeout"
    if isinstance(exc, (BotoCoreError, ConnectionError)):
        return "connection"
    return "other"


class _Hooks:
    """The event handlers of :func:`instrument`, counting into one Metrics."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def before_call(self, model, params, context, **_kw) -> None:
        context[_STARTED] = time.monotonic()
        context[_OPERATION] = _operation(model.name, params.get("headers") or {})
        context[_FAILED] = []

    def attempted(self, response, caught_exception, request_dict, **_kw) -> None:
        """After each attempt: note its failure (None for a success). Returns
        None, so botocore's own handler decides whether to retry."""
        context = request_dict.get("context", {})
        if _FAILED not in context:
            return
        if caught_exception is not None:
            cause = failure_cause(caught_exception)
        else:
            http, parsed = response
            cause = answer_cause(http.status_code, parsed.get("Error", {}).get("Code"))
        context[_FAILED].append(cause)

    def answered(self, http_response, parsed, context, **_kw) -> None:
        code = parsed.get("Error", {}).get("Code")
        self._done(context, answer_cause(http_response.status_code, code))

    def unanswered(self, exception, context, **_kw) -> None:
        self._done(context, failure_cause(exception))

    def _done(self, context: dict, cause: str | None) -> None:
        started = context.pop(_STARTED, None)
        if started is None:  # a call whose before-call was not ours
            return
        metrics = self.metrics
        metrics.request(context.pop(_OPERATION), time.monotonic() - started)
        # Every attempt but the last was retried (only failures are).
        for retried in context.pop(_FAILED)[:-1]:
            metrics.retried(retried or "other")
        if cause is not None:
            metrics.failed(cause)


def _operation(name: str, headers) -> str:
    """The operation label of botocore operation *name*."""
    if name == "GetObject":
        return "ranged_get" if "Range" in headers else "get"
    return _OPERATIONS.get(name, "other")
