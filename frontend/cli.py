"""``ivshmem-virtio blk-client`` and ``ivshmem-virtio nbd``: the Python frontend's commands.

Every misuse (a misaligned or out-of-range request, a write to a read-only disk, no backend
within ``--timeout``, binary output to a terminal) is a :class:`ConfigError`: one line on
stderr and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import ssl
import sys
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

import structlog

from ivshmem_virtio.errors import ConfigError

from .blk import BlkClient, BlkIOError
from .driver import connect_driver

log = structlog.get_logger("ivshmem_virtio.frontend")


async def connect_blk(link: str, timeout: float, mode: str = "block") -> BlkClient:
    return await connect_driver(BlkClient, link, timeout, mode=mode)


def link_of(args: argparse.Namespace) -> str:
    """``--link LINK`` or ``--vhost-user SOCKET``, as one link name (``vhost-user:SOCKET``)."""
    vhost_user = getattr(args, "vhost_user", None)
    return args.link if vhost_user is None else f"vhost-user:{vhost_user}"


def _percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))] if values else 0.0


T = TypeVar("T")


async def verify(client: BlkClient, size: int, depth: int) -> dict:
    """Write a random pattern with ``depth`` requests in flight, read it back, compare."""
    size = min(size, client.size) // 4096 * 4096
    chunk = 128 << 10
    pattern = os.urandom(size)
    sem = asyncio.Semaphore(depth)
    lat: list[float] = []

    async def one(fn: Callable[..., Awaitable[T]], *a: object) -> T:
        async with sem:
            t0 = time.perf_counter()
            r = await fn(*a)
            lat.append(time.perf_counter() - t0)
            return r

    t0 = time.perf_counter()
    await asyncio.gather(*[one(client.write, o, pattern[o:o + chunk])
                           for o in range(0, size, chunk)])
    await client.flush()
    t_write = time.perf_counter() - t0
    t0 = time.perf_counter()
    parts = await asyncio.gather(*[one(client.read, o, min(chunk, size - o))
                                   for o in range(0, size, chunk)])
    t_read = time.perf_counter() - t0
    ok = b"".join(parts) == pattern
    small: list[float] = []
    for i in range(500):
        t1 = time.perf_counter()
        await client.read((i * 4096) % size, 512)
        small.append(time.perf_counter() - t1)
    return {
        "verified": ok, "bytes": size, "depth": depth,
        "write_MBps": round(size / t_write / 1e6, 1), "read_MBps": round(size / t_read / 1e6, 1),
        "read512_p50_us": round(_percentile(small, 0.5) * 1e6, 1),
        "read512_p99_us": round(_percentile(small, 0.99) * 1e6, 1),
        "id": await client.get_id(), "capacity_sectors": client.capacity,
    }


def _check_range(client: BlkClient, offset: int, length: int, what: str) -> None:
    """The request's shape, as one line naming the option, before anything is sent."""
    if offset % 512:
        raise ConfigError(f"{what} --offset {offset}: not a multiple of 512")
    if length % 512:
        raise ConfigError(f"{what} --length {length}: not a multiple of 512")
    if offset + length > client.size:
        raise ConfigError(f"{what}: bytes {offset}..{offset + length} reach past the end of "
                          f"the {client.size}-byte disk")


def _check_args(args: argparse.Namespace) -> None:
    """What can be refused before the link is touched."""
    if args.action == "read" and args.out is None and sys.stdout.isatty():
        raise ConfigError("read: refusing to write binary data to a terminal; give --out FILE, "
                          "or --out - to force stdout")
    if args.action == "write" and args.infile != "-" and not os.path.isfile(args.infile):
        raise ConfigError(f"write --in {args.infile}: no such file")
    if args.timeout <= 0:
        raise ConfigError(f"--timeout {args.timeout:g}: must be positive")
    if args.action == "verify" and (args.size < 4096 or args.depth < 1):
        raise ConfigError("verify: --size must be at least 4K and --depth at least 1")


async def run_blk_client(args: argparse.Namespace, stop: asyncio.Event) -> int:
    _check_args(args)
    client = await connect_blk(link_of(args), args.timeout, args.mode)
    try:
        return await _blk_action(client, args)
    except BlkIOError as e:  # the device refused (read-only, I/O error): the user's answer
        raise ConfigError(f"{args.action}: {e.strerror or e}") from None
    finally:
        await client.close()
        client.dev.close()


async def _blk_action(client: BlkClient, args: argparse.Namespace) -> int:
    """One blk-client action on a connected disk; returns the exit status."""
    if args.action == "info":
        info = {"capacity_sectors": client.capacity, "bytes": client.size,
                "read_only": client.read_only, "id": await client.get_id(),
                "size_max": client.size_max, "seg_max": client.seg_max,
                "blk_size": client.blk_size, "features": hex(client.features)}
        print(json.dumps(info))
    elif args.action == "read":
        length = max(0, client.size - args.offset) if args.length is None else args.length
        _check_range(client, args.offset, length, "read")
        to_stdout = args.out in (None, "-")
        try:
            out = sys.stdout.buffer if to_stdout else open(args.out, "wb")  # noqa: SIM115
        except OSError as e:
            raise ConfigError(f"read --out {args.out}: {e.strerror}") from None
        try:
            step = 8 << 20  # a window in flight at once, its requests as the ring takes them
            end = args.offset + length
            for o in range(args.offset, end, step):
                buf = bytearray(min(step, end - o))
                await client.readinto_many([(o, buf)])
                out.write(buf)
        finally:
            if out is not sys.stdout.buffer:
                out.close()
    elif args.action == "write":
        try:
            data = (sys.stdin.buffer.read() if args.infile == "-"
                    else open(args.infile, "rb").read())  # noqa: SIM115
        except OSError as e:
            raise ConfigError(f"write --in {args.infile}: {e.strerror}") from None
        if len(data) % 512:
            data += bytes(512 - len(data) % 512)
        _check_range(client, args.offset, len(data), "write")
        if client.read_only:
            raise ConfigError("write: the disk is read-only")
        await client.write(args.offset, data)
        if args.flush:
            await client.flush()
    elif args.action == "verify":
        if client.read_only:
            raise ConfigError("verify: the disk is read-only (verify writes a pattern)")
        result = await verify(client, args.size, args.depth)
        print(json.dumps(result))
        return 0 if result["verified"] else 1
    return 0


def tls_context(cert: str | None, key: str | None, required: bool) -> ssl.SSLContext | None:
    """The NBD export's server TLS context (TLS 1.2 or later), or None; one-line errors."""
    if cert is None:
        if key is not None or required:
            raise ConfigError(f"{'--tls-key' if key else '--tls-required'} goes with --tls-cert")
        return None
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(cert, key)
    except ssl.SSLError as e:  # (an OSError too: first)
        raise ConfigError(f"--tls-cert {cert}: not a certificate chain with its key "
                          f"({e.reason or e})") from None
    except OSError as e:
        raise ConfigError(f"--tls-cert/--tls-key: {e.filename or cert}: {e.strerror}") from None
    return ctx


async def run_nbd(args: argparse.Namespace, stop: asyncio.Event) -> int:
    from .nbd import serve_nbd

    if args.host is not None and args.port is None:
        raise ConfigError("--host goes with --port (a UNIX socket has no host)")
    if args.max_connections < 1:
        raise ConfigError(f"--max-connections {args.max_connections}: must be at least 1")
    tls = tls_context(args.tls_cert, args.tls_key, args.tls_required)
    client = await connect_blk(link_of(args), args.timeout)
    try:
        server = await serve_nbd(client, unix_path=args.socket, port=args.port,
                                 host=args.host or "127.0.0.1",
                                 max_connections=args.max_connections, tls=tls,
                                 tls_required=args.tls_required)
    except OSError as e:
        await client.close()
        client.dev.close()
        where = f"--port {args.port}" if args.socket is None else f"--socket {args.socket}"
        raise ConfigError(f"{where}: {e.strerror}") from e
    except BaseException:
        await client.close()
        client.dev.close()
        raise
    log.info("nbd export ready", link=link_of(args), socket=args.socket, port=args.port,
             bytes=client.size, read_only=client.read_only)
    try:
        await stop.wait()
    finally:
        server.close()
        await server.wait_closed()
        await client.close()
        client.dev.close()
    return 0
