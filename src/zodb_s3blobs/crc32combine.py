"""CRC32 of two byte strings joined, from the CRC32 of each: zlib's
``crc32_combine``, which Python's :mod:`zlib` does not expose.

Ranged downloads check each range while it streams and combine the results,
rather than read the whole file again for the check. The method is zlib's
own since 1.2.12: appending *n* bytes multiplies the first CRC by x^(8n)
modulo the CRC polynomial, and x^(2^k) comes from a table of 32 entries
(x's order divides 2^32 - 1, so the powers repeat after 32), so a combine
costs at most 64 carry-less multiplications of 32 bits, whatever the length.
"""

from __future__ import annotations

#: The CRC-32 polynomial (IEEE 802.3), bit-reversed as zlib uses it.
_POLY = 0xEDB88320
#: x^0 and x^1 in that reversed representation.
_ONE = 1 << 31
_X = 1 << 30


def _multiply(a: int, b: int) -> int:
    """a times b modulo the polynomial (both in reversed representation)."""
    product = 0
    for bit in range(31, -1, -1):
        if a & (1 << bit):
            product ^= b
        b = (b >> 1) ^ _POLY if b & 1 else b >> 1
    return product


def _powers_of_x() -> tuple[int, ...]:
    """x^(2^k) modulo the polynomial, for k = 0..31."""
    table, power = [], _X
    for _ in range(32):
        table.append(power)
        power = _multiply(power, power)
    return tuple(table)


_X_TO_2_TO_K = _powers_of_x()


def _x_to_8n(n: int) -> int:
    """x^(8n) modulo the polynomial: the factor appending n bytes applies."""
    power, k = _ONE, 3  # 8n = n * 2^3
    while n:
        if n & 1:
            power = _multiply(_X_TO_2_TO_K[k & 31], power)
        n >>= 1
        k += 1
    return power


def crc32_combine(crc1: int, crc2: int, length2: int) -> int:
    """The CRC32 of ``A + B``, given ``crc1 = zlib.crc32(A)``,
    ``crc2 = zlib.crc32(B)`` and ``length2 = len(B)``."""
    if length2 < 0:
        raise ValueError(f"crc32_combine: length2 must not be negative, not {length2}")
    return _multiply(_x_to_8n(length2), crc1) ^ crc2
