"""Object keys: ``[{prefix}/]blobs/{oid_hex}/{tid_hex}.blob``.

The layout (lower-case hex without leading zeros) is byte-compatible with the
buckets written by earlier zodb-s3blobs releases, so existing data needs no
migration. Uploads made before their transaction's id is known (RelStorage,
see ``s3-staged-copy-threshold``) go to ``[{prefix}/]staging/{random}.blob``
first, a folder the revision layout never parses.
"""

from __future__ import annotations

import re
import secrets

from ZODB.utils import p64, u64

BLOBS_FOLDER = "blobs"
STAGING_FOLDER = "staging"
_SAFE_PREFIX = re.compile(r"[A-Za-z0-9._\-/]+")
_KEY = re.compile(r"blobs/([0-9a-f]{1,16})/([0-9a-f]{1,16})\.blob")
_STAGING_KEY = re.compile(r"staging/[0-9a-f]{32}\.blob")


def validate_prefix(prefix: str) -> str:
    """Return *prefix* normalised (no trailing ``/``) or raise ValueError.

    The message names ``s3-prefix`` because that is what the operator wrote.
    """
    prefix = (prefix or "").strip()
    if not prefix:
        return ""
    if not _SAFE_PREFIX.fullmatch(prefix):
        raise ValueError(
            f"s3-prefix {prefix!r} may only contain letters, digits, '.', '_', "
            "'-' and '/'"
        )
    if prefix.startswith("/"):
        raise ValueError(f"s3-prefix {prefix!r} must not start with '/'")
    parts = prefix.rstrip("/").split("/")
    if any(part in ("", ".", "..") for part in parts):
        raise ValueError(
            f"s3-prefix {prefix!r} must not contain empty, '.' or '..' segments"
        )
    return "/".join(parts)


def hex_id(value: bytes) -> str:
    """An 8-byte oid or tid as lower-case hex without leading zeros."""
    return format(u64(value), "x")


class KeyLayout:
    """Maps (oid, tid) to object keys under one prefix, and back."""

    def __init__(self, prefix: str = "") -> None:
        self.prefix = validate_prefix(prefix)
        top = f"{self.prefix}/" if self.prefix else ""
        self.root = f"{top}{BLOBS_FOLDER}/"
        #: Where uploads wait for their transaction's id; never a revision.
        self.staging_root = f"{top}{STAGING_FOLDER}/"

    def key(self, oid: bytes, tid: bytes) -> str:
        return f"{self.root}{hex_id(oid)}/{hex_id(tid)}.blob"

    def staging_key(self) -> str:
        """A new, unguessable key under :attr:`staging_root`."""
        return f"{self.staging_root}{secrets.token_hex(16)}.blob"

    def is_staging_key(self, key: str) -> bool:
        """Is *key* exactly one :meth:`staging_key` makes? Other keys under
        the staging folder (another database's prefix ``{prefix}/staging``,
        a file put there by hand) are not ours."""
        top = len(self.staging_root) - len(STAGING_FOLDER) - 1
        return key.startswith(self.staging_root) and bool(
            _STAGING_KEY.fullmatch(key, top)
        )

    def parse(self, key: str) -> tuple[bytes, bytes] | None:
        """Return (oid, tid) for a key of this layout, or None for any other key.

        Keys written with leading zeros, upper-case hex or extra path segments
        are not ours: the collector must leave them alone.
        """
        if not key.startswith(self.root):
            return None
        match = _KEY.fullmatch(key, len(self.root) - len(BLOBS_FOLDER) - 1)
        if match is None:
            return None
        oid_hex, tid_hex = match.groups()
        if (oid_hex != "0" and oid_hex[0] == "0") or (
            tid_hex != "0" and tid_hex[0] == "0"
        ):
            return None
        return p64(int(oid_hex, 16)), p64(int(tid_hex, 16))
