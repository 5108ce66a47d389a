"""A guest's memory as a vhost-user front-end shares it: several mapped regions, one address space.

Over ivshmem the device sees one window (:class:`~ivshmem_virtio.shm.Region`) and descriptor
addresses are offsets into it. Over vhost-user the front-end sends a table of regions, each a
range of guest-physical addresses backed by ``size`` bytes of an fd at ``mmap_offset``, also
known by the front-end's own virtual address (``userspace_addr``, used for ring addresses).
:class:`GuestMemory` maps each region as a :class:`Region` (so the raw byte access stays in
``shm``, this module only translates) and offers the ``Region`` interface over guest-physical
addresses, so the device-side virtqueue and every device service run on it unchanged.

A separate module rather than more of ``shm.py``: ``shm`` is the one place that touches mapped
bytes and stays small; what lives here is address translation and the checks on an untrusted
region table, which ``shm`` never needed. Every access is bounds-checked here, in
:meth:`GuestMemory._locate`: an address in no region, or a range that leaves the region it
starts in, raises :class:`MemoryAccessError` and touches nothing. Ranges that span two adjacent
regions are copied piecewise by ``read``/``write``/``fill``; a zero-copy ``view`` cannot span
two mappings and is refused (Linux's virtio_blk never hands such a segment: a segment is
physically contiguous memory, and QEMU's regions are split only at holes).
"""

from __future__ import annotations

import bisect
import mmap
import os
import stat
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from .errors import MemoryAccessError
from .shm import Buffer, Region, map_fd

PAGE = mmap.ALLOCATIONGRANULARITY
_U64_END = 1 << 64


@dataclass(frozen=True, slots=True)
class RegionSpec:
    """One region of the table (the fields of vhost-user's memory region description)."""

    guest_addr: int
    size: int
    user_addr: int
    mmap_offset: int


def check_table(specs: Sequence[RegionSpec]) -> None:
    """No empty region, no range that wraps 2**64, no two regions sharing an address (guest or
    user): translation must be unambiguous whatever the front-end sent."""
    for s in specs:
        if s.size <= 0:
            raise MemoryAccessError(f"guest region at {s.guest_addr:#x} has size {s.size}")
        for what, base in (("guest", s.guest_addr), ("user", s.user_addr),
                           ("mmap offset", s.mmap_offset)):
            if base < 0 or base + s.size > _U64_END:
                raise MemoryAccessError(f"guest region {what} range {base:#x}+{s.size:#x} wraps")
    for key in ("guest_addr", "user_addr"):
        spans = sorted((getattr(s, key), s.size) for s in specs)
        for (a, n), (b, _) in zip(spans, spans[1:], strict=False):
            if b < a + n:
                raise MemoryAccessError(f"guest regions overlap ({key}: {a:#x}+{n:#x} and "
                                        f"{b:#x})")


class GuestMemory(Region):
    """Guest-physical address space over mapped regions, with the :class:`Region` interface.

    A subclass only so that it goes wherever a ``Region`` is typed (the virtqueue, the device
    models): it overrides every accessor and never touches ``Region``'s own single window.
    ``size`` is the end of the highest region: the virtqueue's quick "beyond the memory" test
    uses it, and the exact test (holes between regions included) is made on every access.
    """

    __slots__ = ("specs", "_starts", "_ends", "_regions", "_maps")

    def __init__(self, specs: Sequence[RegionSpec], regions: Sequence[Region],
                 maps: Sequence[mmap.mmap] = (), name: str = "guest memory") -> None:
        check_table(specs)
        order = sorted(range(len(specs)), key=lambda i: specs[i].guest_addr)
        self.specs = [specs[i] for i in order]
        self._regions = [regions[i] for i in order]
        for s, r in zip(self.specs, self._regions, strict=True):
            if r.size != s.size:
                raise MemoryAccessError(f"region at {s.guest_addr:#x}: window of {r.size:#x} "
                                        f"bytes for {s.size:#x}")
        self._starts = [s.guest_addr for s in self.specs]
        self._ends = [s.guest_addr + s.size for s in self.specs]
        self._maps = list(maps)
        self.name = name
        self.base = 0
        self.size = max(self._ends, default=0)

    @classmethod
    def map_fds(cls, specs: Sequence[RegionSpec], fds: Sequence[int],
                name: str = "guest memory") -> GuestMemory:
        """Map each region from its fd (shared, read-write), checked first against the file's
        size: touching a page past the end of a file is SIGBUS, which would kill the daemon."""
        if len(specs) != len(fds):
            raise MemoryAccessError(f"{len(specs)} regions with {len(fds)} fds")
        check_table(specs)
        maps: list[mmap.mmap] = []
        regions: list[Region] = []
        try:
            for s, fd in zip(specs, fds, strict=True):
                st = os.fstat(fd)
                if not stat.S_ISREG(st.st_mode):
                    raise MemoryAccessError(f"region at {s.guest_addr:#x}: the fd is not a "
                                            "memory file (memfd, shm, hugetlbfs)")
                if s.mmap_offset + s.size > st.st_size:
                    raise MemoryAccessError(
                        f"region at {s.guest_addr:#x}: {s.mmap_offset:#x}+{s.size:#x} beyond the "
                        f"{st.st_size:#x}-byte file")
                start = s.mmap_offset - s.mmap_offset % PAGE
                try:
                    mm = map_fd(fd, s.size + (s.mmap_offset - start), start)
                except (OSError, ValueError, OverflowError) as e:
                    raise MemoryAccessError(f"region at {s.guest_addr:#x}: mmap: {e}") from e
                maps.append(mm)
                regions.append(Region(mm, s.mmap_offset - start, s.size,
                                      f"{name}@{s.guest_addr:#x}"))
        except BaseException:
            for mm in maps:
                _close_map(mm)
            raise
        return cls(specs, regions, maps, name)

    def close(self) -> None:
        """Unmap what nobody uses any more; a mapping still viewed (a queue or a request in a
        worker thread holds a view) stays until the last view goes: never a dangling pointer."""
        self._regions = []
        self._starts = []
        self._ends = []
        maps, self._maps = self._maps, []
        for mm in maps:
            _close_map(mm)

    # -- translation --------------------------------------------------------------------------
    def _locate(self, addr: int, length: int) -> tuple[Region, int]:
        """The region holding all of ``[addr, addr+length)`` and the offset in it."""
        i = bisect.bisect_right(self._starts, addr) - 1
        if i < 0 or length < 0 or addr + length > self._ends[i] or addr >= self._ends[i] \
                and length:
            raise MemoryAccessError(self._why(addr, length))
        return self._regions[i], addr - self._starts[i]

    def _why(self, addr: int, length: int) -> str:
        i = bisect.bisect_right(self._starts, addr) - 1
        if i >= 0 and addr < self._ends[i]:
            return (f"{self.name}: access {addr:#x}+{length:#x} leaves the region "
                    f"{self._starts[i]:#x}-{self._ends[i]:#x}")
        return f"{self.name}: access {addr:#x}+{length:#x} in no region"

    def _pieces(self, addr: int, length: int) -> list[tuple[Region, int, int]]:
        """``[addr, addr+length)`` as (region, offset, length) pieces over adjacent regions."""
        out = []
        while True:
            i = bisect.bisect_right(self._starts, addr) - 1
            if i < 0 or addr >= self._ends[i] or length < 0:
                raise MemoryAccessError(self._why(addr, length))
            take = min(length, self._ends[i] - addr)
            out.append((self._regions[i], addr - self._starts[i], take))
            length -= take
            addr += take
            if not length:
                return out

    def user_to_guest(self, uaddr: int, length: int) -> int:
        """The guest-physical address of front-end virtual ``[uaddr, uaddr+length)``, which must
        lie in one region (ring areas from SET_VRING_ADDR are user addresses)."""
        for s in self.specs:
            if s.user_addr <= uaddr and uaddr + length <= s.user_addr + s.size:
                return s.guest_addr + (uaddr - s.user_addr)
        raise MemoryAccessError(f"{self.name}: user address {uaddr:#x}+{length:#x} in no "
                                "region")

    # -- the Region interface -----------------------------------------------------------------
    def contains(self, off: int, length: int) -> bool:
        try:
            self._locate(off, length)
        except MemoryAccessError:
            return False
        return True

    def check(self, off: int, length: int) -> None:
        self._locate(off, length)

    def u8(self, off: int) -> int:
        r, o = self._locate(off, 1)
        return r.u8(o)

    def u16(self, off: int) -> int:
        r, o = self._locate(off, 2)
        return r.u16(o)

    def u32(self, off: int) -> int:
        r, o = self._locate(off, 4)
        return r.u32(o)

    def u64(self, off: int) -> int:
        r, o = self._locate(off, 8)
        return r.u64(o)

    def set_u8(self, off: int, value: int) -> None:
        r, o = self._locate(off, 1)
        r.set_u8(o, value)

    def set_u16(self, off: int, value: int) -> None:
        r, o = self._locate(off, 2)
        r.set_u16(o, value)

    def set_u32(self, off: int, value: int) -> None:
        r, o = self._locate(off, 4)
        r.set_u32(o, value)

    def set_u64(self, off: int, value: int) -> None:
        r, o = self._locate(off, 8)
        r.set_u64(o, value)

    def unpack(self, st: struct.Struct, off: int) -> tuple[Any, ...]:
        r, o = self._locate(off, st.size)
        return r.unpack(st, o)

    def pack(self, st: struct.Struct, off: int, *values: int) -> None:
        r, o = self._locate(off, st.size)
        r.pack(st, o, *values)

    def read(self, off: int, length: int) -> bytes:
        if not length:
            return b""
        pieces = self._pieces(off, length)
        if len(pieces) == 1:
            r, o, n = pieces[0]
            return r.read(o, n)
        return b"".join(r.read(o, n) for r, o, n in pieces)

    def read_into(self, off: int, dst: memoryview) -> None:
        pos = 0
        for r, o, n in self._pieces(off, len(dst)) if len(dst) else ():
            r.read_into(o, dst[pos:pos + n])
            pos += n

    def write(self, off: int, data: Buffer) -> None:
        mv = memoryview(data).cast("B")
        pos = 0
        for r, o, n in self._pieces(off, len(mv)) if len(mv) else ():
            r.write(o, mv[pos:pos + n])
            pos += n

    def fill(self, off: int, length: int, value: int = 0) -> None:
        for r, o, n in self._pieces(off, length) if length else ():
            r.fill(o, n, value)

    def view(self, off: int, length: int) -> memoryview:
        r, o = self._locate(off, length)
        return r.view(o, length)

    def buffer(self) -> memoryview:
        """There is no one flat buffer: the compiled data path is for a plain :class:`Region`."""
        raise MemoryAccessError(f"{self.name}: several regions, no flat buffer")

    def u16_array(self, off: int, count: int) -> memoryview:
        r, o = self._locate(off, 2 * count)
        return r.u16_array(o, count)

    def u32_array(self, off: int, count: int) -> memoryview:
        r, o = self._locate(off, 4 * count)
        return r.u32_array(o, count)

    def _scalars(self, off: int, count: int, code: Literal["H", "I", "Q"],
                 size: int) -> memoryview:
        r, o = self._locate(off, size * count)
        return r._scalars(o, count, code, size)

    def array(self, dtype: np.dtype | type, off: int, count: int) -> np.ndarray:
        r, o = self._locate(off, np.dtype(dtype).itemsize * count)
        return r.array(dtype, o, count)

    def sub(self, off: int, size: int, name: str | None = None) -> Region:
        r, o = self._locate(off, size)
        return r.sub(o, size, name)


def _close_map(mm: mmap.mmap) -> None:
    try:
        mm.close()
    except BufferError:
        pass  # still viewed: unmapped by the last view's release
