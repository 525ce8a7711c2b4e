"""Keep credentials, SSE-C keys and request signatures out of every log line.

botocore logs request parameters and headers at DEBUG (the SSE-C key among
them), and any library may put a URL into an exception that ends up logged.
:func:`protect` registers secret values; from then on a log record factory
rewrites every record created in this process (only those a logger emits) so
that registered values, access key ids after ``Credential=`` and signatures
read ``***``. :class:`PresignedURL` is a
``str`` usable as the URL whose repr hides the signature.
"""

from __future__ import annotations

import logging
import re
import threading

MASK = "***"
#: Values shorter than this are not masked: no real credential or key is that
#: short, and masking every occurrence of a short string (a test's "s") makes
#: tracebacks unreadable.
MIN_SECRET_LENGTH = 8
_SIGNATURE = re.compile(r"((?:X-Amz-)?Signature=)[0-9A-Za-z%/+]+", re.IGNORECASE)
#: The access key id in a SigV4 Authorization header or presigned URL
#: (``Credential=AKIA.../20260101/region/s3/aws4_request``), whatever found
#: it: ``s3-access-key``, the environment, ~/.aws or a role.
_CREDENTIAL = re.compile(r"((?:X-Amz-)?Credential=)[^/%\s,&]+", re.IGNORECASE)
_secrets: tuple[str, ...] = ()  # replaced, never mutated: readers need no lock
_lock = threading.Lock()
_installed = False


def redact(text: str) -> str:
    """*text* with every registered secret and every signature masked."""
    for secret in _secrets:
        if secret in text:
            text = text.replace(secret, MASK)
    text = _CREDENTIAL.sub(lambda m: m.group(1) + MASK, text)
    return _SIGNATURE.sub(lambda m: m.group(1) + MASK, text)


def protect(*values: str | bytes | None) -> None:
    """Mask these values (and the reprs of bytes) in every later log record,
    those of at least :data:`MIN_SECRET_LENGTH` characters."""
    global _secrets
    added = set()
    for value in values:
        if isinstance(value, bytes):
            added.update({repr(value), repr(value)[2:-1]})
        elif value:
            added.add(value)
    added = {value for value in added if len(value) >= MIN_SECRET_LENGTH}
    with _lock:
        # Longest first, so a secret containing another is masked whole.
        _secrets = tuple(sorted(set(_secrets) | added, key=len, reverse=True))
        _install()


def _install() -> None:
    global _installed
    if _installed:
        return
    make_record = logging.getLogRecordFactory()

    def redacting_record(*args, **kwargs) -> logging.LogRecord:
        record = make_record(*args, **kwargs)
        try:
            message = record.getMessage()
        except Exception:
            # A malformed call (too few arguments for its format): logging
            # reports it when the record is emitted; raising here would break
            # the caller instead.
            return record
        clean = redact(message)
        if clean != message:
            record.msg, record.args = clean, None
        if record.exc_info and record.exc_info[0] is not None:
            text = logging.Formatter().formatException(record.exc_info)
            record.exc_text = redact(text)
        return record

    logging.setLogRecordFactory(redacting_record)
    _installed = True


class PresignedURL(str):
    """A presigned URL: ``str()`` is the URL; the repr hides its signature."""

    __slots__ = ()

    def __repr__(self) -> str:
        return f"PresignedURL({redact(str(self))!r})"
