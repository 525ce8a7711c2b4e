"""Make moto's S3 server serve a ranged GET at the cost of the range, as S3
does, so that the benchmark measures the storage rather than moto.

moto answers every GET, ranged or not, by reading the object's whole buffer
under the object's lock, copying it, and only then slicing out the range:
eight ranged GETs of a 64 MiB object cost eight full copies, one after
another (measured: eight 8 MiB ranges take about four times one full GET,
in parallel or not). Real S3 serves a range in proportion to its size.
:func:`ranges_cost_their_size` memoises each object's bytes, so a full GET
returns them without a copy and a ranged GET copies only its slice. Plain
boto3 and the storage get the same server.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from moto.s3.models import FakeKey

_CACHED = "_bench_cached_value"


@contextlib.contextmanager
def ranges_cost_their_size() -> Iterator[None]:
    """Patch moto's FakeKey.value for the duration of the block."""
    original = FakeKey.value

    def get(key: FakeKey) -> bytes:
        value = key.__dict__.get(_CACHED)
        if value is None:
            value = key.__dict__[_CACHED] = original.fget(key)
        return value

    def set_(key: FakeKey, new_value: bytes) -> None:
        key.__dict__.pop(_CACHED, None)
        original.fset(key, new_value)

    FakeKey.value = property(get, set_)
    try:
        yield
    finally:
        FakeKey.value = original
