"""crc32_combine gives zlib.crc32 of a concatenation from the parts' CRCs."""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import random
import zlib

import pytest

from zodb_s3blobs.crc32combine import crc32_combine


@pytest.mark.parametrize(
    ("first", "second"),
    [
        (0, 0),
        (0, 1),
        (1, 0),
        (7, 13),
        (1, 1 << 20),
        ((1 << 20) + 3, 1 << 16),
        (5, 100_001),
    ],
)
def test_combine_equals_crc_of_concatenation(first: int, second: int):
    a, b = os.urandom(first), os.urandom(second)
    assert crc32_combine(zlib.crc32(a), zlib.crc32(b), len(b)) == zlib.crc32(a + b)


def test_combine_of_many_ranges_in_order():
    """As a ranged download combines its parts: odd sizes, one empty."""
    rng = random.Random(22)
    parts = [rng.randbytes(n) for n in (4099, 0, 1, 65_537, 333, 8191)]
    crc = 0
    for part in parts:
        crc = crc32_combine(crc, zlib.crc32(part), len(part))
    assert crc == zlib.crc32(b"".join(parts))


def test_combine_over_megabytes_of_zeros():
    zeros = bytes(1 << 22)
    a, b = b"head", zeros + b"tail"
    assert crc32_combine(zlib.crc32(a), zlib.crc32(b), len(b)) == zlib.crc32(a + b)


def test_lengths_past_the_table_of_powers():
    """Appending 2^29 bytes needs x^(2^32), where the table of 32 powers
    starts over: it must equal appending 2^28 bytes twice (crc2 = 0 applies
    the length's factor alone)."""
    n = 1 << 28
    crc = zlib.crc32(b"some bytes")
    twice = crc32_combine(crc32_combine(crc, 0, n), 0, n)
    assert crc32_combine(crc, 0, 2 * n) == twice


def test_negative_length_is_refused():
    with pytest.raises(ValueError, match="length2"):
        crc32_combine(0, 0, -1)


def test_equals_libz_for_lengths_up_to_exabytes():
    """The same answers as libz's own ``crc32_combine64`` (the library
    Python's zlib module is built on), for lengths no test could hash:
    a table of powers that was wrong the same way throughout would pass
    the test above, not this one."""
    libz = ctypes.CDLL(ctypes.util.find_library("z"))
    libz.crc32_combine64.restype = ctypes.c_ulong
    libz.crc32_combine64.argtypes = [ctypes.c_ulong, ctypes.c_ulong, ctypes.c_int64]
    rng = random.Random(22)
    lengths = [0, 1, (1 << 29), (1 << 32) - 1, 1 << 32, 5 << 30, 1 << 62]
    lengths += [rng.randrange(1 << rng.randrange(1, 63)) for _ in range(2000)]
    for length in lengths:
        crc1, crc2 = rng.getrandbits(32), rng.getrandbits(32)
        assert crc32_combine(crc1, crc2, length) == libz.crc32_combine64(
            crc1, crc2, length
        ), length
