"""A hostile backend answers the Python frontend with a broken used ring.

The frontend must not crash or complete the wrong request: it drops the ring, brings the device
up again (virtio reset) and resubmits what was in flight, and the caller gets the right bytes.
Covered in block mode (completions taken in the interrupt fd callback), in poll mode with the
backend in the same loop (the interrupt task) and in poll mode with the backend in its own
process (the caller's inline QD1 spin meets the lie), for each kind of lie.
"""

from __future__ import annotations

import asyncio
import errno
import signal
import sys
from collections.abc import Callable

import pytest

from ivshmem_virtio.backend.devices.blk_service import BlkService
from ivshmem_virtio.backend.resources.image import BlockImage
from ivshmem_virtio.backend.runner import LinkRunner
from ivshmem_virtio.frontend.blk import BlkClient, BlkIOError
from ivshmem_virtio.ivshmem.sim import SimIvshmem
from ivshmem_virtio.procs import Child
from ivshmem_virtio.virtqueue.device import DeviceQueue

from .blk_helpers import blk_stack
from .conftest import run

MiB = 1 << 20


def _unknown_head(vq: DeviceQueue) -> None:
    vq.push(vq.size - 1, 513)  # QD1: the last descriptor is never in flight


def _index_jump(vq: DeviceQueue) -> None:
    vq.next_used = (vq.next_used + 100) & 0xFFFF  # claims 100 completions, 1 is in flight


def _huge_length(vq: DeviceQueue) -> None:
    chains = vq.pop_all()
    for c in chains:  # the right head, a used length far beyond the buffers, no data written
        vq.push(c.head, 0xFFFFFFFF)


LIES = {"unknown-head": _unknown_head, "index-jump": _index_jump, "huge-length": _huge_length}


class LyingService(BlkService):
    """A correct blk backend that lies once, on the ``lie_at``-th request it sees."""

    def __init__(self, image: BlockImage, lie, lie_at: int) -> None:  # noqa: ANN001
        super().__init__(image)
        self.lie, self.lie_at, self.seen = lie, lie_at, 0
        self.lied_at = -1  # the avail index (the read, counted from 0) the lie answered

    def serve(self, index: int, vq: DeviceQueue, runner: LinkRunner) -> int:
        if self.lie is not None and vq.has_new():
            self.seen += 1
            if self.seen == self.lie_at:
                lie, self.lie = self.lie, None
                self.lied_at = vq.last_avail
                print(f"lied at {self.lied_at}", flush=True)  # for the process variant
                lie(vq)
                return 1
        return super().serve(index, vq, runner)

    def poll(self, index: int, vq: DeviceQueue, runner: LinkRunner, until_ns: int,
             watch_off: int) -> tuple[int, bool, bool] | None:
        """No compiled poll while the lie is still to come: every request meets serve()."""
        if self.lie is not None:
            return None
        return super().poll(index, vq, runner, until_ns, watch_off)


async def _reads(client: BlkClient, disk: bytes, lie: str,
                 lied_at: Callable[[], int]) -> None:
    """20 reads; one of them (the 5th call to serve with work, usually the 5th read: which one,
    ``lied_at()`` says once they are done) meets the lie. What the caller sees depends on the
    kind of lie."""
    errors = []
    for i in range(20):
        off = 4096 * i
        try:
            got = await asyncio.wait_for(client.read(off, 4096), 10)
        except BlkIOError as e:
            errors.append((i, e.errno))
            continue
        assert got == disk[off:off + 4096], f"read {i}"
    if lie == "huge-length":
        # the right request, its status byte never written: an I/O error for that request
        # only (the used length is not trusted for data), no reset
        assert 0 <= lied_at() < 20
        assert errors == [(lied_at(), errno.EIO)] and client.bring_ups == 1
    else:
        # a ring naming what is not in flight: one reset and bring-up, the request
        # resubmitted and answered correctly
        assert errors == [] and client.bring_ups == 2


@pytest.mark.parametrize("mode", ["block", "poll"])
@pytest.mark.parametrize("lie", sorted(LIES))
def test_frontend_survives_a_lying_backend(tmp_path, image_factory, mode, lie):
    image = image_factory(MiB)
    with open(image, "rb") as f:
        disk = f.read()
    sock = str(tmp_path / "h.sock")

    async def body():
        service = LyingService(BlockImage(image), LIES[lie], lie_at=5)
        async with blk_stack(sock, image, mode=mode, spin_us=5.0, page_segments=False,
                             service=service) as s:
            await _reads(s.client, disk, lie, lambda: service.lied_at)
            assert service.lie is None  # the lie was told

    run(body())


@pytest.mark.parametrize("lie", sorted(LIES))
def test_inline_caller_survives_a_lying_backend_process(procs, tmp_path, image_factory,
                                                        monkeypatch, lie):
    image = image_factory(MiB)
    with open(image, "rb") as f:
        disk = f.read()
    sock = str(tmp_path / "p.sock")
    procs.hub(sock, "--rw-size", hex(0xDF000))
    liar = Child("liar", [sys.executable, "-m", "tests.test_hostile_backend", sock, image, lie],
                 tmp_path)
    procs.children.append(liar)  # ended by pid at teardown
    liar.wait_for("backend ready", 15)

    async def body():
        fdev = SimIvshmem(sock, 1)
        client = BlkClient(fdev, mode="poll", timeout=5.0, spin_us=2000.0)
        try:
            await client.start(timeout=5.0)
            # (inline reaping is likely here, not certain: a descheduled backend makes the
            # spin give up, and then the interrupt task meets the lie; both must survive it)
            await _reads(client, disk, lie, lambda: int(
                liar.log().rsplit("lied at ", 1)[1].split()[0]) if "lied at " in liar.log()
                else -1)
        finally:
            await client.close()
            fdev.close()

    run(body())


async def _liar_main(sock: str, image: str, lie: str) -> None:
    """A blk backend process that lies once (run by the test above)."""
    bdev = SimIvshmem(sock, 0)
    service = LyingService(BlockImage(image), LIES[lie], lie_at=5)
    runner = LinkRunner(bdev, service, mode="poll")
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, runner.stop)
    try:
        await runner.run()
    finally:
        service.close()
        bdev.close()


if __name__ == "__main__":
    import uvloop

    from ivshmem_virtio.log import setup_logging

    setup_logging()  # a library is silent; this process is a daemon that says "backend ready"
    uvloop.run(_liar_main(*sys.argv[1:4]))
