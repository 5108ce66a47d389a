"""The front-end's end of a vhost-user socket and the memory it owns (QEMU's role, issue 16).

In vhost-user the front-end owns the memory: one memfd here, offered to the back-end as one or
two table regions cut from the same fd (QEMU offers its RAM the same way, several regions of one
memfd). A guest-physical address is the offset in that memfd, so the drivers' descriptor
addresses stay offsets into one :class:`Region`, as on ivshmem. Rings are named to the back-end
by *user* addresses; each region gets its own, far from the other's, so a back-end that
translates through the wrong region misses instead of landing on the right bytes by luck.

Control messages are synchronous round trips with a deadline (as QEMU's are): they run on the
driver's event loop thread, and a back-end that does not answer in time is dropped. Between
requests the socket is watched among the interrupt fds: readable then means the back-end hung up
(or broke the protocol by talking unasked), and the driver recovers as from a lost ivshmem peer.
"""

from __future__ import annotations

import array
import os
import select
import socket
import threading
import time
from collections.abc import Sequence

import structlog

from ivshmem_virtio.errors import PeerGone, TransportError, VhostUserError
from ivshmem_virtio.shm import Region, map_fd, memfd
from ivshmem_virtio.spec import vhost_user as U
from ivshmem_virtio.spec.ivshmem import PAGE_SIZE

log = structlog.get_logger("ivshmem_virtio.frontend")

P = U.ProtocolFeature
#: what this front-end can use: CONFIG (GET_CONFIG), REPLY_ACK (every request confirmed), MQ
#: (queue count checked), BACKEND_REQ (config-change notices), RESET_DEVICE (status 0)
WANTED_PROTOCOL = U.protocol_mask(P.MQ, P.REPLY_ACK, P.CONFIG, P.BACKEND_REQ, P.RESET_DEVICE)
USER_BASE = 0x7E00_0000_0000
USER_STRIDE = 0x10_0000_0000  # between the regions' user ranges (not adjacent: see above)


class GuestMemory:
    """A memfd of ``size`` bytes (a power of two), mapped here, tabled as ``regions`` (1 or 2)
    equal regions. The driver's allocations are powers of two naturally aligned and never larger
    than half the memory, so none straddles the boundary of two regions."""

    def __init__(self, size: int = 8 << 20, regions: int = 2, name: str = "vhost-user") -> None:
        if size < 64 * PAGE_SIZE or size & (size - 1):
            raise TransportError(f"{name}: memory of {size} bytes: want a power of two >= 256K")
        if regions not in (1, 2):
            raise TransportError(f"{name}: {regions} memory regions: want 1 or 2")
        self.size = size
        self.fd = memfd(name, size)
        self.map = map_fd(self.fd, size)
        self.region = Region(self.map, name=name)
        per = size // regions
        self.table = [U.MemRegion(guest_addr=i * per, size=per,
                                  user_addr=USER_BASE + i * USER_STRIDE, mmap_offset=i * per)
                      for i in range(regions)]

    def user_addr(self, gpa: int, length: int) -> int:
        """The user address of ``[gpa, gpa+length)``, which must lie in one region."""
        for r in self.table:
            if r.guest_addr <= gpa and gpa + length <= r.guest_addr + r.size:
                return r.user_addr + gpa - r.guest_addr
        raise TransportError(f"{gpa:#x}+{length:#x} is not inside one memory region")

    def close(self) -> None:
        """Close the fd (the mapping goes with the last view of it, as the sim link's does)."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class VhostUserLink:
    """One vhost-user back-end at ``path``: the socket, the memory, the kick and call eventfds.

    It is the driver's device object: :class:`~ivshmem_virtio.link.IrqWaiter` waits on its
    :meth:`interrupt_fds` (the call eventfds, the socket, the back-end channel)."""

    def __init__(self, path: str, *, memory_size: int = 8 << 20, regions: int = 2,
                 timeout: float = 10.0) -> None:
        self.path = path
        self.name = f"vhost-user:{path}"
        self.timeout = timeout
        self.memory = GuestMemory(memory_size, regions, name=self.name)
        self.sock: socket.socket | None = None
        self._channel: socket.socket | None = None  # the back-end's requests (BACKEND_REQ)
        self._lock = threading.RLock()
        self.features = 0  # GET_FEATURES of this connection (virtio and vhost-user bits)
        self.protocol = 0  # negotiated protocol features
        self.queue_num: int | None = None  # GET_QUEUE_NUM (with MQ)
        self.kick_fds: list[int] = []
        self.call_fds: list[int] = []
        self.fd_epoch = 0
        self.config_events = 0  # CONFIG_CHANGE_MSG not yet taken (take_events)
        self._config_len: int | None = None  # the most GET_CONFIG takes (once it refused more)
        self.connections = 0

    # -- connection -----------------------------------------------------------------------------
    @property
    def connected(self) -> bool:
        return self.sock is not None

    def has(self, feature: U.ProtocolFeature) -> bool:
        return bool(self.protocol >> feature & 1)

    def connect_once(self) -> None:
        """Connect and run QEMU's opening: features, protocol features, queue count, owner."""
        self.disconnect()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            sock.connect(self.path)
        except OSError as e:
            sock.close()
            raise TransportError(f"{self.name}: {e.strerror or e}") from None
        sock.setblocking(False)
        with self._lock:
            self.sock = sock
            self.protocol = 0
            self.queue_num = None
            self._config_len = None
            self.fd_epoch += 1
            self.connections += 1
        self.features = U.parse_u64(self.request(U.Request.GET_FEATURES))
        if self.features >> U.F_PROTOCOL_FEATURES & 1:
            offered = U.parse_u64(self.request(U.Request.GET_PROTOCOL_FEATURES))
            protocol = offered & WANTED_PROTOCOL
            self.request(U.Request.SET_PROTOCOL_FEATURES, U.encode_u64(protocol))
            self.protocol = protocol  # (REPLY_ACK applies from the next request on)
            if self.has(P.MQ):
                self.queue_num = U.parse_u64(self.request(U.Request.GET_QUEUE_NUM))
        self.request(U.Request.SET_OWNER)
        if self.has(P.BACKEND_REQ):
            ours, theirs = socket.socketpair(socket.AF_UNIX,
                                             socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
            try:
                self.request(U.Request.SET_BACKEND_REQ_FD, fds=[theirs.fileno()])
            finally:
                theirs.close()
            ours.setblocking(False)
            with self._lock:
                self._channel = ours
                self.fd_epoch += 1
        log.info("vhost-user connected", link=self.name, features=hex(self.features),
                 protocol=hex(self.protocol), queue_num=self.queue_num)

    def disconnect(self) -> None:
        """Drop the connection (the back-end sees the hang-up and stops the device)."""
        with self._lock:
            for s in (self.sock, self._channel):
                if s is not None:
                    s.close()
            if self.sock is not None or self._channel is not None:
                self.fd_epoch += 1
            self.sock = self._channel = None

    def _lost(self, why: str) -> PeerGone:
        log.warning("vhost-user back-end lost", link=self.name, reason=why)
        self.disconnect()
        return PeerGone(f"{self.name}: {why}")

    # -- messages -------------------------------------------------------------------------------
    def request(self, req: U.Request, payload: bytes = b"", fds: Sequence[int] = ()) -> bytes:
        """Send one request and return its reply body (b"" for requests without one).

        With REPLY_ACK every request without a body asks for its u64 status, so a refusal
        surfaces here, at the request that caused it. A back-end that hangs up, times out or
        answers out of turn is dropped (:class:`PeerGone`)."""
        with self._lock:
            sock = self.sock
            if sock is None:
                raise PeerGone(f"{self.name}: not connected")
            body = req in U.REPLY_REQUIRED
            ack = not body and self.has(P.REPLY_ACK)
            msg = U.encode(req, payload, flags=U.FLAG_NEED_REPLY if ack else 0)
            deadline = time.monotonic() + self.timeout
            try:
                _send(sock, msg, fds, deadline)
                if not (body or ack):
                    return b""
                header = U.parse_header(_recv(sock, U.HEADER_SIZE, deadline))
                U.check_reply(header, req)
                data = _recv(sock, header.size, deadline)
                status = U.parse_u64(data) if ack else 0
            except (OSError, VhostUserError, TransportError) as e:
                raise self._lost(f"{req.name}: {e}") from None
        if status:
            raise TransportError(f"{self.name}: the back-end refused {req.name} ({status})")
        return data

    def vring(self, req: U.Request, index: int, num: int) -> int:
        """A vring-state request; GET_VRING_BASE returns the ring's base (its stop)."""
        reply = self.request(req, U.VringState(index, num).pack())
        if req != U.Request.GET_VRING_BASE:
            return 0
        try:
            state = U.VringState.parse(reply)
        except VhostUserError as e:
            raise self._lost(f"GET_VRING_BASE: {e}") from None
        if state.index != index:
            raise self._lost(f"GET_VRING_BASE of ring {index} answered for ring {state.index}")
        return state.num

    def get_config(self, off: int, length: int) -> bytes:
        """``length`` bytes of config space at ``off``. Asked from offset 0 (libvhost-user
        ignores the offset, QEMU always asks from 0); a back-end whose config is shorter than
        ``off + length`` refuses, and the tail it lacks reads as zero (fields of features it
        does not offer), found by asking for 4 bytes less at a time, once per connection."""
        if not self.has(P.CONFIG):
            raise TransportError(f"{self.name}: the back-end offers no config space (CONFIG)")
        want = min(off + length, U.MAX_CONFIG_SIZE)
        start = want if self._config_len is None else min(want, self._config_len)
        for size in range(start, 0, -4):
            msg = U.ConfigMsg(0, size, U.CONFIG_FLAG_WRITABLE, bytes(size))
            reply = self.request(U.Request.GET_CONFIG, msg.pack())
            if reply:  # an empty reply is a refusal
                got = U.ConfigMsg.parse(reply)
                if got.size != size:
                    raise self._lost(f"GET_CONFIG of {size} bytes answered with {got.size}")
                if size < want:
                    self._config_len = size
                data = got.data + bytes(want - size)
                return (data + bytes(off + length - want))[off:off + length]
        raise TransportError(f"{self.name}: the back-end refused every GET_CONFIG")

    # -- eventfds and interrupts ----------------------------------------------------------------
    def ensure_queue_fds(self, index: int) -> None:
        """Kick and call eventfds for queue ``index`` (kept over resets and reconnections)."""
        while len(self.kick_fds) <= index:
            flags = os.EFD_NONBLOCK | os.EFD_CLOEXEC
            self.kick_fds.append(os.eventfd(0, flags))
            self.call_fds.append(os.eventfd(0, flags))
            self.fd_epoch += 1

    def kick(self, index: int) -> None:
        os.eventfd_write(self.kick_fds[index], 1)

    def interrupt_fds(self) -> list[int]:
        fds = list(self.call_fds)
        fds += [s.fileno() for s in (self.sock, self._channel) if s is not None]
        return fds

    def ack_fd(self, fd: int) -> int:
        """Consume what made ``fd`` readable: a call, a hang-up, a back-end request."""
        if self.sock is not None and fd == self.sock.fileno():
            self._check_socket()
            return 1
        if self._channel is not None and fd == self._channel.fileno():
            self._serve_channel()
            return 1
        try:
            return os.eventfd_read(fd)
        except (BlockingIOError, OSError):
            return 0

    def ack_interrupts(self) -> int:
        return sum(self.ack_fd(fd) for fd in list(self.call_fds))

    def _check_socket(self) -> None:
        """Readable outside a request: end of file, or a message nobody asked for."""
        if not self._lock.acquire(blocking=False):
            return  # a request is reading it right now
        try:
            sock = self.sock
            if sock is None:
                return
            try:
                data = sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
            except BlockingIOError:
                return
            except OSError as e:
                self._lost(str(e))
                return
            self._lost("the back-end hung up" if not data else "the back-end talked unasked")
        finally:
            self._lock.release()

    def _serve_channel(self) -> None:
        """One back-end request: CONFIG_CHANGE_MSG counts as a config interrupt; anything
        else is refused (when it wants an answer). A channel that breaks is closed."""
        chan = self._channel
        if chan is None:
            return
        try:
            raw = chan.recv(U.HEADER_SIZE, socket.MSG_DONTWAIT)
            if not raw:
                raise VhostUserError("back-end channel closed")
            deadline = time.monotonic() + self.timeout
            if len(raw) < U.HEADER_SIZE:
                raw += _recv(chan, U.HEADER_SIZE - len(raw), deadline)
            header = U.parse_header(raw)
            _recv(chan, header.size, deadline)
            known = header.request == U.BackendRequest.CONFIG_CHANGE_MSG
            if known:
                self.config_events += 1
            if header.need_reply:
                reply = U.encode_reply(header.request, U.encode_u64(0 if known else 1))
                _send(chan, reply, (), deadline)
        except BlockingIOError:
            return
        except (OSError, VhostUserError, TransportError) as e:
            log.warning("vhost-user back-end channel dropped", link=self.name, error=str(e))
            with self._lock:
                chan.close()
                self._channel = None
                self.fd_epoch += 1

    def close(self) -> None:
        self.disconnect()
        for fd in self.kick_fds + self.call_fds:
            os.close(fd)
        self.kick_fds, self.call_fds = [], []
        self.fd_epoch += 1
        self.memory.close()


def _wait(sock: socket.socket, event: int, deadline: float) -> None:
    left = deadline - time.monotonic()
    if left <= 0:
        raise TransportError("the back-end does not answer")
    p = select.poll()
    p.register(sock, event)
    p.poll(left * 1000)


def _send(sock: socket.socket, msg: bytes, fds: Sequence[int], deadline: float) -> None:
    """All of ``msg``, the fds riding on its first byte."""
    anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())] if fds else []
    view = memoryview(msg)
    while view:
        try:
            n = sock.sendmsg([view], anc)
        except BlockingIOError:
            _wait(sock, select.POLLOUT, deadline)
            continue
        view, anc = view[n:], []


def _recv(sock: socket.socket, n: int, deadline: float) -> bytes:
    """Exactly ``n`` bytes (fds sent along are discarded by the kernel: none are expected)."""
    buf = bytearray()
    while len(buf) < n:
        try:
            chunk = sock.recv(n - len(buf))
        except BlockingIOError:
            _wait(sock, select.POLLIN, deadline)
            continue
        if not chunk:
            raise TransportError("the back-end hung up")
        buf += chunk
    return bytes(buf)
