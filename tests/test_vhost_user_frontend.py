"""The Python front-end over vhost-user (issue 16): BlkClient on a vhost-user-blk back-end.

First against a back-end nobody here wrote, QEMU's ``qemu-storage-daemon`` (Debian package
``qemu-system-common``), then against ours (``ivshmem-virtio blk --vhost-user``). The client
writes a pattern at many offsets and sizes with requests in flight, reads it back, flushes, and
the image file is compared byte for byte with a shadow copy of what was written.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import os
import random
import select
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from ivshmem_virtio.errors import ConfigError, TransportError
from ivshmem_virtio.frontend.blk import BlkClient
from ivshmem_virtio.frontend.driver import connect_driver
from ivshmem_virtio.frontend.vhost_user import VhostUserTransport, vhost_user_path
from ivshmem_virtio.frontend.vhost_user_conn import GuestMemory, VhostUserLink
from ivshmem_virtio.procs import Child, cli, run_cli
from ivshmem_virtio.spec import vhost_user as U

from .conftest import Procs, run

QSD = shutil.which("qemu-storage-daemon")
IMAGE_SIZE = 8 << 20


def _ours_has_vhost_user() -> bool:
    out = subprocess.run(cli("blk", "--help"), capture_output=True, text=True, timeout=60)
    return "--vhost-user" in out.stdout


def _wait_socket(child: Child, path: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if child.proc.poll() is not None:
            raise RuntimeError(f"{child.name} exited with {child.proc.returncode}:\n"
                               f"{child.log()}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{child.name}: no socket {path}:\n{child.log()}")
        time.sleep(0.02)


def start_backend(kind: str, procs: Procs, sock: str, image: str) -> Child:
    """One vhost-user-blk back-end process serving ``image`` on ``sock``."""
    if kind == "qsd":
        if QSD is None:
            pytest.skip("qemu-storage-daemon is not installed (Debian: qemu-system-common)")
        argv = [QSD, "--blockdev", f"driver=file,node-name=f,filename={image}",
                "--export", f"type=vhost-user-blk,id=e,node-name=f,addr.type=unix,"
                f"addr.path={sock},writable=on"]
    else:
        if not _ours_has_vhost_user():
            pytest.skip("ivshmem-virtio blk has no --vhost-user yet (backend/vhost_user*.py)")
        argv = cli("blk", "--vhost-user", sock, "--image", image)
    child = Child(f"{kind}-{len(procs.children)}", argv, procs.work)
    procs.children.append(child)
    _wait_socket(child, sock)
    return child


BACKENDS = ["qsd", "ours"]


def _pattern(seed: int, n: int) -> bytes:
    return random.Random(seed).randbytes(n)


async def _exercise(client: BlkClient, shadow: bytearray, seed: int, rounds: int = 120) -> None:
    """Writes of many sizes at many offsets, 8 in flight at a time (never two overlapping in
    one batch), each batch read back; then a flush."""
    rng = random.Random(seed)
    size = client.size
    sizes = [512, 1024, 4096, 4608, 8192, 65536, 131072, 200704]
    for batch in range(rounds // 8):
        taken: list[tuple[int, int]] = []
        writes = []
        while len(writes) < 8:
            n = rng.choice(sizes)
            off = rng.randrange(0, (size - n) // 512 + 1) * 512
            if any(off < b + m and b < off + n for b, m in taken):
                continue
            taken.append((off, n))
            data = _pattern(seed * 1000 + batch * 8 + len(writes), n)
            shadow[off:off + n] = data
            writes.append(client.write(off, data))
        await asyncio.wait_for(asyncio.gather(*writes), 20)
        got = await asyncio.wait_for(
            asyncio.gather(*[client.read(off, n) for off, n in taken]), 20)
        for (off, n), data in zip(taken, got, strict=True):
            assert data == bytes(shadow[off:off + n]), f"read back {n} bytes at {off} differ"
    await asyncio.wait_for(client.flush(), 20)
    # the first and last sectors, and an unaligned-to-4K tail
    for off, n in ((0, 512), (size - 512, 512), (size - 4608, 4608)):
        data = _pattern(seed + off, n)
        shadow[off:off + n] = data
        await client.write(off, data)
        assert await client.read(off, n) == data
    await client.flush()


def _check_image(image: str, shadow: bytearray) -> None:
    disk = Path(image).read_bytes()
    assert len(disk) == len(shadow)
    if disk != shadow:
        bad = next(i for i in range(len(disk)) if disk[i] != shadow[i])
        pytest.fail(f"image differs from what was written, first at byte {bad}")


@pytest.mark.parametrize(("regions", "memory"), [(1, 8 << 20), (2, 256 << 10)])
@pytest.mark.parametrize("kind", BACKENDS)
def test_blk_patterns_image_verified(kind: str, regions: int, memory: int, procs: Procs,
                                     image_factory: Callable[..., str], tmp_path: Path) -> None:
    """Two regions with little memory: requests wait for bounce memory, and buffers land in
    both regions (checked), so a back-end that translates the second one wrong fails."""
    seed = 7 + regions
    initial = _pattern(seed, IMAGE_SIZE)
    image = image_factory(IMAGE_SIZE, data=initial)
    sock = str(tmp_path / "blk.sock")
    start_backend(kind, procs, sock, image)

    async def main() -> None:
        link = VhostUserLink(sock, memory_size=memory, regions=regions, timeout=10.0)
        client = BlkClient(link, timeout=10.0)
        try:
            await client.start(timeout=10.0)
            alloc = client.transport.allocator
            assert alloc is not None
            placed: list[int] = []
            take = alloc.alloc

            def spy(size: int) -> int:
                placed.append(off := take(size))
                return off

            alloc.alloc = spy  # type: ignore[method-assign]
            assert client.size == IMAGE_SIZE and not client.read_only
            # the image's own bytes come through before we write anything
            assert await client.read(3 << 20, 65536) == initial[3 << 20:(3 << 20) + 65536]
            shadow = bytearray(initial)
            await _exercise(client, shadow, seed)
            assert client.error is None
            if regions == 2:
                assert max(placed) >= link.memory.table[1].guest_addr, "region 1 never used"
        finally:
            await client.close()
            link.close()
        _check_image(image, shadow)

    run(main(), 90)


@pytest.mark.parametrize("kind", BACKENDS)
def test_reset_and_reconnect_keep_data(kind: str, procs: Procs,
                                       image_factory: Callable[..., str], tmp_path: Path) -> None:
    """A device reset (rings stopped by GET_VRING_BASE, new rings elsewhere in memory), then a
    second front-end on a fresh connection: what the first acknowledged is there."""
    image = image_factory(IMAGE_SIZE)
    sock = str(tmp_path / "blk.sock")
    start_backend(kind, procs, sock, image)
    shadow = bytearray(IMAGE_SIZE)

    async def main() -> None:
        client = await connect_driver(BlkClient, f"vhost-user:{sock}", 10.0)
        try:
            await _exercise(client, shadow, 11, rounds=32)
            before = client.vqs[0].desc
            await client.reset_device(queue_size=64)
            assert client.vqs[0].size == 64 and client.vqs[0].desc != before
            await _exercise(client, shadow, 12, rounds=32)
        finally:
            await client.close()
            client.dev.close()
        client = await connect_driver(BlkClient, f"vhost-user:{sock}", 10.0)
        try:
            assert client.dev.connections == 1
            whole = b"".join(await asyncio.gather(*[client.read(o, 1 << 20)
                                                    for o in range(0, IMAGE_SIZE, 1 << 20)]))
            assert whole == bytes(shadow)
        finally:
            await client.close()
            client.dev.close()
        _check_image(image, shadow)

    run(main(), 90)


@pytest.mark.parametrize("kind", BACKENDS)
def test_backend_restart_resubmits(kind: str, procs: Procs,
                                   image_factory: Callable[..., str], tmp_path: Path) -> None:
    """The back-end process dies and a new one comes up on the same socket: the front-end sees
    the hang-up, reconnects (memory table and rings sent again) and its next requests work."""
    image = image_factory(IMAGE_SIZE)
    sock = str(tmp_path / "blk.sock")
    first = start_backend(kind, procs, sock, image)
    shadow = bytearray(IMAGE_SIZE)

    async def main() -> None:
        link = VhostUserLink(sock, timeout=10.0)
        client = BlkClient(link, timeout=10.0)
        try:
            await client.start(timeout=10.0)
            await _exercise(client, shadow, 21, rounds=16)
            first.stop(10)
            if os.path.exists(sock):  # qemu-storage-daemon leaves its socket file behind
                os.unlink(sock)
            for _ in range(200):  # the hang-up reaches the driver through the interrupt fds
                if not client.connected.is_set():
                    break
                await asyncio.sleep(0.01)
            assert not client.connected.is_set()
            start_backend(kind, procs, sock, image)
            await asyncio.wait_for(client.connected.wait(), 15)
            assert link.connections == 2 and client.bring_ups == 2
            await _exercise(client, shadow, 22, rounds=16)
        finally:
            await client.close()
            link.close()
        _check_image(image, shadow)

    run(main(), 90)


@pytest.mark.parametrize("kind", BACKENDS)
def test_blk_client_cli(kind: str, procs: Procs, image_factory: Callable[..., str],
                        tmp_path: Path) -> None:
    """``blk-client --vhost-user SOCKET``: info, write with flush, read back; the image has it."""
    image = image_factory(IMAGE_SIZE)
    sock = str(tmp_path / "blk.sock")
    start_backend(kind, procs, sock, image)
    data = _pattern(31, 3 * 4096 + 512)
    src = tmp_path / "in.bin"
    src.write_bytes(data)
    out = tmp_path / "out.bin"
    base = ["blk-client", "--vhost-user", sock, "--timeout", "10"]
    info = run_cli([*base, "info"], 60)
    assert info.returncode == 0, info.stderr.decode()
    assert f'"bytes": {IMAGE_SIZE}' in info.stdout.decode()
    w = run_cli([*base, "write", "--offset", "1M", "--in", str(src), "--flush"], 60)
    assert w.returncode == 0, w.stderr.decode()
    r = run_cli([*base, "read", "--offset", "1M", "--length", str(len(data)),
                 "--out", str(out)], 60)
    assert r.returncode == 0, r.stderr.decode()
    assert out.read_bytes() == data
    disk = Path(image).read_bytes()
    assert disk[1 << 20:(1 << 20) + len(data)] == data
    assert disk.count(0) == IMAGE_SIZE - len(data) + data.count(0)


def test_blk_client_cli_no_backend(tmp_path: Path) -> None:
    r = run_cli(["blk-client", "--vhost-user", str(tmp_path / "none.sock"), "--timeout", "0.3",
                 "info"], 60)
    assert r.returncode == 2
    assert "--vhost-user" in r.stderr.decode() and "Traceback" not in r.stderr.decode()


def test_memory_table_and_user_addresses() -> None:
    """Two regions of one memfd: guest address = memfd offset, user ranges far apart, and an
    address range is translated only when it lies inside one region."""
    mem = GuestMemory(1 << 20, 2)
    try:
        lo, hi = mem.table
        assert (lo.guest_addr, lo.size, lo.mmap_offset) == (0, 1 << 19, 0)
        assert (hi.guest_addr, hi.size, hi.mmap_offset) == (1 << 19, 1 << 19, 1 << 19)
        assert hi.user_addr - lo.user_addr > 1 << 30  # not adjacent
        assert mem.user_addr(0x1000, 16) == lo.user_addr + 0x1000
        assert mem.user_addr((1 << 19) + 64, 16) == hi.user_addr + 64
        with pytest.raises(TransportError):
            mem.user_addr((1 << 19) - 8, 16)  # straddles the two regions
        with pytest.raises(TransportError):
            mem.user_addr(1 << 20, 1)
    finally:
        mem.close()
    with pytest.raises(TransportError):
        GuestMemory(3 << 20)


def test_link_names() -> None:
    assert vhost_user_path("vhost-user:/run/x.sock") == "/run/x.sock"
    assert vhost_user_path("sim:/run/x.sock") is None
    with pytest.raises(ConfigError):
        vhost_user_path("vhost-user:")


def test_no_backend_is_one_line(tmp_path: Path) -> None:
    async def main() -> None:
        with pytest.raises(ConfigError, match="no backend"):
            await connect_driver(BlkClient, f"vhost-user:{tmp_path / 'none.sock'}", 0.3)

    run(main(), 30)


# --- a back-end that misbehaves: the front-end trusts none of it ------------------------------
class FakeBackend:
    """A scripted vhost-user back-end on a thread, one connection: ``answer(request, payload)``
    returns the reply bytes (b"" for none), or None to hang up; it answers honestly unless a test
    overrides it. Offers VERSION_1 and PROTOCOL_FEATURES; REPLY_ACK and CONFIG."""

    FEATURES = (1 << 32) | (1 << 30)
    PROTOCOL = (1 << 3) | (1 << 9)

    def __init__(self, path: str, answer: Callable[[int, int, bytes], bytes | None]) -> None:
        self.path = path
        self.answer = answer
        self.seen: list[int] = []
        self.fds: list[int] = []  # fds the last message carried (closed unless taken)
        self.server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.server.bind(path)
        self.server.listen(1)
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        conn, _ = self.server.accept()
        with conn, contextlib.suppress(ConnectionError):  # (the front-end may hang up first)
            while True:
                self.fds = []
                raw, anc, _f, _a = conn.recvmsg(U.HEADER_SIZE, 256)  # the fds ride on it
                for _lvl, _typ, data in anc:
                    self.fds += array.array("i", data[:len(data) - len(data) % 4])
                if len(raw) < U.HEADER_SIZE:
                    return
                req, flags, size = U.HEADER.unpack(raw)
                payload = b""
                while len(payload) < size:
                    chunk, anc, _f, _a = conn.recvmsg(size - len(payload), 256)
                    for _lvl, _typ, data in anc:
                        self.fds += array.array("i", data[:len(data) - len(data) % 4])
                    if not chunk:
                        return
                    payload += chunk
                self.seen.append(req)
                out = self.answer(req, flags, payload)
                for fd in self.fds:  # the answer may have taken some (set to -1)
                    if fd >= 0:
                        os.close(fd)
                if out is None:
                    return
                conn.sendall(out)

    @classmethod
    def honest(cls, req: int, flags: int, payload: bytes) -> bytes:
        if req == U.Request.GET_FEATURES:
            return U.encode_reply(req, U.encode_u64(cls.FEATURES))
        if req == U.Request.GET_PROTOCOL_FEATURES:
            return U.encode_reply(req, U.encode_u64(cls.PROTOCOL))
        if req == U.Request.GET_CONFIG:
            msg = U.ConfigMsg.parse(payload)
            return U.encode_reply(req, U.ConfigMsg(0, msg.size, 0, bytes(msg.size)).pack())
        if req == U.Request.GET_VRING_BASE:
            return U.encode_reply(req, payload)
        if flags & U.FLAG_NEED_REPLY:
            return U.encode_reply(req, U.encode_u64(0))
        return b""

    def close(self) -> None:
        self.server.close()
        self.thread.join(5)
        os.unlink(self.path)


def _fake(tmp_path: Path, answer: Callable[[int, int, bytes], bytes | None]) -> FakeBackend:
    return FakeBackend(str(tmp_path / "fake.sock"), answer)


def _bring_up(link: VhostUserLink) -> None:
    t = VhostUserTransport(link, timeout=link.timeout)

    async def main() -> None:
        await t.probe(0.5)
        await t.negotiate(0)
        await t.setup_queue(0, 1, 64)
        await t.driver_ok()

    run(main(), 30)


@pytest.mark.parametrize("fault", ["wrong reply", "bad version", "silence", "hang-up",
                                   "oversized header"])
def test_misbehaving_backend_in_the_opening(fault: str, tmp_path: Path) -> None:
    """Whatever the back-end does wrong while we open, the front-end gives up within its
    timeout with a TransportError naming the request, and holds no connection."""

    def answer(req: int, flags: int, payload: bytes) -> bytes | None:
        if req != U.Request.GET_PROTOCOL_FEATURES:
            return FakeBackend.honest(req, flags, payload)
        if fault == "wrong reply":
            return U.encode_reply(U.Request.GET_FEATURES, U.encode_u64(0))
        if fault == "bad version":
            return U.HEADER.pack(req, 0x2 | U.FLAG_REPLY, 8) + U.encode_u64(0)
        if fault == "silence":
            time.sleep(1.0)
            return None
        if fault == "oversized header":
            return U.HEADER.pack(req, U.VERSION | U.FLAG_REPLY, 1 << 20)
        return None

    fake = _fake(tmp_path, answer)
    link = VhostUserLink(fake.path, memory_size=256 << 10, timeout=0.3)
    try:
        t0 = time.monotonic()
        with pytest.raises(TransportError, match="GET_PROTOCOL_FEATURES"):
            link.connect_once()
        assert time.monotonic() - t0 < 0.9
        assert not link.connected and fake.seen[-1] == U.Request.GET_PROTOCOL_FEATURES
    finally:
        link.close()
        fake.close()


def test_refusals_and_bad_replies_after_the_opening(tmp_path: Path) -> None:
    """A REPLY_ACK refusal names the refused request; a GET_CONFIG reply of another size
    drops the connection."""

    def refuse_mem(req: int, flags: int, payload: bytes) -> bytes | None:
        if req == U.Request.SET_MEM_TABLE:
            return U.encode_reply(req, U.encode_u64(1))
        return FakeBackend.honest(req, flags, payload)

    fake = _fake(tmp_path, refuse_mem)
    link = VhostUserLink(fake.path, memory_size=256 << 10, timeout=2.0)
    try:
        with pytest.raises(TransportError, match="refused SET_MEM_TABLE"):
            _bring_up(link)
        assert U.Request.SET_FEATURES in fake.seen
    finally:
        link.close()
        fake.close()

    def short_config(req: int, flags: int, payload: bytes) -> bytes | None:
        if req == U.Request.GET_CONFIG:
            return U.encode_reply(req, U.ConfigMsg(0, 4, 0, bytes(4)).pack())
        return FakeBackend.honest(req, flags, payload)

    fake = _fake(tmp_path, short_config)
    link = VhostUserLink(fake.path, memory_size=256 << 10, timeout=2.0)
    try:
        link.connect_once()
        with pytest.raises(TransportError, match="answered with 4"):
            link.get_config(0, 8)
        assert not link.connected
    finally:
        link.close()
        fake.close()


def test_short_config_space_reads_as_zero_tail(tmp_path: Path) -> None:
    """A back-end with 12 bytes of config refuses more (empty reply): the front-end asks for
    less and the tail reads as zero, once per connection."""

    def twelve(req: int, flags: int, payload: bytes) -> bytes | None:
        if req == U.Request.GET_CONFIG:
            size = U.ConfigMsg.parse(payload).size
            if size > 12:
                return U.encode_reply(req, b"")
            return U.encode_reply(req, U.ConfigMsg(0, size, 0, bytes(range(1, size + 1))).pack())
        return FakeBackend.honest(req, flags, payload)

    fake = _fake(tmp_path, twelve)
    link = VhostUserLink(fake.path, memory_size=256 << 10, timeout=2.0)
    try:
        link.connect_once()
        assert link.get_config(8, 8) == bytes([9, 10, 11, 12, 0, 0, 0, 0])
        asked = fake.seen.count(U.Request.GET_CONFIG)
        assert link.get_config(0, 16) == bytes(range(1, 13)) + bytes(4)
        assert fake.seen.count(U.Request.GET_CONFIG) == asked + 1  # straight to 12 bytes
    finally:
        link.close()
        fake.close()


def test_config_change_on_the_backend_channel(tmp_path: Path) -> None:
    """With BACKEND_REQ the front-end hands over a channel; a CONFIG_CHANGE_MSG there is a
    config interrupt (take_events), answered 0 when asked; another request is answered 1."""
    channel: list[socket.socket] = []

    def answer(req: int, flags: int, payload: bytes) -> bytes | None:
        if req == U.Request.GET_PROTOCOL_FEATURES:
            return U.encode_reply(req, U.encode_u64(FakeBackend.PROTOCOL | (1 << 5)))
        if req == U.Request.SET_BACKEND_REQ_FD:
            channel.append(socket.socket(fileno=fake.fds[0]))
            fake.fds[0] = -1
        return FakeBackend.honest(req, flags, payload)

    fake = _fake(tmp_path, answer)
    link = VhostUserLink(fake.path, memory_size=256 << 10, timeout=2.0)
    try:
        link.connect_once()
        assert link.has(U.ProtocolFeature.BACKEND_REQ) and len(channel) == 1
        ours = [fd for fd in link.interrupt_fds() if fd not in link.call_fds]
        assert len(ours) == 2  # the socket and the channel
        transport = VhostUserTransport(link)
        chan = channel[0]
        chan.sendall(U.encode(U.BackendRequest.CONFIG_CHANGE_MSG, flags=U.FLAG_NEED_REPLY))
        for fd in ours:  # as the interrupt waiter does when they turn readable
            select.select([fd], [], [], 0.5)
            link.ack_fd(fd)
        assert transport.take_events() == (True, False)
        assert transport.take_events() == (False, False)
        reply = chan.recv(64)
        assert U.HEADER.unpack(reply[:U.HEADER_SIZE])[0] == U.BackendRequest.CONFIG_CHANGE_MSG
        assert U.parse_u64(reply[U.HEADER_SIZE:]) == 0
        chan.sendall(U.encode(U.BackendRequest.IOTLB_MSG, flags=U.FLAG_NEED_REPLY))
        select.select([ours[1]], [], [], 0.5)
        link.ack_fd(ours[1])
        assert U.parse_u64(chan.recv(64)[U.HEADER_SIZE:]) == 1
        assert link.connected and transport.take_events() == (False, False)
    finally:
        for c in channel:
            c.close()
        link.close()
        fake.close()
