"""The compiled frontend queue (``_native._frontpath.DriverQueue``) against the Python reference.

The same operations go to :class:`DriverQueue` and to its compiled twin, each on its own copy of
the memory: chains of any shape (direct, indirect, the table short of descriptors), kick
decisions, interrupt suppression, and a device that completes honestly or lies (ids not in
flight, used indices running ahead, any used length, bytes scribbled anywhere in the ring
areas). Every return value or exception (type and message), the whole memory and the
indirect-table allocations must be the same after every step. Then BlkClient's own request path
(``_pump`` + ``take_used``) with the compiled queue and with the Python one, against a device
that answers with any status byte and used length: the same memory, the same results and
errors for the callers, the same allocator state. Skipped where the extension is not built or
IVSHMEM_VIRTIO_PURE is set.
"""

from __future__ import annotations

import asyncio
import threading
import time
from types import SimpleNamespace
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ivshmem_virtio import _native
from ivshmem_virtio.frontend.blk import BlkClient, _Req
from ivshmem_virtio.shm import Region
from ivshmem_virtio.spec import blk as B
from ivshmem_virtio.spec import ring as R
from ivshmem_virtio.transport.allocator import ChunkAllocator
from ivshmem_virtio.virtqueue.driver import DriverQueue

NAT = _native.front_native()
pytestmark = pytest.mark.skipif(NAT is None, reason=f"frontend path: {_native.front_path()}")

MEM = 0x10000
BASE = 0x1000
N = 8
RING = (BASE, BASE + 0x400)  # where the queue's three areas lie (N = 8, align 64)


class Side:
    """One queue over its own memory, with a bump allocator for indirect tables."""

    def __init__(self, compiled: bool, size: int, event_idx: bool, indirect: bool) -> None:
        self.mem = Region(bytearray(MEM), name="section")
        d, a, u = R.vring_layout(size, 64)
        self.next_table = 0x8000
        self.freed: list[int] = []
        q = DriverQueue(self.mem, size, BASE + d, BASE + a, BASE + u, event_idx=event_idx,
                        indirect=indirect, alloc=self.alloc, free=self.freed.append)
        self.q: Any = q.compiled(NAT) if compiled else q

    def alloc(self, n: int) -> int:
        off = self.next_table
        self.next_table += (n + 15) & ~15
        return off

    def do(self, op: tuple[Any, ...]) -> object:
        q = self.q
        try:
            kind = op[0]
            if kind == "add":
                return q.add(op[1], op[2], op[3])
            if kind == "kick":
                return q.kick_needed()
            if kind == "suppress":
                q.suppress_interrupts(op[1])
                return None
            if kind == "used":
                return q.get_used()
            if kind == "reap":  # the compiled queue's reap of chains add() made: as get_used
                if isinstance(q, DriverQueue):
                    return [(t, n, -1, None) for t, n in q.get_used()]
                return q.reap_blk()
            if kind == "poke":
                self.mem.set_u8(op[1], op[2])
                return None
            if kind == "elem":  # the device writes a used element and (maybe) used->idx
                _, slot, head, length, idx = op
                self.mem.pack(R.USED_ELEM, q.used + R.USED_RING + 8 * slot, head, length)
                if idx is not None:
                    self.mem.set_u16(q.used + R.USED_IDX, idx)
                return None
            raise AssertionError(kind)
        except Exception as e:  # noqa: BLE001 - compared, type and message
            return (type(e).__name__, str(e))

    def state(self) -> tuple[object, ...]:
        q = self.q
        return (bytes(self.mem.view(0, MEM)), q.num_free, q.avail_idx, q.kicked_idx,
                q.last_used, q.interrupts_on, q.has_used(), q.in_flight(), self.freed,
                self.next_table, [q.can_add(k) for k in (1, 2, 3, 5, N + 1)])


seg = st.tuples(st.integers(0x4000, 0x7FF0), st.integers(0, 4096))
op = st.one_of(
    st.tuples(st.just("add"), st.lists(seg, max_size=6), st.lists(seg, max_size=6),
              st.integers(0, 1000)),
    st.tuples(st.just("kick")),
    st.tuples(st.just("suppress"), st.booleans()),
    st.tuples(st.just("used")),
    st.tuples(st.just("reap")),
    st.tuples(st.just("poke"), st.integers(*RING), st.integers(0, 255)),
    st.tuples(st.just("elem"), st.integers(0, N - 1), st.integers(0, N + 2) | st.integers(),
              st.integers(0, 0xFFFFFFFF), st.none() | st.integers(0, 0xFFFF)),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=st.lists(op, max_size=40), event_idx=st.booleans(), indirect=st.booleans())
def test_same_effects_as_the_python_queue(ops, event_idx, indirect):
    py, c = Side(False, N, event_idx, indirect), Side(True, N, event_idx, indirect)
    for o in ops:
        if o[0] == "elem" and not -1 < o[2] < 1 << 32:
            o = (*o[:2], o[2] & 0xFFFFFFFF, *o[3:])
        assert py.do(o) == c.do(o), o
        assert py.state() == c.state(), o


@pytest.mark.parametrize("event_idx", [False, True])
@pytest.mark.parametrize("indirect", [False, True])
def test_honest_device_many_wraps(event_idx, indirect):
    """Chains completed in order by an honest device across the 16-bit index wrap: the same
    heads, tables and ring bytes all the way."""
    from ivshmem_virtio.virtqueue.device import DeviceQueue

    sides = [Side(False, N, event_idx, indirect), Side(True, N, event_idx, indirect)]
    devs = [DeviceQueue(s.mem, N, s.q.desc, s.q.avail, s.q.used, event_idx=event_idx,
                        indirect=indirect) for s in sides]
    # long chains: through a table when negotiated, else as many descriptors as fit a batch
    long = [(0x4000 + 0x200 * i, 512) for i in range(5 if indirect else 2)] + [(0x5000, 1)]
    for k in range(70000 // 40):
        batch = 1 + k % (3 if indirect else 2)
        res = []
        for s, dev in zip(sides, devs, strict=True):
            s.next_table = 0x8000  # the tables of the previous batch are done
            heads = [s.q.add([(0x4000, 16)], long if (k + j) % 2 else [(0x4200, 1)], (k, j))
                     for j in range(batch)]
            kick = s.q.kick_needed()
            chains = dev.pop_all()
            for ch in chains:
                dev.push(ch.head, 7)
            dev.publish()
            res.append((heads, kick, s.q.get_used()))
        assert res[0] == res[1]
        assert sides[0].state() == sides[1].state()


def test_wait_used_releases_the_gil():
    """The compiled spin lets another thread run: a completion a Python thread publishes while
    the caller spins ends the spin (with the GIL held, the thread could not run at all and the
    spin would only time out)."""
    s = Side(True, N, True, False)
    s.q.add([(0x4000, 16)], [(0x4200, 1)], "t")
    assert s.q.wait_used(0.001) is False
    used = s.q.used

    def device() -> None:
        time.sleep(0.05)
        s.mem.pack(R.USED_ELEM, used + R.USED_RING, 0, 1)
        s.mem.set_u16(used + R.USED_IDX, 1)

    th = threading.Thread(target=device)
    th.start()
    assert s.q.wait_used(30.0) is True
    th.join()
    assert s.q.get_used() == [("t", 1)]


def test_a_queue_in_use_does_not_change_hands():
    s = Side(False, N, False, False)
    s.q.add([(0x4000, 16)], [], "t")
    with pytest.raises(ValueError, match="in use"):
        s.q.compiled(NAT)


# -- BlkClient's request path, compiled and Python ---------------------------------------------
RW = 0x40000
PAYLOAD = bytes(range(7, 256)) * 40  # what writes send


class Client:
    """A BlkClient around a stub transport: the queue, the allocator and the memory only."""

    def __init__(self, compiled: bool, segment: int) -> None:
        self.mem = Region(bytearray(RW), name="section")
        alloc = ChunkAllocator(RW, 0x1000)
        self.kicks = 0
        c = BlkClient.__new__(BlkClient)
        c.transport = SimpleNamespace(hdr=self.mem, allocator=alloc,  # type: ignore[assignment]
                                      kick=self._kick)
        c.connected = asyncio.Event()
        c.connected.set()
        c._backlog = []
        c._outstanding = 0
        c.completed = 0
        c.segment = segment
        base = alloc.alloc(R.vring_size(16, 64))
        d, a, u = R.vring_layout(16, 64)
        q = DriverQueue(self.mem, 16, base + d, base + a, base + u, event_idx=True,
                        indirect=True, alloc=alloc.alloc, free=alloc.free)
        c._fast = q.compiled(NAT) if compiled else None
        c.vqs = [c._fast if compiled else q]
        self.c = c

    def _kick(self, index: int) -> None:
        self.kicks += 1

    def state(self) -> tuple[object, ...]:
        alloc = self.c.transport.allocator
        assert alloc is not None
        return (bytes(self.mem.view(0, RW)), self.kicks, self.c.completed, self.c._outstanding,
                alloc.free_bytes, sorted(alloc._orders.items()))


request = st.tuples(
    st.sampled_from([B.T_IN, B.T_OUT, B.T_FLUSH, B.T_GET_ID, B.T_DISCARD]),
    st.integers(0, 1 << 40),
    st.sampled_from([0, 512, 1024, 4096, 8192]),
    st.booleans(),  # readinto
)
answer = st.tuples(st.integers(0, 255), st.integers(0, 0xFFFFFFFF) | st.integers(0, 9000))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(reqs=st.lists(st.tuples(request, answer), min_size=1, max_size=12),
       segment=st.sampled_from([0, 4096]))
def test_blk_requests_same_as_python(reqs, segment):
    async def body() -> None:
        sides = [Client(False, segment), Client(True, segment)]
        outcomes: list[list[object]] = [[], []]
        for k, side in enumerate(sides):
            c = side.c
            made = []
            for (rtype, sector, n, into), _ans in reqs:
                if rtype in (B.T_OUT, B.T_DISCARD):
                    req = _Req(rtype, sector, out=PAYLOAD[:n])
                elif rtype == B.T_FLUSH:
                    req = _Req(rtype, sector)
                else:
                    n = n if rtype == B.T_IN else B.ID_BYTES
                    view = memoryview(bytearray(n)) if into and rtype == B.T_IN and n else None
                    req = _Req(rtype, sector, in_len=n, into=view)
                made.append(req)
                c._backlog.append(req)
            c._pump()
            vq = c.vqs[0]
            # the device: every chain the ring holds, answered with the drawn status and length
            heads = [side.mem.u16(vq.avail + R.AVAIL_RING + 2 * i) for i in range(vq.avail_idx)]
            for i, h in enumerate(heads):
                st_, length = reqs[i][1]
                req = made[i]
                side.mem.write(req.base + 64, (bytes(range(256)) * 40)[:req.in_len])
                side.mem.set_u8(req.base + 16, st_)
                side.mem.pack(R.USED_ELEM, vq.used + R.USED_RING + 8 * i, h, length)
            side.mem.set_u16(vq.used + R.USED_IDX, len(heads))
            c.take_used(0, vq)
            for req in made:
                if not req.future.done():
                    outcomes[k].append("pending")
                elif req.future.exception() is not None:
                    e = req.future.exception()
                    outcomes[k].append((type(e).__name__, str(e)))
                else:
                    outcomes[k].append((req.future.result(),
                                        None if req.into is None else bytes(req.into)))
        assert outcomes[0] == outcomes[1]
        assert sides[0].state() == sides[1].state()

    asyncio.run(body())
