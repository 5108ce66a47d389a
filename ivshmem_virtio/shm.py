"""Shared memory: the one module that touches mapped bytes.

Everything above this module takes a :class:`Region` (memory is a parameter, as in rust-vmm's
virtio-queue), so the same ring and transport code runs on a memfd shared with another
process, a uio mapping of real ivshmem memory, or a plain ``bytearray`` in a test. A region is a
bounds-checked window; an access that would leave it raises :class:`MemoryAccessError` instead
of touching anything outside. Device registers are different: they are trapped by the hypervisor, so
:class:`Registers` issues exactly one aligned 32-bit load or store per access.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import mmap
import os
import platform
import struct
import sys
import threading
from collections.abc import Callable
from typing import Any, Literal, Protocol, TypeAlias

import numpy as np

from .errors import MemoryAccessError

Buffer: TypeAlias = "bytes | bytearray | memoryview | mmap.mmap"

_U8 = struct.Struct("<B")
_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")

_LE = sys.byteorder == "little"
_X86_NAMES = ("x86_64", "amd64", "i386", "i686")
_SEQ_CST = 5  # __ATOMIC_SEQ_CST
_fence_lock = threading.Lock()


_fence_acquire = _fence_lock.acquire
_fence_release = _fence_lock.release


def _lock_round_trip() -> None:
    """A lock acquire + release: a locked atomic on x86, i.e. a full barrier there.

    Two bound-method calls rather than ``with``: ~100 ns instead of ~170 ns a call, and it runs
    twice per request (publishing a used index, deciding on a kick). Nothing between them can
    raise, so the lock is always released.
    """
    _fence_acquire()
    _fence_release()


def _no_barrier() -> None:
    """x86 stores stay in order with stores, loads with loads (TSO); calls are compiler barriers."""


def _load_thread_fence() -> Callable[[int], None] | None:
    """C11 ``atomic_thread_fence`` from libatomic (``dmb ish`` on arm64, ``mfence`` on x86)."""
    try:
        lib = ctypes.CDLL(ctypes.util.find_library("atomic") or "libatomic.so.1")
        fn = lib.atomic_thread_fence
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int]
    fn.restype = None
    return fn


def pick_barriers(machine: str, load: Callable[[], Callable[[int], None] | None]
                  = _load_thread_fence) -> tuple[Callable[[], None], Callable[[], None], bool]:
    """``(fence, full_fence, exact)`` for a CPU: ``exact`` False means no real barrier exists.

    Python has no barrier of its own. On x86 (TSO) only store -> load needs one, and a lock
    round trip is a locked instruction, a full barrier. On a weakly ordered CPU (arm64) a lock
    round trip is an acquire and a release, which lets accesses on both sides move into it and
    pass each other (stores can become visible out of order): there both barriers are libatomic's
    ``atomic_thread_fence(seq_cst)`` through ctypes, ``dmb ish`` (~0.3 us a call).
    """
    if machine.lower() in _X86_NAMES:
        return _no_barrier, _lock_round_trip, True
    thread_fence = load()
    if thread_fence is None:
        return _lock_round_trip, _lock_round_trip, False
    barrier = functools.partial(thread_fence, _SEQ_CST)
    return barrier, barrier, True


#: ``fence()``: barrier between publishing data and publishing its index (store -> store,
#: load -> load); empty on x86, ``dmb ish`` on arm64.
#: ``full_fence()``: store -> load, for the event-index handshake (store our index, load the
#: peer's suppression index; the peer does the mirror image). That is Dekker's pattern: even x86
#: TSO may satisfy the load before the store leaves the store buffer, and both sides then skip
#: the notification (a lost interrupt, the reason Linux uses virtio_mb() there). ~0.1 us on x86.
fence, full_fence, BARRIERS_EXACT = pick_barriers(platform.machine())
#: what open_link tells a user whose CPU has no usable barrier (docs/decisions.md)
BARRIER_HELP = (f"this {platform.machine()} CPU orders memory weakly and needs libatomic for the "
                "barriers of the shared rings: install it (Debian: apt install libatomic1)")


class Region:
    """A bounds-checked window ``[0, size)`` onto a buffer (mmap, bytearray, ...)."""

    __slots__ = ("name", "size", "base", "_mv", "_h", "_i", "_q")
    _mv: memoryview[int]
    _h: memoryview[int] | None  # the region as aligned u16/u32/u64 (little-endian hosts)
    _i: memoryview[int] | None
    _q: memoryview[int] | None

    def __init__(self, buf: Buffer, offset: int = 0, size: int | None = None,
                 name: str = "region") -> None:
        mv = memoryview(buf).cast("B")
        if size is None:
            size = len(mv) - offset
        if offset < 0 or size < 0 or offset + size > len(mv):
            raise MemoryAccessError(f"{name}: window {offset:#x}+{size:#x} outside buffer "
                                    f"of {len(mv):#x} bytes")
        self.name = name
        self.size = size
        self.base = offset  # offset of this window inside the underlying buffer (for tests/logs)
        self._mv = mv[offset:offset + size]
        self._typed()

    # -- bounds -------------------------------------------------------------------------------
    def contains(self, off: int, length: int) -> bool:
        """True when ``[off, off+length)`` lies inside the region (no overflow tricks possible)."""
        return 0 <= off and 0 <= length and off + length <= self.size

    def check(self, off: int, length: int) -> None:
        if not (0 <= off and 0 <= length and off + length <= self.size):
            raise MemoryAccessError(
                f"{self.name}: access {off:#x}+{length:#x} outside {self.size:#x} bytes")

    # -- scalar access (little endian, as the wire is) ------------------------------------------
    # Aligned scalars go through typed views of the whole region (``memoryview.cast``): one
    # fixed-size load or store in C. struct's '<' codecs move one byte at a time, so a peer could
    # see a torn index (avail->idx 0x00FF -> 0x0100 passing through 0x0000 or 0x01FF). Unaligned
    # offsets (never used for shared indices) fall back to struct.
    def _typed(self) -> None:
        n = self.size
        mv = self._mv
        self._h = mv[: n - n % 2].cast("H") if _LE else None
        self._i = mv[: n - n % 4].cast("I") if _LE else None
        self._q = mv[: n - n % 8].cast("Q") if _LE else None

    # The hot accessors spell the bounds check out instead of calling :meth:`check`: the same
    # test, one Python call less per access (~60 ns on the per-request path).
    def u8(self, off: int) -> int:
        if not 0 <= off < self.size:
            self.check(off, 1)
        return self._mv[off]

    def u16(self, off: int) -> int:
        self.check(off, 2)
        if not off & 1 and self._h is not None:
            return self._h[off >> 1]
        v: int = _U16.unpack_from(self._mv, off)[0]
        return v

    def u32(self, off: int) -> int:
        self.check(off, 4)
        if not off & 3 and self._i is not None:
            return self._i[off >> 2]
        v: int = _U32.unpack_from(self._mv, off)[0]
        return v

    def u64(self, off: int) -> int:
        self.check(off, 8)
        if not off & 7 and self._q is not None and off + 8 <= len(self._q) * 8:
            return self._q[off >> 3]
        v: int = _U64.unpack_from(self._mv, off)[0]
        return v

    def set_u8(self, off: int, value: int) -> None:
        if not 0 <= off < self.size:
            self.check(off, 1)
        self._mv[off] = value & 0xFF

    def set_u16(self, off: int, value: int) -> None:
        self.check(off, 2)
        if not off & 1 and self._h is not None:
            self._h[off >> 1] = value & 0xFFFF
        else:
            _U16.pack_into(self._mv, off, value & 0xFFFF)

    def set_u32(self, off: int, value: int) -> None:
        self.check(off, 4)
        if not off & 3 and self._i is not None:
            self._i[off >> 2] = value & 0xFFFFFFFF
        else:
            _U32.pack_into(self._mv, off, value & 0xFFFFFFFF)

    def set_u64(self, off: int, value: int) -> None:
        self.check(off, 8)
        if not off & 7 and self._q is not None and off + 8 <= len(self._q) * 8:
            self._q[off >> 3] = value & 0xFFFFFFFFFFFFFFFF
        else:
            _U64.pack_into(self._mv, off, value & 0xFFFFFFFFFFFFFFFF)

    def unpack(self, st: struct.Struct, off: int) -> tuple[Any, ...]:
        """Unpack a precompiled struct at ``off`` (one bounds check for the whole record)."""
        if not 0 <= off <= self.size - st.size:
            self.check(off, st.size)
        return st.unpack_from(self._mv, off)

    def pack(self, st: struct.Struct, off: int, *values: int) -> None:
        if not 0 <= off <= self.size - st.size:
            self.check(off, st.size)
        st.pack_into(self._mv, off, *values)

    # -- bulk access --------------------------------------------------------------------------
    def read(self, off: int, length: int) -> bytes:
        if not (0 <= off and 0 <= length and off + length <= self.size):
            self.check(off, length)
        return bytes(self._mv[off:off + length])

    def read_into(self, off: int, dst: memoryview) -> None:
        """Copy ``len(dst)`` bytes at ``off`` into ``dst`` (one memcpy, no temporary bytes)."""
        n = len(dst)
        if not (0 <= off and off + n <= self.size):
            self.check(off, n)
        dst[:] = self._mv[off:off + n]

    def write(self, off: int, data: Buffer) -> None:
        data = memoryview(data).cast("B")
        n = len(data)
        if not (0 <= off and off + n <= self.size):
            self.check(off, n)
        self._mv[off:off + n] = data

    def fill(self, off: int, length: int, value: int = 0) -> None:
        self.check(off, length)
        self.array(np.uint8, off, length)[:] = value

    def view(self, off: int, length: int) -> memoryview:
        """A writable view for zero-copy I/O (``os.preadv`` straight into shared memory)."""
        if not (0 <= off and 0 <= length and off + length <= self.size):
            self.check(off, length)
        return self._mv[off:off + length]

    def buffer(self) -> memoryview:
        """The whole window as one writable byte view, for the compiled data path
        (``ivshmem_virtio/_native``), which checks its own bounds against ``len()`` of it."""
        return self._mv

    def u16_array(self, off: int, count: int) -> memoryview:
        """``count`` aligned little-endian u16 (a ring, an index): each item one 16-bit access.

        Bounds are checked here, once; indexing the result checks the index. For the hot
        paths that set a ring up once and then touch it per request.
        """
        return self._scalars(off, count, "H", 2)

    def u32_array(self, off: int, count: int) -> memoryview:
        """Like :meth:`u16_array`, for aligned u32 (a header word polled on the hot path)."""
        return self._scalars(off, count, "I", 4)

    def _scalars(self, off: int, count: int, code: Literal["H", "I", "Q"],
                 size: int) -> memoryview[int]:
        self.check(off, size * count)
        if off % size or not _LE:
            raise MemoryAccessError(f"{self.name}: u{8 * size} array at {off:#x} needs an "
                                    "aligned offset on a little-endian host")
        return self._mv[off:off + size * count].cast(code)

    def array(self, dtype: np.dtype | type, off: int, count: int) -> np.ndarray:
        """A numpy view of ``count`` items of ``dtype`` at ``off`` (ring arrays, bulk fills)."""
        dt = np.dtype(dtype)
        self.check(off, dt.itemsize * count)
        return np.frombuffer(self._mv, dtype=dt, count=count, offset=off)

    def sub(self, off: int, size: int, name: str | None = None) -> Region:
        """A narrower window; addresses inside it are relative to ``off``."""
        self.check(off, size)
        return Region(self._mv, off, size, name or self.name)


class WordIO(Protocol):
    """What :class:`Registers` needs: 32-bit word indexing (a ``memoryview.cast('I')``)."""

    def __getitem__(self, index: int) -> int: ...
    def __setitem__(self, index: int, value: int) -> None: ...


class Registers:
    """An ivshmem register page: every access is one aligned 32-bit load or store.

    Jailhouse traps and emulates these registers and only decodes simple 32-bit moves (no LDP/STP,
    no SIMD, no byte-wise memcpy), so slices are never used here. CPython's ``memoryview`` of
    format ``'I'`` reads and writes an item with a single 4-byte copy, which compilers emit as
    one load or store.
    """

    __slots__ = ("_words", "size")

    def __init__(self, words: WordIO, size: int) -> None:
        self._words = words
        self.size = size

    @classmethod
    def from_buffer(cls, buf: Buffer) -> Registers:
        mv = memoryview(buf).cast("B")
        return cls(mv.cast("I"), len(mv))

    def read32(self, off: int) -> int:
        if off & 3 or not 0 <= off < self.size:
            raise MemoryAccessError(f"register access at {off:#x} is not an aligned word")
        return self._words[off >> 2]

    def write32(self, off: int, value: int) -> None:
        if off & 3 or not 0 <= off < self.size:
            raise MemoryAccessError(f"register access at {off:#x} is not an aligned word")
        self._words[off >> 2] = value & 0xFFFFFFFF


def map_fd(fd: int, length: int, offset: int = 0, writable: bool = True) -> mmap.mmap:
    """Map ``length`` bytes of ``fd`` shared (a memfd, or a uio map at ``k * PAGE_SIZE``)."""
    prot = mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0)
    return mmap.mmap(fd, length, flags=mmap.MAP_SHARED, prot=prot, offset=offset)


def memfd(name: str, size: int) -> int:
    """An anonymous shared-memory file of ``size`` bytes (closed on exec)."""
    fd = os.memfd_create(name, os.MFD_CLOEXEC)
    try:
        os.ftruncate(fd, size)
    except BaseException:
        os.close(fd)
        raise
    return fd
