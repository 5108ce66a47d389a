"""``ivshmem-virtio console``: one virtio-console device on one link, attached to a pty, a UNIX
socket, a log file or stdio, until SIGTERM/SIGINT.

With ``--pty`` the pty's path is printed on stdout (``char device redirected to /dev/pts/N``,
as QEMU prints it) so a script or a user can attach ``screen``/``picocom``/``minicom`` to it.
"""

from __future__ import annotations

import argparse
import asyncio
import sys

import structlog

from ivshmem_virtio.errors import ConfigError
from ivshmem_virtio.link import parse_link
from ivshmem_virtio.spec import console as wire

from .daemon import check_runner_options, open_backend_link, serve
from .devices.console import ConsoleModel
from .devices.console_service import ConsoleRunner, ConsoleService
from .resources.console_host import HostPort, LogPort, PtyPort, SocketPort, StdioPort

log = structlog.get_logger("ivshmem_virtio.backend")


def check_size(cols: int, rows: int, where: str = "--") -> None:
    for name, value in (("cols", cols), ("rows", rows)):
        if not 1 <= value <= 0xFFFF:
            raise ConfigError(f"{where}{name} {value}: must be 1..65535")


def open_port(kind: str, target: str, cols: int, rows: int) -> HostPort:
    """The host side: ``pty``, ``socket`` PATH, ``log`` FILE (``--log-file``) or ``stdio``."""
    if kind == "pty":
        return PtyPort(cols, rows)
    if kind == "socket":
        return SocketPort(target)
    if kind == "log":
        return LogPort(target)
    return StdioPort()


def port_choice(args: argparse.Namespace) -> tuple[str, str]:
    if args.socket:
        return "socket", args.socket
    if args.log_file:
        return "log", args.log_file
    if args.stdio:
        return "stdio", ""
    return "pty", ""


async def run_console(args: argparse.Namespace, stop: asyncio.Event) -> int:
    parse_link(args.link)
    check_runner_options(args.queue_size, args.spin_us)
    check_size(args.cols, args.rows)
    kind, target = port_choice(args)
    port = open_port(kind, target, args.cols, args.rows)
    try:
        dev = open_backend_link(args.link, wire.VIRTIO_ID_CONSOLE)
    except BaseException:
        port.close()
        raise
    service = ConsoleService(port, ConsoleModel(cols=args.cols, rows=args.rows))
    runner = ConsoleRunner(dev, service, mode=args.mode, spin_us=args.spin_us,
                           queue_size=args.queue_size, workers=1)
    if kind == "pty":
        # QEMU's words, so tools that parse them find the path
        print(f"char device redirected to {port.describe()} (label console)", flush=True)
    log.info("virtio-console backend", link=args.link, port=kind, path=port.describe(),
             cols=args.cols, rows=args.rows)
    try:
        service.start()
        failed = await serve([runner], stop)
    finally:
        service.flush_output()
        stats = service.stats()
        service.close()
        dev.close()
    log.info("stopped", link=args.link, stats=stats)
    if stats["output_buffered"]:
        print(f"ivshmem-virtio: {stats['output_buffered']} bytes of console output were never "
              "read", file=sys.stderr)
    return 1 if failed else 0
