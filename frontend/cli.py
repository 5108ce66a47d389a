"""``ivshmem-virtio blk-client`` and ``ivshmem-virtio nbd``: the Python frontend's commands."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time

import structlog

from ivshmem_virtio.errors import ConfigError, LinkError
from ivshmem_virtio.link import open_link, parse_link
from ivshmem_virtio.spec import blk as B
from ivshmem_virtio.spec import ivshmem as H

from .blk import BlkClient

log = structlog.get_logger("ivshmem_virtio.frontend")


async def connect_blk(link: str, timeout: float, mode: str = "block") -> BlkClient:
    parse_link(link)
    try:
        dev = open_link(link, backend=False, protocol=H.frontend_protocol(B.DEVICE_ID))
    except LinkError as e:
        raise ConfigError(f"--link {link}: {e}") from e
    client = BlkClient(dev, timeout=timeout, mode=mode)
    try:
        await client.start(timeout=timeout)
    except BaseException:
        client.transport.leave()
        dev.close()
        raise
    return client


def _percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))] if values else 0.0


async def verify(client: BlkClient, size: int, depth: int) -> dict:
    """Write a random pattern with ``depth`` requests in flight, read it back, compare."""
    size = min(size, client.size) // 4096 * 4096
    chunk = 128 << 10
    pattern = os.urandom(size)
    sem = asyncio.Semaphore(depth)
    lat: list[float] = []

    async def one(fn, *a):  # noqa: ANN001, ANN202
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


async def run_blk_client(args: argparse.Namespace, stop: asyncio.Event) -> int:
    client = await connect_blk(args.link, args.timeout, args.mode)
    try:
        if args.action == "info":
            info = {"capacity_sectors": client.capacity, "bytes": client.size,
                    "read_only": client.read_only, "id": await client.get_id(),
                    "size_max": client.size_max, "seg_max": client.seg_max,
                    "blk_size": client.blk_size, "features": hex(client.features)}
            print(json.dumps(info))
        elif args.action == "read":
            length = client.size - args.offset if args.length is None else args.length
            out = sys.stdout.buffer if args.out == "-" else open(args.out, "wb")  # noqa: SIM115
            try:
                step = 1 << 20
                reads = [client.read(o, min(step, args.offset + length - o))
                         for o in range(args.offset, args.offset + length, step)]
                for i in range(0, len(reads), 8):
                    for part in await asyncio.gather(*reads[i:i + 8]):
                        out.write(part)
            finally:
                if out is not sys.stdout.buffer:
                    out.close()
        elif args.action == "write":
            data = (sys.stdin.buffer.read() if args.infile == "-"
                    else open(args.infile, "rb").read())  # noqa: SIM115
            if len(data) % 512:
                data += bytes(512 - len(data) % 512)
            await client.write(args.offset, data)
            if args.flush:
                await client.flush()
        elif args.action == "verify":
            result = await verify(client, args.size, args.depth)
            print(json.dumps(result))
            return 0 if result["verified"] else 1
    finally:
        await client.close()
        client.dev.close()
    return 0


async def run_nbd(args: argparse.Namespace, stop: asyncio.Event) -> int:
    from .nbd import serve_nbd

    client = await connect_blk(args.link, args.timeout)
    server = await serve_nbd(client, unix_path=args.socket, port=args.port)
    log.info("nbd export ready", link=args.link, socket=args.socket, port=args.port,
             bytes=client.size, read_only=client.read_only)
    try:
        await stop.wait()
    finally:
        server.close()
        await server.wait_closed()
        await client.close()
        client.dev.close()
    return 0
