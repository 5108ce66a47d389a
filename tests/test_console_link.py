"""virtio-console end to end in one process: hub thread, ConsoleRunner, ConsoleDriver.

A memory host port stands in for the pty/socket, so the tests can hold its output back (a host
side nobody reads) and count what reached it. Hostile drivers are driven through raw rings.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

from ivshmem_virtio.backend.devices.console import TX_CHAIN_MAX, ConsoleModel
from ivshmem_virtio.backend.devices.console_service import ConsoleRunner, ConsoleService
from ivshmem_virtio.frontend.console import ConsoleDriver
from ivshmem_virtio.ivshmem.hub import Geometry, HubThread
from ivshmem_virtio.ivshmem.sim import SimIvshmem
from ivshmem_virtio.spec import console as wire
from ivshmem_virtio.spec import ivshmem as H
from ivshmem_virtio.spec import virtio as V
from tests.conftest import run

RW = 0x40000


class MemoryPort:
    """A host side in memory: ``accept`` bytes at most per write (None: unlimited)."""

    def __init__(self) -> None:
        self.out = bytearray()
        self.accept: int | None = None
        self.paused = False
        self.console: ConsoleService | None = None

    def start(self, console: ConsoleService) -> None:
        self.console = console

    def write(self, data: memoryview) -> int:
        n = len(data) if self.accept is None else min(self.accept, len(data))
        if self.accept is not None:
            self.accept -= n
        self.out += data[:n]
        return n

    def drain(self) -> None:
        self.accept = None
        assert self.console is not None
        self.console.host_writable()

    def type(self, data: bytes) -> int:
        assert self.console is not None
        return self.console.host_input(data)

    def pause_input(self) -> None:
        self.paused = True

    def resume_input(self) -> None:
        self.paused = False

    def close(self) -> None:
        pass

    def describe(self) -> str:
        return "memory"


@dataclass
class Stack:
    port: MemoryPort
    service: ConsoleService
    runner: ConsoleRunner
    drv: ConsoleDriver


@contextlib.asynccontextmanager
async def stack(tmp: Path, *, model: ConsoleModel | None = None, vectors: int = 2,
                **drv_kw: object) -> AsyncIterator[Stack]:
    sock = str(tmp / "c.sock")
    geo = Geometry(vectors=vectors, rw_size=RW,
                   protocols=(wire.IVSHMEM_PROTOCOL_CONSOLE_BACKEND,
                              wire.IVSHMEM_PROTOCOL_CONSOLE_FRONTEND))
    with HubThread(sock, geo):
        bdev = SimIvshmem(sock, 0)
        port = MemoryPort()
        service = ConsoleService(port, model or ConsoleModel())
        runner = ConsoleRunner(bdev, service, mode="block", workers=1)
        service.start()
        task = asyncio.create_task(runner.run())
        fdev = SimIvshmem(sock, 1)
        drv = ConsoleDriver(fdev, timeout=5.0, **drv_kw)  # type: ignore[arg-type]
        try:
            await drv.start(timeout=5.0)
            yield Stack(port, service, runner, drv)
        finally:
            await drv.close()
            fdev.close()
            runner.stop()
            await task
            service.close()
            bdev.close()


async def until(cond, timeout: float = 5.0) -> None:  # noqa: ANN001
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not cond():
        assert loop.time() < end, "condition not reached"
        await asyncio.sleep(0.002)


def test_output_input_and_resize(tmp_path: Path) -> None:
    async def main() -> None:
        async with stack(tmp_path) as s:
            assert s.drv.size == (80, 25)
            assert s.drv.has(wire.F_SIZE) and s.drv.has(wire.F_EMERG_WRITE)
            await s.drv.write(b"login: ")
            assert bytes(s.port.out) == b"login: "
            assert s.port.type(b"root\r") == 5
            got = await asyncio.wait_for(s.drv.read(), 5)
            assert got == b"root\r"
            s.service.host_resized(132, 43)
            await asyncio.wait_for(s.drv.resized.wait(), 5)
            assert s.drv.size == (132, 43)
            assert await s.drv.emergency_write(ord("!"))
            await until(lambda: bytes(s.port.out).endswith(b"!"))
            assert s.service.model.metrics.emerg_bytes == 1
            # 1 MiB of output arrives whole and in order
            blob = bytes(range(256)) * 4096
            await s.drv.write(blob)
            assert bytes(s.port.out) == b"login: !" + blob
            assert not s.runner.transport.needs_reset

    run(main())


def test_host_not_reading_holds_the_cell_back_and_loses_nothing(tmp_path: Path) -> None:
    async def main() -> None:
        model = ConsoleModel(out_limit=8192)
        async with stack(tmp_path, model=model) as s:
            s.port.accept = 0  # nobody reads
            blob = bytes(i & 0xFF for i in range(200_000))
            writer = asyncio.create_task(s.drv.write(blob))
            await asyncio.sleep(0.3)
            assert not writer.done()  # held back by the ring
            # bounded: the buffer never grows past the limit plus one chain
            assert model.output_len <= 8192 + 4096
            assert model.metrics.tx_throttled >= 1
            assert s.runner.is_passive(wire.TRANSMITQ)
            # the daemon's loop is not blocked: input still flows meanwhile
            s.port.type(b"x")
            assert await asyncio.wait_for(s.drv.read(), 5) == b"x"
            s.port.drain()
            await asyncio.wait_for(writer, 10)
            assert bytes(s.port.out) == blob
            assert not s.runner.is_passive(wire.TRANSMITQ)

    run(main())


def test_cell_not_reading_pauses_host_input(tmp_path: Path) -> None:
    async def main() -> None:
        got = bytearray()
        async with stack(tmp_path, rx_buffers=2, rx_size=16,
                         model=ConsoleModel(in_limit=64)) as s:
            s.drv.on_input = None
            s.drv.on_input = lambda data: None  # the first 32 bytes are consumed unseen
            await asyncio.sleep(0)
            # 2 buffers of 16 take 32 bytes, 64 more wait in the model, then the port pauses
            assert s.port.type(bytes(range(200))) == 64
            assert not s.port.paused  # 32 went into the buffers: room again
            assert s.port.type(bytes(range(64, 200))) == 32
            assert s.port.paused and s.service.model.input_len == 64
            assert not s.runner.is_passive(wire.RECEIVEQ)  # a posted buffer is work now
            assert s.port.type(b"more") == 0
            # the cell starts reading: everything kept arrives in order, the port resumes
            s.drv.on_input = got.extend
            await until(lambda: len(got) >= 64)
            await until(lambda: not s.port.paused)
            await until(lambda: s.service.model.input_len == 0)
            assert s.runner.is_passive(wire.RECEIVEQ)

    run(main())


async def _raw_tx(s: Stack, readable: list[tuple[int, int]],
                  writable: list[tuple[int, int]] | None = None) -> None:
    vq = s.drv.vqs[wire.TRANSMITQ]
    vq.add(readable, writable or [], object())
    s.drv.transport.kick(wire.TRANSMITQ)
    await until(lambda: s.runner.transport.needs_reset)


def test_hostile_tx_descriptor_outside_the_section(tmp_path: Path) -> None:
    async def main() -> None:
        async with stack(tmp_path, reconnect=False) as s:
            await _raw_tx(s, [(RW - 4, 64)])
            assert s.port.out == b""  # nothing taken from a broken chain

    run(main())


def test_hostile_tx_chain_too_long(tmp_path: Path) -> None:
    async def main() -> None:
        async with stack(tmp_path, reconnect=False) as s:
            # the same 64 KiB five times: more than the device takes in one buffer
            addr = 0x10000
            await _raw_tx(s, [(addr, 0x10000)] * (TX_CHAIN_MAX // 0x10000 + 1))
            assert s.port.out == b""

    run(main())


def test_hostile_rx_buffer_handed_back_and_recovery(tmp_path: Path) -> None:
    async def main() -> None:
        async with stack(tmp_path) as s:
            # a receive buffer that is device-readable: handed back unused, counted
            vq = s.drv.vqs[wire.RECEIVEQ]
            token = object()
            vq.add([(0x10000, 16)], [], token)
            s.port.type(b"abc")
            assert await asyncio.wait_for(s.drv.read(), 5) in (b"abc", b"a", b"ab")
            assert not s.runner.transport.needs_reset
            # a broken transmitq chain resets only this device; the driver brings it up again
            # and the console works after that
            before = s.drv.bring_ups
            s.drv.vqs[wire.TRANSMITQ].add([(RW + 0x1000, 8)], [], object())
            s.drv.transport.kick(wire.TRANSMITQ)
            await until(lambda: s.drv.bring_ups > before)
            await s.drv.write(b"back")
            await until(lambda: bytes(s.port.out).endswith(b"back"))

    run(main())


def test_only_emerg_wr_is_writable(tmp_path: Path) -> None:
    """The config-write hook takes emerg_wr; a write to cols is refused, the config shows the
    device's values again, and both transactions are answered (the driver does not hang)."""
    async def main() -> None:
        async with stack(tmp_path) as s:
            t = s.runner.transport
            before = t.metrics["transactions"]
            await s.drv.transport.write(H.HDR_CONFIG + wire.OFF_COLS, 2, 7)
            assert s.drv.transport.read_config(0, wire.CONFIG_SIZE) == s.service.config()
            assert s.port.out == b""
            await s.drv.transport.write(H.HDR_CONFIG + wire.OFF_EMERG_WR, 4, ord("E"))
            await until(lambda: bytes(s.port.out) == b"E")
            assert s.drv.transport.read_config(0, wire.CONFIG_SIZE) == s.service.config()
            assert t.metrics["transactions"] == before + 2
            assert not t.needs_reset

    run(main())


def test_features_and_queue_count() -> None:
    m = ConsoleModel()
    svc = ConsoleService(MemoryPort(), m)
    assert svc.num_queues == 2
    assert svc.features & wire.F_SIZE and svc.features & wire.F_EMERG_WRITE
    assert not svc.features & wire.F_MULTIPORT
    assert svc.features & V.bit(V.F_EVENT_IDX)
    assert len(svc.config()) == wire.CONFIG_SIZE
