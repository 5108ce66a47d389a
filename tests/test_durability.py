"""FLUSH durability that a test can disprove.

A backend killed with SIGKILL leaves its writes in the page cache, so "the data survived a
kill" holds even without ``fdatasync``. What is checked instead:

* in one process, with ``os.fdatasync`` held at a gate: the FLUSH is not completed while the
  sync has not returned, is completed after, and the sync was on the image's fd;
* the real backend process under ``strace``: the data reaches the image, then fdatasync(image)
  returns, and only then does the completion doorbell go out;
* the backend SIGKILLed at random points of a write/flush workload 50 times and restarted:
  every write acknowledged before a completed FLUSH was submitted is in the image, intact, after
  every kill, and at the end the disk holds exactly the last acknowledged version of each block.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import random
import re
import shutil
import struct
import threading

import pytest

from ivshmem_virtio.backend.devices.blk_service import BlkService
from ivshmem_virtio.backend.resources.image import BlockImage
from ivshmem_virtio.frontend.blk import BlkClient
from ivshmem_virtio.ivshmem.sim import SimIvshmem
from ivshmem_virtio.procs import Child

from .blk_helpers import blk_stack
from .conftest import run

BLOCK = 4096


class SyncGate:
    """Stands in for ``os.fdatasync``: records the fd, holds the caller until released."""

    def __init__(self) -> None:
        self.real = os.fdatasync
        self.fds: list[int] = []
        self.entered = threading.Event()
        self.release = threading.Event()
        self.returned = threading.Event()

    def __call__(self, fd: int) -> None:
        self.fds.append(fd)
        self.entered.set()
        self.release.wait(20)
        self.real(fd)
        self.returned.set()


async def _first(flush: asyncio.Future, gate: SyncGate, limit: float = 10.0) -> None:
    """Wait until the FLUSH completed or the sync began, whichever is first."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + limit
    while not flush.done() and not gate.entered.is_set() and loop.time() < deadline:
        await asyncio.sleep(0.002)


def test_flush_completes_only_after_fdatasync_returned(tmp_path, image_factory, monkeypatch):
    image = image_factory(1 << 20)
    gate = SyncGate()
    monkeypatch.setattr(os, "fdatasync", gate)
    service = BlkService(BlockImage(image))
    data = os.urandom(64 << 10)

    async def body() -> None:
        async with blk_stack(str(tmp_path / "g.sock"), image, service=service) as s:
            try:
                await s.client.write(0, data)
                flush = asyncio.ensure_future(s.client.flush())
                await _first(flush, gate)
                assert gate.entered.is_set(), ("FLUSH completed without fdatasync"
                                               if flush.done() else "FLUSH neither synced nor "
                                               "completed")
                # the loop keeps running (other requests are served meanwhile): a FLUSH that
                # does not wait for the sync would complete here
                assert (await s.client.read(0, 4096)) == data[:4096]
                for _ in range(20):
                    await asyncio.sleep(0.005)
                assert not flush.done(), "FLUSH completed while fdatasync had not returned"
                assert not gate.returned.is_set()
                gate.release.set()
                await asyncio.wait_for(flush, 10)
                assert gate.returned.is_set()
                assert gate.fds and set(gate.fds) == {service.image.fd}
            finally:
                gate.release.set()  # the stack's close syncs too: never hold it

    try:
        run(body(), timeout=60)
    finally:
        gate.release.set()


# -- the real backend process, traced --------------------------------------------------------------
_CALL = re.compile(r"^(\d+)\s+(?:\d+:\d+:\d+\.\d+\s+)?(\w+)\((\d+)<([^>]*)>")
_RESUMED = re.compile(r"^(\d+)\s+(?:\d+:\d+:\d+\.\d+\s+)?<\.\.\. (\w+) resumed>.*=\s*(-?\d+)")
_DONE = re.compile(r"=\s*(-?\d+)")


Event = tuple[str, str, str, int | None, int]


def parse_trace(text: str) -> list[Event]:
    """``strace -f -y`` lines as (event, syscall, fd path, result, thread id): event is 'call'
    for a complete line or the start of an unfinished one, 'return' for its completion."""
    out: list[Event] = []
    pending: dict[str, tuple[str, str]] = {}  # pid -> (syscall, path) of an unfinished call
    for line in text.splitlines():
        m = _CALL.match(line)
        if m:
            pid, name, _fd, path = m.groups()
            if "<unfinished ...>" in line:
                pending[pid] = (name, path)
                out.append(("call", name, path, None, int(pid)))
            else:
                r = _DONE.search(line.rsplit(")", 1)[-1])
                result = int(r.group(1)) if r else None
                out.append(("call", name, path, result, int(pid)))
                out.append(("return", name, path, result, int(pid)))
            continue
        m = _RESUMED.match(line)
        if m:
            pid, name, result = m.groups()
            _, path = pending.pop(pid, (name, ""))
            out.append(("return", name, path, int(result), int(pid)))
    return out


@pytest.mark.skipif(shutil.which("strace") is None, reason="strace not installed")
def test_backend_process_syncs_the_image_before_completing_flush(procs, tmp_path,
                                                                  image_factory):
    sock = str(tmp_path / "blk.sock")
    image = image_factory(1 << 20)
    procs.hub(sock)
    backend = procs.blk(sock, image, "--mode", "block")
    trace = tmp_path / "backend.strace"
    calls = "trace=fdatasync,fsync,pwrite64,pwritev,pwritev2,write"
    tracer = Child("strace", ["strace", "-f", "-y", "-e", calls, "-o", str(trace),
                              "-p", str(backend.pid)], tmp_path)
    procs.children.append(tracer)  # ended by pid at teardown (it detaches; the backend lives)
    tracer.wait_for("attached", 15)

    async def body() -> None:
        c = BlkClient(SimIvshmem(sock, 1), timeout=10.0, mode="block")
        await c.start(timeout=10.0)
        try:
            await c.write(8192, os.urandom(64 << 10))
            await c.flush()
        finally:
            await c.close()
            c.dev.close()

    run(body(), timeout=60)
    tracer.stop()  # detach: the trace file is complete
    events = parse_trace(trace.read_text())
    on_image = [i for i, e in enumerate(events) if e[2] == image]
    writes = [i for i in on_image if events[i][1] in ("pwrite64", "pwritev", "pwritev2")]
    sync_calls = [i for i in on_image if events[i][:2] == ("call", "fdatasync")]
    sync_returns = [i for i in on_image if events[i][:2] == ("return", "fdatasync")
                    and events[i][3] == 0]
    assert writes, f"no write to {image} traced:\n{trace.read_text()[-3000:]}"
    assert sync_calls and sync_returns, "the FLUSH did not fdatasync the image"
    assert writes[0] < sync_calls[0]
    # the frontend's doorbell: an eventfd the event loop's thread (tid = pid) writes (the worker
    # thread's eventfd write after the sync is the loop's own wake-up)
    doorbells = [i for i, e in enumerate(events) if e[0] == "call" and e[1] == "write"
                 and "eventfd" in e[2] and e[4] == backend.pid]
    after_call = [i for i in doorbells if i > sync_calls[0]]
    assert after_call, "no completion doorbell after the FLUSH"
    assert after_call[0] > sync_returns[0], "a doorbell went out while fdatasync was running"


# -- SIGKILL at random points ----------------------------------------------------------------------
BLOCKS = 32
WRITERS = 4
ROUNDS = 50


def payload(block: int, version: int) -> bytes:
    """4 KiB that name their block and version, so a torn or misplaced block is seen."""
    head = struct.pack("<II", block, version)
    return head + hashlib.blake2b(head, digest_size=64).digest() * 63 + bytes(56)


def version_in(block: int, data: bytes) -> int:
    """The version a block holds (0: never written); AssertionError unless intact."""
    if data == bytes(BLOCK):
        return 0
    b, v = struct.unpack_from("<II", data)
    assert b == block and data == payload(b, v), f"block {block} is torn or misplaced"
    return v


def test_acknowledged_and_flushed_writes_survive_50_random_kills(procs, tmp_path,
                                                                 image_factory):
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    sock = str(tmp_path / "blk.sock")
    image = image_factory(BLOCKS * BLOCK)
    procs.hub(sock)
    acked = [0] * BLOCKS  # last version acknowledged per block
    issued = [0] * BLOCKS  # last version submitted (one write in flight per block)
    durable = [0] * BLOCKS  # acknowledged before the submission of a completed FLUSH
    flushes = [0]
    stop = asyncio.Event()

    def check_image() -> None:
        with open(image, "rb") as f:
            disk = f.read()
        for b in range(BLOCKS):
            v = version_in(b, disk[b * BLOCK:(b + 1) * BLOCK])
            assert durable[b] <= v <= issued[b], (
                f"seed {seed}: block {b} holds version {v}, flushed {durable[b]}, "
                f"last issued {issued[b]}")

    async def writer(c: BlkClient, mine: list[int]) -> None:
        wrng = random.Random(rng.random())
        while not stop.is_set():
            b = wrng.choice(mine)
            v = issued[b] = issued[b] + 1
            await c.write(b * BLOCK, payload(b, v))
            acked[b] = v

    async def flusher(c: BlkClient) -> None:
        while not stop.is_set():
            before = list(acked)
            await c.flush()
            for b in range(BLOCKS):
                durable[b] = max(durable[b], before[b])
            flushes[0] += 1
            await asyncio.sleep(0.001)

    async def body() -> None:
        backend = await asyncio.to_thread(procs.blk, sock, image, name="blk-0")
        c = BlkClient(SimIvshmem(sock, 1), timeout=10.0)
        await c.start(timeout=10.0)
        tasks = [asyncio.ensure_future(writer(c, list(range(w, BLOCKS, WRITERS))))
                 for w in range(WRITERS)] + [asyncio.ensure_future(flusher(c))]
        try:
            for n in range(ROUNDS):
                goal = flushes[0] + 1  # the workload runs against this incarnation
                while flushes[0] < goal:
                    assert not any(t.done() for t in tasks), [t.exception() for t in tasks]
                    await asyncio.sleep(0.001)
                await asyncio.sleep(rng.uniform(0, 0.015))
                await asyncio.to_thread(backend.kill)
                check_image()
                backend = await asyncio.to_thread(procs.blk, sock, image, name=f"blk-{n + 1}")
            stop.set()
            await asyncio.wait_for(asyncio.gather(*tasks), 20)
            await c.flush()
            for b in range(BLOCKS):  # everything was acknowledged in the end: all of it there
                assert version_in(b, await c.read(b * BLOCK, BLOCK)) == acked[b], (seed, b)
            durable[:] = acked
            check_image()
            assert sum(acked) > ROUNDS
        finally:
            stop.set()
            for t in tasks:
                t.cancel()
            c.reconnect = False
            await c.close()
            c.dev.close()

    run(body(), timeout=100)
