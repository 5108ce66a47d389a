"""A split virtqueue in a small memory image: build a valid one, then mutate what a peer controls.

A ring case is one byte string: 4 bytes of parameters (ring features, where ``last_avail``
starts) and the shared memory image the device walks. The layout is fixed, so a mutator knows
where each descriptor, avail entry and request header lies and can change one field of a valid
case instead of random bytes (which fail the first index check: 0 of 300 random cases reached a
walk). The same bytes are what atheris mutates and what a corpus file holds.
"""

from __future__ import annotations

import random
import struct

from ivshmem_virtio.spec import ring as R

MEM = 0x1000  # the shared section of a case
QSIZE = 8
DESC, AVAIL, USED = 0x000, 0x080, 0x0C0  # the three areas (validated by DeviceQueue)
IND = 0x180  # room for one indirect table of QSIZE entries
DATA = 0x200  # buffers from here on
PARAMS = 4  # flags, last_avail (u16), spare
P_EVENT_IDX, P_INDIRECT = 1, 2

F_NEXT, F_WRITE, F_INDIRECT = R.DESC_F_NEXT, R.DESC_F_WRITE, R.DESC_F_INDIRECT

# values that sit on the edges the checks guard
EDGE_ADDRS = (0, 1, DATA, MEM - 1, MEM, MEM + 1, MEM - 16, 0x7FFFFFFF, 2**32, 2**63, 2**64 - 1,
              2**64 - 512)
EDGE_LENS = (0, 1, 15, 16, 17, 511, 512, 513, 1024, MEM - DATA, MEM, MEM + 1, 2**31, 2**32 - 1)
EDGE_U16 = (0, 1, QSIZE - 1, QSIZE, QSIZE + 1, 0x7FFF, 0x8000, 0xFFFF)


class RingImage:
    """Builds a valid case: chains added one by one, each made available in order."""

    def __init__(self, rng: random.Random, *, indirect_ok: bool = True) -> None:
        self.mem = bytearray(MEM)
        self.flags = P_INDIRECT if indirect_ok else 0
        if rng.random() < 0.5:
            self.flags |= P_EVENT_IDX
        # start anywhere, wrap-around included: last_avail is where the device stands
        self.last_avail = rng.choice((0, 0xFFFE, 0xFFFF, rng.randrange(0x10000)))
        self.avail_idx = self.last_avail
        self.next_desc = 0
        self.used_ind = False
        self.cursor = DATA
        struct.pack_into("<H", self.mem, AVAIL + R.AVAIL_IDX, self.avail_idx)

    def alloc(self, n: int, align: int = 1) -> int:
        """A buffer of ``n`` bytes in the data area (wraps around when it runs out)."""
        addr = (self.cursor + align - 1) & ~(align - 1)
        if addr + n > MEM:
            addr = DATA
        self.cursor = addr + n
        return addr

    def put(self, addr: int, data: bytes) -> None:
        self.mem[addr:addr + len(data)] = data

    def chain(self, segs: list[tuple[int, int, bool]], *, indirect: bool = False) -> int | None:
        """Make ``segs`` (addr, len, device-writable) one available chain (None: no room)."""
        if indirect and not self.used_ind and self.flags & P_INDIRECT and self.next_desc < QSIZE:
            for i, (addr, length, w) in enumerate(segs):
                flags = (F_WRITE if w else 0) | (F_NEXT if i + 1 < len(segs) else 0)
                struct.pack_into("<QIHH", self.mem, IND + 16 * i, addr, length, flags, i + 1)
            head = self.next_desc
            self.next_desc += 1
            struct.pack_into("<QIHH", self.mem, DESC + 16 * head, IND, 16 * len(segs),
                             F_INDIRECT, 0)
            self.used_ind = True
        else:
            if self.next_desc + len(segs) > QSIZE:
                return None
            head = self.next_desc
            for i, (addr, length, w) in enumerate(segs):
                d = self.next_desc
                self.next_desc += 1
                flags = (F_WRITE if w else 0) | (F_NEXT if i + 1 < len(segs) else 0)
                struct.pack_into("<QIHH", self.mem, DESC + 16 * d, addr, length, flags, d + 1)
        slot = self.avail_idx % QSIZE
        struct.pack_into("<H", self.mem, AVAIL + R.AVAIL_RING + 2 * slot, head)
        self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        struct.pack_into("<H", self.mem, AVAIL + R.AVAIL_IDX, self.avail_idx)
        return head

    def encode(self) -> bytes:
        return struct.pack("<BHB", self.flags, self.last_avail, 0) + bytes(self.mem)


def decode(data: bytes) -> tuple[int, int, bytearray]:
    """(flags, last_avail, memory) of a case; short inputs are zero-padded (atheris's too)."""
    head = data[:PARAMS].ljust(PARAMS, b"\0")
    flags, last_avail, _ = struct.unpack("<BHB", head)
    mem = bytearray(data[PARAMS:PARAMS + MEM])
    mem.extend(bytes(MEM - len(mem)))
    return flags, last_avail, mem


def _pick(rng: random.Random, edges: tuple[int, ...], bits: int) -> int:
    r = rng.random()
    if r < 0.6:
        return rng.choice(edges)
    if r < 0.8:
        return rng.getrandbits(bits)
    return rng.randrange(1 << min(bits, 13))


def mutate_ring(buf: bytearray, rng: random.Random) -> str:
    """Change one field a peer controls (of the ring, at its fixed offsets); returns its name."""
    what = rng.choice(("addr", "len", "flags", "next", "avail_idx", "avail_entry", "last_avail",
                       "ind_addr", "ind_len", "ind_flags", "ind_next", "byte", "ring_flags"))
    p = PARAMS
    d = rng.randrange(QSIZE)
    i = rng.randrange(QSIZE)
    if what == "addr":
        struct.pack_into("<Q", buf, p + DESC + 16 * d, _pick(rng, EDGE_ADDRS, 64))
    elif what == "len":
        struct.pack_into("<I", buf, p + DESC + 16 * d + 8, _pick(rng, EDGE_LENS, 32))
    elif what == "flags":
        old = struct.unpack_from("<H", buf, p + DESC + 16 * d + 12)[0]
        new = old ^ rng.choice((F_NEXT, F_WRITE, F_INDIRECT, 8, 0x8000, rng.getrandbits(16)))
        struct.pack_into("<H", buf, p + DESC + 16 * d + 12, new)
    elif what == "next":
        struct.pack_into("<H", buf, p + DESC + 16 * d + 14, rng.choice((*EDGE_U16, d)))
    elif what == "avail_idx":
        old = struct.unpack_from("<H", buf, p + AVAIL + 2)[0]
        new = rng.choice((old + 1, old - 1, old + QSIZE, old + QSIZE + 1, rng.getrandbits(16)))
        struct.pack_into("<H", buf, p + AVAIL + 2, new & 0xFFFF)
    elif what == "avail_entry":
        struct.pack_into("<H", buf, p + AVAIL + 4 + 2 * i, rng.choice(EDGE_U16))
    elif what == "last_avail":
        old = struct.unpack_from("<H", buf, 1)[0]
        struct.pack_into("<H", buf, 1, (old + rng.choice((1, -1, QSIZE + 1))) & 0xFFFF)
    elif what.startswith("ind_"):
        off = p + IND + 16 * i
        if what == "ind_addr":
            struct.pack_into("<Q", buf, off, _pick(rng, EDGE_ADDRS, 64))
        elif what == "ind_len":
            struct.pack_into("<I", buf, off + 8, _pick(rng, EDGE_LENS, 32))
        elif what == "ind_flags":
            struct.pack_into("<H", buf, off + 12, rng.choice((0, F_NEXT, F_WRITE, F_INDIRECT,
                                                              F_NEXT | F_WRITE, 7)))
        else:
            struct.pack_into("<H", buf, off + 14, rng.choice(EDGE_U16))
    elif what == "ring_flags":
        buf[0] ^= rng.choice((P_EVENT_IDX, P_INDIRECT))
    else:
        k = rng.randrange(len(buf))
        buf[k] = rng.getrandbits(8)
    return what
