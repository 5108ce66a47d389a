"""virtio-blk end to end, every request type, twice: all in one process (hub thread + runner +
client) and with the hub and the backend as separate processes."""

from __future__ import annotations

import asyncio
import errno
import os

import pytest

from ivshmem_virtio.frontend.blk import INLINE_YIELD_EVERY, BlkIOError
from ivshmem_virtio.spec import blk as B
from ivshmem_virtio.spec import ring as R
from ivshmem_virtio.spec import virtio as V

from .blk_helpers import blk_stack, proc_stack
from .conftest import run

MiB = 1 << 20


@pytest.fixture(params=["inproc", "procs"])
def stack(request, procs):
    """``stack(sock, image, **opts)``: an async context manager yielding a Stack."""
    if request.param == "inproc":
        return blk_stack
    return lambda *a, **kw: proc_stack(procs, *a, **kw)


@pytest.mark.parametrize("event_idx", [False, True])
@pytest.mark.parametrize("indirect", [False, True])
@pytest.mark.parametrize("vectors", [1, 2])
def test_every_request_type(stack, tmp_path, image_factory, event_idx, indirect, vectors):
    image = image_factory(8 * MiB)

    async def body():
        async with stack(str(tmp_path / "l.sock"), image, serial="serial-123",
                             event_idx=event_idx, indirect=indirect, vectors=vectors) as s:
            c = s.client
            assert bool(c.features & V.bit(V.F_EVENT_IDX)) == event_idx
            assert bool(c.features & V.bit(V.F_INDIRECT_DESC)) == indirect
            assert c.capacity == 8 * MiB // 512
            assert await c.get_id() == "serial-123"
            data = os.urandom(300 * 1024)  # > size_max: a multi-segment request
            await c.write(4096, data)
            assert await c.read(4096, len(data)) == data
            await c.flush()
            await c.write_zeroes(4096, 8192, may_unmap=False)
            await c.write_zeroes(4096 + 8192, 8192, may_unmap=True)
            got = await c.read(4096, len(data))
            assert got[:16384] == bytes(16384) and got[16384:] == data[16384:]
            await c.discard(MiB, MiB)
            return s.runner.service.model.metrics.as_dict() if s.runner else None

    m = run(body())
    if m is not None:
        assert m["write_count"] >= 1 and m["read_count"] >= 2 and m["flush_count"] == 1
        assert m["write_zeroes_count"] == 2 and m["discard_count"] == 1
        assert m["get_id_count"] == 1
    with open(image, "rb") as f:
        f.seek(4096 + 16384)
        assert f.read(1024) != bytes(1024)  # the data really is in the image


def test_one_segment_requests_and_readinto(stack, tmp_path, image_factory):
    """Without SIZE_MAX the data travels as one descriptor; a transfer larger than one request
    is split into chunks, and readinto fills the caller's buffer in place."""
    image = image_factory(8 * MiB)

    async def body():
        async with stack(str(tmp_path / "l.sock"), image, page_segments=False) as s:
            c = s.client
            assert not c.features & V.bit(B.F_SIZE_MAX) and c.segment == 0
            assert c._segments(4096, 128 * 1024) == [(4096, 128 * 1024)]
            data = os.urandom(c.max_transfer + 3 * 4096)  # two requests
            await c.write(8192, data)
            buf = bytearray(len(data))
            assert await c.readinto(8192, buf) == len(data)
            assert buf == data
            small = memoryview(bytearray(512))
            await c.readinto(8192 + 512, small)
            assert small == data[512:1024]
            with pytest.raises(TypeError):
                await c.readinto(0, b"x" * 512)
            with pytest.raises(BlkIOError):
                await c.readinto(c.size, bytearray(512))
            assert await c.read(8192, 4096) == data[:4096]

    run(body())


def test_many_requests_in_flight(stack, tmp_path, image_factory):
    image = image_factory(8 * MiB)

    async def body():
        async with stack(str(tmp_path / "l.sock"), image) as s:
            c = s.client
            blocks = {i: os.urandom(4096) for i in range(200)}
            await asyncio.gather(*[c.write(i * 4096, b) for i, b in blocks.items()])
            peak = 0

            async def watch():
                nonlocal peak
                while True:
                    peak = max(peak, s.client.vqs[0].size - s.client.vqs[0].num_free)
                    await asyncio.sleep(0)

            w = asyncio.create_task(watch())
            reads = await asyncio.gather(*[c.read(i * 4096, 4096) for i in blocks])
            w.cancel()
            assert reads == list(blocks.values())
            return peak

    assert run(body()) >= 64


def test_past_capacity_and_unaligned(stack, tmp_path, image_factory):
    image = image_factory(1 * MiB)

    async def body():
        async with stack(str(tmp_path / "l.sock"), image) as s:
            c = s.client
            with pytest.raises(BlkIOError) as ei:
                await c.read(MiB, 512)
            assert ei.value.errno == errno.ENOSPC
            # bypass the client's own check: the device itself must answer IOERR
            c.size = 2 * MiB
            for coro in (c.read(MiB - 512, 1024), c.write(MiB, bytes(512)),
                         c.read(2 * MiB - 512, 512)):
                with pytest.raises(BlkIOError) as ei:
                    await coro
                assert ei.value.errno == errno.EIO
            # the device still works afterwards
            await c.write(0, b"x" * 512)
            assert await c.read(0, 512) == b"x" * 512

    run(body())


def test_read_only(stack, tmp_path, image_factory):
    image = image_factory(1 * MiB, data=b"ro" * 256)

    async def body():
        async with stack(str(tmp_path / "l.sock"), image, read_only=True) as s:
            c = s.client
            assert c.read_only
            assert await c.read(0, 512) == b"ro" * 256
            c.read_only = False  # force the request onto the wire: the device must refuse
            with pytest.raises(BlkIOError) as ei:
                await c.write(0, bytes(512))
            assert ei.value.errno == errno.EIO
            with pytest.raises(BlkIOError):
                await c.write_zeroes(0, 512)
            await c.flush()

    run(body())
    with open(image, "rb") as f:
        assert f.read(512) == b"ro" * 256


def test_unknown_type_is_unsupp(stack, tmp_path, image_factory):
    from ivshmem_virtio.frontend.blk import _Req

    image = image_factory(1 * MiB)

    async def body():
        async with stack(str(tmp_path / "l.sock"), image) as s:
            with pytest.raises(BlkIOError) as ei:
                await s.client._submit(_Req(99, 0))
            assert ei.value.errno == errno.EOPNOTSUPP
            with pytest.raises(BlkIOError) as ei:
                await s.client._submit(_Req(10, 0, in_len=48))  # GET_LIFETIME: not offered
            assert ei.value.errno == errno.EOPNOTSUPP

    run(body())


def test_reset_and_rebring_up_with_smaller_queue(stack, tmp_path, image_factory):
    image = image_factory(4 * MiB)

    async def body():
        async with stack(str(tmp_path / "l.sock"), image) as s:
            c = s.client
            await c.write(0, b"a" * 4096)
            old = (c.vqs[0].desc, c.vqs[0].size)
            pending = asyncio.gather(*[c.read(i * 512, 512) for i in range(40)])
            await c.reset_device(queue_size=16)
            assert (c.vqs[0].desc, c.vqs[0].size) != old and c.vqs[0].size == 16
            assert (await pending)[0] == b"a" * 512
            await c.write(8192, b"b" * 512)
            assert await c.read(8192, 512) == b"b" * 512
            if s.runner:
                assert s.runner.transport.metrics["resets"] >= 2
            # queue_enable = 0 with Linux's 32-bit store, then the device still resets cleanly
            await c.transport.disable_queue(0)
            if s.runner:
                assert s.runner.transport.vqs[0] is None
            await c.reset_device(queue_size=8)
            assert await c.read(8192, 512) == b"b" * 512

    run(body())


@pytest.mark.parametrize("rw", [0x2000, 0xF000, 0xDF000, 0x100000, 0x4000000])
def test_request_limits_fit_the_bounce_pool(rw):
    """Linux bounces whole requests through the R/W section: one must never exceed a quarter."""
    from ivshmem_virtio.backend.devices.blk_service import request_limits

    size_max, seg_max = request_limits(rw)
    assert size_max == 4096 and 1 <= seg_max <= 126
    assert size_max * seg_max <= max(4096, rw // 4)


def test_internal_fault_marks_needs_reset_and_the_daemon_goes_on(tmp_path, image_factory,
                                                                  monkeypatch):
    """A bug in a device model (any exception) costs that device a reset, never the daemon.
    (The pure path: the fault is planted in the Python model, which the compiled one skips.)"""
    from ivshmem_virtio import _native

    monkeypatch.setenv(_native.PURE_ENV, "1")
    _native.reset_for_tests()
    image = image_factory(1 * MiB)

    async def body():
        async with blk_stack(str(tmp_path / "l.sock"), image) as s:
            model = s.runner.service.model
            real = model.handle
            calls = {"n": 0}

            def broken(mem, chain, image):
                calls["n"] += 1
                if calls["n"] == 1:
                    raise ValueError("simulated bug")
                return real(mem, chain, image)

            model.handle = broken
            await s.client.write(0, b"z" * 512)  # resubmitted after the automatic recovery
            assert calls["n"] >= 2
            assert s.runner.transport.metrics["needs_reset_count"] == 1
            assert await s.client.read(0, 512) == b"z" * 512

    try:
        run(body())
    finally:
        _native.reset_for_tests()  # both paths chosen again, without the variable, after


@pytest.mark.parametrize("mode", ["poll", "block"])
def test_frontend_recovers_from_a_bad_used_entry(tmp_path, image_factory, mode):
    """A backend that completes a descriptor not in flight: the frontend resets the device and
    resubmits, in the inline QD1 path (poll) and in the interrupt task (block) alike."""
    image = image_factory(MiB)

    async def body():
        async with blk_stack(str(tmp_path / "l.sock"), image, mode=mode) as s:
            c = s.client
            data = os.urandom(4096)
            await c.write(0, data)
            ups = c.bring_ups
            vq = c.vqs[0]
            # nothing in flight, and the free list hands out the lowest descriptors first: the
            # last one is neither in flight nor taken by the next requests (either queue)
            bogus = vq.size - 1
            vq.mem.pack(R.USED_ELEM, vq.used + R.USED_RING + 8 * (vq.last_used & (vq.size - 1)),
                        bogus, 1)
            vq.mem.set_u16(vq.used + R.USED_IDX, (vq.last_used + 1) & 0xFFFF)
            if mode == "block":
                s.runner.transport.notify_queue(0)  # the interrupt task looks first
            # poll: the read's own inline reap finds the entry before anything else runs
            assert await asyncio.wait_for(c.read(0, 4096), 10) == data
            assert c.bring_ups == ups + 1
            assert await c.read(0, 4096) == data

    run(body())


def test_inline_completion_keeps_the_loop_fair_and_concurrency_intact(procs, tmp_path,
                                                                      image_factory):
    """The QD1 path (a lone caller spins for its completion) must neither starve other tasks
    nor serialize concurrent callers. (Backend in its own process: in the same loop it could
    not answer while the caller spins.)"""
    image = image_factory(MiB)

    async def body():
        # a wide inline window (20 ms): on a loaded machine a backend preempted for more than
        # the default 50 us would send every completion to the interrupt path, and "the lone
        # caller took the inline path" is what this test is about, not how fast the backend is
        async with proc_stack(procs, str(tmp_path / "l.sock"), image, mode="poll",
                              spin_us=20_000) as s:
            c = s.client
            ticks = 0
            stop = False

            async def ticker():
                nonlocal ticks
                while not stop:
                    ticks += 1
                    await asyncio.sleep(0)

            t = asyncio.create_task(ticker())
            inline0 = c.inline_reaps
            for i in range(300):
                await c.read(512 * i, 512)
            stop = True
            await t
            assert c.inline_reaps > inline0  # the lone caller did take the inline path
            # ... and the other task ran at least once every INLINE_YIELD_EVERY requests
            assert ticks >= 300 // INLINE_YIELD_EVERY

            peak = 0

            async def reader(k):
                nonlocal peak
                for i in range(50):
                    await c.read(4096 * ((k * 50 + i) % 256), 4096)
                    peak = max(peak, c._outstanding)

            inline1 = c.inline_reaps
            await asyncio.gather(*[reader(k) for k in range(8)])
            assert c.inline_reaps - inline1 < 50  # concurrent callers are not serialized
            assert peak >= 2

    run(body())


@pytest.mark.parametrize("event_idx", [True, False])
@pytest.mark.parametrize("spin_us", [1.0, 5000.0])
def test_interrupts_come_back_after_inline_completions(procs, tmp_path, image_factory,
                                                       monkeypatch, event_idx, spin_us):
    """Lone requests keep completion interrupts off while they are reaped in place; past
    ``spin_us`` the request goes to the interrupt task. Whatever comes next must still be woken
    by an interrupt once that task sleeps: concurrent callers, and a lone request after a
    pause. spin_us 1 always hands over; 5000 completes in place (backend in poll mode; 5 ms
    outlasts a scheduler slice on a loaded machine), so the concurrent callers meet parked
    interrupts."""
    image = image_factory(MiB)
    with open(image, "rb") as f:
        disk = f.read()

    async def body():
        async with proc_stack(procs, str(tmp_path / "i.sock"), image, mode="adaptive",
                              backend_mode="poll", spin_us=spin_us,
                              event_idx=event_idx) as s:
            c = s.client

            async def lone(off):
                assert await asyncio.wait_for(c.read(off, 512), 10) == disk[off:off + 512]

            for i in range(100):
                await lone(512 * i)
            await asyncio.sleep(0.02)  # the interrupt task's spin ends: it sleeps
            if spin_us > 100:
                for i in range(100):  # until a lone read completed in place (interrupts off)
                    await lone(512 * i)
                    if not c.vqs[0].interrupts_on:
                        break
                assert not c.vqs[0].interrupts_on

            async def reader(k):
                for i in range(20):
                    off = 4096 * ((k * 20 + i) % 256)
                    assert await c.read(off, 4096) == disk[off:off + 4096]

            await asyncio.wait_for(asyncio.gather(*[reader(k) for k in range(8)]), 10)
            await asyncio.sleep(0.02)
            await lone(8192)

    run(body())


@pytest.mark.parametrize("event_idx", [True, False])
def test_block_mode_serves_and_completes_in_the_interrupt_callbacks(tmp_path, image_factory,
                                                                      event_idx):
    """Block mode: the backend serves a kick, and the frontend takes the completion, in the fd
    callback while their tasks sleep. A handler that fails hands every interrupt back to the
    task (and is dropped), and no request is lost."""
    image = image_factory(MiB)
    with open(image, "rb") as f:
        disk = f.read()

    async def body():
        async with blk_stack(str(tmp_path / "h.sock"), image, event_idx=event_idx) as s:
            c, runner = s.client, s.runner
            assert c._waiter is not None and runner._waiter is not None
            for i in range(50):
                assert await c.read(512 * i, 512) == disk[512 * i:512 * i + 512]
            assert c._waiter.handled >= 40 and runner._waiter.handled >= 40
            # FLUSH goes to a worker thread; its completion comes back through the loop
            await c.write(0, disk[:4096])
            await c.flush()

            def broken() -> bool:
                raise RuntimeError("handler bug")

            c._waiter.handler = broken
            runner._waiter.handler = broken
            woke = c._waiter.wakeups, runner._waiter.wakeups
            for i in range(20):
                assert await c.read(4096 * i, 4096) == disk[4096 * i:4096 * i + 4096]
            assert c._waiter.handler is None and runner._waiter.handler is None
            assert c._waiter.wakeups > woke[0] + 10 and runner._waiter.wakeups > woke[1] + 10

    run(body())


@pytest.mark.parametrize("event_idx", [True, False])
@pytest.mark.parametrize("backend_mode", ["adaptive", "block"])
def test_no_lost_wakeup_under_mixed_concurrency(procs, tmp_path, image_factory, monkeypatch,
                                                event_idx, backend_mode):
    """Lone requests (reaped in place, interrupts parked), bursts of concurrent ones (reaped by
    the interrupt task or its fd callback) and pauses (the interrupt task falls asleep), mixed
    at random: every request completes with the right bytes; a lost wake-up would hang one."""
    import random

    image = image_factory(MiB)
    with open(image, "rb") as f:
        disk = f.read()
    rng = random.Random(5)

    async def body():
        async with proc_stack(procs, str(tmp_path / "m.sock"), image, mode="adaptive",
                              backend_mode=backend_mode, spin_us=20.0,
                              event_idx=event_idx) as s:
            c = s.client

            async def one(off):
                assert await c.read(off, 512) == disk[off:off + 512]

            for _ in range(1500):
                offs = [512 * rng.randrange(2048) for _ in range(rng.choice((1, 1, 1, 2, 3, 8)))]
                await asyncio.wait_for(asyncio.gather(*[one(o) for o in offs]), 10)
                if rng.random() < 0.05:
                    await asyncio.sleep(rng.choice((0.0001, 0.001, 0.003)))

    run(body())
