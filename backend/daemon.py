"""``ivshmem-virtio blk``: one virtio-blk device on one link, until SIGTERM/SIGINT."""

from __future__ import annotations

import argparse
import asyncio
import contextlib

import structlog

from ivshmem_virtio.errors import ConfigError, LinkError
from ivshmem_virtio.ivshmem.base import IvshmemDevice
from ivshmem_virtio.link import open_link, parse_link
from ivshmem_virtio.spec import blk as B
from ivshmem_virtio.spec import ivshmem as H

from .devices.blk_service import BlkService
from .resources.image import BlockImage
from .runner import LinkRunner, Service

log = structlog.get_logger("ivshmem_virtio.backend")


def check_runner_options(queue_size: int, spin_us: float) -> None:
    if queue_size < 8 or queue_size > 32768 or queue_size & (queue_size - 1):
        raise ConfigError(f"--queue-size {queue_size}: must be a power of two from 8 to 32768")
    if not 0 <= spin_us <= 1e6:  # (NaN fails this too)
        raise ConfigError(f"--spin-us {spin_us}: must be 0..1000000")


def open_backend_link(spec: str, device_id: int) -> IvshmemDevice:
    """Join ``spec`` as the backend of ``device_id``; any failure is a configuration error."""
    want = H.backend_protocol(device_id)
    try:
        dev = open_link(spec, backend=True, protocol=want)
    except LinkError as e:
        raise ConfigError(f"--link {spec}: {e}") from e
    if dev.protocol != want:
        dev.close()
        raise ConfigError(f"--link {spec}: the link's protocol is {dev.protocol:#06x}, "
                          f"a {device_id} backend needs {want:#06x}")
    if dev.rw.size < 2 * H.PAGE_SIZE:
        dev.close()
        raise ConfigError(f"--link {spec}: R/W section of {dev.rw.size:#x} bytes is smaller "
                          "than two pages")
    return dev


async def serve(runners: list[LinkRunner], stop: asyncio.Event) -> int:
    """Run every runner until ``stop``; a crashed runner is logged, the others go on.

    Returns how many runners failed, so a daemon can exit non-zero for a supervisor to see.
    """
    tasks: dict[asyncio.Task[object], LinkRunner] = {asyncio.create_task(r.run()): r
                                                     for r in runners}
    stopper = asyncio.create_task(stop.wait())
    pending: set[asyncio.Task[object]] = set(tasks) | {stopper}
    failed = 0
    while not stop.is_set() and len(pending) > 1:
        done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
        for t in done:
            if t is not stopper and t.exception() is not None:
                failed += 1
                log.error("device runner failed", link=tasks[t].dev.name,
                          error=repr(t.exception()))
    for r in runners:
        r.stop()
    for t in tasks:
        with contextlib.suppress(Exception):
            await t
    stopper.cancel()
    return failed


async def run_blk(args: argparse.Namespace, stop: asyncio.Event) -> int:
    if getattr(args, "vhost_user", None):
        from .vhost_user_daemon import run_blk_vhost_user
        return await run_blk_vhost_user(args, stop)
    parse_link(args.link)
    check_runner_options(args.queue_size, args.spin_us)
    if len(args.serial.encode()) > B.ID_BYTES:
        raise ConfigError(f"--serial: at most {B.ID_BYTES} bytes")
    image = BlockImage(args.image, read_only=args.read_only)
    try:
        dev = open_backend_link(args.link, B.DEVICE_ID)
    except BaseException:
        image.close()
        raise
    service: Service = BlkService(image, serial=args.serial, rw_size=dev.rw.size)
    runner = LinkRunner(dev, service, mode=args.mode, spin_us=args.spin_us,
                        queue_size=args.queue_size)
    log.info("virtio-blk backend", image=args.image, sectors=image.sectors,
             read_only=args.read_only, link=args.link)
    try:
        failed = await serve([runner], stop)
    finally:
        service.close()
        dev.close()
    log.info("stopped", link=args.link)
    return 1 if failed else 0
