"""Driver side of a split virtqueue (the role Linux's virtio_ring plays in a frontend cell).

Used by the Python frontend, the tests and the benchmarks. The device is untrusted here too: a
used element naming a descriptor that is not in flight, or a used index that runs ahead of what
was made available, raises :class:`RingError` instead of corrupting the free list.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from types import ModuleType
from typing import Any

from ..errors import RingError
from ..shm import Region, fence, full_fence
from ..spec import ring as R
from .views import ring_views

_DESC = R.DESC
_USED_ELEM = R.USED_ELEM
_need_event = R.need_event
_NEXT = R.DESC_F_NEXT
_WRITE = R.DESC_F_WRITE
_WRITE_NEXT = R.DESC_F_WRITE | R.DESC_F_NEXT

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
        self.interrupts_on = True  # False while suppress_interrupts(True) holds
        self._tokens: list[object | None] = [None] * size
        self._chains: list[list[int]] = [[] for _ in range(size)]
        self._indirect_addr: list[int | None] = [None] * size
        self._mask = size - 1
        # per request only the index into the views is checked, never the address arithmetic
        (self._desc_mv, self._avail_ring, self._avail_idx, self._used_mv, self._used_idx,
         self._used_event, self._avail_event) = ring_views(mem, size, desc, avail, used)

    @property
    def num_free(self) -> int:
        return len(self._free_idx)

    def can_add(self, nbufs: int) -> bool:
        if self.indirect and nbufs > 1:
            return len(self._free_idx) >= 1
        return len(self._free_idx) >= nbufs

    def add(self, out: Buffers, inn: Buffers, token: object) -> int:
        """Make one chain available: ``out`` the device reads, ``inn`` it writes. Returns head."""
        nout = len(out)
        total = nout + len(inn)
        if total == 0:
            raise ValueError("empty chain")
        free = self._free_idx
        # indirect when the chain is long or the table is short of descriptors: a 3-descriptor
        # request is cheaper direct than with a table to allocate and free
        if self.indirect and total > 1 and free and (
                total > INDIRECT_MIN or len(free) < total):
            return self._add_indirect(out, inn, token, total)
        if len(free) < total:
            raise RingError("virtqueue full")
        idxs = free[-total:]
        del free[-total:]
        idxs.reverse()  # the order pop() would give
        put = _DESC.pack_into
        mv = self._desc_mv
        # each descriptor links to the next one; the chain's last has neither NEXT nor next
        links = iter(idxs)
        idx = next(links)
        for addr, length in out:
            nxt = next(links, -1)
            if nxt < 0:
                put(mv, idx << 4, addr, length, 0, 0)
            else:
                put(mv, idx << 4, addr, length, _NEXT, nxt)
            idx = nxt
        for addr, length in inn:
            nxt = next(links, -1)
            if nxt < 0:
                put(mv, idx << 4, addr, length, _WRITE, 0)
            else:
                put(mv, idx << 4, addr, length, _WRITE_NEXT, nxt)
            idx = nxt
        head = idxs[0]
        self._chains[head] = idxs
        # _publish, spelled out: the one-request path pays no extra call
        self._tokens[head] = token
        idx = self.avail_idx
        self._avail_ring[idx & self._mask] = head
        self.avail_idx = idx = (idx + 1) & 0xFFFF
        fence()  # ring entry before avail->idx
        self._avail_idx[0] = idx
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
        idx = self.avail_idx
        self._avail_ring[idx & self._mask] = head
        self.avail_idx = idx = (idx + 1) & 0xFFFF
        fence()  # ring entry before avail->idx
        self._avail_idx[0] = idx

    def kick_needed(self) -> bool:
        """After adding a batch: must the device be notified (doorbell)?"""
        full_fence()  # avail->idx before reading the device's suppression state
        new, old = self.avail_idx, self.kicked_idx
        self.kicked_idx = new
        if new == old:
            return False
        if self.event_idx:
            return _need_event(self._avail_event[0], new, old)
        return not self.mem.u16(self.used + R.USED_FLAGS) & R.USED_F_NO_NOTIFY

    def has_used(self) -> bool:
        return self._used_idx[0] != self.last_used

    def wait_used(self, seconds: float) -> bool:
        """Spin up to ``seconds`` for a used entry (a lone caller waiting for its completion);
        True when there is one. The compiled twin spins without the GIL."""
        used_idx = self._used_idx
        last = self.last_used
        if used_idx[0] != last:
            return True
        clock = time.perf_counter
        deadline = clock() + seconds
        while used_idx[0] == last:
            if clock() > deadline:
                return used_idx[0] != last
        return True

    def compiled(self, nat: ModuleType) -> Any:  # noqa: ANN401 - the extension's DriverQueue
        """The compiled twin (``nat.DriverQueue``) of this queue, taking over its ring before
        any chain was added: same geometry, features and indirect-table allocator. The
        caller uses it in this one's place from then on (both zero the ring areas; the
        transport keeps this one for its own bookkeeping)."""
        if self.avail_idx or self.last_used or self.num_free != self.size:
            raise ValueError("a queue in use cannot change hands")
        return nat.DriverQueue(self.mem, self.size, self.desc, self.avail, self.used,
                               event_idx=self.event_idx, indirect=self.indirect,
                               alloc=self._alloc, free=self._free)

    def get_used(self) -> list[tuple[object, int]]:
        """Collect completed chains as ``(token, used_len)`` and return their descriptors.

        A used element naming what is not in flight raises RingError, but only once the
        completions before it in the same batch were returned: they are real, and dropping
        them would leave their callers waiting forever (they are no longer in flight, so a
        device reset would not resubmit them)."""
        used_idx = self._used_idx[0]
        last = self.last_used
        n = (used_idx - last) & 0xFFFF
        if n > self.size - len(self._free_idx):
            raise RingError(f"device reports {n} used entries with only "
                            f"{self.size - len(self._free_idx)} in flight")
        fence()  # used->idx before the entries
        out: list[tuple[object, int]] = []
        tokens = self._tokens
        chains = self._chains
        free = self._free_idx
        tables = self._indirect_addr
        mask = self._mask
        size = self.size
        get = _USED_ELEM.unpack_from
        mv = self._used_mv
        for _ in range(n):
            head, length = get(mv, (last & mask) << 3)  # copied out, then checked
            token = tokens[head] if head < size else None
            if token is None:
                if out:  # the completions before it are real: their callers get them, and
                    break  # the next call (the entry is still there) raises
                raise RingError(f"device completed descriptor {head}, which is not in flight")
            out.append((token, length))
            # its descriptors back to the free list, in the order they were taken
            chain = chains[head]
            chain.reverse()
            free += chain
            chains[head] = []
            tokens[head] = None
            if tables[head] is not None:
                self._free_table(head)
            last = self.last_used = (last + 1) & 0xFFFF
        if self.event_idx:
            if self.interrupts_on:
                self._used_event[0] = last  # interrupt us at the next completion
                full_fence()  # ... before the caller re-checks used->idx and sleeps
            else:
                self._used_event[0] = (last - 1) & 0xFFFF  # still suppressed: stay parked
        return out

    def _free_table(self, head: int) -> None:
        """Give a completed chain's indirect table back to the allocator."""
        table = self._indirect_addr[head]
        if table is not None and self._free is not None:
            self._indirect_addr[head] = None
            self._free(table)

    def in_flight(self) -> list[object]:
        return [t for t in self._tokens if t is not None]

    def suppress_interrupts(self, suppress: bool) -> None:
        """While the driver polls used entries it does not need interrupts.

        With EVENT_IDX, used_event one behind ``last_used`` asks for an interrupt only after
        65535 more completions (need_event is false for every batch until then; get_used keeps
        it parked there while suppressed); turning interrupts back on sets it to
        ``last_used``: the next completion interrupts.
        """
        self.interrupts_on = not suppress
        if self.event_idx:
            event = self.last_used if not suppress else (self.last_used - 1) & 0xFFFF
            self._used_event[0] = event
        else:
            self.mem.set_u16(self.avail + R.AVAIL_FLAGS, R.AVAIL_F_NO_INTERRUPT if suppress else 0)
        full_fence()  # the new suppression state before the caller re-checks used->idx
