"""Tests of the NBD export (frontend/nbd.py).

Two layers: a small hand-written NBD client that checks the wire protocol byte by byte (handshake,
commands, error replies, bad magic), and interop with the real Debian clients `nbdinfo`,
`nbdcopy` (libnbd-bin) and `qemu-img` (qemu-utils) that copy an image in and out of the export.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import json
import os
import random
import shutil
import stat
import struct
import subprocess
import threading
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
import uvloop

from ivshmem_virtio.frontend import nbd
from ivshmem_virtio.frontend.nbd import MAX_PAYLOAD, NbdServer, serve_nbd
from ivshmem_virtio.procs import cli

MiB = 1024 * 1024
TIMEOUT = 20.0  # seconds for any single await on the socket in protocol tests
CLIENT_TIMEOUT = 120  # seconds for a client process


# --- a BlockTarget for the tests ----------------------------------------------------------------


class MemTarget:
    """bytearray-backed BlockTarget that records what the server asked of it."""

    def __init__(
        self, size: int, *, read_only: bool = False, fill: int = 0, jitter: float = 0.0
    ) -> None:
        self.size = size
        self.jitter = jitter  # random completion delay, so replies really go out of order
        self.read_only = read_only
        self.buf = bytearray([fill]) * size
        self.flushes = 0
        self.writes: list[tuple[int, int]] = []
        self.discards: list[tuple[int, int]] = []
        self.zeroes: list[tuple[int, int, bool]] = []
        self.fail: dict[int, BaseException] = {}  # offset -> exception raised for it
        self.delay: dict[int, float] = {}  # offset -> seconds before completing
        self.gate: asyncio.Event | None = None  # when set, every data op waits for it
        self.active = 0
        self.peak = 0

    async def _op(self, offset: int) -> None:
        self.active += 1
        self.peak = max(self.peak, self.active)
        try:
            if self.gate is not None:
                await self.gate.wait()
            if self.jitter:
                await asyncio.sleep(random.uniform(0, self.jitter))
            if offset in self.delay:
                await asyncio.sleep(self.delay[offset])
            if offset in self.fail:
                raise self.fail[offset]
        finally:
            self.active -= 1

    def _check(self, offset: int, length: int) -> None:
        # The server must never pass an out-of-range request on.
        assert 0 <= offset and offset + length <= self.size, (offset, length)

    async def read(self, offset: int, length: int) -> bytes:
        self._check(offset, length)
        await self._op(offset)
        return bytes(self.buf[offset : offset + length])

    async def write(self, offset: int, data: bytes | memoryview) -> None:
        self._check(offset, len(data))
        assert not self.read_only
        await self._op(offset)
        self.buf[offset : offset + len(data)] = data
        self.writes.append((offset, len(data)))

    async def flush(self) -> None:
        await self._op(-1)
        self.flushes += 1

    async def discard(self, offset: int, length: int) -> None:
        self._check(offset, length)
        assert not self.read_only and length <= MAX_PAYLOAD
        await self._op(offset)
        self.discards.append((offset, length))

    async def write_zeroes(self, offset: int, length: int, may_unmap: bool) -> None:
        self._check(offset, length)
        assert not self.read_only and length <= MAX_PAYLOAD
        await self._op(offset)
        self.buf[offset : offset + length] = bytes(length)
        self.zeroes.append((offset, length, may_unmap))


# --- a minimal NBD client -----------------------------------------------------------------------


class RawClient:
    """Just enough of an NBD client to drive the server message by message."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.pending: dict[int, int] = {}  # handle -> bytes of data a successful reply carries
        self.chunks: list[tuple[int, bytes]] = []  # structured chunks seen: (type, payload)
        self._next_handle = 1

    @classmethod
    async def unix(cls, path: Path) -> RawClient:
        reader, writer = await asyncio.open_unix_connection(str(path))
        return cls(reader, writer)

    async def read(self, n: int) -> bytes:
        return await asyncio.wait_for(self.reader.readexactly(n), TIMEOUT)

    async def at_eof(self) -> bool:
        """True when the server closed the connection (after any data still buffered)."""
        data = await asyncio.wait_for(self.reader.read(65536), TIMEOUT)
        return data == b""

    async def greet(
        self, client_flags: int = nbd.FLAG_C_FIXED_NEWSTYLE | nbd.FLAG_C_NO_ZEROES
    ) -> int:
        magic, ihaveopt, hflags = struct.unpack(">QQH", await self.read(18))
        assert magic == nbd.NBDMAGIC and ihaveopt == nbd.IHAVEOPT
        self.writer.write(struct.pack(">I", client_flags))
        return hflags

    def send_option(self, option: int, data: bytes = b"", magic: int = nbd.IHAVEOPT) -> None:
        self.writer.write(struct.pack(">QII", magic, option, len(data)) + data)

    async def option(self, option: int, data: bytes = b"") -> list[tuple[int, bytes]]:
        """Send an option; return its replies up to the final one (ACK or an error)."""
        self.send_option(option, data)
        replies = []
        while True:
            magic, opt, rtype, length = struct.unpack(">QIII", await self.read(20))
            assert magic == nbd.OPT_REPLY_MAGIC and opt == option
            replies.append((rtype, await self.read(length)))
            if rtype not in (nbd.REP_SERVER, nbd.REP_INFO, nbd.REP_META_CONTEXT):
                return replies

    async def go(self, name: bytes = b"", info: tuple[int, ...] = ()) -> tuple[int, int]:
        """NBD_OPT_GO; returns (size, transmission flags)."""
        data = (
            struct.pack(">I", len(name)) + name + struct.pack(f">H{len(info)}H", len(info), *info)
        )
        replies = await self.option(nbd.OPT_GO, data)
        assert replies[-1] == (nbd.REP_ACK, b"")
        export = [d for t, d in replies if t == nbd.REP_INFO and d[:2] == b"\0\0"]
        _, size, flags = struct.unpack(">HQH", export[0])
        return size, flags

    def send(
        self,
        cmd: int,
        offset: int = 0,
        length: int = 0,
        *,
        flags: int = 0,
        data: bytes = b"",
        magic: int = nbd.REQUEST_MAGIC,
    ) -> int:
        handle = self._next_handle
        self._next_handle += 1
        if cmd == nbd.CMD_WRITE and not data:
            data = bytes(length)
        self.writer.write(struct.pack(">IHHQQI", magic, flags, cmd, handle, offset, length) + data)
        self.pending[handle] = length if cmd == nbd.CMD_READ else 0
        return handle

    async def reply(self) -> tuple[int, int, bytes]:
        """Next reply, simple or one final structured chunk: (handle, error, data)."""
        (magic,) = struct.unpack(">I", await self.read(4))
        if magic == nbd.STRUCTURED_REPLY_MAGIC:
            flags, rtype, handle, length = struct.unpack(">HHQI", await self.read(16))
            assert flags == nbd.REPLY_FLAG_DONE  # our server always answers in one chunk
            payload = await self.read(length)
            self.pending.pop(handle)
            self.chunks.append((rtype, payload))
            if rtype == nbd.REPLY_TYPE_ERROR:
                error, mlen = struct.unpack_from(">IH", payload)
                assert mlen == len(payload) - 6 and error
                return handle, error, b""
            if rtype == nbd.REPLY_TYPE_OFFSET_DATA:
                return handle, 0, payload[8:]
            return handle, 0, payload
        assert magic == nbd.SIMPLE_REPLY_MAGIC
        error, handle = struct.unpack(">IQ", await self.read(12))
        n = self.pending.pop(handle)
        return handle, error, (await self.read(n) if n and not error else b"")

    async def request(
        self, cmd: int, offset: int = 0, length: int = 0, **kw: object
    ) -> tuple[int, bytes]:
        handle = self.send(cmd, offset, length, **kw)  # type: ignore[arg-type]
        got, error, data = await self.reply()
        assert got == handle
        return error, data

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(Exception):
            await self.writer.wait_closed()


def run_with_server(
    target: MemTarget, sock: Path, body: Callable[[NbdServer], Awaitable[None]]
) -> None:
    """Run body against a server on sock in a fresh loop; check the socket file is gone after."""

    async def main() -> None:
        server = await serve_nbd(target, unix_path=str(sock))
        assert isinstance(server, NbdServer)
        try:
            await body(server)
        finally:
            server.close()
            await asyncio.wait_for(server.wait_closed(), TIMEOUT)
        assert not sock.exists()

    asyncio.run(main())


BASE_FLAGS = (
    nbd.FLAG_HAS_FLAGS
    | nbd.FLAG_SEND_FLUSH
    | nbd.FLAG_SEND_FUA
    | nbd.FLAG_SEND_TRIM
    | nbd.FLAG_SEND_WRITE_ZEROES
)


# --- protocol tests ------------------------------------------------------------------------------


def test_handshake_options(tmp_path: Path) -> None:
    target = MemTarget(4 * MiB)
    sock = tmp_path / "nbd.sock"

    async def body(server: NbdServer) -> None:
        c = await RawClient.unix(sock)
        assert await c.greet() == nbd.FLAG_FIXED_NEWSTYLE | nbd.FLAG_NO_ZEROES

        assert await c.option(nbd.OPT_LIST) == [
            (nbd.REP_SERVER, struct.pack(">I", 0)),
            (nbd.REP_ACK, b""),
        ]
        assert (await c.option(nbd.OPT_LIST, b"x"))[-1][0] == nbd.REP_ERR_INVALID
        assert (await c.option(nbd.OPT_STRUCTURED_REPLY, b"x"))[-1][0] == nbd.REP_ERR_INVALID
        assert (await c.option(nbd.OPT_STARTTLS))[-1][0] == nbd.REP_ERR_UNSUP
        assert (await c.option(0x4242, b"whatever"))[-1][0] == nbd.REP_ERR_UNSUP

        # INFO: export size/flags and the block size limits, then ACK; stays in negotiation.
        name = b"any-name"
        req = struct.pack(">I", len(name)) + name + struct.pack(">HH", 1, nbd.INFO_BLOCK_SIZE)
        replies = await c.option(nbd.OPT_INFO, req)
        assert replies == [
            (nbd.REP_INFO, struct.pack(">HQH", nbd.INFO_EXPORT, 4 * MiB, BASE_FLAGS)),
            (nbd.REP_INFO, struct.pack(">HIII", nbd.INFO_BLOCK_SIZE, 512, 4096, 32 * MiB)),
            (nbd.REP_ACK, b""),
        ]
        assert not BASE_FLAGS & nbd.FLAG_CAN_MULTI_CONN
        # Lengths that do not add up are refused, and negotiation goes on.
        bad = struct.pack(">I", 100) + b"short"
        assert (await c.option(nbd.OPT_INFO, bad))[-1][0] == nbd.REP_ERR_INVALID
        assert (await c.option(nbd.OPT_GO, req + b"\0"))[-1][0] == nbd.REP_ERR_INVALID

        assert await c.go(b"") == (4 * MiB, BASE_FLAGS)
        assert await c.request(nbd.CMD_READ, 0, 512) == (0, bytes(512))
        c.send(nbd.CMD_DISC)
        assert await c.at_eof()
        await c.close()

        # ABORT is acknowledged, then the server hangs up.
        c = await RawClient.unix(sock)
        await c.greet()
        assert await c.option(nbd.OPT_ABORT) == [(nbd.REP_ACK, b"")]
        assert await c.at_eof()
        await c.close()

    run_with_server(target, sock, body)


def test_export_name_with_and_without_zero_padding(tmp_path: Path) -> None:
    target = MemTarget(1 * MiB)
    target.buf[:4] = b"\xde\xad\xbe\xef"
    sock = tmp_path / "nbd.sock"

    async def body(server: NbdServer) -> None:
        for client_flags, padding in (
            (nbd.FLAG_C_FIXED_NEWSTYLE | nbd.FLAG_C_NO_ZEROES, 0),
            (nbd.FLAG_C_FIXED_NEWSTYLE, 124),
            (0, 124),
        ):
            c = await RawClient.unix(sock)
            await c.greet(client_flags)
            c.send_option(nbd.OPT_EXPORT_NAME, b"some-export")
            size, flags = struct.unpack(">QH", await c.read(10))
            assert (size, flags) == (1 * MiB, BASE_FLAGS)
            assert await c.read(padding) == bytes(padding)
            assert await c.request(nbd.CMD_READ, 0, 4) == (0, b"\xde\xad\xbe\xef")
            c.send(nbd.CMD_DISC)
            assert await c.at_eof()
            await c.close()

    run_with_server(target, sock, body)


def test_commands_and_error_replies(tmp_path: Path) -> None:
    size = 40 * MiB  # larger than the 32 MiB payload cap, to tell the cap from the range check
    target = MemTarget(size)
    sock = tmp_path / "nbd.sock"
    E = errno

    async def body(server: NbdServer) -> None:
        c = await RawClient.unix(sock)
        await c.greet()
        await c.go(b"disk")
        data = os.urandom(8192)

        # WRITE / READ / FLUSH / FUA
        assert await c.request(nbd.CMD_WRITE, 4096, 8192, data=data) == (0, b"")
        assert await c.request(nbd.CMD_READ, 4096, 8192) == (0, data)
        assert await c.request(nbd.CMD_READ, 4097, 3) == (0, data[1:4])  # no alignment demanded
        assert target.flushes == 0
        assert await c.request(nbd.CMD_FLUSH) == (0, b"")
        assert target.flushes == 1
        assert await c.request(nbd.CMD_WRITE, 0, 512, data=b"\1" * 512, flags=nbd.CMD_FLAG_FUA) == (
            0,
            b"",
        )
        assert target.flushes == 2 and target.buf[:512] == b"\1" * 512

        # TRIM and WRITE_ZEROES (NO_HOLE -> may_unmap False); big ones reach the target in pieces
        assert await c.request(nbd.CMD_TRIM, 8192, 4096) == (0, b"")
        assert target.discards == [(8192, 4096)]
        assert await c.request(nbd.CMD_WRITE_ZEROES, 4096, 4096) == (0, b"")
        assert await c.request(
            nbd.CMD_WRITE_ZEROES, 0, 512, flags=nbd.CMD_FLAG_NO_HOLE | nbd.CMD_FLAG_FUA
        ) == (0, b"")
        assert target.zeroes == [(4096, 4096, True), (0, 512, False)]
        assert target.flushes == 3
        assert target.buf[:8192] == bytes(8192)
        assert target.buf[8192:12288] == data[4096:]
        assert await c.request(nbd.CMD_TRIM, 0, size) == (0, b"")
        assert target.discards[1:] == [(0, 32 * MiB), (32 * MiB, 8 * MiB)]

        # Range checks: EINVAL for reads/trims, ENOSPC for writes (spec "Error values")
        assert await c.request(nbd.CMD_READ, size - 512, 1024) == (E.EINVAL, b"")
        assert await c.request(nbd.CMD_READ, size + 512, 0) == (E.EINVAL, b"")
        assert await c.request(nbd.CMD_TRIM, size, 512) == (E.EINVAL, b"")
        assert await c.request(nbd.CMD_WRITE_ZEROES, size - 512, 1024) == (E.ENOSPC, b"")
        assert await c.request(nbd.CMD_WRITE, size - 512, 1024) == (E.ENOSPC, b"")  # payload eaten
        assert await c.request(nbd.CMD_READ, size - 512, 512) == (0, bytes(512))
        assert await c.request(nbd.CMD_READ, size, 0) == (0, b"")

        # Payload cap: 32 MiB is fine, one block more is EINVAL
        payload = await c.request(nbd.CMD_READ, 0, MAX_PAYLOAD)
        assert payload[0] == 0 and len(payload[1]) == MAX_PAYLOAD
        assert await c.request(nbd.CMD_READ, 0, MAX_PAYLOAD + 512) == (E.EINVAL, b"")
        # (an oversize WRITE ends the connection: test_oversize_write_is_refused_unread)

        # Unknown commands and flags
        for cmd in (5, 7, 42):  # CACHE is not offered, BLOCK_STATUS needs a context first
            assert await c.request(cmd, 0, 512) == (E.EINVAL, b"")
        assert await c.request(nbd.CMD_READ, 0, 512, flags=1 << 2) == (E.EINVAL, b"")  # DF
        assert await c.request(nbd.CMD_WRITE, 0, 512, flags=nbd.CMD_FLAG_NO_HOLE) == (E.EINVAL, b"")

        # Target failures: errno mapped to the NBD error set, no payload on a failed READ
        target.fail[1024 * 1024] = OSError(errno.EIO, "medium error")
        target.fail[2 * MiB] = OSError(errno.EDQUOT, "quota")
        target.fail[3 * MiB] = OSError(errno.ENOENT, "odd")
        target.fail[4 * MiB] = ValueError("bug in the target")
        target.fail[5 * MiB] = OSError(errno.EROFS, "went read-only")
        assert await c.request(nbd.CMD_READ, 1024 * 1024, 4096) == (E.EIO, b"")
        assert await c.request(nbd.CMD_WRITE, 2 * MiB, 512) == (E.ENOSPC, b"")
        assert await c.request(nbd.CMD_READ, 3 * MiB, 512) == (E.EIO, b"")
        assert await c.request(nbd.CMD_TRIM, 4 * MiB, 512) == (E.EIO, b"")
        assert await c.request(nbd.CMD_WRITE_ZEROES, 5 * MiB, 512) == (E.EPERM, b"")
        assert await c.request(nbd.CMD_READ, 4096, 4) == (0, bytes(4))

        c.send(nbd.CMD_DISC)
        assert await c.at_eof()
        await c.close()

    run_with_server(target, sock, body)


def test_read_only_export(tmp_path: Path) -> None:
    target = MemTarget(1 * MiB, read_only=True, fill=0x5A)
    sock = tmp_path / "nbd.sock"

    async def body(server: NbdServer) -> None:
        c = await RawClient.unix(sock)
        await c.greet()
        size, flags = await c.go()
        assert flags == BASE_FLAGS | nbd.FLAG_READ_ONLY
        assert await c.request(nbd.CMD_WRITE, 0, 4096) == (errno.EPERM, b"")
        assert await c.request(nbd.CMD_TRIM, 0, 4096) == (errno.EPERM, b"")
        assert await c.request(nbd.CMD_WRITE_ZEROES, 0, 4096) == (errno.EPERM, b"")
        assert await c.request(nbd.CMD_FLUSH) == (0, b"")
        assert await c.request(nbd.CMD_READ, 0, 4) == (0, b"\x5a" * 4)
        assert target.writes == [] and target.discards == [] and target.zeroes == []
        c.send(nbd.CMD_DISC)
        assert await c.at_eof()

    run_with_server(target, sock, body)


def test_requests_run_concurrently_and_reply_out_of_order(tmp_path: Path) -> None:
    target = MemTarget(1 * MiB)
    target.buf[4096:4100] = b"fast"
    target.delay[0] = 0.5
    sock = tmp_path / "nbd.sock"

    async def body(server: NbdServer) -> None:
        c = await RawClient.unix(sock)
        await c.greet()
        await c.go()
        slow = c.send(nbd.CMD_READ, 0, 4)
        fast = c.send(nbd.CMD_READ, 4096, 4)
        assert await c.reply() == (fast, 0, b"fast")
        assert await c.reply() == (slow, 0, bytes(4))

    run_with_server(target, sock, body)


def test_in_flight_requests_are_bounded(tmp_path: Path) -> None:
    target = MemTarget(1 * MiB)
    sock = tmp_path / "nbd.sock"

    async def body(server: NbdServer) -> None:
        target.gate = asyncio.Event()
        c = await RawClient.unix(sock)
        await c.greet()
        await c.go()
        handles = {c.send(nbd.CMD_READ, i * 512, 512) for i in range(150)}
        for _ in range(200):
            if target.active >= 64:
                break
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.2)  # give the server a chance to overshoot if it would
        assert target.active == 64 and target.peak == 64
        target.gate.set()
        got = set()
        for _ in handles:
            handle, error, data = await c.reply()
            assert error == 0 and len(data) == 512
            got.add(handle)
        assert got == handles and target.peak == 64

    run_with_server(target, sock, body)


def test_bad_magic_drops_only_that_connection(tmp_path: Path) -> None:
    target = MemTarget(1 * MiB)
    sock = tmp_path / "nbd.sock"

    async def body(server: NbdServer) -> None:
        good = await RawClient.unix(sock)
        await good.greet()
        await good.go()

        bad = await RawClient.unix(sock)
        await bad.greet()
        await bad.go()
        bad.send(nbd.CMD_READ, 0, 512, magic=0x12345678)
        assert await bad.at_eof()

        bad_opt = await RawClient.unix(sock)
        await bad_opt.greet()
        bad_opt.send_option(nbd.OPT_LIST, magic=0x1122334455667788)
        assert await bad_opt.at_eof()

        bad_flags = await RawClient.unix(sock)
        await bad_flags.greet(client_flags=1 << 7)
        assert await bad_flags.at_eof()

        too_long = await RawClient.unix(sock)
        await too_long.greet()
        too_long.send_option(nbd.OPT_GO, bytes(64 * 1024))
        assert await too_long.at_eof()

        assert await good.request(nbd.CMD_WRITE, 0, 4, data=b"live") == (0, b"")
        late = await RawClient.unix(sock)
        await late.greet()
        await late.go()
        assert await late.request(nbd.CMD_READ, 0, 4) == (0, b"live")
        assert server.is_serving()
        for c in (good, bad, bad_opt, bad_flags, too_long, late):
            await c.close()

    run_with_server(target, sock, body)


def test_handshake_timeout(tmp_path: Path) -> None:
    sock = tmp_path / "nbd.sock"

    async def main() -> None:
        server = NbdServer(MemTarget(1 * MiB), handshake_timeout=0.2)
        await server.listen(unix_path=str(sock))
        idle = await RawClient.unix(sock)
        await idle.greet()  # then say nothing more
        assert await idle.at_eof()
        ok = await RawClient.unix(sock)  # the timeout covers the handshake only
        await ok.greet()
        await ok.go()
        await asyncio.sleep(0.4)
        assert await ok.request(nbd.CMD_READ, 0, 4) == (0, bytes(4))
        server.close()
        await server.wait_closed()
        await idle.close()
        await ok.close()

    asyncio.run(main())


def test_close_drops_clients_and_removes_socket(tmp_path: Path) -> None:
    target = MemTarget(1 * MiB)
    sock = tmp_path / "nbd.sock"

    async def main() -> None:
        server = await serve_nbd(target, unix_path=str(sock))
        assert sock.is_socket()
        c = await RawClient.unix(sock)
        await c.greet()
        await c.go()
        assert await c.request(nbd.CMD_READ, 0, 4) == (0, bytes(4))
        server.close()
        await asyncio.wait_for(server.wait_closed(), TIMEOUT)
        assert not sock.exists()
        assert await c.at_eof()
        await c.close()

    asyncio.run(main())


def test_tcp_listener_and_arguments(tmp_path: Path) -> None:
    target = MemTarget(1 * MiB)

    async def main() -> None:
        with pytest.raises(ValueError):
            await serve_nbd(target)
        with pytest.raises(ValueError):
            await serve_nbd(target, unix_path=str(tmp_path / "x.sock"), port=0)
        with pytest.raises(ValueError):
            await serve_nbd(MemTarget(1000), port=0)

        async with await serve_nbd(target, port=0) as server:
            host, port = server.sockets[0].getsockname()[:2]
            assert host == "127.0.0.1"
            reader, writer = await asyncio.open_connection(host, port)
            c = RawClient(reader, writer)
            await c.greet()
            assert await c.go() == (1 * MiB, BASE_FLAGS)
            assert await c.request(nbd.CMD_WRITE, 512, 3, data=b"tcp") == (0, b"")
            assert await c.request(nbd.CMD_READ, 512, 3) == (0, b"tcp")
            c.send(nbd.CMD_DISC)
            assert await c.at_eof()
            await c.close()

    asyncio.run(main())


def meta_request(name: bytes, *queries: bytes) -> bytes:
    return (struct.pack(">I", len(name)) + name + struct.pack(">I", len(queries))
            + b"".join(struct.pack(">I", len(q)) + q for q in queries))


def meta_reply(context_id: int) -> tuple[int, bytes]:
    return (nbd.REP_META_CONTEXT, struct.pack(">I", context_id) + b"base:allocation")


def test_oversize_write_is_refused_unread(tmp_path: Path) -> None:
    """A WRITE header announcing 1 GiB gets EINVAL and a hang-up with no payload sent at all.

    Were the server to read (or skip) the payload first, it would wait for 1 GiB that never
    comes and the reply would time out. Other connections are not affected.
    """
    target = MemTarget(4 * MiB)
    sock = tmp_path / "nbd.sock"

    async def body(server: NbdServer) -> None:
        other = await RawClient.unix(sock)
        await other.greet()
        await other.go()
        for structured in (False, True):
            c = await RawClient.unix(sock)
            await c.greet()
            if structured:
                assert await c.option(nbd.OPT_STRUCTURED_REPLY) == [(nbd.REP_ACK, b"")]
            await c.go()
            handle = c.send(nbd.CMD_WRITE, 0, 1 << 30, data=b"\x77")  # 1 GiB announced, 1 B sent
            got, error, _ = await c.reply()
            assert (got, error) == (handle, errno.EINVAL)
            if structured:
                rtype, payload = c.chunks[-1]
                assert rtype == nbd.REPLY_TYPE_ERROR and b"maximum payload" in payload
            assert await c.at_eof()
            await c.close()
        assert target.writes == [] and target.buf[:1] == b"\0"
        assert await other.request(nbd.CMD_WRITE, 0, 3, data=b"abc") == (0, b"")
        assert await other.request(nbd.CMD_READ, 0, 3) == (0, b"abc")
        await other.close()

    run_with_server(target, sock, body)


def test_structured_replies_and_base_allocation(tmp_path: Path) -> None:
    size = 8 * MiB
    target = MemTarget(size, fill=0x11)
    sock = tmp_path / "nbd.sock"
    E = errno

    async def body(server: NbdServer) -> None:
        c = await RawClient.unix(sock)
        await c.greet()
        # meta contexts need structured replies first
        meta = meta_request(b"", b"base:allocation")
        assert (await c.option(nbd.OPT_SET_META_CONTEXT, meta))[-1][0] == nbd.REP_ERR_INVALID
        assert await c.option(nbd.OPT_STRUCTURED_REPLY) == [(nbd.REP_ACK, b"")]
        # LIST: everything with no query, base: as a wildcard, unknown namespaces ignored
        assert await c.option(nbd.OPT_LIST_META_CONTEXT, meta_request(b"")) == [
            meta_reply(0), (nbd.REP_ACK, b"")]
        assert await c.option(nbd.OPT_LIST_META_CONTEXT, meta_request(b"", b"base:")) == [
            meta_reply(0), (nbd.REP_ACK, b"")]
        assert await c.option(nbd.OPT_LIST_META_CONTEXT, meta_request(b"", b"qemu:dirty")) == [
            (nbd.REP_ACK, b"")]
        assert (await c.option(nbd.OPT_LIST_META_CONTEXT, meta + b"x"))[-1][0] == (
            nbd.REP_ERR_INVALID)
        # SET: base: selects nothing; the full name selects context 1
        assert await c.option(nbd.OPT_SET_META_CONTEXT, meta_request(b"", b"base:")) == [
            (nbd.REP_ACK, b"")]
        assert await c.option(nbd.OPT_SET_META_CONTEXT,
                              meta_request(b"", b"x-other:thing", b"base:allocation")) == [
            meta_reply(1), (nbd.REP_ACK, b"")]
        await c.go()

        # READ data and errors come as structured chunks; WRITE keeps its simple reply
        assert await c.request(nbd.CMD_READ, 4096, 8) == (0, b"\x11" * 8)
        assert c.chunks[-1][0] == nbd.REPLY_TYPE_OFFSET_DATA
        assert c.chunks[-1][1][:8] == struct.pack(">Q", 4096)
        assert await c.request(nbd.CMD_READ, size, 512) == (E.EINVAL, b"")
        assert c.chunks[-1][0] == nbd.REPLY_TYPE_ERROR
        target.fail[MiB] = OSError(errno.EIO, "medium error")
        assert await c.request(nbd.CMD_READ, MiB, 512) == (E.EIO, b"")
        assert await c.request(nbd.CMD_READ, 0, 0) == (0, b"")
        assert c.chunks[-1] == (nbd.REPLY_TYPE_NONE, b"")
        n = len(c.chunks)
        assert await c.request(nbd.CMD_WRITE, 0, 4, data=b"abcd") == (0, b"")
        assert len(c.chunks) == n  # simple reply

        # BLOCK_STATUS: status 0 ("allocated or unknown") to the end of the disk, or exactly
        # the requested length with REQ_ONE; never past the end, never zero-length
        def extents(payload: bytes) -> tuple[int, list[tuple[int, int]]]:
            cid = struct.unpack_from(">I", payload)[0]
            return cid, [struct.unpack_from(">II", payload, 4 + 8 * i)
                         for i in range((len(payload) - 4) // 8)]

        assert extents((await c.request(nbd.CMD_BLOCK_STATUS, 0, 4096))[1]) == (1, [(size, 0)])
        assert c.chunks[-1][0] == nbd.REPLY_TYPE_BLOCK_STATUS
        got = await c.request(nbd.CMD_BLOCK_STATUS, 4096, 8192, flags=nbd.CMD_FLAG_REQ_ONE)
        assert extents(got[1]) == (1, [(8192, 0)])
        assert extents((await c.request(nbd.CMD_BLOCK_STATUS, MiB, 512))[1]) == (
            1, [(size - MiB, 0)])
        assert (await c.request(nbd.CMD_BLOCK_STATUS, size - 512, 1024))[0] == E.EINVAL
        assert (await c.request(nbd.CMD_BLOCK_STATUS, 0, 0))[0] == E.EINVAL
        assert (await c.request(nbd.CMD_BLOCK_STATUS, 0, 512, flags=nbd.CMD_FLAG_FUA))[0] == (
            E.EINVAL)
        c.send(nbd.CMD_DISC)
        assert await c.at_eof()
        await c.close()

    run_with_server(target, sock, body)


def test_connection_cap_holds_under_1000_idle_connections(tmp_path: Path) -> None:
    """Past max_connections a connection is closed before the greeting; the rest go on."""
    target = MemTarget(1 * MiB)
    sock = tmp_path / "nbd.sock"

    async def main() -> None:
        server = await serve_nbd(target, unix_path=str(sock), max_connections=16)
        assert stat.S_IMODE(os.stat(sock).st_mode) == 0o600
        try:
            busy = await RawClient.unix(sock)
            await busy.greet()
            await busy.go()
            idle: list[RawClient] = []
            greeted = refused = 0

            async def attempt() -> None:
                nonlocal greeted, refused
                c = await RawClient.unix(sock)
                idle.append(c)
                first = await asyncio.wait_for(c.reader.read(18), TIMEOUT)
                if first:
                    greeted += 1
                else:
                    refused += 1

            for batch in range(20):  # 1,000 connections, 50 at a time, none of them speaks
                await asyncio.gather(*(attempt() for _ in range(50)))
                # the client inside the cap is served all along
                data = os.urandom(512)
                assert await busy.request(nbd.CMD_WRITE, 512 * batch, 512, data=data) == (0, b"")
                assert await busy.request(nbd.CMD_READ, 512 * batch, 512) == (0, data)
            assert (greeted, refused) == (15, 985)
            assert server.refused == 985
            for c in idle:
                await c.close()
            for _ in range(200):  # the server notices the 15 idle ones went away
                if len(server._conns) == 1:
                    break
                await asyncio.sleep(0.01)
            again = await RawClient.unix(sock)
            await again.greet()
            assert await again.go() == (1 * MiB, BASE_FLAGS)
            await again.close()
            await busy.close()
        finally:
            server.close()
            await asyncio.wait_for(server.wait_closed(), TIMEOUT)
        assert not sock.exists()

    asyncio.run(main())


def test_nbd_cli_options(tmp_path: Path) -> None:
    """--host only with --port, the help warns about authentication, one-line errors."""
    out = subprocess.run(cli("nbd", "--help"), capture_output=True, text=True, timeout=60)
    assert "no authentication" in " ".join(out.stdout.split())
    assert "--max-connections" in out.stdout
    for args, text in ((["--socket", str(tmp_path / "x.nbd"), "--host", "::1"], "--host goes"),
                       (["--port", "0", "--max-connections", "0"], "--max-connections 0")):
        out = subprocess.run(cli("nbd", "--link", "sim:" + str(tmp_path / "none.sock"), *args),
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 2 and out.stderr.count("\n") == 1, out.stderr
        assert text in out.stderr


# --- interop with real clients -------------------------------------------------------------------


def require(binary: str, package: str) -> str:
    """Path of a client binary; fail (not skip) when it is missing so CI notices."""
    path = shutil.which(binary)
    if path is None:
        pytest.fail(
            f"{binary} not found: install the Debian package {package} "
            f"(listed in .ci/apt-packages)",
            pytrace=False,
        )
    return path


def run(cmd: list[str]) -> subprocess.CompletedProcess[str]:
    """Run a client to completion; subprocess.run kills it if it overruns the timeout."""
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=CLIENT_TIMEOUT)
    assert proc.returncode == 0, f"{cmd} failed ({proc.returncode}):\n{proc.stderr}"
    return proc


class ServerThread:
    """The export on its own event loop in a thread, so blocking client processes can run."""

    def __init__(
        self,
        target: MemTarget,
        sock: Path,
        new_loop: Callable[[], asyncio.AbstractEventLoop] = asyncio.new_event_loop,
    ) -> None:
        self.target = target
        self.sock = sock
        self.loop = new_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="nbd-server")
        self.server: asyncio.AbstractServer | None = None

    def __enter__(self) -> ServerThread:
        self.thread.start()
        fut = asyncio.run_coroutine_threadsafe(
            serve_nbd(self.target, unix_path=str(self.sock)), self.loop
        )
        self.server = fut.result(TIMEOUT)
        return self

    @property
    def uri(self) -> str:
        return f"nbd+unix:///?socket={self.sock}"

    def __exit__(self, *exc: object) -> None:
        async def stop() -> None:
            assert self.server is not None
            self.server.close()
            await self.server.wait_closed()

        try:
            asyncio.run_coroutine_threadsafe(stop(), self.loop).result(TIMEOUT)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(TIMEOUT)
            self.loop.close()
        assert not self.sock.exists()


def make_image(path: Path) -> bytes:
    """8 MiB raw image: random data around a 2 MiB hole, so clients also send WRITE_ZEROES."""
    head, tail = os.urandom(3 * MiB), os.urandom(3 * MiB)
    with open(path, "wb") as f:
        f.write(head)
        f.seek(5 * MiB)
        f.write(tail)
    return head + bytes(2 * MiB) + tail


def sha256(data: bytes | bytearray) -> str:
    return hashlib.sha256(data).hexdigest()


def test_nbdinfo_sees_the_export(tmp_path: Path) -> None:
    nbdinfo = require("nbdinfo", "libnbd-bin")

    for read_only in (False, True):
        sock = tmp_path / f"ro{int(read_only)}.sock"
        with ServerThread(MemTarget(8 * MiB, read_only=read_only), sock) as srv:
            info = json.loads(run([nbdinfo, "--json", srv.uri]).stdout)
            listed = run([nbdinfo, "--list", srv.uri]).stdout
        (export,) = info["exports"]
        assert info["structured"] is True
        assert export["export-size"] == 8 * MiB
        assert export["is_read_only"] is read_only
        assert export["can_flush"] and export["can_fua"] and export["can_trim"]
        assert export["can_zero"] and not export["can_multi_conn"]
        assert (
            export["block_size_minimum"],
            export["block_size_preferred"],
            export["block_size_maximum"],
        ) == (512, 4096, 32 * MiB)
        assert 'export=""' in listed


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_nbdcopy_roundtrip(tmp_path: Path, loop: str) -> None:
    nbdcopy = require("nbdcopy", "libnbd-bin")
    new_loop = uvloop.new_event_loop if loop == "uvloop" else asyncio.new_event_loop
    src, out = tmp_path / "src.img", tmp_path / "out.img"
    image = make_image(src)
    # fill: the hole must really be zeroed; jitter: completions out of order
    target = MemTarget(len(image), fill=0xA5, jitter=0.002)
    with ServerThread(target, tmp_path / "nbd.sock", new_loop) as srv:
        run([nbdcopy, "--flush", str(src), srv.uri])
        assert sha256(target.buf) == sha256(image)
        run([nbdcopy, srv.uri, str(out)])
    assert sha256(out.read_bytes()) == sha256(image)
    assert target.flushes >= 1
    assert target.zeroes, "nbdcopy should have zeroed the hole with WRITE_ZEROES"
    assert target.peak > 1, "nbdcopy keeps several requests in flight"


def test_qemu_img_roundtrip(tmp_path: Path) -> None:
    qemu_img = require("qemu-img", "qemu-utils")
    src, out = tmp_path / "src.img", tmp_path / "out.img"
    image = make_image(src)
    target = MemTarget(len(image), fill=0xA5, jitter=0.002)
    with ServerThread(target, tmp_path / "nbd.sock") as srv:
        # -n: the NBD export exists already, qemu-img must not try to create it.
        run([qemu_img, "convert", "-n", "-f", "raw", "-O", "raw", str(src), srv.uri])
        assert sha256(target.buf) == sha256(image)
        run([qemu_img, "convert", "-f", "raw", "-O", "raw", srv.uri, str(out)])
    assert sha256(out.read_bytes()) == sha256(image)
    assert target.flushes >= 1


def test_nbdinfo_map_and_qemu_img_map_see_allocated_data(tmp_path: Path) -> None:
    """base:allocation: what the server knows, the whole disk as data (no false holes)."""
    nbdinfo = require("nbdinfo", "libnbd-bin")
    qemu_img = require("qemu-img", "qemu-utils")
    with ServerThread(MemTarget(8 * MiB), tmp_path / "nbd.sock") as srv:
        info = json.loads(run([nbdinfo, "--json", srv.uri]).stdout)
        mapped = run([nbdinfo, "--map", srv.uri]).stdout.split()
        qmap = json.loads(run([qemu_img, "map", "--output=json", srv.uri]).stdout)
    assert "base:allocation" in info["exports"][0]["contexts"]
    assert mapped == ["0", str(8 * MiB), "0", "data"]
    assert [(m["start"], m["length"], m["data"], m["zero"]) for m in qmap] == [
        (0, 8 * MiB, True, False)]
