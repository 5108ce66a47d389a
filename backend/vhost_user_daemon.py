"""``ivshmem-virtio blk --vhost-user SOCKET``: the blk daemon as a vhost-user back-end.

The ``can`` daemon puts its vhost-user sockets on the same CAN switch as its ivshmem links
(``backend/can_daemon.py``), so a VM and a cell share one bus.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib

import structlog

from ivshmem_virtio.errors import ConfigError
from ivshmem_virtio.spec import blk as B

from .devices.blk_service import BlkService
from .resources.image import BlockImage
from .vhost_user import VhostUserServer

log = structlog.get_logger("ivshmem_virtio.backend")

NO_BOUNCE_RW = 1 << 24
"""vhost-user has no bounce pool to size requests for (the guest's own pages are mapped): this
gives the blk model its largest segment count."""


async def serve_servers(servers: list[VhostUserServer], stop: asyncio.Event) -> None:
    """Serve every server until ``stop``; each removes its socket when it ends."""
    for s in servers:
        if not s.listening:
            s.listen()  # every socket exists before the first front-end is waited for
    tasks = [asyncio.create_task(s.serve_forever()) for s in servers]
    stopper = asyncio.create_task(stop.wait())
    try:
        done, _ = await asyncio.wait([*tasks, stopper], return_when=asyncio.FIRST_COMPLETED)
        for t in done:
            if t is not stopper and t.exception() is not None:
                log.error("vhost-user server failed", error=repr(t.exception()))
    finally:
        stopper.cancel()
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        for s in servers:
            s.close()


async def run_blk_vhost_user(args: argparse.Namespace, stop: asyncio.Event) -> int:
    if len(args.serial.encode()) > B.ID_BYTES:
        raise ConfigError(f"--serial: at most {B.ID_BYTES} bytes")
    image = BlockImage(args.image, read_only=args.read_only)
    service = BlkService(image, serial=args.serial, rw_size=NO_BOUNCE_RW)
    server = VhostUserServer(service, args.vhost_user)
    try:
        server.listen()
        log.info("virtio-blk vhost-user back-end", image=args.image, sectors=image.sectors,
                 read_only=args.read_only, socket=args.vhost_user)
        await serve_servers([server], stop)
    finally:
        server.close()
        service.close()
    log.info("stopped", socket=args.vhost_user, sessions=server.sessions, dropped=server.dropped)
    return 0
