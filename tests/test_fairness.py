"""A hostile cell cannot starve another device of the same daemon (issue 13, fairness).

A device's turn is bounded (``ivshmem_virtio.backend.runner.WEIGHT`` requests per queue,
``TURN_S`` of service time) and the runner yields to the event loop between turns, where the
other devices' doorbells are served. Checked two ways: the turn bound itself, deterministically,
against a ring kept full by a flooding driver; and end to end, two disks of one
``ivshmem-virtio serve``, a peer flooding disk ``a`` (avail index a ring ahead, or a doorbell
storm) while every read of disk ``b`` completes with the right bytes and the flood is served too.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import subprocess
import sys
import threading
import time

import pytest

from ivshmem_virtio import _native
from ivshmem_virtio.backend import runner as runner_mod
from ivshmem_virtio.backend.runner import WEIGHT
from ivshmem_virtio.benchmarks.flood import chain_in_every_slot
from ivshmem_virtio.frontend.blk import BlkClient
from ivshmem_virtio.ivshmem.sim import SimIvshmem
from ivshmem_virtio.procs import Child

from .blk_helpers import blk_stack, native_or_skip
from .conftest import run
from .test_serve import write_config

MiB = 1 << 20


def test_a_full_ring_is_served_one_bounded_turn_at_a_time(tmp_path, image_factory):
    """255 valid requests available at once: a turn takes at most WEIGHT of them and says
    more is left; the next turns take the rest. Serving until the ring runs dry (the old
    loop) would take all 255 in one turn, while the loop's other devices wait."""
    image = image_factory(MiB)

    async def body() -> None:
        async with blk_stack(str(tmp_path / "f.sock"), image, mode="block") as s:
            await s.client.read(0, 512)
            mem = s.client.transport.hdr
            avail_idx, used_idx, size = chain_in_every_slot(s.client)
            used0 = mem.u16(used_idx)
            # published and served synchronously: the runner's task gets no turn in between
            mem.set_u16(avail_idx, (used0 + size - 1) & 0xFFFF)
            turns = []
            while True:
                more = s.runner._serve_queues()
                turns.append(s.runner.served)
                if not more:
                    break
            assert sum(turns) == size - 1 == (mem.u16(used_idx) - used0) & 0xFFFF
            assert max(turns) <= WEIGHT and len(turns) >= (size - 1) // WEIGHT

    run(body())


@contextlib.asynccontextmanager
async def two_disks(tmp_path, image_factory):  # noqa: ANN001, ANN201
    """Two disks served on this loop (a, b), each with one read done."""
    async with blk_stack(str(tmp_path / "a.sock"), image_factory(MiB, name="a.img"),
                         mode="block") as a, \
            blk_stack(str(tmp_path / "b.sock"), image_factory(MiB, name="b.img"),
                      mode="block") as b:
        await a.client.read(0, 512)
        await b.client.read(0, 512)
        yield a, b


def test_a_turn_ends_early_when_another_device_waits(tmp_path, image_factory, monkeypatch):
    """Two devices on one loop: a flooded, b with one request waiting. a's turn ends at its
    first sub-batch (the device that used little is served next, not after a whole turn);
    with nothing waiting on b the same turn runs to its WEIGHT. The time bounds (turn and
    slice) are set out of reach, so only the early end can cut the turn short."""
    monkeypatch.setattr(runner_mod, "TURN_S", 10.0)
    monkeypatch.setattr(runner_mod, "SLICE_NS", 10**12)

    async def body() -> None:
        async with two_disks(tmp_path, image_factory) as (a, b):
            mem_a = a.client.transport.hdr
            avail_a, used_a, size = chain_in_every_slot(a.client)
            mem_a.set_u16(avail_a, (mem_a.u16(used_a) + size - 1) & 0xFFFF)
            assert a.runner._serve_queues() and a.runner.served == WEIGHT  # b idle: full turn
            mem_b = b.client.transport.hdr
            avail_b, used_b, _ = chain_in_every_slot(b.client)
            mem_b.set_u16(avail_b, (mem_b.u16(used_b) + 1) & 0xFFFF)  # one request on b
            assert b.runner._has_work()
            assert a.runner._serve_queues() and a.runner.served == a.runner.batch < WEIGHT
            b.runner._serve_queues()  # b's request is served; a's turns are full again
            assert not b.runner._has_work()
            assert a.runner._serve_queues() and a.runner.served == WEIGHT

    run(body())


@pytest.mark.parametrize("path", ["compiled", "pure"])
def test_a_turn_is_cut_in_time_slices_while_another_device_is_active(
        tmp_path, image_factory, monkeypatch, path):
    """A flooded device whose neighbour served a request lately looks at it after every time
    slice (SLICE_NS; here 0: after every request, on either data path), not after a count of
    requests whatever they cost; its turn still runs to its WEIGHT while nothing waits on the
    neighbour. Once the neighbour has been idle for ACTIVE_S the sub-batches are whole again."""
    if path == "pure":
        monkeypatch.setenv(_native.PURE_ENV, "1")
    elif _native.native() is None:
        pytest.skip("the compiled data path is not built here")
    _native.reset_for_tests()
    monkeypatch.setattr(runner_mod, "TURN_S", 10.0)
    monkeypatch.setattr(runner_mod, "SLICE_NS", 0)

    async def body() -> None:
        async with two_disks(tmp_path, image_factory) as (a, b):  # b served one just now
            sizes: list[int] = []
            serve = a.runner.service.serve

            def counted(index, vq, runner):  # noqa: ANN001, ANN202
                n = serve(index, vq, runner)
                sizes.append(n)
                return n

            a.runner.service.serve = counted  # type: ignore[method-assign]
            mem_a = a.client.transport.hdr
            avail_a, used_a, size = chain_in_every_slot(a.client)
            mem_a.set_u16(avail_a, (mem_a.u16(used_a) + size - 1) & 0xFFFF)
            b.runner.active_at = runner_mod.time.perf_counter()
            assert a.runner._serve_queues() and a.runner.served == WEIGHT
            assert sizes == [1] * WEIGHT  # a look at b after each request
            sizes.clear()
            b.runner.active_at -= 2 * runner_mod.ACTIVE_S  # b idle for a while
            assert a.runner._serve_queues() and a.runner.served == WEIGHT
            assert sizes == [a.runner.batch] * (WEIGHT // a.runner.batch)

    try:
        run(body())
    finally:
        monkeypatch.delenv(_native.PURE_ENV, raising=False)
        _native.reset_for_tests()


@pytest.mark.parametrize("how", ["avail", "doorbell"])
def test_flooded_device_does_not_starve_its_neighbour(procs, tmp_path, image_factory, how):
    socks = {n: str(tmp_path / f"{n}.sock") for n in "ab"}
    images = {n: image_factory(MiB, name=f"{n}.img") for n in "ab"}
    cfg = write_config(tmp_path / "c.toml",
                       [{"name": n, "type": "blk", "link": f"sim:{socks[n]}",
                         "image": images[n]} for n in "ab"])
    for n in "ab":
        procs.hub(socks[n])
    procs.start("serve", "serve", "--config", str(cfg), wait="serve ready")
    flood = Child("flood", [sys.executable, "-m", "ivshmem_virtio.benchmarks.flood", socks["a"],
                            how, "4"], tmp_path)
    procs.children.append(flood)
    flood.wait_for("flooding", timeout=20)
    with open(images["b"], "rb") as f:
        disk = f.read()

    async def body() -> int:
        dev = SimIvshmem(socks["b"], 1)
        client = BlkClient(dev, mode="block", timeout=10.0)
        try:
            await client.start(timeout=10.0)
            for i in range(300):
                off = (i * 4096) % MiB
                got = await asyncio.wait_for(client.read(off, 512), 5.0)
                assert got == disk[off:off + 512]
            return client.completed
        finally:
            await client.close()
            dev.close()

    assert run(body(), timeout=60) >= 300
    flood.wait_for("served", timeout=20)
    if how == "avail":  # the flood was live all along, and served too
        assert int(flood.log().rsplit("served ", 1)[1].split()[0]) > 0


def test_a_wake_up_for_nothing_still_lets_the_loop_run(tmp_path, image_factory, monkeypatch):
    """A peer flipping its avail index makes the runner's polls see work that its turn then
    does not find. The run loop takes an event-loop pass before it waits again, so a device
    fooled that way cannot hold the loop: here device a's checks always say "work" and its turns
    find none, while b's reads go on. A probe task counts a's checks between two passes of the
    loop; without that pass they pile up (then the fooling stops, so that the test ends)."""
    most = 0
    held = False

    async def body() -> None:
        nonlocal most, held
        async with two_disks(tmp_path, image_factory) as (a, b):
            since_pass = 0

            def fooled() -> bool:  # what a flipping peer makes a's checks see
                nonlocal since_pass, most, held
                since_pass += 1
                most = max(most, since_pass)
                if since_pass >= 10_000:
                    held = True  # a held the loop for 10,000 checks
                    return False
                return True

            async def probe() -> None:
                nonlocal since_pass
                while True:
                    since_pass = 0
                    await asyncio.sleep(0)

            monkeypatch.setattr(a.runner, "_has_work", fooled)
            monkeypatch.setattr(a.runner, "_native_poll", lambda: None)
            task = asyncio.get_running_loop().create_task(probe())
            assert a.runner._waiter is not None
            a.runner._waiter.kick()  # a's task wakes and meets the fooled checks
            try:
                for i in range(50):
                    assert await asyncio.wait_for(b.client.read(i * 4096, 512), 5)
            finally:
                task.cancel()

    run(body())
    assert most > 0  # a's task did run its fooled checks meanwhile
    assert not held, "device a held the event loop"


def test_a_doorbell_storm_while_the_device_is_awake_is_muted(tmp_path, image_factory):
    """A peer that rings without work from another CPU keeps the doorbell readable, so an
    adaptive device's wait returns at once and its task would cycle through empty turns, never
    asleep, where the fd callback's storm count sits. The turn that finds nothing after a
    doorbell counts it too: the storm is muted (its fds unwatched for a while) over and over,
    and b's reads go on. (The storm is a child process writing device a's doorbell eventfd.)"""

    async def body() -> None:
        async with blk_stack(str(tmp_path / "a.sock"), image_factory(MiB, name="a.img"),
                             mode="adaptive") as a, \
                blk_stack(str(tmp_path / "b.sock"), image_factory(MiB, name="b.img"),
                          mode="block") as b:
            await a.client.read(0, 512)
            waiter = a.runner._waiter
            assert waiter is not None and waiter.muted == 0
            t = a.client.transport
            dev = a.client.dev
            assert isinstance(dev, SimIvshmem) and t.queues[0] is not None
            bell = dev._peers[t.peer][t.queues[0].device_vector]
            storm = subprocess.Popen(
                [sys.executable, "-c", "import os, time\nend = time.monotonic() + 30\n"
                 "while time.monotonic() < end:\n"  # (its own deadline: never outlives us)
                 f"    for _ in range(1000): os.eventfd_write({bell}, 1)"],
                pass_fds=[bell])
            try:
                # b reads until a's fds were muted five times (a fast machine needs ~0.1 s, an
                # emulated arm64 one ~0.6 s) or 5 s passed: a count, not a rate, is checked
                end = time.monotonic() + 5.0
                i = 0
                while waiter.muted < 5 and time.monotonic() < end:
                    assert await asyncio.wait_for(b.client.read(i % 256 * 4096, 512), 5)
                    i += 1
                assert i > 0
            finally:
                storm.kill()  # our own child, by its pid
                storm.wait(5)
            assert waiter.muted >= 5
            assert await asyncio.wait_for(a.client.read(0, 512), 5)  # a still served

    run(body())


def test_a_busy_device_beside_an_active_one_is_served_from_its_worker_thread(
        tmp_path, image_factory, monkeypatch):
    """A device that keeps work left after its turns while another device of the loop is active
    goes on in a worker thread of its own (compiled stretches that publish and ring the driver
    themselves, the GIL released; the thread at WORKER_NICE) and comes back to the loop when it
    runs dry. Here a's reads
    at depth 32 with every turn cut after its first sub-batch (TURN_S 0) and b kept active:
    every read returns the image's bytes (so the worker rang for the completions its driver
    slept for), some were served in the worker thread, and a's fds are watched again after."""
    native_or_skip()
    monkeypatch.setattr(runner_mod, "TURN_S", 0.0)

    async def body() -> None:
        async with two_disks(tmp_path, image_factory) as (a, b):
            disk = os.urandom(MiB)
            with open(a.runner.service.image.path, "r+b") as f:  # type: ignore[attr-defined]
                f.write(disk)
            b.runner.active_at = math.inf  # b counts as active throughout
            worker = a.runner._service_worker
            assert worker is not None
            threads: list[int] = []
            served: list[int] = []
            nice: list[int] = []

            def recorded(*args):  # noqa: ANN002, ANN202
                got = worker(*args)
                threads.append(threading.get_ident())
                nice.append(os.getpriority(os.PRIO_PROCESS, 0))  # (this thread's)
                if got is not None:
                    served.append(got[0])
                return got

            a.runner._service_worker = recorded
            offsets = [(i * 7919 * 512) % (MiB - 4096) for i in range(512)]
            bufs = [bytearray(4096) for _ in offsets]
            got = await asyncio.wait_for(
                a.client.readinto_many(zip(offsets, bufs, strict=True), depth=32), 20)
            assert got == 4096 * len(offsets)
            for off, buf in zip(offsets, bufs, strict=True):
                assert buf == disk[off:off + 4096]
            assert a.runner.offloads > 0 and sum(served) > 0
            assert threading.get_ident() not in threads
            assert min(nice) >= runner_mod.WORKER_NICE  # bulk work: the loop thread goes first
            waiter = a.runner._waiter
            assert waiter is not None
            for _ in range(100):
                if not a.runner._offloaded:
                    break
                await asyncio.sleep(0.01)
            assert not a.runner._offloaded and waiter._fds  # watched again
            assert await asyncio.wait_for(b.client.read(0, 512), 5)

    run(body())


@contextlib.asynccontextmanager
async def held_in_worker(tmp_path, image_factory, monkeypatch):  # noqa: ANN001, ANN201
    """Two disks with a flooded and offloaded to a worker that blocks until released:
    (a, b, release: threading.Event, returned: threading.Event set when the worker returns)."""
    native_or_skip()
    monkeypatch.setattr(runner_mod, "TURN_S", 0.0)
    async with two_disks(tmp_path, image_factory) as (a, b):
        b.runner.active_at = math.inf
        entered, release, returned = threading.Event(), threading.Event(), threading.Event()

        def blocked(*args):  # noqa: ANN002, ANN202
            entered.set()
            release.wait(10)
            returned.set()
            return (0, False, False)

        a.runner._service_worker = blocked
        # from here on a's frontend is no driver (as benchmarks/flood.py): nobody reaps its
        # completions or resets the device, which would end the test's state
        assert a.client._irq_task is not None and a.client._waiter is not None
        a.client._irq_task.cancel()
        a.client._waiter.close()
        mem = a.client.transport.hdr
        avail_idx, used_idx, size = chain_in_every_slot(a.client)
        mem.set_u16(avail_idx, (mem.u16(used_idx) + size - 1) & 0xFFFF)
        assert a.runner._waiter is not None
        a.runner._waiter.kick()  # a's task wakes, serves a turn and hands the rest over
        try:
            assert await asyncio.to_thread(entered.wait, 10)
            yield a, b, release, returned
        finally:
            release.set()


def test_an_offloaded_device_is_left_to_its_worker(tmp_path, image_factory, monkeypatch):
    """While a's worker serves it, a's fds are not watched (the end of a storm's mute does not
    watch them again) and its interrupt handler serves nothing beside the worker: it hands
    the interrupt to the task. Once the worker is done, the fds are watched again."""

    async def body() -> None:
        async with held_in_worker(tmp_path, image_factory, monkeypatch) as (a, b, release, _):
            waiter = a.runner._waiter
            assert waiter is not None and a.runner._offloaded
            assert waiter._fds == []
            waiter._unmute()
            assert waiter._fds == []
            calls: list[int] = []
            serve = a.runner.service.serve

            def counted(index, vq, runner):  # noqa: ANN001, ANN202
                calls.append(index)
                return serve(index, vq, runner)

            a.runner.service.serve = counted  # type: ignore[method-assign]
            vq = a.runner.transport.vqs[0]
            assert vq is not None
            last = vq.last_avail
            assert a.runner._on_interrupt() is True
            assert calls == [] and vq.last_avail == last
            release.set()
            for _ in range(200):
                if waiter._fds:
                    break
                await asyncio.sleep(0.01)
            assert waiter._fds
            assert await asyncio.wait_for(b.client.read(0, 512), 5)

    run(body())


def test_a_cancelled_runner_waits_for_its_worker(tmp_path, image_factory, monkeypatch):
    """A runner cancelled while its worker serves lets the worker finish before it tears the
    transport down: nothing touches the queue after the task ends."""

    async def body() -> None:
        async with held_in_worker(tmp_path, image_factory, monkeypatch) as (a, _, release,
                                                                          returned):
            order: list[bool] = []
            stop = a.runner.transport.stop

            def stopped() -> None:
                order.append(returned.is_set())
                stop()

            a.runner.transport.stop = stopped  # type: ignore[method-assign]
            timer = threading.Timer(0.2, release.set)
            timer.start()
            try:
                a.task.cancel()
                await asyncio.wait({a.task}, timeout=10)
            finally:
                timer.cancel()
            assert a.task.cancelled()
            assert order == [True]  # the worker had returned when the transport stopped

    run(body())
