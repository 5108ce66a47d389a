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

from ..errors import RingError
from ..shm import Region, fence
from ..spec import ring as R

_DESC = R.DESC
_USED_ELEM = R.USED_ELEM


class Chain:
    """One descriptor chain taken from the avail ring: driver-readable then driver-writable."""

    __slots__ = ("head", "readable", "writable", "error")

    def __init__(self, head: int) -> None:
        self.head = head
        self.readable: list[tuple[int, int]] = []  # (addr, len) the device reads
        self.writable: list[tuple[int, int]] = []  # (addr, len) the device writes
        self.error: str | None = None

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
        self._avail_idx_off = avail + R.AVAIL_IDX
        self._used_idx_off = used + R.USED_IDX
        self._used_event_off = avail + R.used_event_off(size)
        self._avail_event_off = used + R.avail_event_off(size)
        self._mask = size - 1

    # -- avail side ---------------------------------------------------------------------------
    def pending(self) -> int:
        """Chains the driver has made available and we have not taken yet."""
        n = (self.mem.u16(self._avail_idx_off) - self.last_avail) & 0xFFFF
        if n > self.size:
            raise RingError(f"avail index jumped {n} entries ahead on a queue of {self.size}")
        return n

    def pop(self) -> Chain | None:
        """Take the next available chain, or None when the ring is empty."""
        if not self.pending():
            return None
        mem = self.mem
        slot = self.avail + R.AVAIL_RING + 2 * (self.last_avail & self._mask)
        head = mem.u16(slot)
        self.last_avail = (self.last_avail + 1) & 0xFFFF
        if head >= self.size:
            raise RingError(f"avail ring names descriptor {head} of {self.size}")
        return self._walk(head)

    def pop_all(self, limit: int | None = None) -> list[Chain]:
        """Take every available chain (at most ``limit``): one batch per wake-up."""
        n = self.pending()
        if limit is not None:
            n = min(n, limit)
        out = []
        for _ in range(n):
            chain = self.pop()
            if chain is None:
                break
            out.append(chain)
        return out

    def _walk(self, head: int) -> Chain:
        mem = self.mem
        chain = Chain(head)
        readable, writable = chain.readable, chain.writable
        size = mem.size
        # the direct table is read one descriptor at a time; an indirect table is unpacked at
        # once (one bounds check and one C loop instead of one unpack call per descriptor)
        table: list[tuple[int, int, int, int]] | None = None
        count = self.size
        index = head
        budget = self.size  # a chain can never hold more descriptors than the table
        seen_writable = False
        while True:
            if budget <= 0:
                raise RingError(f"descriptor chain from head {head} loops or is longer than the "
                                "table")
            budget -= 1
            if table is None:
                addr, length, flags, nxt = mem.unpack(_DESC, self.desc + 16 * index)
            else:
                addr, length, flags, nxt = table[index]
            if flags & R.DESC_F_INDIRECT:
                if table is not None:
                    raise RingError("nested indirect descriptor table")
                if not self.indirect:
                    raise RingError("indirect descriptor without VIRTIO_RING_F_INDIRECT_DESC")
                if flags & R.DESC_F_NEXT:
                    raise RingError("indirect descriptor with NEXT set")
                if length == 0 or length % 16 or length // 16 > R.MAX_QUEUE_SIZE:
                    raise RingError(f"indirect table length {length} is not a multiple of 16")
                if addr % 16 or not mem.contains(addr, length):
                    raise RingError(f"indirect table {addr:#x}+{length:#x} outside the section")
                table = list(_DESC.iter_unpack(mem.view(addr, length)))
                count = budget = len(table)
                index = 0
                continue
            if flags & R.DESC_F_WRITE:
                seen_writable = True
                writable.append((addr, length))
            else:
                if seen_writable and chain.error is None:
                    chain.error = "readable descriptor after a writable one"
                readable.append((addr, length))
            if chain.error is None and not (addr <= size and length <= size - addr):
                chain.error = f"buffer {addr:#x}+{length:#x} outside the shared section"
            if not flags & R.DESC_F_NEXT:
                return chain
            if nxt >= count:
                raise RingError(f"next descriptor {nxt} beyond a table of {count}")
            index = nxt

    # -- used side ----------------------------------------------------------------------------
    def push(self, head: int, length: int) -> None:
        """Write a used element; the driver sees it only after :meth:`publish`."""
        off = self.used + R.USED_RING + 8 * (self.next_used & self._mask)
        self.mem.pack(_USED_ELEM, off, head, length)
        self.next_used = (self.next_used + 1) & 0xFFFF

    def publish(self) -> bool:
        """Make pushed elements visible; True when the driver wants an interrupt for them."""
        new = self.next_used
        old = self.signalled_used
        if new == old:
            return False
        fence()  # used elements before used->idx
        self.mem.set_u16(self._used_idx_off, new)
        fence()  # used->idx before reading the driver's suppression state
        self.signalled_used = new
        if self.event_idx:
            return R.need_event(self.mem.u16(self._used_event_off), new, old)
        return not self.mem.u16(self.avail + R.AVAIL_FLAGS) & R.AVAIL_F_NO_INTERRUPT

    # -- notification suppression (driver -> device kicks) --------------------------------------
    def enable_notifications(self) -> bool:
        """Ask for a kick on the next new buffer; True if buffers arrived meanwhile (re-check)."""
        if self.event_idx:
            self.mem.set_u16(self._avail_event_off, self.last_avail)
        else:
            self.mem.set_u16(self.used + R.USED_FLAGS, 0)
        fence()
        return self.pending() > 0

    def disable_notifications(self) -> None:
        """While we poll the ring, kicks are wasted doorbells (VM exits on real hardware)."""
        if not self.event_idx:
            self.mem.set_u16(self.used + R.USED_FLAGS, R.USED_F_NO_NOTIFY)
        # with event-idx, simply not advancing avail_event suppresses kicks
