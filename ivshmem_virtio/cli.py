"""``ivshmem-virtio``: one command line for the hub, the backends, the clients and the demo.

The CLI is the top of the import graph: it is the one module that reaches into ``backend``,
``frontend`` and ``benchmarks``, lazily, so ``ivshmem-virtio hub`` does not load python-can.
Every configuration error ends with a one-line message and exit status 2.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from collections.abc import Awaitable, Callable

from .errors import ConfigError, IvshmemVirtioError
from .link import SPIN_CAP_US
from .log import setup_logging


def _int(text: str) -> int:
    """Integers in any base (``0xDF000``, ``4096``), as the hub spec wants."""
    try:
        return int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None


def _protocols(text: str) -> tuple[int, ...]:
    return tuple(_int(p) for p in text.split(",") if p)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"ivshmem-virtio: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="ivshmem-virtio", description=__doc__.splitlines()[0])
    p.add_argument("--log-json", action="store_true", help="JSON log lines instead of console")
    p.add_argument("--log-level", default="info", help="debug, info, warning, error")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    h = sub.add_parser("hub", help="serve one simulated ivshmem link (sim-link.md)")
    h.add_argument("--socket", required=True)
    h.add_argument("--max-peers", type=_int, default=2)
    h.add_argument("--vectors", type=_int, default=2)
    h.add_argument("--state-table-size", type=_int, default=0x1000)
    h.add_argument("--rw-size", type=_int, default=0xDF000)
    h.add_argument("--output-size", type=_int, default=0)
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

    def runner_opts(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--mode", choices=("block", "poll", "adaptive"), default="adaptive",
                        help="wait for doorbells, busy-poll the rings, or spin then block")
        sp.add_argument("--spin-us", type=float, default=SPIN_CAP_US,
                        help="adaptive mode: the longest poll window in microseconds; each "
                        "link learns its own up to this (default 200)")
        sp.add_argument("--queue-size", type=_int, default=256)

    b = sub.add_parser("blk", help="serve a disk image as virtio-blk over a link")
    b.add_argument("--link", required=True, help="sim:SOCKET, uio:/dev/uioN or uio:auto")
    b.add_argument("--image", required=True)
    b.add_argument("--read-only", action="store_true")
    b.add_argument("--serial", default="")
    runner_opts(b)

    c = sub.add_parser("can", help="serve virtio-can links bridged to a python-can bus")
    c.add_argument("--link", action="append", required=True, help="repeat for a CAN switch")
    c.add_argument("--bus", required=True, help="IFACE:CHANNEL, e.g. socketcan:can0")
    c.add_argument("--fd", action="store_true", help="offer CAN FD")
    c.add_argument("--no-late-tx-ack", action="store_true")
    runner_opts(c)

    k = sub.add_parser("blk-client", help="copy data in and out of a remote virtio-blk disk")
    k.add_argument("--link", required=True)
    k.add_argument("--timeout", type=float, default=10.0)
    k.add_argument("--mode", choices=("block", "poll", "adaptive"), default="block")
    ks = k.add_subparsers(dest="action", required=True, parser_class=_Parser)
    ks.add_parser("info", help="print capacity, id and limits as JSON")
    kr = ks.add_parser("read", help="read a range into a file (- for stdout)")
    kr.add_argument("--offset", type=_int, default=0)
    kr.add_argument("--length", type=_int, default=None, help="default: to the end")
    kr.add_argument("--out", default="-")
    kw = ks.add_parser("write", help="write a file (- for stdin) at an offset")
    kw.add_argument("--offset", type=_int, default=0)
    kw.add_argument("--in", dest="infile", default="-")
    kw.add_argument("--flush", action="store_true")
    kv = ks.add_parser("verify", help="write a pattern, read it back, report speed (JSON)")
    kv.add_argument("--size", type=_int, default=8 << 20)
    kv.add_argument("--depth", type=_int, default=16)

    sub.add_parser("demo", help="the whole stack on a simulated link, as separate processes")

    n = sub.add_parser("nbd", help="export a remote virtio-blk disk over NBD")
    n.add_argument("--link", required=True)
    g = n.add_mutually_exclusive_group(required=True)
    g.add_argument("--socket")
    g.add_argument("--port", type=_int)
    n.add_argument("--timeout", type=float, default=30.0)

    sv = sub.add_parser("serve", help="serve every device of a config file (blk and can)")
    sv.add_argument("--config", default="/etc/ivshmem-virtio/config.toml")
    sv.add_argument("--check", action="store_true", help="validate the config and exit")
    sv.add_argument("--sysfs", default="/sys", help="sysfs root (tests use a fake tree)")

    bd = sub.add_parser("bind", help="make uio_ivshmem claim the virtio backend protocols")
    bd.add_argument("--list", action="store_true", help="which /dev/uioN serves which link")
    bd.add_argument("--protocol", type=_int, action="append",
                    help="repeatable; default 0xC002 (blk) and 0xC024 (can)")
    bd.add_argument("--sysfs", default="/sys", help="sysfs root (tests use a fake tree)")

    bench = sub.add_parser("bench", help="latency and throughput benchmarks")
    bench.add_argument("suites", nargs="*")
    bench.add_argument("--quick", action="store_true")
    bench.add_argument("--json", dest="json_out")
    bench.add_argument("--plots")
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


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(json=args.log_json, level=args.log_level)
    try:
        if args.command == "hub":
            from .ivshmem.hub import Access, Geometry, group_id, run_hub, user_id

            geo = Geometry(args.max_peers, args.vectors, args.state_table_size, args.rw_size,
                           args.output_size, args.protocols)
            geo.validate()
            access = Access(group=None if args.group is None else group_id(args.group),
                            allow_uids=frozenset(user_id(u) for u in args.allow_uid or ()))
            return _run(lambda stop: run_hub(args.socket, geo, stop, access,
                                             args.qemu_peers or ()))
        if args.command == "blk":
            from backend.daemon import run_blk

            return _run(lambda stop: run_blk(args, stop))
        if args.command == "can":
            from backend.can_daemon import run_can

            return _run(lambda stop: run_can(args, stop))
        if args.command == "blk-client":
            from frontend.cli import run_blk_client

            return _run(lambda stop: run_blk_client(args, stop))
        if args.command == "nbd":
            from frontend.cli import run_nbd

            return _run(lambda stop: run_nbd(args, stop))
        if args.command == "serve":
            from backend.serve import run_serve

            return _run(lambda stop: run_serve(args, stop))
        if args.command == "bind":
            from backend.bind import run_bind

            return run_bind(args)
        if args.command == "demo":
            from .demo import run_demo

            return run_demo()
        if args.command == "bench":
            from benchmarks.cli import run_bench

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
