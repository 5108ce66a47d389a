"""A hostile frontend writes raw ring bytes at a backend process.

The backend must answer with an error status or mark the device NEEDS_RESET, must never crash,
and must never touch memory outside the R/W section: a canary in the frontend's output section
(right after the R/W section) stays intact. A fresh bring-up works afterwards.
"""

from __future__ import annotations

import asyncio
import struct

import pytest

from ivshmem_virtio.frontend.blk import BlkClient
from ivshmem_virtio.ivshmem.sim import SimIvshmem
from ivshmem_virtio.spec import blk as B
from ivshmem_virtio.spec import ivshmem as H
from ivshmem_virtio.spec import ring as R
from ivshmem_virtio.spec import virtio as V
from ivshmem_virtio.transport.driver import DriverTransport

from .conftest import run

RW = 0x10000
CANARY = bytes(range(256)) * 16
F_NEXT, F_WRITE = R.DESC_F_NEXT, R.DESC_F_WRITE


class RawFrontend:
    """Bring-up through the real transport, then descriptors written by hand."""

    def __init__(self, sock: str) -> None:
        self.dev = SimIvshmem(sock, 1)
        self.t = DriverTransport(self.dev, timeout=10.0)
        self.mem = self.dev.rw

    async def up(self, features: int = 0) -> None:
        await self.t.probe(10.0)
        await self.t.negotiate(features)
        self.vq = await self.t.setup_queue(0, 1, 8)
        await self.t.driver_ok()
        self.mem = self.dev.rw
        self.buf = self.t.allocator.alloc(4096)  # type: ignore[union-attr]

    def desc(self, i: int, addr: int, length: int, flags: int, nxt: int = 0) -> None:
        self.mem.pack(R.DESC, self.vq.desc + 16 * i, addr, length, flags, nxt)

    def publish(self, heads: list[int], idx: int | None = None) -> None:
        for k, h in enumerate(heads):
            self.mem.set_u16(self.vq.avail + 4 + 2 * k, h)
        self.mem.set_u16(self.vq.avail + 2, len(heads) if idx is None else idx)
        self.t.kick(0)

    async def wait(self, cond, timeout: float = 10.0) -> None:  # noqa: ANN001
        for _ in range(int(timeout / 0.01)):
            if cond():
                return
            await asyncio.sleep(0.01)
        raise AssertionError("backend did not react")

    def used(self) -> list[tuple[int, int]]:
        n = self.mem.u16(self.vq.used + 2)
        return [self.mem.unpack(R.USED_ELEM, self.vq.used + 4 + 8 * i) for i in range(n)]

    def needs_reset(self) -> bool:
        return bool(self.t.status() & V.STATUS_NEEDS_RESET)

    def close(self) -> None:
        self.t.leave()
        self.dev.close()


def request(fe: RawFrontend, rtype: int = B.T_IN, sector: int = 0) -> tuple[int, int, int]:
    hdr, data, status = fe.buf, fe.buf + 64, fe.buf + 4095
    fe.mem.pack(B.OUTHDR, hdr, rtype, 0, sector)
    fe.mem.set_u8(status, 0xEE)
    return hdr, data, status


# each case: (name, setup(fe) -> expectation) ; expectation "ioerr" or "reset"
def bad_data_addr(fe):
    hdr, _d, st = request(fe)
    fe.desc(0, hdr, 16, F_NEXT, 1)
    fe.desc(1, RW, 512, F_WRITE | F_NEXT, 2)  # the first byte past the R/W section
    fe.desc(2, st, 1, F_WRITE)
    fe.publish([0])
    return "ioerr", st


def huge_addr(fe):
    hdr, _d, st = request(fe, B.T_OUT)
    fe.desc(0, hdr, 16, F_NEXT, 1)
    fe.desc(1, 2**64 - 512, 512, F_NEXT, 2)
    fe.desc(2, st, 1, F_WRITE)
    fe.publish([0])
    return "ioerr", st


def short_header(fe):
    hdr, _d, st = request(fe)
    fe.desc(0, hdr, 8, F_NEXT, 1)
    fe.desc(1, st, 1, F_WRITE)
    fe.publish([0])
    return "ioerr", st


def readonly_status(fe):
    hdr, d, st = request(fe)
    fe.desc(0, hdr, 16, F_NEXT, 1)
    fe.desc(1, st, 1, 0)  # status not writable: nothing can answer this
    fe.publish([0])
    return "reset", st


def status_outside(fe):
    hdr, d, _st = request(fe)
    fe.desc(0, hdr, 16, F_NEXT, 1)
    fe.desc(1, RW, 1, F_WRITE)
    fe.publish([0])
    return "reset", None


def looping_chain(fe):
    hdr, d, st = request(fe)
    fe.desc(0, hdr, 16, F_NEXT, 1)
    fe.desc(1, d, 512, F_WRITE | F_NEXT, 0)
    fe.publish([0])
    return "reset", None


def chain_longer_than_queue(fe):
    hdr, d, st = request(fe)
    for i in range(8):
        fe.desc(i, d, 16, F_WRITE | F_NEXT, i + 1 if i < 7 else 7)
    fe.publish([0])
    return "reset", None


def avail_jump(fe):
    hdr, d, st = request(fe)
    fe.desc(0, hdr, 16, F_NEXT, 1)
    fe.desc(1, st, 1, F_WRITE)
    fe.publish([0], idx=500)
    return "reset", None


def head_out_of_range(fe):
    fe.publish([9])
    return "reset", None


def write_past_capacity(fe):
    hdr, d, st = request(fe, B.T_OUT, sector=(1 << 20) // 512)
    fe.desc(0, hdr, 16, F_NEXT, 1)
    fe.desc(1, d, 512, F_NEXT, 2)
    fe.desc(2, st, 1, F_WRITE)
    fe.publish([0])
    return "ioerr", st


CASES = [bad_data_addr, huge_addr, short_header, readonly_status, status_outside,
         looping_chain, chain_longer_than_queue, avail_jump, head_out_of_range,
         write_past_capacity]


@pytest.mark.parametrize("case", CASES, ids=[c.__name__ for c in CASES])
def test_hostile_frontend(procs, tmp_path, image_factory, case):
    sock = str(tmp_path / "h.sock")
    image = image_factory(1 << 20, data=b"\x5a" * 4096)
    procs.hub(sock, "--rw-size", hex(RW), "--output-size", "0x1000")
    backend = procs.blk(sock, image)

    async def body():
        fe = RawFrontend(sock)
        try:
            fe.dev.outputs[1].write(0, CANARY)  # our own output section, right after R/W
            await fe.up()
            expect, st = case(fe)
            if expect == "ioerr":
                await fe.wait(lambda: fe.used())
                assert fe.used() == [(0, 1)]
                assert fe.mem.u8(st) == B.S_IOERR
                assert not fe.needs_reset()
            else:
                await fe.wait(fe.needs_reset)
                assert fe.mem.u8(H.HDR_CONFIG_EVENT) == 1
                # the flag sticks on later status writes until a reset (§8.2)
                await fe.t.set_status(V.STATUS_LIVE)
                assert fe.needs_reset()
        finally:
            fe.close()
        assert fe.dev.outputs[1].read(0, len(CANARY)) == CANARY
        # a fresh bring-up on the same backend works
        client = BlkClient(SimIvshmem(sock, 1), timeout=10.0)
        await client.start(timeout=10.0)
        try:
            assert await client.read(0, 512) == b"\x5a" * 512
            await client.write(512, b"ok" * 256)
            assert await client.read(512, 512) == b"ok" * 256
        finally:
            await client.close()
            client.dev.close()

    run(body())
    assert backend.proc.poll() is None, backend.log()
    assert "Traceback" not in backend.log()


def test_garbage_transactions_and_queue_fields(procs, tmp_path, image_factory):
    """Unknown offsets, absurd queue sizes and features: ignored or refused, never a crash."""
    sock = str(tmp_path / "g.sock")
    image = image_factory(1 << 20)
    procs.hub(sock)
    backend = procs.blk(sock, image)

    async def body():
        fe = RawFrontend(sock)
        try:
            await fe.t.probe(10.0)
            for off in (0x03, 0x42, 0x4D, 0x2000, 0xFFFFFFFC):
                fe.mem.set_u32(H.HDR_WRITE_TRANSACTION, off)
                fe.t.dev.doorbell(0, 0)
                await fe.wait(lambda: fe.mem.u32(H.HDR_WRITE_TRANSACTION) == 0)
            # driver features the device never offered: FEATURES_OK is refused
            await fe.t.set_status(0)
            await fe.t.write(H.HDR_DRIVER_FEATURES_SEL, 4, 0)
            await fe.t.write(H.HDR_DRIVER_FEATURES, 4, 0xFFFFFFFF)
            await fe.t.set_status(V.STATUS_ACKNOWLEDGE | V.STATUS_DRIVER | V.STATUS_FEATURES_OK)
            assert not fe.t.status() & V.STATUS_FEATURES_OK
            # queue size 3 (not a power of two) and 4096 (more than offered)
            for size in (3, 4096, 0):
                await fe.t.set_status(0)
                await fe.t.negotiate(0)
                await fe.t.write(H.HDR_QUEUE_SEL, 4, 0)
                await fe.t.write(H.HDR_QUEUE_SIZE, 2, size)
                await fe.t.write(H.HDR_QUEUE_DESC, 8, 0x1000)
                await fe.t.write(H.HDR_QUEUE_DRIVER, 8, 0x2000)
                await fe.t.write(H.HDR_QUEUE_DEVICE, 8, 0x3000)
                await fe.t.write(H.HDR_QUEUE_ENABLE, 2, 1)
                assert fe.mem.u16(H.HDR_QUEUE_ENABLE) == 0
                assert fe.needs_reset()
            # a queue that does not exist
            await fe.t.set_status(0)
            await fe.t.write(H.HDR_QUEUE_SEL, 4, 7)
            assert fe.mem.u16(H.HDR_QUEUE_SIZE) == 0
            await fe.t.write(H.HDR_QUEUE_ENABLE, 2, 1)
            assert fe.mem.u16(H.HDR_QUEUE_ENABLE) == 0
        finally:
            fe.close()

    run(body())
    assert backend.proc.poll() is None
    assert "Traceback" not in backend.log()


def test_backend_never_writes_the_state_table_or_outputs_of_others(procs, tmp_path,
                                                                   image_factory):
    sock = str(tmp_path / "s.sock")
    image = image_factory(1 << 20)
    procs.hub(sock, "--output-size", "0x1000")
    procs.blk(sock, image)

    async def body():
        dev = SimIvshmem(sock, 1)
        dev.outputs[1].write(0, CANARY)
        c = BlkClient(dev, timeout=10.0)
        await c.start(10.0)
        await c.write(0, bytes(range(256)) * 2)
        await c.close()
        assert dev.outputs[1].read(0, len(CANARY)) == CANARY
        assert struct.unpack("<II", dev.state_table.read(0, 8)) == (1, 0)
        dev.close()

    run(body())
