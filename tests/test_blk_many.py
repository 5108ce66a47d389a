"""``BlkClient.readinto_many``: the batched read keeps at most ``depth`` requests in flight, fills
every buffer with what ``read`` returns, and never returns (or raises) with a request of its own
still in flight: not after a bad entry, a device error, a cancel or a backend restart."""

from __future__ import annotations

import asyncio
import errno
import signal

import pytest

from ivshmem_virtio.frontend.blk import BlkIOError

from .blk_helpers import blk_stack, random_disk
from .conftest import run
from .test_blk_link import connect, leave, served_random_disk

MiB = 1 << 20


def _ours_left(c) -> int:  # noqa: ANN001
    """Requests of the client in flight or waiting for room: none once a call has ended."""
    return c._outstanding + len(c._backlog)


@pytest.mark.parametrize("depth", [1, 7, 32, 600])  # 600: more than the ring holds
def test_fills_every_buffer_within_depth(tmp_path, image_factory, depth):
    async def body():
        async with random_disk(tmp_path, image_factory, 8 * MiB) as (c, data):
            rng = __import__("random").Random(depth)
            sizes = [512, 4096, 65536, c.max_transfer + 4096]  # the last: two requests
            reads = []
            for _ in range(400):
                n = rng.choice(sizes)
                reads.append((rng.randrange((8 * MiB - n) // 512) * 512, bytearray(n)))
            small = [r for r in reads if len(r[1]) <= c.max_transfer]
            c0 = c.completed
            most = 0

            def lazily():  # consumed as requests complete: never more than depth in flight
                nonlocal most
                for i, item in enumerate(small):
                    most = max(most, i - (c.completed - c0))  # (one request per item)
                    yield item

            assert await c.readinto_many(lazily(), depth) == sum(len(b) for _, b in small)
            assert most < depth and (depth == 1 or most > 1)  # (before adding one more)
            for off, buf in small:
                assert buf == data[off:off + len(buf)]
            # items larger than one request are split, as readinto splits them
            big = [r for r in reads if len(r[1]) > c.max_transfer][:20]
            for _, buf in big:
                buf[:] = bytes(len(buf))
            assert await c.readinto_many(big, depth) == sum(len(b) for _, b in big)
            for off, buf in big:
                assert buf == data[off:off + len(buf)]
            assert _ours_left(c) == 0
            assert await c.read(4096, 512) == data[4096:4608]

    run(body())


def test_a_bad_entry_raises_after_the_good_ones_ended(tmp_path, image_factory):
    async def body():
        async with random_disk(tmp_path, image_factory, MiB) as (c, data):
            bufs = [bytearray(4096) for _ in range(3)]
            with pytest.raises(BlkIOError) as ei:
                await c.readinto_many([(0, bufs[0]), (8192, bufs[1]), (MiB, bufs[2])])
            assert ei.value.errno == errno.ENOSPC
            assert bufs[0] == data[:4096] and bufs[1] == data[8192:12288]
            assert _ours_left(c) == 0
            with pytest.raises(ValueError, match="multiples of 512"):
                await c.readinto_many([(0, bytearray(512)), (100, bytearray(512))])
            with pytest.raises(TypeError, match="writable"):
                await c.readinto_many([(0, bytes(512))])
            # not a buffer, or not an (offset, buffer) pair: the entries before it still read
            for junk in (object(), (0,), ("0", bytearray(512))):
                first = bytearray(4096)
                with pytest.raises((TypeError, ValueError)):
                    await c.readinto_many([(4096, first), junk])  # type: ignore[list-item]
                assert first == data[4096:8192]

            def failing():
                yield 8192, bufs[0]
                raise RuntimeError("the caller's iterable broke")

            bufs[0][:] = bytes(4096)
            with pytest.raises(RuntimeError, match="broke"):
                await c.readinto_many(failing())
            assert bufs[0] == data[8192:12288]
            with pytest.raises(ValueError, match="depth"):
                await c.readinto_many([], depth=0)
            assert await c.readinto_many([]) == 0
            assert _ours_left(c) == 0
            assert await c.read(0, 512) == data[:512]

    run(body())


def test_a_device_error_is_raised_once_all_ended(tmp_path, image_factory):
    """The device answers IOERR for one request (past its capacity): the others' buffers are
    filled, the first error is raised, nothing stays in flight."""
    async def body():
        async with random_disk(tmp_path, image_factory, MiB) as (c, data):
            c.size = 2 * MiB  # past the client's own check: the device must refuse
            reads = [(o, bytearray(4096)) for o in (0, 4096, MiB + 4096, 8192, 12288)]
            with pytest.raises(BlkIOError) as ei:
                await c.readinto_many(reads, depth=2)
            assert ei.value.errno == errno.EIO
            for off, buf in reads:
                if off < MiB:
                    assert buf == data[off:off + 4096]
            assert _ours_left(c) == 0
            assert await c.read(0, 512) == data[:512]

    run(body())


def test_a_cancel_waits_for_what_is_in_flight(tmp_path, image_factory):
    """Cancelled mid-way: the requests in the ring end before the cancel reaches the caller
    (their buffers are not written after it), those not yet in the ring never start."""
    image = image_factory(8 * MiB)

    async def body():
        async with blk_stack(str(tmp_path / "l.sock"), image, mode="block",
                             client_queue=16) as s:
            c = s.client
            started = asyncio.Event()
            pulled = 0
            c0 = c.completed

            def endless():
                nonlocal pulled
                while True:
                    if pulled == 64:
                        started.set()
                    yield (pulled * 4096) % (8 * MiB), bytearray(4096)
                    pulled += 1

            task = asyncio.create_task(c.readinto_many(endless(), depth=64))
            await asyncio.wait_for(started.wait(), 10)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            assert _ours_left(c) == 0
            # the ring holds 16: most of the 64 in flight waited in the backlog, never started
            assert c.completed - c0 < pulled
            assert len(await c.read(0, 4096)) == 4096

    run(body())


def test_survives_a_backend_restart(procs, tmp_path, image_factory):
    """The backend is killed with reads in flight and in the backlog: they are resubmitted to
    the new backend, and every buffer holds the image's bytes."""
    sock, image, data, first = served_random_disk(procs, tmp_path, image_factory, 4 * MiB)

    async def body():
        c = await connect(sock)
        try:
            await c.read(0, 512)
            first.signal(signal.SIGKILL)
            first.proc.wait(10)
            reads = [((i * 12288) % (4 * MiB - 4096), bytearray(4096)) for i in range(300)]
            task = asyncio.create_task(c.readinto_many(reads, depth=100))
            await asyncio.sleep(0.3)
            assert not task.done()
            procs.blk(sock, image, name="blk-2")
            assert await asyncio.wait_for(task, 20) == 300 * 4096
            for off, buf in reads:
                assert buf == data[off:off + 4096]
            assert c.bring_ups == 2 and _ours_left(c) == 0
        finally:
            await leave(c)

    run(body())
