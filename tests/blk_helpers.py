"""In-process harness: a hub thread, a backend runner and a BlkClient on one event loop."""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from ivshmem_virtio import _native
from ivshmem_virtio.backend.devices.blk_service import BlkService
from ivshmem_virtio.backend.resources.image import BlockImage
from ivshmem_virtio.backend.runner import LinkRunner
from ivshmem_virtio.frontend.blk import BlkClient
from ivshmem_virtio.ivshmem.hub import Geometry, HubThread
from ivshmem_virtio.ivshmem.sim import SimIvshmem


def native_or_skip() -> None:
    """Skip the calling test where the compiled blk data path is not in use (not built, or
    IVSHMEM_VIRTIO_PURE set), after the path was chosen again for it."""
    _native.reset_for_tests()
    if _native.native() is None:
        pytest.skip("the compiled data path is not built here (or IVSHMEM_VIRTIO_PURE is set)")


@dataclass
class Stack:
    hub: HubThread
    runner: LinkRunner
    client: BlkClient
    sock: str
    task: asyncio.Task[None]  # the runner's


@contextlib.asynccontextmanager
async def blk_stack(sock: str, image: str, *, read_only: bool = False, serial: str = "",
                    vectors: int = 2, queue_size: int = 256, client_queue: int = 256,
                    event_idx: bool = True, indirect: bool = True,
                    rw_size: int = 0xDF000, mode: str = "block",
                    page_segments: bool = True, spin_us: float = 50.0,
                    service: BlkService | None = None) -> AsyncIterator[Stack]:
    """``service``: a BlkService (subclass) of the test's own instead of one over ``image``."""
    geo = Geometry(vectors=vectors, rw_size=rw_size)
    with HubThread(sock, geo) as hub:
        bdev = SimIvshmem(sock, 0)
        if service is None:
            service = BlkService(BlockImage(image, read_only=read_only), serial=serial,
                                 rw_size=rw_size)
        runner = LinkRunner(bdev, service, mode=mode, queue_size=queue_size)
        task = asyncio.create_task(runner.run())
        fdev = SimIvshmem(sock, 1)
        client = BlkClient(fdev, event_idx=event_idx, indirect=indirect,
                           page_segments=page_segments, queue_size=client_queue, mode=mode,
                           spin_us=spin_us, timeout=5.0)
        try:
            await client.start(timeout=5.0)
            yield Stack(hub, runner, client, sock, task)
        finally:
            await client.close()
            fdev.close()
            runner.stop()
            if not task.cancelled():  # (a test may have cancelled it)
                await task
            service.close()
            bdev.close()


@contextlib.asynccontextmanager
async def proc_stack(procs, sock: str, image: str, *, read_only: bool = False,  # noqa: ANN001
                     serial: str = "", vectors: int = 2, queue_size: int = 256,
                     client_queue: int = 256, event_idx: bool = True, indirect: bool = True,
                     rw_size: int = 0xDF000, mode: str = "block",
                     page_segments: bool = True, backend_mode: str | None = None,
                     spin_us: float = 50.0) -> AsyncIterator[Stack]:
    """The same stack with the hub and the backend as separate processes."""
    procs.hub(sock, "--vectors", str(vectors), "--rw-size", hex(rw_size))
    args = ["--queue-size", str(queue_size), "--mode", backend_mode or mode]
    if read_only:
        args.append("--read-only")
    if serial:
        args += ["--serial", serial]
    procs.blk(sock, image, *args, name=f"blk-{len(procs.children)}")
    fdev = SimIvshmem(sock, 1)
    client = BlkClient(fdev, event_idx=event_idx, indirect=indirect, page_segments=page_segments,
                       queue_size=client_queue, mode=mode, spin_us=spin_us, timeout=10.0)
    try:
        await client.start(timeout=10.0)
        yield Stack(None, None, client, sock, None)  # type: ignore[arg-type]
    finally:
        await client.close()
        fdev.close()


@contextlib.asynccontextmanager
async def random_disk(tmp_path: Path, image_factory: Callable[..., str], size: int, *,
                      mode: str = "adaptive") -> AsyncIterator[tuple[BlkClient, bytes]]:
    """A disk of ``size`` random bytes served in-process, and its client: (client, bytes)."""
    data = os.urandom(size)
    image = image_factory(size, data=data)
    async with blk_stack(str(tmp_path / "l.sock"), image, mode=mode) as s:
        yield s.client, data
