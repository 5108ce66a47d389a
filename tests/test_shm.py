"""Shared-memory scalars are single loads and stores: another process never sees a torn index."""

from __future__ import annotations

import mmap
import os
import signal

import pytest

from ivshmem_virtio.errors import MemoryAccessError
from ivshmem_virtio.shm import Region, map_fd, memfd


@pytest.mark.parametrize("width,a,b", [(2, 0x00FF, 0x0100), (4, 0x0000FFFF, 0x00010000),
                                       (8, 0x00000000FFFFFFFF, 0x0000000100000000)])
def test_no_torn_values_across_processes(width, a, b):
    fd = memfd("torn-test", 4096)
    mm = map_fd(fd, 4096)
    os.close(fd)
    region = Region(mm, 0, 4096)
    get = {2: region.u16, 4: region.u32, 8: region.u64}[width]
    put = {2: region.set_u16, 4: region.set_u32, 8: region.set_u64}[width]
    put(64, a)
    pid = os.fork()
    if pid == 0:  # writer: toggle between two values whose bytes all differ in part
        try:
            for _ in range(400_000):
                put(64, b)
                put(64, a)
        finally:
            os._exit(0)
    try:
        seen = {get(64) for _ in range(200_000)}
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    assert seen <= {a, b}, f"torn values: {[hex(v) for v in seen - {a, b}]}"


def test_bounds_and_unaligned_access():
    r = Region(bytearray(64), name="t")
    r.set_u16(3, 0xABCD)  # unaligned offsets still work (byte-wise path)
    assert r.u16(3) == 0xABCD
    r.set_u64(56, 2**64 - 1)
    assert r.u64(56) == 2**64 - 1
    for off, n in ((63, 2), (64, 1), (-1, 1), (0, 65)):
        with pytest.raises(MemoryAccessError):
            r.read(off, n)
    with pytest.raises(MemoryAccessError):
        r.u32(62)
    with pytest.raises(MemoryAccessError):
        r.sub(60, 8)
    sub = r.sub(8, 16)
    sub.set_u32(0, 7)
    assert r.u32(8) == 7
    with pytest.raises(MemoryAccessError):
        sub.u32(16)


def test_region_over_an_odd_sized_window():
    mm = mmap.mmap(-1, 4096)
    r = Region(mm, 4, 21)
    r.set_u16(18, 0x1234)
    assert r.u16(18) == 0x1234
    r.set_u32(16, 0x01020304)
    assert r.u32(16) == 0x01020304


def test_barriers_per_cpu():
    """x86: no store->store barrier needed, a lock round trip (locked atomic) for store->load.
    A weakly ordered CPU: libatomic's seq_cst thread fence for both, callable through ctypes
    (exercised here with the host's libatomic); without libatomic: not exact."""
    from ivshmem_virtio import shm

    fence, full, exact = shm.pick_barriers("x86_64")
    assert exact and fence is shm._no_barrier and full is shm._lock_round_trip
    calls = []
    fence, full, exact = shm.pick_barriers("aarch64", load=lambda: calls.append)
    assert exact and fence is not shm._lock_round_trip
    fence()
    full()
    assert calls == [5, 5]  # __ATOMIC_SEQ_CST
    real = shm._load_thread_fence()
    assert real is not None, "libatomic (the runtime of gcc) is missing on this host"
    real(5)
    assert shm.pick_barriers("aarch64", load=lambda: None)[2] is False


def test_open_link_refuses_a_cpu_without_barriers(monkeypatch):
    from ivshmem_virtio import link, shm
    from ivshmem_virtio.errors import ConfigError

    monkeypatch.setattr(shm, "BARRIERS_EXACT", False)
    with pytest.raises(ConfigError, match="libatomic"):
        link.open_link("sim:/nonexistent.sock", backend=True)
