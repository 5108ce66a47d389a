"""Split virtqueues on a bytearray: both sides, event-idx, indirect, and hostile rings."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ivshmem_virtio.errors import MemoryAccessError, RingError
from ivshmem_virtio.shm import Region
from ivshmem_virtio.spec import ring as R
from ivshmem_virtio.virtqueue.device import DeviceQueue
from ivshmem_virtio.virtqueue.driver import DriverQueue

MEM = 1 << 16
BASE = 0x1000
N = 8


def make(event_idx: bool = False, indirect: bool = False, size: int = N):
    mem = Region(bytearray(MEM), name="test section")
    d, a, u = R.vring_layout(size, 64)
    nxt = [0x8000]

    def alloc(n: int) -> int:
        off = nxt[0]
        nxt[0] += (n + 15) & ~15
        if nxt[0] > MEM:
            nxt[0] = 0x8000
            off = nxt[0]
            nxt[0] += (n + 15) & ~15
        return off

    drv = DriverQueue(mem, size, BASE + d, BASE + a, BASE + u, event_idx=event_idx,
                      indirect=indirect, alloc=alloc, free=lambda off: None)
    dev = DeviceQueue(mem, size, BASE + d, BASE + a, BASE + u, event_idx=event_idx,
                      indirect=indirect)
    return mem, drv, dev


@pytest.mark.parametrize("event_idx", [False, True])
@pytest.mark.parametrize("indirect", [False, True])
def test_round_trip_many_wraps(event_idx, indirect):
    mem, drv, dev = make(event_idx, indirect)
    inn = [(0x200 + 0x200 * i, 512) for i in range(5)] + [(0x1000, 1)]  # long: indirect if on
    for k in range(70000 // 50):  # wraps the 16-bit indices
        short = k % 2 == 0
        drv.add([(0x100, 16)], [(0x200, 512), (0x400, 1)] if short else inn, token=k)
        head = dev.mem.u16(dev.avail + 4 + 2 * (dev.last_avail % N))
        flags = dev.mem.u16(dev.desc + 16 * head + 12)
        assert bool(flags & R.DESC_F_INDIRECT) == (indirect and not short)
        chain = dev.pop()
        assert chain is not None and chain.error is None
        assert chain.readable == [(0x100, 16)]
        assert chain.writable == ([(0x200, 512), (0x400, 1)] if short else inn)
        dev.push(chain.head, 513)
        dev.publish()
        assert drv.get_used() == [(k, 513)]
    assert drv.num_free == N


def test_full_queue_and_batches():
    _, drv, dev = make()
    for k in range(N):
        drv.add([(0x100, 16)], [], token=k)
    assert not drv.can_add(1)
    with pytest.raises(RingError):
        drv.add([(0x100, 16)], [], token="x")
    chains = dev.pop_all()
    assert [c.head for c in chains] == list(range(N))
    for c in reversed(chains):  # out-of-order completion
        dev.push(c.head, 0)
    dev.publish()
    assert [t for t, _ in drv.get_used()] == list(reversed(range(N)))


def test_event_idx_suppression_both_ways():
    _, drv, dev = make(event_idx=True)
    drv.add([(0x100, 1)], [], token=0)
    assert drv.kick_needed()  # avail_event starts at 0
    drv.add([(0x100, 1)], [], token=1)
    assert not drv.kick_needed()  # device did not ask for more
    dev.pop_all()
    assert not dev.enable_notifications()  # avail_event = 2
    drv.add([(0x100, 1)], [], token=2)
    assert drv.kick_needed()
    # device -> driver: the driver asked for an interrupt after used idx 0
    dev.pop_all()
    for head in (0, 1, 2):
        dev.push(head, 0)
    assert dev.publish()
    drv.get_used()  # used_event = 3
    assert not dev.publish()  # nothing new


@pytest.mark.parametrize("event_idx", [False, True])
def test_suppressed_interrupts_stay_off_across_get_used(event_idx):
    """A polling driver consumes completions with interrupts off, across 16-bit wraps: not one
    interrupt is asked for until it turns them on again; then the next completion asks."""
    _, drv, dev = make(event_idx=event_idx)
    drv.suppress_interrupts(True)
    for k in range(70000):
        drv.add([(0x100, 16)], [], token=k)
        chain = dev.pop()
        assert chain is not None
        dev.push(chain.head, 0)
        assert not dev.publish(), k
        assert drv.get_used() == [(k, 0)]
    drv.suppress_interrupts(False)
    drv.add([(0x100, 16)], [], token="on")
    chain = dev.pop()
    assert chain is not None
    dev.push(chain.head, 0)
    assert dev.publish()


def test_flags_suppression_without_event_idx():
    _, drv, dev = make()
    dev.disable_notifications()
    drv.add([(0x100, 1)], [], token=0)
    assert not drv.kick_needed()
    dev.pop_all()
    dev.enable_notifications()
    drv.add([(0x100, 1)], [], token=1)
    assert drv.kick_needed()
    drv.suppress_interrupts(True)
    dev.pop_all()
    dev.push(0, 0)
    assert not dev.publish()


# -- hostile driver: raw ring bytes ---------------------------------------------------------------
def raw(mem: Region, descs: list[tuple[int, int, int, int]], heads: list[int],
        avail_idx: int | None = None, table: int = BASE):
    d, a, _u = R.vring_layout(N, 64)
    for i, desc in enumerate(descs):
        mem.pack(R.DESC, table + 16 * i, *desc)
    for i, h in enumerate(heads):
        mem.set_u16(BASE + a + 4 + 2 * i, h)
    mem.set_u16(BASE + a + 2, len(heads) if avail_idx is None else avail_idx)


def test_avail_index_jump_is_a_ring_error():
    mem, _, dev = make()
    raw(mem, [], [], avail_idx=N + 1)
    with pytest.raises(RingError, match="jumped"):
        dev.pop()


def test_head_out_of_range():
    mem, _, dev = make()
    raw(mem, [], [N])
    with pytest.raises(RingError):
        dev.pop()


def test_looping_chain_is_bounded():
    mem, _, dev = make()
    raw(mem, [(0x100, 1, R.DESC_F_NEXT, 1), (0x100, 1, R.DESC_F_NEXT, 0)], [0])
    with pytest.raises(RingError, match="loop"):
        dev.pop()


def test_chain_longer_than_queue():
    mem, _, dev = make()
    descs = [(0x100, 1, R.DESC_F_NEXT, i + 1) for i in range(N - 1)] + [
        (0x100, 1, R.DESC_F_NEXT, 0)]
    raw(mem, descs, [0])
    with pytest.raises(RingError):
        dev.pop()


def test_next_out_of_range():
    mem, _, dev = make()
    raw(mem, [(0x100, 1, R.DESC_F_NEXT, 200)], [0])
    with pytest.raises(RingError, match="beyond"):
        dev.pop()


@pytest.mark.parametrize("addr,length", [(MEM - 4, 16), (MEM, 1), (2**63, 1), (0, 2**32 - 1)])
def test_out_of_range_buffer_is_recorded_not_touched(addr, length):
    mem, _, dev = make()
    raw(mem, [(addr, length, R.DESC_F_NEXT, 1), (0x400, 1, R.DESC_F_WRITE, 0)], [0])
    chain = dev.pop()
    assert chain is not None and chain.error and "outside" in chain.error
    assert chain.writable == [(0x400, 1)]  # the status byte is still reachable
    with pytest.raises(MemoryAccessError):
        mem.view(addr, length)


@pytest.mark.parametrize("desc,err", [
    ((0x8000, 16, R.DESC_F_INDIRECT | R.DESC_F_NEXT, 0), "NEXT"),
    ((0x8000, 15, R.DESC_F_INDIRECT, 0), "multiple of 16"),
    ((MEM - 16, 32, R.DESC_F_INDIRECT, 0), "outside"),
])
def test_bad_indirect_tables(desc, err):
    mem, _, dev = make(indirect=True)
    raw(mem, [desc], [0])
    with pytest.raises(RingError, match=err):
        dev.pop()


def test_nested_indirect_and_indirect_without_feature():
    mem, _, dev = make(indirect=True)
    raw(mem, [(0x8000, 32, R.DESC_F_INDIRECT, 0)], [0])
    mem.pack(R.DESC, 0x8000, 0x9000, 16, R.DESC_F_INDIRECT, 0)
    with pytest.raises(RingError, match="nested"):
        dev.pop()
    mem2, _, dev2 = make(indirect=False)
    raw(mem2, [(0x8000, 16, R.DESC_F_INDIRECT, 0)], [0])
    with pytest.raises(RingError, match="INDIRECT_DESC"):
        dev2.pop()


def test_indirect_loop_is_bounded():
    mem, _, dev = make(indirect=True)
    raw(mem, [(0x8000, 32, R.DESC_F_INDIRECT, 0)], [0])
    mem.pack(R.DESC, 0x8000, 0x100, 1, R.DESC_F_NEXT, 1)
    mem.pack(R.DESC, 0x8010, 0x100, 1, R.DESC_F_NEXT, 0)
    with pytest.raises(RingError):
        dev.pop()


@pytest.mark.parametrize("geometry", [
    (3, BASE, BASE + 0x100, BASE + 0x200),  # not a power of two
    (0, BASE, BASE + 0x100, BASE + 0x200),
    (8, BASE + 1, BASE + 0x100, BASE + 0x200),  # misaligned desc
    (8, MEM - 64, BASE + 0x100, BASE + 0x200),  # desc outside
    (8, BASE, BASE + 0x40, BASE + 0x200),  # avail overlaps desc
    (8, BASE, BASE + 0x100, MEM - 8),  # used outside
])
def test_geometry_validated_at_enable(geometry):
    mem = Region(bytearray(MEM))
    with pytest.raises(RingError):
        DeviceQueue(mem, *geometry)


def test_hostile_device_cannot_corrupt_driver():
    mem, drv, dev = make()
    drv.add([(0x100, 1)], [], token="a")
    d, a, u = R.vring_layout(N, 64)
    mem.set_u16(BASE + u + 2, 5)  # used idx runs ahead
    with pytest.raises(RingError):
        drv.get_used()
    mem2, drv2, _ = make()
    drv2.add([(0x100, 1)], [], token="a")
    mem2.pack(R.USED_ELEM, BASE + u + 4, 7, 0)  # names a descriptor not in flight
    mem2.set_u16(BASE + u + 2, 1)
    with pytest.raises(RingError, match="not in flight"):
        drv2.get_used()


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(min_size=0x400, max_size=0x400), st.booleans(), st.booleans())
def test_fuzz_random_rings_never_escape(data: bytes, event_idx: bool, indirect: bool):
    """Whatever the driver wrote, the device side raises RingError or returns valid chains."""
    mem = Region(bytearray(0x4000))
    mem.write(0, data)
    mem.write(0x400, data)  # indirect tables land here sometimes
    d, a, u = R.vring_layout(N, 64)
    dev = DeviceQueue(mem, N, d, a, u, event_idx=event_idx, indirect=indirect)
    try:
        for chain in dev.pop_all():
            if chain.error is None:
                for addr, length in chain.readable + chain.writable:
                    assert mem.contains(addr, length)
            assert len(chain.readable) + len(chain.writable) <= max(N, R.MAX_QUEUE_SIZE)
    except RingError:
        pass


def long_table(mem: Region, entries: list[tuple[int, int, int]], table: int = 0x8000,
               nexts: list[int] | None = None) -> None:
    """An indirect table of len(entries) descriptors, chained in order unless ``nexts``."""
    n = len(entries)
    for i, (addr, length, flags) in enumerate(entries):
        nxt = (nexts[i] if nexts else i + 1) if i < n - 1 else 0
        mem.pack(R.DESC, table + 16 * i, addr, length,
                 flags | (R.DESC_F_NEXT if i < n - 1 else 0), nxt)
    raw(mem, [(table, 16 * n, R.DESC_F_INDIRECT, 0)], [0])


@pytest.mark.parametrize("n", [8, 40])
def test_long_indirect_tables_fast_walk(n):
    mem, _, dev = make(indirect=True)
    entries = [(0x100, 16, 0)] + [(0x1000 + 0x100 * i, 0x100, R.DESC_F_WRITE)
                                  for i in range(n - 1)]
    long_table(mem, entries)
    chain = dev.pop()
    assert chain.error is None
    assert chain.readable == [(0x100, 16)]
    assert chain.writable == [(a, ln) for a, ln, _f in entries[1:]]


@pytest.mark.parametrize("bad", [(MEM - 8, 16), (MEM, 1), (2**64 - 8, 16), (0, 2**32 - 1)])
def test_long_indirect_table_with_a_bad_buffer(bad):
    mem, _, dev = make(indirect=True)
    entries = [(0x100, 16, 0)] + [(0x1000, 0x100, R.DESC_F_WRITE)] * 9
    entries[4] = (bad[0], bad[1], R.DESC_F_WRITE)
    long_table(mem, entries)
    chain = dev.pop()
    assert chain.error and "outside" in chain.error
    assert chain.writable[-1] == (0x1000, 0x100)  # the status byte is still reachable


def test_long_indirect_table_out_of_order_and_loops():
    mem, _, dev = make(indirect=True)
    entries = [(0x100, 16, 0)] + [(0x1000, 0x100, R.DESC_F_WRITE)] * 9
    entries[5] = (0x200, 8, 0)  # readable after writable
    long_table(mem, entries)
    chain = dev.pop()
    assert chain.error == "readable descriptor after a writable one"
    assert chain.writable[-1] == (0x1000, 0x100) and (0x200, 8) in chain.readable
    mem2, _, dev2 = make(indirect=True)
    nexts = [1, 2, 3, 4, 5, 1, 7, 8, 9]  # jumps back: a loop inside the table
    long_table(mem2, [(0x1000, 16, R.DESC_F_WRITE)] * 10, nexts=nexts)
    with pytest.raises(RingError):
        dev2.pop()
