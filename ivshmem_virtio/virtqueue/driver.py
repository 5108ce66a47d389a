"""Driver side of a split virtqueue (the role Linux's virtio_ring plays in a frontend cell).

Used by the Python frontend, the tests and the benchmarks. The device is untrusted here too: a
used element naming a descriptor that is not in flight, or a used index that runs ahead of what
was made available, raises :class:`RingError` instead of corrupting the free list.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from ..errors import RingError
from ..shm import Region, fence
from ..spec import ring as R

_DESC = R.DESC
_USED_ELEM = R.USED_ELEM

INDIRECT_MIN = 4  # chains longer than this go through an indirect table when negotiated
Buffers = Sequence[tuple[int, int]]  # (addr, len) pairs, addresses relative to the region


class DriverQueue:
    """One split virtqueue owned by the driver: descriptor free list, avail ring, used ring."""

    def __init__(self, mem: Region, size: int, desc: int, avail: int, used: int, *,
                 event_idx: bool = False, indirect: bool = False,
                 alloc: Callable[[int], int] | None = None,
                 free: Callable[[int], None] | None = None) -> None:
        if size == 0 or size & (size - 1) or size > R.MAX_QUEUE_SIZE:
            raise ValueError(f"queue size {size} is not a power of two")
        self.mem = mem
        self.size = size
        self.desc = desc
        self.avail = avail
        self.used = used
        self.event_idx = event_idx
        self.indirect = indirect and alloc is not None
        self._alloc = alloc
        self._free = free
        mem.fill(desc, R.desc_table_size(size))
        mem.fill(avail, R.avail_size(size))
        mem.fill(used, R.used_size(size))
        # The free list lives in our private memory, never in the shared table: a device that
        # scribbles over descriptors must not be able to corrupt it (Linux keeps desc_extra).
        self._free_idx = list(range(size - 1, -1, -1))
        self.avail_idx = 0  # our shadow of avail->idx
        self.kicked_idx = 0  # avail idx at the last kick decision
        self.last_used = 0
        self._tokens: list[object | None] = [None] * size
        self._chains: list[list[int]] = [[] for _ in range(size)]
        self._indirect_addr: list[int | None] = [None] * size
        self._mask = size - 1

    @property
    def num_free(self) -> int:
        return len(self._free_idx)

    def can_add(self, nbufs: int) -> bool:
        if self.indirect and nbufs > 1:
            return self.num_free >= 1
        return self.num_free >= nbufs

    def add(self, out: Buffers, inn: Buffers, token: object) -> int:
        """Make one chain available: ``out`` the device reads, ``inn`` it writes. Returns head."""
        total = len(out) + len(inn)
        if total == 0:
            raise ValueError("empty chain")
        # indirect when the chain is long or the table is short of descriptors: a 3-descriptor
        # request is cheaper direct than with a table to allocate and free
        if self.indirect and total > 1 and self.num_free >= 1 and (
                total > INDIRECT_MIN or self.num_free < total):
            return self._add_indirect(out, inn, token, total)
        if self.num_free < total:
            raise RingError("virtqueue full")
        mem = self.mem
        free = self._free_idx
        idxs = [free.pop() for _ in range(total)]
        nout = len(out)
        for i, (addr, length) in enumerate((*out, *inn)):
            flags = R.DESC_F_WRITE if i >= nout else 0
            nxt = 0
            if i < total - 1:
                flags |= R.DESC_F_NEXT
                nxt = idxs[i + 1]
            mem.pack(_DESC, self.desc + 16 * idxs[i], addr, length, flags, nxt)
        head = idxs[0]
        self._chains[head] = idxs
        self._publish(head, token)
        return head

    def _add_indirect(self, out: Buffers, inn: Buffers, token: object, total: int) -> int:
        assert self._alloc is not None
        table = self._alloc(16 * total)
        mem = self.mem
        for i, (addr, length) in enumerate(list(out) + list(inn)):
            flags = R.DESC_F_WRITE if i >= len(out) else 0
            if i < total - 1:
                flags |= R.DESC_F_NEXT
            mem.pack(_DESC, table + 16 * i, addr, length, flags, i + 1 if i < total - 1 else 0)
        head = self._free_idx.pop()
        mem.pack(_DESC, self.desc + 16 * head, table, 16 * total, R.DESC_F_INDIRECT, 0)
        self._chains[head] = [head]
        self._indirect_addr[head] = table
        self._publish(head, token)
        return head

    def _publish(self, head: int, token: object) -> None:
        self._tokens[head] = token
        self.mem.set_u16(self.avail + R.AVAIL_RING + 2 * (self.avail_idx & self._mask), head)
        self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        fence()  # ring entry before avail->idx
        self.mem.set_u16(self.avail + R.AVAIL_IDX, self.avail_idx)

    def kick_needed(self) -> bool:
        """After adding a batch: must the device be notified (doorbell)?"""
        fence()  # avail->idx before reading the device's suppression state
        new, old = self.avail_idx, self.kicked_idx
        self.kicked_idx = new
        if new == old:
            return False
        if self.event_idx:
            return R.need_event(self.mem.u16(self.used + R.avail_event_off(self.size)), new, old)
        return not self.mem.u16(self.used + R.USED_FLAGS) & R.USED_F_NO_NOTIFY

    def has_used(self) -> bool:
        return self.mem.u16(self.used + R.USED_IDX) != self.last_used

    def get_used(self) -> list[tuple[object, int]]:
        """Collect completed chains as ``(token, used_len)`` and return their descriptors."""
        mem = self.mem
        used_idx = mem.u16(self.used + R.USED_IDX)
        n = (used_idx - self.last_used) & 0xFFFF
        if n > self.size - self.num_free:
            raise RingError(f"device reports {n} used entries with only "
                            f"{self.size - self.num_free} in flight")
        fence()  # used->idx before the entries
        out = []
        for _ in range(n):
            off = self.used + R.USED_RING + 8 * (self.last_used & self._mask)
            head, length = mem.unpack(_USED_ELEM, off)
            if head >= self.size or self._tokens[head] is None:
                raise RingError(f"device completed descriptor {head}, which is not in flight")
            out.append((self._tokens[head], length))
            self._release(head)
            self.last_used = (self.last_used + 1) & 0xFFFF
        if self.event_idx:
            # interrupt us at the next completion
            mem.set_u16(self.avail + R.used_event_off(self.size), self.last_used)
        return out

    def _release(self, head: int) -> None:
        self._free_idx.extend(reversed(self._chains[head]))
        self._chains[head] = []
        self._tokens[head] = None
        table = self._indirect_addr[head]
        if table is not None and self._free is not None:
            self._indirect_addr[head] = None
            self._free(table)

    def in_flight(self) -> list[object]:
        return [t for t in self._tokens if t is not None]

    def suppress_interrupts(self, suppress: bool) -> None:
        """While the driver polls used entries it does not need interrupts."""
        if self.event_idx:
            if not suppress:
                self.mem.set_u16(self.avail + R.used_event_off(self.size), self.last_used)
            # with event-idx a stale used_event already suppresses
        else:
            self.mem.set_u16(self.avail + R.AVAIL_FLAGS, R.AVAIL_F_NO_INTERRUPT if suppress else 0)
        fence()
