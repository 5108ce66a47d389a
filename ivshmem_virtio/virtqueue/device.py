"""Device side of a split virtqueue: every value the driver wrote is untrusted.

Follows rust-vmm's virtio-queue: the memory is a parameter (a :class:`Region` over the R/W
section), the geometry is validated once when the queue is enabled, and every walk is bounded.
Addresses are byte offsets into the region (virtio-ivshmem.md §3.1). Two kinds of bad input:

* an impossible ring state (avail index jump, head or next index out of range, a loop, nested or
  misused indirect tables) raises :class:`RingError`; the transport then marks the device
  NEEDS_RESET (virtio-ivshmem.md §8.2);
* a descriptor whose buffer lies outside the region is recorded in :attr:`Chain.error`; the chain
  is still walked so that the device can answer it with an error status when its status byte is
  reachable.
"""

from __future__ import annotations

from typing import Protocol

from ..errors import RingError
from ..shm import Region, fence, full_fence
from ..spec import ring as R
from .views import ring_views

_DESC = R.DESC
_USED_ELEM = R.USED_ELEM
_need_event = R.need_event
# flag bits as module globals: the walk tests them per descriptor (a global is one cached load,
# ``R.X`` a global plus an attribute lookup)
_F_NEXT = R.DESC_F_NEXT
_F_WRITE = R.DESC_F_WRITE
_F_INDIRECT = R.DESC_F_INDIRECT
_Desc = tuple[int, int, int, int]  # addr, len, flags, next: one descriptor, copied out


class Accel(Protocol):
    """What :meth:`DeviceQueue.publish` needs of a compiled companion (``_fastpath.BlkQueue``)."""

    def publish(self, next_used: int, signalled_used: int, event_idx: bool, /) -> bool: ...


class Chain:
    """One descriptor chain taken from the avail ring: driver-readable then driver-writable."""

    __slots__ = ("head", "readable", "writable", "error")

    def __init__(self, head: int, readable: list[tuple[int, int]] | None = None,
                 writable: list[tuple[int, int]] | None = None,
                 error: str | None = None) -> None:
        self.head = head
        # (addr, len) the device reads, then (addr, len) it writes
        self.readable: list[tuple[int, int]] = [] if readable is None else readable
        self.writable: list[tuple[int, int]] = [] if writable is None else writable
        self.error = error

    @property
    def readable_len(self) -> int:
        return sum(n for _, n in self.readable)

    @property
    def writable_len(self) -> int:
        return sum(n for _, n in self.writable)

    def __repr__(self) -> str:
        return (f"Chain(head={self.head}, readable={self.readable}, writable={self.writable}, "
                f"error={self.error!r})")


def validate_geometry(mem: Region, size: int, desc: int, avail: int, used: int,
                      max_size: int) -> None:
    """Check a queue the driver asked to enable (once, at queue_enable)."""
    if size == 0 or size & (size - 1) or size > max_size:
        raise RingError(f"queue size {size} is not a power of two <= {max_size}")
    for name, off, length, align in (
        ("desc", desc, R.desc_table_size(size), R.DESC_ALIGN),
        ("avail", avail, R.avail_size(size), R.AVAIL_ALIGN),
        ("used", used, R.used_size(size), R.USED_ALIGN),
    ):
        if off % align or not mem.contains(off, length):
            raise RingError(f"{name} ring at {off:#x}+{length:#x} is misaligned or outside the "
                            f"{mem.size:#x}-byte shared section")
    spans = sorted([(desc, R.desc_table_size(size)), (avail, R.avail_size(size)),
                    (used, R.used_size(size))])
    for (a, alen), (b, _) in zip(spans, spans[1:]):
        if a + alen > b:
            raise RingError("virtqueue areas overlap")


class DeviceQueue:
    """The device's view of one enabled split virtqueue."""

    def __init__(self, mem: Region, size: int, desc: int, avail: int, used: int, *,
                 event_idx: bool = False, indirect: bool = False,
                 max_size: int = R.MAX_QUEUE_SIZE) -> None:
        validate_geometry(mem, size, desc, avail, used, max_size)
        self.mem = mem
        self.size = size
        self.desc = desc
        self.avail = avail
        self.used = used
        self.event_idx = event_idx
        self.indirect = indirect
        self.last_avail = 0  # next avail ring slot to consume
        self.next_used = 0  # used index after the entries pushed so far
        self.signalled_used = 0  # used index the driver was last notified about
        self._mask = size - 1
        #: a compiled companion over this ring (``ivshmem_virtio._native``), set by a device
        #: service that has one; it lives and dies with this queue and takes over publish
        self.accel: Accel | None = None
        # per request only indices are checked (head and next against the table size here,
        # the view's own bounds by memoryview)
        (self._desc_mv, self._avail_ring, self._avail_idx, self._used_mv, self._used_idx,
         self._used_event, self._avail_event) = ring_views(mem, size, desc, avail, used)

    # -- avail side ---------------------------------------------------------------------------
    def pending(self) -> int:
        """Chains the driver has made available and we have not taken yet."""
        n = (self._avail_idx[0] - self.last_avail) & 0xFFFF
        if n > self.size:
            raise RingError(f"avail index jumped {n} entries ahead on a queue of {self.size}")
        return n

    def has_new(self) -> bool:
        """Cheap poll: did avail->idx move? (No validation: :meth:`pop_all` does that.)"""
        return self._avail_idx[0] != self.last_avail

    def pop(self) -> Chain | None:
        """Take the next available chain, or None when the ring is empty."""
        chains = self.pop_all(1)
        return chains[0] if chains else None

    def pop_all(self, limit: int | None = None) -> list[Chain]:
        """Take every available chain (at most ``limit``): one batch per wake-up."""
        last = self.last_avail
        n = (self._avail_idx[0] - last) & 0xFFFF  # read once: the value we validate is the one
        size = self.size                          # we use
        if n > size:
            raise RingError(f"avail index jumped {n} entries ahead on a queue of {size}")
        if limit is not None and n > limit:
            n = limit
        if not n:
            return []
        fence()  # avail->idx before the ring entries it covers
        ring = self._avail_ring
        mask = self._mask
        if n == 1:  # one request at a time (QD1): no loop, no list to grow
            head = ring[last & mask]
            self.last_avail = (last + 1) & 0xFFFF
            if head >= size:
                raise RingError(f"avail ring names descriptor {head} of {size}")
            return [self._walk(head)]
        walk = self._walk
        out = []
        for _ in range(n):
            head = ring[last & mask]
            last = self.last_avail = (last + 1) & 0xFFFF
            if head >= size:
                raise RingError(f"avail ring names descriptor {head} of {size}")
            out.append(walk(head))
        return out

    def _walk(self, head: int) -> Chain:
        """Follow one chain from ``head`` (< size, checked by the caller), bounded by the table.

        Each descriptor is copied out of shared memory (one unpack) before any of its fields is
        checked. A direct chain is read one descriptor at a time; an indirect table is unpacked
        at once (one bounds check and one C loop instead of one unpack call per descriptor).
        """
        readable: list[tuple[int, int]] = []
        writable: list[tuple[int, int]] = []
        error: str | None = None
        mem_size = self.mem.size
        table: list[_Desc] | None = None
        unpack = _DESC.unpack_from
        desc_mv = self._desc_mv
        count = budget = self.size  # a chain can never hold more descriptors than its table
        index = head
        while True:
            if budget <= 0:
                raise RingError(f"descriptor chain from head {head} loops or is longer than the "
                                "table")
            budget -= 1
            if table is None:  # index < self.size: head checked by pop_all, next below
                addr, length, flags, nxt = unpack(desc_mv, index << 4)
            else:
                addr, length, flags, nxt = table[index]
            if flags & _F_INDIRECT:
                if table is not None:
                    raise RingError("nested indirect descriptor table")
                table = self._indirect_table(addr, length, flags)
                count = budget = len(table)
                index = 0
                continue
            if flags & _F_WRITE:
                writable.append((addr, length))
            else:
                if writable and error is None:
                    error = "readable descriptor after a writable one"
                readable.append((addr, length))
            if (addr > mem_size or length > mem_size - addr) and error is None:
                error = f"buffer {addr:#x}+{length:#x} outside the shared section"
            if not flags & _F_NEXT:
                return Chain(head, readable, writable, error)
            if nxt >= count:
                raise RingError(f"next descriptor {nxt} beyond a table of {count}")
            index = nxt

    def _indirect_table(self, addr: int, length: int, flags: int) -> list[_Desc]:
        """The entries of the indirect table a direct descriptor names, after its checks."""
        if not self.indirect:
            raise RingError("indirect descriptor without VIRTIO_RING_F_INDIRECT_DESC")
        if flags & _F_NEXT:
            raise RingError("indirect descriptor with NEXT set")
        if length == 0 or length % 16 or length // 16 > R.MAX_QUEUE_SIZE:
            raise RingError(f"indirect table length {length} is not a multiple of 16")
        if addr % 16 or not self.mem.contains(addr, length):
            raise RingError(f"indirect table {addr:#x}+{length:#x} outside the section")
        return list(_DESC.iter_unpack(self.mem.view(addr, length)))

    # -- used side ----------------------------------------------------------------------------
    def push(self, head: int, length: int) -> None:
        """Write a used element; the driver sees it only after :meth:`publish`."""
        _USED_ELEM.pack_into(self._used_mv, 8 * (self.next_used & self._mask), head, length)
        self.next_used = (self.next_used + 1) & 0xFFFF

    def publish(self) -> bool:
        """Make pushed elements visible; True when the driver wants an interrupt for them."""
        new = self.next_used
        old = self.signalled_used
        if new == old:
            return False
        accel = self.accel
        if accel is not None:  # the same steps in C: store, full fence, event-idx decision
            self.signalled_used = new
            return accel.publish(new, old, self.event_idx)
        fence()  # used elements before used->idx
        self._used_idx[0] = new
        full_fence()  # used->idx before reading the driver's suppression state
        self.signalled_used = new
        if self.event_idx:
            return _need_event(self._used_event[0], new, old)
        return not self.mem.u16(self.avail + R.AVAIL_FLAGS) & R.AVAIL_F_NO_INTERRUPT

    # -- notification suppression (driver -> device kicks) --------------------------------------
    def enable_notifications(self) -> bool:
        """Ask for a kick on the next new buffer; True if buffers arrived meanwhile (re-check)."""
        if self.event_idx:
            self._avail_event[0] = self.last_avail
        else:
            self.mem.set_u16(self.used + R.USED_FLAGS, 0)
        full_fence()  # avail_event before re-reading avail->idx
        return self.pending() > 0

    def disable_notifications(self) -> None:
        """While we poll the ring, kicks are wasted doorbells (VM exits on real hardware)."""
        if not self.event_idx:
            self.mem.set_u16(self.used + R.USED_FLAGS, R.USED_F_NO_NOTIFY)
        # with event-idx, simply not advancing avail_event suppresses kicks
