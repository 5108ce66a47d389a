"""``BlkClient.read_zerocopy``: the data is lent where the device put it, the bounce buffer comes
back on release (and only then), and a reset, a recovery or a close ends every lent view before
its memory is reused."""

from __future__ import annotations

import asyncio
import errno
import signal

import pytest

from ivshmem_virtio.frontend.blk import BlkIOError

from .blk_helpers import random_disk
from .conftest import run
from .test_blk_link import connect, leave, served_random_disk

MiB = 1 << 20


def _free(c) -> int:  # noqa: ANN001
    return c.transport.allocator.free_bytes


def test_lends_the_data_until_released(tmp_path, image_factory):
    async def body():
        async with random_disk(tmp_path, image_factory, 8 * MiB) as (c, data):
            await c.read(0, 512)
            before = _free(c)
            for off, n in ((0, 512), (4096, 65536), (MiB, c.max_transfer)):
                lent = await c.read_zerocopy(off, n)
                assert _free(c) < before  # the bounce buffer is the caller's
                view = lent.view
                assert view.readonly and len(view) == n and view == data[off:off + n]
                lent.release()
                assert _free(c) == before
                with pytest.raises(ValueError):
                    view[0]  # noqa: B018 - a released view is gone
                lent.release()  # idempotent
                assert _free(c) == before
            async with asyncio.timeout(10):
                with await c.read_zerocopy(8192, 4096) as view:
                    assert view == data[8192:12288]
            assert _free(c) == before
            # several lent at once, each its own buffer
            lents = [await c.read_zerocopy(i * 4096, 4096) for i in range(8)]
            for i, z in enumerate(lents):
                assert z.view == data[i * 4096:(i + 1) * 4096]
            for z in lents:
                z.release()
            assert _free(c) == before
            # dropped without release: back to the pool too, once the object is gone (the
            # loop may hold the finished future for a pass)
            await c.read_zerocopy(0, 4096)
            for _ in range(10):
                await asyncio.sleep(0)
                if _free(c) == before:
                    break
            assert _free(c) == before
            with pytest.raises(ValueError, match="one request"):
                await c.read_zerocopy(0, c.max_transfer + 512)
            with pytest.raises(ValueError, match="multiples of 512"):
                await c.read_zerocopy(100, 512)
            with pytest.raises(BlkIOError) as ei:
                await c.read_zerocopy(8 * MiB, 512)
            assert ei.value.errno == errno.ENOSPC

    run(body())


def test_a_device_error_lends_nothing(tmp_path, image_factory):
    async def body():
        async with random_disk(tmp_path, image_factory, MiB) as (c, _):
            await c.read(0, 512)
            before = _free(c)
            c.size = 2 * MiB  # past the client's own check: the device answers IOERR
            with pytest.raises(BlkIOError) as ei:
                await c.read_zerocopy(MiB, 4096)
            assert ei.value.errno == errno.EIO
            assert _free(c) == before and not c._lent

    run(body())


def test_a_cancelled_caller_leaves_no_buffer_lent(tmp_path, image_factory):
    async def body():
        async with random_disk(tmp_path, image_factory, MiB, mode="block") as (c, _):
            await c.read(0, 512)
            before = _free(c)
            task = asyncio.create_task(c.read_zerocopy(0, 4096))
            await asyncio.sleep(0)  # in flight, its completion not yet taken
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            async with asyncio.timeout(10):
                while c._outstanding:
                    await asyncio.sleep(0.001)
            assert _free(c) == before and not c._lent
            # (its completion was taken in the interrupt callback, which is still there)
            assert c._waiter is not None and c._waiter.handler is not None
            assert len(await c.read(0, 512)) == 512

    run(body())


def test_a_reset_ends_the_lent_views(tmp_path, image_factory):
    async def body():
        async with random_disk(tmp_path, image_factory, MiB) as (c, data):
            lent = await c.read_zerocopy(0, 4096)
            view = lent.view
            await c.reset_device()
            with pytest.raises(ValueError):
                view[0]  # noqa: B018 - its memory belongs to the new rings now
            with pytest.raises(ValueError, match="released"):
                lent.view  # noqa: B018
            lent.release()  # nothing to give back to the new allocator
            before = _free(c)
            with await c.read_zerocopy(4096, 4096) as v:
                assert v == data[4096:8192]
            assert _free(c) == before
            kept = await c.read_zerocopy(0, 512)
        # close() ended it too (the stack closed the client)
        with pytest.raises(ValueError):
            kept.view  # noqa: B018

    run(body())


def test_a_backend_restart_ends_the_lent_views(procs, tmp_path, image_factory):
    sock, image, data, first = served_random_disk(procs, tmp_path, image_factory, 4 * MiB)

    async def body():
        c = await connect(sock)
        try:
            lent = await c.read_zerocopy(0, 4096)
            assert lent.view == data[:4096]
            first.signal(signal.SIGKILL)
            first.proc.wait(10)
            read = asyncio.create_task(c.read(8192, 512))
            await asyncio.sleep(0.3)  # the frontend notices and waits (procs.blk blocks)
            procs.blk(sock, image, name="blk-2")
            assert await asyncio.wait_for(read, 20) == data[8192:8704]
            assert c.bring_ups == 2
            with pytest.raises(ValueError, match="released"):
                lent.view  # noqa: B018
            with await c.read_zerocopy(4096, 4096) as v:
                assert v == data[4096:8192]
        finally:
            await leave(c)

    run(body())
