"""``ivshmem-virtio can``: virtio-can devices on one or more links, one CAN bus, until a signal.

Every link is one frontend (a cell); all of them sit on one software CAN switch with the bus, so
a frame one frontend sends reaches the bus and every other frontend, as on a real wire.
"""

from __future__ import annotations

import argparse
import asyncio

import structlog

from ivshmem_virtio.errors import ConfigError
from ivshmem_virtio.ivshmem.base import IvshmemDevice
from ivshmem_virtio.link import parse_link
from ivshmem_virtio.spec import can as wire

from .daemon import check_runner_options, open_backend_link, serve
from .devices.can_backend import CanBackend
from .resources.canbus import CanBusBridge, open_bus, parse_bus_spec
from .runner import LinkRunner
from .vhost_user import VhostUserServer
from .vhost_user_daemon import serve_servers

log = structlog.get_logger("ivshmem_virtio.backend")


def can_features(fd: bool, late_tx_ack: bool) -> int:
    """The virtio-can features every link offers: classic and RTR always, FD on request."""
    return (wire.F_CAN_CLASSIC | wire.F_RTR_FRAMES | (wire.F_CAN_FD if fd else 0)
            | (wire.F_LATE_TX_ACK if late_tx_ack else 0) | wire.F_IVV_BUSOFF_REPORT)


def check_can_args(args: argparse.Namespace) -> list[str]:
    """Validate everything that needs no resource, so a typo costs no half-open link."""
    links: list[str] = list(args.link)
    for spec in links:
        parse_link(spec)
    dupes = sorted({s for s in links if links.count(s) > 1})
    if dupes:
        raise ConfigError(f"--link {dupes[0]}: given more than once (one frontend per link)")
    sockets: list[str] = list(getattr(args, "vhost_user", None) or [])
    if not links and not sockets:
        raise ConfigError("can: give at least one --link or --vhost-user")
    dupes = sorted({s for s in sockets if sockets.count(s) > 1})
    if dupes:
        raise ConfigError(f"--vhost-user {dupes[0]}: given more than once")
    check_runner_options(args.queue_size, args.spin_us)
    parse_bus_spec(args.bus)
    return links


async def run_can(args: argparse.Namespace, stop: asyncio.Event) -> int:
    links = check_can_args(args)
    sockets: list[str] = list(getattr(args, "vhost_user", None) or [])
    late = not args.no_late_tx_ack
    bridge = CanBusBridge(open_bus(args.bus, fd=args.fd), name=args.bus)
    backend = CanBackend(bridge, features=can_features(args.fd, late))
    devs: list[IvshmemDevice] = []
    runners: list[LinkRunner] = []
    servers: list[VhostUserServer] = []
    try:
        for spec in links:
            dev = open_backend_link(spec, wire.VIRTIO_ID_CAN)
            devs.append(dev)
            service = backend.add_link(spec)
            runner = LinkRunner(dev, service, mode=args.mode, spin_us=args.spin_us,
                                queue_size=args.queue_size, workers=1)
            service.bind(runner)
            runners.append(runner)
        for path in sockets:  # VMs on the same switch as the cells (one front-end each)
            service = backend.add_link(f"vhost-user:{path}")
            servers.append(VhostUserServer(service, path, bind=service.bind))
            servers[-1].listen()
        backend.start()
        log.info("virtio-can backend", links=links, vhost_user=sockets, bus=args.bus, fd=args.fd,
                 late_tx_ack=late)
        if servers:
            vhost = asyncio.create_task(serve_servers(servers, stop))
        await serve(runners, stop) if runners else await stop.wait()
        if servers:
            await vhost
    finally:
        for server in servers:
            server.close()
        stats = {s.link_id: s.stats() for s in backend.links.values()}
        backend.close()
        for dev in devs:
            dev.close()
    log.info("stopped", links=links, bus=args.bus, bus_off=backend.bus_off_count,
             bridge=bridge.metrics.as_dict(), stats=stats)
    return 0
