"""The backend's compiled poll (``BlkQueue.poll`` through ``LinkRunner._poll``): a polling
backend serves and publishes in C between event-loop passes, and gives the turn back to
Python for everything that is Python's: a register write (the control path), a chain the
compiled path does not take, a driver that wants an interrupt (rung by Python).

Each case places requests in a live ring (a BlkClient and a LinkRunner on one loop, the runner
parked) and calls one burst directly, so what the poll did is checked by assertion, not by
timing. Skipped where the compiled data path is not built (the pure path has no such poll:
``_native_poll`` is None there, checked too).
"""

from __future__ import annotations

import contextlib
import os
import time

import pytest

from ivshmem_virtio import _native
from ivshmem_virtio.benchmarks.flood import chain_in_every_slot
from ivshmem_virtio.spec import blk as B
from ivshmem_virtio.spec import ivshmem as H

from .blk_helpers import blk_stack, native_or_skip
from .conftest import run

MiB = 1 << 20
BURST_S = 200e-6


def _ring(s):  # noqa: ANN001, ANN202
    """The client's ring with one valid 512 B read chain named by every avail slot (sector 0,
    its data at a known place), and helpers to make n of them available."""
    mem = s.client.transport.hdr
    avail_idx, used_idx, size = chain_in_every_slot(s.client)
    mem.set_u16(avail_idx, mem.u16(used_idx))  # (add() made the chain available: taken back)

    def offer(n: int) -> None:
        mem.set_u16(avail_idx, (mem.u16(avail_idx) + n) & 0xFFFF)

    return mem, offer, used_idx


def _drain(r) -> int:  # noqa: ANN001
    """Bursts until one finds nothing: the requests served (a burst may end after any request
    once its deadline passed: a slow machine, an emulated CPU)."""
    total = 0
    while (n := r._poll(BURST_S)) > 0:
        total += n
    assert n == 0
    return total


@contextlib.contextmanager
def _transaction_pending(r):  # noqa: ANN001, ANN202
    """The driver's write transaction pending at runner ``r`` inside the block."""
    hdr = r.transport.hdr
    old = hdr.u32(H.HDR_WRITE_TRANSACTION)
    hdr.set_u32(H.HDR_WRITE_TRANSACTION, 0x1)
    try:
        yield
    finally:
        hdr.set_u32(H.HDR_WRITE_TRANSACTION, old)


@contextlib.asynccontextmanager
async def _parked(tmp_path, image: str, name: str, **kw):  # noqa: ANN001, ANN003, ANN202
    """A stack whose runner made its compiled queue (one read done), with the ring of
    :func:`_ring`: (stack, memory, offer(n), used index offset)."""
    async with blk_stack(str(tmp_path / f"{name}.sock"), image, mode="block", **kw) as s:
        await s.client.read(0, 512)
        yield (s, *_ring(s))


def test_a_burst_serves_publishes_and_counts(tmp_path, image_factory):
    """Requests made available during a burst are served and published in it (used index,
    data, counters), without the runner's task, and the burst ends at its deadline."""
    native_or_skip()
    image = image_factory(MiB)
    with open(image, "rb") as f:
        sector0 = f.read(512)

    async def body() -> None:
        async with _parked(tmp_path, image, "p") as (s, mem, offer, used_idx):
            r = s.runner
            assert r._native_poll() == r._poll
            vq = s.client.vqs[0]
            vq.suppress_interrupts(True)  # a polling driver: no interrupt
            req = mem.u64(vq.desc + 16 * mem.u16(vq.avail + 4))  # the chain's header
            mem.write(req + 64, b"\xee" * 512)  # its data buffer, and its status byte
            mem.set_u8(req + 16, 0xFF)
            used0 = mem.u16(used_idx)
            reads0 = r.service.model.metrics.read_count
            offer(3)
            t0 = time.perf_counter()
            assert _drain(r) == 3
            assert time.perf_counter() - t0 >= 15e-6  # the last burst polled on to its end
            assert (mem.u16(used_idx) - used0) & 0xFFFF == 3  # published
            assert r.service.model.metrics.read_count == reads0 + 3
            assert bytes(mem.view(req + 64, 512)) == sector0 and mem.u8(req + 16) == B.S_OK
            assert r._poll(BURST_S) == 0  # nothing more: an idle burst

    run(body())


def test_a_register_write_hands_the_turn_to_the_control_path(tmp_path, image_factory):
    """A write transaction pending: the poll returns -1 at once and serves nothing, though
    requests wait (the control path goes first, as _has_work's check does)."""
    native_or_skip()

    async def body() -> None:
        async with _parked(tmp_path, image_factory(MiB), "w") as (s, mem, offer, used_idx):
            r = s.runner
            used0 = mem.u16(used_idx)
            offer(2)
            with _transaction_pending(r):
                assert r._poll(BURST_S) == -1
                assert mem.u16(used_idx) == used0  # nothing served meanwhile
            assert _drain(r) == 2

    run(body())


def test_a_chain_for_the_python_path_is_left_to_it(tmp_path, image_factory):
    """A chain the compiled path does not take (here a GET_ID) stops the poll with the chain
    unconsumed: -1, and the runner's turn then serves it through the Python path."""
    native_or_skip()

    async def body() -> None:
        async with _parked(tmp_path, image_factory(MiB), "s") as (s, mem, offer, used_idx):
            r = s.runner
            vq = s.client.vqs[0]
            head = mem.u16(vq.avail + 4)  # the chain every slot names
            hdr_addr = mem.u64(vq.desc + 16 * head)
            mem.set_u32(hdr_addr, B.T_GET_ID)
            used0 = mem.u16(used_idx)
            last0 = r.transport.vqs[0].last_avail
            offer(1)
            assert r._poll(BURST_S) == -1
            assert r.transport.vqs[0].last_avail == last0 and mem.u16(used_idx) == used0
            assert not r._serve_queues() and r.served == 1  # the Python path took it
            assert (mem.u16(used_idx) - used0) & 0xFFFF == 1

    run(body())


def test_a_driver_that_wants_interrupts_gets_one_per_publish(tmp_path, image_factory,
                                                               monkeypatch):
    """Interrupts on (a sleeping driver): the poll publishes, returns, and the runner rings
    the doorbell (one notify per publish that the driver asked for)."""
    native_or_skip()

    async def body() -> None:
        async with _parked(tmp_path, image_factory(MiB), "n", event_idx=False) as (s, _, offer,
                                                                                  _):
            r = s.runner
            rung: list[int] = []
            monkeypatch.setattr(r.transport, "notify_queue", rung.append)
            s.client.vqs[0].suppress_interrupts(False)
            offer(1)
            assert r._poll(BURST_S) == 1 and rung == [0]
            s.client.vqs[0].suppress_interrupts(True)  # VRING_AVAIL_F_NO_INTERRUPT
            offer(1)
            assert r._poll(BURST_S) == 1 and rung == [0]  # not rung again

    run(body())


def _stretch(r, ring, *, until_ns: int | None = None, yield_cpu: bool = False):  # noqa: ANN001, ANN202
    """One worker stretch of runner ``r``'s service, called here (the worker thread's call)."""
    vq = r.transport.vqs[0]
    until = time.monotonic_ns() + 2_000_000 if until_ns is None else until_ns
    return r.service.serve_worker(0, vq, until, 10_000, H.HDR_WRITE_TRANSACTION, yield_cpu,
                                  ring)


def test_a_worker_stretch_serves_publishes_and_rings_an_eventfd(tmp_path, image_factory):
    """A stretch (``serve_worker``, a busy device's worker thread) serves what is available,
    publishes it and rings the driver itself, as notify_queue does: queue_event = 1, then the
    doorbell's eventfd; it ends after a slice that found the ring empty (nothing left). The
    yielding variant serves the same."""
    native_or_skip()
    image = image_factory(MiB)
    with open(image, "rb") as f:
        sector0 = f.read(512)

    async def body() -> None:
        async with _parked(tmp_path, image, "e", event_idx=False) as (s, mem, offer, used_idx):
            r = s.runner
            s.client.vqs[0].suppress_interrupts(False)  # a sleeping driver: it wants them
            vq = s.client.vqs[0]
            req = mem.u64(vq.desc + 16 * mem.u16(vq.avail + 4))
            mem.write(req + 64, b"\xee" * 512)
            bell = os.eventfd(0, os.EFD_NONBLOCK)
            try:
                for yield_cpu in (False, True):
                    r.transport.hdr.set_u8(H.HDR_QUEUE_EVENT, 0)
                    used0 = mem.u16(used_idx)
                    reads0 = r.service.model.metrics.read_count
                    offer(5)
                    ring = (H.HDR_QUEUE_EVENT, bell, None, 0, 0)
                    assert _stretch(r, ring, yield_cpu=yield_cpu) == (5, False, False)
                    assert (mem.u16(used_idx) - used0) & 0xFFFF == 5
                    assert r.service.model.metrics.read_count == reads0 + 5
                    assert bytes(mem.view(req + 64, 512)) == sector0
                    assert r.transport.hdr.u8(H.HDR_QUEUE_EVENT) == 1
                    try:
                        rung = os.eventfd_read(bell)
                    except BlockingIOError:
                        rung = 0
                    assert rung >= 1
                    mem.write(req + 64, b"\xee" * 512)
            finally:
                os.close(bell)

    run(body())


def test_a_worker_stretch_rings_a_doorbell_register(tmp_path, image_factory):
    """On a real link the ring is a 32-bit store of DOORBELL = (peer << 16) | vector into the
    mapped register page (here a page of our own); a doorbell that goes nowhere (no fd, no
    register) rings nothing and still serves."""
    native_or_skip()

    async def body() -> None:
        async with _parked(tmp_path, image_factory(MiB), "g", event_idx=False) as (s, mem, offer,
                                                                                  used_idx):
            r = s.runner
            s.client.vqs[0].suppress_interrupts(False)
            page = bytearray(4096)
            value = H.doorbell_value(1, 1)
            offer(2)
            ring = (H.HDR_QUEUE_EVENT, -1, page, H.REG_DOORBELL, value)
            assert _stretch(r, ring) == (2, False, False)
            assert int.from_bytes(page[H.REG_DOORBELL:H.REG_DOORBELL + 4], "little") == value
            assert not any(page[:H.REG_DOORBELL]) and not any(page[H.REG_DOORBELL + 4:])
            used0 = mem.u16(used_idx)
            offer(1)
            assert _stretch(r, (H.HDR_QUEUE_EVENT, -1, None, 0, 0)) == (1, False, False)
            assert (mem.u16(used_idx) - used0) & 0xFFFF == 1
            with pytest.raises(ValueError, match="outside its page"):
                _stretch(r, (H.HDR_QUEUE_EVENT, -1, bytearray(8), 8, value))

    run(body())


def test_a_worker_stretch_leaves_the_control_path_and_time_to_the_task(tmp_path, image_factory):
    """A write transaction pending: the stretch serves nothing and hands over (owner). A
    stretch whose deadline has passed serves nothing and says work may be left."""
    native_or_skip()

    async def body() -> None:
        async with _parked(tmp_path, image_factory(MiB), "c") as (s, mem, offer, used_idx):
            r = s.runner
            ring = (H.HDR_QUEUE_EVENT, -1, None, 0, 0)
            used0 = mem.u16(used_idx)
            offer(2)
            with _transaction_pending(r):
                assert _stretch(r, ring) == (0, False, True)
            assert _stretch(r, ring, until_ns=time.monotonic_ns()) == (0, True, False)
            assert mem.u16(used_idx) == used0
            assert _stretch(r, ring) == (2, False, False)

    run(body())


def test_reads_stay_right_through_the_compiled_poll(tmp_path, image_factory):
    """End to end in poll and adaptive mode: every read returns the image's bytes, and the
    compiled poll served some of them (counted at the service's poll)."""
    native_or_skip()
    image = image_factory(MiB)
    with open(image, "rb") as f:
        disk = f.read()

    async def body(mode: str) -> None:
        async with blk_stack(str(tmp_path / f"{mode}.sock"), image, mode=mode) as s:
            polled: list[int] = []
            poll = s.runner._service_poll
            assert poll is not None

            def counted(*a):  # noqa: ANN002, ANN202
                got = poll(*a)
                if got is not None:
                    polled.append(got[0])
                return got

            s.runner._service_poll = counted
            for i in range(300):
                off = (i * 7 * 4096) % (MiB - 4096)
                assert await s.client.read(off, 4096) == disk[off:off + 4096]
            assert sum(polled) > 0

    for mode in ("poll", "adaptive"):
        run(body(mode))


def test_no_compiled_poll_on_the_pure_path(tmp_path, image_factory, monkeypatch):
    monkeypatch.setenv(_native.PURE_ENV, "1")
    _native.reset_for_tests()

    async def body() -> None:
        async with blk_stack(str(tmp_path / "x.sock"), image_factory(MiB), mode="poll") as s:
            await s.client.read(0, 512)
            assert s.runner._native_poll() is None

    try:
        run(body())
    finally:
        monkeypatch.delenv(_native.PURE_ENV)
        _native.reset_for_tests()
    assert os.environ.get(_native.PURE_ENV) is None
