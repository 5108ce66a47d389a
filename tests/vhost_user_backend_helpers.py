"""A tiny test-only vhost-user front-end: raw messages, memfd memory, a hand-built split ring.

It plays QEMU's part against ``ivshmem-virtio blk --vhost-user`` (and is allowed to lie, for the
hostile tests). Written from vhost-user.rst and the virtio spec with ``struct`` only, not from
the back-end's code, so the two check each other; the wire constants come from
``spec.vhost_user`` (the layouts under test are also packed here by hand where it matters).
"""

from __future__ import annotations

import mmap
import os
import select
import socket
import struct
import time
from dataclasses import dataclass

from ivshmem_virtio.spec import vhost_user as VU

HDR = struct.Struct("=III")
Q = struct.Struct("=Q")
STATE = struct.Struct("=II")
ADDR = struct.Struct("=IIQQQQ")
REGION = struct.Struct("=QQQQ")
DESC = struct.Struct("<QIHH")
OUTHDR = struct.Struct("<IIQ")

F_VERSION_1 = 1 << 32
F_PROTOCOL_FEATURES = 1 << 30
F_EVENT_IDX = 1 << 29
F_INDIRECT = 1 << 28
PF_MQ, PF_REPLY_ACK, PF_CONFIG = 1 << 0, 1 << 3, 1 << 9
DESC_F_NEXT, DESC_F_WRITE = 1, 2
T_IN, T_OUT, T_FLUSH = 0, 1, 4
USER_BASE = 0x7F12_0000_0000  # the "front-end virtual addresses" we claim (never dereferenced)


@dataclass
class Area:
    """A guest-physical region backed by the memfd at ``file_off``."""

    gpa: int
    size: int
    file_off: int

    @property
    def user(self) -> int:
        return USER_BASE + self.file_off


# region A holds the ring, region B (after a hole) the data buffers
AREAS = (Area(0x0, 0x40000, 0x0), Area(0x100000, 0x40000, 0x40000))
MEM_SIZE = 0x80000
RING = 16
DESC_GPA, AVAIL_GPA, USED_GPA = 0x1000, 0x2000, 0x3000
DATA_GPA = 0x100000


class MiniFrontend:
    """One connection; ``mem`` is our view of guest memory (file offsets)."""

    def __init__(self, path: str, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                self.sock.connect(path)
                break
            except (FileNotFoundError, ConnectionRefusedError):
                self.sock.close()
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        self.sock.settimeout(timeout)
        self.memfd = os.memfd_create("vu-test-guest", os.MFD_CLOEXEC)
        os.ftruncate(self.memfd, MEM_SIZE)
        self.mem = mmap.mmap(self.memfd, MEM_SIZE)
        self.kick = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self.call = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self.err = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self.avail_idx = 0
        self.used_seen = 0
        self.protocol = 0

    def close(self) -> None:
        self.sock.close()
        self.mem.close()
        for fd in (self.memfd, self.kick, self.call, self.err):
            os.close(fd)

    # -- messages -------------------------------------------------------------------------------
    def send_raw(self, data: bytes, fds: tuple[int, ...] | list[int] = ()) -> None:
        if fds:
            socket.send_fds(self.sock, [data], list(fds))
        else:
            self.sock.sendall(data)

    def send(self, request: int, payload: bytes = b"", fds: tuple[int, ...] = (),
             need_reply: bool = False) -> None:
        flags = 1 | (VU.FLAG_NEED_REPLY if need_reply else 0)
        self.send_raw(HDR.pack(request, flags, len(payload)) + payload, fds)

    def recv(self) -> tuple[int, int, bytes]:
        head = self._exact(HDR.size)
        request, flags, size = HDR.unpack(head)
        return request, flags, self._exact(size)

    def _exact(self, n: int) -> bytes:
        buf = b""
        while len(buf) < n:
            chunk = self.sock.recv(n - len(buf))
            if not chunk:
                raise EOFError("back-end closed the connection")
            buf += chunk
        return buf

    def call_msg(self, request: int, payload: bytes = b"", fds: tuple[int, ...] = ()) -> bytes:
        """A request that has a reply body (or is acked with REPLY_ACK)."""
        self.send(request, payload, fds, need_reply=bool(self.protocol & PF_REPLY_ACK))
        rq, flags, body = self.recv()
        assert rq == request and flags & VU.FLAG_REPLY and flags & 3 == 1, (rq, flags)
        return body

    def ack(self, request: int, payload: bytes = b"", fds: tuple[int, ...] = ()) -> None:
        """A request without a body: sent with NEED_REPLY, the ack must be 0."""
        body = self.call_msg(request, payload, fds)
        assert Q.unpack(body)[0] == 0, f"{request} refused"

    def is_closed(self, timeout: float = 5.0) -> bool:
        """True when the back-end closed this connection (EOF) within ``timeout``."""
        self.sock.settimeout(timeout)
        try:
            while True:
                if not self.sock.recv(4096):
                    return True
        except TimeoutError:
            return False
        except ConnectionResetError:
            return True

    # -- set-up ---------------------------------------------------------------------------------
    def negotiate(self, features: int | None = None) -> int:
        offered = Q.unpack(self.call_msg(VU.Request.GET_FEATURES))[0]
        assert offered & F_PROTOCOL_FEATURES and offered & F_VERSION_1
        want = offered if features is None else features & offered
        self.send(VU.Request.SET_FEATURES, Q.pack(want | F_PROTOCOL_FEATURES))
        pf = Q.unpack(self.call_msg(VU.Request.GET_PROTOCOL_FEATURES))[0]
        assert pf & PF_REPLY_ACK and pf & PF_CONFIG
        self.send(VU.Request.SET_PROTOCOL_FEATURES, Q.pack(PF_REPLY_ACK | PF_CONFIG | PF_MQ))
        self.protocol = PF_REPLY_ACK | PF_CONFIG | PF_MQ
        self.ack(VU.Request.SET_OWNER)
        return want

    def config(self, size: int = 60) -> bytes:
        body = self.call_msg(VU.Request.GET_CONFIG, struct.pack("=III", 0, size, 0) + bytes(size))
        offset, n, _flags = struct.unpack_from("=III", body)
        assert (offset, n, len(body)) == (0, size, 12 + size)
        return body[12:]

    def table(self, areas: tuple[Area, ...] = AREAS) -> bytes:
        return struct.pack("=II", len(areas), 0) + b"".join(
            REGION.pack(a.gpa, a.size, a.user, a.file_off) for a in areas)

    def set_mem_table(self, areas: tuple[Area, ...] = AREAS) -> None:
        self.ack(VU.Request.SET_MEM_TABLE, self.table(areas), tuple([self.memfd] * len(areas)))

    def user(self, gpa: int) -> int:
        for a in AREAS:
            if a.gpa <= gpa < a.gpa + a.size:
                return a.user + gpa - a.gpa
        raise ValueError(hex(gpa))

    def setup_ring(self, index: int = 0, base: int = 0, addrs: tuple[int, int, int] | None = None,
                   enable: bool = True) -> None:
        desc, avail, used = addrs or (self.user(DESC_GPA), self.user(AVAIL_GPA),
                                      self.user(USED_GPA))
        self.ack(VU.Request.SET_VRING_NUM, STATE.pack(index, RING))
        self.ack(VU.Request.SET_VRING_ADDR, ADDR.pack(index, 0, desc, used, avail, 0))
        self.ack(VU.Request.SET_VRING_BASE, STATE.pack(index, base))
        self.ack(VU.Request.SET_VRING_CALL, Q.pack(index), (self.call,))
        self.ack(VU.Request.SET_VRING_ERR, Q.pack(index), (self.err,))
        self.ack(VU.Request.SET_VRING_KICK, Q.pack(index), (self.kick,))
        if enable:
            self.ack(VU.Request.SET_VRING_ENABLE, STATE.pack(index, 1))

    def get_vring_base(self, index: int = 0) -> int:
        body = self.call_msg(VU.Request.GET_VRING_BASE, STATE.pack(index, 0))
        i, num = STATE.unpack(body)
        assert i == index
        return int(num)

    # -- guest memory and the ring (file offsets: our regions map gpa -> file 1:1 per area) ---
    @staticmethod
    def off(gpa: int) -> int:
        for a in AREAS:
            if a.gpa <= gpa < a.gpa + a.size:
                return a.file_off + gpa - a.gpa
        raise ValueError(hex(gpa))

    def poke(self, gpa: int, data: bytes) -> None:
        o = self.off(gpa)
        self.mem[o:o + len(data)] = data

    def peek(self, gpa: int, n: int) -> bytes:
        o = self.off(gpa)
        return bytes(self.mem[o:o + n])

    def put_desc(self, i: int, addr: int, length: int, flags: int, nxt: int = 0) -> None:
        self.poke(DESC_GPA + 16 * i, DESC.pack(addr, length, flags, nxt))

    def make_available(self, head: int) -> None:
        self.poke(AVAIL_GPA + 4 + 2 * (self.avail_idx % RING), struct.pack("<H", head))
        self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        self.poke(AVAIL_GPA + 2, struct.pack("<H", self.avail_idx))
        os.eventfd_write(self.kick, 1)

    def used_idx(self) -> int:
        return int(struct.unpack("<H", self.peek(USED_GPA + 2, 2))[0])

    def wait_used(self, count: int = 1, timeout: float = 10.0) -> list[tuple[int, int]]:
        """Wait (on the call eventfd, re-checking the index) until ``count`` more used entries."""
        deadline = time.monotonic() + timeout
        target = (self.used_seen + count) & 0xFFFF
        while (self.used_idx() - self.used_seen) & 0xFFFF < count:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"used index {self.used_idx()}, want {target}")
            r, _, _ = select.select([self.call], [], [], min(left, 0.2))
            if r:
                try:
                    os.eventfd_read(self.call)
                except BlockingIOError:
                    pass
        out = []
        for k in range(count):
            slot = (self.used_seen + k) % RING
            out.append(struct.unpack("<II", self.peek(USED_GPA + 4 + 8 * slot, 8)))
        self.used_seen = target
        return out

    def blk(self, rtype: int, sector: int, data: bytes | int = 0,
            data_gpa: int = DATA_GPA) -> tuple[int, bytes, int]:
        """One request (header, data, status: three descriptors): (status, data read, used len).
        ``data`` is what to write (OUT) or how many bytes to read (IN)."""
        hdr_gpa, status_gpa = DATA_GPA + 0x30000, DATA_GPA + 0x30100
        self.poke(hdr_gpa, OUTHDR.pack(rtype, 0, sector))
        self.poke(status_gpa, b"\xee")
        n = len(data) if isinstance(data, bytes) else data
        if isinstance(data, bytes):
            self.poke(data_gpa, data)
        self.put_desc(0, hdr_gpa, 16, DESC_F_NEXT, 1)
        if n:
            self.put_desc(1, data_gpa, n, DESC_F_NEXT | (DESC_F_WRITE if rtype == T_IN else 0), 2)
            self.put_desc(2, status_gpa, 1, DESC_F_WRITE)
        else:
            self.put_desc(1, status_gpa, 1, DESC_F_WRITE)
        self.make_available(0)
        ((head, length),) = self.wait_used()
        assert head == 0
        try:
            out = self.peek(data_gpa, n) if rtype == T_IN else b""
        except ValueError:  # a buffer the test placed outside its own memory
            out = b""
        return self.peek(status_gpa, 1)[0], out, length

    def start_blk(self) -> None:
        """The whole set-up QEMU does before the guest runs."""
        self.negotiate()
        self.set_mem_table()
        self.setup_ring()
