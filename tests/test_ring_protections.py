"""The checks between an untrusted peer and our memory, each held by a test that names it.

Every ``pytest.raises`` here matches the message of the one check it is about, so a test cannot
pass through a different check (tests/mutants.py removes each check in turn and expects a
failure from here). A check whose removal would loop forever (the chain-length bound) is run
under a CPU-time alarm that fails the test instead of hanging it.
"""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Iterator
from typing import Any

import pytest

from ivshmem_virtio import _native
from ivshmem_virtio.errors import MemoryAccessError, RingError
from ivshmem_virtio.shm import Region
from ivshmem_virtio.spec import blk as B
from ivshmem_virtio.spec import ring as R
from ivshmem_virtio.virtqueue.device import DeviceQueue
from ivshmem_virtio.virtqueue.driver import DriverQueue

MEM = 1 << 16
BASE = 0x1000
N = 8
OUTSIDE = "outside"


@contextlib.contextmanager
def cpu_deadline(seconds: float, what: str) -> Iterator[None]:
    """Fail (AssertionError) once this process has used ``seconds`` of CPU: immune to the
    machine's load, since a descheduled process uses none."""

    def expire(signum: int, frame: object) -> None:
        raise AssertionError(f"{what}: still running after {seconds} s of CPU")

    old = signal.signal(signal.SIGPROF, expire)
    signal.setitimer(signal.ITIMER_PROF, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_PROF, 0)
        signal.signal(signal.SIGPROF, old)


# -- Region: no access leaves the window ----------------------------------------------------------
ACCESSES = {
    "read past end": lambda r: r.read(60, 8),
    "read negative": lambda r: r.read(-1, 1),
    "read_into past end": lambda r: r.read_into(60, memoryview(bytearray(8))),
    "write past end": lambda r: r.write(60, b"x" * 8),
    "write negative": lambda r: r.write(-2, b"xy"),
    "view past end": lambda r: r.view(60, 8),
    "view negative": lambda r: r.view(-4, 4),
    "u8": lambda r: r.u8(64),
    "u8 negative": lambda r: r.u8(-1),
    "u16": lambda r: r.u16(64),
    "u32": lambda r: r.u32(62),
    "u64": lambda r: r.u64(60),
    "set_u8": lambda r: r.set_u8(64, 1),
    "set_u16": lambda r: r.set_u16(64, 1),
    "set_u32": lambda r: r.set_u32(64, 1),
    "set_u64": lambda r: r.set_u64(60, 1),
    "unpack": lambda r: r.unpack(B.OUTHDR, 56),
    "pack": lambda r: r.pack(B.OUTHDR, 56, 1, 2, 3),
    "fill": lambda r: r.fill(60, 8, 0xEE),
    "sub": lambda r: r.sub(32, 64),
    "u16_array": lambda r: r.u16_array(60, 4),
}


@pytest.mark.parametrize("access", sorted(ACCESSES))
def test_region_refuses_every_access_outside(access):
    backing = bytearray(range(64)) + bytearray(b"\xAA" * 64)  # a canary after the window
    r = Region(backing, 0, 64, name="win")
    with pytest.raises(MemoryAccessError, match=OUTSIDE):
        ACCESSES[access](r)
    assert backing == bytearray(range(64)) + bytearray(b"\xAA" * 64)


def test_region_window_in_a_larger_buffer():
    """A window at an offset: its own bounds, not the buffer's, are the limit."""
    backing = bytearray(256)
    r = Region(backing, 64, 64)
    r.write(0, b"a" * 64)
    with pytest.raises(MemoryAccessError, match=OUTSIDE):
        r.write(1, b"a" * 64)
    with pytest.raises(MemoryAccessError, match=OUTSIDE):
        r.view(0, 65)
    assert backing[:64] == bytes(64) and backing[128:] == bytes(128)


# -- device side: a ring the driver wrote ---------------------------------------------------------
def device_queue(indirect: bool = False) -> tuple[Region, DeviceQueue]:
    mem = Region(bytearray(MEM), name="section")
    d, a, u = R.vring_layout(N, 64)
    return mem, DeviceQueue(mem, N, BASE + d, BASE + a, BASE + u, indirect=indirect)


def put_desc(mem: Region, table: int, i: int, addr: int, length: int, flags: int,
             nxt: int) -> None:
    mem.pack(R.DESC, table + 16 * i, addr, length, flags, nxt)


def offer(mem: Region, vq: DeviceQueue, head: int, count: int = 1) -> None:
    for k in range(count):
        mem.set_u16(vq.avail + R.AVAIL_RING + 2 * k, head)
    mem.set_u16(vq.avail + R.AVAIL_IDX, count)


@pytest.mark.parametrize("cycle", [1, 2, N])
def test_chain_that_loops_is_a_ring_error(cycle):
    mem, vq = device_queue()
    for i in range(cycle):
        put_desc(mem, vq.desc, i, 0x8000, 16, R.DESC_F_NEXT, (i + 1) % cycle)
    offer(mem, vq, 0)
    with cpu_deadline(0.5, "walk of a looping chain"), \
            pytest.raises(RingError, match="loops or is longer than the table"):
        vq.pop_all()


def test_loop_inside_an_indirect_table_is_a_ring_error():
    mem, vq = device_queue(indirect=True)
    table = 0x9000
    for i in range(4):
        put_desc(mem, table, i, 0x8000, 16, R.DESC_F_NEXT, (i + 1) % 4)
    put_desc(mem, vq.desc, 0, table, 4 * 16, R.DESC_F_INDIRECT, 0)
    offer(mem, vq, 0)
    with cpu_deadline(0.5, "walk of a looping indirect table"), \
            pytest.raises(RingError, match="loops or is longer than the table"):
        vq.pop_all()


def test_longest_legal_chain_is_walked():
    """The bound is the table size, not less: a chain through every descriptor is fine."""
    mem, vq = device_queue()
    for i in range(N):
        last = i == N - 1
        put_desc(mem, vq.desc, i, 0x8000 + 16 * i, 16, 0 if last else R.DESC_F_NEXT, i + 1)
    offer(mem, vq, 0)
    (chain,) = vq.pop_all()
    assert len(chain.readable) == N and chain.error is None


@pytest.mark.parametrize("ahead", [N + 1, 0x8000, 0xFFFF])
def test_avail_index_jump_is_a_ring_error(ahead):
    mem, vq = device_queue()
    put_desc(mem, vq.desc, 0, 0x8000, 16, 0, 0)
    mem.set_u16(vq.avail + R.AVAIL_IDX, ahead)
    with pytest.raises(RingError, match=f"avail index jumped {ahead} entries ahead"):
        vq.pop_all()
    with pytest.raises(RingError, match=f"avail index jumped {ahead} entries ahead"):
        vq.pending()
    with pytest.raises(RingError, match="avail index jumped"):
        vq.enable_notifications()


def test_avail_index_at_the_limit_is_served():
    mem, vq = device_queue()
    put_desc(mem, vq.desc, 0, 0x8000, 16, 0, 0)
    offer(mem, vq, 0, count=N)
    assert vq.pending() == N
    assert len(vq.pop_all()) == N


# -- driver side: a used ring the device wrote ----------------------------------------------------
def driver_queue() -> tuple[Region, DriverQueue]:
    mem = Region(bytearray(MEM), name="section")
    d, a, u = R.vring_layout(N, 64)
    return mem, DriverQueue(mem, N, BASE + d, BASE + a, BASE + u, alloc=lambda n: 0x8000,
                            free=lambda off: None)


@pytest.mark.parametrize("reported", [3, N, 0x8000])
def test_used_index_beyond_what_is_in_flight_is_a_ring_error(reported):
    mem, drv = driver_queue()
    drv.add([(0x100, 16)], [(0x200, 1)], token="only")
    mem.pack(R.USED_ELEM, drv.used + R.USED_RING, 0, 1)
    mem.set_u16(drv.used + R.USED_IDX, reported)
    # (the bound counts descriptors in flight: 2 for this chain)
    with pytest.raises(RingError, match=f"device reports {reported} used entries with only 2 "
                                        "in flight"):
        drv.get_used()


@pytest.mark.parametrize("compiled", [False, True])
def test_completions_before_a_bad_used_element_reach_their_callers(compiled):
    """Two real completions, then an element naming a descriptor not in flight: the two are
    returned (dropping them would leave their callers waiting forever: they are no longer in
    flight, so a reset would not resubmit them), and the next call raises at the bad one. The
    compiled queue (frontend/_frontpath) follows the same rule."""
    mem, drv = driver_queue()
    q: Any = drv
    if compiled:
        nat = _native.front_native()
        if nat is None:
            pytest.skip(f"frontend path: {_native.front_path()}")
        q = drv.compiled(nat)
    heads = [q.add([(0x100 + 0x40 * i, 16)], [(0x200 + 0x40 * i, 1)], f"r{i}")
             for i in range(3)]
    for slot, head in enumerate([heads[0], heads[1], N - 1]):  # N - 1: never handed out
        mem.pack(R.USED_ELEM, q.used + R.USED_RING + 8 * slot, head, 1)
    mem.set_u16(q.used + R.USED_IDX, 3)
    try:
        got: object = q.get_used()
    except RingError as e:  # (the two dropped with it: the check below says so)
        got = e
    assert got == [("r0", 1), ("r1", 1)]
    with pytest.raises(RingError, match=f"device completed descriptor {N - 1}, which is not "
                                        "in flight"):
        q.get_used()


def test_used_index_of_what_is_in_flight_is_taken():
    mem, drv = driver_queue()
    drv.add([(0x100, 16)], [(0x200, 1)], token="only")
    mem.pack(R.USED_ELEM, drv.used + R.USED_RING, 0, 1)
    mem.set_u16(drv.used + R.USED_IDX, 1)
    assert drv.get_used() == [("only", 1)]
