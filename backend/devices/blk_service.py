"""virtio-blk served from a disk image: glue between the model, the image and the runner."""

from __future__ import annotations

import functools
import time
from types import ModuleType
from typing import TYPE_CHECKING, Any, Protocol, cast

from ivshmem_virtio._native import native
from ivshmem_virtio.shm import Region
from ivshmem_virtio.spec import blk as B
from ivshmem_virtio.virtqueue.device import Accel, DeviceQueue

from ..resources.image import BlockImage
from ..runner import WEIGHT
from .blk import BlkModel


class _BlkAccel(Accel, Protocol):
    """The compiled queue (``_fastpath.BlkQueue``) as the blk service drives it."""

    def serve(self, last_avail: int, next_used: int, limit: int, until_ns: int = 0,
              /) -> tuple[int, int, int, int, int, int, int, int, int]: ...

    def poll(self, last_avail: int, next_used: int, signalled_used: int, event_idx: bool,
             limit: int, until_ns: int, watch_off: int,
             /) -> tuple[int, int, int, int, int, int, int, int, int, int]: ...

    def run(self, last_avail: int, next_used: int, signalled_used: int, event_idx: bool,
            until_ns: int, slice_ns: int, watch_off: int, yield_cpu: bool, event_off: int,
            ring_fd: int, ring_reg: object | None, ring_off: int, ring_value: int,
            /) -> tuple[int, int, int, int, int, int, int, int, int, int, int]: ...


if TYPE_CHECKING:
    from ..runner import QueueRunner

PAGE = 4096


def request_limits(rw_size: int) -> tuple[int, int]:
    """(size_max, seg_max) so that one request always fits the frontend's bounce pool.

    Linux's virtio_blk sets no sector limit of its own (max_hw_sectors is unlimited, so requests
    reach 1.25 MiB), and the virtio_ivshmem frontend bounces every segment through the R/W
    section. A request larger than the pool would be retried forever, so the request size is
    bounded through the only knobs virtio-blk has: one page per segment (any bio layout fills
    whole segments) and enough segments for a quarter of the section (55 for 0xDF000, 220 KiB).
    The reference backend's size_max = rw/8 with seg_max = 1 is safe too, but limits Linux to
    one page per request when pages are not physically contiguous.
    """
    return PAGE, max(1, min(126, (rw_size // 4) // PAGE))


class BlkService:
    """One virtio-blk device: IN/OUT run inline (page-cache fast), the rest in a worker."""

    device_id = B.DEVICE_ID
    num_queues = 1

    def __init__(self, image: BlockImage, *, serial: str = "", rw_size: int = 0xDF000) -> None:
        self.image = image
        size_max, seg_max = request_limits(rw_size)
        self.model = BlkModel(image.sectors, read_only=image.read_only, serial=serial,
                              size_max=size_max, seg_max=seg_max)

    @property
    def features(self) -> int:
        return self.model.features

    def config(self) -> bytes:
        return self.model.config()

    def on_reset(self) -> None:
        pass

    def on_activate(self, features: int, runner: QueueRunner) -> None:
        pass

    def serve(self, index: int, vq: DeviceQueue, runner: QueueRunner) -> int:
        """One batch of at most ``runner.batch`` chains, compiled where the build has it.

        The compiled path (``ivshmem_virtio._native``) serves the usual reads and writes and
        stops at the first chain that is anything else; that one chain goes through the Python
        path (the reference: walk, ``BlkModel.handle``), then the compiled path goes on. The
        compiled path knows one flat window of memory (a plain :class:`Region`, ivshmem's R/W
        section); guest memory of several regions (vhost-user) takes the Python path. Both
        start no new request past ``runner.until_ns`` (its time slice, while the daemon's other
        devices are active), so the batch ends at the first request that ends past it.
        """
        accel = cast("_BlkAccel | None", vq.accel)
        if accel is None:
            nat = native()
            if nat is None or type(vq.mem) is not Region:
                return self._serve_python(index, vq, runner.batch, runner)
            accel = vq.accel = self._accel(nat, vq)
        limit = runner.batch
        until = runner.until_ns
        total = 0
        while True:
            (served, vq.last_avail, vq.next_used, stop, *counts) = accel.serve(
                vq.last_avail, vq.next_used, limit - total, until)
            total += served
            if served:
                self._count(*counts)
            if not stop or total >= limit or (until and time.monotonic_ns() >= until):
                return total
            # the next chain is not the usual read or write, or the ring is broken (then
            # pop_all raises the RingError): the reference decides
            n = self._serve_python(index, vq, 1, runner)
            total += n
            if not n or total >= limit or (until and time.monotonic_ns() >= until):
                return total

    def poll(self, index: int, vq: DeviceQueue, runner: QueueRunner, until_ns: int,
             watch_off: int) -> tuple[int, bool, bool] | None:
        """The compiled poll (``BlkQueue.poll``): until ``until_ns``, spin on the avail ring and
        serve and publish what comes, the GIL released. (served, notify: the driver wants an
        interrupt, owner: the runner's task must run: a transaction at ``watch_off``, or a
        chain for the Python path); None without a compiled queue (the runner polls in
        Python). Serves exactly what :meth:`serve`'s compiled path serves."""
        accel = cast("_BlkAccel | None", vq.accel)
        nat = native()
        if accel is None or nat is None:
            return None
        (served, vq.last_avail, vq.next_used, vq.signalled_used, why, *counts) = accel.poll(
            vq.last_avail, vq.next_used, vq.signalled_used, vq.event_idx, WEIGHT, until_ns,
            watch_off)
        if served:
            self._count(*counts)
        return served, why == nat.POLL_NOTIFY, why in (nat.POLL_STOP, nat.POLL_WATCH)

    def serve_worker(self, index: int, vq: DeviceQueue, until_ns: int, slice_ns: int,
                     watch_off: int, yield_cpu: bool,
                     ring: tuple[int, int, object | None, int, int],
                     ) -> tuple[int, bool, bool] | None:
        """A worker thread's stretch (``BlkQueue.run``): the compiled poll in slices until
        ``until_ns``, publishing and ringing the driver itself (``ring``: the transport's
        ``native_notify``), the GIL released throughout. (served, left: the stretch ended
        with work left, owner: the runner's task must run); None without a compiled queue."""
        accel = cast("_BlkAccel | None", vq.accel)
        nat = native()
        if accel is None or nat is None:
            return None
        (served, vq.last_avail, vq.next_used, vq.signalled_used, why, _rung, *counts) = (
            accel.run(vq.last_avail, vq.next_used, vq.signalled_used, vq.event_idx, until_ns,
                      slice_ns, watch_off, yield_cpu, *ring))
        if served:
            self._count(*counts)
        return served, why == nat.POLL_TIME, why in (nat.POLL_STOP, nat.POLL_WATCH)

    def _count(self, reads: int, read_bytes: int, writes: int, write_bytes: int,
               fails: int) -> None:
        """What the compiled path served, into the model's counters (as BlkModel counts)."""
        m = self.model.metrics
        m.read_count += reads
        m.read_bytes += read_bytes
        m.write_count += writes
        m.write_bytes += write_bytes
        m.io_fails += fails

    def _accel(self, nat: ModuleType, vq: DeviceQueue) -> Any:
        """The compiled companion of ``vq`` (lives on the queue, dies with it)."""
        model = self.model
        return nat.BlkQueue(vq.mem.buffer(), vq.size, vq.desc, vq.avail, vq.used, vq.indirect,
                            self.image.fd, model.read_only, model.capacity, model.max_data)

    def _serve_python(self, index: int, vq: DeviceQueue, limit: int, runner: QueueRunner) -> int:
        """The reference path. Within a time slice it pops one chain at a time, so that it
        stops at the slice's end as the compiled one does (a popped chain is always served)."""
        mem = vq.mem
        model = self.model
        image = self.image
        push = vq.push
        until = runner.until_ns
        served = 0
        while served < limit:
            chains = vq.pop_all(1 if until else limit)
            for chain in chains:
                done = model.handle(mem, chain, image)
                if isinstance(done, int):
                    push(chain.head, done)
                else:
                    runner.defer(index, chain.head,
                                 functools.partial(model.execute, mem, done, image))
            served += len(chains)
            if not chains or not until or time.monotonic_ns() >= until:
                return served
        return served

    def flush(self) -> None:
        """Make every acknowledged write durable (a vhost-user front-end went away)."""
        self.image.flush()

    def close(self) -> None:
        try:
            self.image.flush()
        finally:
            self.image.close()
