"""``ivshmem-virtio``: one command line for the hub, the backends, the clients and the demo.

The CLI is the top of the import graph: it is the one module that reaches into ``backend``,
``frontend`` and ``benchmarks``, lazily, so ``ivshmem-virtio hub`` does not load python-can.
Every configuration error ends with a one-line message and exit status 2. Every option has a
help text and shows its default (``ArgumentDefaultsHelpFormatter`` on every parser).
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import signal
import sys
from collections.abc import Awaitable, Callable

from ..backend.config import TYPE_SPIN_US
from ..errors import ConfigError, IvshmemVirtioError
from ..link import SPIN_CAP_US
from ..log import setup_logging

CAN_SPIN_US = TYPE_SPIN_US["can"]  # ``can``'s longest poll window, as serve's can devices


def _int(text: str) -> int:
    """Integers in any base (``0xDF000``, ``4096``), as the hub spec wants."""
    try:
        return int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None


_SUFFIXES = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def _size(text: str) -> int:
    """A byte count: ``8M``, ``512K``, ``1G`` (binary units, ``MiB``/``MB`` alike), ``0x1000``."""
    t = text.strip().upper().removesuffix("B").removesuffix("I")
    unit = t[-1:] if t[-1:] in _SUFFIXES else ""
    try:
        value = int(t[:-1] if unit else t, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a size (a number, optionally with K, M or G)") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r}: a size cannot be negative")
    return value * _SUFFIXES[unit]


def _protocols(text: str) -> tuple[int, ...]:
    return tuple(_int(p) for p in text.split(",") if p)


def _show(value: object) -> str:
    """A default as the user would type it: sizes and protocols in hex, tuples comma-joined."""
    if isinstance(value, tuple | list):
        return ",".join(_show(v) for v in value)
    if isinstance(value, int) and value >= 0x1000:
        return f"{value:#x}"
    return str(value)


class _Formatter(argparse.ArgumentDefaultsHelpFormatter):
    """Defaults in every option's help; no "(default: None/False)" where there is none."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        help_text = action.help
        if (not help_text or "default" in help_text or action.default is None
                or isinstance(action.default, bool) or action.default is argparse.SUPPRESS
                or not action.option_strings):
            return help_text
        return f"{help_text} (default: {_show(action.default)})"


class _Parser(argparse.ArgumentParser):
    def __init__(self, *args: object, **kwargs: object) -> None:
        kwargs.setdefault("formatter_class", _Formatter)
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"ivshmem-virtio: error: {message}\n")


DESCRIPTION = ("ivshmem-virtio: virtio devices (blk, can) between Jailhouse cells over ivshmem "
               "shared memory; one command line for the hub, the backends, the clients and the "
               "demo. Protocol and decisions: docs/protocol.md.")
LOG_LEVELS = ("debug", "info", "warning", "error")
DEFAULT_CONFIG = "/etc/ivshmem-virtio/config.toml"


def _version() -> str:
    """``ivshmem-virtio X.Y.Z (blk data path: compiled | pure Python (why); frontend: ...)``:
    the backend's and the frontend's compiled modules are built (or skipped) each on its own."""
    from importlib.metadata import PackageNotFoundError, version

    from .._native import data_path, front_path

    try:
        ver = version("ivshmem-virtio")
    except PackageNotFoundError:  # run from a source tree that was never installed
        ver = "unknown"
    return f"%(prog)s {ver} (blk data path: {data_path()}; frontend: {front_path()})"


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="ivshmem-virtio", description=DESCRIPTION)
    p.add_argument("--version", action="version", version=_version())
    p.add_argument("--log-json", action="store_true", help="JSON log lines instead of console")
    p.add_argument("--log-level", choices=LOG_LEVELS, default=None,
                   help="least severe log line shown (default: info for the daemons, warning "
                   "for blk-client, console-client and bench)")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    h = sub.add_parser("hub", help="serve one simulated ivshmem link (docs/protocol.md)")
    h.add_argument("--socket", required=True, help="the UNIX socket peers join the link on")
    h.add_argument("--max-peers", type=_int, default=2,
                   help="peers of the link, 2..12 (virtio links have 2)")
    h.add_argument("--vectors", type=_int, default=2,
                   help="interrupt vectors per peer, 1..16 (1 acts like an INTx board)")
    h.add_argument("--state-table-size", type=_int, default=0x1000,
                   help="bytes of the state table (page multiple)")
    h.add_argument("--rw-size", type=_int, default=0xDF000,
                   help="bytes of the R/W section, where virtio lives (page multiple)")
    h.add_argument("--output-size", type=_int, default=0,
                   help="bytes of each peer's output section (page multiple; virtio uses none)")
    h.add_argument("--protocols", type=_protocols, default=(0xC002, 0x8002),
                   help="one protocol per ID, e.g. 0xC002,0x8002")
    h.add_argument("--group", metavar="NAME",
                   help="make the socket 0660 for this group and admit its members "
                   "(default: socket 0600, only the hub's user and root may join)")
    h.add_argument("--allow-uid", action="append", metavar="USER",
                   help="also admit this user (name or uid; repeatable); the socket's mode "
                   "must still let it connect")
    h.add_argument("--qemu-peers", type=_protocols, metavar="IDS",
                   help="IDs a QEMU ivshmem peer (which sends no ID) may take, e.g. 1; "
                   "default none: a peer that sends no ID within 2 s is dropped")

    def runner_opts(sp: argparse.ArgumentParser, spin_us: float = SPIN_CAP_US) -> None:
        sp.add_argument("--mode", choices=("block", "poll", "adaptive"), default="adaptive",
                        help="wait for doorbells, busy-poll the rings, or spin then block")
        sp.add_argument("--spin-us", type=float, default=spin_us,
                        help="adaptive mode: the longest poll window in microseconds; each "
                        "link learns its own up to this; poll mode: how long a lone wait spins")
        sp.add_argument("--queue-size", type=_int, default=256,
                        help="the largest ring the backend offers (power of two, 8..32768)")

    b = sub.add_parser("blk", help="serve a disk image as virtio-blk over a link or vhost-user")
    bt = b.add_mutually_exclusive_group(required=True)
    bt.add_argument("--link", help="sim:SOCKET, uio:/dev/uioN or uio:auto")
    bt.add_argument("--vhost-user", metavar="SOCKET",
                    help="be a vhost-user back-end listening on SOCKET (QEMU's "
                    "vhost-user-blk-pci connects to it) instead of an ivshmem link")
    b.add_argument("--image", required=True,
                   help="the disk: a raw image file (size a multiple of 512) or a block device")
    b.add_argument("--read-only", action="store_true",
                   help="offer the disk read-only (VIRTIO_BLK_F_RO)")
    b.add_argument("--serial", default="", help="the id GET_ID answers (at most 20 bytes)")
    runner_opts(b)

    c = sub.add_parser("can", help="serve virtio-can links bridged to a python-can bus")
    c.add_argument("--link", action="append", default=[],
                   help="sim:SOCKET or uio:...; repeat for several links on one CAN switch")
    c.add_argument("--vhost-user", action="append", default=[], metavar="SOCKET",
                   help="a vhost-user back-end listening on SOCKET, on the same CAN switch as "
                   "the links (repeatable; at least one --link or --vhost-user)")
    c.add_argument("--bus", required=True, help="IFACE:CHANNEL, e.g. socketcan:can0")
    c.add_argument("--fd", action="store_true", help="offer CAN FD")
    c.add_argument("--no-late-tx-ack", action="store_true",
                   help="complete a send once queued, not once the bus took it")
    runner_opts(c, CAN_SPIN_US)

    co = sub.add_parser("console", help="serve a virtio-console (the cell's /dev/hvc0) on a "
                        "pty, a UNIX socket, a log file or stdio")
    co.add_argument("--link", required=True, help="sim:SOCKET, uio:/dev/uioN or uio:auto")
    cg = co.add_mutually_exclusive_group()
    cg.add_argument("--pty", action="store_true",
                    help="a new pseudo-terminal; its path is printed (the default)")
    cg.add_argument("--socket", metavar="PATH",
                    help="a UNIX socket (0600), one client at a time: its bytes go to the cell, "
                    "the cell's output comes back on it")
    cg.add_argument("--log-file", metavar="FILE",
                    help="append the cell's output to FILE (no input; --log would clash "
                    "with --log-level)")
    cg.add_argument("--stdio", action="store_true", help="this process's stdin and stdout")
    co.add_argument("--cols", type=_int, default=80,
                    help="window width the cell sees (a pty or terminal's own size wins)")
    co.add_argument("--rows", type=_int, default=25, help="window height the cell sees")
    runner_opts(co)

    cc = sub.add_parser("console-client", help="be the cell side of a virtio-console: stdin "
                        "is its output, its input goes to stdout")
    cc.add_argument("--link", required=True, help="sim:SOCKET, uio:/dev/uioN or uio:auto")
    cc.add_argument("--timeout", type=float, default=10.0,
                    help="seconds to wait for a READY backend")
    cc.add_argument("--echo", action="store_true",
                    help="also send every byte received back to the device (a loopback cell)")
    cc.add_argument("--show-size", action="store_true",
                    help="print the console's size on stderr at start and on every change")

    k = sub.add_parser("blk-client", help="copy data in and out of a remote virtio-blk disk")
    kt = k.add_mutually_exclusive_group(required=True)
    kt.add_argument("--link", help="sim:SOCKET, uio:/dev/uioN or uio:auto")
    kt.add_argument("--vhost-user", metavar="SOCKET",
                    help="be the vhost-user front-end of the back-end listening on SOCKET")
    k.add_argument("--timeout", type=float, default=10.0,
                   help="seconds to wait for a READY backend, and for each request")
    k.add_argument("--mode", choices=("block", "poll", "adaptive"), default="block",
                   help="wait for completions on interrupts, busy-poll, or spin then block")
    ks = k.add_subparsers(dest="action", required=True, parser_class=_Parser)
    ks.add_parser("info", help="print capacity, id and limits as JSON")
    kr = ks.add_parser("read", help="read a range into a file or a pipe")
    kr.add_argument("--offset", type=_size, default=0,
                    help="first byte (a multiple of 512; K/M/G suffixes)")
    kr.add_argument("--length", type=_size, default=None,
                    help="bytes to read (a multiple of 512; default: to the end of the disk)")
    kr.add_argument("--out", default=None,
                    help="file to write, - for stdout (default: stdout when it is not a "
                    "terminal)")
    kw = ks.add_parser("write", help="write a file (- for stdin) at an offset")
    kw.add_argument("--offset", type=_size, default=0,
                    help="first byte (a multiple of 512; K/M/G suffixes)")
    kw.add_argument("--in", dest="infile", default="-",
                    help="file to write to the disk, - for stdin (padded with zeros to 512)")
    kw.add_argument("--flush", action="store_true", help="FLUSH after the write")
    kv = ks.add_parser("verify", help="write a pattern, read it back, report speed (JSON)")
    kv.add_argument("--size", type=_size, default="8M",
                    help="bytes to write and read back (K/M/G suffixes; at most the disk)")
    kv.add_argument("--depth", type=_int, default=16, help="requests in flight")

    sub.add_parser("demo", help="the whole stack on a simulated link, as separate processes")

    n = sub.add_parser("nbd", help="export a remote virtio-blk disk over NBD")
    nt = n.add_mutually_exclusive_group(required=True)
    nt.add_argument("--link", help="the disk: sim:SOCKET, uio:/dev/uioN or uio:auto")
    nt.add_argument("--vhost-user", metavar="SOCKET",
                    help="the disk: the vhost-user back-end listening on SOCKET")
    g = n.add_mutually_exclusive_group(required=True)
    g.add_argument("--socket", help="serve on this UNIX socket (created 0600)")
    g.add_argument("--port", type=_int, help="serve on this TCP port (10809 is NBD's)")
    n.add_argument("--host", help="with --port: the address to listen on (default 127.0.0.1). "
                   "WARNING: NBD has no authentication; anyone who reaches the port can read and "
                   "write the disk")
    n.add_argument("--max-connections", type=_int, default=16,
                   help="clients served at once; further connections are refused at once")
    n.add_argument("--tls-cert", metavar="PEM",
                   help="offer TLS (NBD STARTTLS) with this X.509 certificate chain")
    n.add_argument("--tls-key", metavar="PEM",
                   help="the certificate's private key (default: in the --tls-cert file)")
    n.add_argument("--tls-required", action="store_true",
                   help="with --tls-cert: serve nothing before STARTTLS")
    n.add_argument("--timeout", type=float, default=30.0,
                   help="seconds to wait for the virtio-blk backend")

    sv = sub.add_parser("serve", help="serve every device of a config file (blk and can)")
    sv.add_argument("--config", default=DEFAULT_CONFIG, help="the TOML file of devices")
    sv.add_argument("--check", action="store_true",
                    help="validate the config against this host (images, buses) and exit")
    sv.add_argument("--file-only", action="store_true",
                    help="with --check: validate the file alone, not this host's images (a "
                    "config written for another machine, e.g. packaging/config.toml)")
    sv.add_argument("--lock-dir", default=None,
                    help="where a lock file per link keeps a second serve off the same links "
                    "(default: /run/ivshmem-virtio as root, else $XDG_RUNTIME_DIR/ivshmem-virtio)")
    sv.add_argument("--sysfs", default="/sys", help="sysfs root (tests use a fake tree)")

    bd = sub.add_parser("bind", help="make uio_ivshmem claim the virtio backend protocols")
    bd.add_argument("--list", action="store_true", help="which /dev/uioN serves which link")
    bd.add_argument("--protocol", type=_int, action="append",
                    help="repeatable; default 0xC002 (blk) and 0xC024 (can)")
    bd.add_argument("--sysfs", default="/sys", help="sysfs root (tests use a fake tree)")

    bench = sub.add_parser("bench", help="latency and throughput benchmarks")
    bench.add_argument("suites", nargs="*",
                       help="suites to run (default: all; `ivshmem-virtio bench --list`)")
    bench.add_argument("--list", action="store_true",
                       help="list the suites and the baselines each one brings, then exit")
    bench.add_argument("--quick", action="store_true", help="shorter runs, less precise")
    bench.add_argument("--json", dest="json_out", help="write every result to this JSON file")
    bench.add_argument("--plots", help="write PNG plots into this directory (needs matplotlib)")
    return p


async def _serve_until_signal(main: Callable[[asyncio.Event], Awaitable[int]]) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    return await main(stop)


def _run(coro_fn: Callable[[asyncio.Event], Awaitable[int]]) -> int:
    try:
        import uvloop

        return uvloop.run(_serve_until_signal(coro_fn))
    except ImportError:  # pragma: no cover - uvloop is a declared dependency
        return asyncio.run(_serve_until_signal(coro_fn))


# the commands that run until stopped: "module:function(args, stop)"
DAEMONS = {
    "blk": "ivshmem_virtio.backend.daemon:run_blk",
    "can": "ivshmem_virtio.backend.can_daemon:run_can",
    "console": "ivshmem_virtio.backend.console_daemon:run_console",
    "console-client": "ivshmem_virtio.frontend.console:run_console_client",
    "blk-client": "ivshmem_virtio.frontend.cli:run_blk_client",
    "nbd": "ivshmem_virtio.frontend.cli:run_nbd",
    "serve": "ivshmem_virtio.backend.serve:run_serve",
}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # a client is a quiet tool (and bench's tables are its output); daemons log at info
    level = args.log_level or ("warning" if args.command in ("blk-client", "console-client",
                                                              "bench") else "info")
    setup_logging(json=args.log_json, level=level)
    try:
        if args.command == "hub":
            from ..ivshmem.hub import Access, Geometry, group_id, run_hub, user_id

            geo = Geometry(args.max_peers, args.vectors, args.state_table_size, args.rw_size,
                           args.output_size, args.protocols)
            geo.validate()
            access = Access(group=None if args.group is None else group_id(args.group),
                            allow_uids=frozenset(user_id(u) for u in args.allow_uid or ()))
            return _run(lambda stop: run_hub(args.socket, geo, stop, access,
                                             args.qemu_peers or ()))
        if args.command in DAEMONS:  # imported only when asked for: a fast --help
            module, _, name = DAEMONS[args.command].partition(":")
            daemon = getattr(importlib.import_module(module), name)
            return _run(lambda stop: daemon(args, stop))
        if args.command == "bind":
            from ivshmem_virtio.backend.bind import run_bind

            return run_bind(args)
        if args.command == "demo":
            from .demo import run_demo

            return run_demo()
        if args.command == "bench":
            from ivshmem_virtio.benchmarks.cli import run_bench

            return run_bench(args)
    except ConfigError as e:
        print(f"ivshmem-virtio: error: {e}", file=sys.stderr)
        return 2
    except IvshmemVirtioError as e:
        print(f"ivshmem-virtio: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
