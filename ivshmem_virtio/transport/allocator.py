"""The frontend's shared-memory allocator, laid out as Linux's virtio_ivshmem does (§3.7).

The R/W section is cut into chunks of ``rw/4096`` bytes clamped to [64, PAGE_SIZE] and rounded up
to a power of two; allocations take a power-of-two number of chunks, naturally aligned
(``bitmap_find_free_region``). The chunks covering the header at offset 0 are reserved.
"""

from __future__ import annotations

import numpy as np

from ..errors import TransportError
from ..spec.ivshmem import PAGE_SIZE, chunk_size


class SharedMemoryFull(TransportError):
    """No free region is large enough ("shared memory is full" in Linux)."""


class ChunkAllocator:
    """Power-of-two, naturally aligned chunk allocations over ``[0, rw_size)``."""

    def __init__(self, rw_size: int, header_size: int, page_size: int = PAGE_SIZE) -> None:
        self.chunk = chunk_size(rw_size, page_size)
        self.nchunks = rw_size // self.chunk
        self._used = np.zeros(self.nchunks, dtype=bool)
        self.header_chunks = -(-header_size // self.chunk)
        self._used[: self.header_chunks] = True
        self._orders: dict[int, int] = {}  # offset -> order of live allocations
        # Recently freed blocks per order, still marked used in the bitmap: a request's buffers
        # come and go at a high rate, and a LIFO hit costs a list pop instead of a bitmap scan.
        self._cache: dict[int, list[int]] = {}
        self._cached = 0
        self.cache_limit = 1024

    def order_for(self, size: int) -> int:
        chunks = max(1, -(-size // self.chunk))
        return (chunks - 1).bit_length()

    def alloc(self, size: int) -> int:
        """Offset of a free region of at least ``size`` bytes."""
        order = (max(1, -(-size // self.chunk)) - 1).bit_length()  # order_for, inline
        cached = self._cache.get(order)
        if cached:
            off = cached.pop()
            self._cached -= 1
            self._orders[off] = order
            return off
        try:
            return self._scan(order)
        except SharedMemoryFull:
            if not self._cached:
                raise
            self._drop_cache()  # give cached blocks back so they can coalesce, then retry
            return self._scan(order)

    def _drop_cache(self) -> None:
        for order, offs in self._cache.items():
            for off in offs:
                first = off // self.chunk
                self._used[first:first + (1 << order)] = False
        self._cache.clear()
        self._cached = 0

    def _scan(self, order: int) -> int:
        size = (1 << order) * self.chunk
        n = 1 << order
        usable = self.nchunks - self.nchunks % n
        if usable == 0:
            raise SharedMemoryFull(f"no room for {size} bytes")
        busy = self._used[:usable].reshape(-1, n).any(axis=1)
        free = np.flatnonzero(~busy)
        if free.size == 0:
            raise SharedMemoryFull(f"shared memory is full ({size} bytes wanted)")
        first = int(free[0]) * n
        self._used[first:first + n] = True
        off = first * self.chunk
        self._orders[off] = order
        return off

    def free(self, off: int) -> None:
        order = self._orders.pop(off)
        if self._cached < self.cache_limit:
            cached = self._cache.get(order)
            if cached is None:
                self._cache[order] = [off]
            else:
                cached.append(off)
            self._cached += 1
            return
        first = off // self.chunk
        self._used[first:first + (1 << order)] = False

    @property
    def free_bytes(self) -> int:
        cached = sum(len(v) << k for k, v in self._cache.items()) * self.chunk
        return int((~self._used).sum()) * self.chunk + cached
