"""The guest test's data pattern, the same as tests/guest/vdtool.c's: byte OFF of seed SEED is
byte OFF % 8 (little endian) of splitmix64(SEED * 2**32 + OFF // 8); seed 0 is zeros."""

from __future__ import annotations

import numpy as np

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)


def pattern(seed: int, off: int, length: int) -> bytes:
    """The bytes [off, off + length) of the pattern of ``seed``."""
    if length <= 0:
        return b""
    if seed == 0:
        return bytes(length)
    first, last = off >> 3, (off + length + 7) >> 3
    z = np.arange(first, last, dtype=np.uint64) + np.uint64(seed << 32) + _GOLDEN
    z = (z ^ (z >> np.uint64(30))) * _M1
    z = (z ^ (z >> np.uint64(27))) * _M2
    z ^= z >> np.uint64(31)
    raw = z.astype("<u8").tobytes()
    skip = off - (first << 3)
    return raw[skip:skip + length]
